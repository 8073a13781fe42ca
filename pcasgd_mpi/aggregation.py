"""The numbers of a grid: mean ± std over seeds per (setting, algorithm), and gaps to the reference.

The reference of every gap is dsgd without delay at the same partition and learning rate: the
accuracy a delay costs. Questions about the paper's claims are answered from these numbers by
benchmarks/paper_checks.py, not here.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from .grid import Grid, Setting

REFERENCE_ALGORITHM, REFERENCE_DELAY = "dsgd", "none"


def _stats(values: list[float]) -> dict | None:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return None
    # Sample standard deviation (ddof = 1): the seeds are a sample of the run-to-run spread.
    std = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
    return {"mean": float(np.mean(vals)), "std": std, "n": len(vals), "values": vals}


def _pv_share(summary: dict) -> float | None:
    wins = summary.get("pv_wins") or {}
    total = wins.get("predict", 0) + wins.get("clip", 0)
    return wins.get("predict", 0) / total if total else None


def _av_theta(summary: dict) -> float | None:
    thetas = [
        t["theta"]
        for per_rank in (summary.get("av") or {}).values()
        for t in (per_rank or {}).values()
        if t and t.get("measurements")
    ]
    return float(np.mean(thetas)) if thetas else None


def aggregate(grid: Grid, summaries: dict[str, dict]) -> dict:
    """Tables as numbers: per (setting, algorithm) mean ± std over seeds, and the gaps to the reference.

    `summaries` maps run names to summary dicts; missing runs are left out of the statistics.
    """
    runs, cells = [], {}
    for spec in grid.runs():
        s = summaries.get(spec.name)
        row = {
            "name": spec.name,
            "algorithm": spec.algorithm.label,
            "delay": spec.delay,
            "partition": spec.partition,
            "lr": spec.lr,
            "seed": spec.seed,
            "finished": s is not None,
        }
        if s is not None:
            row |= {
                "final_accuracy": s.get("final_accuracy"),
                "final_test_loss": s.get("final_test_loss"),
                "consensus_distance": s.get("consensus_distance"),
                "pv_wins": s.get("pv_wins"),
                "pv_predict_share": _pv_share(s),
                "av_theta": _av_theta(s),
                "wall_time_s": s.get("wall_time_s"),
                "diverged": s.get("diverged") or {},
            }
        runs.append(row)
        cells.setdefault(spec.algorithm.label, {}).setdefault(spec.setting.key, []).append(row)

    settings = [st for st in grid.settings() if any(st.key in per for per in cells.values())]
    table: dict[str, dict[str, dict]] = {}
    for label, per_setting in cells.items():
        for key, rows in per_setting.items():
            done = [r for r in rows if r["finished"]]
            table.setdefault(label, {})[key] = {
                "accuracy": _stats([r["final_accuracy"] for r in done]),
                "consensus_distance": _stats([r["consensus_distance"] for r in done]),
                "pv_predict_share": _stats([r["pv_predict_share"] for r in done]),
                "pv_choices": sum(sum((r["pv_wins"] or {}).values()) for r in done),
                "av_theta": _stats([r["av_theta"] for r in done]),
                "runs": len(rows),
                "finished": len(done),
            }

    def mean_acc(label: str, setting: Setting) -> float | None:
        st = table.get(label, {}).get(setting.key, {}).get("accuracy")
        return st["mean"] if st else None

    reference = {}
    for st in settings:
        ref = mean_acc(REFERENCE_ALGORITHM, Setting(REFERENCE_DELAY, st.partition, st.lr))
        reference[st.key] = ref
    gaps: dict[str, dict[str, float]] = {}
    worst: dict[str, dict] = {}
    for label in table:
        for st in settings:
            acc, ref = mean_acc(label, st), reference[st.key]
            if acc is not None and ref is not None:
                gaps.setdefault(label, {})[st.key] = ref - acc
        if gaps.get(label):
            key, gap = max(gaps[label].items(), key=lambda kv: kv[1])
            worst[label] = {"gap": gap, "setting": key}
    labels = [a.label for a in grid.algorithms if a.label in table]
    return {
        "grid": grid.describe(),
        "algorithms": labels,
        "settings": [dataclasses.asdict(st) | {"key": st.key} for st in settings],
        "reference": {"algorithm": REFERENCE_ALGORITHM, "delay": REFERENCE_DELAY, "accuracy": reference},
        "table": table,
        "gaps": gaps,
        "worst_gap": worst,
        "runs": runs,
    }
