"""Job-wide notices without a collective per step: "stop, everyone" and "I am done".

Each rank tells every other rank two things at most once: that the job should stop (a signal, a
finished step budget, the wall-time budget), and, at the very end, that it is done. Notices are
small point-to-point messages on a private communicator, received by one pre-posted receive and
read with a test at each step, so nobody waits for anybody while training. Because a rank's stop
notice is sent before its done notice and MPI keeps the order of messages between two ranks,
a rank that has every other rank's done notice has every notice: nothing is left unmatched, and
the ranks whose done notice never came are the ones to name when the end of a job times out.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import IntEnum

import numpy as np
from mpi4py import MPI

from .collectives import spin

TAG = 7402


class Notice(IntEnum):
    STOP = 1
    DONE = 2


class StopReason(IntEnum):
    SIGNAL = 1  # SIGTERM / SIGUSR1: checkpoint and leave
    BUDGET = 2  # a step or wall-time budget ran out: finish normally


class Roster:
    def __init__(self, comm: MPI.Comm):
        self.comm = comm.Dup()
        self.comm.Set_errhandler(MPI.ERRORS_RETURN)
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.others = [r for r in range(self.size) if r != self.rank]
        self.stop_reason: StopReason | None = None
        self.stop_from: int | None = None
        self.done: set[int] = set()
        self.done_steps: dict[int, int] = {}  # rank -> the number of steps it made
        self._broken = False  # ULFM reported a failure on the receive: no more notices are read
        self.failed: set[int] = set()
        self._sent_stop = False
        self._sent_done = False
        self._sends: list[tuple[MPI.Request, np.ndarray]] = []
        self._inbox = np.zeros(2, dtype=np.int64)
        self._recv = self._post()
        self._freed = False

    def _post(self) -> MPI.Request:
        return self.comm.Irecv([self._inbox, MPI.INT64_T], source=MPI.ANY_SOURCE, tag=TAG)

    def _tell_all(self, notice: Notice, value: int) -> None:
        for dest in self.others:
            if dest in self.failed:
                continue
            msg = np.array([int(notice), int(value)], dtype=np.int64)
            try:
                self._sends.append((self.comm.Isend([msg, MPI.INT64_T], dest=dest, tag=TAG), msg))
            except MPI.Exception:
                self.failed.add(dest)

    def request_stop(self, reason: StopReason) -> None:
        """Ask every rank to stop after its current step (once; the first reason wins locally)."""
        if self.stop_reason is None:
            self.stop_reason, self.stop_from = reason, self.rank
        if not self._sent_stop:
            self._sent_stop = True
            self._tell_all(Notice.STOP, reason)

    def poll(self) -> StopReason | None:
        """Read every notice that has arrived; returns the stop reason once one is known."""
        status = MPI.Status()
        while not self._broken:
            try:
                if not self._recv.Test(status):
                    break
            except MPI.Exception as exc:
                if exc.Get_error_class() in _FAILED:
                    self._broken = True  # a failed peer (ULFM): the survivors learn of it by shrinking
                    break
                raise
            notice, value = int(self._inbox[0]), int(self._inbox[1])
            source = status.Get_source()
            if notice == Notice.STOP and self.stop_reason is None:
                self.stop_reason, self.stop_from = StopReason(value), source
            elif notice == Notice.DONE:
                self.done.add(source)
                self.done_steps[source] = value
            self._recv = self._post()
        self._sends = [(r, m) for r, m in self._sends if not _test(r)]
        return self.stop_reason

    def finish(
        self,
        deadline: float,
        *,
        tolerate_failures: bool = False,
        poll=None,
        step: int = 0,
        interrupted: Callable[[], bool] | None = None,
    ) -> None:
        """Tell everyone this rank is done and wait for every other rank's done notice.

        With `tolerate_failures` (ULFM) it also returns as soon as a rank is known dead (`saw_failure`)
        or `interrupted()` holds: the caller repairs first, and waits again on the repaired world.
        A rank that never says it is done by the deadline is named in the `Timeout`.
        """
        if not self._sent_done:
            self._sent_done = True
            self._tell_all(Notice.DONE, step)

        def all_done() -> bool:
            if poll is not None:
                poll()
            self.poll()
            if tolerate_failures:
                self._learn_failures()
                if self.saw_failure or (interrupted is not None and interrupted()):
                    return True
            return self.done.issuperset(self.others)

        spin(all_done, deadline, lambda: _missing_text(self.missing()))

    @property
    def saw_failure(self) -> bool:
        return self._broken or bool(self.failed)

    def _learn_failures(self) -> None:
        """ULFM: the ranks this process already knows dead. A rank that died late in training may be
        known dead here before any message to or from it failed."""
        try:
            group = self.comm.Get_failed()
        except (MPI.Exception, NotImplementedError):
            return
        try:
            ranks = MPI.Group.Translate_ranks(group, list(range(group.Get_size())), self.comm.Get_group())
            self.failed.update(int(r) for r in ranks if r != MPI.UNDEFINED)
        finally:
            group.Free()

    def missing(self) -> list[int]:
        return sorted(set(self.others) - self.done)

    def free(self) -> None:
        """Cancel the pre-posted receive and free the communicator (after `finish`)."""
        if self._freed:
            return
        self._freed = True
        try:
            self._recv.Cancel()
            if not self._broken:
                self._recv.Wait()
        except MPI.Exception:
            pass
        for req, _ in self._sends:
            if not _test(req):
                try:
                    req.Cancel()
                except MPI.Exception:
                    pass
        self._sends = []
        if not (self.failed or self._broken):
            self.comm.Free()


_FAILED = {
    getattr(MPI, name) for name in ("ERR_PROC_FAILED", "ERR_PROC_FAILED_PENDING", "ERR_REVOKED") if hasattr(MPI, name)
}


def _test(req: MPI.Request) -> bool:
    try:
        return req.Test()
    except MPI.Exception:
        return True


def _missing_text(ranks: list[int]) -> str:
    listed = ", ".join(map(str, ranks))
    return (
        f"rank{'s' if len(ranks) > 1 else ''} {listed} did not reach the end of training in time "
        f"(frozen, dead or much slower than the rest)"
    )
