"""The numba kernel of pcasgd_mpi.fused against the torch code of pcasgd_mpi.rule and exact values."""

import math
import sys
from fractions import Fraction

import pytest
import torch

from pcasgd_mpi import fused, rule
from pcasgd_mpi.rule import Neighbour, SubstitutionTracker, candidates, mix, predict_weights

pytestmark = pytest.mark.skipif(not fused.available(), reason="numba is not installed")

F32, F64 = torch.float32, torch.float64
LR = 0.1
TOL = {F32: dict(rtol=2e-6, atol=1e-7), F64: dict(rtol=1e-13, atol=1e-15)}
# c = α·λ·g² per element; the last two are clamped to 1
C_TARGETS = [0.0, 1e-12, 1e-6, 0.02, 0.3, 0.9, 1.0, 2.5, 40.0]
TAUS = [2, 3, 4, 5, 6, 7, 8, 9, 16, 17, 33]  # inline φ up to fused.INLINE_MAX, scratch rows beyond


@pytest.fixture
def kernel_calls(monkeypatch):
    """Sends every call that qualifies through the kernel and records the kernel's launches, so
    that a test can tell that the kernel ran rather than the torch code."""
    monkeypatch.setattr(rule, "FUSED_MIN_NUMEL", 0)
    calls = []
    launcher = fused._launcher

    def counting(dtype):
        launch = launcher(dtype)

        def counted(*args):
            calls.append(args)
            return launch(*args)

        return counted

    monkeypatch.setattr(fused, "_launcher", counting)
    return calls


@pytest.fixture
def torch_only(monkeypatch):
    monkeypatch.setattr(rule, "FUSED_MIN_NUMEL", sys.maxsize)
    monkeypatch.setattr(fused, "_launcher", lambda dtype: pytest.fail("the kernel ran"))


def grad_for(c_targets, lam, dtype=F64):
    g = torch.tensor([math.sqrt(c / (LR * lam)) for c in c_targets], dtype=F64)
    g[1::2] *= -1
    return g.to(dtype)


def exact_prediction(x_s, g, tau, lr, lam):
    """x_s − α·g·φ(clamp(α·λ·g², 0, 1), τ) in rational arithmetic, from the values as stored."""
    out = []
    for xv, gv in zip(x_s.double().tolist(), g.double().tolist()):
        c = min(max(Fraction(lr) * Fraction(lam) * Fraction(gv) ** 2, Fraction(0)), Fraction(1))
        phi = Fraction(tau) if c == 0 else (1 - (1 - c) ** tau) / c
        out.append(float(Fraction(xv) - Fraction(lr) * Fraction(gv) * phi))
    return torch.tensor(out, dtype=F64)


def rollout(x_s, g, tau, lr, lam):
    """τ literal steps of y_{t+1} = y_t − α(g + λ g⊙g⊙(y_t − x_s)), where α·λ·g² > 1 replaced by
    the λ that makes it 1 (the clamp)."""
    lam_elem = torch.where(lr * lam * g * g > 1, 1.0 / (lr * g * g), torch.full_like(g, lam))
    y = x_s.clone()
    for _ in range(tau):
        y = y - lr * (g + lam_elem * g * g * (y - x_s))
    return y


