"""The async staleness clock: τ in the sender's own steps (ALGORITHM.md "Staleness")."""

import pytest

from pcasgd_mpi.delay import SpecError, link_delays
from pcasgd_mpi.staleness import SenderClock, StepRate, best_offset


class FakeTime:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def _feed(clock: SenderClock, source: int, step_time: float, steps: int, start: float = 1000.0, offset: float = 0.0):
    """`steps` messages from `source`, one per step of `step_time` seconds, stamped on its clock (+offset)."""
    for s in range(steps):
        clock.observe(source, s, start + s * step_time + offset)


def test_step_rate_from_increments():
    rate = StepRate()
    assert rate.rate is None
    for s in range(10):
        rate.observe(s, 5.0 + 0.25 * s)
    assert rate.rate == pytest.approx(4.0)
    rate.observe(3, 100.0)  # an old message says nothing new
    assert rate.rate == pytest.approx(4.0)


def test_equal_speeds_give_the_steps_since_the_copy():
    now = FakeTime()
    clock = SenderClock([1], now=now)
    _feed(clock, 1, 0.01, 50)
    now.t = 1000.0 + 49 * 0.01 + 0.03  # the newest copy (step 49) is 3 of the sender's steps old
    est = clock.estimate(1, 49, 1000.0 + 49 * 0.01)
    assert est.staleness == 3
    assert est.sender_step == 52


def test_four_times_slower_sender_stays_fresh():
    """The receiver makes 4 steps per step of the sender: k − s would say 4, the sender moved 1."""
    now = FakeTime()
    clock = SenderClock([3], now=now)
    for k in range(200):
        clock.tick(k, 1000.0 + 0.01 * k)  # our own rate: 100 steps/s
    _feed(clock, 3, 0.04, 50)  # the sender: 25 steps/s
    made = 1000.0 + 49 * 0.04
    for age in (0.0, 0.01, 0.02, 0.03):
        now.t = made + age
        assert clock.estimate(3, 49, made).staleness <= 1
    now.t = made + 0.04
    assert clock.estimate(3, 49, made).staleness == 1


def test_frozen_sender_ages_past_the_horizon():
    now = FakeTime()
    clock = SenderClock([2], now=now)
    _feed(clock, 2, 0.01, 20)
    made = 1000.0 + 19 * 0.01
    horizon = 16
    now.t = made + 0.05
    assert clock.estimate(2, 19, made).staleness <= horizon
    now.t = made + 1.0  # no message for a second: 100 of its steps
    assert clock.estimate(2, 19, made).staleness > horizon


def test_unknown_rate_uses_our_own_and_never_sent_is_handled_by_the_caller():
    now = FakeTime()
    clock = SenderClock([1], now=now)
    for k in range(10):
        clock.tick(k, 1000.0 + 0.1 * k)
    clock.observe(1, 0, 1000.0)  # one message only: no rate of its own yet
    now.t = 1000.5
    assert clock.estimate(1, 0, 1000.0).staleness == 5


def test_clock_offset_between_hosts_is_measured_and_removed():
    """A sender whose clock runs 2 s ahead: without the offset every copy would look 2 s younger."""
    true_offset = 2.0
    # Cristian samples: we send at t0, the reference (2 s ahead) answers after 1 ms, we receive at t1
    samples = [
        (10.0 + i, 10.0 + i + 0.0005 + true_offset + 0.0001 * i, 10.0 + i + 0.001 + 0.0002 * i) for i in range(5)
    ]
    offset = best_offset(samples)
    assert offset == pytest.approx(true_offset, abs=1e-3)
    # Both ranks stamp on the reference clock: the receiver's reading is corrected by its offset.
    receiver_local = FakeTime(500.0)
    clock = SenderClock([1], now=lambda: receiver_local() + offset)
    sender_ref = lambda local: local + true_offset  # noqa: E731  the sender is the reference
    for s in range(20):
        clock.observe(1, s, sender_ref(500.0 + 0.01 * s))
    receiver_local.t = 500.0 + 0.19 + 0.02
    est = clock.estimate(1, 19, sender_ref(500.0 + 0.19))
    assert est.staleness == 2


