"""Communication graphs and mixing matrices for decentralized training.

Pure functions on networkx graphs and numpy arrays.  Nothing here imports torch or
mpi4py, so topologies can be built, checked and drawn on a laptop before a job is
launched, and every rank of a job derives the same graph from the same spec.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import networkx as nx
import numpy as np

from .config import WeightRule

__all__ = [
    "NAMES",
    "TopologyError",
    "WeightRule",
    "build",
    "validate",
    "mixing_matrix",
    "validate_matrix",
    "spectral_gap",
    "neighbours",
    "describe",
    "draw",
]

NAMES = ("ring", "torus", "exponential", "complete", "star", "random-regular:D", "small-world:K:P")
_FILE_TYPES = {
    ".txt": "edgelist",
    ".edgelist": "edgelist",
    ".edges": "edgelist",
    ".graphml": "graphml",
    ".json": "json",
}
_RETRIES = 200
# Weights are fractions of a model; far beyond this is a typo (1e308 overflows the row sums).
_MAX_WEIGHT = 1e6


class TopologyError(ValueError):
    """A topology or mixing matrix that cannot be used; the message says how to fix it."""


def _short(items, limit: int = 8) -> str:
    # Messages stay one readable line even for graphs with thousands of nodes.
    items = list(items)
    text = ", ".join(map(str, items[:limit]))
    return text + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


# ----------------------------------------------------------------------------- named graphs


def _ring(n: int) -> nx.Graph:
    # cycle_graph(2) would be a single edge too, but cycle_graph(1) adds a self-loop.
    return nx.cycle_graph(n) if n >= 3 else nx.path_graph(n)


def _torus(n: int) -> nx.Graph:
    rows = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    cols = n // rows
    if rows == 1 and n > 3:
        # A 1 x n torus is the ring: say so rather than report a torus that is not one.
        raise TopologyError(
            f"torus needs a world size with a factorisation rows x cols, but {n} is prime; "
            f"use --topology ring, or launch {n - 1} or {n + 1} ranks"
        )
    g = nx.empty_graph(n)
    for r in range(rows):
        for c in range(cols):
            i = r * cols + c
            # A wrap-around dimension of length 1 or 2 would add self-loops or repeat an edge.
            for j in (((r + 1) % rows) * cols + c, r * cols + (c + 1) % cols):
                if j != i:
                    g.add_edge(i, j)
    return g


def _exponential(n: int) -> nx.Graph:
    g = nx.empty_graph(n)
    hops = [2**k for k in range(n.bit_length()) if 2**k < n]
    g.add_edges_from((i, (i + h) % n) for i in range(n) for h in hops)
    return g


def _random_regular(n: int, d: int, seed: int) -> nx.Graph:
    if not 0 <= d < n:
        raise TopologyError(f"random-regular:{d} needs 0 <= D < {n} (the number of ranks); pick a smaller D")
    if (n * d) % 2:
        raise TopologyError(
            f"random-regular:{d} on {n} nodes is impossible because n*D is odd; change D or the rank count"
        )
    if n > 1 and (d == 0 or d == 1 and n > 2):
        raise TopologyError(f"random-regular:{d} on {n} nodes is never connected; use D >= 2")
    for attempt in range(_RETRIES):
        g = nx.random_regular_graph(d, n, seed=seed * 1_000_003 + attempt)
        if nx.is_connected(g):
            return g
    raise TopologyError(f"random-regular:{d} on {n} nodes was not connected in {_RETRIES} seeded tries; use a larger D")


def _small_world(n: int, k: int, p: float, seed: int) -> nx.Graph:
    if not (2 <= k < n) or not 0.0 <= p <= 1.0:
        raise TopologyError(f"small-world:{k}:{p} needs 2 <= K < {n} (the number of ranks) and 0 <= P <= 1")
    try:
        return nx.connected_watts_strogatz_graph(n, k, p, tries=_RETRIES, seed=seed)
    except nx.NetworkXError as exc:
        raise TopologyError(f"small-world:{k}:{p} on {n} nodes failed: {exc}; raise K or lower P") from None


def _parse_params(spec: str, name: str, params: list[str], types: tuple) -> list:
    usage = {
        "random-regular": "random-regular:D with integer D, e.g. random-regular:3",
        "small-world": "small-world:K:P with integer K and probability P, e.g. small-world:4:0.1",
    }
    if len(params) != len(types):
        if not types:
            raise TopologyError(f"topology '{name}' takes no parameters but got '{spec}'; use '{name}'")
        raise TopologyError(f"malformed topology '{spec}': expected {usage[name]}")
    try:
        return [t(p) for t, p in zip(types, params)]
    except ValueError:
        raise TopologyError(f"malformed topology '{spec}': expected {usage[name]}") from None


def build(spec: str, size: int, *, seed: int = 0) -> nx.Graph:
    """Graph with nodes 0..size-1 from a built-in name (see NAMES) or a graph file path."""
    if size < 1:
        raise TopologyError(f"the job must have at least 1 rank, got {size}")
    name, *params = spec.split(":")
    name = name.strip().lower()
    fixed = {
        "ring": _ring,
        "torus": _torus,
        "exponential": _exponential,
        "complete": nx.complete_graph,
        "star": lambda n: nx.star_graph(n - 1),
    }
    if name in fixed:
        _parse_params(spec, name, params, ())
        graph = fixed[name](size)
    elif name == "random-regular":
        (d,) = _parse_params(spec, name, params, (int,))
        graph = _random_regular(size, d, seed)
    elif name == "small-world":
        k, p = _parse_params(spec, name, params, (int, float))
        graph = _small_world(size, k, p, seed)
    elif Path(spec).suffix.lower() in _FILE_TYPES or "/" in spec or Path(spec).exists():
        graph = _load(Path(spec))
    else:
        raise TopologyError(
            f"unknown topology '{spec}'; use one of {', '.join(NAMES)} or a path to a "
            f"graph file ({', '.join(_FILE_TYPES)})"
        )
    validate(graph, size, name=spec)
    return graph


# ----------------------------------------------------------------------------- graph files


def _read_edgelist(path: Path) -> nx.Graph:
    g = nx.Graph()
    for number, line in enumerate(path.read_text().splitlines(), 1):
        tokens = line.split("#", 1)[0].split()
        if not tokens:
            continue
        if len(tokens) not in (2, 3):
            raise ValueError(f"line {number}: expected 'u v' or 'u v weight', got {line.strip()!r}")
        try:
            u, v = int(tokens[0]), int(tokens[1])
            attrs = {"weight": float(tokens[2])} if len(tokens) == 3 else {}
        except ValueError:
            raise ValueError(
                f"line {number}: expected integer nodes and a numeric weight, got {line.strip()!r}"
            ) from None
        if g.has_edge(u, v):
            # The last line silently winning would hide a typo in the weights.
            first, again = g.edges[u, v].get("weight"), attrs.get("weight")
            weights = f" with weights {first} and {again}" if first != again else ""
            raise ValueError(f"line {number}: edge {u}-{v} is listed twice{weights}; keep one line per edge")
        g.add_edge(u, v, **attrs)
    return g


_NODE_LINK = 'expected networkx node-link JSON: {"nodes": [{"id": 0}, ...], "edges": [{"source": 0, "target": 1}, ...]}'


def _read_json(path: Path) -> nx.Graph:
    data = json.loads(path.read_text())
    # Files written before networkx 3.4 name the edge list "links".
    key = "links" if isinstance(data, dict) and "links" in data and "edges" not in data else "edges"
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("nodes"), list)
        or not isinstance(data.get(key, []), list)
        or not all(isinstance(n, dict) and "id" in n for n in data["nodes"])
        or not all(isinstance(e, dict) and "source" in e and "target" in e for e in data.get(key, []))
    ):
        raise ValueError(_NODE_LINK)
    seen: dict[tuple, object] = {}
    for e in data.get(key, []):
        pair = tuple(sorted((e["source"], e["target"]), key=str))
        if pair in seen:
            again = e.get("weight")
            weights = f" with weights {seen[pair]} and {again}" if seen[pair] != again else ""
            raise ValueError(f"edge {pair[0]}-{pair[1]} is listed twice{weights}; keep one entry per edge")
        seen[pair] = e.get("weight")
    return nx.node_link_graph(data, edges=key)


def _as_int(node) -> int:
    if isinstance(node, bool) or not isinstance(node, (int, str)):
        raise ValueError(f"node id {node!r} is not an integer; label nodes 0..n-1")
    try:
        return int(node)
    except ValueError:
        raise ValueError(f"node id {node!r} is not an integer; label nodes 0..n-1") from None


def _load(path: Path) -> nx.Graph:
    if path.is_dir():
        raise TopologyError(
            f"topology {path} is a directory; pass a graph file ({', '.join(_FILE_TYPES)}) or one of {', '.join(NAMES)}"
        )
    if not path.is_file():
        raise TopologyError(f"topology file {path} does not exist; pass an existing file or one of {', '.join(NAMES)}")
    kind = _FILE_TYPES.get(path.suffix.lower())
    if kind is None:
        raise TopologyError(f"topology file {path} has an unsupported type; use {', '.join(_FILE_TYPES)}")
    try:
        raw = {"edgelist": _read_edgelist, "graphml": nx.read_graphml, "json": _read_json}[kind](path)
        if raw.is_directed() or raw.is_multigraph():
            raise ValueError("graph is directed or has parallel edges; mixing needs a simple undirected graph")
        # Rebuild with integer nodes and only float weights, so string ids from GraphML and
        # unrelated attributes never reach the mixing matrix.
        graph = nx.Graph()
        graph.add_nodes_from(_as_int(v) for v in raw.nodes)
        for u, v, data in raw.edges(data=True):
            attrs = {"weight": _weight(data["weight"], u, v)} if "weight" in data else {}
            graph.add_edge(_as_int(u), _as_int(v), **attrs)
    except Exception as exc:  # parsers raise many unrelated types; all mean "unreadable file"
        detail = " ".join(str(exc).split())
        kind_text = "" if isinstance(exc, ValueError) else f"{type(exc).__name__}: "
        raise TopologyError(f"cannot read topology file {path}: {kind_text}{detail}") from None
    if graph.number_of_nodes() == 0:
        raise TopologyError(f"topology file {path} holds no graph (no nodes or edges); list one edge 'u v' per line")
    return graph


def _weight(value, u, v) -> float:
    weight = float(value)
    if not math.isfinite(weight) or abs(weight) > _MAX_WEIGHT:
        raise ValueError(f"edge {u}-{v} has weight {value}; mixing weights are finite fractions in (0, 1)")
    return weight


# ----------------------------------------------------------------------------- checks


def validate(graph: nx.Graph, size: int, *, name: str | None = None) -> None:
    """Raise TopologyError unless graph is simple, undirected, connected, with nodes 0..size-1."""
    label = f"topology '{name}'" if name else "topology"
    n = graph.number_of_nodes()
    if graph.is_directed() or graph.is_multigraph():
        raise TopologyError(
            f"{label} must be a simple undirected graph, got {type(graph).__name__}; "
            f"convert it with networkx.Graph(...)"
        )
    if n != size:
        raise TopologyError(
            f"{label} has {n} nodes but the job has {size} ranks; "
            f"launch with mpirun -n {n} or pick a topology for {size}"
        )
    expected = set(range(size))
    if set(graph.nodes) != expected:
        extra = sorted(map(repr, set(graph.nodes) - expected))
        missing = sorted(expected - set(graph.nodes))
        raise TopologyError(
            f"{label} nodes must be the integers 0..{size - 1}, one per rank; "
            f"unexpected [{_short(extra)}], missing [{_short(missing)}]; relabel the nodes"
        )
    loops = sorted(u for u, _ in nx.selfloop_edges(graph))
    if loops:
        raise TopologyError(
            f"{label} has self-loops at nodes [{_short(loops)}]; remove them "
            f"(the self-weight is derived from the other weights)"
        )
    if n and not nx.is_connected(graph):
        parts = sorted(sorted(c) for c in nx.connected_components(graph))
        shown = ", ".join(f"[{_short(c, 6)}]" for c in parts[:4]) + (", ..." if len(parts) > 4 else "")
        raise TopologyError(
            f"{label} is not connected (components: {shown}); add edges so every agent can reach every other"
        )


def mixing_matrix(graph: nx.Graph, rule: WeightRule | str = "metropolis") -> np.ndarray:
    """Symmetric doubly-stochastic W (float64, n x n) supported on the graph's edges."""
    validate(graph, graph.number_of_nodes())
    try:
        rule = WeightRule(rule)
    except ValueError:
        valid = ", ".join(r.value for r in WeightRule)
        raise TopologyError(f"unknown weight rule {rule!r}; use one of {valid}") from None
    n = graph.number_of_nodes()
    deg = dict(graph.degree())
    if rule is WeightRule.UNIFORM and len(set(deg.values())) > 1:
        raise TopologyError(
            f"uniform weights 1/(deg+1) are doubly stochastic only on regular graphs, but degrees "
            f"here range {min(deg.values())}..{max(deg.values())}; use --weights metropolis"
        )
    if rule is WeightRule.FILE:
        missing = [(u, v) for u, v, w in graph.edges(data="weight") if w is None]
        if missing:
            raise TopologyError(
                f"edges {_short(missing, 4)} have no 'weight' attribute; add weights to the "
                f"topology file or use --weights metropolis"
            )
        absurd = [(u, v, w) for u, v, w in graph.edges(data="weight") if not abs(w) <= _MAX_WEIGHT]
        if absurd:
            u, v, w = absurd[0]
            raise TopologyError(f"edge {u}-{v} has weight {w}; mixing weights are finite fractions in (0, 1)")
    max_deg = max(deg.values())
    W = np.zeros((n, n))
    for u, v, w in graph.edges(data="weight"):
        if rule is WeightRule.METROPOLIS:
            w = 1.0 / (1 + max(deg[u], deg[v]))
        elif rule is WeightRule.UNIFORM:
            w = 1.0 / (deg[u] + 1)
        elif rule is WeightRule.MAX_DEGREE:
            w = 1.0 / (1 + max_deg)
        W[u, v] = W[v, u] = w
    np.fill_diagonal(W, 1.0 - W.sum(axis=1))
    validate_matrix(W, graph)
    return W


