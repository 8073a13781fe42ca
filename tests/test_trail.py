"""OwnTrail (--slope own: this rank's own steps since a copy was made; --slope movement: its whole
movement since then) and Drift (--slope drift)."""

import pytest
import torch

from pcasgd_mpi import rule
from pcasgd_mpi.config import Slope
from pcasgd_mpi.trail import Drift, OwnTrail


def _walk(trail: OwnTrail, steps: list[torch.Tensor], times=None) -> None:
    for k, delta in enumerate(steps):
        trail.mark(k, float(k) if times is None else times[k])
        trail.add(delta)


def test_lockstep_prediction_adds_the_own_steps_since_the_copy():
    torch.manual_seed(0)
    deltas = [torch.randn(5) for _ in range(7)]
    trail = OwnTrail(5, torch.float32, "cpu", depth=6)
    _walk(trail, deltas)
    k = 7
    trail.mark(k, 7.0)
    s, lr = 3, 0.05
    x_s = torch.randn(5)
    g = trail.slope(lr, step=s)
    x_hat = rule.predict_weights(x_s, g, k - s, lr, lam=0.0)
    torch.testing.assert_close(x_hat, x_s + sum(deltas[s:k]), rtol=1e-5, atol=1e-6)


def test_async_rolls_forward_tau_times_the_average_own_step():
    deltas = [torch.full((3,), float(k + 1)) for k in range(8)]  # steps of 1, 2, ..., 8
    trail = OwnTrail(3, torch.float32, "cpu", depth=10)
    _walk(trail, deltas, times=[10.0 * k for k in range(8)])
    trail.mark(8, 80.0)
    # A copy made at t = 45: the newest own step begun by then is step 4, so the window is steps
    # 4..7 (5 + 6 + 7 + 8 = 26 over 4 steps); the sender made τ = 2 steps meanwhile.
    g = trail.slope(1.0, made_at=45.0)
    x_hat = rule.predict_weights(torch.zeros(3), g, 2, 1.0, lam=0.0)
    torch.testing.assert_close(x_hat, torch.full((3,), 2 * 26 / 4))


def test_a_copy_older_than_the_trail_uses_the_oldest_steps_held():
    trail = OwnTrail(2, torch.float32, "cpu", depth=3)
    _walk(trail, [torch.ones(2) * (k + 1) for k in range(5)])  # marks of steps 2, 3, 4 are held
    trail.mark(5, 5.0)  # now 3, 4, 5
    g = trail.slope(1.0, made_at=-100.0)
    torch.testing.assert_close(-g, torch.full((2,), (4 + 5) / 2))


def test_no_slope_without_an_own_step_since_the_copy_or_for_a_step_not_held():
    trail = OwnTrail(2, torch.float32, "cpu", depth=3)
    _walk(trail, [torch.ones(2)] * 4)
    trail.mark(4, 4.0)
    assert trail.slope(0.1, made_at=4.5) is None  # made after this rank's newest step began
    assert trail.slope(0.1, step=0) is None  # step 0's mark was overwritten
    assert trail.slope(0.1, step=4) is None
    assert trail.slope(0.1, step=3) is not None
    with pytest.raises(ValueError):
        trail.slope(0.1, step=3, made_at=1.0)


def test_state_dict_round_trip_gives_the_same_slopes():
    torch.manual_seed(1)
    a = OwnTrail(4, torch.float32, "cpu", depth=5)
    _walk(a, [torch.randn(4) for _ in range(9)])
    a.mark(9, 9.0)
    b = OwnTrail(4, torch.float32, "cpu", depth=5)
    b.load_state_dict(a.state_dict())
    for s in (6, 7, 8):
        torch.testing.assert_close(a.slope(0.1, step=s), b.slope(0.1, step=s), rtol=0, atol=0)
    with pytest.raises(ValueError, match="shape"):
        OwnTrail(4, torch.float32, "cpu", depth=4).load_state_dict(a.state_dict())


def test_half_precision_models_keep_the_sums_in_float32_and_get_slopes_in_their_dtype():
    trail = OwnTrail(2, torch.bfloat16, "cpu", depth=3)
    assert trail.total.dtype == torch.float32
    _walk(trail, [torch.full((2,), 1e-3)] * 3)
    trail.mark(3, 3.0)
    g = trail.slope(0.1, step=1)
    assert g.dtype == torch.bfloat16, "the slope matches the model's copies"
    torch.testing.assert_close(g.float(), torch.full((2,), -1e-2), rtol=1e-2, atol=0)


