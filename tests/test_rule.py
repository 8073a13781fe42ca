"""Single-process tests of the pure rule in pcasgd_mpi.rule against ALGORITHM.md."""

import io
import math
import sys
from fractions import Fraction

import pytest
import torch

from pcasgd_mpi.rule import (
    Neighbour,
    Status,
    SubstitutionTracker,
    blend,
    candidates,
    classify,
    mix,
    mix_momentum,
    phi,
    predict_weights,
    pv_choose,
)

F64 = torch.float64


def t64(*values):
    return torch.tensor(values, dtype=F64)


def rollout(x_s, g, tau, lr, lam_elem):
    """τ literal steps of y_{t+1} = y_t − α(g + λ g⊙g⊙(y_t − x_s)), λ given per element."""
    y = x_s.clone()
    for _ in range(tau):
        y = y - lr * (g + lam_elem * g * g * (y - x_s))
    return y


def exact_phi(c: float, n: int) -> float:
    """φ in exact rational arithmetic, the reference for the floating-point versions."""
    if n == 0:
        return 0.0
    q = Fraction(c)
    if q == 0:
        return float(n)
    return float((1 - (1 - q) ** n) / q)


# ---------------------------------------------------------------- phi


@pytest.mark.parametrize("n", [1, 2, 3, 7, 50, 1000])
def test_phi_matches_exact_rational(n):
    cs = [0.0, 1e-300, 1e-16, 1e-12, 1e-9, 3e-7, 1e-5, 1e-3, 0.05, 0.3, 0.75, 0.999, 1.0]
    got = phi(torch.tensor(cs, dtype=F64), n)
    want = t64(*[exact_phi(c, n) for c in cs])
    torch.testing.assert_close(got, want, rtol=1e-13, atol=0)


def test_phi_float32_close_to_exact_and_beats_naive_form():
    cs = [1e-10, 1e-7, 1e-5, 1e-3, 0.1, 0.6, 1.0]
    n = 9
    got = phi(torch.tensor(cs, dtype=torch.float32), n)
    assert got.dtype == torch.float32
    want = torch.tensor([exact_phi(float(torch.tensor(c, dtype=torch.float32)), n) for c in cs], dtype=torch.float32)
    torch.testing.assert_close(got, want, rtol=2e-6, atol=0)
    c = torch.tensor([1e-7], dtype=torch.float32)
    naive = (1 - (1 - c) ** n) / c
    assert abs(naive.item() - n) > 1e-2 * n  # the cancellation the stable form avoids


def test_phi_special_values():
    c = t64(0.0, 1e-8, 0.4, 1.0)
    assert torch.equal(phi(c, 0), torch.zeros(4, dtype=F64))
    assert torch.equal(phi(t64(1.0), 5), t64(1.0))
    assert torch.equal(phi(t64(1.0), 1), t64(1.0))
    assert torch.equal(phi(t64(0.0), 6), t64(6.0))
    assert torch.isfinite(phi(c, 4)).all()
    with pytest.raises(ValueError):
        phi(c, -1)


# ---------------------------------------------------------------- predict_weights

LR = 0.1
C_TARGETS = [1e-12, 1e-6, 0.02, 0.3, 0.9, 1.0, 2.5, 40.0]  # the last two are clamped to 1


def _grad_for(c_targets, lr, lam, signs=True):
    g = torch.tensor([math.sqrt(c / (lr * lam)) for c in c_targets], dtype=F64)
    if signs:
        g[1::2] *= -1
    return g


@pytest.mark.parametrize("tau", [1, 2, 3, 5, 12])
@pytest.mark.parametrize("lam", [0.04, 1.0, 7.5])
def test_closed_form_equals_taylor_rollout(tau, lam):
    g = _grad_for(C_TARGETS, LR, lam)
    x_s = torch.linspace(-1.0, 2.0, len(C_TARGETS), dtype=F64)
    got = predict_weights(x_s, g, tau, LR, lam)
    # where α λ g² > 1 the clamp replaces λ by the λ that makes c exactly 1
    c = torch.tensor(C_TARGETS, dtype=F64)
    lam_elem = torch.where(c > 1, 1.0 / (LR * g * g), torch.full_like(g, lam))
    torch.testing.assert_close(got, rollout(x_s, g, tau, LR, lam_elem), rtol=1e-12, atol=1e-12)


def test_clamp_changes_result_for_large_c():
    g = _grad_for([40.0], LR, 1.0)
    x_s = t64(0.5)
    clamped = predict_weights(x_s, g, 4, LR, 1.0)
    unclamped = rollout(x_s, g, 4, LR, t64(1.0))
    assert not torch.allclose(clamped, unclamped)
    torch.testing.assert_close(clamped, x_s - LR * g)  # φ(1, n) = 1


def test_lambda_zero_is_linear_extrapolation():
    x_s, g = t64(1.0, -2.0, 3.5), t64(0.3, -4.0, 1e-9)
    for tau in (1, 4, 9):
        want = x_s - LR * tau * g
        torch.testing.assert_close(predict_weights(x_s, g, tau, LR, 0.0), want, rtol=1e-15, atol=0)


def test_tau_zero_and_missing_grad_return_a_copy_of_x_stale():
    x_s, g = t64(1.0, 2.0), t64(5.0, -5.0)
    for out in (predict_weights(x_s, g, 0, LR, 0.5), predict_weights(x_s, None, 3, LR, 0.5)):
        assert torch.equal(out, x_s)
        out.add_(1.0)
    assert torch.equal(x_s, t64(1.0, 2.0))


