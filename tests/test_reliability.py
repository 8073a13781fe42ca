"""Checkpoints, resume, preemption signals, rejected checkpoints, and no hang when a rank fails."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from launch import ROOT, mpirun_prefix, run, start_until, train, train_command
from pcasgd_mpi import checkpoint

LOCKSTEP = ["--mode", "lockstep", "--algorithm", "pc-asgd-pv", "--delay", "random:0.5:3", "--steps", "60"]


def _summary(out):
    return json.loads((out / "summary.json").read_text())


# ------------------------------------------------------------------ checkpoint files (one process)


def test_save_is_atomic_keeps_last_k_and_load_checks_identity(tmp_path):
    for step in (10, 20, 30, 40):
        checkpoint.save(tmp_path, 1, step, {"world_size": 4, "x": torch.arange(3.0) + step}, keep=2)
    assert checkpoint.steps_available(tmp_path, 1) == [30, 40]
    assert not [p for p in (tmp_path / "rank-1").iterdir() if p.name.startswith(".")], "no temp files left"
    state = checkpoint.load(tmp_path, 1, 40, {"world_size": 4, "rank": 1})
    assert torch.equal(state["x"], torch.arange(3.0) + 40)
    with pytest.raises(checkpoint.CheckpointError, match="different world size"):
        checkpoint.load(tmp_path, 1, 40, {"world_size": 8})
    path = checkpoint.path_for(tmp_path, 1, 40)
    path.write_bytes(path.read_bytes()[:50])  # truncated, as a crash mid-copy would leave it
    with pytest.raises(checkpoint.CheckpointError, match=str(path)):
        checkpoint.load(tmp_path, 1, 40, {})


def test_a_checkpoint_holding_arbitrary_objects_is_refused(tmp_path):
    path = checkpoint.path_for(tmp_path, 0, 5)
    path.parent.mkdir(parents=True)
    torch.save({"format": checkpoint.FORMAT, "evil": subprocess.Popen}, path)
    with pytest.raises(checkpoint.CheckpointError, match="cannot be read"):
        checkpoint.load(tmp_path, 0, 5, {})


# ------------------------------------------------------------------------- under mpirun


@pytest.mark.mpi
@pytest.mark.parametrize(
    "rule",
    [[], ["--algorithm", "pc-asgd-av", "--slope", "own"], ["--algorithm", "pc-asgd-av", "--slope", "drift"]],
    ids=["pv", "av-own", "av-drift"],  # AV's records, the own-step trail and the drift are restored too
)
def test_killed_run_resumes_to_the_identical_model(tmp_path, rule):
    setting = [*LOCKSTEP, *rule]
    whole = tmp_path / "whole"
    assert train(4, [*setting, "--out", str(whole)]).returncode == 0
    out = tmp_path / "killed"
    # The straggler only sleeps, so it slows the run down enough to kill it midway without changing it.
    cmd = train_command(4, [*setting, "--out", str(out), "--checkpoint-every", "10", "--straggler", "0:30"])
    proc = start_until(
        cmd, lambda _: all(20 in checkpoint.steps_available(out / "checkpoints", r) for r in range(4)), 120
    )
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert not (out / "summary.json").exists()
    resumed = train(4, [*setting, "--out", str(out), "--checkpoint-every", "10", "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _summary(out)["model_sha256"] == _summary(whole)["model_sha256"]
    steps = [json.loads(l)["step"] for l in (out / "metrics" / "rank-0.jsonl").read_text().splitlines()]
    assert steps == list(range(60)), "metrics of a resumed run hold every step exactly once"


@pytest.mark.mpi
def test_sigusr1_checkpoints_every_rank_and_exits_cleanly(tmp_path):
    out = tmp_path / "run"
    args = ["--mode", "lockstep", "--steps", "100000", "--out", str(out), "--straggler", "1:5"]
    cmd = train_command(4, args)
    metrics = out / "metrics" / "rank-0.jsonl"
    proc = start_until(cmd, lambda _: metrics.exists() and metrics.stat().st_size >= 2000, 90)
    try:
        proc.send_signal(signal.SIGUSR1)  # mpirun forwards it to every rank
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err
    assert "continue with --resume" in err
    steps = [checkpoint.steps_available(out / "checkpoints", r) for r in range(4)]
    assert all(s and s[-1] == steps[0][-1] for s in steps), steps
    assert not (out / "summary.json").exists()


@pytest.mark.mpi
def test_resume_rejects_a_checkpoint_of_another_model_and_a_corrupt_one(tmp_path):
    out = tmp_path / "run"
    base = ["--mode", "lockstep", "--steps", "20", "--out", str(out), "--checkpoint-every", "10"]
    assert train(2, base).returncode == 0
    other = train(2, [*base, "--model", "cnn", "--resume", "--steps", "30"])
    assert other.returncode != 0
    assert "different signature" in other.stderr and "rank-0" in other.stderr
    newest = checkpoint.path_for(out / "checkpoints", 1, 20)
    newest.write_bytes(b"not a checkpoint")
    corrupt = train(2, [*base, "--resume", "--steps", "30"])
    assert corrupt.returncode != 0
    assert f"{newest} cannot be read" in corrupt.stderr
    assert "Traceback" not in corrupt.stderr


@pytest.mark.mpi
def test_an_exception_on_one_rank_ends_the_whole_job(tmp_path):
    # The others wait on rank 2 with a 300 s deadline, longer than run()'s 240 s limit: only the abort
    # can end the job in time, and the others must not have reached their own deadline.
    cmd = mpirun_prefix(4) + [
        sys.executable,
        str(ROOT / "tests" / "scripts" / "fail_on_rank.py"),
        "train",
        "--no-progress",
        "--mode",
        "lockstep",
        "--steps",
        "100000",
        "--timeout",
        "300",
        "--out",
        str(tmp_path / "run"),
    ]
    proc = run(cmd, timeout=240, env={"FAIL_RANK": "2", "FAIL_STEP": "30"})
    assert proc.returncode != 0
    # mpirun forwards the ranks' output in chunks, so the line may run into Open MPI's abort banner.
    assert "pcasgd-mpi [rank 2]: error: RuntimeError: injected failure at step 30" in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.count("pcasgd-mpi [rank") == 1, proc.stderr[-3000:]
    assert "MPI_ABORT" in proc.stderr, proc.stderr[-3000:]


ULFM = ["--with-ft", "ulfm"]


def _die_on_rank_2(out, extra_mpirun=(), extra=()):
    cmd = mpirun_prefix(4) + [
        *extra_mpirun,
        sys.executable,
        str(ROOT / "tests" / "scripts" / "die_on_rank.py"),
        "train",
        "--no-progress",
        "--steps",
        "800",
        "--stop",
        "each",
        "--out",
        str(out),
        *extra,
    ]
    return run(cmd, timeout=240, env={"DIE_RANK": "2", "DIE_STEP": "400"})


@pytest.mark.mpi
def test_with_ulfm_the_survivors_of_a_killed_rank_finish_and_report(tmp_path):
    clean = tmp_path / "clean"
    cmd = train_command(4, ["--fault-tolerant", "--steps", "800", "--stop", "each", "--out", str(clean)], ULFM)
    assert run(cmd, timeout=240).returncode == 0
    out = tmp_path / "failed"
    proc = _die_on_rank_2(out, ULFM, ["--fault-tolerant"])
    assert (out / "summary.json").exists(), proc.stderr[-5000:]
    # The console and the exit status say that the job lost a rank.
    assert proc.returncode != 0
    assert "pcasgd-mpi: rank 2 failed during training; the survivors finished (exit status 3)" in proc.stderr
    summary, reference = _summary(out), _summary(clean)
    assert summary["survivors"] == [0, 1, 3] and summary["failed_ranks"] == [2]
    assert summary["steps"] == [800, 800, 800]
    assert reference["failed_ranks"] == []
    # Async accuracy depends on timing; the survivors' average model must still be evaluated.
    assert 0.0 <= summary["final_accuracy"] <= 1.0 and len(summary["agent_accuracies"]) == 3, summary


@pytest.mark.mpi
def test_with_ulfm_a_rank_killed_just_before_the_end_still_leaves_the_survivors_finishing(tmp_path):
    """The survivors may finish training before any message tells them of the death: the end of
    training must learn it from ULFM itself and not spend its whole wait on the dead rank."""
    out = tmp_path / "late"
    cmd = mpirun_prefix(4) + [
        *ULFM,
        sys.executable,
        str(ROOT / "tests" / "scripts" / "die_on_rank.py"),
        *("train", "--no-progress", "--fault-tolerant", "--steps", "800", "--stop", "each"),
        *("--timeout", "30", "--out", str(out)),
    ]
    proc = run(cmd, timeout=240, env={"DIE_RANK": "2", "DIE_STEP": "798"})
    assert proc.returncode == 3, proc.stderr[-5000:]
    summary = _summary(out)
    assert summary["survivors"] == [0, 1, 3] and summary["failed_ranks"] == [2]
    assert summary["steps"] == [800, 800, 800]


@pytest.mark.mpi
def test_without_ulfm_a_killed_rank_stops_the_job_with_its_name(tmp_path):
    proc = _die_on_rank_2(tmp_path / "run")  # fails the test if the job outlives its time limit
    assert proc.returncode != 0
    assert "rank 2" in proc.stderr and "signal 9" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "run" / "summary.json").exists()


@pytest.mark.mpi
def test_with_ulfm_the_survivors_repair_the_graph_and_adopt_the_dead_hubs_shard(tmp_path):
    from pcasgd_mpi import data

    out = tmp_path / "star"
    cmd = mpirun_prefix(4) + [
        *ULFM,
        sys.executable,
        str(ROOT / "tests" / "scripts" / "die_on_rank.py"),
        "train",
        "--no-progress",
        "--fault-tolerant",
        "--topology",
        "star",
        "--steps",
        "300",
        "--stop",
        "each",
        "--partition",
        "dirichlet:0.3",
        "--out",
        str(out),
    ]
    proc = run(cmd, timeout=240, env={"DIE_RANK": "0", "DIE_STEP": "30"})
    assert proc.returncode == 3, proc.stderr[-5000:]
    summary = _summary(out)
    assert summary["survivors"] == [1, 2, 3] and summary["failed_ranks"] == [0]
    (repair,) = summary["repairs"]
    assert repair["failed"] == [0] and repair["survivors"] == [1, 2, 3]
    assert repair["added_edges"] == [[1, 2], [1, 3], [2, 3]], "the hub's leaves are joined in a ring"
    ds = data.load("digits", seed=0)
    hub_shard = data.partition(ds.y_train, 4, "dirichlet:0.3", seed=0)[0]
    assert sum(repair["adopted_samples"].values()) == len(hub_shard), "no sample of the dead rank is lost"
    # the leaves mixed with each other after the repair, not only with the dead hub
    assert set(summary["staleness_histogram"]["1"]) >= {"0", "2", "3"}
