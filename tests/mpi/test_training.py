"""Training under mpirun -n 4: lockstep equals a one-process simulation, seeds reproduce, async ends."""

import copy
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mpi4py import MPI

from pcasgd_mpi import data, models, rule, topology
from pcasgd_mpi.optimizer import DistributedOptimizer
from pcasgd_mpi.trainer import TrainConfig, run
from pcasgd_mpi.transport import CudaAwareTransport
from pcasgd_mpi.world import init

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()


def _shared_dir(tmp_path: Path) -> str:
    return comm.bcast(str(tmp_path), root=0)


@pytest.mark.mpi(min_size=2)
def test_lockstep_dsgd_without_delay_equals_single_process_simulation():
    steps, lr, bs, seed = 25, 0.1, 16, 3
    ds = data.load("digits")
    shards = data.partition(ds.y_train, size, "iid", seed=seed)
    world = init("ring", comm=comm)
    model = models.build("mlp", ds.input_shape, ds.num_classes, seed=seed)
    opt = DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=lr),
        model,
        world=world,
        algorithm="dsgd",
        mode="lockstep",
        delay="fixed:0",
    )
    sampler = data.ShardSampler(shards[rank], bs, seed, rank)
    for _ in range(steps):
        idx = torch.from_numpy(sampler.next_batch())
        loss = F.cross_entropy(model(ds.x_train[idx]), ds.y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    opt.finalize()
    mine = opt.flat.data.clone()
    everyone = comm.allgather(mine.numpy())

    # The same update in one process: x_{k+1}^j = Σ_l W_jl x_k^l − lr g_k^j.
    W = torch.tensor(topology.mixing_matrix(topology.build("ring", size)), dtype=torch.float32)
    sims = [models.build("mlp", ds.input_shape, ds.num_classes, seed=seed) for _ in range(size)]
    samplers = [data.ShardSampler(shards[j], bs, seed, j) for j in range(size)]
    for _ in range(steps):
        xs, gs = [], []
        for m, s in zip(sims, samplers):
            idx = torch.from_numpy(s.next_batch())
            m.zero_grad()
            F.cross_entropy(m(ds.x_train[idx]), ds.y_train[idx]).backward()
            xs.append(torch.cat([p.detach().reshape(-1) for p in m.parameters()]))
            gs.append(torch.cat([p.grad.reshape(-1) for p in m.parameters()]))
        X = torch.stack(xs)
        new = W @ X - lr * torch.stack(gs)
        for m, x in zip(sims, new):
            torch.nn.utils.vector_to_parameters(x, m.parameters())
    for j in range(size):
        np.testing.assert_allclose(everyone[j], new[j].numpy(), rtol=0, atol=2e-5)
    assert not np.allclose(everyone[0], everyone[1]), "agents on different shards must differ"


@pytest.mark.mpi(min_size=2)
def test_same_seed_gives_same_model_hash_and_other_seed_differs(tmp_path):
    out = Path(_shared_dir(tmp_path))
    common = dict(mode="lockstep", algorithm="pc-asgd-pv", delay="random:0.5:3", steps=40, progress=False)
    a = run(TrainConfig(out=str(out / "a"), seed=1, **common))
    b = run(TrainConfig(out=str(out / "b"), seed=1, **common))
    c = run(TrainConfig(out=str(out / "c"), seed=2, **common))
    if rank == 0:
        assert a["model_sha256"] == b["model_sha256"]
        assert a["model_sha256"] != c["model_sha256"]
        assert a["pv_wins"]["predict"] + a["pv_wins"]["clip"] > 0, "random delays must create stale neighbours"


@pytest.mark.mpi(min_size=2)
def test_lockstep_fixed_delay_shows_in_staleness_histogram(tmp_path):
    out = _shared_dir(tmp_path)
    summary = run(TrainConfig(out=out, mode="lockstep", algorithm="pc-asgd", delay="fixed:3", steps=30, progress=False))
    if rank == 0:
        for r, per_nb in summary["staleness_histogram"].items():
            for n, hist in per_nb.items():
                assert hist == {"3": 27, "never": 3}, (r, n, hist)
        lines = [json.loads(l) for l in open(Path(out) / "metrics.jsonl")]
        assert {l["rank"] for l in lines} == set(range(size))
        assert all(set(l["staleness"].values()) <= {3, None} for l in lines if "staleness" in l)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("algorithm", ["pc-asgd-pv", "pc-asgd-av", "dsgd", "allreduce"])
def test_async_terminates_with_every_rank_reporting(tmp_path, algorithm):
    out = _shared_dir(tmp_path)
    summary = run(
        TrainConfig(
            out=out, mode="async", algorithm=algorithm, steps=120, progress=False, straggler=["1:2"], stop="each"
        )
    )
    if rank == 0:
        # All ranks stop once the first has made its 120 steps; the straggler has made fewer by then.
        steps = summary["steps"]
        assert len(steps) == size and max(steps) == 120 and all(s >= 1 for s in steps), steps
        assert len(summary["agent_accuracies"]) == size
        # How far async training gets depends on timing; that it ends with a valid evaluation does not.
        assert 0.0 <= summary["final_accuracy"] <= 1.0
        assert all(0.0 <= a <= 1.0 for a in summary["agent_accuracies"])
        assert (Path(out) / "summary.json").exists()
        if algorithm != "allreduce":
            for r, per in summary["staleness_histogram"].items():
                assert all(sum(h.values()) == steps[int(r)] for h in per.values()), (r, per, steps)


@pytest.mark.mpi(min_size=2)
def test_a_setup_error_on_one_rank_reaches_every_rank(tmp_path):
    from pcasgd_mpi.trainer import SetupError

    out = _shared_dir(tmp_path)
    bad = "fixed:1" if rank == 1 else "none"  # ranks disagree on the configuration
    with pytest.raises(SetupError, match="different configurations"):
        run(TrainConfig(out=out, mode="lockstep", delay=bad, steps=5, progress=False))


def _lockstep_av(tmp_path, delay: str, steps: int):
    """A lockstep pc-asgd-av run; returns its folder, its summary and, per rank and neighbour, AV's state."""
    out = _shared_dir(tmp_path)
    summary = run(
        TrainConfig(out=out, mode="lockstep", algorithm="pc-asgd-av", delay=delay, steps=steps, progress=False)
    )
    states = [(r, n, av) for r, per_nb in summary["av"].items() for n, av in per_nb.items()] if rank == 0 else []
    return out, summary, states


@pytest.mark.mpi(min_size=2)
def test_adaptive_variant_measures_substitutes_and_reports_theta(tmp_path):
    out, summary, states = _lockstep_av(tmp_path, "fixed:3", 40)
    if rank == 0:
        for r, n, av in states:
            # A record is made when a neighbour is stale and checked 3 steps later: ~40/4 measurements.
            assert av["measurements"] >= 8, (r, n, av)
            assert av["e_p"] > 0 and av["e_c"] > 0
            assert 0.0 <= av["theta"] <= 1.0 and 0.0 <= av["reach"] <= 1.0
            # E_PC is an inner product of the two errors: Cauchy–Schwarz bounds it
            assert abs(av["cross"]) <= av["e_p"] * av["e_c"] * (1 + 1e-9)
        # the θ used is the measured one capped by θ by the delay of a link 3 steps late
        W = topology.mixing_matrix(topology.build("ring", size))
        cap = round(rule.stable_theta(3, topology.largest_disagreement_rate(W)), 4)
        lines = [json.loads(l) for l in open(Path(out) / "metrics.jsonl")]
        thetas = [t for l in lines if "theta" in l for t in l["theta"].values()]
        assert thetas and all(0.0 <= t <= cap for t in thetas), (cap, thetas)
        assert thetas[0] == min(0.5, cap), "before the first measurement the measured θ is 0.5"
        assert any(av["theta"] != 0.5 for _, _, av in states), "θ_l must move once errors are measured"


@pytest.mark.mpi(min_size=2)
def test_adaptive_variant_measures_every_record_when_delays_shrink(tmp_path):
    # random:0.5:4: a step's message may be used before an older one ever was; the older
    # messages count as delivered then (newest wins), so their records are measured, not lost.
    _, summary, states = _lockstep_av(tmp_path, "random:0.5:4", 60)
    for r, n, av in states:
        hist = summary["staleness_histogram"][r][n]
        stale = sum(c for tau, c in hist.items() if tau != "never" and 0 < int(tau))
        # one record per stale step; at most the last 4 steps' records are still waiting
        assert av["measurements"] >= stale - 4, (r, n, av["measurements"], hist)


@pytest.mark.mpi(min_size=2)
def test_a_diverged_rank_does_not_stall_its_lockstep_neighbours():
    ds = data.load("digits")
    world = init("ring", comm=comm)
    model = models.build("mlp", ds.input_shape, ds.num_classes, seed=0)
    # The diverged rank does not check itself (it would stop with Diverged): it keeps sending NaN.
    opt = DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        model,
        world=world,
        algorithm="pc-asgd",
        mode="lockstep",
        delay="fixed:1",
        timeout=20,
        check_finite=rank != 1,
    )
    for k in range(15):
        loss = F.cross_entropy(model(ds.x_train[:32]), ds.y_train[:32])
        opt.zero_grad()
        loss.backward()
        if rank == 1 and k == 5:
            opt.flat.data.fill_(float("nan"))  # this agent diverged
        opt.step()
    opt.finalize()
    if 1 in world.neighbours:
        assert opt.non_finite[1] >= 9, opt.non_finite  # steps 6 to 14 use its messages of steps 5 to 13
        assert torch.isfinite(opt.flat.data).all(), "non-finite weights must never be mixed in"


