"""Launch commands under mpirun with a hard timeout, for tests."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from pcasgd_mpi.launch import LAUNCHER_DID_NOT_START, TRAIN, mpi_environment, mpirun_command, run_captured

ROOT = Path(__file__).resolve().parent.parent
# conftest.py clears this during tests of the fast tier, which must not start MPI jobs.
LAUNCH_ALLOWED = True


def mpi_env(extra: dict | None = None) -> dict:
    return mpi_environment(extra)


def mpirun_prefix(n: int) -> list[str]:
    if not LAUNCH_ALLOWED:
        raise AssertionError(
            "this test starts mpirun: mark it @pytest.mark.mpi so that it runs in the mpi tier, "
            "not in the fast default one"
        )
    return mpirun_command(n)


def run(cmd: list[str], timeout: float, env: dict | None = None, cwd: Path | str | None = None):
    """Run cmd in its own process group; on timeout kill the whole group and fail loudly.

    A launch whose launcher did not start is made once more."""
    proc = _run_once(cmd, timeout, env, cwd)
    if proc.returncode != 0 and LAUNCHER_DID_NOT_START in proc.stderr:
        proc = _run_once(cmd, timeout, env, cwd)
    return proc


def _run_once(cmd: list[str], timeout: float, env: dict | None, cwd: Path | str | None):
    proc, timed_out = run_captured(cmd, timeout, env=mpi_env(env), cwd=cwd or ROOT)
    if timed_out:
        raise AssertionError(
            f"timed out after {timeout} s: {' '.join(cmd)}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
        )
    return proc


def train_command(n: int, args: list[str], launcher_options: Sequence[str] = ()) -> list[str]:
    """`mpirun ... python -m pcasgd_mpi.cli train --no-progress ARGS` (only where tests may launch)."""
    return mpirun_prefix(n) + [*launcher_options, *TRAIN, *args]


def train(n: int, args: list[str], timeout: float = 180, env: dict | None = None):
    return run(train_command(n, args), timeout, env)


def start_until(
    cmd: list[str], ready: Callable[[subprocess.Popen], bool], timeout: float, env: dict | None = None
) -> subprocess.Popen:
    """Start cmd in its own process group (output piped as text) and return it once ready(proc) holds.

    A launch whose launcher did not start is made once more; a job that ends before it is ready, or
    is not ready within `timeout` seconds, fails the test (its whole group killed)."""
    retry = True
    while True:
        proc = subprocess.Popen(
            cmd,
            env=mpi_env(env),
            cwd=ROOT,
            start_new_session=True,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + timeout
        while proc.poll() is None and not ready(proc):
            if time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                _, err = proc.communicate()
                raise AssertionError(f"not ready after {timeout} s: {' '.join(cmd)}\n{err[-3000:]}")
            time.sleep(0.05)
        if proc.poll() is None:
            return proc
        _, err = proc.communicate()
        if not (retry and LAUNCHER_DID_NOT_START in err):
            what = f"ended (status {proc.returncode}) before it was ready: {' '.join(cmd)}"
            raise AssertionError(f"{what}\n{err[-3000:]}")
        retry = False
