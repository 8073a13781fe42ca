import json
import math
import subprocess
import sys
from pathlib import Path

import networkx as nx
import numpy as np
import pytest

from pcasgd_mpi import topology as topo
from pcasgd_mpi.topology import TopologyError, WeightRule

SIZES = (1, 2, 3, 4, 8, 16)
FIXED = ("ring", "torus", "exponential", "complete", "star")
SHIPPED = Path(__file__).resolve().parents[1] / "topologies"


def degrees(g):
    return sorted(d for _, d in g.degree())


def assert_valid_mixing(W, g):
    n = g.number_of_nodes()
    assert W.dtype == np.float64 and W.shape == (n, n)
    assert np.allclose(W, W.T, atol=1e-12)
    assert np.allclose(W.sum(axis=1), 1.0, atol=1e-12)
    assert (W >= 0).all()
    adjacency = nx.to_numpy_array(g, nodelist=range(n), weight=None) > 0
    off_diagonal = ~np.eye(n, dtype=bool)
    assert ((W > 0) & off_diagonal == adjacency).all()


# ----------------------------------------------------------------------------- named graphs


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("name", FIXED)
def test_named_graph_has_ranks_as_nodes_and_is_connected(name, n):
    g = topo.build(name, n)
    assert sorted(g.nodes) == list(range(n))
    assert nx.is_connected(g)
    assert nx.number_of_selfloops(g) == 0


@pytest.mark.parametrize("n, edges, degree", [(1, 0, 0), (2, 1, 1), (3, 3, 2), (4, 4, 2), (8, 8, 2), (16, 16, 2)])
def test_ring(n, edges, degree):
    g = topo.build("ring", n)
    assert g.number_of_edges() == edges
    assert set(degrees(g)) == {degree}


@pytest.mark.parametrize("n", SIZES)
def test_complete_and_star(n):
    complete = topo.build("complete", n)
    assert complete.number_of_edges() == n * (n - 1) // 2
    assert set(degrees(complete)) == {n - 1}
    star = topo.build("star", n)
    assert star.number_of_edges() == n - 1
    assert star.degree(0) == n - 1
    assert all(star.degree(i) == 1 for i in range(1, n))
    assert topo.neighbours(star, 0) == list(range(1, n))


@pytest.mark.parametrize(
    "n, edges, degree_set",
    [
        (16, 32, {4}),  # 4x4: four distinct wrap-around neighbours
        (9, 18, {4}),  # 3x3
        (8, 12, {3}),  # 2x4: the length-2 dimension gives one neighbour, not two
        (4, 4, {2}),  # 2x2 is the 4-cycle
    ],
)
def test_torus(n, edges, degree_set):
    g = topo.build("torus", n)
    assert g.number_of_edges() == edges
    assert set(degrees(g)) == degree_set


def test_torus_4x4_neighbours_wrap_around():
    g = topo.build("torus", 16)
    assert topo.neighbours(g, 0) == [1, 3, 4, 12]
    assert topo.neighbours(g, 5) == [1, 4, 6, 9]


@pytest.mark.parametrize("n", [5, 7, 11, 13])
def test_torus_on_a_prime_world_size_is_rejected_suggesting_ring(n):
    with pytest.raises(TopologyError, match=rf"{n} is prime; use --topology ring, or launch {n - 1} or {n + 1}"):
        topo.build("torus", n)


@pytest.mark.parametrize("n, degree", [(1, 0), (2, 1), (3, 2), (4, 3), (8, 5), (16, 7), (5, 4), (6, 4)])
def test_exponential_degree(n, degree):
    g = topo.build("exponential", n)
    assert set(degrees(g)) == {degree}


def test_exponential_8_neighbours():
    assert topo.neighbours(topo.build("exponential", 8), 0) == [1, 2, 4, 6, 7]


@pytest.mark.parametrize("n, d", [(4, 3), (8, 3), (16, 4), (16, 2), (10, 5), (2, 1), (1, 0)])
def test_random_regular_is_regular_connected_and_seeded(n, d):
    g = topo.build(f"random-regular:{d}", n, seed=3)
    assert sorted(g.nodes) == list(range(n))
    assert set(degrees(g)) == {d}
    assert nx.is_connected(g)
    assert nx.utils.graphs_equal(g, topo.build(f"random-regular:{d}", n, seed=3))