def test_negative_arguments_rejected():
    with pytest.raises(ValueError):
        predict_weights(t64(1.0), t64(1.0), -1, LR, 0.1)
    with pytest.raises(ValueError):
        predict_weights(t64(1.0), t64(1.0), 2, LR, -0.1)


def _hand_adaptive(x_s, g, tau, lr, lam, segments, eps):
    out, start = [], 0
    for length in filter(None, segments):  # an empty segment owns no element
        seg = g[start : start + length]
        lam_eff = lam / math.sqrt(sum(v * v for v in seg) / length + eps)
        for v, x in zip(seg, x_s[start : start + length]):
            c = min(max(lr * lam_eff * v * v, 0.0), 1.0)
            out.append(x - lr * v * exact_phi(c, tau))
        start += length
    return t64(*out)


@pytest.mark.parametrize("segments", [[2, 3], [5], [1, 0, 4], None])
def test_adaptive_lambda_per_segment(segments):
    g_list = [0.1, -0.2, 3.0, 4.0, -5.0]
    x_list = [1.0, 0.0, -1.0, 2.0, 0.5]
    lam, tau, eps = 0.3, 4, 1e-8
    got = predict_weights(t64(*x_list), t64(*g_list), tau, LR, lam, lam_mode="adaptive", segments=segments, eps=eps)
    want = _hand_adaptive(x_list, g_list, tau, LR, lam, segments or [5], eps)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-15)
    if segments == [2, 3]:  # the per-segment scale must actually differ from one global scale
        assert not torch.allclose(got, _hand_adaptive(x_list, g_list, tau, LR, lam, [5], eps))


def test_adaptive_argument_errors():
    with pytest.raises(ValueError):
        predict_weights(t64(1.0, 2.0), t64(1.0, 2.0), 2, LR, 0.1, lam_mode="adaptive", segments=[3])
    with pytest.raises(ValueError):
        predict_weights(t64(1.0), t64(1.0), 2, LR, 0.1, lam_mode="bogus")


# ---------------------------------------------------------------- classify / candidates / mix


def test_classify_boundaries():
    x = t64(0.0)
    assert classify(Neighbour(0.1, None, None, 0), 1, 16) is Status.DROPPED
    assert classify(Neighbour(0.1, x, None, 1), 1, 16) is Status.FRESH
    assert classify(Neighbour(0.1, x, None, 2), 1, 16) is Status.STALE
    assert classify(Neighbour(0.1, x, None, 16), 1, 16) is Status.STALE
    assert classify(Neighbour(0.1, x, None, 17), 1, 16) is Status.DROPPED


X = t64(1.0, 2.0, 3.0)
DELTA = t64(-0.01, 0.02, 0.0)
A = t64(4.0, -1.0, 0.5)  # fresh
B = t64(2.0, 2.0, -2.0)  # stale
GB = t64(1.0, -3.0, 0.5)
C = t64(9.0, 9.0, 9.0)  # too old
KW = dict(lr=LR, lam=0.0, tolerance=0, horizon=16)


def mixed_neighbours():
    return [
        Neighbour(0.2, A, None, 0),
        Neighbour(0.3, B, GB, 3),
        Neighbour(0.1, C, t64(1.0, 1.0, 1.0), 17),
        Neighbour(0.2, None, None, 0),
    ]


def test_candidates_hand_example():
    x_p, x_c = candidates(X, DELTA, 0.2, mixed_neighbours(), **KW)
    x_hat = B - LR * 3 * GB
    torch.testing.assert_close(x_p, 0.2 * X + 0.2 * A + 0.3 * x_hat + 0.1 * X + 0.2 * X + DELTA)
    torch.testing.assert_close(x_c, 0.2 * X + 0.2 * A + 0.3 * X + 0.1 * X + 0.2 * X + DELTA)
    assert torch.equal(blend(x_p, x_c, 0.0), x_c)
    assert torch.equal(blend(x_p, x_c, 1.0), x_p)
    torch.testing.assert_close(blend(x_p, x_c, 0.25), 0.25 * x_p + 0.75 * x_c)


def test_candidates_with_curvature_uses_predict_weights():
    kw = dict(KW, lam=2.0, tolerance=1)
    nbs = [Neighbour(0.5, B, GB, 5)]
    x_p, x_c = candidates(X, DELTA, 0.5, nbs, **kw)
    x_hat = predict_weights(B, GB, 5, LR, 2.0)
    torch.testing.assert_close(x_p, 0.5 * X + 0.5 * x_hat + DELTA)
    torch.testing.assert_close(x_c, X + DELTA)


def test_no_stale_means_equal_candidates():
    nbs = [Neighbour(0.25, A, None, 0), Neighbour(0.25, None, None, 0), Neighbour(0.25, C, None, 40)]
    x_p, x_c = candidates(X, DELTA, 0.25, nbs, **KW)
    assert torch.equal(x_p, x_c)
    assert x_p.data_ptr() != x_c.data_ptr()


def test_dsgd_setting_uses_every_received_neighbour_as_is():
    big = sys.maxsize
    nbs = [Neighbour(0.3, B, GB, 500), Neighbour(0.3, A, None, 0), Neighbour(0.2, None, None, 0)]
    x_p, x_c = candidates(X, DELTA, 0.2, nbs, lr=LR, lam=0.5, tolerance=big, horizon=big)
    want = 0.2 * X + 0.3 * B + 0.3 * A + 0.2 * X + DELTA
    torch.testing.assert_close(x_p, want)
    torch.testing.assert_close(x_c, want)


