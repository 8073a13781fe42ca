"""--theta-rule link: the pulls of each link, their bookkeeping and the loop they close (no MPI)."""

import numpy as np
import pytest
import torch

from pcasgd_mpi import rule, topology
from pcasgd_mpi.delay import DelayModel, LinkDelays
from pcasgd_mpi.links import LinkPulls


def network(W: np.ndarray, delay: int, gain: float) -> list[LinkPulls]:
    n = len(W)
    return [
        LinkPulls(
            {l: (float(W[j, l]), delay) for l in range(n) if l != j and W[j, l] > 0}, gain, 1, torch.float64, "cpu"
        )
        for j in range(n)
    ]


def run(W: np.ndarray, delay: int, gain: float, steps: int, start: torch.Tensor, *, redo: bool = False):
    """Agents that only pull (no data): x^j_{k+1} = x^j_k + Σ_l a^{jl}_k. Returns x_k for every k and
    each step's pulls summed over all agents."""
    agents = network(W, delay, gain)
    xs, totals, out = [start.clone()], [], torch.zeros(1, dtype=torch.float64)
    for k in range(steps):
        x = xs[-1]
        nxt = x.clone()
        total = 0.0
        for j, agent in enumerate(agents):
            late = {l: xs[k - delay][l : l + 1] if k >= delay else None for l in agent.links}
            if redo:  # a step made twice before it is kept counts once
                agent.pull(k, x[j : j + 1], late, out=out)
            agent.pull(k, x[j : j + 1], late, out=out)
            nxt[j] += out[0]
            total += float(out[0])
        for agent in agents:
            agent.commit()
        xs.append(nxt)
        totals.append(total)
    return xs, totals


def test_two_agents_pull_as_if_there_were_no_delay():
    """With nothing but the link moving them, the late pair and the link's own pulls are the present:
    the loop is the undelayed one, started D steps later."""
    W = np.full((2, 2), 0.5)
    start = torch.tensor([0.0, 1.0], dtype=torch.float64)
    late, _ = run(W, 5, 0.9, 40, start)
    now, _ = run(W, 0, 0.9, 40, start)
    for k in range(5, 40):
        torch.testing.assert_close(late[k], now[k - 5])


def test_a_ring_settles_at_the_gain_of_its_loop_and_keeps_its_mean():
    W = np.array(topology.mixing_matrix(topology.build("ring", 8), "metropolis"))
    delays = np.where((W > 0) & ~np.eye(8, dtype=bool), 8, 0)
    gain = rule.link_gain(W, delays)
    start = torch.tensor(np.random.default_rng(1).standard_normal(8))
    xs, totals = run(W, 8, gain, 1500, start)
    assert max(abs(t) for t in totals) < 1e-12, "the two ends of every link pull with opposite signs"
    assert float(xs[-1].mean()) == pytest.approx(float(start.mean()), abs=1e-12)
    assert float((xs[-1] - xs[-1].mean()).abs().max()) < 1e-6
    # the plain delayed loop (the late pair alone, no link pulls subtracted) is far past its edge here
    assert gain > 2 * rule.stable_edge(8) / topology.largest_disagreement_rate(W)


def test_the_edge_parts_the_gains_that_settle_from_those_that_grow():
    W = np.array(topology.mixing_matrix(topology.build("ring", 8), "metropolis"))
    delays = np.where((W > 0) & ~np.eye(8, dtype=bool), 8, 0)
    edge = rule.link_edge(tuple(map(tuple, W)), tuple(map(tuple, delays)))
    start = torch.tensor(np.random.default_rng(2).standard_normal(8))

    def spread(gain: float) -> float:
        xs, _ = run(W, 8, gain, 1500, start)
        return float((xs[-1] - xs[-1].mean()).abs().max())

    initial = float((start - start.mean()).abs().max())
    for fraction in (0.3, 0.6, 0.9):
        assert spread(fraction * edge) < initial, fraction
    assert spread(1.15 * edge) > initial


def test_a_step_made_again_counts_once_and_a_checkpoint_continues_exactly():
    W = np.array(topology.mixing_matrix(topology.build("ring", 4), "metropolis"))
    start = torch.tensor([3.0, -1.0, 0.5, 2.0], dtype=torch.float64)
    once, _ = run(W, 3, 0.4, 30, start)
    twice, _ = run(W, 3, 0.4, 30, start, redo=True)
    torch.testing.assert_close(once[-1], twice[-1], rtol=0, atol=0)

    a = LinkPulls({1: (0.3, 2)}, 0.5, 2, torch.float64, "cpu")
    b = LinkPulls({1: (0.3, 2)}, 0.5, 2, torch.float64, "cpu")
    out_a, out_b = torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    seq = [
        (torch.randn(2, generator=gen, dtype=torch.float64), torch.randn(2, generator=gen, dtype=torch.float64))
        for _ in range(9)
    ]
    for k, (x, other) in enumerate(seq[:5]):
        a.pull(k, x, {1: other if k >= 2 else None}, out=out_a)
        a.commit()
    b.load_state_dict(a.state_dict())
    for k, (x, other) in enumerate(seq[5:], start=5):
        a.pull(k, x, {1: other}, out=out_a)
        b.pull(k, x, {1: other}, out=out_b)
        a.commit(), b.commit()
        torch.testing.assert_close(out_a, out_b, rtol=0, atol=0)


def test_link_edge_is_the_undelayed_edge_where_the_prediction_is_exact_and_falls_under_momentum():
    pair = ((0.5, 0.5), (0.5, 0.5))
    for d in (0, 3, 8):  # two agents: e' = (1 − γ) e whatever the delay
        assert rule.link_edge(pair, ((0, d), (d, 0))) == pytest.approx(2.0, abs=1e-3)
    W = np.array(topology.mixing_matrix(topology.build("ring", 8), "metropolis"))
    links = (W > 0) & ~np.eye(8, dtype=bool)
    assert rule.link_gain(W, np.where(links, 0, 0)) == pytest.approx(0.75, abs=1e-3), "dsgd's own edge, 2/μ_max, halved"
    mu = topology.largest_disagreement_rate(W)
    for d in (6, 8):
        with_momentum = rule.link_gain(W, np.where(links, d, 0), momentum=0.9)
        assert with_momentum < rule.link_gain(W, np.where(links, d, 0))
        assert with_momentum > 2 * rule.stable_theta(d, mu, momentum=0.9), "far above θ by the delay"
    with pytest.raises(ValueError):
        rule.link_edge(pair, ((0, 1),), 0.0)


@pytest.mark.parametrize(
    "spec, links",
    [
        ("none", {(0, 1): 0}),
        ("fixed:4", {(0, 1): 4, (2, 3): 4}),
        ("random:0.5:3", {(0, 1): 3}),
        ("random:0:3", {(0, 1): 0}),
        ("ranks:0,2:6", {(0, 1): 6, (1, 0): 6, (1, 3): 0, (3, 2): 6}),
    ],
)
def test_a_link_uses_the_longest_delay_of_either_direction(spec, links):
    model = DelayModel.parse(spec)
    for (a, b), d in links.items():
        assert model.link_delay(a, b) == model.link_delay(b, a) == d
        assert all(LinkDelays(model).delay(a, b, k) == d for k in range(20))
        assert all(model.delay(a, b, k) <= d for k in range(50))
    assert LinkDelays(model).max_delay == model.max_delay
