"""Single-process lockstep simulation of pc-asgd-av on digits, for studying its substitution records.

N agents on a ring with Metropolis weights, the MLP of `pcasgd_mpi.models`, plain SGD, batch 32,
tolerance 0 and horizon 16: the settings of benchmarks/grids/digits-noniid.yaml. The data, the
partition, the minibatch order, the initial model and the delays come from the project's own
modules with the same seeds as `pcasgd-mpi train --mode lockstep`, and the update is
`rule.mix`, so a run follows the MPI run closely (not to the bit: the gradients are computed in
another order). Lockstep semantics: at step k agent j uses neighbour l's message of step
k − d(l, j, k), which carries x^l and the gradient l used there; before step d nothing has arrived.

Trackers compared (``--trackers``, each optionally ``KIND:BETA``):

- ``step``: `rule.SubstitutionTracker` as the optimizer uses it: one record per step, each
  measured against the message of exactly its own step, root-mean-square averages (β = 0.97);
- ``step-norms``: the same records with the earlier averages of norms, E ← β E + (1 − β) e
  (β = 0.8 unless given): the per-step records alone;
- ``pending``: the earlier rule, one pending record per neighbour, measured against the first
  message of a step s ≥ t, averages of norms with β = 0.8 (kept to reproduce the comparison);
- ``oracle``: the true errors of the substitutes of step k, known at once (only a simulation can
  do this), averages of norms with β = 0.8: AV if its measurements were exact and never late.

    python benchmarks/av_sim.py                                    # the grid, 3 seeds
    python benchmarks/av_sim.py --delays fixed:8 --partitions dirichlet:0.3 --lrs 0.5 --trace
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pcasgd_mpi import data, models, rule, topology  # noqa: E402
from pcasgd_mpi.delay import DelayModel  # noqa: E402
from pcasgd_mpi.tracker import _gram_from_errors  # noqa: E402

FOREVER = 2**62  # dsgd: nothing is ever stale (the optimizer's convention)


class PendingTracker:
    """The earlier rule: one pending record, measured by the first message of a step s ≥ t."""

    def __init__(self, beta: float = 0.8, eps: float = 1e-12) -> None:
        self.beta, self.eps = beta, eps
        self.e_p = self.e_c = None
        self.measurements = 0
        self._step = None
        self._x_hat = self._x_self = None

    @property
    def theta(self) -> float:
        if self.e_p is None:
            return 0.5
        return self.e_c**2 / (self.e_p**2 + self.e_c**2 + self.eps)

    def record(self, t, x_hat, x_self) -> bool:
        if self._step is not None:
            return False
        self._step, self._x_hat, self._x_self = t, x_hat.clone(), x_self.clone()
        return True

    def observe(self, s, x_true) -> bool:
        if self._step is None or s < self._step:
            return False
        self._step = None
        _ema(
            self,
            torch.linalg.vector_norm(self._x_hat - x_true).item(),
            torch.linalg.vector_norm(self._x_self - x_true).item(),
        )
        return True


class OracleTracker(PendingTracker):
    """Measures the substitutes of step k against x^l_k at once (``truth`` is set by the loop)."""

    truth: torch.Tensor | None = None

    def record(self, t, x_hat, x_self) -> bool:
        _ema(
            self,
            torch.linalg.vector_norm(x_hat - self.truth).item(),
            torch.linalg.vector_norm(x_self - self.truth).item(),
        )
        return True

    def observe(self, s, x_true) -> bool:
        return False


def _ema(tr, e_p: float, e_c: float) -> None:
    if not (math.isfinite(e_p) and math.isfinite(e_c)):
        return
    if tr.e_p is None:
        tr.e_p, tr.e_c = e_p, e_c
    else:
        tr.e_p = tr.beta * tr.e_p + (1 - tr.beta) * e_p
        tr.e_c = tr.beta * tr.e_c + (1 - tr.beta) * e_c
    tr.measurements += 1


class NormAverageTracker(rule.SubstitutionTracker):
    """Per-step records with the earlier averages of norms, E ← β E + (1 − β) e, and the earlier
    blend θ = E_C² / (E_P² + E_C²) (errors taken as independent, the whole roll-forward)."""

    _norms: tuple[float, float] | None = None

    def _average(self, gram: torch.Tensor) -> None:
        # e_P = e_C + u + ρ, so ‖e_P‖² is the sum of the Gram matrix of (e_C, u, ρ)
        e_p, e_c = math.sqrt(max(gram.sum().item(), 0.0)), math.sqrt(max(gram[0, 0].item(), 0.0))
        if self._norms is not None:
            e_p = self.beta * self._norms[0] + (1.0 - self.beta) * e_p
            e_c = self.beta * self._norms[1] + (1.0 - self.beta) * e_c
        self._norms = (e_p, e_c)
        self._gram, self._split = _gram_from_errors(e_p, e_c, None), False


def make_tracker(spec: str, args):
    kind, _, beta = spec.partition(":")
    if kind in ("step", "step-norms"):
        cls = rule.SubstitutionTracker if kind == "step" else NormAverageTracker
        default = 0.97 if kind == "step" else 0.8
        return cls(beta=float(beta or default), horizon=args.horizon, sketch_size=args.sketch)
    if kind == "pending":
        return PendingTracker(float(beta or 0.8))
    if kind == "oracle":
        return OracleTracker(float(beta or 0.8))
    raise ValueError(f"unknown tracker {spec!r}; use step, step-norms, pending or oracle[:BETA]")


def agents(n: int, partition: str, seed: int, batch: int):
    """Digits, a ring of n agents with Metropolis weights, their minibatch streams and the MLP, seeded
    as `pcasgd-mpi train` seeds them: (data set, W, neighbours, samplers, model)."""
    ds = data.load("digits")
    graph = topology.build("ring", n)
    shards = data.partition(ds.y_train, n, partition, seed=seed)
    samplers = [data.ShardSampler(shards[r], batch, seed, r) for r in range(n)]
    model = models.build("mlp", ds.input_shape, ds.num_classes, seed=seed)
    return ds, topology.mixing_matrix(graph), [topology.neighbours(graph, r) for r in range(n)], samplers, model


def gradient(model: torch.nn.Module, x: torch.Tensor, ds, batch) -> torch.Tensor:
    """The flat gradient of the training loss at weights x on the samples ``batch``."""
    params = list(model.parameters())
    vector_to_parameters(x, params)
    idx = torch.as_tensor(batch)
    model.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(ds.x_train[idx]), ds.y_train[idx]).backward()
    return torch.cat([p.grad.reshape(-1) for p in params]).detach().clone()


def run(
    algorithm: str,
    tracker: str | None,
    delay_spec: str,
    partition: str,
    lr: float,
    seed: int,
    args,
    trace: list | None = None,
) -> dict:
    """One lockstep run; returns the final test accuracy of the average model and AV's θ."""
    ds, W, nbrs, samplers, model = agents(args.agents, partition, seed, args.batch)
    n, params = args.agents, list(model.parameters())
    xs = [parameters_to_vector(params).detach().clone() for _ in range(n)]
    delay = DelayModel.parse(delay_spec, seed=seed)
    tol, hor = (FOREVER, FOREVER) if algorithm == "dsgd" else (args.tolerance, args.horizon)
    theta_fixed = {"dsgd": 0.0, "clip": 0.0, "predict": 1.0}.get(algorithm, 0.5)
    av = algorithm == "pc-asgd-av"
    trackers = [{l: make_tracker(tracker, args) for l in nbrs[j]} for j in range(n)] if av else None
    history: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for k in range(args.steps):
        msgs = []
        for r in range(n):
            msgs.append((xs[r], gradient(model, xs[r], ds, samplers[r].next_batch())))
        history[k] = msgs
        history.pop(k - delay.max_delay - 1, None)
        new = []
        for j in range(n):
            x_k, g_k = msgs[j]
            nbs, steps = [], []
            for l in nbrs[j]:
                s = k - delay.delay(l, j, k)
                x_s, g_s = history[s][l] if s >= 0 else (None, None)
                nbs.append(rule.Neighbour(float(W[j, l]), x_s, g_s, k - s if x_s is not None else 0))
                steps.append(s)
            kw = dict(lr=lr, lam=args.lam, tolerance=tol, horizon=hor)
            on_predict = None
            if av:
                trs = [trackers[j][l] for l in nbrs[j]]
                for tr, nb, s in zip(trs, nbs, steps):
                    if nb.x is not None:
                        tr.observe(s, nb.x)
                thetas = [tr.theta for tr in trs]

                def on_predict(i, x_hat, trs=trs, x_k=x_k, j=j):
                    l = nbrs[j][i]
                    if isinstance(trs[i], OracleTracker):
                        trs[i].truth = msgs[l][0]
                    if trace is not None and j == 0:
                        truth = msgs[l][0]
                        trace.append(
                            {
                                "k": k,
                                "l": l,
                                "theta": trs[i].theta,
                                "E_P": trs[i].e_p,
                                "E_C": trs[i].e_c,
                                "e_P": torch.linalg.vector_norm(x_hat - truth).item(),
                                "e_C": torch.linalg.vector_norm(x_k - truth).item(),
                            }
                        )
                    trs[i].record(k, x_hat, x_k)
            else:
                thetas = [theta_fixed] * len(nbs)
            new.append(rule.mix(x_k, -lr * g_k, float(W[j, j]), nbs, thetas, on_predict=on_predict, **kw))
        xs = new
    vector_to_parameters(torch.stack(xs).mean(0), params)
    with torch.no_grad():
        acc = (model(ds.x_test).argmax(1) == ds.y_test).float().mean().item()
    thetas = [t.theta for per in trackers for t in per.values() if t.measurements] if av else []
    return {
        "accuracy": acc,
        "theta": statistics.fmean(thetas) if thetas else None,
        "measurements": sum(t.measurements for per in trackers for t in per.values()) if av else None,
    }