def test_the_optimizer_gives_each_stale_copy_the_trails_slope():
    from types import SimpleNamespace

    from pcasgd_mpi.neighbours import View
    from pcasgd_mpi.optimizer import DistributedOptimizer

    trail = OwnTrail(3, torch.float32, "cpu", depth=6)
    _walk(trail, [torch.full((3,), 0.5)] * 4, times=[0.0, 1.0, 2.0, 3.0])
    trail.mark(4, 4.0)
    fake = SimpleNamespace(trail=trail, neighbours=[1, 2, 3], _own_slopes={}, lr=0.1, slope=Slope.OWN)
    nbs = [
        rule.Neighbour(0.25, torch.zeros(3), None, 2),  # stale: rolled forward
        rule.Neighbour(0.25, torch.zeros(3), None, 0),  # fresh: left as it is
        rule.Neighbour(0.25, None, None, 0),  # nothing received
    ]
    lockstep = View(list(nbs), [2, 4, None], [4, 4, None])
    DistributedOptimizer._use_own_slopes(fake, lockstep)
    x_hat = rule.predict_weights(torch.zeros(3), lockstep.neighbours[0].grad, 2, 0.1, lam=0.0)
    torch.testing.assert_close(x_hat, torch.full((3,), 1.0))  # two own steps of 0.5
    assert lockstep.neighbours[1].grad is None and lockstep.neighbours[2].grad is None
    # async: the copy's time stamp picks the window, τ (the sender's steps) scales the average step
    timed = View(list(nbs), [7, 9, None], [9, 9, None], made_at=[1.5, 3.9, None])
    DistributedOptimizer._use_own_slopes(fake, timed)
    x_hat = rule.predict_weights(torch.zeros(3), timed.neighbours[0].grad, 2, 0.1, lam=0.0)
    torch.testing.assert_close(x_hat, torch.full((3,), 1.0))  # τ = 2 times the average own step 0.5


def test_movement_rolls_a_copy_forward_by_the_whole_movement_since_it_was_made():
    from types import SimpleNamespace

    from pcasgd_mpi.neighbours import View
    from pcasgd_mpi.optimizer import DistributedOptimizer

    torch.manual_seed(2)
    xs = [torch.randn(3) for _ in range(6)]  # this rank's weights at the start of steps 0..5
    trail = OwnTrail(3, torch.float32, "cpu", depth=8)
    for k in range(5):
        trail.mark(k, float(k))
        trail.add_movement(xs[k + 1], xs[k])
    trail.mark(5, 5.0)
    fake = SimpleNamespace(trail=trail, neighbours=[1], _own_slopes={}, lr=0.1, slope=Slope.MOVEMENT, horizon=16)
    fake._age_by_own_steps = lambda v: DistributedOptimizer._age_by_own_steps(fake, v)
    x_s = torch.randn(3)
    # lockstep, τ = 3: x̂ = x_s + x_5 − x_2
    view = View([rule.Neighbour(0.5, x_s, None, 3)], [2], [5])
    DistributedOptimizer._use_own_slopes(fake, view)
    x_hat = rule.predict_weights(x_s, view.neighbours[0].grad, 3, 0.1, lam=0.0)
    torch.testing.assert_close(x_hat, x_s + xs[5] - xs[2], rtol=1e-5, atol=1e-6)
    # async: a copy made at t = 1.5 (own step 1 had begun), whatever τ the sender's clock gives,
    # is 4 of this rank's steps old
    for tau in (1, 6):
        view = View([rule.Neighbour(0.5, x_s, None, tau)], [9], [9], made_at=[1.5])
        DistributedOptimizer._use_own_slopes(fake, view)
        assert view.neighbours[0].staleness == 4
        x_hat = rule.predict_weights(x_s, view.neighbours[0].grad, 4, 0.1, lam=0.0)
        torch.testing.assert_close(x_hat, x_s + xs[5] - xs[1], rtol=1e-5, atol=1e-6)