@pytest.mark.parametrize("theta", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("lam", [0.0, 0.8])
def test_mix_with_equal_thetas_is_blend_of_candidates(theta, lam):
    nbs = mixed_neighbours() + [Neighbour(0.1, A, B, 2)]
    kw = dict(KW, lam=lam)
    x_p, x_c = candidates(X, DELTA, 0.1, nbs, **kw)
    got = mix(X, DELTA, 0.1, nbs, [theta] * len(nbs), **kw)
    torch.testing.assert_close(got, blend(x_p, x_c, theta), rtol=1e-14, atol=1e-14)


def test_mix_per_neighbour_thetas_hand_computation():
    nbs = [Neighbour(0.2, A, None, 0), Neighbour(0.3, B, GB, 3), Neighbour(0.25, C, A, 2), Neighbour(0.05, C, None, 99)]
    thetas = [0.9, 0.75, 0.2, 0.6]  # only the two stale entries matter
    seen = {}
    got = mix(X, DELTA, 0.2, nbs, thetas, **KW, on_predict=lambda i, x_hat: seen.__setitem__(i, x_hat.clone()))
    hat_b, hat_c = B - LR * 3 * GB, C - LR * 2 * A
    want = 0.2 * X + 0.2 * A + 0.3 * (0.75 * hat_b + 0.25 * X) + 0.25 * (0.2 * hat_c + 0.8 * X) + 0.05 * X + DELTA
    torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-14)
    assert sorted(seen) == [1, 2]
    torch.testing.assert_close(seen[1], hat_b)
    torch.testing.assert_close(seen[2], hat_c)


def test_mix_theta_zero_skips_prediction_unless_observed():
    nbs = [Neighbour(0.5, B, torch.full((3,), float("nan"), dtype=F64), 3)]
    out = mix(X, DELTA, 0.5, nbs, [0.0], **KW)
    torch.testing.assert_close(out, X + DELTA)
    calls = []
    out = mix(X, DELTA, 0.5, nbs, [0.0], **KW, on_predict=lambda i, h: calls.append(i))
    assert calls == [0]
    torch.testing.assert_close(out, X + DELTA)  # the NaN prediction was made but not mixed in


def test_mix_argument_errors():
    with pytest.raises(ValueError):
        mix(X, DELTA, 0.2, mixed_neighbours(), [0.5], **KW)
    with pytest.raises(ValueError):
        mix(X, DELTA, 0.2, mixed_neighbours(), [0.5, 1.5, 0.5, 0.5], **KW)


@pytest.mark.parametrize("theta", [-0.01, 1.01, float("nan")])
def test_blend_rejects_theta_outside_unit_interval(theta):
    with pytest.raises(ValueError):
        blend(X, X, theta)


# ---------------------------------------------------------------- inputs untouched, dtypes


def _snapshot(*tensors):
    return [t.clone() for t in tensors]


def test_inputs_untouched():
    nbs = mixed_neighbours() + [Neighbour(0.1, A, B, 2)]
    watched = [X, DELTA, A, B, GB, C]
    before = _snapshot(*watched)
    predict_weights(B, GB, 3, LR, 0.7, lam_mode="adaptive", segments=[1, 2])
    predict_weights(B, GB, 3, LR, 0.7)
    predict_weights(B, None, 3, LR, 0.7).add_(5.0)
    for lam in (0.0, 0.7):
        x_p, x_c = candidates(X, DELTA, 0.1, nbs, **dict(KW, lam=lam))
        x_p.add_(1.0), x_c.add_(1.0)
        mix(X, DELTA, 0.1, nbs, [0.5] * len(nbs), **dict(KW, lam=lam), on_predict=lambda i, x_hat: None).add_(1.0)
    tracker = SubstitutionTracker()
    tracker.record(0, B, X)
    tracker.observe(1, A)
    for old, new in zip(before, watched):
        assert torch.equal(old, new)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_preserved_and_float32_matches_float64(dtype):
    def conv(t):
        return None if t is None else t.to(dtype)

    nbs = [
        Neighbour(n.weight, conv(n.x), conv(n.grad), n.staleness)
        for n in mixed_neighbours() + [Neighbour(0.1, A, B, 2)]
    ]
    kw = dict(KW, lam=0.6)
    outs = [
        predict_weights(conv(B), conv(GB), 3, LR, 0.6, lam_mode="adaptive"),
        *candidates(conv(X), conv(DELTA), 0.1, nbs, **kw),
        mix(conv(X), conv(DELTA), 0.1, nbs, [0.4] * 5, **kw),
        phi(torch.tensor([0.0, 0.5], dtype=dtype), 3),
    ]
    ref_nbs = mixed_neighbours() + [Neighbour(0.1, A, B, 2)]
    refs = [
        predict_weights(B, GB, 3, LR, 0.6, lam_mode="adaptive"),
        *candidates(X, DELTA, 0.1, ref_nbs, **kw),
        mix(X, DELTA, 0.1, ref_nbs, [0.4] * 5, **kw),
        phi(t64(0.0, 0.5), 3),
    ]
    for out, ref in zip(outs, refs):
        assert out.dtype == dtype
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    dev = torch.device("cuda")
    nbs = [
        Neighbour(
            n.weight, None if n.x is None else n.x.to(dev), None if n.grad is None else n.grad.to(dev), n.staleness
        )
        for n in mixed_neighbours()
    ]
    kw = dict(KW, lam=0.6, lam_mode="adaptive", segments=[1, 2])
    got = mix(X.to(dev), DELTA.to(dev), 0.2, nbs, [0.5] * 4, **kw)
    assert got.device.type == "cuda"
    want = mix(X, DELTA, 0.2, mixed_neighbours(), [0.5] * 4, **kw)
    torch.testing.assert_close(got.cpu(), want)


# ---------------------------------------------------------------- PV


