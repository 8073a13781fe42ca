"""The PC-ASGD rule as pure tensor functions (no MPI, no training loop).

Section names in the docstrings refer to ALGORITHM.md. Every function works on any floating
dtype and device and never writes into its arguments, so the exchange layer can hand in receive
buffers and parameter views without defensive copies. Outputs are new tensors unless the caller
hands in ``out`` buffers (candidates, mix), which must not overlap any input.

The torch code here is the reference. On large contiguous CPU vectors with a fixed λ, the
prediction terms of stale neighbours (and, where they can be fused with them, the mixing terms
around them) are computed instead by the one-pass kernel of fused.py, see _use_fused; the values
are the same up to rounding.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor

from pcasgd_mpi import fused

from .tracker import SubstitutionTracker  # part of the rule's API, kept in its own module

__all__ = [
    "Neighbour",
    "Status",
    "classify",
    "phi",
    "predict_weights",
    "candidates",
    "blend",
    "pv_choose",
    "mix",
    "mix_momentum",
    "SubstitutionTracker",
    "link_pull",
    "link_edge",
    "link_gain",
    "FUSED_MIN_NUMEL",
    "prepare",
]

# Vectors with fewer elements keep the torch code: it is cheap there, and the first use of the
# kernel costs about a second (numba's import). Set to sys.maxsize to switch the kernel off.
FUSED_MIN_NUMEL = 65536


@dataclass(frozen=True)
class Neighbour:
    """Newest message held from neighbour l: ``weight`` = W[j][l], ``x`` = x^l_s (None: nothing
    received yet), ``grad`` = slope g^l of the prediction (None: none sent), ``staleness`` = τ_l.
    """

    weight: float
    x: Tensor | None
    grad: Tensor | None
    staleness: int


class Status(Enum):
    FRESH, STALE, DROPPED = "fresh", "stale", "dropped"


def classify(nb: Neighbour, tolerance: int, horizon: int) -> Status:
    """Section "Staleness": τ ≤ τ₀ fresh, τ > H or never received dropped, otherwise stale."""
    if nb.x is None:
        return Status.DROPPED
    if nb.staleness <= tolerance:
        return Status.FRESH
    if nb.staleness > horizon:
        return Status.DROPPED
    return Status.STALE


def phi(c: Tensor, n: int) -> Tensor:
    """φ(c, n) = (1 − (1 − c)^n) / c with φ(0, n) = n, for c in [0, 1] and integer n ≥ 0.

    The quotient is the geometric sum Σ_{i<n} u^i with u = 1 − c, which is how it is computed:
    all terms are non-negative, so nothing cancels as c → 0 (where the naive quotient loses every
    digit), no division or special case is needed at c = 0 (φ = n) or c = 1 (φ = 1), and it takes
    about 2·log2(n) elementwise passes without transcendental functions.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return _geometric_sum_(torch.rsub(c, 1.0), n)


def _geometric_sum_(u: Tensor, n: int, spares: Sequence[Tensor] = ()) -> Tensor:
    """Σ_{i<n} u^i, written over ``u``, which the caller owns; the result is ``u`` or a spare.

    Walks the bits of n from the top with S_2m = S_m·(1 + u^m) and S_m+1 = 1 + u·S_m, one
    elementwise pass each, plus one pass per squaring of u^m. It needs up to two more vectors:
    taken from ``spares`` while there are some, allocated otherwise.
    """
    if n <= 1:
        return u.fill_(float(n))
    bits = bin(n)[3:]  # after the leading one, which stands for S_1 = 1
    if bits == "0":
        return u.add_(1.0)
    spare = iter(spares)
    one = torch.ones((), dtype=u.dtype, device=u.device)
    total, power = None, u  # S_m (None while it is S_1 = 1) and u^m
    for i, bit in enumerate(bits):
        more = i + 1 < len(bits)
        if total is None:
            total = torch.add(power, 1.0, out=next(spare, None))
        else:
            total.addcmul_(total, power)
        if more:
            power = torch.mul(power, power, out=next(spare, None)) if power is u else power.mul_(power)
        if bit == "1":
            torch.addcmul(one, total, u, out=total)
            if more:
                power.mul_(u)
    return total


_scratch = threading.local()