def test_drift_is_the_bias_corrected_average_movement_and_the_prediction_extends_it():
    beta, lr = 0.9, 0.05
    xs = [torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1.0]), torch.tensor([3.0, 0.0]), torch.tensor([4.0, 0.0])]
    d = Drift(xs[0], beta=beta)
    out = torch.empty(2)
    assert torch.equal(d.slope(xs[0], lr, out), torch.zeros(2)), "no movement yet: nothing to roll forward"
    mean = torch.zeros(2)
    for n, (prev, x) in enumerate(zip(xs, xs[1:]), start=1):
        mean = beta * mean + (1 - beta) * (x - prev)
        g = d.slope(x, lr, out)
        torch.testing.assert_close(g, -mean / (1 - beta**n) / lr)
    # a steady walk is extended exactly: x_s + τ·(step) after the bias correction
    d = Drift(torch.zeros(3))
    for k in range(5):
        g = d.slope(torch.full((3,), 0.2 * k), lr, torch.empty(3))
    torch.testing.assert_close(rule.predict_weights(torch.full((3,), 0.8), g, 3, lr, 0.0), torch.full((3,), 1.4))


def test_drift_state_dict_round_trip_continues_identically():
    torch.manual_seed(2)
    walk = [torch.randn(5) for _ in range(7)]
    a = Drift(walk[0])
    for x in walk[:4]:
        a.slope(x, 0.1, torch.empty(5))
    b = Drift(walk[0])
    b.load_state_dict(a.state_dict())
    for x in walk[4:]:
        torch.testing.assert_close(a.slope(x, 0.1, torch.empty(5)), b.slope(x, 0.1, torch.empty(5)), rtol=0, atol=0)
    with pytest.raises(ValueError, match="shape"):
        Drift(torch.zeros(4)).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="beta"):
        Drift(torch.zeros(4), beta=1.0)


def test_drift_of_a_half_precision_model_averages_in_float32():
    d = Drift(torch.zeros(2, dtype=torch.bfloat16))
    assert d.mean.dtype == torch.float32
    out = torch.empty(2, dtype=torch.bfloat16)
    d.slope(torch.zeros(2, dtype=torch.bfloat16), 0.1, out)
    g = d.slope(torch.full((2,), 1e-2, dtype=torch.bfloat16), 0.1, out)
    assert g.dtype == torch.bfloat16
    torch.testing.assert_close(g.float(), torch.full((2,), -0.1), rtol=1e-2, atol=0)


def test_steps_since_counts_this_ranks_steps_since_a_copys_time():
    trail = OwnTrail(2, torch.float32, "cpu", depth=6)
    _walk(trail, [torch.ones(2)] * 5)  # steps 0..4 began at t = 0..4
    trail.mark(5, 5.0)
    assert trail.steps_since(1.5) == 4  # step 1 had begun: steps 1..4 since
    assert trail.steps_since(4.9) == 1
    assert trail.steps_since(5.5) == 0
    assert trail.steps_since(-3.0) == 5, "older than the trail: the oldest step held"