def test_pv_choose():
    assert pv_choose(0.1, 0.2) is True
    assert pv_choose(0.3, 0.2) is False
    assert pv_choose(0.2, 0.2) is False
    assert pv_choose(float("nan"), 0.2) is False
    assert pv_choose(0.2, float("nan")) is True
    assert pv_choose(float("nan"), float("nan")) is False


# ---------------------------------------------------------------- SubstitutionTracker

TRUTH = torch.zeros(4, dtype=F64)
HAT_1 = t64(1.0, 0.0, 0.0, 0.0)  # e_P = 1
SELF_2 = t64(0.0, 2.0, 0.0, 0.0)  # e_C = 2


def test_tracker_theta_from_known_errors_and_mean_squares():
    tr = SubstitutionTracker(beta=0.8)
    assert tr.theta == 0.5 and tr.e_p is None and tr.e_c is None and tr.measurements == 0
    assert tr.record(3, HAT_1, SELF_2)
    assert tr.observe(3, TRUTH)
    assert tr.e_p == pytest.approx(1.0) and tr.e_c == pytest.approx(2.0)
    assert tr.theta == pytest.approx(4.0 / 5.0)
    assert tr.record(4, t64(0.0, 0.0, 3.0, 0.0), t64(0.0, 0.0, 0.0, -1.0))  # e_P = 3, e_C = 1
    assert tr.observe(4, TRUTH)
    e_p2, e_c2 = 0.8 * 1.0 + 0.2 * 9.0, 0.8 * 4.0 + 0.2 * 1.0  # averages of the squares
    assert tr.e_p == pytest.approx(math.sqrt(e_p2)) and tr.e_c == pytest.approx(math.sqrt(e_c2))
    assert tr.theta == pytest.approx(e_c2 / (e_p2 + e_c2))
    assert tr.measurements == 2


def test_tracker_theta_minimises_the_measured_error_of_the_blend():
    # Correlated errors: both substitutes miss the truth in the same direction (coordinate 0).
    gen = torch.Generator().manual_seed(5)
    tr = SubstitutionTracker(beta=0.9)
    pairs = []
    for t in range(40):
        shared = torch.zeros(8, dtype=F64)
        shared[0] = 2.0 + torch.rand((), generator=gen, dtype=F64)
        e_p = shared + 0.8 * torch.randn(8, generator=gen, dtype=F64)
        e_c = shared + 0.3 * torch.randn(8, generator=gen, dtype=F64)
        pairs.append((e_p, e_c))
        assert tr.record(t, e_p, e_c) and tr.observe(t, torch.zeros(8, dtype=F64))
    weights = [0.9 ** (len(pairs) - 1 - i) * (0.1 if i else 1.0) for i in range(len(pairs))]

    def blend_error(theta):  # the same averages the tracker keeps, of ‖θ e_P + (1 − θ) e_C‖²
        return sum(w * torch.sum((theta * p + (1 - theta) * c) ** 2).item() for w, (p, c) in zip(weights, pairs))

    grid = [i / 1000 for i in range(1001)]
    best = min(grid, key=blend_error)
    assert tr.cross is not None and tr.cross > 0
    assert abs(tr.theta - best) <= 1e-3
    independent = tr.e_c**2 / (tr.e_p**2 + tr.e_c**2)
    assert blend_error(tr.theta) < blend_error(independent)


def test_tracker_theta_is_clamped_to_the_unit_interval():
    truth = torch.zeros(2, dtype=F64)
    worse = SubstitutionTracker()  # x̂ further out on the same side as x^j: no weight for it
    worse.record(1, t64(3.0, 0.0), t64(1.0, 0.0))
    worse.observe(1, truth)
    assert worse.theta == 0.0
    better = SubstitutionTracker()  # x̂ closer than x^j on the same side: all weight for it
    better.record(1, t64(0.5, 0.0), t64(2.0, 0.0))
    better.observe(1, truth)
    assert better.theta == 1.0
    same = SubstitutionTracker()  # both substitutes the same vector: any θ blends the same
    same.record(1, t64(1.0, 1.0), t64(1.0, 1.0))
    same.observe(1, truth)
    assert same.theta == 0.5


def test_tracker_blend_minimises_the_measured_error_over_theta_and_reach():
    # The truth lies between x^j and the stale copy, and the roll-forward overshoots sideways:
    # the best blend moves part of the way to the copy and takes little of the roll-forward.
    gen = torch.Generator().manual_seed(11)
    tr = SubstitutionTracker(beta=0.9)
    samples = []
    for t in range(60):
        noise = lambda s: s * torch.randn(6, generator=gen, dtype=F64)  # noqa: E731
        truth = noise(1.0)
        x_self = truth + torch.tensor([1.0, 0, 0, 0, 0, 0], dtype=F64) + noise(0.2)
        x_stale = truth - torch.tensor([0.5, 0, 0, 0, 0, 0], dtype=F64) + noise(0.2)
        x_hat = x_stale + torch.tensor([0, 2.0, 0, 0, 0, 0], dtype=F64) + noise(0.2)
        samples.append((x_hat - truth, x_self - truth, x_stale - truth))
        assert tr.record(t, x_hat, x_self, x_stale) and tr.observe(t, truth)
    weights = [0.9 ** (len(samples) - 1 - i) * (0.1 if i else 1.0) for i in range(len(samples))]

    def error(theta, reach):  # ‖x^j + θ (x_s + r ρ − x^j) − x‖², averaged as the tracker does
        return sum(
            w * torch.sum((c + theta * (s + reach * (p - s) - c)) ** 2).item() for w, (p, c, s) in zip(weights, samples)
        )

    grid = [i / 100 for i in range(101)]
    best = min(((a, r) for a in grid for r in grid), key=lambda ar: error(*ar))
    theta, reach = tr.blend
    assert (theta, reach) == (tr.theta, tr.reach)
    assert error(theta, reach) <= error(*best) + 1e-9
    assert abs(theta - best[0]) <= 0.02 and abs(reach - best[1]) <= 0.05
    assert 0.3 < theta < 1.0 and reach < 0.3
    # The rule restricted to r = 1 (the blend with x̂ alone) does worse on the same records.
    assert error(theta, reach) < min(error(a, 1.0) for a in grid)


