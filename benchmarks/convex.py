"""Strongly convex sanity check of the PC-ASGD rule, in one process and without MPI.

Least squares split across N agents on a ring: agent j holds (A_j, b_j) and the global objective
is f(x) = (1/N) Σ_j ‖A_j x − b_j‖² / (2m), whose minimiser x* is known in closed form. Every agent
takes minibatch SGD steps with a constant step size and mixes with its neighbours through the
functions of `pcasgd_mpi.rule`, with lockstep delay semantics: the message agent j uses from
neighbour l at step k is the one l sent at step k − τ (weights x^l and the gradient it used there),
and before step τ nothing has arrived. The measured quantity is the steady-state error
‖x̄ − x*‖² of the average of the agents, averaged over the last `tail` steps and over seeds.

    python benchmarks/convex.py                       # the full table: τ ∈ {0, 1, 2, 4, 8}
    python benchmarks/convex.py --steps 200 --taus 0,2 --seeds 1 --out /tmp/convex

Writes convex.md, convex.json and convex.png to --out and answers, from the numbers, (a) whether
the error of pc-asgd grows with τ and (b) whether pc-asgd-pv is never worse than the worse of
clip and predict.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pcasgd_mpi import rule, topology  # noqa: E402

ALGORITHMS = ("dsgd", "clip", "predict", "pc-asgd", "pc-asgd-pv", "pc-asgd-av")
THETA = {"clip": 0.0, "predict": 1.0, "pc-asgd": 0.5}
# dsgd uses whatever arrived as it is: nothing counts as stale (same convention as the optimizer).
FOREVER = 2**62


@dataclass
class Config:
    agents: int = 6
    dim: int = 20
    rows: int = 60  # per agent; rows > dim keeps every local problem strongly convex
    batch: int = 4
    lr: float = 0.05
    lam: float = 0.04
    tolerance: int = 0
    horizon: int = 16
    heterogeneity: float = 1.0  # spread of the agents' own optima around a common point
    noise: float = 0.1
    steps: int = 2000
    tail: int = 1000
    seeds: int = 3
    taus: tuple[int, ...] = (0, 1, 2, 4, 8)


@dataclass
class Problem:
    A: torch.Tensor  # agents x rows x dim
    b: torch.Tensor  # agents x rows
    x_star: torch.Tensor
    W: np.ndarray
    neighbours: list[list[int]]
    batches: torch.Tensor  # steps x agents x batch row indices, fixed so every algorithm sees the same noise


def make_problem(cfg: Config, seed: int) -> Problem:
    g = torch.Generator().manual_seed(seed)
    n, m, d = cfg.agents, cfg.rows, cfg.dim
    # Unit-variance entries: the Hessian A^T A / m then has its spectrum in (1 ± sqrt(d/m))².
    A = torch.randn(n, m, d, generator=g, dtype=torch.float64)
    centre = torch.randn(d, generator=g, dtype=torch.float64)
    local_opt = centre + cfg.heterogeneity * torch.randn(n, d, generator=g, dtype=torch.float64)
    b = torch.einsum("nmd,nd->nm", A, local_opt) + cfg.noise * torch.randn(n, m, generator=g, dtype=torch.float64)
    # The minimiser of the average of the local mean squared errors: the stacked least squares solution.
    x_star = torch.linalg.lstsq(A.reshape(n * m, d), b.reshape(n * m, 1)).solution.reshape(d)
    graph = topology.build("ring", n)
    W = topology.mixing_matrix(graph, "metropolis")
    batches = torch.randint(0, m, (cfg.steps, n, cfg.batch), generator=g)
    return Problem(A, b, x_star, W, [topology.neighbours(graph, j) for j in range(n)], batches)


def _grads(p: Problem, X: torch.Tensor, k: int) -> tuple[torch.Tensor, list]:
    """Minibatch gradient of every agent at step k, and its minibatch (for PV's loss check)."""
    rows = torch.arange(X.shape[0]).unsqueeze(1)
    A, b = p.A[rows, p.batches[k]], p.b[rows, p.batches[k]]  # agents x batch x dim, agents x batch
    resid = torch.einsum("nbd,nd->nb", A, X) - b
    grads = torch.einsum("nbd,nb->nd", A, resid) / b.shape[1]
    return grads, list(zip(A, b))


def _loss(batch, x: torch.Tensor) -> float:
    Aj, bj = batch
    return float(((Aj @ x - bj) ** 2).mean() / 2)


def simulate(p: Problem, cfg: Config, algorithm: str, tau: int) -> dict:
    """One run; returns the steady-state error and, for PV and AV, how they chose."""
    n, d = p.A.shape[0], p.A.shape[2]
    X = torch.zeros(n, d, dtype=torch.float64)
    hist_x, hist_g = [], []  # the last τ + 1 messages of every agent, oldest first
    tol, hor = (FOREVER, FOREVER) if algorithm == "dsgd" else (cfg.tolerance, cfg.horizon)
    trackers = (
        [{l: rule.SubstitutionTracker() for l in p.neighbours[j]} for j in range(n)]
        if algorithm == "pc-asgd-av"
        else None
    )
    pv_wins = {"predict": 0, "clip": 0}
    err_sum, err_n = 0.0, 0
    for k in range(cfg.steps):
        G, batches = _grads(p, X, k)
        hist_x.append(X.clone())
        hist_g.append(G.clone())
        if len(hist_x) > tau + 1:
            hist_x.pop(0)
            hist_g.pop(0)
        s = k - tau  # the step whose messages are used now
        new = torch.empty_like(X)
        for j in range(n):
            delta = -cfg.lr * G[j]
            nbs = [
                rule.Neighbour(
                    float(p.W[j, l]), hist_x[0][l] if s >= 0 else None, hist_g[0][l] if s >= 0 else None, tau
                )
                for l in p.neighbours[j]
            ]
            kw = dict(lr=cfg.lr, lam=cfg.lam, tolerance=tol, horizon=hor)
            w_self = float(p.W[j, j])
            if algorithm == "pc-asgd-pv":
                x_p, x_c = rule.candidates(X[j], delta, w_self, nbs, **kw)
                if any(rule.classify(nb, tol, hor) is rule.Status.STALE for nb in nbs):
                    keep_p = rule.pv_choose(_loss(batches[j], x_p), _loss(batches[j], x_c))
                    pv_wins["predict" if keep_p else "clip"] += 1
                    new[j] = x_p if keep_p else x_c
                else:
                    new[j] = x_c
            elif algorithm == "pc-asgd-av":
                thetas = []
                for l, nb in zip(p.neighbours[j], nbs):
                    tr = trackers[j][l]
                    if nb.x is not None:
                        tr.observe(k - nb.staleness, nb.x)
                    if rule.classify(nb, tol, hor) is rule.Status.STALE:
                        tr.record(k, rule.predict_weights(nb.x, nb.grad, nb.staleness, cfg.lr, cfg.lam), X[j])
                    thetas.append(tr.theta)
                new[j] = rule.mix(X[j], delta, w_self, nbs, thetas, **kw)
            else:
                theta = THETA.get(algorithm, 0.0)
                new[j] = rule.mix(X[j], delta, w_self, nbs, [theta] * len(nbs), **kw)
        X = new
        if k >= cfg.steps - cfg.tail:
            err_sum += float(((X.mean(0) - p.x_star) ** 2).sum())
            err_n += 1
    out = {"error": err_sum / err_n}
    if sum(pv_wins.values()):
        out["pv_predict_share"] = pv_wins["predict"] / sum(pv_wins.values())
    if trackers is not None:
        thetas = [t.theta for per in trackers for t in per.values() if t.measurements]
        out["av_theta"] = float(np.mean(thetas)) if thetas else None
    return out


def run_benchmark(cfg: Config, log=print) -> dict:
    results: dict[str, dict[str, dict]] = {a: {} for a in ALGORITHMS}
    problems = [make_problem(cfg, seed) for seed in range(cfg.seeds)]
    for tau in cfg.taus:
        t0 = time.perf_counter()
        for algo in ALGORITHMS:
            runs = [simulate(p, cfg, algo, tau) for p in problems]
            errs = [r["error"] for r in runs]
            cell = {
                "mean": float(np.mean(errs)),
                "std": float(np.std(errs, ddof=1)) if len(errs) > 1 else 0.0,
                "values": errs,
            }
            for key in ("pv_predict_share", "av_theta"):
                vals = [r[key] for r in runs if r.get(key) is not None]
                if vals:
                    cell[key] = float(np.mean(vals))
            results[algo][str(tau)] = cell
        log(f"τ = {tau}: done in {time.perf_counter() - t0:.1f} s")
    return {"config": asdict(cfg), "errors": results, "checks": evaluate_checks(results, cfg.taus)}


def evaluate_checks(errors: dict, taus) -> dict:
    """(a) pc-asgd's error grows with τ; (b) PV never worse than the worse of clip and predict.

    Both read only `errors` (algorithm -> τ -> {"mean": ...}), so they answer for whatever was measured.
    """
    taus = sorted(int(t) for t in taus)

    def e(algo, tau):
        return errors[algo][str(tau)]["mean"]

    growth = {}
    for algo in ("pc-asgd", "pc-asgd-pv", "pc-asgd-av"):
        seq = [e(algo, t) for t in taus]
        growth[algo] = {
            "errors": seq,
            "non_decreasing": all(b >= a for a, b in zip(seq, seq[1:])),
            "largest_over_smallest_tau": seq[-1] / seq[0] if seq[0] > 0 else math.inf,
        }
    a = growth["pc-asgd"]
    pv_rows = []
    for t in taus:
        worse = max(e("clip", t), e("predict", t))
        pv_rows.append(
            {
                "tau": t,
                "pv": e("pc-asgd-pv", t),
                "clip": e("clip", t),
                "predict": e("predict", t),
                "relative_excess": (e("pc-asgd-pv", t) - worse) / worse if worse > 0 else 0.0,
                "holds": e("pc-asgd-pv", t) <= worse,
            }
        )
    return {
        "a_error_grows_with_tau": {
            "holds": a["non_decreasing"] and a["largest_over_smallest_tau"] > 1,
            "detail": growth,
        },
        "b_pv_not_worse_than_worse_of_clip_predict": {"holds": all(r["holds"] for r in pv_rows), "rows": pv_rows},
    }


def render(result: dict, png_name: str | None) -> str:
    cfg, errors, ch = result["config"], result["errors"], result["checks"]
    taus = [str(t) for t in cfg["taus"]]
    lines = [
        "# Convex check: steady-state error ‖x̄ − x*‖² versus delay",
        "",
        f"Least squares, {cfg['agents']} agents on a ring (Metropolis weights), dimension {cfg['dim']}, "
        f"{cfg['rows']} rows per agent, minibatch {cfg['batch']}, step size {cfg['lr']}, λ = {cfg['lam']}, "
        f"tolerance {cfg['tolerance']}, horizon {cfg['horizon']}, heterogeneity {cfg['heterogeneity']}, "
        f"noise {cfg['noise']}; {cfg['steps']} steps, error averaged over the last {cfg['tail']} and over "
        f"{cfg['seeds']} seeds (mean ± sample std). Every message is τ steps old (lockstep).",
        "",
        "| algorithm | " + " | ".join(f"τ = {t}" for t in taus) + " |",
        "|---|" + "---|" * len(taus),
    ]
    for algo in ALGORITHMS:
        cells = [f"{errors[algo][t]['mean']:.3g} ± {errors[algo][t]['std']:.1g}" for t in taus]
        lines.append(f"| {algo} | " + " | ".join(cells) + " |")
    pv = [errors["pc-asgd-pv"][t].get("pv_predict_share") for t in taus]
    av = [errors["pc-asgd-av"][t].get("av_theta") for t in taus]
    lines.append("| *PV predict share* | " + " | ".join("—" if v is None else f"{100 * v:.2f}%" for v in pv) + " |")
    lines.append("| *AV mean final θ_l* | " + " | ".join("—" if v is None else f"{v:.2f}" for v in av) + " |")
    a, b = ch["a_error_grows_with_tau"], ch["b_pv_not_worse_than_worse_of_clip_predict"]
    ratio = a["detail"]["pc-asgd"]["largest_over_smallest_tau"]
    lines += [
        "",
        "## Checks (computed from the table)",
        "",
        f"- (a) the error of pc-asgd (θ = 0.5) grows with τ: **{a['holds']}** "
        f"(non-decreasing over τ: {a['detail']['pc-asgd']['non_decreasing']}; "
        f"error at the largest τ / at the smallest: {ratio:.3g})",
    ]
    for algo in ("pc-asgd-pv", "pc-asgd-av"):
        det = a["detail"][algo]
        lines.append(
            f"  - for comparison, {algo}: non-decreasing {det['non_decreasing']}, "
            f"ratio {det['largest_over_smallest_tau']:.3g}"
        )
    lines.append(f"- (b) pc-asgd-pv is never worse than the worse of clip and predict: **{b['holds']}**")
    for r in b["rows"]:
        lines.append(
            f"  - τ = {r['tau']}: PV {r['pv']:.6g}, clip {r['clip']:.6g}, predict {r['predict']:.6g}; "
            f"(PV − worse) / worse = {r['relative_excess']:+.2e} → {'holds' if r['holds'] else 'fails'}"
        )
    if png_name:
        lines += ["", f"![error versus τ]({png_name})"]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    taus = result["config"]["taus"]
    # Distinct markers and dashes: PV that always clips lies exactly on top of clip.
    styles = dict(zip(ALGORITHMS, [("o", "-"), ("s", "-"), ("^", "-"), ("D", "-"), ("x", "--"), ("v", "-")]))
    for algo in ALGORITHMS:
        cells = [result["errors"][algo][str(t)] for t in taus]
        mean = np.array([c["mean"] for c in cells])
        std = np.array([c["std"] for c in cells])
        marker, dash = styles[algo]
        ax.errorbar(
            taus,
            mean,
            yerr=std,
            marker=marker,
            linestyle=dash,
            capsize=3,
            label=algo,
            markersize=8 if marker == "x" else 5,
        )
    ax.set(
        xlabel="delay τ of every message (steps)",
        ylabel="steady-state ‖x̄ − x*‖²",
        yscale="log",
        title="strongly convex least squares on a ring",
    )
    ax.set_xticks(taus)
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    defaults = Config()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, value in asdict(defaults).items():
        if name == "taus":
            continue
        p.add_argument(f"--{name}", type=type(value), default=value)
    p.add_argument("--taus", default=",".join(map(str, defaults.taus)), help="comma-separated delays")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "fidelity"))
    p.add_argument(
        "--replot",
        action="store_true",
        help="redo the checks, table and figure from OUT/convex.json without simulating",
    )
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.replot:
        result = json.loads((out / "convex.json").read_text())
        result["checks"] = evaluate_checks(result["errors"], result["config"]["taus"])
        return _write(result, out)
    fields = {k: v for k, v in vars(args).items() if k in asdict(defaults) and k != "taus"}
    try:
        taus = tuple(sorted({int(t) for t in args.taus.split(",") if t.strip()}))
    except ValueError:
        p.error(f"--taus must be whole numbers separated by commas, got {args.taus!r}")
    cfg = Config(**fields, taus=taus)
    if not taus or min(taus) < 0:
        p.error("--taus needs at least one delay >= 0")
    if not 0 < cfg.tail <= cfg.steps:
        p.error("--tail must lie in 1..steps")
    if cfg.agents < 3:
        p.error("--agents must be >= 3 (a ring)")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result = run_benchmark(cfg)
    result["seconds"] = time.perf_counter() - t0
    return _write(result, out)


def _write(result: dict, out: Path) -> int:
    plot(result, out / "convex.png")
    (out / "convex.json").write_text(json.dumps(result, indent=2) + "\n")
    text = render(result, "convex.png")
    (out / "convex.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
