"""Waits and collectives that give up at a deadline instead of blocking for ever.

A blocking MPI collective waits as long as the slowest rank: a rank that is frozen (SIGSTOP, a
hung file system) or dead without ULFM would leave every other rank waiting without end. Every
collective the project makes after start-up goes through here: started nonblocking, then polled
until it completes or the deadline passes, which raises `Timeout` (the command line turns that
into one line and an MPI abort).
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from mpi4py import MPI


class Timeout(RuntimeError):
    """A wait for other ranks passed its deadline."""


LONG_WAIT = 1.0  # seconds of waiting after which polling slows down to 100 times a second


def spin(done: Callable[[], bool], deadline: float, what: Callable[[], str]) -> None:
    """Poll `done` until it holds or the deadline passes; back off so idle ranks yield the core.

    A short wait polls up to 1000 times a second (a step's message is usually a millisecond away);
    a wait that has lasted a second (start-up while the other ranks import torch, a slow rank)
    polls 100 times a second, so that ranks waiting for minutes cost next to no CPU.
    """
    spins = 0
    started = None
    while not done():
        now = time.monotonic()
        if now > deadline:
            raise Timeout(what())
        spins += 1
        if spins > 50:
            started = now if started is None else started
            cap = 1e-2 if now - started > LONG_WAIT else 1e-3
            time.sleep(min(cap, 1e-5 * (spins - 50)))


def wait(req: MPI.Request, deadline: float, what: Callable[[], str], poll: Callable[[], Any] | None = None) -> None:
    """Complete one request by the deadline; `poll` runs between tests (e.g. to keep messages flowing)."""
    if poll is None:
        spin(req.Test, deadline, what)
    else:
        spin(lambda: (poll(), req.Test())[-1], deadline, what)


def _late(what: str, timeout: float | None = None) -> Callable[[], str]:
    return lambda: what


def barrier(comm: MPI.Comm, deadline: float, what: str = "not every rank reached the barrier", poll=None) -> None:
    wait(comm.Ibarrier(), deadline, _late(what), poll)


def allgather_array(comm: MPI.Comm, local: np.ndarray, deadline: float, what: str) -> np.ndarray:
    """Rows of every rank's `local` (same shape on every rank), in rank order."""
    local = np.ascontiguousarray(local)
    out = np.empty((comm.Get_size(),) + local.shape, dtype=local.dtype)
    wait(comm.Iallgather(local, out), deadline, _late(what))
    return out


def allgather_object(comm: MPI.Comm, obj: Any, deadline: float, what: str) -> list:
    """Every rank's picklable `obj`, in rank order."""
    data = np.frombuffer(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), dtype=np.uint8)
    sizes = allgather_array(comm, np.array([data.size], dtype=np.int64), deadline, what).reshape(-1)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    out = np.empty(int(sizes.sum()), dtype=np.uint8)
    wait(comm.Iallgatherv(data, [out, (sizes, offsets), MPI.BYTE]), deadline, _late(what))
    return [pickle.loads(out[o : o + s].tobytes()) for o, s in zip(offsets, sizes)]


def allreduce_sum(comm: MPI.Comm, value: float, deadline: float, what: str) -> float:
    """Sum of one float over ranks, added in rank order (the same bits every run)."""
    rows = allgather_array(comm, np.array([value], dtype=np.float64), deadline, what)
    total = 0.0
    for v in rows.reshape(-1):
        total += float(v)
    return total


def mean_in_rank_order(
    comm: MPI.Comm, t: torch.Tensor, deadline: float, *, on_device: bool = False, extra: float | None = None
) -> float | None:
    """In-place mean over ranks, summed in rank order so that the result is the same to the bit
    every run (MPI_Allreduce may add in any order); reduced in float32 or wider, because bfloat16
    reductions are silently wrong in this MPI. Bounded by `deadline` like every collective.

    ``extra``: one more number carried along; its maximum over ranks is returned.
    ``on_device``: the vectors go to MPI where they are (a CUDA-aware MPI reads GPU memory) and
    are summed there; otherwise through numpy host memory, which MPI moves fastest on a host.
    """
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    size = comm.Get_size()
    what = "not every rank took part in averaging the model"
    n = t.numel()
    if on_device:
        work = torch.empty(n + 1, dtype=acc, device=t.device)
        work[:n].copy_(t.detach().reshape(-1))
        work[n] = 0.0 if extra is None else extra
        gathered = torch.empty((size, n + 1), dtype=acc, device=t.device)
        if t.is_cuda:  # MPI works outside the streams: the kernels writing `work` must be done
            torch.cuda.current_stream(t.device).synchronize()
        wait(comm.Iallgather(work, gathered), deadline, lambda: what)
    else:
        work = np.empty(n + 1, dtype=np.float64 if acc == torch.float64 else np.float32)
        work[:n] = t.detach().to("cpu", acc).reshape(-1).numpy()
        work[n] = 0.0 if extra is None else extra
        gathered = torch.from_numpy(allgather_array(comm, work, deadline, what))
    total = gathered[0, :n].clone()
    for row in gathered[1:, :n]:
        total += row
    t.copy_((total / size).view_as(t))
    return float(gathered[:, n].max()) if extra is not None else None