@pytest.mark.parametrize("top", [0.05, 0.3, 1.0])
def test_tracker_blend_within_a_smaller_theta_takes_the_best_share_of_the_roll_forward_for_it(top):
    # The stale copy lies beyond the truth and the roll-forward goes further that way and sideways:
    # with θ free the best blend moves 2/3 of the way and takes none of it; held to a smaller θ, some
    # of the roll-forward is worth taking.
    gen = torch.Generator().manual_seed(5)
    tr = SubstitutionTracker(beta=0.9)
    cs, us, rhos = [], [], []
    for t in range(60):
        noise = lambda s: s * torch.randn(6, generator=gen, dtype=F64)  # noqa: E731
        truth = noise(1.0)
        x_self = truth + torch.tensor([1.0, 0, 0, 0, 0, 0], dtype=F64) + noise(0.05)
        x_stale = truth + torch.tensor([-0.5, 0, 0, 0, 0, 0], dtype=F64) + noise(0.05)
        x_hat = x_stale + torch.tensor([-1.0, 1.5, 0, 0, 0, 0], dtype=F64) + noise(0.05)
        cs.append(x_self - truth), us.append(x_stale - x_self), rhos.append(x_hat - x_stale)
        assert tr.record(t, x_hat, x_self, x_stale) and tr.observe(t, truth)
    w = torch.tensor([0.9 ** (len(cs) - 1 - i) * (0.1 if i else 1.0) for i in range(len(cs))], dtype=F64)
    c, u, rho = torch.stack(cs), torch.stack(us), torch.stack(rhos)

    def error(theta, reach):  # ‖x^j + θ (x_s + r ρ − x^j) − x‖², averaged as the tracker does
        return float((w * ((c + theta * (u + reach * rho)) ** 2).sum(1)).sum())

    grid = [i / 100 for i in range(101)]
    best = min(((top * a, r) for a in grid for r in grid), key=lambda ar: error(*ar))
    theta, reach = tr.within(top)
    assert 0.0 <= theta <= top and 0.0 <= reach <= 1.0
    assert error(theta, reach) <= error(*best) + 1e-9
    free_theta, free_reach = tr.blend
    assert free_theta == pytest.approx(2 / 3, abs=0.05) and free_reach < 0.05
    if top < free_theta:
        # holding θ and keeping the share chosen for the free θ errs more
        assert theta == pytest.approx(top) and reach > 0.3
        assert error(theta, reach) < error(top, free_reach) - 1e-3
    else:
        assert (theta, reach) == (free_theta, free_reach)
    assert SubstitutionTracker().within(0.2) == (0.2, 1.0), "before any measurement: 0.5, held to the bound"


def test_tracker_without_the_stale_copy_keeps_the_whole_roll_forward():
    tr = SubstitutionTracker()
    tr.record(1, t64(3.0, 0.0), t64(1.0, 0.0))  # no x_s: θ along x̂ − x^j only
    tr.observe(1, t64(0.0, 0.0))
    assert tr.blend == (0.0, 1.0)


def test_tracker_loads_a_state_of_the_rule_without_the_gram_matrix():
    # What the rule that averaged E_P², E_C² and E_PC alone wrote: e_P = 1, e_C = 2, orthogonal.
    state = SubstitutionTracker().state_dict() | {"e_p": 1.0, "e_c": 2.0, "cross": 0.0, "measurements": 1}
    del state["gram"], state["split"]
    old = SubstitutionTracker()
    old.load_state_dict(state)
    assert old.e_p == pytest.approx(1.0) and old.e_c == pytest.approx(2.0) and old.cross == pytest.approx(0.0)
    assert old.theta == pytest.approx(4.0 / 5.0) and old.reach == 1.0
    del state["cross"]  # and the rule before it, without the cross term
    older = SubstitutionTracker()
    older.load_state_dict(state)
    assert older.theta == pytest.approx(4.0 / 5.0)


def test_mix_with_reaches_takes_part_of_the_roll_forward():
    x, delta = t64(1.0, 1.0), t64(0.0, 0.0)
    stale = Neighbour(0.25, t64(3.0, 5.0), t64(-2.0, 0.0), 2)  # x̂ = x_s − lr·τ·g = (3 + 0.4, 5)
    kw = dict(lr=0.1, lam=0.0, tolerance=0, horizon=16)
    got = mix(x, delta, 0.75, [stale], [0.6], reaches=[0.25], **kw)
    x_hat = t64(3.4, 5.0)
    sub = x_hat * 0.25 + stale.x * 0.75  # x_s + r (x̂ − x_s)
    want = 0.75 * x + 0.25 * (0.6 * sub + 0.4 * x)
    assert torch.allclose(got, want, rtol=0, atol=1e-12)
    assert torch.equal(
        mix(x, delta, 0.75, [stale], [0.6], reaches=[1.0], **kw), mix(x, delta, 0.75, [stale], [0.6], **kw)
    )
    with pytest.raises(ValueError, match="reach"):
        mix(x, delta, 0.75, [stale], [0.6], reaches=[1.5], **kw)


