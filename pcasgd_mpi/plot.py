"""Figures from run directories: training loss, test accuracy, consensus distance and staleness.

`pcasgd-mpi plot RUN_DIR... -o FIG.png` puts any number of runs side by side. A run directory is
what the trainer writes: summary.json, config.yaml and metrics.jsonl (or metrics/rank-*.jsonl when
the run did not finish). The figures of an experiment grid (`grid_figures`) are drawn here too,
from the same readers.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .grid import Grid

NEVER = "never"


class PlotError(ValueError):
    """A run directory that cannot be read."""


@dataclass
class RunData:
    path: Path
    summary: dict
    config: dict
    steps: np.ndarray  # steps with a loss line, ascending
    loss: np.ndarray  # training minibatch loss at those steps, mean over the ranks that logged it
    eval_steps: np.ndarray
    accuracy: np.ndarray  # average model; NaN where the run did not evaluate it
    agent_accuracy: np.ndarray  # mean over ranks
    test_loss: np.ndarray
    consensus: np.ndarray
    staleness: Counter = field(default_factory=Counter)  # τ (int) or NEVER -> neighbour-steps

    @property
    def label(self) -> str:
        return run_label(self.summary, self.config, fallback=self.path.name)

    @property
    def has_accuracy(self) -> bool:
        return bool(np.isfinite(self.accuracy).any())

    @property
    def has_consensus(self) -> bool:
        return bool(np.isfinite(self.consensus).any())


def run_label(summary: dict, config: dict, fallback: str = "run") -> str:
    algo = summary.get("algorithm") or config.get("algorithm")
    if algo is None:
        return fallback
    if algo == "pc-asgd" and "theta" in config:
        algo = f"pc-asgd θ={config['theta']:g}"
    delay = summary.get("delay") or config.get("delay") or "none"
    return f"{algo}, delay {delay}"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as exc:
        raise PlotError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None


def read_config(run_dir: str | Path) -> dict:
    """The run's TrainConfig as the trainer saved it (config.yaml, or config.json of older runs),
    with the field names of TrainConfig (the YAML file spells them with hyphens)."""
    run_dir = Path(run_dir)
    path = run_dir / "config.yaml"
    if path.exists():
        import yaml

        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise PlotError(f"{path}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    else:
        raw = _read_json(run_dir / "config.json")
    if not isinstance(raw, dict):
        raise PlotError(f"{path}: expected a mapping of settings")
    return {str(k).replace("-", "_"): v for k, v in raw.items()}


def _metric_lines(run_dir: Path):
    merged = run_dir / "metrics.jsonl"
    files = [merged] if merged.exists() else sorted((run_dir / "metrics").glob("rank-*.jsonl"))
    if not files:
        raise PlotError(f"{run_dir}: no metrics.jsonl (is this a run directory?)")
    for path in files:
        with open(path) as fh:
            for line in fh:
                line = line.strip()
                if not line:
                    continue
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    # The last line of a run that was killed can be cut short; nothing after it exists.
                    break


def _summary_staleness(summary: dict) -> Counter:
    hist: Counter = Counter()
    for per_neighbour in (summary.get("staleness_histogram") or {}).values():
        for counts in per_neighbour.values():
            for tau, count in counts.items():
                hist[NEVER if tau == NEVER else int(tau)] += int(count)
    return hist


def load_run(run_dir: str | Path) -> RunData:
    """Read one run directory; raises PlotError when it is not one."""
    path = Path(run_dir)
    if not path.is_dir():
        raise PlotError(f"{path}: no such run directory")
    summary = _read_json(path / "summary.json")
    config = read_config(path)
    losses: dict[int, list[float]] = {}
    evals: dict[int, dict[str, list[float]]] = {}
    logged_staleness: Counter = Counter()
    for rec in _metric_lines(path):
        step = int(rec.get("step", -1))
        if "eval" in rec:
            slot = evals.setdefault(step, {})
            for key, value in rec["eval"].items():
                if value is not None:
                    slot.setdefault(key, []).append(float(value))
            continue
        if "loss" in rec:
            # null: not finite (a rank diverged); NaN keeps the step without faking a number
            losses.setdefault(step, []).append(np.nan if rec["loss"] is None else float(rec["loss"]))
        for tau in (rec.get("staleness") or {}).values():
            logged_staleness[NEVER if tau is None else int(tau)] += 1
    steps = np.array(sorted(losses), dtype=int)
    loss = np.array([np.mean(losses[s]) for s in steps], dtype=float)
    eval_steps = np.array(sorted(evals), dtype=int)

    def series(key: str) -> np.ndarray:
        # The average-model numbers are the same on every rank; the mean just reads one of them.
        return np.array([np.mean(evals[s][key]) if key in evals[s] else np.nan for s in eval_steps], dtype=float)

    staleness = _summary_staleness(summary) or logged_staleness
    return RunData(
        path,
        summary,
        config,
        steps,
        loss,
        eval_steps,
        series("accuracy"),
        series("agent_accuracy"),
        series("test_loss"),
        series("consensus_distance"),
        staleness,
    )


def smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average; the first points average what exists so far (no warm-up gap)."""
    if window <= 1 or len(y) == 0:
        return y
    c = np.cumsum(np.insert(np.asarray(y, dtype=float), 0, 0.0))
    idx = np.arange(1, len(y) + 1)
    lo = np.maximum(0, idx - window)
    return (c[idx] - c[lo]) / (idx - lo)