# ---------------------------------------------------------------- the kernel itself


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("tau", TAUS)
def test_predict_matches_exact_values(single_thread, tau, dtype):
    lam = 0.04
    g = grad_for(C_TARGETS, lam, dtype)
    x_s = torch.linspace(-1.0, 2.0, len(C_TARGETS), dtype=dtype)
    got = fused.predict(x_s, g, tau, LR, lam)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), exact_prediction(x_s, g, tau, LR, lam), **TOL[dtype])
    if dtype is F64:
        torch.testing.assert_close(got, rollout(x_s, g, tau, LR, lam), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("tau", [2, 5, 16])
def test_lambda_zero_is_linear_extrapolation(single_thread, tau):
    x_s, g = torch.tensor([1.0, -2.0, 3.5], dtype=F64), torch.tensor([0.3, -4.0, 1e-9], dtype=F64)
    torch.testing.assert_close(fused.predict(x_s, g, tau, LR, 0.0), x_s - LR * tau * g, rtol=1e-15, atol=1e-15)


def test_clamp_at_c_one_gives_one_step():
    g = grad_for([1.0, 2.5, 40.0], 1.0)
    x_s = torch.zeros(3, dtype=F64)
    torch.testing.assert_close(fused.predict(x_s, g, 9, LR, 1.0), -LR * g)  # φ(1, τ) = 1


def test_combine_and_add_against_formula(single_thread):
    n = 7
    gen = torch.Generator().manual_seed(3)
    base, y, x1, x2, x3 = (torch.randn(n, generator=gen, dtype=F64) for _ in range(5))
    g1, g2, g3 = (torch.randn(n, generator=gen, dtype=F64) * 2 for _ in range(3))
    terms = [(0.2, x1, g1, 2), (0.3, x2, g2, 9), (0.1, x3, g3, 4)]  # three: two kernel calls
    hats = [predict_weights(x, g, tau, LR, 0.7) for _, x, g, tau in terms]
    mixed = sum(w * h for (w, *_), h in zip(terms, hats))
    tol = dict(rtol=1e-13, atol=1e-14)
    got = fused.combine(None, base, -0.6, y, terms, LR, 0.7)
    torch.testing.assert_close(got, base - 0.6 * y + mixed, **tol)
    out_c = torch.empty(n, dtype=F64)
    out = fused.combine(None, base, -0.6, y, terms, LR, 0.7, out_c=out_c, coef_c=1.5)
    torch.testing.assert_close(out_c, base + 1.5 * y, **tol)
    torch.testing.assert_close(out, base + 0.9 * y + mixed, **tol)
    acc = base.clone()
    assert fused.add_predictions_(acc, terms[:1], LR, 0.7) is acc
    torch.testing.assert_close(acc, base + 0.2 * hats[0], **tol)


def test_kernel_argument_errors():
    x = torch.ones(4)
    with pytest.raises(ValueError):
        fused.predict(x, x, 1, LR, 0.1)  # φ(c, 1) = 1 needs no kernel
    with pytest.raises(ValueError):
        fused.predict(x, x, 3, LR, -0.1)
    with pytest.raises(ValueError):
        fused.predict(x, torch.ones(5), 3, LR, 0.1)
    with pytest.raises(ValueError):
        fused.predict(x, x.double(), 3, LR, 0.1)
    with pytest.raises(ValueError):
        fused.predict(torch.ones(4, 2)[:, 0], x, 3, LR, 0.1)
    with pytest.raises(ValueError):
        fused.add_predictions_(x, [], LR, 0.1)
    assert not fused.supports(x.half(), x.half())
    assert fused.supports(x, torch.zeros(4)) and not fused.supports(x, torch.zeros(4, 1))


# ---------------------------------------------------------------- rule through the kernel


def _vectors(n, dtype, count, seed=0, tau=(3, 5, 2, 16, 7, 9, 33)):
    gen = torch.Generator().manual_seed(seed)

    def vec(scale):
        return (torch.randn(n, generator=gen, dtype=F64) * scale).to(dtype)

    x, delta = vec(1.0), vec(0.01)
    # gradients large enough that c spans 0 to beyond the clamp at λ = 0.5
    stale = [Neighbour(0.15, vec(1.0), vec(6.0), tau[i % len(tau)]) for i in range(count)]
    return x, delta, stale


KW = dict(lr=LR, lam=0.5, tolerance=1, horizon=40)


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("n", [1, 5, 511, 512, 513, 1031])
@pytest.mark.parametrize("count", [1, 2, 3, 7])
def test_candidates_and_mix_match_torch_code(single_thread, kernel_calls, monkeypatch, dtype, n, count):
    x, delta, stale = _vectors(n, dtype, count)
    fresh = Neighbour(0.1, (x + 1).clone(), None, 0)
    thetas = [0.25 + 0.1 * i for i in range(count)]
    results = {}
    for path in ("kernel", "torch"):
        if path == "torch":
            monkeypatch.setattr(rule, "FUSED_MIN_NUMEL", sys.maxsize)
        results[path] = [
            *candidates(x, delta, 0.1, stale, **KW),
            *candidates(x, delta, 0.1, [fresh, *stale], **KW),  # fresh: kernel per neighbour
            mix(x, delta, 0.1, stale, thetas, **KW),
            mix(x, delta, 0.1, [fresh, *stale], [0.5, *thetas], **KW),
        ]
        if path == "kernel":
            assert len(kernel_calls) >= 4
            kernel_calls.clear()
    assert not kernel_calls
    tol = dict(rtol=1e-5, atol=1e-5) if dtype is F32 else TOL[F64]  # both round, differently
    for got, want in zip(results["kernel"], results["torch"]):
        assert got.dtype == dtype
        torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("dtype", [F32, F64])
def test_rule_through_kernel_matches_exact_predictions(single_thread, kernel_calls, dtype):
    lam = 0.04
    g = grad_for(C_TARGETS, lam, dtype)
    x = torch.linspace(-1.0, 1.0, len(C_TARGETS), dtype=dtype)
    delta = torch.full_like(x, 0.01)
    x_s = torch.linspace(2.0, -2.0, len(C_TARGETS), dtype=dtype)
    for tau in TAUS:
        nbs = [Neighbour(0.5, x_s, g, tau)]
        x_p, x_c = candidates(x, delta, 0.5, nbs, lr=LR, lam=lam, tolerance=1, horizon=40)
        x_hat = exact_prediction(x_s, g, tau, LR, lam)
        want_p = 0.5 * x.double() + 0.5 * x_hat + delta.double()
        torch.testing.assert_close(x_p.double(), want_p, **TOL[dtype])
        torch.testing.assert_close(x_c.double(), x.double() + delta.double(), **TOL[dtype])
        torch.testing.assert_close(predict_weights(x_s, g, tau, LR, lam).double(), x_hat, **TOL[dtype])
    assert len(kernel_calls) == 2 * len(TAUS)


def test_out_buffers_equal_default_results(single_thread, kernel_calls):
    x, delta, stale = _vectors(600, F32, 2)
    want_p, want_c = candidates(x, delta, 0.2, stale, **KW)
    bufs = (torch.empty_like(x), torch.empty_like(x))
    got = candidates(x, delta, 0.2, stale, out=bufs, **KW)
    assert got[0] is bufs[0] and got[1] is bufs[1]
    assert torch.equal(got[0], want_p) and torch.equal(got[1], want_c)
    want = mix(x, delta, 0.2, stale, [0.3, 0.6], **KW)
    buf = torch.empty_like(x)
    assert mix(x, delta, 0.2, stale, [0.3, 0.6], out=buf, **KW) is buf
    assert torch.equal(buf, want)
    assert len(kernel_calls) == 4


def test_inputs_untouched(single_thread, kernel_calls):
    x, delta, stale = _vectors(700, F32, 3)
    watched = [x, delta, *(t for nb in stale for t in (nb.x, nb.grad))]
    before = [t.clone() for t in watched]
    candidates(x, delta, 0.1, stale, **KW)
    candidates(x, delta, 0.1, stale, out=(torch.empty_like(x), torch.empty_like(x)), **KW)
    mix(x, delta, 0.1, stale, [0.5, 0.2, 1.0], **KW)
    mix(x, delta, 0.1, stale, [0.5, 0.2, 1.0], on_predict=lambda i, h: None, **KW)
    predict_weights(stale[0].x, stale[0].grad, 4, LR, 0.5).add_(1.0)
    assert kernel_calls
    for old, new in zip(before, watched):
        assert torch.equal(old, new)


def test_nan_and_inf_in_grad_reach_the_output(single_thread, kernel_calls):
    x, delta, stale = _vectors(1100, F32, 2)
    g = stale[1].grad.clone()
    g[7], g[900] = float("nan"), float("inf")
    stale[1] = Neighbour(stale[1].weight, stale[1].x, g, stale[1].staleness)
    x_p, x_c = candidates(x, delta, 0.1, stale, **KW)
    assert torch.isnan(x_p[7]) and not torch.isfinite(x_p[900])
    assert torch.isfinite(x_c).all()  # the clipping candidate does not read the slope
    bad = ~torch.isfinite(x_p)
    assert bad.sum() == 2
    out = mix(x, delta, 0.1, stale, [0.5, 0.5], **KW)
    assert torch.isnan(out[7]) and not torch.isfinite(out[900])
    assert torch.isnan(fused.predict(g, g, 3, LR, 0.5)[7])
    assert kernel_calls


# ---------------------------------------------------------------- when the kernel runs


def test_large_vectors_use_the_kernel_by_default(monkeypatch):
    calls = []
    launcher = fused._launcher
    monkeypatch.setattr(fused, "_launcher", lambda dtype: (calls.append(dtype), launcher(dtype))[1])
    x, delta, stale = _vectors(rule.FUSED_MIN_NUMEL, F32, 2)
    candidates(x, delta, 0.2, stale, **KW)
    assert calls == [F32]
    x, delta, stale = _vectors(rule.FUSED_MIN_NUMEL - 1, F32, 2)
    candidates(x, delta, 0.2, stale, **KW)
    assert calls == [F32]


def _cases_for_torch_code():
    x, delta, stale = _vectors(64, F32, 2)
    other = [Neighbour(nb.weight, nb.x.double(), nb.grad.double(), nb.staleness) for nb in stale]
    strided = [Neighbour(nb.weight, torch.stack([nb.x, nb.x], 1)[:, 0], nb.grad, nb.staleness) for nb in stale]
    half = [Neighbour(0.2, stale[0].x.half(), stale[0].grad.half(), 3)]
    return {
        "adaptive λ": (x, delta, stale, dict(KW, lam_mode="adaptive")),
        "λ = 0": (x, delta, stale, dict(KW, lam=0.0)),
        "τ = 1": (x, delta, [Neighbour(0.2, stale[0].x, stale[0].grad, 1)], dict(KW, tolerance=0)),
        "no slope": (x, delta, [Neighbour(0.2, stale[0].x, None, 3)], KW),
        "other dtype": (x, delta, other, KW),
        "not contiguous": (x, delta, strided, KW),
        "float16": (x.half(), delta.half(), half, KW),
    }


@pytest.mark.parametrize("case", list(_cases_for_torch_code()))
def test_torch_code_where_the_kernel_does_not_apply(single_thread, monkeypatch, case):
    x, delta, nbs, kw = _cases_for_torch_code()[case]
    monkeypatch.setattr(rule, "FUSED_MIN_NUMEL", 0)
    monkeypatch.setattr(fused, "_launcher", lambda dtype: pytest.fail("the kernel ran"))
    candidates(x, delta, 0.2, nbs, **kw)
    mix(x, delta, 0.2, nbs, [0.5] * len(nbs), **kw)


def test_torch_code_when_switched_off(single_thread, torch_only):
    x, delta, stale = _vectors(100, F32, 2)
    candidates(x, delta, 0.2, stale, **KW)
    mix(x, delta, 0.2, stale, [0.5, 0.5], **KW)


def test_torch_code_without_numba(single_thread, monkeypatch):
    monkeypatch.setattr(rule, "FUSED_MIN_NUMEL", 0)
    monkeypatch.setattr(fused, "_kernel", None)
    monkeypatch.setattr(fused, "_missing", False)
    monkeypatch.setattr(fused, "_launchers", {})
    monkeypatch.setitem(sys.modules, "numba", None)  # makes `import numba` fail
    assert not fused.available()
    x, delta, stale = _vectors(50, F32, 2)
    want = candidates(x, delta, 0.2, stale, **KW)
    with pytest.raises(RuntimeError):
        fused.predict(stale[0].x, stale[0].grad, 3, LR, 0.5)
    monkeypatch.setattr(rule, "FUSED_MIN_NUMEL", sys.maxsize)
    for got, ref in zip(want, candidates(x, delta, 0.2, stale, **KW)):
        assert torch.equal(got, ref)


def test_tracker_after_kernel_prediction(single_thread, kernel_calls):
    x, delta, stale = _vectors(800, F32, 1)
    tracker = SubstitutionTracker()
    mix(x, delta, 0.5, stale, [0.5], on_predict=lambda i, h: tracker.record(0, h, x), **KW)
    assert kernel_calls and tracker.pending_step == 0
    # The kernel hands out a view of its output buffer: the record must be a copy of it.
    assert tracker.observe(0, stale[0].x)
    assert math.isfinite(tracker.e_p) and 0.0 <= tracker.theta <= 1.0


def test_prepare_loads_the_kernel_only_for_vectors_that_will_use_it():
    big = torch.zeros(rule.FUSED_MIN_NUMEL)
    assert rule.prepare(big, lam=0.04)
    assert rule.prepare(big.double(), lam=0.04)
    assert not rule.prepare(big[:-1], lam=0.04), "below FUSED_MIN_NUMEL the torch code runs"
    assert not rule.prepare(big, lam=0.0), "λ = 0 needs no φ"
    assert not rule.prepare(big, lam=0.04, lam_mode="adaptive")
    assert not rule.prepare(big.half(), lam=0.04)
    assert not fused.prepare(torch.float16)
