"""A dead rank costs nothing? Survivors' accuracy against a clean run, under ULFM with graph repair.

`mpirun -n 4 --with-ft ulfm pcasgd-mpi train --fault-tolerant --stop each --steps STEPS`, digits, MLP:
one rank is killed (SIGKILL) at 10 % of the run (rank 2 on a ring, the hub rank 0 on a star); the
survivors repair the graph and adopt its shard (repair.py). Compared with the same run without a
kill, for IID and dirichlet:0.3, seeds 0..2. Prints a markdown table; writes benchmarks/dead_rank.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _bench import run_meta  # noqa: E402
from pcasgd_mpi.launch import mpi_environment, mpirun_command  # noqa: E402


def run(args: list[str], out: Path, die: tuple[int, int] | None) -> dict:
    script = [str(ROOT / "tests" / "scripts" / "die_on_rank.py")] if die else ["-m", "pcasgd_mpi.cli"]
    cmd = mpirun_command(4) + [
        "--with-ft",
        "ulfm",
        sys.executable,
        *script,
        "train",
        "--no-progress",
        "--fault-tolerant",
        "--stop",
        "each",
        "--out",
        str(out),
        *args,
    ]
    env = mpi_environment({"DIE_RANK": str(die[0]), "DIE_STEP": str(die[1])} if die else {})
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    if not (out / "summary.json").exists():
        raise RuntimeError(f"{' '.join(args)}: no summary\n{proc.stderr[-3000:]}")
    return json.loads((out / "summary.json").read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", default="0,1,2")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    rows, started, load = [], time.time(), os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        for topology, victim in (("ring", 2), ("star", 0)):
            for partition in ("iid", "dirichlet:0.3"):
                for seed in seeds:
                    common = [
                        "--topology",
                        topology,
                        "--partition",
                        partition,
                        "--seed",
                        str(seed),
                        "--steps",
                        str(args.steps),
                    ]
                    tag = f"{topology}-{partition}-{seed}"
                    clean = run(common, Path(tmp) / f"clean-{tag}", None)
                    hurt = run(common, Path(tmp) / f"dead-{tag}", (victim, args.steps // 10))
                    rows.append(
                        {
                            "topology": topology,
                            "partition": partition,
                            "seed": seed,
                            "victim": victim,
                            "clean": clean["final_accuracy"],
                            "survivors": hurt["final_accuracy"],
                            "gap_pp": 100 * (clean["final_accuracy"] - hurt["final_accuracy"]),
                            "repairs": hurt.get("repairs"),
                        }
                    )
                    print(json.dumps(rows[-1]), flush=True)
    meta = run_meta(started, load)
    (ROOT / "benchmarks" / "dead_rank.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(json.dumps(meta))
    print("| topology (killed) | partition | clean (per seed) | survivors (per seed) | gap pp: mean, worst |")
    print("|---|---|---|---|---|")
    for topology, victim in (("ring", 2), ("star", 0)):
        for partition in ("iid", "dirichlet:0.3"):
            sel = [r for r in rows if r["topology"] == topology and r["partition"] == partition]
            print(
                f"| {topology} (rank {victim}) | {partition} | {', '.join(format(r['clean'], '.3f') for r in sel)} | "
                f"{', '.join(format(r['survivors'], '.3f') for r in sel)} | "
                f"{statistics.fmean(r['gap_pp'] for r in sel):+.2f}, {max(r['gap_pp'] for r in sel):+.2f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
