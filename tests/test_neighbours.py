"""LockstepNeighbours without MPI: a scripted exchange hands in the messages."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from pcasgd_mpi.delay import DelayModel
from pcasgd_mpi.exchange import INITIAL
from pcasgd_mpi.message import Message
from pcasgd_mpi.neighbours import AsyncNeighbours, LockstepNeighbours
from pcasgd_mpi.staleness import SenderClock
from pcasgd_mpi.tracker import SubstitutionTracker


class ScriptedExchange:
    """Delivers every queued message of a step ≤ the one waited for, as the real exchange does."""

    def __init__(self, messages: list[Message]):
        self.queue = list(messages)

    def wait_for_step(self, step, deadline, handler=None, also=None):
        ready = [m for m in self.queue if m.step <= step]
        self.queue = [m for m in self.queue if m.step > step]
        for m in ready:
            handler(m)


def _positions(steps: int) -> list[torch.Tensor]:
    """A neighbour's weights at each step: an irregular path, so a wrong step pair shows."""
    gen = torch.Generator().manual_seed(3)
    return [torch.randn(6, generator=gen, dtype=torch.float64) for _ in range(steps)]


def _view(delay: str, lr: float, k: int, velocity: bool, xs: list[torch.Tensor], grads=None):
    msgs = [Message(1, s, x.clone(), None if grads is None else grads[s].clone(), alpha=lr) for s, x in enumerate(xs)]
    nb = LockstepNeighbours(
        ScriptedExchange(msgs),
        {1: 1 / 3},
        DelayModel.parse(delay),
        0,
        6,
        torch.float64,
        torch.device("cpu"),
        with_grad=grads is not None,
        velocity=velocity,
    )
    view = None
    for step in range(k + 1):
        view = nb.at(step, deadline=1e18, lr=lr)
    return view


def test_lockstep_velocity_is_the_senders_last_movement():
    xs, lr, k = _positions(12), 0.05, 10
    view = _view("fixed:3", lr, k, velocity=True, xs=xs)
    (n,) = view.neighbours
    s = k - 3
    assert view.steps == [s] and n.staleness == 3
    assert torch.equal(n.x, xs[s])
    # x̂ = x_s − lr·g·τ with g = −(x_s − x_{s−1})/lr rolls the last movement forward τ steps
    assert torch.allclose(n.grad, -(xs[s] - xs[s - 1]) / lr, rtol=0, atol=1e-12)


def test_lockstep_velocity_has_no_slope_for_the_first_message():
    xs = _positions(6)
    view = _view("fixed:2", 0.1, 2, velocity=True, xs=xs)
    (n,) = view.neighbours
    assert view.steps == [0] and torch.equal(n.x, xs[0]) and n.grad is None


def test_lockstep_update_slope_is_the_message_slope():
    xs, grads = _positions(10), _positions(10)
    view = _view("fixed:2", 0.1, 8, velocity=False, xs=xs, grads=grads)
    (n,) = view.neighbours
    assert view.steps == [6] and torch.equal(n.grad, grads[6])


class BurstExchange:
    """Async: one poll delivers a burst of messages, and only the newest stays readable."""

    def __init__(self, messages: list[Message]):
        self.queue, self.newest, self.failed = list(messages), {}, set()
        self.rank = 0

    def poll(self, handler=None):
        for m in self.queue:
            if handler is not None:
                handler(m)
            self.newest[m.source] = m
        self.queue = []

    def latest(self, source):
        return self.newest.get(source)


def test_async_av_measures_every_message_of_a_burst():
    xs = _positions(4)
    msgs = [Message(1, s, x.clone(), None, made_at=100.0 + s, alpha=0.1) for s, x in enumerate(xs)]
    clock = SenderClock([1], now=lambda: 104.0)
    view = AsyncNeighbours(BurstExchange(msgs), {1: 1 / 3}, clock, velocity=False)
    tracker = SubstitutionTracker(horizon=16)
    for t in (1, 2, 3):  # substitutes that stood for the neighbour's steps 1 to 3
        tracker.record(t, xs[t] + 1.0, torch.zeros(6, dtype=torch.float64), xs[t] - 1.0)
    seen = []

    def observe(msg):
        seen.append(msg.step)
        tracker.observe(msg.step, msg.weights)

    view.observe = observe
    got = view.at(4, lr=0.1, now=104.0)
    assert seen == [0, 1, 2, 3] and got.steps == [3]
    assert tracker.measurements == 3 and tracker.pending_steps == ()