@pytest.mark.mpi(min_size=2)
def test_a_diverged_rank_is_left_out_in_async_mode():
    ds = data.load("digits")
    world = init("ring", comm=comm)
    model = models.build("mlp", ds.input_shape, ds.num_classes, seed=0)
    warnings = []
    # dsgd mixes whatever arrived, however old, so the bad message is met before the run ends
    opt = DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        model,
        world=world,
        algorithm="dsgd",
        mode="async",
        timeout=20,
        warn=warnings.append,
        check_finite=rank != 1,
    )
    steps = 200 if rank == 1 else 3000
    for k in range(steps):
        loss = F.cross_entropy(model(ds.x_train[:32]), ds.y_train[:32])
        opt.zero_grad()
        loss.backward()
        if rank == 1 and k == 5:
            opt.flat.data.fill_(float("nan"))
        opt.step()
        if rank == 1 and k > 5:
            time.sleep(0.005)  # bad messages keep coming, each newer than the last, at a pace they are met
        if rank != 1 and (1 not in world.neighbours or opt.non_finite[1] >= 3):
            break
    opt.finalize()
    if 1 in world.neighbours:
        assert opt.non_finite[1] >= 3, opt.non_finite
        assert torch.isfinite(opt.flat.data).all(), "non-finite weights must never be mixed in"
        assert any("from rank 1" in w and "non-finite" in w for w in warnings), warnings


