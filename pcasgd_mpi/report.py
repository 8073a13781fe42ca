"""The report of a grid: results.json, results.md (tables in markdown) and the figures.

Written on rank 0 after the runs, or from finished runs alone by `pcasgd-mpi experiment --report-only`.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import plot as plotting
from .aggregation import aggregate
from .grid import Grid


# One seed has no spread to show: "± 0" would read as a measured zero.
def _pct(st: dict | None) -> str:
    if st is None:
        return "—"
    return f"{100 * st['mean']:.1f}" + (f" ± {100 * st['std']:.1f}" if st["n"] > 1 else "")


def _sci(st: dict | None) -> str:
    if st is None:
        return "—"
    return f"{st['mean']:.2g}" + (f" ± {st['std']:.1g}" if st["n"] > 1 else "")


def _share(cell: dict) -> str:
    st = cell.get("pv_predict_share")
    if st is None:
        return "—"
    spread = f" ± {100 * st['std']:.0f}" if st["n"] > 1 else ""
    return f"{100 * st['mean']:.0f}%{spread} ({cell['pv_choices']} choices)"


def _theta(cell: dict) -> str:
    st = cell.get("av_theta")
    if st is None:
        return "—"
    return f"{st['mean']:.2f}" + (f" ± {st['std']:.2f}" if st["n"] > 1 else "")


def render_markdown(agg: dict, figures: list[str] | None = None) -> str:
    grid, labels, table = agg["grid"], agg["algorithms"], agg["table"]
    settings = agg["settings"]
    base = ", ".join(f"{k} {v}" for k, v in grid["base"].items())
    seeds = grid["seeds"]
    lines = [
        f"# Results: {grid['name']}",
        "",
        f"Grid `{grid['file']}`, {grid['ranks']} ranks; base: {base}; seeds {seeds}.",
        "Cells are mean ± sample standard deviation over the seeds of the final test accuracy (%) of",
        "the average model x̄. Gap = accuracy of dsgd without delay (same partition and lr) minus the",
        "cell, in percentage points; the worst case is the largest gap over the settings.",
        "",
    ]
    unfinished = [r["name"] for r in agg["runs"] if not r["finished"]]
    if unfinished:
        lines += [
            f"**{len(unfinished)} run(s) have no summary yet** (left out): {', '.join(unfinished[:5])}"
            + (" …" if len(unfinished) > 5 else ""),
            "",
        ]

    def header(cols):
        return ["| delay | partition | lr | " + " | ".join(cols) + " |", "|---|---|---|" + "---|" * len(cols)]

    def row(st, cells):
        return f"| {st['delay']} | {st['partition']} | {st['lr']:g} | " + " | ".join(cells) + " |"

    lines += ["## Final test accuracy of the average model (%)", ""] + header(labels)
    for st in settings:
        lines.append(row(st, [_pct(table[lab].get(st["key"], {}).get("accuracy")) for lab in labels]))
    worst = agg["worst_gap"]
    lines.append(
        "| **worst-case gap to dsgd, no delay (pp)** | | | "
        + " | ".join(f"{100 * worst[lab]['gap']:+.1f}" if lab in worst else "—" for lab in labels)
        + " |"
    )
    lines += ["", "Where each worst case happens:", ""]
    for lab in labels:
        if lab in worst:
            lines.append(f"- {lab}: {100 * worst[lab]['gap']:+.1f} pp at {worst[lab]['setting']}")
    diverged = [r for r in agg["runs"] if r.get("diverged")]
    if diverged:
        lines += [
            "",
            f"In {len(diverged)} run(s) a rank's weights became inf or NaN; the run went on without it "
            "and its cell counts the accuracy of the average model that resulted:",
            "",
        ] + [
            f"- {r['name']}: " + ", ".join(f"rank {rank} at step {k}" for rank, k in r["diverged"].items())
            for r in diverged
        ]
    if any(lab.startswith("allreduce") for lab in labels):
        lines += [
            "",
            "allreduce averages gradients synchronously and has no neighbour messages: the delay "
            "model does not act on it.",
        ]

    lines += ["", "## Consensus distance (1/N) Σ‖x_j − x̄‖² at the end", ""] + header(labels)
    for st in settings:
        lines.append(row(st, [_sci(table[lab].get(st["key"], {}).get("consensus_distance")) for lab in labels]))

    pv = [lab for lab in labels if lab == "pc-asgd-pv"]
    av = [lab for lab in labels if lab == "pc-asgd-av"]
    if pv or av:
        cols = [f"{lab}: predict share" for lab in pv] + [f"{lab}: mean final θ_l" for lab in av]
        lines += [
            "",
            "## Predict or clip",
            "",
            "PV: share of its choices (steps with a stale neighbour) that kept the predicting candidate.",
            "AV: θ_l of the measured neighbours at the end (1 = predict, 0 = clip), averaged over ranks.",
            "",
        ] + header(cols)
        for st in settings:
            cells = [_share(table[lab].get(st["key"], {})) for lab in pv]
            cells += [_theta(table[lab].get(st["key"], {})) for lab in av]
            lines.append(row(st, cells))

    if figures:
        lines += ["", "## Figures", ""] + [f"- [{Path(f).name}]({f})" for f in figures]
    return "\n".join(lines) + "\n"


def write_report(grid: Grid, out: Path) -> dict:
    """results.json, results.md and figures from whatever runs of the grid have finished."""
    runs, summaries = {}, {}
    for spec in grid.runs():
        run_dir = out / "runs" / spec.name
        if (run_dir / "summary.json").exists():
            runs[spec.name] = plotting.load_run(run_dir)
            summaries[spec.name] = runs[spec.name].summary
    agg = aggregate(grid, summaries)
    figures = plotting.grid_figures(grid, out, runs) if runs else []
    agg["figures"] = figures
    (out / "results.json").write_text(json.dumps(agg, indent=2) + "\n")
    (out / "results.md").write_text(render_markdown(agg, figures))
    return agg