def test_async_theta_by_the_delay_counts_the_lag_in_this_ranks_own_steps():
    from types import SimpleNamespace

    from pcasgd_mpi.config import Mode
    from pcasgd_mpi.delay import DelayModel
    from pcasgd_mpi.update import RuleStep

    trail = OwnTrail(2, torch.float32, "cpu", depth=10)
    _walk(trail, [torch.ones(2)] * 8)
    trail.mark(8, 8.0)
    fake = SimpleNamespace(
        mode=Mode.ASYNC,
        delay=DelayModel(),
        world=SimpleNamespace(rank=0, mu_max=4 / 3),
        neighbours=[1, 3],
        trail=trail,
        quasi_global=None,
        tolerance=1,
    )
    # rank 1's copy is 6 of its own (fast) steps old but was made 1.5 of ours ago; rank 3's is 3
    # of its steps old and made before our step 2 began
    nbs = [rule.Neighbour(0.25, torch.zeros(2), None, 6), rule.Neighbour(0.25, torch.zeros(2), None, 3)]
    thetas, out, w_self, logged = RuleStep._stable_thetas(fake, nbs, [True, True], 0.5, 8, made_at=[6.5, 2.0])
    assert thetas == [rule.stable_theta(2, 4 / 3), rule.stable_theta(6, 4 / 3)]
    assert logged == {1: thetas[0], 3: thetas[1]} and w_self == 0.5 and out == nbs
    # without the copies' times (or without a trail) the sender's steps are used
    thetas, *_ = RuleStep._stable_thetas(fake, nbs, [True, True], 0.5, 8, made_at=None)
    assert thetas == [rule.stable_theta(6, 4 / 3), rule.stable_theta(3, 4 / 3)]
    # both ends of a link: rank 1 says it sees this rank's copies 7 of its steps old, which is longer
    thetas, *_ = RuleStep._stable_thetas(fake, nbs, [True, True], 0.5, 8, made_at=[6.5, 2.0], backs=[7, None])
    assert thetas == [rule.stable_theta(7, 4 / 3), rule.stable_theta(6, 4 / 3)]
    # a fresh neighbour that sees this rank's copies late is pulled towards with θ·W; one within the
    # tolerance is not
    fresh = [rule.Neighbour(0.25, torch.zeros(2), None, 0), rule.Neighbour(0.25, torch.zeros(2), None, 1)]
    thetas, out, w_self, logged = RuleStep._stable_thetas(fake, fresh, [False, False], 0.5, 8, backs=[4, 1])
    theta = rule.stable_theta(4, 4 / 3)
    assert thetas == [0.0, 0.0] and logged == {1: theta}
    assert out[0].weight == pytest.approx(0.25 * theta) and out[1] is fresh[1]
    assert w_self == pytest.approx(0.5 + 0.25 * (1 - theta))


def test_async_movement_ages_a_copy_by_this_ranks_own_steps_but_drops_only_by_the_senders():
    from types import SimpleNamespace

    from pcasgd_mpi.neighbours import View
    from pcasgd_mpi.optimizer import DistributedOptimizer

    trail = OwnTrail(2, torch.float32, "cpu", depth=40)
    _walk(trail, [torch.ones(2)] * 30)
    trail.mark(30, 30.0)
    fake = SimpleNamespace(trail=trail, horizon=16, neighbours=[1, 2, 3, 4, 5])
    x = torch.zeros(2)
    nbs = [
        rule.Neighbour(0.25, x, None, 1),  # a straggler's copy: fresh in its steps, made 4 of ours ago
        rule.Neighbour(0.25, x, None, 6),  # a fast rank's copy: 6 of its steps, made during our step
        rule.Neighbour(0.25, x, None, 3),  # made 25 of our steps ago: at most the horizon
        rule.Neighbour(0.25, x, None, 17),  # past the horizon in its sender's steps: it stopped
        rule.Neighbour(0.25, None, None, 0),  # nothing received
    ]
    view = View(nbs, [5, 9, 2, 1, None], [6, 15, 5, 18, None], made_at=[26.0, 30.5, 5.0, 29.0, None])
    DistributedOptimizer._age_by_own_steps(fake, view)
    assert [nb.staleness for nb in view.neighbours] == [4, 0, 16, 17, 0]
    assert fake._lags == {1: 4, 2: 0, 3: 16}, "what the next message tells the neighbours"
    tol, h = 1, 16
    status = [rule.classify(nb, tol, h) for nb in view.neighbours]
    S = rule.Status
    assert status == [S.STALE, S.FRESH, S.STALE, S.DROPPED, S.DROPPED]


def test_async_without_a_trail_tells_the_neighbours_the_ages_in_their_senders_steps():
    """pc-asgd-av (and θ by the delay) with the update slope: no trail counts this rank's own steps,
    so the next message carries each copy's age in its sender's steps; nothing for a copy never
    received or past the horizon."""
    from types import SimpleNamespace

    from pcasgd_mpi.neighbours import View
    from pcasgd_mpi.optimizer import DistributedOptimizer

    x = torch.zeros(2)
    nbs = [
        rule.Neighbour(0.25, x, None, 9),
        rule.Neighbour(0.25, x, None, 0),
        rule.Neighbour(0.25, x, None, 17),
        rule.Neighbour(0.25, None, None, 0),
    ]
    fake = SimpleNamespace(horizon=16, neighbours=[1, 2, 3, 4])
    DistributedOptimizer._lags_in_sender_steps(fake, View(nbs, [1, 9, 0, None], [10, 9, 17, None]))
    assert fake._lags == {1: 9, 2: 0}