def _scratch_like(t: Tensor) -> list[Tensor]:
    """Three scratch vectors shaped like ``t``, kept per thread between calls.

    A model-sized temporary that the allocator has handed back to the OS costs a page fault per
    4 KiB page when it is allocated again: on a loaded 2-core machine, three fresh 1 MiB
    temporaries took 1.7 ms against 0.1 ms for the arithmetic done in them. Holding three vectors
    of the last size used is the price of not paying that per stale neighbour and step.
    """
    cached = getattr(_scratch, "tensors", None)
    if cached is None or (cached[0].shape, cached[0].dtype, cached[0].device) != (t.shape, t.dtype, t.device):
        cached = _scratch.tensors = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for _ in range(3)]
    return cached


def _phi_of(
    grad: Tensor, staleness: int, lam: float, lam_mode: str, segments: Sequence[int] | None, eps: float
) -> Tensor:
    """φ(c, τ) for c = clamp(λ_eff·g⊙g, 0, 1) (callers pass α·λ as λ), in a scratch vector that
    stays valid only until the next call on this thread.

    It works on u = 1 − c: c ≥ 0 already (λ ≥ 0), so only u ≥ 0 needs clamping, and a fixed λ
    gives u in one fused multiply-add plus the clamp.
    """
    u, *spares = _scratch_like(grad)
    if lam_mode == "fixed":
        one = torch.ones((), dtype=grad.dtype, device=grad.device)
        torch.addcmul(one, grad, grad, value=-lam, out=u).clamp_(min=0.0)
    else:
        _apply_lam_(torch.mul(grad, grad, out=u), lam, lam_mode, segments, eps)
        u.clamp_(0.0, 1.0).neg_().add_(1.0)
    return _geometric_sum_(u, staleness, spares)


def _apply_lam_(g2: Tensor, lam: float, lam_mode: str, segments: Sequence[int] | None, eps: float) -> Tensor:
    """Turns g⊙g into λ_eff·g⊙g in place: λ_eff = λ ("fixed") or λ / sqrt(mean(g⊙g) + ε) per
    segment ("adaptive", DC-ASGD-a). Callers pass α·λ as λ, so c takes a single pass."""
    if lam_mode == "fixed":
        return g2.mul_(lam)
    if lam_mode != "adaptive":
        raise ValueError(f"lam_mode must be 'fixed' or 'adaptive', got {lam_mode!r}")
    if segments is None:
        return g2.mul_(g2.mean().add(eps).rsqrt().mul(lam))
    flat = g2.view(-1)
    if sum(segments) != flat.numel():
        raise ValueError(f"segments sum to {sum(segments)}, vector has {flat.numel()} elements")
    lengths = torch.as_tensor(list(segments), dtype=torch.long, device=g2.device)
    scales = torch.segment_reduce(flat, "mean", lengths=lengths).add_(eps).rsqrt_().mul_(lam)
    # Scaling contiguous pieces through views needs no index vector; repeat_interleave would build
    # an int64 one as long as the model, and it dominated the cost of the prediction.
    for piece, scale in zip(flat.split(list(segments)), scales):
        piece.mul_(scale)
    return g2


def _use_fused(stale: Sequence[Neighbour], lam: float, lam_mode: str, *operands: Tensor) -> bool:
    """Whether fused.py computes the prediction terms of these stale neighbours, with
    ``operands`` as the other tensors it reads or writes: it replaces the eight or so elementwise
    passes per neighbour of the torch code by one pass in all, for a fixed λ > 0 and τ ≥ 2 (the
    cases that need φ)."""
    return (
        lam_mode == "fixed"
        and lam > 0
        and len(stale) > 0
        and all(nb.staleness >= 2 and nb.grad is not None for nb in stale)
        and stale[0].x.numel() >= FUSED_MIN_NUMEL
        and fused.supports(*operands, *(t for nb in stale for t in (nb.x, nb.grad)))
        and fused.available()
    )


def prepare(x: Tensor, lam: float, lam_mode: str = "fixed") -> bool:
    """Loads the compiled kernel now if predictions for a vector like ``x`` will use it (about a
    second per process, more on the very first use, when it is compiled); returns whether."""
    return (
        lam_mode == "fixed"
        and lam > 0
        and x.numel() >= FUSED_MIN_NUMEL
        and fused.supports(x)
        and fused.prepare(x.dtype)
    )