def test_random_regular_seed_changes_graph():
    graphs = [topo.build("random-regular:3", 16, seed=s) for s in range(5)]
    edge_sets = {frozenset(map(frozenset, g.edges)) for g in graphs}
    assert len(edge_sets) > 1


@pytest.mark.parametrize("n, k, p", [(8, 2, 0.3), (16, 4, 0.1), (16, 4, 1.0), (20, 6, 0.5)])
def test_small_world_is_connected_and_seeded(n, k, p):
    g = topo.build(f"small-world:{k}:{p}", n, seed=7)
    assert sorted(g.nodes) == list(range(n))
    assert nx.is_connected(g)
    assert g.number_of_edges() == n * (k // 2)  # rewiring moves edges, never adds or removes them
    assert nx.utils.graphs_equal(g, topo.build(f"small-world:{k}:{p}", n, seed=7))


def test_small_world_seed_changes_graph():
    graphs = [topo.build("small-world:4:0.5", 16, seed=s) for s in range(5)]
    assert len({frozenset(map(frozenset, g.edges)) for g in graphs}) > 1


def test_small_world_without_rewiring_is_the_ring_lattice():
    g = topo.build("small-world:4:0", 10)
    assert topo.neighbours(g, 0) == [1, 2, 8, 9]


def test_names_are_case_insensitive_and_listed():
    assert nx.utils.graphs_equal(topo.build("Ring", 5), topo.build("ring", 5))
    assert {"ring", "torus", "exponential", "complete", "star"} <= set(topo.NAMES)


# ----------------------------------------------------------------------------- mixing matrices


def rule_cases():
    for name in FIXED + ("random-regular:3", "small-world:4:0.2"):
        for n in SIZES:
            if name == "random-regular:3" and n < 4 or name == "small-world:4:0.2" and n < 5:
                continue
            for rule in ("metropolis", "max-degree", "uniform"):
                yield name, n, rule


@pytest.mark.parametrize("name, n, rule", list(rule_cases()))
def test_mixing_matrix_is_valid_where_rule_applies(name, n, rule):
    g = topo.build(name, n, seed=1)
    if rule == "uniform" and len(set(degrees(g))) > 1:
        with pytest.raises(TopologyError, match="regular"):
            topo.mixing_matrix(g, rule)
        return
    W = topo.mixing_matrix(g, rule)
    assert_valid_mixing(W, g)
    assert 0.0 <= topo.spectral_gap(W) <= 1.0 + 1e-12


def test_metropolis_values_on_star():
    W = topo.mixing_matrix(topo.build("star", 5))
    assert W[0, 1] == pytest.approx(1 / 5)
    assert W[0, 0] == pytest.approx(1 - 4 / 5)
    assert W[1, 1] == pytest.approx(4 / 5)
    assert W[1, 2] == 0.0


def test_max_degree_values_on_star():
    W = topo.mixing_matrix(topo.build("star", 5), WeightRule.MAX_DEGREE)
    assert W[0, 3] == pytest.approx(1 / 5)
    assert W[3, 3] == pytest.approx(4 / 5)


def test_uniform_equals_metropolis_on_regular_graphs():
    g = topo.build("torus", 16)
    np.testing.assert_allclose(topo.mixing_matrix(g, "uniform"), topo.mixing_matrix(g, "metropolis"))
    assert topo.mixing_matrix(g, "uniform")[0, 0] == pytest.approx(1 / 5)


@pytest.mark.parametrize("n", [2, 3, 5, 8, 16])
def test_complete_graph_uniform_gap_is_one(n):
    W = topo.mixing_matrix(topo.build("complete", n), "uniform")
    np.testing.assert_allclose(W, np.full((n, n), 1 / n))
    assert topo.spectral_gap(W) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("n", [3, 4, 5, 8, 16, 33])
def test_ring_gap_matches_circulant_eigenvalues(n):
    # W = (I + A) / 3 is circulant with eigenvalues (1 + 2 cos(2 pi k / n)) / 3.
    expected = 1 - max(abs(1 + 2 * math.cos(2 * math.pi * k / n)) / 3 for k in range(1, n))
    assert topo.spectral_gap(topo.mixing_matrix(topo.build("ring", n))) == pytest.approx(expected, abs=1e-12)


def test_spectral_gap_edge_cases():
    assert topo.spectral_gap(np.eye(1)) == 1.0
    assert topo.spectral_gap(np.eye(3)) == pytest.approx(0.0)
    assert topo.spectral_gap(np.array([[0.0, 1.0], [1.0, 0.0]])) == pytest.approx(0.0)
    assert topo.spectral_gap(np.array([[0.5, 0.5], [0.5, 0.5]])) == pytest.approx(1.0)


def test_file_rule_uses_edge_weights():
    g = nx.path_graph(3)
    nx.set_edge_attributes(g, {(0, 1): 0.3, (1, 2): 0.6}, "weight")
    W = topo.mixing_matrix(g, "file")
    np.testing.assert_allclose(W, [[0.7, 0.3, 0.0], [0.3, 0.1, 0.6], [0.0, 0.6, 0.4]])


def test_single_node():
    g = topo.build("ring", 1)
    for rule in ("metropolis", "uniform", "max-degree"):
        np.testing.assert_array_equal(topo.mixing_matrix(g, rule), [[1.0]])


# ----------------------------------------------------------------------------- shipped files


@pytest.mark.parametrize(
    "filename, n, rule, edges, gap",
    [
        ("ring-of-cliques-8.graphml", 8, "metropolis", 14, None),
        ("torus-16.edgelist", 16, "uniform", 32, 0.4),
        ("weighted-ring-4.json", 4, "file", 4, 0.5),
    ],
)
def test_shipped_topologies_load_and_validate(filename, n, rule, edges, gap):
    g = topo.build(str(SHIPPED / filename), n)
    assert sorted(g.nodes) == list(range(n))
    assert g.number_of_edges() == edges
    W = topo.mixing_matrix(g, rule)
    assert_valid_mixing(W, g)
    if gap is not None:
        assert topo.spectral_gap(W) == pytest.approx(gap, abs=1e-9)


def test_shipped_torus_file_equals_built_torus():
    assert nx.utils.graphs_equal(topo.build(str(SHIPPED / "torus-16.edgelist"), 16), topo.build("torus", 16))


def test_shipped_ring_of_cliques_shape():
    g = topo.build(str(SHIPPED / "ring-of-cliques-8.graphml"), 8)
    assert degrees(g) == [3, 3, 3, 3, 4, 4, 4, 4]
    assert g.has_edge(3, 4) and g.has_edge(7, 0)
    with pytest.raises(TopologyError, match="regular"):
        topo.mixing_matrix(g, "uniform")


def test_shipped_weighted_ring_matrix():
    W = topo.mixing_matrix(topo.build(str(SHIPPED / "weighted-ring-4.json"), 4), "file")
    np.testing.assert_allclose(np.diag(W), 0.5)
    assert W[0, 1] == W[0, 3] == pytest.approx(0.25) and W[0, 2] == 0.0


# ----------------------------------------------------------------------------- file formats


def test_edgelist_with_comments_and_weights(tmp_path):
    path = tmp_path / "g.txt"
    path.write_text("# triangle\n0 1 0.25   # heavy\n\n1 2 0.25\n0 2 0.25\n")
    g = topo.build(str(path), 3)
    assert g[0][1]["weight"] == 0.25
    np.testing.assert_allclose(np.diag(topo.mixing_matrix(g, "file")), 0.5)


def test_graphml_string_ids_become_ints(tmp_path):
    path = tmp_path / "g.graphml"
    nx.write_graphml(nx.relabel_nodes(nx.cycle_graph(4), str), path)
    g = topo.build(str(path), 4)
    assert sorted(g.nodes) == [0, 1, 2, 3] and all(isinstance(v, int) for v in g.nodes)


def test_json_with_legacy_links_key(tmp_path):
    path = tmp_path / "g.json"
    path.write_text(json.dumps(nx.node_link_data(nx.path_graph(3), edges="links")))
    assert topo.build(str(path), 3).number_of_edges() == 2


# ----------------------------------------------------------------------------- rejected inputs


def two_triangles():
    return nx.disjoint_union(nx.cycle_graph(3), nx.cycle_graph(3))


def test_disconnected_graph_rejected():
    with pytest.raises(TopologyError, match=r"not connected \(components: \[0, 1, 2\], \[3, 4, 5\]\)"):
        topo.validate(two_triangles(), 6)


def test_disconnected_file_names_the_file(tmp_path):
    path = tmp_path / "split.edgelist"
    path.write_text("0 1\n2 3\n")
    with pytest.raises(TopologyError, match=r"split\.edgelist' is not connected"):
        topo.build(str(path), 4)


def test_size_mismatch_rejected():
    with pytest.raises(TopologyError) as info:
        topo.validate(nx.cycle_graph(8), 4)
    message = str(info.value)
    assert "has 8 nodes but the job has 4 ranks" in message and "mpirun -n 8" in message
    assert "\n" not in message


def test_size_mismatch_from_file(tmp_path):
    with pytest.raises(TopologyError, match="has 16 nodes but the job has 8 ranks"):
        topo.build(str(SHIPPED / "torus-16.edgelist"), 8)


def test_bad_node_labels_rejected():
    with pytest.raises(TopologyError, match=r"integers 0\.\.2.*missing \[2\]"):
        topo.validate(nx.relabel_nodes(nx.path_graph(3), {2: 5}), 3)


def test_self_loop_rejected():
    g = nx.cycle_graph(4)
    g.add_edge(2, 2)
    with pytest.raises(TopologyError, match=r"self-loops at nodes \[2\]"):
        topo.validate(g, 4)


def test_self_loop_in_file_rejected(tmp_path):
    path = tmp_path / "loop.txt"
    path.write_text("0 1\n1 1\n")
    with pytest.raises(TopologyError, match="self-loop"):
        topo.build(str(path), 2)


def test_directed_graph_rejected():
    with pytest.raises(TopologyError, match="undirected"):
        topo.validate(nx.DiGraph(nx.cycle_graph(3)), 3)


@pytest.mark.parametrize(
    "suffix, text",
    [
        (".txt", "0 1\n1 two\n"),
        (".edgelist", "0 1 2 3\n"),
        (".graphml", "<graphml><graph><node id='0'"),
        (".json", "{not json"),
        (".json", json.dumps({"nodes": [{"id": "a"}, {"id": "b"}], "edges": [{"source": "a", "target": "b"}]})),
    ],
)
def test_unparseable_file_rejected_with_path_and_reason(tmp_path, suffix, text):
    path = tmp_path / f"broken{suffix}"
    path.write_text(text)
    with pytest.raises(TopologyError) as info:
        topo.build(str(path), 2)
    message = str(info.value)
    assert f"cannot read topology file {path}" in message
    assert "\n" not in message


def test_edgelist_parse_error_names_the_line(tmp_path):
    path = tmp_path / "g.txt"
    path.write_text("0 1\n# ok\n1 two\n")
    with pytest.raises(TopologyError, match=r"line 3: .*'1 two'"):
        topo.build(str(path), 2)


@pytest.mark.parametrize("second", ["0 1 0.4", "1 0 0.4", "1 0 0.25"])
def test_edgelist_duplicate_edge_in_either_order_is_rejected_naming_it(tmp_path, second):
    path = tmp_path / "g.txt"
    path.write_text(f"0 1 0.25\n1 2 0.25\n{second}\n")
    with pytest.raises(TopologyError) as info:
        topo.build(str(path), 3)
    message = str(info.value)
    assert "line 3: edge" in message and "is listed twice" in message
    conflict = second.endswith("0.4")
    assert ("with weights 0.25 and 0.4" in message) == conflict


def test_json_duplicate_edge_is_rejected_naming_it(tmp_path):
    path = tmp_path / "g.json"
    path.write_text(
        json.dumps(
            {
                "nodes": [{"id": 0}, {"id": 1}, {"id": 2}],
                "edges": [
                    {"source": 0, "target": 1, "weight": 0.25},
                    {"source": 1, "target": 2},
                    {"source": 1, "target": 0, "weight": 0.4},
                ],
            }
        )
    )
    with pytest.raises(TopologyError, match=r"edge 0-1 is listed twice with weights 0.25 and 0.4"):
        topo.build(str(path), 3)


@pytest.mark.parametrize(
    "doc", [[1, 2], {"graph": {}}, {"nodes": [0, 1]}, {"nodes": [{"id": 0}], "edges": [[0, 1]]}, "text"]
)
def test_json_that_is_not_node_link_is_one_line(tmp_path, doc):
    path = tmp_path / "g.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(TopologyError) as info:
        topo.build(str(path), 2)
    message = str(info.value)
    assert "expected networkx node-link JSON" in message and "\n" not in message
    assert "KeyError" not in message and "AttributeError" not in message


@pytest.mark.parametrize("weight", ["1e308", "inf", "nan", "-1e300"])
def test_absurd_or_non_finite_weight_is_one_line_without_numpy_warnings(tmp_path, weight):
    path = tmp_path / "g.txt"
    path.write_text(f"0 1 {weight}\n1 2 0.25\n2 0 0.25\n")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an overflow warning would fail here
        with pytest.raises(TopologyError, match=r"edge 0-1 has weight .*finite fractions"):
            graph = topo.build(str(path), 3)
            topo.mixing_matrix(graph, "file")


def test_absurd_weight_set_through_the_api_is_rejected_by_mixing_matrix():
    g = nx.cycle_graph(3)
    nx.set_edge_attributes(g, 0.25, "weight")
    g.edges[0, 1]["weight"] = 1e308
    with pytest.raises(TopologyError, match="edge 0-1 has weight 1e[+]?308"):
        topo.mixing_matrix(g, "file")


@pytest.mark.parametrize("text", ["", "# only a comment\n\n"])
def test_empty_topology_file_is_rejected(tmp_path, text):
    path = tmp_path / "empty.edgelist"
    path.write_text(text)
    with pytest.raises(TopologyError, match="holds no graph"):
        topo.build(str(path), 4)


def test_graphml_with_parallel_edges_is_rejected(tmp_path):
    g = nx.MultiGraph([(0, 1), (1, 2), (2, 0), (1, 0)])
    path = tmp_path / "g.graphml"
    nx.write_graphml(g, path)
    with pytest.raises(TopologyError, match="directed or has parallel edges"):
        topo.build(str(path), 3)


def test_directory_as_topology_says_it_is_a_directory(tmp_path):
    folder = tmp_path / "graphs"
    folder.mkdir()
    with pytest.raises(TopologyError, match=rf"topology {folder} is a directory; pass a graph file"):
        topo.build(str(folder), 4)


def test_missing_file_rejected(tmp_path):
    path = tmp_path / "nowhere.graphml"
    with pytest.raises(TopologyError, match=rf"topology file {path} does not exist"):
        topo.build(str(path), 4)


def test_unsupported_file_type_rejected(tmp_path):
    path = tmp_path / "g.csv"
    path.write_text("0,1\n")
    with pytest.raises(TopologyError, match="unsupported type"):
        topo.build(str(path), 2)


def weighted_ring_file(tmp_path, weights):
    g = nx.cycle_graph(4)
    nx.set_edge_attributes(g, dict(zip(sorted(g.edges), weights)), "weight")
    path = tmp_path / "w.json"
    path.write_text(json.dumps(nx.node_link_data(g, edges="edges")))
    return topo.build(str(path), 4)


def test_negative_file_weight_rejected(tmp_path):
    g = weighted_ring_file(tmp_path, [-0.1, 0.25, 0.25, 0.25])
    with pytest.raises(TopologyError, match=r"W\[0\]\[1\] = -0\.1 is negative"):
        topo.mixing_matrix(g, "file")


def test_file_weights_summing_above_one_rejected(tmp_path):
    # Node 0 carries 0.7 + 0.6: its self-weight would be -0.3, so W cannot be doubly stochastic.
    g = weighted_ring_file(tmp_path, [0.7, 0.6, 0.2, 0.2])
    with pytest.raises(TopologyError, match=r"self-weight W\[0\]\[0\] = -0\.3 is negative.*sum to 1\.3"):
        topo.mixing_matrix(g, "file")


def test_file_rule_without_weights_rejected():
    with pytest.raises(TopologyError, match="no 'weight' attribute"):
        topo.mixing_matrix(nx.cycle_graph(4), "file")


def test_zero_file_weight_on_edge_rejected(tmp_path):
    g = weighted_ring_file(tmp_path, [0.0, 0.25, 0.25, 0.25])
    with pytest.raises(TopologyError, match=r"edge \(0, 1\) has mixing weight 0"):
        topo.mixing_matrix(g, "file")


@pytest.mark.parametrize("spec", ["hypercube", "rnig", "mesh"])
def test_unknown_name_rejected(spec):
    with pytest.raises(TopologyError) as info:
        topo.build(spec, 4)
    message = str(info.value)
    assert f"unknown topology '{spec}'" in message
    assert all(name in message for name in topo.NAMES)
    assert "path" in message and ".graphml" in message


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("random-regular:x", "expected random-regular:D"),
        ("random-regular", "expected random-regular:D"),
        ("random-regular:3:1", "expected random-regular:D"),
        ("small-world:4", "expected small-world:K:P"),
        ("small-world:four:0.1", "expected small-world:K:P"),
        ("ring:3", "takes no parameters"),
    ],
)
def test_malformed_spec_rejected(spec, fragment):
    with pytest.raises(TopologyError, match=fragment):
        topo.build(spec, 8)


