"""The exchange under mpirun -n 4 on a ring: newest message wins, nothing torn, clean shutdown."""

import time

import pytest
import torch
from mpi4py import MPI

from pcasgd_mpi.exchange import Exchange, ExchangeTimeout

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
ring = sorted({(rank - 1) % size, (rank + 1) % size} - {rank})
NUMEL = 100_000


def _value(sender: int, step: int) -> float:
    return float(sender * 10_000 + step)


@pytest.mark.mpi(min_size=2)
def test_newest_message_wins_and_none_is_torn():
    ex = Exchange(comm, ring, NUMEL, signature=42, with_grad=True)
    seen = {n: [] for n in ring}

    def check(msg):
        v = _value(msg.source, msg.step)
        # A torn message would mix values of two steps.
        assert torch.all(msg.weights == v) and torch.all(msg.grad == -v)
        seen[msg.source].append(msg.step)

    steps = 60
    w, g = torch.empty(NUMEL), torch.empty(NUMEL)
    for k in range(steps):
        w.fill_(_value(rank, k))
        g.fill_(-_value(rank, k))
        ex.send(k, w, g)
        if rank % 2 == 0:
            time.sleep(0.002)  # uneven pace so that messages pile up and get skipped
        ex.poll(check)
        for n in ring:
            latest = ex.latest(n)
            if latest is not None:
                assert latest.step == max(seen[n])
                assert torch.all(latest.weights == _value(n, latest.step))
    # The last step may have been skipped while the previous send was in flight: send it blocking.
    w.fill_(_value(rank, steps))
    g.fill_(-_value(rank, steps))
    ex.send(steps, w, g, block=True, deadline=time.monotonic() + 30)
    ex.wait_for_step(steps, time.monotonic() + 30, check)
    for n in ring:
        assert ex.latest_step(n) == steps
        assert seen[n] == sorted(seen[n]), "messages from one sender arrive in order"
        assert torch.all(ex.latest(n).weights == _value(n, steps))
    assert ex.stats.rejected == {}
    ex.close(time.monotonic() + 30)


@pytest.mark.mpi(min_size=2)
def test_foreign_signature_is_dropped_and_values_are_not_judged():
    warnings = []
    signature = 7 if rank != 1 else 8  # rank 1 claims another model
    ex = Exchange(comm, ring, 16, signature=signature, with_grad=False, warn=warnings.append)
    w = torch.full((16,), float("nan") if rank == 2 else 1.0)
    ex.send(0, w, block=True, deadline=time.monotonic() + 30)
    comm.Barrier()
    deadline = time.monotonic() + 10

    def foreign(n: int) -> bool:
        return rank == 1 or n == 1

    def settled() -> bool:
        rejected = ex.stats.rejected.get("foreign model signature", 0)
        return rejected >= sum(map(foreign, ring)) and all(ex.latest(n) is not None for n in ring if not foreign(n))

    while not settled() and time.monotonic() < deadline:
        ex.poll()
    for n in ring:
        if foreign(n):
            # rank 1 and its peers disagree on the model: nothing passes either way
            assert ex.latest(n) is None, f"message from rank {n} should have been dropped"
            assert ex.stats.rejected.get("foreign model signature", 0) >= 1
            assert any("foreign model signature" in m for m in warnings)
        else:
            got = ex.latest(n)
            assert got is not None, f"no message from rank {n}"
            # NaN weights are bytes like any others here; the optimizer decides what to mix
            assert torch.isnan(got.weights).all() == (n == 2)
    ex.close(time.monotonic() + 30)


@pytest.mark.mpi(min_size=2)
def test_close_completes_with_messages_in_flight():
    ex = Exchange(comm, ring, 1_000_000, with_grad=False)
    w = torch.zeros(1_000_000)
    for k in range(20):
        w.fill_(k)
        ex.send(k, w)  # never polled: sends stay in flight until close drains them
    assert ex.stats.sent >= len(ring), "the first send to every neighbour starts at once"
    ex.close(time.monotonic() + 30)  # raises ExchangeTimeout if it cannot drain them in time
    # Every message any rank started was received by its neighbour: none lost, none left in flight.
    assert comm.allreduce(ex.stats.sent) == comm.allreduce(ex.stats.received)
    for n in ring:
        assert ex.latest_step(n) >= 0
        assert torch.all(ex.latest(n).weights == ex.latest_step(n))


@pytest.mark.mpi(min_size=2)
def test_waiting_for_a_silent_neighbour_times_out():
    ex = Exchange(comm, ring, 8, with_grad=False)
    with pytest.raises(ExchangeTimeout, match="no message for step 0"):
        ex.wait_for_step(0, time.monotonic() + 0.3)
    ex.close(time.monotonic() + 30)
