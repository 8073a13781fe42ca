"""Nonblocking exchange of flat weight (and gradient) buffers with graph neighbours.

This module moves bytes and knows nothing about learning. Each message is one contiguous
buffer: a 128-byte header of int64 words followed by the payload (weights, then optionally the
gradient). Sends come from a small pool of buffers so that a buffer is never written while a
send from it is still in flight; every neighbour has one receive pre-posted at all times and
the newest message per neighbour wins. Messages are checked for shape, sender and model
signature, never for their values: whether weights are usable is the optimizer's call, and a
read of every payload on arrival would cost a fifth of the bandwidth at 16 MiB.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from mpi4py import MPI

from .collectives import Timeout, spin
from .message import HEADER_BYTES, Buffer, Message, done_or_failed, header_problem, read, step_of, write_header
from .transport import HostTransport, Transport

MAX_HELD = 256  # messages a delayed link may hold at once; beyond that the oldest is dropped
TAG = 7401
INITIAL = -1  # the step of a message sent before the first step: the sender's starting weights
_NOTHING = -2  # no message from that neighbour yet

ExchangeTimeout = Timeout  # a wait in the exchange passed its deadline


def _ranks(ranks: list[int]) -> str:
    return f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"


@dataclass
class ExchangeStats:
    sent: int = 0
    bytes_sent: int = 0
    skipped: int = 0  # sends not made because the previous one to that neighbour was in flight
    received: int = 0
    held_dropped: int = 0  # messages a delayed link dropped because too many were held
    rejected: dict[str, int] = field(default_factory=dict)


class Exchange:
    """Point-to-point exchange with a fixed set of neighbours on a private duplicate communicator."""

    def __init__(
        self,
        comm: MPI.Comm,
        neighbours: Sequence[int],
        numel: int,
        dtype: torch.dtype = torch.float32,
        *,
        signature: int = 0,
        with_grad: bool = True,
        warn: Callable[[str], None] | None = None,
        transport: Transport | None = None,
        hold: float = 0.0,
    ):
        """`hold`: seconds each message waits before its sends start, which emulates a slow link
        from this rank to its neighbours without blocking anybody (the message stays in a pool
        buffer meanwhile; messages are still made every step, so a delayed link is pipelined)."""
        self.transport = transport if transport is not None else HostTransport()
        self.comm = comm.Dup()
        self.comm.Set_errhandler(MPI.ERRORS_RETURN)
        self.rank = self.comm.Get_rank()
        self.neighbours = list(neighbours)
        self.numel = numel
        self.dtype = dtype
        self.signature = signature
        self.with_grad = with_grad
        self.stats = ExchangeStats()
        self.failed: set[int] = set()
        self.revoked = False
        self._warn = warn or (lambda msg: None)
        self._warned: set[str] = set()
        itemsize = torch.empty((), dtype=dtype).element_size()
        self.nbytes = HEADER_BYTES + numel * itemsize * (2 if with_grad else 1)
        make = lambda: Buffer(self.transport, self.nbytes, numel, dtype, with_grad)  # noqa: E731
        # Each neighbour has at most one send in flight, so deg + 1 buffers always leave one free.
        self._send_pool = [make() for _ in range(len(self.neighbours) + 1)]
        self._make = make
        self.hold = float(hold)
        self._held: deque[tuple[float, Buffer]] = deque()
        self._prepared: Buffer | None = None
        # dest -> its send; None while the send waits for its buffer's copy to finish
        self._in_flight: dict[int, MPI.Request | None] = {}
        self._staged: list[tuple[Buffer, list[int]]] = []
        self._inbox = {n: make() for n in self.neighbours}
        self._latest = {n: make() for n in self.neighbours}
        self._latest_step = {n: _NOTHING for n in self.neighbours}
        self._recv = {n: self._post_recv(n) for n in self.neighbours}
        self._closed = False

    # ---------------------------------------------------------------- sending
    def _post_recv(self, source: int) -> MPI.Request:
        self.transport.wait(self._inbox[source].slot)
        return self.comm.Irecv([self._inbox[source].raw, MPI.BYTE], source=source, tag=TAG)

    def _progress_sends(self) -> None:
        if self._held:
            self._release_held()
        if self._staged:
            self._launch_staged()
        for dest, req in list(self._in_flight.items()):
            if req is None:
                continue
            try:
                done = req.Test()
            except MPI.Exception as exc:
                self._peer_error(dest, exc)
                done = True
            if done:
                del self._in_flight[dest]

    def send_ready(self) -> bool:
        """True when no send to any neighbour is still in flight."""
        self._progress_sends()
        return not self._in_flight

    def send(
        self,
        step: int,
        weights: torch.Tensor,
        grad: torch.Tensor | None = None,
        *,
        block: bool = False,
        deadline: float = float("inf"),
        made_at: float = 0.0,
        alpha: float = 0.0,
        stop_at: int | None = None,
    ) -> int:
        """Send (step, weights[, grad]) to every neighbour; returns how many sends were started
        (or, with a transport that copies asynchronously, scheduled to start once the copy is done).

        A neighbour whose previous message is still in flight is skipped (the next send carries
        newer weights anyway) unless `block`, which waits for it up to `deadline`. The payload is
        copied into a pool buffer only when at least one send starts.
        """
        self._prepared = None
        parts = [weights, grad] if self.with_grad else [weights]
        return self._send_from(None, (step, made_at, alpha, stop_at, None), parts, block, deadline)

    def send_buffer(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Views (weights, grad) of the pool buffer the next `send_prepared` sends from.

        Writing the new payload straight into these views saves the copy `send` makes. The buffer
        is not in flight, so it can be filled while earlier messages are still being transferred;
        a `send` before `send_prepared` reuses it and drops what was written.
        """
        self._prepared = self._free_buffer()
        return self._prepared.weights, self._prepared.grad

    def send_prepared(
        self,
        step: int,
        *,
        block: bool = False,
        deadline: float = float("inf"),
        made_at: float = 0.0,
        alpha: float = 0.0,
        stop_at: int | None = None,
        lags: dict[int, int] | None = None,
    ) -> int:
        """`send` of the payload written into the views from `send_buffer`, without copying it."""
        if self._prepared is None:
            raise RuntimeError("send_prepared() needs a send_buffer() first")
        buf, self._prepared = self._prepared, None
        return self._send_from(buf, (step, made_at, alpha, stop_at, lags), None, block, deadline)

    def _send_from(self, buf: Buffer | None, head: tuple, parts, block: bool, deadline: float) -> int:
        """Sends to every neighbour that is ready now; with `block`, then waits (up to `deadline`)
        for each of the others' previous send to complete and sends to it too. A neighbour that is
        slow to receive so never holds up the messages to the rest."""
        targets = self._targets()
        started = 0
        if targets:
            buf = buf if buf is not None else self._free_buffer()
            started = self._start(buf, head, targets, parts)
        rest = [n for n in self.neighbours if n not in targets and n not in self.failed]
        if not block or not rest or self.hold > 0:
            self.stats.skipped += len(rest)
            return started

        def rest_ready() -> bool:
            self._progress_sends()
            return not any(n in self._in_flight for n in rest)

        spin(
            rest_ready,
            deadline,
            lambda: (
                f"sends to {_ranks(sorted(n for n in rest if n in self._in_flight))} did not complete in time "
                f"(frozen, dead or much slower than the rest)"
            ),
        )
        rest = [n for n in rest if n not in self.failed]
        if rest:
            if buf is None:
                buf = self._free_buffer()
            else:
                parts = None  # the buffer holds the payload already; it may still be in flight
            started += self._start(buf, head, rest, parts)
        return started

    def _targets(self) -> list[int]:
        self._progress_sends()
        if self.hold > 0:
            # A held message picks its targets when its delay is over; it goes to every live neighbour.
            return [n for n in self.neighbours if n not in self.failed]
        return [n for n in self.neighbours if n not in self._in_flight and n not in self.failed]

    def _free_buffer(self) -> Buffer:
        free = next((b for b in self._send_pool if not b.busy()), None)
        if free is not None:
            return free
        if len(self._send_pool) < len(self.neighbours) + 1 + MAX_HELD:
            self._send_pool.append(self._make())  # a delayed link holds more messages than the pool had
            return self._send_pool[-1]
        _, oldest = self._held.popleft()
        oldest.held = False
        self.stats.held_dropped += 1
        return oldest

    def _start(
        self,
        buf: Buffer,
        head: tuple,
        targets: list[int],
        parts: list[torch.Tensor | None] | None = None,
    ) -> int:
        """Stages the message and starts its sends, now or, while the transport's copy into the
        buffer is still running (a GPU's), from a later progress call: the caller never waits
        for it. Until then the targets count as in flight, so flow control holds for them too."""
        step, made_at, alpha, stop_at, lags = head
        write_header(
            buf.header,
            sender=self.rank,
            step=step,
            numel=self.numel,
            signature=self.signature,
            with_grad=self.with_grad,
            made_at=made_at,
            alpha=alpha,
            stop_at=stop_at,
            lags=lags,
        )
        # parts None: the payload was written in place through send_buffer().
        self.transport.stage_out(buf.slot, parts)
        if self.hold > 0:
            buf.held = True
            self._held.append((time.monotonic() + self.hold, buf))
            return len(targets)
        self._stage(buf, targets)
        return len(targets)

    def _stage(self, buf: Buffer, targets: list[int]) -> None:
        buf.staged = True
        for dest in targets:
            self._in_flight[dest] = None
        self._staged.append((buf, targets))
        self._launch_staged()

    def _release_held(self) -> None:
        now = time.monotonic()
        while self._held and self._held[0][0] <= now:
            _, buf = self._held.popleft()
            buf.held = False
            targets = [n for n in self.neighbours if n not in self._in_flight and n not in self.failed]
            self.stats.skipped += len(self.neighbours) - len(targets) - len(self.failed & set(self.neighbours))
            if targets:
                self._stage(buf, targets)

    def _launch_staged(self) -> None:
        waiting = []
        for buf, targets in self._staged:
            if not self.transport.ready(buf.slot):
                waiting.append((buf, targets))
                continue
            buf.staged = False
            for dest in targets:
                self._in_flight.pop(dest, None)
                if dest in self.failed:
                    continue
                try:
                    req = self.comm.Isend([buf.raw, MPI.BYTE], dest=dest, tag=TAG)
                except MPI.Exception as exc:
                    self._peer_error(dest, exc)
                    continue
                buf.requests.append(req)
                self._in_flight[dest] = req
                self.stats.sent += 1
                self.stats.bytes_sent += self.nbytes
        self._staged = waiting

    # -------------------------------------------------------------- receiving
    def _reject(self, source: int, reason: str) -> None:
        self.stats.rejected[reason] = self.stats.rejected.get(reason, 0) + 1
        if reason not in self._warned:
            self._warned.add(reason)
            self._warn(f"dropped a message from rank {source}: {reason} (counted; further ones are not reported)")

    def _peer_error(self, source: int, exc: MPI.Exception) -> None:
        if exc.Get_error_class() == MPI.ERR_PROC_FAILED:
            self.failed.add(source)
            return
        if exc.Get_error_class() == getattr(MPI, "ERR_REVOKED", -1):
            self.revoked = True  # another rank saw a failure and revoked the communicator (ULFM)
            return
        if source in self.failed:
            return  # a request to or from a failed peer may be reported as invalid once it errored
        raise exc

    def _validate(self, source: int, status: MPI.Status) -> str | None:
        if status.Get_count(MPI.BYTE) != self.nbytes:
            return "wrong message size"
        return header_problem(
            self._inbox[source].header,
            source=source,
            numel=self.numel,
            signature=self.signature,
            with_grad=self.with_grad,
        )

    def poll(self, handler: Callable[[Message], None] | None = None) -> list[int]:
        """Take every message that has arrived; returns the neighbours with a newer message.

        `handler` sees every valid message in arrival order (views valid only during the call);
        afterwards `latest(n)` gives the newest one.
        """
        if self._staged:  # a copy that finished since the last call: its sends can start now
            self._launch_staged()
        updated = []
        status = MPI.Status()
        for source in self.neighbours:
            if source in self.failed:
                continue
            while True:
                req = self._recv[source]
                try:
                    if not req.Test(status):
                        break
                    self.transport.stage_in(self._inbox[source].slot)
                    reason = self._validate(source, status)
                except MPI.Exception as exc:
                    if exc.Get_error_class() == MPI.ERR_TRUNCATE:
                        reason = "wrong message size"
                    else:
                        self._peer_error(source, exc)
                        break
                if reason is not None:
                    self._reject(source, reason)
                else:
                    self.stats.received += 1
                    buf = self._inbox[source]
                    step = step_of(buf.header)
                    if handler is not None:
                        handler(read(source, buf))
                    if step > self._latest_step[source]:
                        self._inbox[source], self._latest[source] = self._latest[source], buf
                        self._latest_step[source] = step
                        if source not in updated:
                            updated.append(source)
                self._recv[source] = self._post_recv(source)
        return updated

    def latest(self, source: int) -> Message | None:
        if self._latest_step[source] == _NOTHING:
            return None
        return read(source, self._latest[source])

    def latest_step(self, source: int) -> int:
        return self._latest_step[source]

    def wait_for_step(
        self,
        step: int,
        deadline: float,
        handler: Callable[[Message], None] | None = None,
        also: Callable[[], None] | None = None,
    ) -> None:
        """Poll until every live neighbour has sent a message of at least `step` (lockstep mode, and
        `INITIAL` at the start of async mode); `also` runs between polls (it may raise to end the
        wait early)."""

        def waiting() -> list[int]:
            return [n for n in self.neighbours if n not in self.failed and self._latest_step[n] < step]

        def done() -> bool:
            self.poll(handler)
            self._progress_sends()
            if not waiting():
                return True
            if also is not None:
                also()
            return False

        what = "the start" if step == INITIAL else f"step {step}"
        spin(
            done,
            deadline,
            lambda: (
                f"no message for {what} from {_ranks(waiting())} in time (frozen, dead or much slower than the rest)"
            ),
        )

    # --------------------------------------------------------------- shutdown
    def close(self, deadline: float, *, shrink: bool = False) -> MPI.Comm:
        """Collective: complete every send, drain every receive, cancel the pre-posted ones.

        Two nonblocking barriers order it: after the first, nobody starts a send; after the
        second, every send has been matched, so cancelling the receives loses nothing. With
        `shrink` (ULFM), the barriers run among the surviving ranks only; returns the
        communicator of the ranks that took part (the survivors, or the parent's duplicate).
        """
        if self._closed:
            return self._survivors
        self._closed = True
        for _, buf in self._held:  # a delayed message not yet released at the end is not sent
            buf.held = False
        self._held.clear()
        started = time.monotonic()
        self._survivors = self.comm.Shrink() if shrink else self.comm
        # The shrink waits for the slowest survivor; the barriers keep the time they had before it.
        deadline += time.monotonic() - started

        def barrier(what: str) -> None:
            req = self._survivors.Ibarrier()
            spin(lambda: (self.poll(), self._progress_sends(), req.Test())[-1], deadline, lambda: what)

        barrier("not every rank reached the end of training")
        spin(
            lambda: (self.poll(), self.send_ready())[-1],
            deadline,
            lambda: f"sends to ranks {sorted(self._in_flight)} were never received",
        )
        barrier("not every rank finished its sends")
        self.poll()
        live = {source: req for source, req in self._recv.items() if source not in self.failed}
        for source, req in live.items():
            try:
                req.Cancel()
            except MPI.Exception as exc:
                self._peer_error(source, exc)
        spin(lambda: all(done_or_failed(r) for r in live.values()), deadline, lambda: "receives could not be cancelled")
        if not shrink:
            self.comm.Free()  # a grid runs many optimizers in one process: do not leak communicators
            self._survivors = None
        return self._survivors

    def failed_world_ranks(self, survivors: MPI.Comm) -> list[int]:
        """Ranks of the exchange's communicator that are not among `survivors`."""
        alive = set(
            MPI.Group.Translate_ranks(survivors.Get_group(), list(range(survivors.Get_size())), self.comm.Get_group())
        )
        return sorted(set(range(self.comm.Get_size())) - alive)
