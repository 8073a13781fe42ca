"""Async mode across ranks: staleness in the sender's steps, slopes, slow links, a shared stop."""

import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mpi4py import MPI

from pcasgd_mpi.exchange import Exchange
from pcasgd_mpi.trainer import TrainConfig, run

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()


def _shared_dir(tmp_path) -> str:
    return comm.bcast(str(tmp_path), root=0)


@pytest.mark.mpi(min_size=4)
@pytest.mark.parametrize("balance", ["none", "mix"])
def test_a_four_times_slower_rank_stays_in_the_mix(tmp_path, balance):
    """Its neighbours see its copies as a few of its own steps old and (almost) never drop them."""
    out = _shared_dir(tmp_path)
    summary = run(
        TrainConfig(
            out=out,
            algorithm="pc-asgd-av",
            steps=150,
            straggler=["3:4"],
            balance=balance,
            progress=False,
            timeout=60,
        )
    )
    if rank == 0:
        hist = summary["staleness_histogram"]
        for r in ("0", "2"):
            per = hist[r]["3"]
            # Its starting weights arrive before anybody's first step: it is never missing. Past H
            # only when the straggler lost its core for a while: at most 5 % of the steps (the
            # counter clock of earlier versions dropped it on about 94 %)
            assert "never" not in per, (r, per)
            beyond = sum(c for t, c in per.items() if int(t) > 16)
            assert beyond <= 0.05 * sum(per.values()), (r, per, summary["steps"], summary["clock_offsets_s"])
        steps = summary["steps"]
        # the shared stop: one rank did all its steps, the straggler far fewer, nobody trained on alone
        assert max(steps) == 150 and steps[3] < 150, steps


@pytest.mark.mpi(min_size=4)
def test_update_slope_is_the_gradient_bit_for_bit_under_plain_sgd(tmp_path):
    out = Path(_shared_dir(tmp_path))
    common = dict(mode="lockstep", algorithm="pc-asgd", delay="ranks:0,2:3", steps=25, progress=False)
    a = run(TrainConfig(out=str(out / "update"), slope="update", **common))
    b = run(TrainConfig(out=str(out / "gradient"), slope="gradient", **common))
    c = run(TrainConfig(out=str(out / "momentum"), slope="update", momentum=0.9, **common))
    d = run(TrainConfig(out=str(out / "momentum-g"), slope="gradient", momentum=0.9, **common))
    if rank == 0:
        assert a["model_sha256"] == b["model_sha256"]
        assert c["model_sha256"] != d["model_sha256"], "with momentum the update is not the gradient"


@pytest.mark.mpi(min_size=4)
def test_velocity_slope_sends_half_the_bytes(tmp_path):
    out = Path(_shared_dir(tmp_path))
    common = dict(algorithm="pc-asgd", steps=40, progress=False, stop="each")
    v = run(TrainConfig(out=str(out / "velocity"), slope="velocity", **common))
    u = run(TrainConfig(out=str(out / "update"), slope="update", **common))
    if rank == 0:
        per_msg = lambda s: s["exchange"][0]["bytes_sent"] / s["exchange"][0]["sent"]  # noqa: E731
        assert per_msg(v) < 0.55 * per_msg(u)
        assert 0.0 <= v["final_accuracy"] <= 1.0


@pytest.mark.mpi(min_size=4)
@pytest.mark.parametrize("mode", ["lockstep", "async"])
def test_own_slope_sends_half_the_bytes_and_trains(tmp_path, mode):
    out = Path(_shared_dir(tmp_path))
    common = dict(algorithm="pc-asgd-av", mode=mode, steps=80, progress=False, stop="each")
    if mode == "lockstep":
        common["delay"] = "fixed:4"
    o = run(TrainConfig(out=str(out / "own"), slope="own", **common))
    u = run(TrainConfig(out=str(out / "update"), slope="update", **common))
    if rank == 0:
        per_msg = lambda s: s["exchange"][0]["bytes_sent"] / s["exchange"][0]["sent"]  # noqa: E731
        assert per_msg(o) < 0.55 * per_msg(u)
        assert o["final_accuracy"] > 0.5, o["final_accuracy"]
        if mode == "lockstep":
            # every neighbour four steps late: AV measured the own-step predictions it made
            measured = [v for v in o["av"]["0"].values()]
            assert all(v["measurements"] > 0 and math.isfinite(v["e_p"]) for v in measured), measured