def _terms(stale: Sequence[Neighbour], weights: Sequence[float]) -> list[fused.Term]:
    """fused.py's (weight, x_s, g, τ) terms, standing for weight·x̂^l."""
    return [(w, nb.x, nb.grad, nb.staleness) for nb, w in zip(stale, weights)]


def _check_predict_args(staleness: int, lam: float) -> None:
    if staleness < 0 or lam < 0:
        raise ValueError(f"staleness and lam must be >= 0, got {staleness} and {lam}")


def _predict(
    x_stale: Tensor,
    grad: Tensor | None,
    staleness: int,
    lr: float,
    lam: float,
    lam_mode: str,
    segments: Sequence[int] | None,
    eps: float = 1e-8,
) -> Tensor:
    """predict_weights that may return ``x_stale`` itself; internal callers only read the result."""
    _check_predict_args(staleness, lam)
    if grad is None or staleness == 0:
        return x_stale
    if lam == 0 or staleness == 1:  # φ(c, 1) = 1 whatever c is
        return torch.add(x_stale, grad, alpha=-lr * staleness)
    if _use_fused([Neighbour(1.0, x_stale, grad, staleness)], lam, lam_mode):
        return fused.predict(x_stale, grad, staleness, lr, lam)
    return torch.addcmul(x_stale, grad, _phi_of(grad, staleness, lr * lam, lam_mode, segments, eps), value=-lr)


def _add_prediction_(
    out: Tensor,
    weight: float,
    nb: Neighbour,
    lr: float,
    lam: float,
    lam_mode: str,
    segments: Sequence[int] | None,
    eps: float = 1e-8,
) -> Tensor:
    """out += weight·x̂ for a stale neighbour, as weight·x_s − weight·α·g·φ: the prediction x̂
    itself is never formed, which saves a model-sized temporary and a pass per neighbour."""
    _check_predict_args(nb.staleness, lam)
    if _use_fused([nb], lam, lam_mode, out):
        return fused.add_predictions_(out, _terms([nb], [weight]), lr, lam)
    out.add_(nb.x, alpha=weight)
    if nb.grad is None or nb.staleness == 0:
        return out
    if lam == 0 or nb.staleness == 1:
        return out.add_(nb.grad, alpha=-lr * nb.staleness * weight)
    phi_ = _phi_of(nb.grad, nb.staleness, lr * lam, lam_mode, segments, eps)
    return out.addcmul_(nb.grad, phi_, value=-lr * weight)


def predict_weights(
    x_stale: Tensor,
    grad: Tensor | None,
    staleness: int,
    lr: float,
    lam: float,
    *,
    lam_mode: str = "fixed",
    segments: Sequence[int] | None = None,
    eps: float = 1e-8,
) -> Tensor:
    """Section "The predicting step": x̂ = x_s − α·g·φ(c, τ), c = clamp(α·λ_eff·g⊙g, 0, 1).

    This is the closed form of τ steps of y_{t+1} = y_t − α(g + λ g⊙g⊙(y_t − x_s)) from y₀ = x_s.
    λ = 0 is linear extrapolation x_s − α τ g. ``lam_mode="adaptive"`` uses
    λ_eff = λ / sqrt(mean(g⊙g) + eps) over each segment; ``segments`` lists the segment lengths
    (one per parameter tensor of the flat vector), None = one segment.
    With τ = 0 or no slope (grad None) the prediction is x_s; a copy is returned then, so the
    result is always a new tensor that can be modified without touching ``x_stale``.
    """
    out = _predict(x_stale, grad, staleness, lr, lam, lam_mode, segments, eps)
    return out.clone() if out is x_stale else out


def _span(t: Tensor) -> tuple[int, int]:
    """Byte range [start, end) that ``t`` can touch (strides are never negative in torch)."""
    start = t.data_ptr()
    if t.is_contiguous():
        return start, start + t.nbytes
    if t.numel() == 0:
        return start, start
    last = sum((n - 1) * stride for n, stride in zip(t.shape, t.stride()))
    return start, start + (last + 1) * t.element_size()


