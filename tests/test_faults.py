"""Signals and frozen ranks under mpirun: one rank's signal reaches all, a frozen rank is named."""

import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from launch import run, start_until, train_command
from pcasgd_mpi import checkpoint

pytestmark = pytest.mark.mpi


def _parent(pid: int) -> int:
    try:
        return int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def _descends(pid: int, root: int) -> bool:
    while pid > 1:
        if pid == root:
            return True
        pid = _parent(pid)
    return False


def _rank_pids(root_pid: int) -> dict[int, int]:
    """MPI rank -> pid of the processes this mpirun started (read from their environment)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"pcasgd_mpi.cli" not in cmdline or not _descends(int(entry.name), root_pid):
            continue
        for item in env:
            if item.startswith(b"OMPI_COMM_WORLD_RANK="):
                found[int(item.split(b"=", 1)[1])] = int(entry.name)
    return found


def _start_training(
    out: Path, args: list[str], size: int = 4, lines: int = 20
) -> tuple[subprocess.Popen, dict[int, int]]:
    """Start a 4-rank training job; return it and its ranks' pids once every rank has logged `lines` steps."""
    files = [out / "metrics" / f"rank-{r}.jsonl" for r in range(size)]

    def ready(proc: subprocess.Popen) -> bool:
        return (
            all(f.exists() and f.read_text().count("\n") >= lines for f in files) and len(_rank_pids(proc.pid)) == size
        )

    proc = start_until(train_command(4, ["--out", str(out), *args]), ready, 120)
    return proc, _rank_pids(proc.pid)


def _finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        pytest.fail(f"the job hung: still running {timeout} s after the fault\n{err[-3000:]}")
    return proc.returncode, err


@pytest.mark.parametrize("victim", [2, 0])
def test_sigterm_to_one_rank_in_async_mode_stops_every_rank_with_a_checkpoint(tmp_path, victim):
    out = tmp_path / "run"
    slow = [a for r in range(4) for a in ("--straggler", f"{r}:3")]
    proc, pids = _start_training(out, ["--steps", "100000", "--timeout", "30", *slow])
    try:
        os.kill(pids[victim], signal.SIGTERM)
        code, err = _finish(proc, 90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert code == 0, err[-3000:]
    assert "continue with --resume" in err
    steps = [checkpoint.steps_available(out / "checkpoints", r) for r in range(4)]
    assert all(steps), f"every rank must checkpoint: {steps}"
    assert not (out / "summary.json").exists()


def _freeze_one_rank(out: Path, args: list[str], victim: int) -> tuple[int, str]:
    """Start a job, SIGSTOP one rank once all train, and return how the job ended."""
    proc, pids = _start_training(out, args)
    try:
        os.kill(pids[victim], signal.SIGSTOP)
        return _finish(proc, 120)
    finally:
        for pid in _rank_pids(proc.pid).values():
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_sigstop_of_one_rank_in_lockstep_ends_the_job_naming_it(tmp_path):
    out = tmp_path / "run"
    args = ["--mode", "lockstep", "--steps", "100000", "--timeout", "10", "--straggler", "0:2"]
    code, err = _freeze_one_rank(out, args, victim=2)
    assert code != 0
    # The frozen rank can be woken while the launcher ends the job, and then reports what it was
    # itself waiting for when it was stopped (seen once in a full run): not evidence either way.
    victim = "pcasgd-mpi [rank 2]"
    ours = [line for line in err.splitlines() if line.startswith("pcasgd-mpi") and not line.startswith(victim)]
    # A neighbour of the frozen rank waits on it first (its sends to it, or its message of the
    # earliest step), so it names it; ranks further away time out a moment later, waiting for the
    # ones stuck in front of them, and their lines may reach the launcher first.
    sends = [line for line in ours if "sends to" in line]
    waits = [(int(re.search(r"for step (\d+)", line).group(1)), line) for line in ours if "for step" in line]
    assert sends or waits, err[-3000:]
    first = sends[0] if sends else min(waits)[1]
    assert "rank 2 " in first and "frozen" in first, err[-3000:]
    assert "Traceback" not in err


def test_sigstop_of_one_rank_in_async_mode_is_named_at_the_end(tmp_path):
    out = tmp_path / "run"
    code, err = _freeze_one_rank(out, ["--steps", "600", "--timeout", "10"], victim=3)
    assert code != 0
    ours = [line for line in err.splitlines() if line.startswith("pcasgd-mpi")]
    assert ours and "rank 3 did not reach the end of training" in ours[0], err[-3000:]
    assert not (out / "summary.json").exists()


def test_a_diverging_run_stops_with_one_line_and_a_failure_status(tmp_path):
    out = tmp_path / "run"
    proc = run(
        train_command(
            4, ["--out", str(out), "--mode", "lockstep", "--steps", "300", "--lr", "1e6", "--algorithm", "dsgd"]
        ),
        180,
    )
    code, err = proc.returncode, proc.stderr
    assert code != 0
    ours = [line for line in err.splitlines() if line.startswith("pcasgd-mpi")]
    assert ours and "became inf or NaN" in ours[0] and "lower --lr" in ours[0], err[-3000:]
    assert not (out / "summary.json").exists()
    for line in (out / "metrics" / "rank-0.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"metrics hold a bare {c}"))


def test_on_diverge_continue_finishes_the_run_and_names_the_diverged_ranks(tmp_path):
    out = tmp_path / "run"
    args = ["--mode", "lockstep", "--steps", "40", "--lr", "1e6", "--algorithm", "dsgd", "--on-diverge", "continue"]
    proc = run(train_command(4, ["--out", str(out), *args]), 180)
    code, err = proc.returncode, proc.stderr
    assert code == 0, err[-3000:]
    strict = dict(parse_constant=lambda c: pytest.fail(f"a bare {c} in the JSON output"))
    summary = json.loads((out / "summary.json").read_text(), **strict)
    assert sorted(summary["diverged"]) == ["0", "1", "2", "3"], summary["diverged"]
    assert all(0 <= k < 40 for k in summary["diverged"].values())
    assert summary["steps"] == [40] * 4 and 0.0 <= summary["final_accuracy"] <= 1.0
    assert summary["final_test_loss"] is None  # not finite: written as null
    assert sum("training goes on without it" in line for line in err.splitlines()) == 4, err[-3000:]
    for line in (out / "metrics.jsonl").read_text().splitlines():
        json.loads(line, **strict)
