"""Staleness in the sender's steps for async mode (ALGORITHM.md "Staleness").

In async mode the receiver's step counter says nothing about how far a neighbour has moved on:
with a neighbour four times slower, `k − s` grows four steps per step of the neighbour's, and the
neighbour looks too old after a few of its own steps. So τ_l is estimated as `r_l · a_l`: the age
of the copy (now minus the time the sender made it) times the sender's step rate, measured from
the (step, time made) pairs of its messages. A neighbour that is slow but sending stays fresh; one
that stops sending keeps its last rate while its copy ages, so it passes the horizon and is dropped.

Clocks. The sender stamps each message with the time it made it, on a clock every rank shares:
- one host: `time.time()` of one kernel, the same for every process, so nothing is measured (a
  measurement would only add its error: up to 2 ms here with both cores busy, a step of a fast
  neighbour's); ranks know they share rank 0's kernel by its boot id (Linux), else by host name;
- several hosts: each rank measures its offset to rank 0 at start-up (`clock_offset`, Cristian's
  method: the round trip with the smallest delay of a few tries, error at most half that round
  trip, tens of microseconds on a LAN) and stamps and reads times on rank 0's clock. Clocks that
  drift apart during a run (NTP slews them by at most 0.5 ms/s) are not corrected; a negative age
  (the sender's clock ahead of ours) counts as zero.
Pure: no MPI here except in `clock_offset`, which takes a communicator.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


class StepRate:
    """Steps per second from (step, time) pairs: a ratio of exponential averages of the increments.

    Averaging the increments (not the instant rates) weighs each interval by its length, so one
    short gap between two messages does not make a slow sender look fast.
    """

    def __init__(self, beta: float = 0.9):
        self.beta = beta
        self._last: tuple[int, float] | None = None
        self._steps = 0.0
        self._seconds = 0.0

    def observe(self, step: int, at: float) -> None:
        if self._last is not None:
            ds, dt = step - self._last[0], at - self._last[1]
            if ds <= 0 or dt <= 0:
                return  # an old or duplicated message carries no news about the rate
            self._steps = self.beta * self._steps + ds
            self._seconds = self.beta * self._seconds + dt
        self._last = (step, at)

    @property
    def heard(self) -> bool:
        """Whether any step of the sender's was seen (its starting weights are none)."""
        return self._last is not None

    @property
    def rate(self) -> float | None:
        """Steps per second, None until two messages with different steps were seen."""
        return self._steps / self._seconds if self._seconds > 0 else None

    def rate_since(self, start: float | None) -> float | None:
        """Before a second message: the sender made steps 0..s between `start` (when every rank
        began) and its first message, which bounds its rate from what it has shown so far."""
        if self._last is None or start is None or self._last[1] <= start:
            return None
        return (self._last[0] + 1) / (self._last[1] - start)


@dataclass
class Estimate:
    staleness: int  # τ in the sender's steps
    sender_step: int  # s + τ: the step the sender is estimated to be at now


class SenderClock:
    """Per neighbour, τ in that neighbour's own steps from the age of its newest copy."""

    def __init__(
        self,
        neighbours: list[int],
        now: Callable[[], float] = time.time,
        beta: float = 0.9,
        start_allowance: float = 16.0,
    ):
        self.now = now
        # Before a neighbour's first step arrives only its starting weights are held, and they stay
        # its weights until that step: allow it to be this many times slower than us to get there
        # (the horizon, so that one frozen at the start is dropped after H² of our steps).
        self.start_allowance = float(start_allowance)
        self.rates = {n: StepRate(beta) for n in neighbours}
        self.own = StepRate(beta)
        # When every rank started stepping (the shared clock); the prior rate of a neighbour that
        # has sent one message. Our own rate would make a slow starter look stale at once.
        self.start: float | None = None

    def observe(self, source: int, step: int, made_at: float) -> None:
        """Every message that arrives (in order of arrival) refines the sender's rate."""
        self.rates[source].observe(step, made_at)

    def tick(self, step: int, at: float | None = None) -> None:
        """This rank's own step, the prior for a neighbour whose rate is not known yet."""
        self.own.observe(step, self.now() if at is None else at)

    def rate(self, source: int) -> float:
        seen = self.rates[source]
        rate = seen.rate
        if rate is None:
            # At most our own rate: after a resume the sender's step count did not start at `start`.
            shown, own = seen.rate_since(self.start), self.own.rate
            if not seen.heard and own is not None:
                own /= self.start_allowance
            rate = own if shown is None else (shown if own is None else min(shown, own))
        return rate if rate is not None else 0.0

    def estimate(self, source: int, step: int, made_at: float, now: float | None = None) -> Estimate:
        age = max(0.0, (self.now() if now is None else now) - made_at)
        tau = int(self.rate(source) * age + 0.5)
        return Estimate(tau, step + tau)


def best_offset(samples: list[tuple[float, float, float]]) -> float:
    """The offset of the reference clock from ours, from (sent, reference time, received) samples.

    The sample with the shortest round trip bounds the error best: the reference read its clock
    somewhere inside that round trip, so assume the middle.
    """
    t0, ref, t1 = min(samples, key=lambda s: s[2] - s[0])
    return ref - (t0 + t1) / 2.0


def clock_key() -> str:
    """What names this process's clock: the kernel's boot id where there is one, else the host."""
    try:
        return "boot:" + Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "host:" + socket.gethostname()


def other_clocks(keys: list[str]) -> list[int]:
    """The ranks whose clock is not rank 0's, from every rank's `clock_key()`."""
    return [r for r, key in enumerate(keys) if key != keys[0]]


def clock_offset(comm, deadline: float, rounds: int = 5, wall: Callable[[], float] = time.time) -> float:
    """Collective: this rank's clock offset to rank 0 (0.0 on rank 0 and on every rank that shares
    its kernel); add it to `wall()`.

    Rank 0 answers each rank on another clock in turn; every wait is bounded by `deadline`.
    """
    import numpy as np
    from mpi4py import MPI

    from .collectives import allgather_object, wait

    rank = comm.Get_rank()
    remote = other_clocks(allgather_object(comm, clock_key(), deadline, "not every rank took part in the clock check"))
    if rank != 0 and rank not in remote:
        return 0.0
    tag = 7403
    buf = np.zeros(1, dtype=np.float64)
    if rank == 0:
        for peer in remote:
            for _ in range(rounds):
                wait(
                    comm.Irecv([buf, MPI.DOUBLE], source=peer, tag=tag),
                    deadline,
                    lambda: f"rank {peer} did not take part in the clock check",
                )
                buf[0] = wall()
                wait(
                    comm.Isend([buf, MPI.DOUBLE], dest=peer, tag=tag),
                    deadline,
                    lambda: f"rank {peer} did not take part in the clock check",
                )
        return 0.0
    samples = []
    for _ in range(rounds):
        t0 = wall()
        wait(comm.Isend([buf, MPI.DOUBLE], dest=0, tag=tag), deadline, lambda: "rank 0 did not answer the clock check")
        wait(
            comm.Irecv([buf, MPI.DOUBLE], source=0, tag=tag), deadline, lambda: "rank 0 did not answer the clock check"
        )
        samples.append((t0, float(buf[0]), wall()))
    return best_offset(samples)
