"""The paper's claims about PC-ASGD, accepted or rejected from the numbers of an experiment grid.

    python benchmarks/paper_checks.py DIR [DIR ...]

DIR is the --out directory of `pcasgd-mpi experiment` (it holds results.json). For each one this
writes DIR/checks.json and DIR/checks.md and prints the markdown. The questions (docs/ALGORITHM.md):

- PV against the baselines: under every delay, is the mean accuracy of pc-asgd-pv at least the best
  of dsgd, clip and predict minus that one's standard deviation over seeds?
- PV without delay: is it within PV_NO_DELAY_TOLERANCE of dsgd?
- AV's worst case: is the worst-case gap of pc-asgd-av to dsgd without delay at most AV_MAX_GAP, and
  no larger than that of every other decentralized variant?

Each answer is None when the grid cannot give it (the algorithms or the delays are missing). These
are research claims, measured, not properties of the library: the exit status is 0 whatever the
answers, and 2 when a directory cannot be read.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# `python benchmarks/paper_checks.py` puts benchmarks/ first on sys.path, not the checkout.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pcasgd_mpi.aggregation import REFERENCE_ALGORITHM, REFERENCE_DELAY  # noqa: E402
from pcasgd_mpi.grid import STALE_AWARE, Setting  # noqa: E402

PV_BASELINES = ("dsgd", "clip", "predict")
AV_MAX_GAP = 0.03
PV_NO_DELAY_TOLERANCE = 0.01


def checks(agg: dict) -> dict:
    """The fidelity questions, answered from the numbers (each None when the grid cannot answer it)."""
    table, settings = agg["table"], [Setting(s["delay"], s["partition"], s["lr"]) for s in agg["settings"]]

    def acc(label, st):
        return table.get(label, {}).get(st.key, {}).get("accuracy")

    out: dict = {"pv_vs_baselines": None, "pv_no_delay": None, "av_worst_case": None}
    if "pc-asgd-pv" in table:
        rows, no_delay = [], []
        for st in settings:
            pv = acc("pc-asgd-pv", st)
            if pv is None:
                continue
            if st.delay == REFERENCE_DELAY:
                ds = acc(REFERENCE_ALGORITHM, st)
                if ds is not None:
                    diff = pv["mean"] - ds["mean"]
                    no_delay.append(
                        {
                            "setting": st.key,
                            "pv": pv["mean"],
                            "dsgd": ds["mean"],
                            "difference": diff,
                            "holds": abs(diff) <= PV_NO_DELAY_TOLERANCE,
                        }
                    )
                continue
            base = {b: acc(b, st) for b in PV_BASELINES if acc(b, st) is not None}
            if not base:
                continue
            best = max(base, key=lambda b: base[b]["mean"])
            b = base[best]
            rows.append(
                {
                    "setting": st.key,
                    "pv": pv["mean"],
                    "pv_std": pv["std"],
                    "best": best,
                    "best_mean": b["mean"],
                    "best_std": b["std"],
                    "margin": pv["mean"] - b["mean"],
                    "holds": pv["mean"] >= b["mean"] - b["std"],
                    "holds_with_pv_std": pv["mean"] >= b["mean"] - pv["std"],
                }
            )
        if rows:
            out["pv_vs_baselines"] = {
                "rows": rows,
                "holds": all(r["holds"] for r in rows),
                "holds_with_pv_std": all(r["holds_with_pv_std"] for r in rows),
            }
        if no_delay:
            out["pv_no_delay"] = {
                "rows": no_delay,
                "holds": all(r["holds"] for r in no_delay),
                "tolerance": PV_NO_DELAY_TOLERANCE,
            }
    worst = agg["worst_gap"]
    if "pc-asgd-av" in worst:
        av = worst["pc-asgd-av"]["gap"]
        others = {
            lab: w["gap"] for lab, w in worst.items() if lab != "pc-asgd-av" and lab.partition(":")[0] in STALE_AWARE
        }
        better = sorted(lab for lab, g in others.items() if g < av)
        out["av_worst_case"] = {
            "av_gap": av,
            "av_setting": worst["pc-asgd-av"]["setting"],
            "within": av <= AV_MAX_GAP,
            "max_gap": AV_MAX_GAP,
            "others": others,
            "better_variants": better,
            "best_of_variants": not better,
        }
    return out


def _yes(flag: bool) -> str:
    return "yes" if flag else "**no**"


def render(ch: dict) -> list[str]:
    """The answers as markdown lines: yes, or a bold no, with the numbers behind each."""
    lines = []
    pv = ch.get("pv_vs_baselines")
    if pv:
        lines += [
            f"- PV mean ≥ (best of dsgd/clip/predict) − (that one's std) under every delay: "
            f"{_yes(pv['holds'])} (with PV's own std instead: {_yes(pv['holds_with_pv_std'])})",
            "",
        ]
        lines += ["  | setting | PV | best baseline | margin (pp) | holds |", "  |---|---|---|---|---|"]
        for r in pv["rows"]:
            lines.append(
                f"  | {r['setting']} | {100 * r['pv']:.1f} ± {100 * r['pv_std']:.1f} | {r['best']} "
                f"{100 * r['best_mean']:.1f} ± {100 * r['best_std']:.1f} | {100 * r['margin']:+.1f} | "
                f"{_yes(r['holds'])} |"
            )
        if any(r["pv_std"] == 0 and r["best_std"] == 0 for r in pv["rows"]):
            lines += ["", "  A spread of 0 here can mean a single seed: the check is then a plain comparison."]
        lines.append("")
    nd = ch.get("pv_no_delay")
    if nd:
        diffs = ", ".join(f"{100 * r['difference']:+.2f} pp ({r['setting']})" for r in nd["rows"])
        lines.append(f"- PV within {100 * nd['tolerance']:.0f} pp of dsgd without delay: {_yes(nd['holds'])} ({diffs})")
    av = ch.get("av_worst_case")
    if av:
        others = ", ".join(f"{lab} {100 * g:+.1f}" for lab, g in sorted(av["others"].items(), key=lambda kv: kv[1]))
        lines.append(
            f"- pc-asgd-av worst-case gap ≤ {100 * av['max_gap']:.0f} pp: {_yes(av['within'])} "
            f"({100 * av['av_gap']:+.1f} pp at {av['av_setting']})"
        )
        lines.append(
            f"- no other variant has a smaller worst-case gap: {_yes(av['best_of_variants'])} (others, pp: {others})"
        )
    return lines or ["- none of the checks applies to this grid"]


def check_dir(out: Path) -> dict:
    """Answer the questions for one results directory; writes checks.json and checks.md next to results.json."""
    path = out / "results.json"
    try:
        agg = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: not found; run `pcasgd-mpi experiment GRID.yaml --out {out}` first") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    answers = checks(agg)
    (out / "checks.json").write_text(json.dumps(answers, indent=2) + "\n")
    name = agg.get("grid", {}).get("name", out.name)
    (out / "checks.md").write_text("\n".join([f"# Checks: {name}", "", *render(answers)]) + "\n")
    return answers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", type=Path, metavar="DIR", help="results directory of an experiment")
    args = parser.parse_args(argv)
    for out in args.dirs:
        try:
            check_dir(out)
        except ValueError as exc:
            print(f"paper_checks: error: {exc}", file=sys.stderr)
            return 2
        print((out / "checks.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
