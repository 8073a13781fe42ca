"""P3, straggler tolerance, and A, accuracy under a straggler: 4 ranks, ring, digits, MLP, batch 32.

Rank 0 is slowed 4x the way `--straggler 0:4` does it: it sleeps 3x the time its gradient took
before its optimizer step and 3x the optimizer step's time after it (sleeping, not computing, so it
does not take the other ranks' cores). In the DDP run the gradient's allreduce happens inside the
backward pass, so there all of the sleep comes after the step: the period is the same.

P3 compares the fast ranks' (1, 2, 3) steps/s under that straggler in three trainings:
- async: `trainer.run`, pc-asgd-pv, free-running;
- lockstep: `trainer.run`, dsgd, every step waits for the neighbours' messages of that step;
- ddp: torch DistributedDataParallel over gloo (env:// on 127.0.0.1, rank and size from Open
  MPI's environment), same data shards, model, optimizer and straggler sleep.
They run interleaved in rounds; each ratio is the median over rounds. The async run also logs
every step, so the fast ranks' longest step shows whether a send to the sleeping rank ever held
them up (it should not: a neighbour with a send still in flight is skipped).

A: reference = `trainer.run`, lockstep dsgd without straggler: test accuracy of the average model
and wall time W. Then async pc-asgd-pv with the straggler runs for W of wall-clock time (not a
fixed step count: with the same number of steps on every rank a run always lasts as long as its
straggler needs, whatever the algorithm), with the same data, model, optimizer and straggler as
`trainer.run`. Every rank keeps a copy of its weights at 20 %, 30 %, ... 100 % of W (no
communication while training); afterwards the copies of the same instant are averaged and
evaluated. Time to accuracy = the first instant at which the average model is within 1 pp of the
reference accuracy (curves averaged over seeds), as a fraction of W: below 1 means less wall time.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from mpi4py import MPI

import _bench
from pcasgd_mpi import data, models
from pcasgd_mpi import world as world_mod
from pcasgd_mpi.optimizer import DistributedOptimizer
from pcasgd_mpi.trainer import TrainConfig, evaluate, run

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
FACTOR = 4.0
STRAGGLER = f"0:{FACTOR:g}"
LR, BATCH = 0.1, 32
FRACTIONS = [round(0.1 * i, 1) for i in range(2, 11)]


def straggle(t_step: float) -> None:
    # The trainer's --straggler rule: sleep (FACTOR - 1) x the time since t_step.
    if rank == 0:
        time.sleep((FACTOR - 1.0) * (time.perf_counter() - t_step))


class Runs:
    """trainer.run in this process, each run in its own folder under one shared temporary one."""

    def __init__(self):
        self.root = Path(comm.bcast(tempfile.mkdtemp(prefix="pcasgd-bench-") if rank == 0 else None))
        self.count = 0

    def train(self, **kw) -> dict | None:
        self.count += 1
        cfg = TrainConfig(out=str(self.root / f"run-{self.count}"), progress=False, batch_size=BATCH, lr=LR, **kw)
        return run(cfg, comm)


def fast_rank_stalls(out: str) -> dict:
    """Per-step times of the fast ranks and the straggler's period, from the per-step log."""

    def steps(r: int) -> np.ndarray:
        lines = (Path(out) / "metrics" / f"rank-{r}.jsonl").read_text().splitlines()
        t = np.array([json.loads(line)["t"] for line in lines if '"eval"' not in line])
        return np.diff(t)

    fast = np.concatenate([steps(r) for r in range(1, size)])
    return {
        "fast_step_ms_median": _bench.ms(float(np.median(fast))),
        "fast_step_ms_p99": _bench.ms(float(np.percentile(fast, 99))),
        "fast_step_ms_max": _bench.ms(float(fast.max())),
        "straggler_period_ms_median": _bench.ms(float(np.median(steps(0)))),
    }