@pytest.mark.parametrize(
    "spec, n, fragment",
    [
        ("random-regular:3", 5, "n\\*D is odd"),
        ("random-regular:4", 4, "0 <= D < 4"),
        ("random-regular:1", 6, "never connected"),
        ("small-world:8:0.1", 8, "2 <= K < 8"),
        ("small-world:4:1.5", 8, "0 <= P <= 1"),
    ],
)
def test_impossible_parameters_rejected(spec, n, fragment):
    with pytest.raises(TopologyError, match=fragment):
        topo.build(spec, n)


def test_uniform_rule_on_irregular_graph_rejected():
    with pytest.raises(TopologyError, match=r"only on regular graphs.*range 1\.\.3.*metropolis"):
        topo.mixing_matrix(topo.build("star", 4), "uniform")


def test_unknown_rule_rejected():
    with pytest.raises(TopologyError, match="unknown weight rule 'laplacian'"):
        topo.mixing_matrix(nx.cycle_graph(4), "laplacian")


def test_zero_ranks_rejected():
    with pytest.raises(TopologyError, match="at least 1 rank"):
        topo.build("ring", 0)


@pytest.mark.parametrize(
    "mutate, fragment",
    [
        (lambda W: W[:3], "shape"),
        (lambda W: np.where(np.eye(4, dtype=bool), np.nan, W), "not finite"),
        (
            lambda W: W + np.array([[0, 0.1, 0, 0], [0] * 4, [0] * 4, [0] * 4]) - np.diag([0.1, 0, 0, 0]),
            "not symmetric",
        ),
        (lambda W: W * 1.1, "row 0 sums to 1.1"),
        (lambda W: W + 0.1 * (np.eye(4)[[2, 3, 0, 1]] - np.eye(4)), "not on an edge"),
    ],
)
def test_validate_matrix_rejects(mutate, fragment):
    g = nx.cycle_graph(4)
    W = topo.mixing_matrix(g)
    topo.validate_matrix(W, g)
    with pytest.raises(TopologyError, match=fragment):
        topo.validate_matrix(mutate(W), g)


