"""The command line end to end: the README's default run under mpirun, bad input, topology show."""

import json
import subprocess
import sys

import pytest

from launch import ROOT, train


def test_default_training_run_reaches_090_on_digits(tmp_path):
    proc = train(4, ["--out", str(tmp_path)], timeout=240)
    assert proc.returncode == 0, proc.stderr[-5000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["algorithm"] == "pc-asgd-pv" and summary["mode"] == "async"
    assert summary["world_size"] == 4 and summary["topology"] == "ring"
    assert summary["final_accuracy"] >= 0.90, summary
    assert len(summary["agent_accuracies"]) == 4 and len(summary["steps_per_second"]) == 4
    assert set(summary["pv_wins"]) == {"predict", "clip"}
    assert len(summary["model_sha256"]) == 64
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {l["rank"] for l in lines} == {0, 1, 2, 3}
    assert all("loss" in l and "staleness" in l for l in lines)
    assert "final test accuracy of the average model" in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["--algorithm", "sgd"], "invalid choice: 'sgd'"),
    (["--theta", "1.5"], "theta must be in [0, 1]"),
    (["--lr", "0"], "must be > 0"),
    (["--tolerance", "5", "--horizon", "2"], "tolerance (5) must not exceed horizon (2)"),
    (["--mode", "lockstep", "--delay", "fixed:x"], "TAU must be a whole number"),
    (["--straggler", "2"], "is not RANK:FACTOR"),
    (["--topology", "topologies/torus-16.edgelist"], "16 nodes but the job has 2 ranks"),
    (["--topology", "hypercube"], "unknown topology"),
    (["--dataset", "mnist"], "--data-dir"),
])
def test_bad_input_is_one_clear_line_and_a_nonzero_exit(tmp_path, args, message):
    out = tmp_path / "run"
    proc = train(2, ["--out", str(out), "--steps", "5", *args], timeout=120)
    assert proc.returncode != 0
    ours = [l for l in proc.stderr.splitlines() if l.startswith("pcasgd-mpi")]
    assert len(ours) == 1, proc.stderr
    assert message in ours[0], ours[0]
    assert "Traceback" not in proc.stderr
    assert not (out / "summary.json").exists()


def test_topology_show_prints_matrix_and_gap(tmp_path):
    png = tmp_path / "g.png"
    proc = subprocess.run([sys.executable, "-m", "pcasgd_mpi.cli", "topology", "show", "ring", "-n", "6",
                           "--png", str(png)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "spectral gap" in proc.stdout.lower()
    assert png.stat().st_size > 1000