def default_window(n: int) -> int:
    # Minibatch losses are noisy; about 40 points per curve keeps the trend readable.
    return max(1, n // 40)


def new_figure(nrows: int, ncols: int, width: float = 6.0, height: float = 4.0):
    """A figure that draws with the Agg renderer without touching pyplot's global backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def staleness_bars(ax, hists: list[tuple[str, Counter]]) -> None:
    """Grouped bars: share of neighbour-steps at each staleness, one colour per histogram."""
    keys = sorted({k for _, h in hists for k in h if k != NEVER})
    if any(NEVER in h for _, h in hists):
        keys.append(NEVER)
    if not keys:
        ax.text(0.5, 0.5, "no staleness recorded", ha="center", va="center", transform=ax.transAxes)
        return
    width = 0.8 / max(1, len(hists))
    x = np.arange(len(keys))
    for i, (label, hist) in enumerate(hists):
        total = sum(hist.values()) or 1
        ax.bar(x + (i - (len(hists) - 1) / 2) * width, [hist.get(k, 0) / total for k in keys], width, label=label)
    ax.set_xticks(x, [str(k) for k in keys])
    ax.set_xlabel("staleness τ of the neighbour's message (steps)")
    ax.set_ylabel("share of neighbour-steps")
    ax.set_yscale("log")


def plot_runs(runs: list[RunData], output: str | Path, *, window: int | None = None, title: str | None = None) -> Path:
    """Loss, accuracy, consensus distance and staleness of the runs in one 2x2 PNG."""
    labels = [r.label for r in runs]
    if len(set(labels)) < len(labels):
        labels = [f"{lab} ({r.path.name})" for lab, r in zip(labels, runs)]
    fig, axes = new_figure(2, 2)
    (ax_loss, ax_acc), (ax_cons, ax_stale) = axes
    for run, label in zip(runs, labels):
        w = window if window is not None else default_window(len(run.steps))
        ax_loss.plot(run.steps, smooth(run.loss, w), label=label)
        if len(run.eval_steps):
            acc = run.accuracy if run.has_accuracy else run.agent_accuracy
            ax_acc.plot(run.eval_steps, acc, marker=".", label=label)
        if run.has_consensus and np.nanmax(run.consensus) > 0:
            ax_cons.plot(run.eval_steps, run.consensus, marker=".", label=label)
        elif run.has_consensus:
            # Zero has no place on a log axis; keep the run in the legend so its absence is explained.
            ax_cons.plot([], [], label=f"{label}: 0 throughout")
    ax_loss.set(xlabel="step", ylabel="training loss (mean over ranks)", yscale="log")
    if window is None or window > 1:
        ax_loss.set_title("moving average of the minibatch loss", fontsize="small")
    ax_acc.set(xlabel="step", ylabel="test accuracy")
    ax_acc.set_title("average model (mean agent accuracy where the run has no average)", fontsize="small")
    if not any(len(r.eval_steps) for r in runs):
        ax_acc.text(
            0.5, 0.5, "no evaluations logged (eval_every = 0)", ha="center", va="center", transform=ax_acc.transAxes
        )
    ax_cons.set(xlabel="step", ylabel="consensus distance (1/N) Σ‖x_j − x̄‖²")
    if any(r.has_consensus for r in runs):
        ax_cons.set_yscale("log")
    else:
        ax_cons.text(0.5, 0.5, "no consensus distance logged", ha="center", va="center", transform=ax_cons.transAxes)
    staleness_bars(ax_stale, [(label, r.staleness) for r, label in zip(runs, labels)])
    for ax in (ax_loss, ax_acc, ax_cons, ax_stale):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    return output


def _mean_curve(curves: list[tuple[np.ndarray, np.ndarray]]):
    """Mean and std over runs at the steps all of them share."""
    curves = [(x, y) for x, y in curves if len(x)]
    if not curves:
        return None
    common = curves[0][0]
    for x, _ in curves[1:]:
        common = np.intersect1d(common, x)
    if not len(common):
        return None
    ys = np.stack([y[np.searchsorted(x, common)] for x, y in curves])
    return common, np.nanmean(ys, axis=0), (np.nanstd(ys, axis=0, ddof=1) if len(ys) > 1 else np.zeros(len(common)))


def grid_figures(grid: Grid, out: Path, runs: dict[str, RunData]) -> list[str]:
    """Per setting: accuracy and loss curves; over all settings: consensus distance and staleness.

    Writes PNGs to OUT/figures and returns their paths relative to OUT.
    """
    from .grid import STALE_AWARE, Setting

    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    by_cell: dict[tuple[str, str], list[RunData]] = {}
    for spec in grid.runs():
        if spec.name in runs:
            by_cell.setdefault((spec.setting.key, spec.algorithm.label), []).append(runs[spec.name])
    labels = [a.label for a in grid.algorithms]
    settings = [st for st in grid.settings() if any((st.key, lab) in by_cell for lab in labels)]
    written = []
    for st in settings:
        fig, axes = new_figure(1, 2)
        ax_acc, ax_loss = axes[0]
        for lab in labels:
            group = by_cell.get((st.key, lab))
            if not group:
                continue
            acc = _mean_curve([(r.eval_steps, r.accuracy) for r in group if r.has_accuracy])
            if acc is not None:
                (line,) = ax_acc.plot(acc[0], acc[1], marker=".", label=lab)
                ax_acc.fill_between(acc[0], acc[1] - acc[2], acc[1] + acc[2], alpha=0.15, color=line.get_color())
            loss = _mean_curve([(r.steps, r.loss) for r in group])
            if loss is not None:
                ax_loss.plot(loss[0], smooth(loss[1], default_window(len(loss[0]))), label=lab)
        ax_acc.set(xlabel="step", ylabel="test accuracy of the average model", title="mean over seeds (band: ± 1 std)")
        ax_loss.set(
            xlabel="step",
            ylabel="training loss (mean over ranks and seeds)",
            yscale="log",
            title="moving average of the minibatch loss",
        )
        for ax in (ax_acc, ax_loss):
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize="small")
        fig.suptitle(st.key)
        path = fig_dir / f"curves__{st.slug}.png"
        fig.savefig(path, dpi=100)
        written.append(path)

    rows = [(p, lr) for p in grid.partitions for lr in grid.lrs]
    fig, axes = new_figure(len(rows), len(grid.delays), width=4.5, height=3.4)
    for i, (p, lr) in enumerate(rows):
        for j, delay in enumerate(grid.delays):
            ax, st = axes[i][j], Setting(delay, p, lr)
            for lab in labels:
                group = [r for r in by_cell.get((st.key, lab), []) if r.has_consensus]
                cons = _mean_curve([(r.eval_steps, r.consensus) for r in group])
                if cons is not None and np.nanmax(cons[1]) > 0:
                    ax.plot(cons[0], cons[1], label=lab)
            ax.set_title(st.key, fontsize="small")
            ax.set(xlabel="step", ylabel="consensus distance")
            if ax.get_lines():
                ax.set_yscale("log")
    handles, names = next(
        ((a.get_legend_handles_labels()) for row in axes for a in row if a.get_legend_handles_labels()[0]), ([], [])
    )
    if handles:
        fig.legend(handles, names, loc="outside right center", fontsize="small")
    path = fig_dir / "consensus.png"
    fig.savefig(path, dpi=90)
    written.append(path)

    fig, axes = new_figure(1, 1, width=7)
    hists = []
    for delay in grid.delays:
        total: Counter = Counter()
        for spec in grid.runs():
            if spec.delay == delay and spec.algorithm.name in STALE_AWARE and spec.name in runs:
                total.update(runs[spec.name].staleness)
        if total:
            hists.append((f"delay {delay}", total))
    staleness_bars(axes[0][0], hists)
    if hists:
        axes[0][0].legend(fontsize="small")
    axes[0][0].set_title("staleness of the neighbour messages used (all decentralized runs)", fontsize="small")
    path = fig_dir / "staleness.png"
    fig.savefig(path, dpi=100)
    written.append(path)
    return [str(p.relative_to(out)) for p in written]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories written by `pcasgd-mpi train`")
    parser.add_argument("-o", "--output", required=True, metavar="FIG.png", help="PNG file to write")
    parser.add_argument(
        "--smooth",
        type=int,
        default=None,
        metavar="N",
        help="moving-average window for the loss in steps (default: about 1/40 of the run)",
    )
    parser.add_argument("--title", default=None)


def main(args: argparse.Namespace) -> int:
    runs = [load_run(p) for p in args.runs]
    path = plot_runs(runs, args.output, window=args.smooth, title=args.title)
    print(f"figure written to {path}")
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m pcasgd_mpi.plot", description=__doc__.splitlines()[0])
    add_arguments(_parser)
    try:
        sys.exit(main(_parser.parse_args()))
    except PlotError as _exc:
        print(f"pcasgd-mpi plot: error: {_exc}", file=sys.stderr)
        sys.exit(2)