@pytest.mark.mpi(min_size=2)
def test_allreduce_through_device_collectives_gives_the_same_bits():
    """The path a CUDA-aware MPI takes (tensors handed to MPI as they are), run on CPU tensors."""
    ds = data.load("digits")
    x, y = ds.x_train[rank * 32 : (rank + 1) * 32], ds.y_train[rank * 32 : (rank + 1) * 32]
    results = []
    for transport in (None, CudaAwareTransport("cpu")):
        world = init("ring", comm=comm)
        model = models.build("mlp", ds.input_shape, ds.num_classes, seed=0)
        opt = DistributedOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1),
            model,
            world=world,
            algorithm="allreduce",
            mode="lockstep",
            transport=transport,
        )
        assert opt._device_collectives == (transport is not None)
        initial = opt.flat.data.clone()
        for _ in range(5):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        opt.finalize()
        results.append(opt.average())
    assert torch.equal(results[0], results[1])
    assert not torch.equal(results[0], initial), "five steps must have moved the weights"


def _linear_trajectories(steps: int, momentum: float = 0.0, **options):
    """Every rank trains a tiny linear model in lockstep; returns every rank's weights at each step,
    this rank's own local steps Δ_k, the StepInfo of each step, the optimizer and the world."""
    torch.manual_seed(rank)
    model = torch.nn.Linear(3, 1)
    world = init("ring", comm=comm)
    opt = DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum), model, world=world, mode="lockstep", **options
    )
    flat = lambda: torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()  # noqa: E731
    xs, deltas, infos = [], [], []
    for _ in range(steps):
        xs.append(flat())
        opt.zero_grad()
        (model(torch.randn(4, 3)) ** 2).mean().backward()
        infos.append(opt.step())
        deltas.append(opt._delta.clone())  # the wrapped optimizer's own step of this step
    xs.append(flat())
    opt.finalize()
    every = [torch.tensor(a) for a in comm.allgather(torch.stack(xs).numpy())]
    return every, deltas, infos, opt, world