def test_tracker_default_memory_is_long():
    assert SubstitutionTracker().beta == 0.97


def test_tracker_measures_each_record_against_the_message_of_its_own_step():
    tr = SubstitutionTracker(beta=0.5)
    truth = {t: torch.full((4,), float(t), dtype=F64) for t in range(10)}
    for t in (5, 6, 7):  # substitutes for steps 5..7: x̂ off by t/10, own weights off by 1
        assert tr.record(t, truth[t] + t / 10, truth[t] - 1.0)
    assert tr.pending_steps == (5, 6, 7) and tr.pending_step == 5
    assert not tr.observe(4, truth[4])  # no record of step 4; later ones stay
    assert tr.pending_steps == (5, 6, 7)
    assert tr.observe(6, truth[6])  # measures exactly step 6 and discards the older step 5
    assert tr.pending_steps == (7,) and tr.measurements == 1
    assert (tr.e_p, tr.e_c) == pytest.approx((0.6 * 2, 1.0 * 2))  # ‖·‖ of 4 equal entries
    assert not tr.observe(6, truth[6])  # measured once only
    assert tr.observe(7, truth[7]) and tr.pending_steps == ()
    assert tr.e_p == pytest.approx(2 * math.sqrt(0.5 * 0.6**2 + 0.5 * 0.7**2))
    assert not tr.observe(9, truth[9])
    assert tr.measurements == 2


def test_tracker_one_record_per_step():
    tr = SubstitutionTracker()
    assert tr.record(2, HAT_1, SELF_2)
    assert not tr.record(2, t64(7.0, 7.0, 7.0, 7.0), t64(7.0, 7.0, 7.0, 7.0))  # the first stays
    assert tr.observe(2, TRUTH)
    assert (tr.e_p, tr.e_c) == pytest.approx((1.0, 2.0))


def test_tracker_memory_bounded_by_horizon():
    tr = SubstitutionTracker(horizon=3)
    for t in range(10):
        assert tr.record(t, HAT_1, SELF_2)
        assert len(tr.pending_steps) <= 3
    assert tr.pending_steps == (7, 8, 9)
    assert not tr.record(6, HAT_1, SELF_2)  # as old as the horizon: could never be measured
    assert tr.record(10, HAT_1, SELF_2) and tr.pending_steps == (8, 9, 10)
    # a message exactly H steps behind the newest record still finds its record
    assert tr.observe(8, TRUTH) and tr.measurements == 1


def test_tracker_sketch_uses_one_coordinate_subset_for_every_vector():
    n, m = 10_000, 500
    gen = torch.Generator().manual_seed(3)
    truth = torch.randn(n, generator=gen, dtype=F64)
    d_p, d_c = torch.randn(n, generator=gen, dtype=F64), 3 * torch.randn(n, generator=gen, dtype=F64)
    tr = SubstitutionTracker(sketch_size=m, seed=7)
    tr.record(0, truth + d_p, truth + d_c)
    # the sketch keeps m coordinates, not n, whatever the model size
    assert all(v.numel() == m for v in tr.state_dict()["records"][0])
    assert tr.observe(0, truth)
    idx = tr.state_dict()["index"]
    assert idx.numel() == m and idx.unique().numel() == m
    scale = math.sqrt(n / m)
    # exact on the subset: a different subset for the truth would leave ‖truth[S] − truth[S']‖ in it
    assert tr.e_p == pytest.approx(scale * torch.linalg.vector_norm(d_p[idx]).item(), rel=1e-12)
    assert tr.e_c == pytest.approx(scale * torch.linalg.vector_norm(d_c[idx]).item(), rel=1e-12)
    # and an estimate of the full norms
    assert tr.e_p == pytest.approx(torch.linalg.vector_norm(d_p).item(), rel=0.15)
    assert tr.e_c == pytest.approx(torch.linalg.vector_norm(d_c).item(), rel=0.15)
    # the same seed draws the same subset in another tracker (e.g. after a restart)
    other = SubstitutionTracker(sketch_size=m, seed=7)
    other.record(0, truth + d_p, truth + d_c)
    other.observe(0, truth)
    assert torch.equal(other.state_dict()["index"], idx) and other.e_p == tr.e_p
    with pytest.raises(ValueError, match="elements"):
        tr.record(1, truth[:10], truth[:10])


def test_tracker_float32_norms_against_nonzero_truth():
    truth = torch.full((1000,), 3.0)
    tr = SubstitutionTracker()
    tr.record(0, truth + 0.001, truth - 0.002)
    tr.observe(0, truth)
    assert tr.e_p == pytest.approx(0.001 * math.sqrt(1000), rel=1e-3)
    assert tr.e_c == pytest.approx(0.002 * math.sqrt(1000), rel=1e-3)


def test_tracker_stores_copies():
    tr = SubstitutionTracker(beta=0.8)
    for step, (hat, own) in enumerate([(HAT_1, SELF_2), (SELF_2, HAT_1)]):
        x_hat, x_self, truth = hat.clone(), own.clone(), TRUTH.clone()
        tr.record(step, x_hat, x_self)
        x_hat.fill_(100.0)
        x_self.fill_(100.0)
        tr.observe(step, truth)
        assert torch.equal(truth, TRUTH)
        assert torch.equal(x_hat, torch.full_like(x_hat, 100.0))
    assert (tr.e_p, tr.e_c) == pytest.approx((math.sqrt(0.8 + 0.8), math.sqrt(3.2 + 0.2)))


