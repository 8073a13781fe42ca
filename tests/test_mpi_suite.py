"""Runs the pytest-mpi tests in tests/mpi under `mpirun -n 4` and checks every rank's outcome."""

import json
import sys

import pytest

from launch import ROOT, mpirun_prefix, run

pytestmark = pytest.mark.mpi
RANKS = 4


def test_pytest_mpi_suite_passes_on_every_rank(tmp_path):
    cmd = mpirun_prefix(RANKS) + [
        sys.executable,
        "-m",
        "pytest",
        "--with-mpi",
        "-q",
        "-p",
        "no:cacheprovider",
        "--timeout",
        "120",
        str(ROOT / "tests" / "mpi"),
    ]
    proc = run(cmd, timeout=600, env={"PCASGD_TEST_REPORT_DIR": str(tmp_path)})
    log = f"--- stdout\n{proc.stdout[-20000:]}\n--- stderr\n{proc.stderr[-10000:]}"
    assert proc.returncode == 0, log
    reports = {p.name: json.loads(p.read_text()) for p in tmp_path.glob("rank-*.json")}
    assert sorted(reports) == [f"rank-{r}.json" for r in range(RANKS)], log
    for name, rep in reports.items():
        outcomes = rep["outcomes"]
        assert outcomes.get("passed", 0) >= 8, (name, outcomes, log)
        assert set(outcomes) == {"passed"}, (name, outcomes, log)
    print({name: rep["outcomes"] for name, rep in sorted(reports.items())})