def test_negative_age_counts_as_zero():
    now = FakeTime(1000.0)
    clock = SenderClock([1], now=now)
    _feed(clock, 1, 0.01, 10, start=1000.0)
    assert clock.estimate(1, 9, 1001.0).staleness == 0


def test_link_delays_parse_and_reject():
    assert link_delays(["0,2:30", "1:5"], 4) == {0: 0.03, 2: 0.03, 1: 0.005}
    with pytest.raises(SpecError, match="twice"):
        link_delays(["0:1", "0:2"], 4)
    with pytest.raises(SpecError, match="only 4 ranks"):
        link_delays(["5:1"], 4)
    with pytest.raises(SpecError):
        link_delays(["0:inf"], 4)


def test_a_slow_starter_is_not_stale_before_its_second_message():
    """Its first step took 40 ms while ours take 1 ms: our own rate would call it 40 steps old."""
    now = FakeTime(1000.0)
    clock = SenderClock([3], now=now)
    clock.start = 1000.0
    for k in range(60):
        clock.tick(k, 1000.0 + 0.001 * k)
    clock.observe(3, 0, 1000.04)  # step 0, made 40 ms after the start
    now.t = 1000.07  # 30 ms later, no second message yet
    assert clock.estimate(3, 0, 1000.04).staleness <= 1
    now.t = 1001.0  # but a sender that never sends again still ages past the horizon
    assert clock.estimate(3, 0, 1000.04).staleness > 16


def test_balance_mix_weighs_a_slower_neighbour_by_its_relative_speed():
    """--balance mix: W·r_l/r_own for a slower neighbour, the rest to the agent itself, rows still sum to 1."""
    from types import SimpleNamespace

    import torch

    from pcasgd_mpi import rule
    from pcasgd_mpi.neighbours import View
    from pcasgd_mpi.optimizer import DistributedOptimizer

    clock = SenderClock([1, 2, 3], now=lambda: 0.0)
    for k in range(20):
        clock.tick(k, at=k / 100)  # this rank: 100 steps/s
        clock.observe(1, k, k / 25)  # 4x slower
        clock.observe(2, k, k / 200)  # faster: left as it is
    # neighbour 3 has sent one message: no rate yet, left as it is
    clock.observe(3, 0, 0.0)
    fake = SimpleNamespace(clock=clock, neighbours=[1, 2, 3], world=SimpleNamespace(self_weight=0.25))
    view = View([rule.Neighbour(0.25, torch.zeros(2), None, 0) for _ in range(3)], [0, 0, 0], [0, 0, 0])
    DistributedOptimizer._mix_per_time(fake, view)
    weights = [nb.weight for nb in view.neighbours]
    assert weights == pytest.approx([0.0625, 0.25, 0.25])
    assert view.self_weight == pytest.approx(0.4375)
    assert view.self_weight + sum(weights) == pytest.approx(1.0)
    # nothing measured of this rank yet: the weights stay as the graph has them
    fresh = View([rule.Neighbour(0.25, torch.zeros(2), None, 0) for _ in range(3)], [0, 0, 0], [0, 0, 0])
    DistributedOptimizer._mix_per_time(SimpleNamespace(**{**vars(fake), "clock": SenderClock([1, 2, 3])}), fresh)
    assert [nb.weight for nb in fresh.neighbours] == [0.25, 0.25, 0.25] and fresh.self_weight is None


def test_ranks_on_rank_0s_kernel_share_its_clock_and_measure_nothing():
    from pcasgd_mpi.staleness import clock_key, other_clocks

    assert other_clocks(["boot:a", "boot:a", "boot:b", "boot:a", "boot:b"]) == [2, 4]
    assert other_clocks(["host:n1"]) == []
    assert clock_key() == clock_key() and clock_key().startswith(("boot:", "host:"))