# ----------------------------------------------------------------------------- reporting


def test_neighbours_sorted_and_unknown_rank():
    g = topo.build("ring", 6)
    assert topo.neighbours(g, 0) == [1, 5]
    with pytest.raises(TopologyError, match="rank 6 is not a node"):
        topo.neighbours(g, 6)


def test_describe_reports_structure_and_gap():
    g = topo.build("ring", 4)
    text = topo.describe(g, topo.mixing_matrix(g))
    assert "nodes: 4" in text
    assert "edges: 4: 0-1, 0-3, 1-2, 2-3" in text
    assert "min 2, max 2" in text
    assert "0.333" in text
    assert "spectral gap 1 - |lambda_2|: 0.666667" in text


def test_draw_writes_png(tmp_path):
    path = tmp_path / "ring.png"
    topo.draw(topo.build("torus", 9), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_import_pulls_in_neither_torch_nor_mpi():
    code = (
        "import sys, pcasgd_mpi.topology; "
        "print(sorted(m for m in ('torch', 'mpi4py', 'matplotlib') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_largest_disagreement_rate_is_the_stiffest_mode_of_i_minus_w():
    ring = topo.mixing_matrix(topo.build("ring", 8), "metropolis")
    assert topo.largest_disagreement_rate(ring) == pytest.approx(4 / 3)
    complete = topo.mixing_matrix(topo.build("complete", 5), "uniform")
    assert topo.largest_disagreement_rate(complete) == pytest.approx(1.0)
    # not symmetric: the modulus of the complex eigenvalues
    W = np.array([[0.5, 0.5, 0.0], [0.0, 0.5, 0.5], [0.5, 0.0, 0.5]])
    assert topo.largest_disagreement_rate(W) == pytest.approx(max(abs(np.linalg.eigvals(np.eye(3) - W))))
