"""P2, overlap: async training step time with communication against the same training without it.

2 ranks, each training an MLP (1024-256-256-10, 331 k parameters) on its own synthetic data with
batch 1024, one torch thread per rank (one core each): about 2 GFLOP of forward and backward
per step against a 2.6 MB message, so compute dominates, as in training worth distributing.
Every way to step keeps its model and optimizer for the whole run and is timed in blocks of a
few steps; two ways are compared in interleaved pairs of blocks (A B A B ...), both ranks
starting each block together so that they compute at the same time and see the same load:

- compute: plain `torch.optim.SGD` and nothing else: communication off. This is the reference
  of the goal (A); it also leaves out everything the distributed optimizer does locally.
- async: `DistributedOptimizer`, ring of the 2 ranks, free-running, algorithm pc-asgd (weights and
  gradient on the wire, fixed θ = 0.5): B of the goal.
- no-edges: `DistributedOptimizer` on a graph without edges: its local work (flat buffers, Δ,
  the rule) with no message ever sent. Reported, against compute, to split the overhead.
- async-pv: pc-asgd-pv, which adds two forward passes whenever a neighbour is stale: compute the
  rule asks for, not communication, and the communication-off run cannot have it, so it is
  reported separately, not in the goal.

The goal ratio is the median over pairs of (mean step time of the async block) / (mean step
time of the compute block), with its quartiles and extremes.
"""

from __future__ import annotations

import time

import networkx as nx
import numpy as np
import torch
import torch.nn.functional as F
from mpi4py import MPI
from torch import nn

import _bench
from pcasgd_mpi import world as world_mod
from pcasgd_mpi.optimizer import DistributedOptimizer

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
IN, HIDDEN, CLASSES, BATCH, SAMPLES = 1024, 256, 10, 1024, 8192
LR = 0.05


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, CLASSES)
    )


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(SAMPLES, IN, generator=gen)
    teacher = torch.randn(IN, CLASSES, generator=torch.Generator().manual_seed(7))
    return x, (x @ teacher).argmax(1)


def edgeless_world() -> world_mod.World:
    graph = nx.empty_graph(size)
    return world_mod.World(comm, rank, size, graph, np.eye(size), "none", "identity")


class Leg:
    """One way to step, kept for the whole run; calling it times a block of steps."""

    def __init__(self, mode: str, x: torch.Tensor, y: torch.Tensor, steps: int):
        self.mode, self.x, self.y, self.steps = mode, x, y, steps
        self.model = make_model()
        self.inner = torch.optim.SGD(self.model.parameters(), lr=LR)
        self.opt = None
        if mode == "no-edges":
            self.opt = DistributedOptimizer(
                self.inner, self.model, world=edgeless_world(), algorithm="pc-asgd", mode="async"
            )
        elif mode in ("async", "async-pv"):
            algorithm = "pc-asgd-pv" if mode == "async-pv" else "pc-asgd"
            # Its own communicator: legs alive at the same time must not take each other's messages.
            self.opt = DistributedOptimizer(
                self.inner, self.model, world=world_mod.init("ring", comm=comm.Dup()), algorithm=algorithm, mode="async"
            )
        self.gen = torch.Generator().manual_seed(rank)
        self.pv_evaluations = 0

    def __call__(self) -> float:
        """Mean step time of one block, averaged over both ranks (a rank that waited shows here)."""
        model, inner, opt = self.model, self.inner, self.opt
        batches = []
        for _ in range(self.steps):
            idx = torch.randint(0, SAMPLES, (BATCH,), generator=self.gen)
            batches.append((self.x[idx], self.y[idx]))
        comm.Barrier()
        t0 = time.perf_counter()
        for xb, yb in batches:
            loss = F.cross_entropy(model(xb), yb)
            if opt is None:
                inner.zero_grad()
                loss.backward()
                inner.step()
            else:
                opt.zero_grad()
                loss.backward()
                info = opt.step(closure=lambda xb=xb, yb=yb: F.cross_entropy(model(xb), yb))
                self.pv_evaluations += info.choice is not None
        mean = (time.perf_counter() - t0) / self.steps
        return comm.allreduce(mean, op=MPI.SUM) / size

    def finish(self) -> dict:
        out = {"pv_evaluations": self.pv_evaluations}
        opt = self.opt
        if opt is not None:
            opt.finalize()
            if opt.exchange is not None and opt.neighbours:
                out["exchange"] = {
                    "sent": opt.exchange.stats.sent,
                    "skipped": opt.exchange.stats.skipped,
                    "received": opt.exchange.stats.received,
                }
                out["staleness"] = {
                    str(t): c
                    for t, c in sorted(opt.staleness_histogram[opt.neighbours[0]].items(), key=lambda kv: str(kv[0]))
                }
        return out


def main() -> None:
    args = _bench.parse_args(__doc__.splitlines()[0])
    if size != 2:
        raise SystemExit("p2_overlap.py runs on exactly 2 ranks")
    torch.set_num_threads(1)
    pairs, side_pairs, steps = (3, 2, 3) if args.quick else (45, 7, 4)
    x, y = make_data()
    legs = {mode: Leg(mode, x, y, steps) for mode in ("compute", "async", "no-edges", "async-pv")}
    goal = _bench.interleave(legs["compute"], legs["async"], pairs)
    no_edges = _bench.interleave(legs["compute"], legs["no-edges"], side_pairs)
    pv = _bench.interleave(legs["compute"], legs["async-pv"], side_pairs)
    finished = {mode: leg.finish() for mode, leg in legs.items()}
    if rank != 0:
        return
    params = sum(p.numel() for p in make_model().parameters())
    summary = goal.summary()
    _bench.emit(
        {
            "part": "P2",
            "ratio": summary["median"],
            "pairs": summary,
            "detail": {
                "parameters": params,
                "batch": BATCH,
                "steps_per_side": steps,
                "message_bytes": 64 + 2 * 4 * params,
                "median_step_ms": {
                    "compute": _bench.ms(_bench.median(goal.a)),
                    "async": _bench.ms(_bench.median(goal.b)),
                    "no-edges": _bench.ms(_bench.median(no_edges.b)),
                    "async-pv": _bench.ms(_bench.median(pv.b)),
                },
                "async_overhead_ms_per_step": _bench.ms(_bench.median([b - a for a, b in zip(goal.a, goal.b)])),
                "ratio_no_edges_vs_compute": no_edges.summary(),
                "ratio_async_pv_vs_compute": pv.summary(),
                "async_rank0": {k: finished["async"].get(k) for k in ("exchange", "staleness")},
                "async_pv_rank0_pv_evaluations": finished["async-pv"]["pv_evaluations"],
            },
        }
    )


if __name__ == "__main__":
    main()
