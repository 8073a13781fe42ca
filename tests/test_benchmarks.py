"""Smoke test of the benchmark driver: `benchmarks/run.py --quick` runs every part and reports numbers.

The speed targets are not asserted: they are measurements on a shared, noisy machine.
"""

import json
import math
import subprocess
import sys

from launch import ROOT, run


def test_quick_benchmark_run_writes_every_part(tmp_path):
    out = tmp_path / "results.json"
    proc = run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--json", str(out)], timeout=600)
    log = f"--- stdout\n{proc.stdout[-5000:]}\n--- stderr\n{proc.stderr[-5000:]}"
    assert proc.returncode == 0, log
    result = json.loads(out.read_text())
    assert result["errors"] == {}, log
    assert set(result["parts"]) >= {"P1", "P2", "P3", "P4", "A"}, log
    for part in ("P1", "P2", "P3", "P4"):
        ratio = result["parts"][part]["ratio"]
        assert isinstance(ratio, float) and math.isfinite(ratio) and ratio > 0, (part, ratio)
    assert math.isfinite(result["parts"]["P3"]["ratio_ddp"])
    statuses = {row["goal"]: row["status"] for row in result["table"]}
    assert len(statuses) == 6 and set(statuses.values()) <= {"PASS", "FAIL"}, statuses
    for row in result["table"]:
        assert row["goal"] in proc.stdout


def test_unknown_part_is_refused():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--parts", "P9"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown parts" in proc.stderr