class DDP:
    def __init__(self):
        import torch.distributed as dist

        self.dist = dist
        port = None
        if rank == 0:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(comm.bcast(port, root=0))
        dist.init_process_group(
            "gloo",
            init_method="env://",
            rank=int(os.environ["OMPI_COMM_WORLD_RANK"]),
            world_size=int(os.environ["OMPI_COMM_WORLD_SIZE"]),
        )

    def steps_per_second(self, steps: int, seed: int) -> float:
        from torch.nn.parallel import DistributedDataParallel

        ds = data.load("digits", seed=seed)
        shards = data.partition(ds.y_train, size, "iid", seed=seed)
        sampler = data.ShardSampler(shards[rank], BATCH, seed, rank)
        model = DistributedDataParallel(models.build("mlp", ds.input_shape, ds.num_classes, seed=seed))
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        comm.Barrier()
        t0 = time.perf_counter()
        for _ in range(steps):
            t_step = time.perf_counter()
            idx = torch.from_numpy(sampler.next_batch())
            loss = F.cross_entropy(model(ds.x_train[idx]), ds.y_train[idx])
            opt.zero_grad()
            loss.backward()  # the gradient allreduce runs in here
            opt.step()
            straggle(t_step)
        return steps / (time.perf_counter() - t0)

    def close(self) -> None:
        self.dist.destroy_process_group()


def buckets(hist: dict) -> dict:
    """A staleness histogram folded into the rule's classes (async: τ₀ = 1, H = 16)."""
    out = {"fresh": 0, "stale": 0, "dropped": 0}
    for tau, count in hist.items():
        key = "dropped" if not isinstance(tau, int) or tau > 16 else "fresh" if tau <= 1 else "stale"
        out[key] += count
    return out


def async_curve(seed: int, budget: float) -> dict:
    """Async pc-asgd-pv with the straggler for `budget` seconds; average-model accuracy over time."""
    ds = data.load("digits", seed=seed)
    shards = data.partition(ds.y_train, size, "iid", seed=seed)
    sampler = data.ShardSampler(shards[rank], BATCH, seed, rank)
    model = models.build("mlp", ds.input_shape, ds.num_classes, seed=seed)
    world = world_mod.init("ring", comm=comm, seed=seed)
    opt = DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=LR), model, world=world, algorithm="pc-asgd-pv", mode="async"
    )
    marks = [f * budget for f in FRACTIONS]
    snaps: list[torch.Tensor] = []
    steps = 0
    comm.Barrier()
    t0 = time.perf_counter()
    while True:
        now = time.perf_counter() - t0
        while len(snaps) < len(marks) and now >= marks[len(snaps)]:
            snaps.append(opt.flat.data.clone())
        if len(snaps) == len(marks):
            break
        t_step = time.perf_counter()
        idx = torch.from_numpy(sampler.next_batch())
        xb, yb = ds.x_train[idx], ds.y_train[idx]
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        straggle(t_step)
        t_opt = time.perf_counter()
        opt.step(closure=lambda: F.cross_entropy(model(xb), yb))
        straggle(t_opt)
        steps += 1
    wall = time.perf_counter() - t0
    opt.finalize()
    accs = []
    for snap in snaps:
        avg = snap.numpy().copy()
        comm.Allreduce(MPI.IN_PLACE, avg, op=MPI.SUM)
        opt.flat.data.copy_(torch.from_numpy(avg / size))
        models.recalibrate_bn(model, ds.x_train[:4096])
        accs.append(evaluate(model, ds.x_test, ds.y_test)[0])
    info = comm.gather(
        {"steps": steps, "wall": wall, "hist": buckets(opt.staleness_histogram.get(0, {})) if rank == 1 else None},
        root=0,
    )
    if rank != 0:
        return {}
    return {
        "accuracy": accs,
        "steps_per_rank": [i["steps"] for i in info],
        "wall_s": max(i["wall"] for i in info),
        "rank1_staleness_of_rank0": info[1]["hist"],
    }


