"""The command line end to end: the README's default run under mpirun, bad input, topology show."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from launch import ROOT, train


@pytest.mark.mpi
def test_default_training_run_learns_and_reports_on_digits(tmp_path):
    proc = train(4, ["--out", str(tmp_path)], timeout=240)
    assert proc.returncode == 0, proc.stderr[-5000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["algorithm"] == "pc-asgd-pv" and summary["mode"] == "async"
    assert summary["world_size"] == 4 and summary["topology"] == "ring"
    # Async accuracy depends on timing (about 0.95 on an idle machine); far above chance (0.10) it must be.
    assert summary["final_accuracy"] >= 0.5, summary
    assert len(summary["agent_accuracies"]) == 4 and len(summary["steps_per_second"]) == 4
    assert set(summary["pv_wins"]) == {"predict", "clip"}
    assert len(summary["model_sha256"]) == 64
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {l["rank"] for l in lines} == {0, 1, 2, 3}
    assert all("loss" in l and "staleness" in l for l in lines)
    assert "final test accuracy of the average model" in proc.stdout


@pytest.mark.mpi
@pytest.mark.parametrize(
    "args, message",
    [
        (["--algorithm", "sgd"], "argument --algorithm: must be one of dsgd, clip"),
        (["--theta", "1.5"], "argument --theta: must be a finite number in [0, 1], got '1.5'"),
        (["--lr", "0"], "argument --lr: must be a finite number > 0, got '0'"),
        (["--lr", "inf"], "argument --lr: must be a finite number > 0, got 'inf'"),
        (["--momentum", "nan"], "argument --momentum: must be a finite number >= 0, got 'nan'"),
        (["--threads", "0"], "argument --threads: must be a whole number >= 1"),
        (["--keep-checkpoints", "0"], "argument --keep-checkpoints: must be a whole number >= 1"),
        (["--straggler", "1:inf"], "FACTOR a finite number >= 1"),
        (
            ["--batch-size", "1000"],
            "--batch-size 1000 is larger than rank 0's shard of 719 samples; use --batch-size 719",
        ),
        (["--tolerance", "5", "--horizon", "2"], "tolerance (5) must not exceed horizon (2)"),
        (["--mode", "lockstep", "--delay", "fixed:x"], "TAU must be a whole number"),
        (["--straggler", "2"], "is not RANK:FACTOR"),
        (["--topology", "topologies/torus-16.edgelist"], "16 nodes but the job has 2 ranks"),
        (["--topology", "hypercube"], "unknown topology"),
        (["--topology", "."], "is a directory"),
        (["--dataset", "mnist"], "--data-dir"),
    ],
)
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
    proc = subprocess.run(
        [sys.executable, "-m", "pcasgd_mpi.cli", "topology", "show", "ring", "-n", "6", "--png", str(png)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    assert "spectral gap" in proc.stdout.lower()
    assert png.stat().st_size > 1000


def one_error_line(proc) -> str:
    assert proc.returncode != 0, proc.stdout + proc.stderr
    ours = [l for l in proc.stderr.splitlines() if l.startswith("pcasgd-mpi")]
    assert len(ours) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return ours[0]


@pytest.mark.mpi
def test_effective_config_repeats_the_run_and_a_finished_run_is_not_overwritten(tmp_path):
    out, again = tmp_path / "run", tmp_path / "again"
    quick = ["--steps", "6", "--mode", "lockstep", "--batch-size", "16"]
    proc = train(2, ["--out", str(out), *quick], timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["steps"] == 6 and saved["tolerance"] == 0 and saved["epochs"] is None
    assert saved["algorithm"] == "pc-asgd-pv" and "out" not in saved and (out / ".pcasgd-run").is_file()

    line = one_error_line(train(2, ["--out", str(out), *quick], timeout=240))
    assert f"--out {out} already holds a finished run; choose another --out or pass --overwrite" in line

    proc = train(2, ["--config", str(out / "config.yaml"), "--out", str(again)], timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, second = (json.loads((d / "summary.json").read_text()) for d in (out, again))
    assert first["model_sha256"] == second["model_sha256"]
    assert yaml.safe_load((again / "config.yaml").read_text()) == saved


@pytest.mark.mpi
def test_out_holding_the_users_files_is_refused_untouched(tmp_path):
    out = tmp_path / "mine"
    (out / "metrics").mkdir(parents=True)
    (out / "metrics" / "rank-0.jsonl").write_text("mine\n")
    (out / "config.yaml").write_text("mine\n")
    line = one_error_line(train(2, ["--out", str(out), "--steps", "3", "--overwrite"], timeout=240))
    assert f"--out {out} holds files that pcasgd-mpi did not write; choose another --out or empty it" in line
    assert (out / "config.yaml").read_text() == "mine\n"
    assert (out / "metrics" / "rank-0.jsonl").read_text() == "mine\n"


@pytest.mark.mpi
def test_interrupted_run_needs_resume_and_a_file_as_out_is_one_line(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints" / "rank-0").mkdir(parents=True)
    (out / ".pcasgd-run").write_text("{}\n")
    (out / "checkpoints" / "rank-0" / "step-000000003.pt").write_bytes(b"x")
    line = one_error_line(train(2, ["--out", str(out), "--steps", "3"], timeout=240))
    assert "holds an interrupted run: pass --resume to continue it or --overwrite to start afresh" in line
    afile = tmp_path / "file"
    afile.write_text("x")
    line = one_error_line(train(2, ["--out", str(afile), "--steps", "3"], timeout=240))
    assert f"--out {afile} is a file, not a directory" in line
    line = one_error_line(
        train(2, ["--out", str(tmp_path / "ok"), "--checkpoint-dir", str(afile / "c"), "--steps", "3"], timeout=240)
    )
    assert f"--checkpoint-dir {afile}/c cannot be written" in line


def test_train_without_a_launcher_says_it_runs_one_agent(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_", "PMI_", "SLURM_"))}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pcasgd_mpi.cli",
            "train",
            "--no-progress",
            "--steps",
            "3",
            "--out",
            str(tmp_path / "one"),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    notes = [l for l in proc.stderr.splitlines() if "no MPI launcher found" in l]
    assert notes == ["pcasgd-mpi: running 1 agent (no MPI launcher found); launch with mpirun -n N ... for N agents"]
    assert json.loads((tmp_path / "one" / "summary.json").read_text())["world_size"] == 1
