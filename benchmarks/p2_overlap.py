"""P2, overlap: async training step time with communication against the same training without it.

2 ranks, each training an MLP (1024-256-256-10, 331 k parameters) on its own synthetic data with
batch 1024, one torch thread per rank (one core each): about 2 GFLOP of forward and backward
per step against a 2.6 MB message, so compute dominates, as in training worth distributing. Three ways to step, interleaved in rounds
so that both ranks always compute at the same time and see the same machine load:

- compute: plain `torch.optim.SGD` and nothing else: communication off. This is the reference
  of the goal; it also leaves out everything the distributed optimizer does locally.
- no-edges: `DistributedOptimizer` on a graph without edges: its local work (flat buffers, Δ,
  the rule) with no message ever sent. Reported to split the overhead.
- async: `DistributedOptimizer`, ring of the 2 ranks, free-running, algorithm pc-asgd (weights and
  gradient on the wire, fixed θ = 0.5). pc-asgd-pv would add two forward passes whenever a
  neighbour is stale: that is compute the rule asks for, not communication, and the
  communication-off run cannot have it, so it is reported separately (async-pv), not in the goal.

The goal ratio is mean step time (async) / mean step time (compute), median over rounds.
"""

from __future__ import annotations

import time

import _bench

import networkx as nx
import numpy as np
import torch
import torch.nn.functional as F
from mpi4py import MPI
from torch import nn

from pcasgd_mpi import world as world_mod
from pcasgd_mpi.optimizer import DistributedOptimizer

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
IN, HIDDEN, CLASSES, BATCH, SAMPLES = 1024, 256, 10, 1024, 8192
LR = 0.05


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
                         nn.Linear(HIDDEN, CLASSES))


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(SAMPLES, IN, generator=gen)
    teacher = torch.randn(IN, CLASSES, generator=torch.Generator().manual_seed(7))
    return x, (x @ teacher).argmax(1)


def edgeless_world() -> world_mod.World:
    graph = nx.empty_graph(size)
    return world_mod.World(comm, rank, size, graph, np.eye(size), "none", "identity")


def run_mode(mode: str, steps: int, warmup: int, x: torch.Tensor, y: torch.Tensor) -> dict:
    model = make_model()
    inner = torch.optim.SGD(model.parameters(), lr=LR)
    opt = None
    if mode == "no-edges":
        opt = DistributedOptimizer(inner, model, world=edgeless_world(), algorithm="pc-asgd", mode="async")
    elif mode in ("async", "async-pv"):
        algorithm = "pc-asgd-pv" if mode == "async-pv" else "pc-asgd"
        opt = DistributedOptimizer(inner, model, world=world_mod.init("ring", comm=comm),
                                   algorithm=algorithm, mode="async")
    gen = torch.Generator().manual_seed(rank)
    times, stale = [], 0
    comm.Barrier()
    for k in range(warmup + steps):
        idx = torch.randint(0, SAMPLES, (BATCH,), generator=gen)
        xb, yb = x[idx], y[idx]
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(xb), yb)
        if opt is None:
            inner.zero_grad()
            loss.backward()
            inner.step()
        else:
            opt.zero_grad()
            loss.backward()
            info = opt.step(closure=lambda: F.cross_entropy(model(xb), yb))
            stale += info.choice is not None
        if k >= warmup:
            times.append(time.perf_counter() - t0)
    out = {"mean_step_s": float(np.mean(times)), "pv_evaluations": stale}
    if opt is not None:
        opt.finalize()
        if opt.exchange is not None and opt.neighbours:
            out["exchange"] = {"sent": opt.exchange.stats.sent, "skipped": opt.exchange.stats.skipped,
                               "received": opt.exchange.stats.received}
            out["staleness"] = {str(t): c for t, c in sorted(opt.staleness_histogram[opt.neighbours[0]].items(),
                                                             key=lambda kv: str(kv[0]))}
    return out


def main() -> None:
    args = _bench.parse_args(__doc__.splitlines()[0])
    if size != 2:
        raise SystemExit("p2_overlap.py runs on exactly 2 ranks")
    torch.set_num_threads(1)
    rounds, steps, warmup = (2, 6, 2) if args.quick else (4, 15, 3)
    modes = ["compute", "no-edges", "async", "async-pv"]
    x, y = make_data()
    per_round: dict[str, list[float]] = {m: [] for m in modes}
    last: dict[str, dict] = {}
    for _ in range(rounds):
        for mode in modes:
            res = run_mode(mode, steps, warmup, x, y)
            # Both ranks' mean step time: a rank that waited would show here.
            per_round[mode].append(comm.allreduce(res["mean_step_s"], op=MPI.SUM) / size)
            last[mode] = res
    if rank != 0:
        return
    params = sum(p.numel() for p in make_model().parameters())

    def ratio(mode: str, ref: str = "compute") -> float:
        return _bench.median([a / b for a, b in zip(per_round[mode], per_round[ref])])

    _bench.emit({
        "part": "P2",
        "ratio": ratio("async"),
        "detail": {
            "parameters": params, "batch": BATCH, "rounds": rounds, "steps_per_round": steps,
            "message_bytes": 64 + 2 * 4 * params,
            "median_step_ms": {m: _bench.ms(_bench.median(v)) for m, v in per_round.items()},
            "async_overhead_ms_per_step": _bench.ms(_bench.median(
                [a - b for a, b in zip(per_round["async"], per_round["compute"])])),
            "ratio_async_vs_no_edges": ratio("async", "no-edges"),
            "ratio_no_edges_vs_compute": ratio("no-edges"),
            "ratio_async_pv_vs_compute": ratio("async-pv"),
            "async_rank0_last_round": {k: last["async"].get(k) for k in ("exchange", "staleness")},
            "async_pv_rank0_pv_evaluations_last_round": last["async-pv"]["pv_evaluations"],
        },
    })


if __name__ == "__main__":
    main()