@pytest.mark.mpi(min_size=4)
def test_movement_with_theta_by_the_delay_mixes_each_stale_copy_at_its_stable_gain(tmp_path):
    import json

    from pcasgd_mpi.rule import stable_theta

    out = Path(_shared_dir(tmp_path))
    common = dict(algorithm="pc-asgd", mode="lockstep", delay="fixed:4", steps=80, progress=False, stop="each")
    m = run(
        TrainConfig(
            out=str(out / "movement"),
            slope="movement",
            theta_rule="stable",
            momentum=0.9,
            momentum_kind="quasi-global",
            **common,
        )
    )
    u = run(TrainConfig(out=str(out / "update"), slope="update", **common))
    if rank == 0:
        per_msg = lambda s: s["exchange"][0]["bytes_sent"] / s["exchange"][0]["sent"]  # noqa: E731
        assert per_msg(m) < 0.55 * per_msg(u), "no slope on the wire"
        assert m["final_accuracy"] > 0.5, m["final_accuracy"]
        lines = (out / "movement" / "metrics" / "rank-0.jsonl").read_text().splitlines()
        thetas = [json.loads(line)["theta"] for line in lines if '"theta"' in line]
        expected = stable_theta(4, 4 / 3, momentum=0.9)  # every copy 4 steps old on a ring of 4
        assert len(thetas) >= 70 and all(t == {"1": round(expected, 4), "3": round(expected, 4)} for t in thetas)


@pytest.mark.mpi(min_size=4)
@pytest.mark.parametrize(
    "rule",
    [
        dict(algorithm="pc-asgd", theta_rule="stable", slope="movement", stop="each"),  # in its own steps
        # the update slope: ages in the senders' steps; AV's records make the late side the slower,
        # so every rank stops with the first (a finished sender's last copy ages on)
        dict(algorithm="pc-asgd-av", momentum=0.9, stop="first"),
    ],
)
def test_async_theta_by_the_delay_damps_both_ends_of_a_slow_link(tmp_path, rule):
    """Ranks 0 and 2 send late: ranks 1 and 3 see their copies several steps old and damp them;
    ranks 0 and 2 see fresh copies, learn from the replies how late theirs arrive, and damp too."""
    import json

    out = Path(_shared_dir(tmp_path))
    run(
        TrainConfig(
            out=str(out),
            **rule,
            link_delay=["0,2:20"],
            horizon=100,  # however fast the steps are here, the late copies stay in the mix
            steps=200,
            progress=False,
            timeout=60,
        )
    )
    comm.Barrier()
    if rank < 4:
        lines = [json.loads(line) for line in (out / "metrics" / f"rank-{rank}.jsonl").read_text().splitlines()]
        steps = [m for m in lines if "step" in m and m["step"] >= 100]
        late = {"1", "3"} if rank % 2 == 0 else {"0", "2"}
        both = [m for m in steps if late <= set(m.get("theta") or {})]
        assert len(both) >= 0.8 * len(steps), (rank, len(both), len(steps), steps[-1])
        assert all(0 < t < 0.5 for m in both for t in m["theta"].values()), both[-1]


@pytest.mark.mpi(min_size=4)
def test_drift_slope_predicts_a_momentum_sender_better_than_its_own_update(tmp_path):
    """Under a momentum each rank keeps to itself, an agent's own step is mostly undone by its mixing:
    rolling a copy forward by its update overshoots, by its average movement does not (AV's measured
    E_P). With the buffers shared the update no longer overshoots as much."""
    out = Path(_shared_dir(tmp_path))
    common = dict(
        algorithm="pc-asgd-av", mode="lockstep", delay="ranks:0,2:8", momentum=0.9, lr=0.02, steps=150, progress=False
    )
    d = run(TrainConfig(out=str(out / "drift"), slope="drift", **common))
    u = run(TrainConfig(out=str(out / "update"), slope="update", av_momentum="own", **common))
    shared = run(TrainConfig(out=str(out / "shared"), slope="update", **common))
    if rank == 0:
        per_msg = lambda s: s["exchange"][0]["bytes_sent"] / s["exchange"][0]["sent"]  # noqa: E731
        assert per_msg(d) == per_msg(u), "the drift travels as the update does"
        e_p = lambda s: [v["e_p"] for per in s["av"].values() for v in per.values() if v["e_p"] is not None]  # noqa: E731
        assert len(e_p(d)) >= 2 and max(e_p(d)) < min(e_p(u)), (e_p(d), e_p(u))
        assert max(e_p(shared)) < min(e_p(u)), (e_p(shared), e_p(u))
        assert d["final_accuracy"] > 0.8, d["final_accuracy"]