def test_tracker_state_dict_round_trip():
    n = 6000  # more than the sketch: the subset must survive the round trip
    gen = torch.Generator().manual_seed(0)
    vec = lambda: torch.randn(n, generator=gen, dtype=F64)  # noqa: E731
    truth = vec()
    tr = SubstitutionTracker(beta=0.6, eps=1e-9, horizon=5, sketch_size=100, seed=4)
    tr.record(1, vec(), vec())
    tr.observe(1, vec())
    tr.record(7, vec(), vec())
    tr.record(8, vec(), vec())
    buf = io.BytesIO()
    torch.save(tr.state_dict(), buf)
    buf.seek(0)
    clone = SubstitutionTracker()
    clone.load_state_dict(torch.load(buf))
    assert (clone.beta, clone.eps, clone.horizon, clone.sketch_size, clone.seed) == (0.6, 1e-9, 5, 100, 4)
    assert clone.pending_steps == (7, 8) and clone.measurements == 1 and clone.theta == tr.theta
    assert tr.observe(8, truth) and clone.observe(8, truth)
    assert (clone.e_p, clone.e_c, clone.cross, clone.theta) == (tr.e_p, tr.e_c, tr.cross, tr.theta)
    assert clone.pending_steps == tr.pending_steps == ()


def test_tracker_rejects_bad_arguments():
    for kwargs in ({"beta": 1.0}, {"beta": -0.1}, {"horizon": 0}, {"sketch_size": 0}):
        with pytest.raises(ValueError):
            SubstitutionTracker(**kwargs)


def test_tracker_ignores_non_finite_measurements():
    tr = SubstitutionTracker()
    for bad in (float("nan"), float("inf")):
        assert tr.record(1, HAT_1, SELF_2)
        truth = TRUTH.clone()
        truth[2] = bad
        assert not tr.observe(1, truth)
        assert tr.pending_steps == () and tr.measurements == 0
        assert tr.e_p is None and tr.theta == 0.5
    assert tr.record(2, HAT_1, SELF_2) and tr.observe(2, TRUTH)
    nan_hat, inf_self = t64(float("nan"), 0.0, 0.0, 0.0), t64(0.0, float("-inf"), 0.0, 0.0)
    for t, (bad_hat, bad_self) in enumerate(((nan_hat, SELF_2), (HAT_1, inf_self)), start=3):
        assert tr.record(t, bad_hat, bad_self)
        assert not tr.observe(t, TRUTH)
        assert tr.pending_steps == ()
    assert tr.measurements == 1 and (tr.e_p, tr.e_c) == pytest.approx((1.0, 2.0))
    assert math.isfinite(tr.e_p) and math.isfinite(tr.e_c) and 0.0 <= tr.theta <= 1.0
    overflow = t64(1e308, 0.0, 0.0, 0.0)  # finite vectors whose difference overflows
    assert tr.record(5, overflow, SELF_2) and not tr.observe(5, -overflow)
    assert tr.measurements == 1 and 0.0 <= tr.theta <= 1.0
    # an error whose square overflows is left out too; a large one whose square fits counts
    assert tr.record(6, t64(1e200, 0.0, 0.0, 0.0), SELF_2) and not tr.observe(6, TRUTH)
    assert tr.measurements == 1
    assert tr.record(7, t64(1e150, 0.0, 0.0, 0.0), SELF_2) and tr.observe(7, TRUTH)
    assert math.isfinite(tr.e_p) and tr.theta < 1e-200


# ---------------------------------------------------------------- out buffers


def test_candidates_and_mix_write_into_out_buffers(single_thread):
    nbs = mixed_neighbours() + [Neighbour(0.1, A, B, 2)]
    for lam in (0.0, 0.7):
        kw = dict(KW, lam=lam)
        bufs = (torch.full_like(X, 7.0), torch.full_like(X, 7.0))
        got = candidates(X, DELTA, 0.1, nbs, out=bufs, **kw)
        assert got[0] is bufs[0] and got[1] is bufs[1]
        for g, want in zip(got, candidates(X, DELTA, 0.1, nbs, **kw)):
            assert torch.equal(g, want)
        buf = torch.full_like(X, 7.0)
        thetas = [0.5, 0.3, 0.5, 0.5, 0.8]
        assert mix(X, DELTA, 0.1, nbs, thetas, out=buf, **kw) is buf
        assert torch.equal(buf, mix(X, DELTA, 0.1, nbs, thetas, **kw))


def test_candidates_out_buffers_without_stale_neighbours(single_thread):
    bufs = (torch.empty_like(X), torch.empty_like(X))
    x_p, x_c = candidates(X, DELTA, 0.5, [Neighbour(0.5, A, None, 0)], out=bufs, **KW)
    assert x_p is bufs[0] and x_c is bufs[1] and torch.equal(x_p, x_c)


def test_out_buffers_must_not_overlap_inputs(single_thread):
    nbs = [Neighbour(0.3, B.clone(), GB.clone(), 3), Neighbour(0.3, A.clone(), None, 0)]
    whole = torch.zeros(7, dtype=F64)
    inputs = {"x": X.clone(), "delta": DELTA.clone()}
    for _what, bad in [
        ("x", inputs["x"]),
        ("delta", inputs["delta"]),
        ("stale x", nbs[0].x),
        ("grad", nbs[0].grad),
        ("fresh x", nbs[1].x),
    ]:
        with pytest.raises(ValueError, match="overlap"):
            candidates(inputs["x"], inputs["delta"], 0.4, nbs, out=(bad, torch.empty_like(X)), **KW)
        with pytest.raises(ValueError):
            candidates(inputs["x"], inputs["delta"], 0.4, nbs, out=(torch.empty_like(X), bad), **KW)
        with pytest.raises(ValueError):
            mix(inputs["x"], inputs["delta"], 0.4, nbs, [0.5, 0.5], out=bad, **KW)
    shared = torch.empty_like(X)
    with pytest.raises(ValueError):
        candidates(X, DELTA, 0.4, nbs, out=(shared, shared), **KW)
    x_view, partly = whole[0:3], whole[2:5]  # one element in common
    with pytest.raises(ValueError):
        mix(x_view, DELTA, 0.4, nbs, [0.5, 0.5], out=partly, **KW)
    mix(x_view, DELTA, 0.4, nbs, [0.5, 0.5], out=whole[3:6], **KW)  # disjoint views are fine
    for wrong in (torch.empty(4, dtype=F64), torch.empty(3, dtype=torch.float32)):
        with pytest.raises(ValueError):
            mix(X, DELTA, 0.4, nbs, [0.5, 0.5], out=wrong, **KW)
        with pytest.raises(ValueError):
            candidates(X, DELTA, 0.4, nbs, out=(wrong, torch.empty_like(X)), **KW)


