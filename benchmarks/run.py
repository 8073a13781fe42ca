"""Run every benchmark part under mpirun, print the goal table and write the results as JSON.

    python benchmarks/run.py [--quick] [--json OUT.json] [--parts P1,P3]

Each part is its own script started under mpirun with a hard timeout (the whole process group is
killed when it passes); the part prints one `BENCH_JSON {...}` line, collected here. The exit
status is 0 when every part produced its result, whether or not it met its target: the targets
are measurements on a shared machine, not assertions.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the checkout's package, not an installed copy elsewhere

from pcasgd_mpi.launch import mpi_environment, mpirun_command, run_captured  # noqa: E402

MARKER = "BENCH_JSON "


@dataclass
class Part:
    name: str
    script: str
    ranks: int
    timeout: float  # seconds, full run; --quick uses a third of it
    what: str


PARTS = [
    # Timeouts allow for a load average of 20 on 2 cores, where start-up alone takes tens of seconds.
    Part("P1", "p1_exchange.py", 2, 240, "16 MiB model through Exchange vs bare mpi4py, bandwidth ratio"),
    Part("P2", "p2_overlap.py", 2, 480, "async step time vs communication off, 331 k-param MLP"),
    Part("P3", "p3_straggler.py", 4, 600, "straggler 0:4, fast ranks' steps/s; and A, accuracy"),
    Part("P4", "p4_rule.py", 1, 240, "PC-ASGD-PV update vs torch SGD step, ResNet-20 params"),
]


@dataclass
class Goal:
    part: str  # the BENCH_JSON record it reads
    key: str
    label: str
    target: str
    check: object  # callable(value) -> bool


GOALS = [
    Goal("P1", "ratio", "P1 exchange bandwidth / bare mpi4py", ">= 0.80", lambda v: v >= 0.80),
    Goal("P2", "ratio", "P2 async step time / compute only", "<= 1.10", lambda v: v <= 1.10),
    Goal("P3", "ratio", "P3 fast ranks steps/s: async / lockstep", ">= 3", lambda v: v >= 3.0),
    Goal("P3", "ratio_ddp", "P3 fast ranks steps/s: async / torch DDP", ">= 3", lambda v: v >= 3.0),
    Goal("P4", "ratio", "P4 PV update time / SGD step time", "<= 1.2", lambda v: v <= 1.2),
    Goal("A", "ratio", "A  time to ref. accuracy - 1 pp / ref. wall", "< 1", lambda v: v < 1.0),
]


def mpirun(ranks: int) -> list[str]:
    try:
        return mpirun_command(ranks)
    except RuntimeError as exc:
        raise SystemExit(str(exc)) from None


def environment() -> dict:
    return mpi_environment({"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))})


def run_part(part: Part, quick: bool) -> tuple[list[dict], str | None, float]:
    cmd = mpirun(part.ranks) + [sys.executable, str(HERE / part.script)] + (["--quick"] if quick else [])
    timeout = part.timeout / 3 if quick else part.timeout
    t0 = time.monotonic()
    proc, timed_out = run_captured(cmd, timeout, env=environment(), cwd=ROOT)
    out, err = proc.stdout, proc.stderr
    if timed_out:
        return [], f"timed out after {timeout:.0f} s\n{err[-2000:]}", time.monotonic() - t0
    records = [json.loads(line[len(MARKER) :]) for line in out.splitlines() if line.startswith(MARKER)]
    error = None
    if proc.returncode != 0 or not records:
        error = f"exit status {proc.returncode}, {len(records)} result lines\n{err[-3000:]}{out[-1000:]}"
    return records, error, time.monotonic() - t0


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {"python": platform.python_version()}
    for module in ("torch", "mpi4py", "numpy"):
        try:
            versions[module] = __import__(module).__version__
        except ImportError:
            versions[module] = None
    try:
        first = subprocess.run(mpirun(1)[:1] + ["--version"], capture_output=True, text=True, timeout=30).stdout
        versions["mpirun"] = first.splitlines()[0].strip() if first else None
    except (OSError, subprocess.TimeoutExpired):
        versions["mpirun"] = None
    return {"cores": os.cpu_count(), "cpu": cpu, "platform": platform.platform(), "versions": versions}


def fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def spread_text(spread: dict | None) -> str:
    """'median of N pairs, quartiles q1-q3, range min-max' in short; empty for a single measurement."""
    if spread is None:
        return ""
    return (
        f"{spread['pairs']} pairs, IQR {spread['q1']:.3f}-{spread['q3']:.3f}, "
        f"range {spread['min']:.3f}-{spread['max']:.3f}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs (about a minute in all), for smoke tests")
    parser.add_argument("--json", default=str(HERE / "results.json"), help="where to write the results")
    parser.add_argument(
        "--parts",
        default=",".join(p.name for p in PARTS),
        help="comma-separated subset of " + ",".join(p.name for p in PARTS),
    )
    args = parser.parse_args()
    wanted = {p.strip() for p in args.parts.split(",") if p.strip()}
    unknown = wanted - {p.name for p in PARTS}
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}")

    started = datetime.datetime.now(datetime.timezone.utc)
    results: dict[str, dict] = {}
    errors: dict[str, str] = {}
    durations: dict[str, float] = {}
    load_before = list(os.getloadavg())
    for part in PARTS:
        if part.name not in wanted:
            continue
        print(f"[{part.name}] {part.what} ({part.ranks} rank{'s' if part.ranks > 1 else ''}) ...", flush=True)
        records, error, seconds = run_part(part, args.quick)
        durations[part.name] = round(seconds, 1)
        for rec in records:
            results[rec["part"]] = rec
        if error:
            errors[part.name] = error
            print(f"[{part.name}] FAILED TO RUN: {error}", file=sys.stderr, flush=True)
        else:
            print(f"[{part.name}] done in {seconds:.1f} s", flush=True)

    rows = []
    for goal in GOALS:
        script_part = "P3" if goal.part == "A" else goal.part
        if script_part not in wanted:
            continue
        record = results.get(goal.part)
        value = None if record is None else record.get(goal.key)
        # A goal without a value is an error unless its part ran and found nothing (A: never reached).
        status = "ERROR" if record is None else "FAIL" if value is None else "PASS" if goal.check(value) else "FAIL"
        # A goal timed in interleaved pairs: its value is the median ratio, judged as such.
        pairs = record.get("pairs") if record is not None and goal.key == "ratio" else None
        rows.append(
            {
                "goal": goal.label,
                "measured": value,
                "target": goal.target,
                "status": status,
                "spread": None if pairs is None else {k: pairs[k] for k in ("q1", "q3", "min", "max", "pairs")},
            }
        )

    width = max(len(r["goal"]) for r in rows) if rows else 10
    print()
    print(f"{'goal':<{width}}  {'measured':>9}  {'target':>8}  status  spread over pairs")
    for r in rows:
        print(
            f"{r['goal']:<{width}}  {fmt(r['measured']):>9}  {r['target']:>8}  {r['status']:<6}  "
            f"{spread_text(r['spread'])}"
        )
    out = {
        "date_utc": started.isoformat(timespec="seconds"),
        "command": " ".join(["python", "benchmarks/run.py"] + sys.argv[1:]),
        "quick": args.quick,
        "machine": machine(),
        "load_average_before": load_before,
        "load_average_after": list(os.getloadavg()),
        "seconds_per_part": durations,
        "table": rows,
        "parts": results,
        "errors": errors,
    }
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nresults written to {path}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
