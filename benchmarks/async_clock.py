"""Async mode with a slow rank and with slow links: is every rank kept in the mix, and does it pay?

Every run is the command line users run (`mpirun -n 4 pcasgd-mpi train ...`, ring, digits, MLP):

S  straggler: rank 3 is 4x slower (`--straggler 3:4`). Reference: lockstep dsgd without a straggler,
   400 steps: accuracy A_ref and wall time W_ref. Then async runs with the straggler that stop all
   ranks together after 0.6 x W_ref (`--duration`): pc-asgd-av and dsgd with `--balance mix` (the
   default in async mode) and `none`, pc-asgd-av with `--balance lr`, pc-asgd-pv with `mix`.
   Beside them, what the time budget costs by itself and what the straggler costs: pc-asgd-av
   without the straggler in 0.6 x W_ref, with it in 1.0 x W_ref, and the reference stopped at 0.6
   of its steps. Reported: accuracy gap to A_ref, and how often the fast neighbours of the
   straggler (ranks 0, 2) had its copy past the horizon or nothing from it yet (dropped).
L  slow links: `--link-delay 0,2:MS` with MS about 6 step times, async, 400 steps (stop first):
   pc-asgd-av against dsgd (both with the default `--balance`), and the staleness the receivers
   saw of ranks 0 and 2, in their steps.
M  momentum 0.9, slow links as in L, pc-asgd-av: AV's measured prediction error E_P with
   `--slope update` against `--slope gradient`, and against the clipping error E_C (and the
   other slopes, velocity, own and drift, beside them).
Each for IID and dirichlet:0.3 (S), Dirichlet (L), seeds 0..2. Prints a markdown report and
writes the rows to benchmarks/async_clock.json (`--json`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SLOPES = ("update", "gradient", "velocity", "own", "drift")
sys.path.insert(0, str(ROOT))

from _bench import run_meta  # noqa: E402
from pcasgd_mpi.launch import LAUNCHER_DID_NOT_START, mpi_environment, run_captured, train_command  # noqa: E402

RANKS = 4


def train(args: list[str], out: Path, timeout: float = 900) -> dict:
    cmd = train_command(RANKS, ["--out", str(out), *args])
    for _ in range(2):  # once more when the launcher itself did not start
        proc, timed_out = run_captured(cmd, timeout, env=mpi_environment(), cwd=ROOT)
        if timed_out:
            raise RuntimeError(f"{' '.join(args)} timed out after {timeout:.0f} s:\n{proc.stderr[-3000:]}")
        if proc.returncode == 0 or LAUNCHER_DID_NOT_START not in proc.stderr:
            break
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads((out / "summary.json").read_text())


def staleness_seen(summary: dict, receivers: list[str], senders: list[str]) -> dict:
    """Mean and median staleness (in the senders' steps) of the senders' copies at their neighbours."""
    values = []
    for r in receivers:
        for s, hist in summary["staleness_histogram"][r].items():
            if s in senders:
                values += [int(t) for t, c in hist.items() if t != "never" for _ in range(c)]
    return {"mean": statistics.fmean(values), "median": statistics.median(values)} if values else {}


def dropped(summary: dict, receivers: list[str], sender: str) -> float:
    return max(summary["beyond_horizon"][r][sender] for r in receivers)


def dropped_parts(summary: dict, receivers: list[str], sender: str, horizon: int = 16) -> tuple[float, float]:
    """The largest shares of the receivers' steps with nothing from the sender yet, and with its copy
    past the horizon (the two kinds of drop that `dropped` adds up)."""
    never, past = [], []
    for r in receivers:
        hist = summary["staleness_histogram"][r][sender]
        total = sum(hist.values())
        never.append(hist.get("never", 0) / total)
        past.append(sum(c for t, c in hist.items() if t != "never" and int(t) > horizon) / total)
    return max(never), max(past)


def av_errors(summary: dict) -> tuple[float, float]:
    e_p = [v["e_p"] for per in summary["av"].values() for v in per.values() if v["e_p"] is not None]
    e_c = [v["e_c"] for per in summary["av"].values() for v in per.values() if v["e_c"] is not None]
    return statistics.fmean(e_p), statistics.fmean(e_c)


def part_s(tmp: Path, seeds: list[int], steps: int) -> list[dict]:
    rows = []
    for partition in ("iid", "dirichlet:0.3"):
        for seed in seeds:
            common = ["--partition", partition, "--seed", str(seed)]
            ref = train(
                [*common, "--mode", "lockstep", "--algorithm", "dsgd", "--steps", str(steps)],
                tmp / f"ref-{partition}-{seed}",
            )

            def run_async(algo: str, balance: str, share: float = 0.6, straggler: bool = True) -> list[str]:
                # all ranks stop together after `share` x W_ref
                slow = ["--straggler", "3:4"] if straggler else []
                duration = f"{share * ref['wall_time_s']:.3f}"
                return ["--algorithm", algo, *slow, "--duration", duration, "--balance", balance]

            for label, args in (
                ("pc-asgd-av --balance mix", run_async("pc-asgd-av", "mix")),
                ("pc-asgd-av --balance none", run_async("pc-asgd-av", "none")),
                ("pc-asgd-av --balance lr", run_async("pc-asgd-av", "lr")),
                ("pc-asgd-pv --balance mix", run_async("pc-asgd-pv", "mix")),
                ("dsgd --balance mix", run_async("dsgd", "mix")),
                ("dsgd --balance none", run_async("dsgd", "none")),
                # what the time budget costs by itself, and what the straggler costs in W_ref
                ("pc-asgd-av --balance mix, no straggler", run_async("pc-asgd-av", "mix", straggler=False)),
                ("pc-asgd-av --balance mix, for 1.0 x W_ref", run_async("pc-asgd-av", "mix", share=1.0)),
                (
                    "lockstep dsgd, no straggler, 0.6 x the steps",
                    ["--algorithm", "dsgd", "--mode", "lockstep", "--steps", str(steps * 3 // 5)],
                ),
            ):
                s = train([*common, *args], tmp / f"s-{label.replace(' ', '').replace(',', '')}-{partition}-{seed}")
                rows.append(
                    {
                        "part": "S",
                        "partition": partition,
                        "seed": seed,
                        "algorithm": label,
                        "reference_accuracy": ref["final_accuracy"],
                        "reference_wall_s": ref["wall_time_s"],
                        "accuracy": s["final_accuracy"],
                        "wall_s": s["wall_time_s"],
                        "gap_pp": 100 * (ref["final_accuracy"] - s["final_accuracy"]),
                        "steps": s["steps"],
                        "straggler_dropped": dropped(s, ["0", "2"], "3"),
                        "straggler_never_past": dropped_parts(s, ["0", "2"], "3"),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    return rows


def part_l_m(tmp: Path, seeds: list[int], steps: int) -> list[dict]:
    rows = []
    for seed in seeds:
        base = ["--partition", "dirichlet:0.3", "--seed", str(seed), "--steps", str(steps)]
        probe = train([*base, "--algorithm", "dsgd", "--steps", "100"], tmp / f"probe-{seed}")
        step_ms = 1000.0 / statistics.median(probe["steps_per_second"])
        ms = round(6 * step_ms, 1)
        delay = ["--link-delay", f"0,2:{ms}"]
        for algo in ("pc-asgd-av", "dsgd"):
            s = train([*base, "--algorithm", algo, *delay], tmp / f"l-{algo}-{seed}")
            rows.append(
                {
                    "part": "L",
                    "seed": seed,
                    "algorithm": algo,
                    "link_delay_ms": ms,
                    "step_ms": step_ms,
                    "accuracy": s["final_accuracy"],
                    "staleness_of_delayed": staleness_seen(s, ["1", "3"], ["0", "2"]),
                    "staleness_of_others": staleness_seen(s, ["0", "2"], ["1", "3"]),
                    # the delay in the delayed ranks' own steps, from their step rate in this run
                    "expected_tau": ms / 1000 * statistics.fmean(s["steps_per_second"][r] for r in (0, 2)),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
        for slope in SLOPES:
            s = train(
                [*base, "--algorithm", "pc-asgd-av", "--momentum", "0.9", "--lr", "0.02", "--slope", slope, *delay],
                tmp / f"m-{slope}-{seed}",
            )
            e_p, e_c = av_errors(s)
            rows.append(
                {"part": "M", "seed": seed, "slope": slope, "e_p": e_p, "e_c": e_c, "accuracy": s["final_accuracy"]}
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def report(rows: list[dict]) -> str:
    lines = []
    s_rows = [r for r in rows if r["part"] == "S"]
    if s_rows:
        lines += [
            "| partition | algorithm | gap to lockstep dsgd without straggler, pp (per seed) | wall / W_ref "
            "| straggler dropped by ranks 0, 2 (max share) | of which: nothing received yet / past the horizon |",
            "|---|---|---|---|---|---|",
        ]
        keys = sorted({(r["partition"], r["algorithm"]) for r in s_rows})
        for part, algo in keys:
            sel = [r for r in s_rows if r["partition"] == part and r["algorithm"] == algo]
            gaps = ", ".join(f"{r['gap_pp']:+.1f}" for r in sel)
            mean_gap = statistics.fmean(r["gap_pp"] for r in sel)
            ratio = statistics.fmean(r["wall_s"] / r["reference_wall_s"] for r in sel)
            drop = max(r["straggler_dropped"] for r in sel)
            never = max(r["straggler_never_past"][0] for r in sel)
            past = max(r["straggler_never_past"][1] for r in sel)
            lines.append(
                f"| {part} | {algo} | mean {mean_gap:+.1f} ({gaps}) | {ratio:.2f} | {100 * drop:.1f} % "
                f"| {100 * never:.1f} % / {100 * past:.1f} % |"
            )
    l_rows = [r for r in rows if r["part"] == "L"]
    if l_rows:
        lines += [
            "",
            "| algorithm | accuracy (per seed) | link delay ms (step ms) | staleness of ranks 0, 2 at "
            "their neighbours: mean / median | expected from their step rate | of ranks 1, 3 |",
            "|---|---|---|---|---|---|",
        ]
        for algo in ("pc-asgd-av", "dsgd"):
            sel = [r for r in l_rows if r["algorithm"] == algo]
            accs = ", ".join(f"{r['accuracy']:.3f}" for r in sel)
            delays = ", ".join(f"{r['link_delay_ms']:g} ({r['step_ms']:.1f})" for r in sel)
            st = ", ".join(
                f"{r['staleness_of_delayed'].get('mean', 0):.1f} / {r['staleness_of_delayed'].get('median', 0):g}"
                for r in sel
            )
            ot = ", ".join(f"{r['staleness_of_others'].get('mean', 0):.1f}" for r in sel)
            ex = ", ".join(f"{r['expected_tau']:.1f}" for r in sel)
            lines.append(
                f"| {algo} | mean {statistics.fmean(r['accuracy'] for r in sel):.3f} ({accs}) | {delays} "
                f"| {st} | {ex} | {ot} |"
            )
    m_rows = [r for r in rows if r["part"] == "M"]
    if m_rows:
        lines += ["", "| slope | E_P (per seed) | E_C (per seed) | accuracy |", "|---|---|---|---|"]
        for slope in SLOPES:
            sel = [r for r in m_rows if r["slope"] == slope]
            lines.append(
                f"| {slope} | {', '.join(format(r['e_p'], '.4f') for r in sel)} | "
                f"{', '.join(format(r['e_c'], '.4f') for r in sel)} | "
                f"{', '.join(format(r['accuracy'], '.3f') for r in sel)} |"
            )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="S,L", help="S (straggler) and/or L (slow links, with M)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "async_clock.json"), help="where the rows go")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    started, load = time.time(), os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if "S" in args.parts:
            rows += part_s(Path(tmp), seeds, args.steps)
        if "L" in args.parts:
            rows += part_l_m(Path(tmp), seeds, args.steps)
    meta = run_meta(started, load)
    Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(json.dumps(meta))
    print(report(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
