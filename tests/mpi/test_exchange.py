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
def test_foreign_signature_and_non_finite_values_are_dropped():
    warnings = []
    signature = 7 if rank != 1 else 8  # rank 1 claims another model
    ex = Exchange(comm, ring, 16, signature=signature, with_grad=False, warn=warnings.append)
    w = torch.full((16,), float("nan") if rank == 2 else 1.0)
    ex.send(0, w, block=True, deadline=time.monotonic() + 30)
    comm.Barrier()
    deadline = time.monotonic() + 10
    expect = {n: ("foreign model signature" if n == 1 else "non-finite values" if n == 2 else None) for n in ring}
    for n, reason in expect.items():
        if reason is None:
            continue
        while ex.stats.rejected.get(reason, 0) == 0 and time.monotonic() < deadline:
            ex.poll()
    for n, reason in expect.items():
        if reason is not None and rank != 1:
            assert ex.latest(n) is None, f"message from rank {n} should have been dropped ({reason})"
            assert ex.stats.rejected.get(reason, 0) >= 1
            assert any(reason in m for m in warnings)
    ex.close(time.monotonic() + 30)


@pytest.mark.mpi(min_size=2)
def test_close_completes_with_messages_in_flight():
    ex = Exchange(comm, ring, 1_000_000, with_grad=False)
    w = torch.zeros(1_000_000)
    for k in range(20):
        ex.send(k, w)  # never polled: sends stay in flight until close drains them
    t0 = time.monotonic()
    ex.close(time.monotonic() + 30)
    assert time.monotonic() - t0 < 30
    assert not ex._in_flight


@pytest.mark.mpi(min_size=2)
def test_waiting_for_a_silent_neighbour_times_out():
    ex = Exchange(comm, ring, 8, with_grad=False)
    with pytest.raises(ExchangeTimeout, match="no message for step 0"):
        ex.wait_for_step(0, time.monotonic() + 0.3)
    ex.close(time.monotonic() + 30)