def _fmt(theta: float | None) -> str:
    return "-" if theta is None else f"{theta:.2f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--trackers",
        default="step,step-norms,pending",
        help="comma list of step, step-norms, pending, oracle, each optionally KIND:BETA",
    )
    ap.add_argument("--delays", default="ranks:0,2:6;random:0.5:4;fixed:8", help="semicolon list of delay specs")
    ap.add_argument("--partitions", default="iid;dirichlet:0.3")
    ap.add_argument("--lrs", default="0.1,0.5")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--agents", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lam", type=float, default=0.04)
    ap.add_argument("--tolerance", type=int, default=0)
    ap.add_argument("--horizon", type=int, default=16)
    ap.add_argument("--sketch", type=int, default=4096, help="coordinates a step record keeps")
    ap.add_argument("--trace", action="store_true", help="print θ, E_P, E_C of agent 0 over time")
    ap.add_argument("--json", type=Path, help="write every run's result here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    delays = args.delays.split(";")
    partitions = args.partitions.split(";")
    lrs = [float(v) for v in args.lrs.split(",")]
    seeds = [int(v) for v in args.seeds.split(",")]
    trackers = args.trackers.split(",")
    results = []
    t0 = time.time()
    for partition in partitions:
        for lr in lrs:
            ref = [run("dsgd", None, "none", partition, lr, s, args)["accuracy"] for s in seeds]
            ref_mean = statistics.fmean(ref)
            results.append({"algorithm": "dsgd", "delay": "none", "partition": partition, "lr": lr, "accs": ref})
            print(f"{partition:14s} lr {lr:<4} dsgd none: {100 * ref_mean:.1f}", flush=True)
            for delay in delays:
                for tr in trackers:
                    trace = [] if args.trace else None
                    outs = [
                        run("pc-asgd-av", tr, delay, partition, lr, s, args, trace if s == seeds[0] else None)
                        for s in seeds
                    ]
                    accs = [o["accuracy"] for o in outs]
                    gap = 100 * (ref_mean - statistics.fmean(accs))
                    results.append(
                        {
                            "algorithm": "pc-asgd-av",
                            "tracker": tr,
                            "delay": delay,
                            "partition": partition,
                            "lr": lr,
                            "accs": accs,
                            "gap_pp": gap,
                            "theta": [o["theta"] for o in outs],
                            "measurements": [o["measurements"] for o in outs],
                        }
                    )
                    print(
                        f"{partition:14s} lr {lr:<4} {delay:12s} av/{tr:13s} "
                        f"{' '.join(f'{100 * a:.1f}' for a in accs)}  gap {gap:+.1f} pp  θ "
                        f"{' '.join(_fmt(o['theta']) for o in outs)}",
                        flush=True,
                    )
                    if trace:
                        for row in trace[:: max(1, len(trace) // 40)]:
                            print("   ", {key: (round(v, 3) if isinstance(v, float) else v) for key, v in row.items()})
    print("\nworst-case gap to dsgd without delay (pp), per tracker:")
    for tr in trackers:
        rows = [r for r in results if r.get("tracker") == tr]
        worst = max(rows, key=lambda r: r["gap_pp"])
        print(f"  {tr:13s} {worst['gap_pp']:+.1f} at {worst['delay']} · {worst['partition']} · lr {worst['lr']}")
    print(f"wall time {time.time() - t0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