@pytest.mark.mpi(min_size=4)
@pytest.mark.parametrize("momentum_kind", ["local", "quasi-global"])
def test_lockstep_movement_with_theta_by_the_delay_follows_its_rule_on_both_ends_of_a_late_link(momentum_kind):
    """ranks:0,2:3 on a ring: a link to rank 0 or 2 has one late direction. Each rank's step must be
    x_{k+1} = x_k + Δ_k + Σ_l θ_jl W_jl (x^l_{k−d_l} − x^j_{k−d_l}), θ_jl = θ(3) on both ends of such a
    link (the end that sees a fresh copy pulls with θ too) and 1 elsewhere, whatever the momentum."""
    late, lag, steps = (0, 2), 3, 14
    every, deltas, infos, _, world = _linear_trajectories(
        steps,
        momentum=0.9,
        algorithm="pc-asgd",
        theta_rule="stable",
        slope="movement",
        momentum_kind=momentum_kind,
        delay=f"ranks:0,2:{lag}",
    )
    info = infos[-1]
    beta = 0.9 if momentum_kind == "quasi-global" else 0.0  # quasi-global momentum carries the mixing too
    theta = rule.stable_theta(lag, world.mu_max, momentum=beta)
    linked = [n for n in world.neighbours if n in late or rank in late]
    assert info.thetas == {n: theta for n in linked}, info.thetas
    for k in range(lag, steps):
        expected = every[rank][k] + deltas[k]
        for n in world.neighbours:
            d = lag if n in late else 0  # how late n's messages arrive here
            gain = theta if n in linked else 1.0
            expected = expected + world.W[rank, n] * gain * (every[n][k - d] - every[rank][k - d])
        torch.testing.assert_close(every[rank][k + 1], expected, rtol=0, atol=1e-6)


@pytest.mark.mpi(min_size=4)
def test_lockstep_adaptive_variant_stays_within_theta_by_the_delay_on_both_ends_of_a_late_link():
    """ranks:0:4 on a ring: rank 0's messages arrive 4 steps late. Its neighbours blend the stale copy
    with the θ_l of least measured error up to θ by the delay; rank 0 sees fresh copies and pulls
    towards them with θ by the delay too (both ends of the link alike): x_{k+1} = x_k + Δ_k +
    Σ_l θ W_jl (x^l_k − x^j_k). Rank 2, whose links are on time, mixes fully and logs no θ."""
    lag, steps = 4, 30
    every, deltas, infos, opt, world = _linear_trajectories(steps, algorithm="pc-asgd-av", delay=f"ranks:0:{lag}")
    cap = rule.stable_theta(lag, world.mu_max)
    assert cap < 0.5, "the cap must bind below AV's starting θ for this test to mean anything"
    late_links = [n for n in world.neighbours if n == 0 or rank == 0]
    for k in range(lag, steps):
        thetas = infos[k].thetas or {}
        assert set(thetas) == set(late_links), (k, thetas)
        if rank == 0:
            assert all(t == cap for t in thetas.values()), (k, thetas)
            expected = every[0][k] + deltas[k]
            for n in world.neighbours:
                expected = expected + world.W[0, n] * cap * (every[n][k] - every[0][k])
            torch.testing.assert_close(every[0][k + 1], expected, rtol=0, atol=1e-6)
        elif late_links:
            assert 0.0 <= thetas[0] <= cap, (k, thetas)
    if rank != 0 and late_links:
        assert infos[-1].thetas[0] == opt.trackers[0].within(cap)[0], "the least measured error within the cap"