def validate_matrix(W: np.ndarray, graph: nx.Graph) -> None:
    """Raise TopologyError unless W is a valid mixing matrix for graph."""
    W = np.asarray(W, dtype=float)
    n = graph.number_of_nodes()
    validate(graph, n)
    if W.shape != (n, n):
        raise TopologyError(f"mixing matrix has shape {W.shape} but the topology has {n} nodes; it must be {n}x{n}")
    if not np.isfinite(W).all():
        j, l = np.argwhere(~np.isfinite(W))[0]
        raise TopologyError(f"mixing matrix entry W[{j}][{l}] = {W[j, l]} is not finite; check the weights")
    if (W < -1e-12).any():
        j, l = np.unravel_index(np.argmin(W), W.shape)
        if j == l:
            others = W[j].sum() - W[j, j]
            raise TopologyError(
                f"self-weight W[{j}][{j}] = {W[j, j]:.6g} is negative: node {j}'s edge weights "
                f"sum to {others:.6g}; scale them so each node's sum is at most 1"
            )
        raise TopologyError(f"mixing weight W[{j}][{l}] = {W[j, l]:.6g} is negative; weights must be >= 0")
    asym = np.abs(W - W.T)
    if asym.max() > 1e-9:
        j, l = np.unravel_index(np.argmax(asym), W.shape)
        raise TopologyError(
            f"mixing matrix is not symmetric: W[{j}][{l}] = {W[j, l]:.6g} but W[{l}][{j}] = {W[l, j]:.6g}"
        )
    rows = W.sum(axis=1)
    if np.abs(rows - 1).max() > 1e-9:
        j = int(np.argmax(np.abs(rows - 1)))
        raise TopologyError(f"mixing matrix is not doubly stochastic: row {j} sums to {rows[j]:.12g}, not 1")
    edges = nx.to_numpy_array(graph, nodelist=range(n), weight=None) > 0
    off_support = (W > 1e-12) & ~edges & ~np.eye(n, dtype=bool)
    if off_support.any():
        j, l = np.argwhere(off_support)[0]
        raise TopologyError(
            f"mixing weight W[{j}][{l}] = {W[j, l]:.6g} is not on an edge of the topology; "
            f"weights may only sit on edges and the diagonal"
        )
    if (edges & (W <= 0)).any():
        j, l = np.argwhere(edges & (W <= 0))[0]
        raise TopologyError(f"edge ({j}, {l}) has mixing weight 0; give it a positive weight or remove the edge")