@pytest.mark.mpi(min_size=2)
def test_link_delay_delays_delivery_and_never_blocks_the_sender():
    hold = 1.5
    peers = [1] if rank == 0 else ([0] if rank == 1 else [])
    ex = Exchange(comm, peers, 16, torch.float32, with_grad=False, hold=hold if rank == 0 else 0.0)
    if rank == 0:
        made = time.time()
        started = time.monotonic()
        for step in range(5):
            ex.send(step, torch.full((16,), float(step)), made_at=time.time())
        returned = time.monotonic() - started
        assert returned < hold / 2, "sending must not wait for the link delay"
        assert ex.stats.sent == 0, "nothing leaves before the delay is over"
        comm.bcast(made, root=0)
        deadline = time.monotonic() + 30
        while ex.stats.sent == 0 and time.monotonic() < deadline:
            ex.send_ready()  # progress: releases the held messages once their delay is over
            time.sleep(0.001)
        assert ex.stats.sent >= 1
    elif rank == 1:
        made = comm.bcast(None, root=0)
        arrivals = {}
        deadline = time.monotonic() + 30
        while len(arrivals) < 1 and time.monotonic() < deadline:
            ex.poll(lambda m: arrivals.setdefault(m.step, time.time()))
            time.sleep(0.001)
        assert arrivals, "the delayed message never arrived"
        first = min(arrivals.values())
        assert first - made >= hold - 0.05, f"a delayed message arrived {first - made:.3f} s after it was made"
    else:
        comm.bcast(None, root=0)
    ex.close(time.monotonic() + 30)


@pytest.mark.mpi(min_size=4)
def test_duration_stops_every_rank_together(tmp_path):
    out = _shared_dir(tmp_path)
    summary = run(TrainConfig(out=out, algorithm="dsgd", duration=2.0, straggler=["1:3"], progress=False))
    if rank == 0:
        steps = summary["steps"]
        assert all(s > 0 for s in steps) and steps[1] < max(steps), steps
        assert np.isfinite(summary["final_accuracy"])


@pytest.mark.mpi(min_size=3)
def test_lockstep_ranks_with_unequal_step_counts_are_told_so():
    import torch.nn.functional as F

    from pcasgd_mpi import data, models
    from pcasgd_mpi.optimizer import DistributedOptimizer
    from pcasgd_mpi.world import init

    ds = data.load("digits")
    model = models.build("mlp", ds.input_shape, ds.num_classes, seed=0)
    opt = DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        model,
        world=init("ring", comm=comm),
        algorithm="dsgd",
        mode="lockstep",
        timeout=60,
    )
    error = None
    try:
        for _ in range(5 if rank == 1 else 10):
            loss = F.cross_entropy(model(ds.x_train[:32]), ds.y_train[:32])
            opt.zero_grad()
            loss.backward()
            opt.step()
    except ValueError as exc:
        error = str(exc)
    opt.finalize()
    if rank == 1:
        assert error is None
    else:
        # rank 1, or a rank that already stopped because of it (they all stop after 5 steps)
        assert error is not None and "finished after 5 steps" in error, error
        assert "same number of steps" in error


@pytest.mark.mpi(min_size=4)
def test_the_first_step_mixes_the_starting_weights_of_a_neighbour_late_to_it():
    """In a user's own loop (no mark_start): rank 3 reaches its first step half a second after the
    others, yet their first step already mixes its starting weights, exactly."""
    from pcasgd_mpi.optimizer import DistributedOptimizer
    from pcasgd_mpi.world import init

    torch.manual_seed(rank)  # different starting weights on every rank
    model = torch.nn.Linear(4, 3).double()
    world = init("ring", comm=comm)
    lr = 0.1
    opt = DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=lr), model, world=world, algorithm="dsgd", mode="async", timeout=30
    )
    x0 = opt.parameters_vector.detach().clone()
    starts = comm.allgather(x0)
    if rank == 3:
        time.sleep(0.5)
    model(torch.ones(2, 4, dtype=torch.float64)).sum().backward()
    grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    info = opt.step()
    assert all(tau is not None for tau in info.staleness.values()), info.staleness
    expected = world.self_weight * x0 + sum(world.weight(n) * starts[n] for n in world.neighbours) - lr * grad
    assert torch.allclose(opt.parameters_vector, expected, atol=1e-12), (opt.parameters_vector - expected).abs().max()
    opt.finalize()


@pytest.mark.mpi(min_size=2)
def test_clock_offset_is_measured_only_for_ranks_on_another_clock(monkeypatch):
    from pcasgd_mpi import staleness

    assert staleness.clock_offset(comm, time.monotonic() + 30) == 0.0  # one host: one clock, exactly
    wall = time.time
    if rank % 2:  # odd ranks pretend to run on another machine, whose clock is 5 s behind
        monkeypatch.setattr(staleness, "clock_key", lambda: "host:elsewhere")
        wall = lambda: time.time() - 5.0  # noqa: E731
    offset = staleness.clock_offset(comm, time.monotonic() + 30, wall=wall)
    if rank % 2:
        assert abs(offset - 5.0) < 0.05, offset  # measured: rank 0's clock is 5 s ahead of theirs
    else:
        assert offset == 0.0