def main() -> None:
    args = _bench.parse_args(__doc__.splitlines()[0])
    if size != 4:
        raise SystemExit("p3_straggler.py runs on exactly 4 ranks")
    runs = Runs()
    rounds, steps, seeds, ref_steps = (1, 25, [0], 60) if args.quick else (2, 120, [0, 1, 2], 300)

    # ---------------------------------------------------------------- P3
    ddp = DDP()
    sps: dict[str, list[float]] = {"async": [], "lockstep": [], "ddp": []}
    stalls, skipped = [], []
    for _ in range(rounds):
        s = runs.train(mode="async", algorithm="pc-asgd-pv", straggler=[STRAGGLER], steps=steps, log_every=1)
        if rank == 0:
            sps["async"].append(float(np.mean(s["steps_per_second"][1:])))
            stalls.append(fast_rank_stalls(s["out"]))
            skipped.append([e["skipped"] for e in s["exchange"]])
        s = runs.train(mode="lockstep", algorithm="dsgd", straggler=[STRAGGLER], steps=steps, log_every=0)
        if rank == 0:
            sps["lockstep"].append(float(np.mean(s["steps_per_second"][1:])))
        mine = ddp.steps_per_second(steps, seed=0)
        per_rank = comm.gather(mine, root=0)
        if rank == 0:
            sps["ddp"].append(float(np.mean(per_rank[1:])))
    ddp.close()

    # ---------------------------------------------------------------- A
    refs, curves = [], []
    for seed in seeds:
        s = runs.train(mode="lockstep", algorithm="dsgd", steps=ref_steps, seed=seed, log_every=0)
        ref = comm.bcast((s["final_accuracy"], s["wall_time_s"]) if rank == 0 else None, root=0)
        refs.append(ref)
        curves.append(async_curve(seed, budget=ref[1]))
    comm.Barrier()
    if rank != 0:
        return
    shutil.rmtree(runs.root, ignore_errors=True)

    def ratio(name: str) -> float:
        return _bench.median([a / b for a, b in zip(sps["async"], sps[name])])

    ref_acc = float(np.mean([a for a, _ in refs]))
    mean_curve = np.mean([c["accuracy"] for c in curves], axis=0)
    reached = [f for f, a in zip(FRACTIONS, mean_curve) if a >= ref_acc - 0.01]
    time_to_acc = reached[0] if reached else None
    p3_detail = {
        "steps_per_rank": steps,
        "rounds": rounds,
        "straggler": STRAGGLER,
        "fast_ranks_steps_per_s": {k: [round(x, 2) for x in v] for k, v in sps.items()},
        "async_fast_rank_step_times": stalls,
        "async_skipped_sends_per_rank": skipped,
    }
    _bench.emit({"part": "P3", "ratio": ratio("lockstep"), "ratio_ddp": ratio("ddp"), "detail": p3_detail})
    _bench.emit(
        {
            "part": "A",
            "ratio": time_to_acc,
            "detail": {
                "seeds": seeds,
                "reference_steps": ref_steps,
                "reference_accuracy": [round(a, 4) for a, _ in refs],
                "reference_wall_s": [round(w, 3) for _, w in refs],
                "reference_accuracy_mean": round(ref_acc, 4),
                "fractions_of_reference_wall": FRACTIONS,
                "async_accuracy_mean": [round(float(a), 4) for a in mean_curve],
                "async_accuracy_per_seed": [[round(a, 4) for a in c["accuracy"]] for c in curves],
                "async_final_gap_pp": round(100 * (float(mean_curve[-1]) - ref_acc), 2),
                "async_steps_per_rank": [c["steps_per_rank"] for c in curves],
                "async_wall_s": [round(c["wall_s"], 3) for c in curves],
                "rank1_staleness_of_rank0": [c["rank1_staleness_of_rank0"] for c in curves],
            },
        }
    )


if __name__ == "__main__":
    main()
