"""P1, exchange efficiency: a 16 MiB model through `Exchange` against bare mpi4py, 2 ranks.

Ping-pong: rank 0 sends, rank 1 polls until the message is there and sends it back, and so on;
bandwidth = payload bytes moved / time. Both sides use the same pattern: a receive pre-posted
at all times, `Test` spun until it completes, the next send started once the previous one has
completed. Bare and exchange run in interleaved pairs (bare, exchange, bare, exchange, ...;
the machine is shared and noisy), each side a few round trips; the ratio is taken pair by pair
and its median is the result, reported with its quartiles and extremes.

- bare: numpy buffers, `Isend`/`Irecv` of the payload bytes only.
- exchange: `Exchange` with its defaults (every message validated: size, header, sender and
  model signature; values are the optimizer's business), sending through
  `send_buffer`/`send_prepared`, which writes nothing but the header: the caller puts its
  weights straight into the pool buffer, as `DistributedOptimizer` does.
- exchange-copy: `Exchange.send(step, weights)`, which copies the weights into the pool buffer.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from mpi4py import MPI

import _bench
from pcasgd_mpi.exchange import Exchange

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
peer = 1 - rank
NUMEL = 4 * 1024 * 1024  # float32: 16 MiB
NBYTES = NUMEL * 4
TAG = 11
DEADLINE = 60.0


def bare(trips: int) -> float:
    state = bare.state
    if state is None:
        send_buf, recv_buf = np.ones(NBYTES, np.uint8), np.empty(NBYTES, np.uint8)
        state = bare.state = {
            "send": send_buf,
            "recv_buf": recv_buf,
            "recv": comm.Irecv(recv_buf, source=peer, tag=TAG),
            "sent": None,
        }

    def send() -> None:
        if state["sent"] is not None:
            while not state["sent"].Test():
                pass
        state["sent"] = comm.Isend(state["send"], dest=peer, tag=TAG)

    def receive() -> None:
        while not state["recv"].Test():
            pass
        state["recv"] = comm.Irecv(state["recv_buf"], source=peer, tag=TAG)

    comm.Barrier()
    t0 = time.perf_counter()
    for _ in range(trips):
        if rank == 0:
            send()
            receive()
        else:
            receive()
            send()
    return time.perf_counter() - t0


bare.state = None


class ExchangeLeg:
    def __init__(self, *, zero_copy: bool):
        self.ex = Exchange(comm, [peer], NUMEL, torch.float32, with_grad=False)
        self.zero_copy = zero_copy
        self.step = rank  # rank 0 sends even steps, rank 1 odd ones
        self.filled: set[int] = set()
        self.model = torch.from_numpy(np.ones(NUMEL, dtype=np.float32))

    def send(self) -> None:
        deadline = time.monotonic() + DEADLINE
        if self.zero_copy:
            weights, _ = self.ex.send_buffer()
            if weights.data_ptr() not in self.filled:  # once per pool buffer, to touch its pages
                weights.fill_(1.0)
                self.filled.add(weights.data_ptr())
            weights[0] = self.step  # one element, so that the receiver can tell the messages apart
            self.ex.send_prepared(self.step, block=True, deadline=deadline)
        else:
            self.model[0] = self.step
            self.ex.send(self.step, self.model, block=True, deadline=deadline)
        self.step += 2

    def receive(self) -> None:
        want = self.step - 1  # the peer's step just before (rank 1) or after (rank 0) our last one
        deadline = time.monotonic() + DEADLINE
        while self.ex.latest_step(peer) < want:
            self.ex.poll()
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank {rank}: no message of step {want} (rejected: {self.ex.stats.rejected})")
        got = self.ex.latest(peer)
        assert got.step == want and got.weights[0].item() == want, (got.step, got.weights[0].item(), want)

    def __call__(self, trips: int) -> float:
        comm.Barrier()
        t0 = time.perf_counter()
        for _ in range(trips):
            if rank == 0:
                self.send()
                self.receive()
            else:
                self.receive()
                self.send()
        return time.perf_counter() - t0


def main() -> None:
    args = _bench.parse_args(__doc__.splitlines()[0])
    if size != 2:
        raise SystemExit("p1_exchange.py runs on exactly 2 ranks")
    torch.set_num_threads(1)
    # Short sides, many pairs: a pair is a few tens of milliseconds, so both halves of it see
    # nearly the same machine.
    pairs, copy_pairs, trips = (7, 5, 3) if args.quick else (61, 15, 4)
    exchange, exchange_copy = ExchangeLeg(zero_copy=True), ExchangeLeg(zero_copy=False)
    for run in (bare, exchange, exchange_copy):  # first touch of every buffer and connection set-up
        run(3)
    goal = _bench.interleave(lambda: bare(trips), lambda: exchange(trips), pairs)
    copy = _bench.interleave(lambda: bare(trips), lambda: exchange_copy(trips), copy_pairs)
    for leg in (exchange, exchange_copy):
        assert not leg.ex.stats.rejected, leg.ex.stats.rejected
        leg.ex.close(time.monotonic() + DEADLINE)
    if bare.state["sent"] is not None:
        bare.state["sent"].Wait()
    bare.state["recv"].Cancel()
    bare.state["recv"].Wait()
    comm.Barrier()
    if rank != 0:
        return

    def gbps(seconds: list[float]) -> float:
        return round(2 * trips * NBYTES / _bench.median(seconds) / 1e9, 3)

    summary = goal.summary(inverse=True)  # bandwidth ratio = bare time / exchange time
    _bench.emit(
        {
            "part": "P1",
            "ratio": summary["median"],
            "pairs": summary,
            "detail": {
                "payload_bytes": NBYTES,
                "round_trips_per_side": trips,
                "pattern": "ping-pong, 2 ranks, receive pre-posted, Test spun until complete",
                "median_GBps": {"bare": gbps(goal.a), "exchange": gbps(goal.b), "exchange-copy": gbps(copy.b)},
                "ratio_exchange_copy": copy.summary(inverse=True),
            },
        }
    )


if __name__ == "__main__":
    main()