@pytest.mark.mpi(min_size=4)
def test_lockstep_adaptive_variant_mixes_the_momentum_buffers_with_the_neighbours_messages():
    """pc-asgd-av under torch SGD's momentum, ranks:0:4 on a ring: after each step a rank's buffer is
    (1 − Σ_l W_jl) m^j_k + Σ_l W_jl m^l_{k−d_l}, m the buffer right after torch's own step (its update
    over −α, the slope its message carries) and d_l how late l's messages arrive here; rank 0's
    messages count only once one has arrived. The buffer that goes on is this mixed one."""
    lag, steps, lr, beta = 4, 12, 0.1, 0.9
    torch.manual_seed(rank)
    model = torch.nn.Linear(3, 1)
    world = init("ring", comm=comm)
    opt = DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=lr, momentum=beta),
        model,
        world=world,
        mode="lockstep",
        algorithm="pc-asgd-av",
        delay=f"ranks:0:{lag}",
    )
    assert opt.shared_momentum is not None

    def buffer():
        return torch.cat([opt.inner.state[p]["momentum_buffer"].reshape(-1) for p in model.parameters()]).clone()

    own, mixed = [], []
    for k in range(steps):
        opt.zero_grad()
        (model(torch.randn(4, 3)) ** 2).mean().backward()
        before = buffer() if k else None
        opt.step()
        own.append(-opt._delta / lr)  # torch's step is −α·m with m its new buffer
        if before is not None:
            torch.testing.assert_close(own[-1], beta * before + _grad(model), rtol=0, atol=1e-6)
        mixed.append(buffer())
    opt.finalize()
    every = [torch.tensor(a) for a in comm.allgather(torch.stack(own).numpy())]
    for k in range(steps):
        expected = every[rank][k].clone()
        for n in world.neighbours:
            d = lag if n == 0 else 0
            if k - d >= 0:
                expected += world.W[rank, n] * (every[n][k - d] - every[rank][k])
        torch.testing.assert_close(mixed[k], expected, rtol=0, atol=1e-6)
    assert any(not torch.allclose(m, o) for m, o in zip(mixed, own)), "the mixing must change the buffer"


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize(
    "make, options, warning",
    [
        (lambda ps: torch.optim.Adam(ps, lr=0.01), {}, "Adam is not torch.optim.SGD"),
        (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), {"slope": "own"}, "--slope own sends no momentum"),
        (lambda ps: torch.optim.SGD(ps, lr=0.1), {}, None),
        (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), {"av_momentum": "own"}, None),
        (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), {"momentum_kind": "quasi-global"}, None),
    ],
)
def test_adaptive_variant_shares_no_momentum_where_messages_do_not_carry_it(make, options, warning):
    """Another optimizer or slope: AV leaves each rank's momentum its own and says why, once. Plain
    SGD has no buffer, quasi-global momentum carries the mixing already, and --av-momentum own asks
    for it: nothing to say."""
    model = torch.nn.Linear(3, 1)
    warned = []
    opt = DistributedOptimizer(
        make(model.parameters()),
        model,
        world=init("ring", comm=comm),
        mode="lockstep",
        algorithm="pc-asgd-av",
        warn=warned.append,
        **options,
    )
    for _ in range(2):
        opt.zero_grad()
        (model(torch.randn(4, 3)) ** 2).mean().backward()
        opt.step()
    opt.finalize()
    assert opt.shared_momentum is None
    shared = [w for w in warned if "momentum its own" in w]
    assert (shared == []) if warning is None else (len(shared) == 1 and warning in shared[0]), warned


def _grad(model) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