def test_async_starting_weights_are_mixed_in_but_measure_nothing():
    """The message of step INITIAL (a neighbour's weights before its first step) is used as a copy,
    but it is no step of the sender's: no rate, no AV measurement, no velocity and no record."""
    x0, x1 = _positions(2)
    start = Message(1, INITIAL, x0.clone(), torch.zeros(6, dtype=torch.float64), made_at=100.0, alpha=0.0)
    clock = SenderClock([1], now=lambda: 100.0)
    exchange = BurstExchange([start])
    view = AsyncNeighbours(exchange, {1: 1 / 3}, clock, velocity=True)
    seen = []
    view.observe = lambda msg: seen.append(msg.step)
    got = view.at(0, lr=0.1, now=100.0)
    nb = got.neighbours[0]
    assert torch.equal(nb.x, x0) and nb.staleness == 0
    assert got.steps == [INITIAL] and got.sender_steps == [None]  # AV makes no record for it
    assert seen == [] and clock.rates[1].rate_since(0.0) is None
    # the sender's first step: its rate and velocity start from it, not from the starting weights
    exchange.queue = [Message(1, 0, x1.clone(), None, made_at=100.5, alpha=0.1)]
    got = view.at(1, lr=0.1, now=100.5)
    assert seen == [0] and got.steps == [0] and got.neighbours[0].grad is None


def test_async_starting_weights_age_at_a_sixteenth_of_this_ranks_rate_until_the_sender_is_heard():
    """A neighbour slow to its first step (up to H times slower) stays in the mix; one that sends
    its starting weights and then nothing (frozen at the start) passes H after H² of our steps."""
    (x0,) = _positions(1)
    clock = SenderClock([1], now=lambda: 0.0, start_allowance=16)
    clock.start = 100.0
    for step in range(3):
        clock.tick(step, at=100.0 + 0.01 * step)  # this rank: 100 steps/s
    msg = Message(1, INITIAL, x0.clone(), None, made_at=100.0)
    view = AsyncNeighbours(BurstExchange([msg]), {1: 1}, clock, False)
    assert view.at(32, lr=0.1, now=100.32).neighbours[0].staleness == 2  # 32 of our steps
    assert view.at(272, lr=0.1, now=102.72).neighbours[0].staleness == 17  # past H = 16
    # its first step arrives: from then on the rate it has shown counts, not ours
    view.exchange.queue = [Message(1, 0, x0.clone(), None, made_at=102.8)]
    assert view.at(280, lr=0.1, now=102.8).neighbours[0].staleness == 0


def test_a_message_carries_the_senders_lags_and_the_view_reads_this_ranks():
    import numpy as np

    from pcasgd_mpi import message

    h = np.zeros(message.HEADER_BYTES // 8, dtype=np.int64)
    lags = {r: r % 5 + 2 for r in range(12)}  # more neighbours than words: the longest lags travel
    message.write_header(
        h, sender=3, step=7, numel=6, signature=1, with_grad=False, made_at=1.5, alpha=0.1, stop_at=None, lags=lags
    )
    buf = SimpleNamespace(header=h, weights=torch.zeros(6), grad=None)
    got = message.read(3, buf).lags
    assert len(got) == message.MAX_LAGS == 8
    assert all(lags[r] == v for r, v in got.items())
    assert sorted(got.values(), reverse=True) == sorted(lags.values(), reverse=True)[:8]
    message.write_header(
        h, sender=3, step=8, numel=6, signature=1, with_grad=False, made_at=1.6, alpha=0.1, stop_at=None, lags={0: 0}
    )
    assert message.read(3, buf).lags == {0: 0}, "a lag of 0 is an entry; the words of the last message are gone"
    message.write_header(
        h, sender=3, step=9, numel=6, signature=1, with_grad=False, made_at=1.7, alpha=0.1, stop_at=None
    )
    assert message.read(3, buf).lags == {}

    exchange = BurstExchange([Message(1, 0, torch.zeros(6), None, made_at=100.0, lags={0: 5, 2: 1})])
    view = AsyncNeighbours(exchange, {1: 0.5, 2: 0.25}, SenderClock([1, 2], now=lambda: 100.0), velocity=False)
    got = view.at(3, lr=0.1, now=100.0)
    assert got.back == [5, None], "rank 1 sees this rank's copy 5 of its steps old; rank 2 sent nothing"
