"""Which device a rank computes on, and whether its MPI can move GPU memory itself.

Neither torch nor mpi4py is imported at module import: the CUDA-awareness query only looks at
libraries already loaded in the process, and a launcher may want the rank/GPU mapping before it
pays for either import.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# Launchers that export a node-local rank, in the order they are tried: Open MPI's mpirun,
# MPICH/Hydra and Intel MPI, MVAPICH2, PMI (Cray and others), then Slurm. Under `srun --mpi=pmix`
# only SLURM_LOCALID is set (Open MPI's own variable is not). It comes last because it is also
# inherited: an mpirun started inside a Slurm allocation (or by a batch script, local id 0) passes
# the SLURM_LOCALID of its own task to every rank it starts, while its own variable is the true one.
LOCAL_RANK_VARIABLES = (
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "MPI_LOCALRANKID",
    "MV2_COMM_WORLD_LOCAL_RANK",
    "PMI_LOCAL_RANK",
    "SLURM_LOCALID",
)
ENV_OVERRIDE = "PCASGD_CUDA_AWARE"
MPI_LIBRARY_PREFIXES = ("libmpi.so", "libmpich.so")
DEVICE_SPECS = ("cpu", "cuda", "auto")


def local_rank(env: Mapping[str, str] | None = None) -> int | None:
    """This process's rank among the ranks on its node, as the launcher exported it; None if unknown."""
    env = os.environ if env is None else env
    for var in LOCAL_RANK_VARIABLES:
        value = env.get(var, "").strip()
        if value.isdigit():
            return int(value)
    return None


def local_rank_from_comm(comm) -> int:
    """Node-local rank from MPI itself, for launchers that export none. Collective over `comm`."""
    from mpi4py import MPI

    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        return local.Get_rank()
    finally:
        local.Free()


def select_device(spec: str, local_rank: int | None = None) -> torch.device:
    """The torch device for `spec` ("cpu", "cuda" or "auto").

    Ranks on one node take the node's GPUs round-robin by local rank, so a node with more ranks
    than GPUs shares them instead of failing.
    """
    import torch

    spec = str(spec).strip().lower()
    if spec not in DEVICE_SPECS:
        raise ValueError(f"device must be one of {', '.join(DEVICE_SPECS)}, got '{spec}'")
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        why = (
            "this torch build has no CUDA support"
            if torch.version.cuda is None
            else f"no CUDA device is visible (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})"
        )
        raise ValueError(
            f"device 'cuda' was requested but {why} (torch {torch.__version__}); use device 'cpu' or 'auto'"
        )
    index = (local_rank or 0) % torch.cuda.device_count()
    return torch.device("cuda", index)


class CudaAware(str, Enum):
    AUTO = "auto"
    YES = "yes"
    NO = "no"


@dataclass(frozen=True)
class Decision:
    """Whether GPU buffers go to MPI directly, and why; log it once and keep it with the results."""

    cuda_aware: bool
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"CUDA-aware MPI: {'yes' if self.cuda_aware else 'no'} ({self.reason})"


def loaded_mpi_libraries(maps_path: str = "/proc/self/maps") -> list[str]:
    """Paths of the MPI libraries mapped into this process, in the order the maps file lists them."""
    try:
        with open(maps_path, encoding="utf-8", errors="replace") as fh:
            lines = fh.readlines()
    except OSError:
        return []
    found: list[str] = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) < 6:
            continue
        path = fields[5].strip()
        if path.endswith(" (deleted)"):
            continue
        if os.path.basename(path).startswith(MPI_LIBRARY_PREFIXES) and path not in found:
            found.append(path)
    return found


def _probe(maps_path: str) -> tuple[bool | None, str | None]:
    """(answer of MPIX_Query_cuda_support, library that gave it); (None, None) when nothing answers."""
    # RTLD_NOLOAD only hands back a library that is already mapped: the query must describe the MPI
    # this process actually uses, never load a second one.
    mode = getattr(os, "RTLD_NOLOAD", 0) | getattr(os, "RTLD_LAZY", 1)
    for path in loaded_mpi_libraries(maps_path):
        try:
            lib = ctypes.CDLL(path, mode=mode)
        except OSError:
            continue
        try:
            fn = lib.MPIX_Query_cuda_support
        except AttributeError:
            continue
        fn.restype, fn.argtypes = ctypes.c_int, []
        return bool(fn()), path
    return None, None


def query_mpi_cuda_support(maps_path: str = "/proc/self/maps") -> bool | None:
    """Ask the loaded MPI library whether it is CUDA-aware; None if no MPI is loaded or it cannot say.

    Load the MPI first (`from mpi4py import MPI`). `ctypes.CDLL(None)` would not do: mpi4py loads
    the library with local symbol visibility, so it is opened by its path from the maps file.
    """
    return _probe(maps_path)[0]


def decide_cuda_aware(
    setting: CudaAware | str,
    device: torch.device | str,
    env: Mapping[str, str] | None = None,
    *,
    maps_path: str = "/proc/self/maps",
) -> Decision:
    """Whether to hand device buffers to MPI directly (else they are staged through host memory).

    A CPU device never needs it; an explicit setting wins over everything; `auto` lets
    PCASGD_CUDA_AWARE=0|1 override the library's own answer, and assumes "no" when nothing answers,
    since passing GPU pointers to an MPI that cannot read them crashes or corrupts silently.
    """
    env = os.environ if env is None else env
    setting = CudaAware(str(setting.value if isinstance(setting, CudaAware) else setting).strip().lower())
    device_type = getattr(device, "type", str(device).split(":", 1)[0])
    if device_type == "cpu":
        return Decision(False, "cpu tensors")
    if setting is CudaAware.NO:
        return Decision(False, "disabled by setting 'no'")
    if setting is CudaAware.YES:
        return Decision(True, "forced by setting 'yes'")
    override = env.get(ENV_OVERRIDE)
    if override is not None and override.strip() != "":
        value = override.strip()
        if value not in ("0", "1"):
            raise ValueError(f"{ENV_OVERRIDE} must be 0 or 1, got '{override}'")
        return Decision(value == "1", f"{ENV_OVERRIDE}={value}")
    answer, path = _probe(maps_path)
    if answer is None:
        libs = loaded_mpi_libraries(maps_path)
        where = f"{', '.join(libs)} has no MPIX_Query_cuda_support" if libs else "no MPI library is loaded"
        return Decision(False, f"cannot tell ({where}); staging through host memory")
    return Decision(answer, f"MPIX_Query_cuda_support() returned {int(answer)} in {path}")