def spectral_gap(W: np.ndarray) -> float:
    """1 - |lambda_2(W)|: how fast repeated mixing reaches consensus (1 = one step, 0 = never)."""
    moduli = np.sort(np.abs(np.linalg.eigvalsh(np.asarray(W, dtype=float))))[::-1]
    return 1.0 if len(moduli) < 2 else float(1.0 - moduli[1])


def largest_disagreement_rate(W: np.ndarray) -> float:
    """μ_max, the largest modulus of an eigenvalue of I − W: how hard one mixing step pulls the
    agents' stiffest disagreement back (4/3 on a ring with Metropolis weights)."""
    W = np.asarray(W, dtype=float)
    L = np.eye(len(W)) - W
    values = np.linalg.eigvalsh(L) if np.allclose(W, W.T) else np.linalg.eigvals(L)
    return float(np.max(np.abs(values)))


# ----------------------------------------------------------------------------- reporting


def neighbours(graph: nx.Graph, rank: int) -> list[int]:
    if rank not in graph:
        raise TopologyError(f"rank {rank} is not a node of the topology (nodes 0..{graph.number_of_nodes() - 1})")
    return sorted(graph.neighbors(rank))


def describe(graph: nx.Graph, W: np.ndarray) -> str:
    degrees = [d for _, d in sorted(graph.degree())]
    edges = sorted(tuple(sorted(e)) for e in graph.edges)
    with np.printoptions(precision=3, suppress=True, linewidth=120):
        matrix = str(np.asarray(W))
    return "\n".join(
        [
            f"nodes: {graph.number_of_nodes()}",
            f"edges: {len(edges)}: " + _short((f"{u}-{v}" for u, v in edges), 40),
            f"degrees: min {min(degrees)}, max {max(degrees)}, per node [{_short(degrees, 40)}]",
            "mixing matrix W (rounded):",
            matrix,
            f"spectral gap 1 - |lambda_2|: {spectral_gap(W):.6f}",
        ]
    )


def draw(graph: nx.Graph, path: str | Path) -> None:
    # The Agg canvas is used directly so that drawing never switches the caller's pyplot backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    pos = nx.circular_layout(graph) if graph.number_of_nodes() <= 16 else nx.spring_layout(graph, seed=0)
    nx.draw_networkx(graph, pos, ax=ax, node_color="#8fb8de", node_size=400, font_size=9)
    ax.set_axis_off()
    fig.savefig(path, dpi=100, bbox_inches="tight")