def test_small_vectors_never_reach_the_kernel(single_thread, monkeypatch):
    from pcasgd_mpi import fused, rule

    monkeypatch.setattr(fused, "available", lambda: pytest.fail("numba was asked for"))
    assert X.numel() < rule.FUSED_MIN_NUMEL
    nbs = mixed_neighbours() + [Neighbour(0.1, A, B, 2)]
    candidates(X, DELTA, 0.1, nbs, **dict(KW, lam=0.7))
    mix(X, DELTA, 0.1, nbs, [0.5] * 5, **dict(KW, lam=0.7))
    predict_weights(B, GB, 4, LR, 0.7)


def test_stable_theta_is_half_the_stability_edge_of_the_delayed_loop_and_at_most_one():
    from pcasgd_mpi.rule import stable_theta

    assert stable_theta(0, 4 / 3) == 0.75
    assert stable_theta(8, 4 / 3) == pytest.approx(0.5 * 2 * math.sin(math.pi / 34) * 3 / 4)
    assert stable_theta(1, 0.25) == 1.0
    assert stable_theta(2, 4 / 3) > stable_theta(3, 4 / 3) > stable_theta(8, 4 / 3)

    def peak(gain: float, d: int) -> float:  # e_{k+1} = e_k − gain · e_{k−d}
        e = [1.0] * (d + 1)
        for _ in range(3000):
            e = e[1:] + [e[-1] - gain * e[0]]
        return max(map(abs, e))

    for d in (2, 8):
        assert peak(stable_theta(d, 1.0), d) < 1e-3, "half the edge: decays"
        assert peak(2.1 * stable_theta(d, 1.0), d) > 1e3, "past the edge: grows"
    with pytest.raises(ValueError):
        stable_theta(-1, 1.0)


def test_quasi_global_momentum_lowers_the_stability_edge_and_the_edge_bounds_an_interval():
    from pcasgd_mpi.rule import loop_radius, stable_edge, stable_theta

    for d in (1, 2, 8):  # without momentum the bisection finds the closed form
        assert stable_edge(d) == pytest.approx(2 * math.sin(math.pi / (2 * (2 * d + 1))))
        assert loop_radius(0.99 * stable_edge(d), d) < 1 < loop_radius(1.01 * stable_edge(d), d)
    assert stable_edge(8, 0.9) == pytest.approx(0.075, abs=1e-3)
    for d in range(1, 17):
        edge = stable_edge(d, 0.9)
        assert edge < stable_edge(d)
        assert all(loop_radius(f / 50 * edge, d, 0.9) < 1 for f in range(1, 50)), d
        assert loop_radius(1.02 * edge, d, 0.9) > 1, d
    assert stable_theta(8, 4 / 3, momentum=0.9) == pytest.approx(0.5 * stable_edge(8, 0.9) * 3 / 4)

    def peak(gain: float, d: int, beta: float) -> float:  # the loop itself, stepped
        e, v = [1.0] * (d + 1), 0.0
        for _ in range(6000):
            nxt = e[-1] - beta * v - gain * e[0]
            v = beta * v + (1 - beta) * (e[-1] - nxt)
            e = e[1:] + [nxt]
        return max(map(abs, e))

    # the θ of the loop without momentum, 0.092 at τ = 8, is past this edge: it grows
    assert peak(stable_edge(8) / 2, 8, 0.9) > 1e3
    assert peak(stable_edge(8, 0.9) / 2, 8, 0.9) < 1e-2
    with pytest.raises(ValueError):
        stable_edge(2, 1.0)


def test_mix_momentum_is_the_convex_mix_of_the_buffers_that_count():
    """Fresh and stale neighbours count with W; a dropped one, one never heard from and one whose
    message has no momentum count as the agent's own buffer. The input is not written."""
    m = torch.tensor([1.0, -2.0])
    fresh = Neighbour(0.2, torch.zeros(2), torch.tensor([3.0, 0.0]), 0)
    stale = Neighbour(0.3, torch.zeros(2), torch.tensor([0.0, 4.0]), 5)
    dropped = Neighbour(0.1, torch.zeros(2), torch.tensor([100.0, 100.0]), 17)
    never = Neighbour(0.1, None, None, 0)
    no_slope = Neighbour(0.1, torch.zeros(2), None, 0)
    before = m.clone()
    got = mix_momentum(m, [fresh, stale, dropped, never, no_slope], tolerance=0, horizon=16)
    expected = 0.5 * before + 0.2 * torch.tensor([3.0, 0.0]) + 0.3 * torch.tensor([0.0, 4.0])
    torch.testing.assert_close(got, expected)
    assert torch.equal(m, before)
    torch.testing.assert_close(mix_momentum(m, [], tolerance=0, horizon=16), m)