@pytest.mark.mpi(min_size=4)
def test_lockstep_link_prediction_follows_its_rule_and_the_pulls_of_a_link_cancel():
    """ranks:0,2:3 on a ring: every link has a late direction, so both its ends use the pair of step
    k − 3 and x_{k+1} = x_k + Δ_k + Σ_l a^{jl}_k, a^{jl}_k = γ W_jl (x^l_{k−3} − x^j_{k−3} − 2 C^{jl}_k),
    C the pulls of the last 3 steps. Summed over the ranks the pulls vanish: the average model moves
    by the average local step alone. A checkpoint taken midway continues to the same bits."""
    lag, steps, half = 3, 14, 7
    torch.manual_seed(rank)
    world = init("ring", comm=comm)
    inputs = [torch.randn(4, 3, generator=torch.Generator().manual_seed(100 * rank + k)) for k in range(steps)]

    def make(model):
        return DistributedOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
            model,
            world=world,
            algorithm="pc-asgd",
            mode="lockstep",
            theta_rule="link",
            momentum_kind="quasi-global",
            delay=f"ranks:0,2:{lag}",
        )

    def flat(model):
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()

    model = torch.nn.Linear(3, 1)
    opt = make(model)
    xs, deltas, saved = [], [], None
    for k in range(steps):
        if k == half:
            # a deep copy, as a checkpoint file would hold: the wrapped optimizer's state is live
            saved = (copy.deepcopy(opt.state_dict()), {n: p.detach().clone() for n, p in model.named_parameters()})
        xs.append(flat(model))
        opt.zero_grad()
        (model(inputs[k]) ** 2).mean().backward()
        info = opt.step()
        deltas.append(opt._delta.clone())
    xs.append(flat(model))
    opt.finalize()
    every = [torch.tensor(a) for a in comm.allgather(torch.stack(xs).numpy())]
    gain = rule.link_gain(
        world.W, [[lag if world.W[a, b] > 0 and a != b else 0 for b in range(size)] for a in range(size)], momentum=0.9
    )
    assert info.thetas == {n: gain for n in world.neighbours}, info.thetas
    pulls = [{} for _ in range(steps)]  # pulls[k][(j, l)]
    for k in range(steps):
        for j in range(size):
            for n in topology.neighbours(world.graph, j):
                if k < lag:
                    pulls[k][(j, n)] = torch.zeros_like(every[j][0])
                    continue
                pulled = sum((pulls[t][(j, n)] for t in range(max(0, k - lag), k)), torch.zeros_like(every[j][0]))
                pulls[k][(j, n)] = gain * world.W[j, n] * (every[n][k - lag] - every[j][k - lag] - 2 * pulled)
        assert float(sum(pulls[k].values()).abs().max()) < 1e-6, k
    for k in range(steps):
        expected = every[rank][k] + deltas[k] + sum(pulls[k][(rank, n)] for n in world.neighbours)
        torch.testing.assert_close(every[rank][k + 1], expected, rtol=0, atol=1e-6)

    resumed_model = torch.nn.Linear(3, 1)
    with torch.no_grad():
        for n, p in resumed_model.named_parameters():
            p.copy_(saved[1][n])
    resumed = make(resumed_model)
    resumed.load_state_dict(saved[0])
    for k in range(half, steps):
        resumed.zero_grad()
        (resumed_model(inputs[k]) ** 2).mean().backward()
        resumed.step()
    resumed.finalize()
    assert torch.equal(flat(resumed_model), xs[-1])


@pytest.mark.mpi(min_size=2)
def test_link_prediction_refuses_a_local_momentum_and_async_mode():
    world = init("ring", comm=comm)
    model = torch.nn.Linear(3, 1)
    for momentum, kw, words in [
        (0.9, {"mode": "lockstep"}, "needs --momentum-kind quasi-global"),
        (0.0, {"mode": "async"}, "needs --mode lockstep"),
    ]:
        with pytest.raises(ValueError, match=words):
            DistributedOptimizer(
                torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum),
                model,
                world=world,
                algorithm="pc-asgd",
                theta_rule="link",
                **kw,
            )