def _check_out(buffers: Sequence[Tensor], x: Tensor, delta: Tensor, neighbours: Sequence[Neighbour]) -> None:
    """An ``out`` buffer must be shaped like x and overlap no input and no other buffer: inputs
    are still read after the output has been partly written. Runs every step, hence the spans
    are computed once each (all tensors are on x's device, or the arithmetic would fail)."""
    inputs = [x, delta, *(t for nb in neighbours for t in (nb.x, nb.grad) if t is not None)]
    spans = [_span(t) for t in inputs]
    for buf in buffers:
        if buf.shape != x.shape or buf.dtype is not x.dtype or buf.device != x.device:
            raise ValueError(
                f"out buffer of shape {tuple(buf.shape)}, {buf.dtype} on {buf.device}; "
                f"x is {tuple(x.shape)}, {x.dtype} on {x.device}"
            )
        b0, b1 = _span(buf)
        if any(b0 < t1 and t0 < b1 for t0, t1 in spans):
            raise ValueError("an out buffer overlaps an input or the other out buffer")
        spans.append((b0, b1))


def candidates(
    x: Tensor,
    delta: Tensor,
    self_weight: float,
    neighbours: Sequence[Neighbour],
    *,
    lr: float,
    lam: float,
    tolerance: int,
    horizon: int,
    lam_mode: str = "fixed",
    segments: Sequence[int] | None = None,
    out: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Section "The two candidates and the update": returns (x^P, x^C).

    x^C = (w_self + Σ_{S∪D} W)·x + Σ_F W·x^l + Δ  (fresh used as they are, stale and dropped
    replaced by the agent's own x^j_k), and x^P = x^C − (Σ_S W)·x + Σ_S W·x̂^l, so the predicting
    candidate costs one pass plus the prediction terms of the stale neighbours on top of the
    clipping one (this is also the cheap way to get both for PV). Without stale neighbours x^P
    equals x^C (returned as separate tensors).
    The dsgd baseline passes tolerance = horizon = sys.maxsize: every received neighbour is then
    fresh and its weights are used as they are, however old.
    ``out = (x_p_buffer, x_c_buffer)``, tensors with x's shape, dtype and device, receive the two
    candidates and are returned, which saves allocating two model-sized vectors per step. They
    must overlap neither each other nor any input (x, delta, a neighbour's x or grad).
    """
    buf_p, buf_c = (None, None) if out is None else out
    if out is not None:
        _check_out(out, x, delta, neighbours)
    status = [classify(nb, tolerance, horizon) for nb in neighbours]
    own = self_weight + sum(nb.weight for nb, s in zip(neighbours, status) if s is not Status.FRESH)
    stale = [nb for nb, s in zip(neighbours, status) if s is Status.STALE]
    shift = -sum(nb.weight for nb in stale)
    if Status.FRESH not in status and _use_fused(stale, lam, lam_mode, x, delta, *(out or ())):
        # Both candidates in one pass, which also spares writing x^C and reading it back.
        x_c = torch.empty_like(x) if buf_c is None else buf_c
        terms = _terms(stale, [nb.weight for nb in stale])
        return fused.combine(buf_p, delta, shift, x, terms, lr, lam, out_c=x_c, coef_c=own), x_c
    x_c = torch.add(delta, x, alpha=own, out=buf_c)
    for nb, s in zip(neighbours, status):
        if s is Status.FRESH:
            x_c.add_(nb.x, alpha=nb.weight)
    if not stale:
        return (x_c.clone() if buf_p is None else buf_p.copy_(x_c)), x_c
    x_p = torch.add(x_c, x, alpha=shift, out=buf_p)
    for nb in stale:
        _add_prediction_(x_p, nb.weight, nb, lr, lam, lam_mode, segments)
    return x_p, x_c


STABLE_MARGIN = 0.5  # of the largest gain the delayed loop tolerates


def stable_theta(staleness: int, mu_max: float, margin: float = STABLE_MARGIN, momentum: float = 0.0) -> float:
    """θ_τ = min(1, margin · stable_edge(τ, β) / μ_max) (ALGORITHM.md, "θ by the delay").

    ``momentum`` is β of quasi-global momentum, whose buffer also carries the mixing (0 otherwise:
    a local momentum sees only the gradients, so the loop is the one without momentum).
    """
    if staleness < 0 or not mu_max > 0:
        raise ValueError(f"need staleness >= 0 and mu_max > 0, got {staleness} and {mu_max}")
    return min(1.0, margin * stable_edge(staleness, momentum) / mu_max)


@functools.lru_cache(maxsize=256)
def stable_edge(staleness: int, momentum: float = 0.0) -> float:
    """The largest gain g = θμ for which a disagreement mode stays bounded.

    Without momentum the mode follows e_{k+1} = e_k − g e_{k−τ}, stable only for
    g < 2 sin(π / (2(2τ + 1))). Under quasi-global momentum β the mixing enters the momentum too:
    with v = α m, e_{k+1} = e_k − β v_k − g e_{k−τ} and v_{k+1} = β v_k + (1 − β)(e_k − e_{k+1}),
    which amplifies slow oscillations and lowers the edge (0.075 against 0.185 at τ = 8, β = 0.9).
    That edge has no closed form: it is found by bisection on the spectral radius of the loop's
    companion matrix (the stable gains form an interval from 0, checked in tests/test_rule.py).
    """
    if staleness < 0 or not 0.0 <= momentum < 1.0:
        raise ValueError(f"need staleness >= 0 and momentum in [0, 1), got {staleness} and {momentum}")
    if momentum == 0.0:
        return 2.0 * math.sin(math.pi / (2 * (2 * staleness + 1)))
    lo, hi = 0.0, 2.0  # θ ≤ 1 and μ ≤ 2: no larger gain is ever asked for
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        if loop_radius(mid, staleness, momentum) < 1.0:
            lo = mid
        else:
            hi = mid
    return lo


def loop_radius(gain: float, staleness: int, momentum: float = 0.0) -> float:
    """Spectral radius of the delayed loop of `stable_edge`, state (e_k, …, e_{k−τ}, v_k)."""
    tau, beta = int(staleness), float(momentum)
    a = torch.zeros(tau + 2, tau + 2, dtype=torch.float64)
    a[0, 0] += 1.0
    a[0, tau] -= gain
    a[0, tau + 1] = -beta
    for i in range(1, tau + 1):
        a[i, i - 1] = 1.0
    # v_{k+1} = β v_k + (1 − β)(β v_k + g e_{k−τ})
    a[tau + 1, tau + 1] = beta + (1.0 - beta) * beta
    a[tau + 1, tau] += (1.0 - beta) * gain
    return float(torch.linalg.eigvals(a).abs().max())


def link_pull(
    x_l: Tensor, x_j: Tensor, pulled: Tensor, gain: float, weight: float, out: Tensor | None = None
) -> Tensor:
    """a^{jl}_k = γ W_jl (x^l_{k−D} − x^j_{k−D} − 2 C^{jl}_k) (ALGORITHM.md, "Link prediction").

    Both ends of the link hold the same late pair and pull with opposite signs, so C, this end's
    pulls of the last D steps, is half of what the link itself did to the disagreement since; the
    pull acts on the disagreement as it is now, less what the two ends' other links and data did.
    """
    out = torch.sub(x_l, x_j, out=out)
    return out.sub_(pulled, alpha=2.0).mul_(gain * weight)


LINK_STEPS = 3000  # steps of the linear loop simulated per trial gain


@functools.lru_cache(maxsize=64)
def link_edge(W: tuple[tuple[float, ...], ...], delays: tuple[tuple[int, ...], ...], momentum: float = 0.0) -> float:
    """The largest γ at which the disagreement of the link-predicted loop decays, for this mixing
    matrix, these link delays (D[j][l] = D[l][j]) and β of quasi-global momentum.

    The loop is linear, one number per agent: x_{k+1} = x_k + u_k, u_k = Σ_l a^{jl}_k − β p_k,
    p_{k+1} = β p_k − (1 − β) u_k (p = α m). It has no closed form on a graph: each trial gain is
    run for LINK_STEPS steps from a fixed random start of mean zero (the mean never moves: the
    pulls of a link cancel) and counts as stable when the disagreement shrank over the second half
    (or vanished). Bisection between 0 and 2, taking the stable gains to form an interval from 0
    (tests/test_links.py steps the rank's own bookkeeping on a ring below and above the edge).
    """
    import numpy as np  # noqa: PLC0415  (an analysis of the graph, run once per job)

    w = np.asarray(W, dtype=np.float64)
    d = np.asarray(delays, dtype=np.int64)
    if w.shape != d.shape or w.ndim != 2 or w.shape[0] != w.shape[1]:
        raise ValueError(f"W and the delays must be square and alike, got {w.shape} and {d.shape}")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must lie in [0, 1), got {momentum}")
    n = w.shape[0]
    src, dst = np.nonzero((w > 0) & ~np.eye(n, dtype=bool))
    weight, lag, edges = w[src, dst], d[src, dst], np.arange(len(src))
    depth = int(lag.max(initial=0)) + 1
    start = np.random.default_rng(0).standard_normal(n)
    start -= start.mean()

    def shrinks(gain: float) -> bool:
        x, p, pulled = start.copy(), np.zeros(n), np.zeros(len(src))
        own, acts = np.tile(x, (depth, 1)), np.zeros((depth, len(src)))
        half = None
        for k in range(LINK_STEPS):
            slot = (k - lag) % depth
            a = gain * weight * (own[slot, dst] - own[slot, src] - 2.0 * pulled)
            u = np.bincount(src, weights=a, minlength=n) - momentum * p
            p = momentum * p - (1.0 - momentum) * u
            x = x + u
            acts[k % depth] = a
            pulled += a - acts[slot, edges]
            own[(k + 1) % depth] = x
            size = float(np.abs(x).max())
            if not size < 1e6:
                return False
            if k == LINK_STEPS // 2:
                half = size
        return size < half or size < 1e-12  # a fast loop reaches zero

    lo, hi = 0.0, 2.0
    for _ in range(16):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if shrinks(mid) else (lo, mid)
    return round(lo, 4)  # every rank computes it; the pulls of a link cancel only if both ends agree


def link_gain(W, delays, momentum: float = 0.0, margin: float = STABLE_MARGIN) -> float:
    """γ = min(1, margin · link_edge) (ALGORITHM.md, "Link prediction")."""
    as_tuple = lambda m: tuple(tuple(float(v) for v in row) for row in m)  # noqa: E731
    edge = link_edge(as_tuple(W), tuple(tuple(int(v) for v in row) for row in delays), float(momentum))
    return min(1.0, margin * edge)


def _check_theta(theta: float) -> None:
    if not 0.0 <= theta <= 1.0:  # written this way round so that NaN is rejected too
        raise ValueError(f"theta must lie in [0, 1], got {theta}")


def blend(x_p: Tensor, x_c: Tensor, theta: float) -> Tensor:
    """x^j_{k+1} = θ·x^P + (1 − θ)·x^C; θ = 0 returns x^C and θ = 1 returns x^P exactly."""
    _check_theta(theta)
    return torch.lerp(x_c, x_p, theta)


def pv_choose(loss_p: float, loss_c: float) -> bool:
    """PV choice, True = keep x^P: the strictly lower loss wins, a tie keeps x^C.

    A NaN loss marks a diverged candidate, so it loses; two NaNs keep x^C.
    """
    if math.isnan(loss_p):
        return False
    if math.isnan(loss_c):
        return True
    return loss_p < loss_c


def mix(
    x: Tensor,
    delta: Tensor,
    self_weight: float,
    neighbours: Sequence[Neighbour],
    thetas: Sequence[float],
    *,
    lr: float,
    lam: float,
    tolerance: int,
    horizon: int,
    lam_mode: str = "fixed",
    segments: Sequence[int] | None = None,
    on_predict: Callable[[int, Tensor], None] | None = None,
    out: Tensor | None = None,
    reaches: Sequence[float] | None = None,
) -> Tensor:
    """One-pass update with a θ_l per neighbour (sections "The two candidates and the update" and
    "Adaptive variant"): a stale neighbour contributes W·(θ_l x̂^l + (1 − θ_l) x^j_k).

    ``reaches`` (AV, aligned with ``neighbours``, each in [0, 1], None = all 1) take only the part
    r_l of each roll-forward: the stale neighbour contributes W·(θ_l (x_s + r_l (x̂^l − x_s)) +
    (1 − θ_l) x^j_k).

    The (1 − θ_l)·W·x^j_k parts are folded into the coefficient of x, so a stale neighbour costs
    one pass (its prediction) and none at θ_l = 0. With all θ_l = θ this equals
    blend(*candidates(...), θ). ``thetas`` is aligned with ``neighbours`` (entries of non-stale ones
    are ignored but must lie in [0, 1]). ``on_predict(i, x̂)`` receives each stale neighbour's
    prediction, read-only (for SubstitutionTracker.record); when given, x̂ is made even at θ_l = 0
    so that the tracker keeps measuring. The dsgd baseline passes tolerance = horizon = sys.maxsize.
    ``out``, a tensor with x's shape, dtype and device, receives the result and is returned (None:
    a new tensor); it must not overlap any input (x, delta, a neighbour's x or grad).
    """
    if len(thetas) != len(neighbours):
        raise ValueError(f"{len(thetas)} thetas for {len(neighbours)} neighbours")
    for theta in thetas:
        _check_theta(theta)
    if reaches is not None:
        if len(reaches) != len(neighbours):
            raise ValueError(f"{len(reaches)} reaches for {len(neighbours)} neighbours")
        for reach in reaches:
            if not 0.0 <= reach <= 1.0:
                raise ValueError(f"reach must lie in [0, 1], got {reach}")
        if all(r == 1.0 for r in reaches):
            reaches = None
    if out is not None:
        _check_out([out], x, delta, neighbours)
    status = [classify(nb, tolerance, horizon) for nb in neighbours]
    own = self_weight + sum(
        nb.weight * (1.0 - theta if s is Status.STALE else 1.0)
        for nb, s, theta in zip(neighbours, status, thetas)
        if s is not Status.FRESH
    )
    predicted = [(nb, theta) for nb, s, theta in zip(neighbours, status, thetas) if s is Status.STALE and theta > 0.0]
    operands = (x, delta) if out is None else (x, delta, out)
    if (
        on_predict is None
        and reaches is None
        and Status.FRESH not in status
        and _use_fused([nb for nb, _ in predicted], lam, lam_mode, *operands)
    ):
        # One pass for the whole update.
        terms = _terms([nb for nb, _ in predicted], [nb.weight * theta for nb, theta in predicted])
        return fused.combine(out, delta, own, x, terms, lr, lam)
    out = torch.add(delta, x, alpha=own, out=out)
    for i, (nb, s, theta) in enumerate(zip(neighbours, status, thetas)):
        reach = 1.0 if reaches is None else reaches[i]
        if s is Status.FRESH:
            out.add_(nb.x, alpha=nb.weight)
        elif s is Status.STALE and (on_predict is not None or (reach != 1.0 and theta > 0.0)):
            x_hat = _predict(nb.x, nb.grad, nb.staleness, lr, lam, lam_mode, segments)
            if on_predict is not None:
                on_predict(i, x_hat)
            if theta > 0.0:
                out.add_(x_hat, alpha=nb.weight * theta * reach)
                if reach != 1.0:
                    out.add_(nb.x, alpha=nb.weight * theta * (1.0 - reach))
        elif s is Status.STALE and theta > 0.0:
            _add_prediction_(out, nb.weight * theta, nb, lr, lam, lam_mode, segments)
    return out


def mix_momentum(m: Tensor, neighbours: Sequence[Neighbour], *, tolerance: int, horizon: int) -> Tensor:
    """Section "Adaptive variant", momentum consensus: (1 − Σ_l W_jl) m^j + Σ_l W_jl m^l_s over the
    neighbours whose newest message is fresh or stale, ``nb.grad`` being the momentum m^l_s it
    carries; a dropped neighbour, or one whose message has no momentum, counts as m^j. Every weight
    is in [0, 1] and they sum to at most 1, so the result is a convex combination of buffers, old
    and new, whatever their age. A new tensor; m is not written.
    """
    used = [nb for nb in neighbours if nb.grad is not None and classify(nb, tolerance, horizon) is not Status.DROPPED]
    out = torch.zeros_like(m)
    for nb in used:
        out.add_(nb.grad, alpha=nb.weight)
    return out.add_(m, alpha=1.0 - sum(nb.weight for nb in used))
