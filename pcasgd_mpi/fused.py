"""One-pass CPU kernel for the predictions of stale neighbours (ALGORITHM.md "The predicting step").

With a fixed λ, the torch code in rule.py forms a stale neighbour's term w·x̂, with
x̂ = x_s − α·g·φ(c, τ) and c = clamp(α·λ·g⊙g, 0, 1), in about eight elementwise passes over
model-sized vectors, and the candidates need two more passes around them. Every pass streams
megabytes through memory, which is what the update costs. The kernel here makes one pass for all
of it (per two neighbours): it walks the vectors in chunks small enough to stay in L1 cache and
computes each output element from all the inputs at once.

A term is a tuple ``(weight, x_stale, grad, staleness)`` standing for weight·x̂, staleness ≥ 2.
All tensors must be contiguous, on the CPU, of one shape and of one dtype, float32 or float64
(see ``supports``), and an output must not overlap any input.

numba is imported on first use, not with this module: importing it and loading the cached
machine code costs about a second per process, which runs on small models should not pay.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["CHUNK", "available", "prepare", "supports", "predict", "add_predictions_", "combine"]

# φ is computed inline, without scratch rows, for τ up to this: on ResNet-20-sized vectors a sixth
# inline step made τ = 2 and 3 about 10-35 % slower, five cost them under 8 %.
INLINE_MAX = 5
CHUNK = 512  # elements per chunk: its three scratch rows take 6 KiB (float32) or 12 KiB
_PER_CALL = 2  # terms per kernel call (more would need one compiled kernel per count)
_DTYPES = (torch.float32, torch.float64)
_SET, _ADD, _COMBINE, _CANDIDATES = range(4)

Term = tuple[float, Tensor, Tensor, int]

_missing = False  # numba could not be imported
_carray = None  # numba.carray and the compiled kernel, for the C entry points (set by _load)
_kernel = None
_launchers: dict = {}  # dtype -> (ctypes function, the numba cfunc that owns its code)


def _prediction_kernel(
    out, out_c, base, y, x1, g1, x2, g2, coef_c, coef, tau1, tau2, w1, w2, wlr1, wlr2, count, lam, mode
):
    """out = T (_SET), out += T (_ADD), out = base + coef·y + T (_COMBINE), or out_c = base +
    coef_c·y and out = out_c + coef·y + T (_CANDIDATES), where T = t_1 + t_2 (T = t_1 if count
    is 1), t_k[j] = w_k·x_k[j] − wlr_k·g_k[j]·φ_k[j], φ = Σ_{i<τ} u^i and u = max(1 − lam·g², 0).

    τ ≥ 2. φ follows Horner's rule S_{m+1} = 1 + u·S_m from S_1 = 1, where it is used for
    τ ≤ INLINE_MAX; beyond, in scratch rows, four steps per loop from S_4 to S_7: the steps of
    one element depend on each other, so each loop runs over the elements of a chunk
    (LLVM vectorises innermost loops only; a loop over the steps inside the loop over elements
    measured five times slower). The last loop of a chunk reads all the vectors at once: more
    loops, each streaming fewer vectors from memory or storing more to the scratch rows,
    measured up to twice as slow. The scalars arrive in the arrays' dtype, and so do the
    constants below: a python float or int in float32 arithmetic promotes it to float64, which
    stops the vectorisation too.
    """
    one = np.ones(1, out.dtype)[0]
    zero = one - one
    u = np.empty(CHUNK, out.dtype)
    s1 = np.zeros(CHUNK, out.dtype)
    s2 = np.zeros(CHUNK, out.dtype)
    if count == 1:  # t_2 = 0·x_1 − 0·g_1·φ_1, so that the same last loop serves both counts
        x2, g2, tau2, w2, wlr2 = x1, g1, tau1, zero, zero

    def phi(g, s, tau):
        """φ of one element: inline for τ ≤ INLINE_MAX, else from the scratch row. The inline
        Horner steps are a fixed number, each kept or not by a select, so that LLVM unrolls
        them and still vectorises the loop. u = 1 − c with c ≥ 0 already, so only u ≥ 0 needs
        the clamp; a NaN in g gives u = 0 but still reaches the output through the factor g."""
        v = one - lam * g * g
        v = v if v > zero else zero
        p = one + v
        for k in range(3, INLINE_MAX + 1):
            p = one + v * p if tau >= k else p
        return p if tau <= INLINE_MAX else s

    def terms(i, a1, b1, a2, b2):
        return (
            w1 * a1[i] - wlr1 * b1[i] * phi(b1[i], s1[i], tau1) + (w2 * a2[i] - wlr2 * b2[i] * phi(b2[i], s2[i], tau2))
        )

    n = out.shape[0]
    for start in range(0, n, CHUNK):
        end = min(start + CHUNK, n)
        m = end - start
        # Views indexed from zero: with start + i as index numba cannot prove it non-negative,
        # adds negative-index wraparound, and the loops are no longer vectorised.
        o, a1, b1, a2, b2 = out[start:end], x1[start:end], g1[start:end], x2[start:end], g2[start:end]
        for k in range(count):
            g, s, tau = (b1, s1, tau1) if k == 0 else (b2, s2, tau2)
            if tau <= INLINE_MAX:
                continue
            extra = (tau - 4) % 4  # steps beyond S_4 made here, leaving a multiple of four
            for i in range(m):
                v = one - lam * g[i] * g[i]
                v = v if v > zero else zero
                u[i] = v
                p = one + v * (one + v * (one + v))  # S_4
                for j in range(1, 4):
                    p = one + v * p if extra >= j else p
                s[i] = p
            for _ in range((tau - 4) // 4):
                for i in range(m):
                    ui = u[i]
                    s[i] = one + ui * (one + ui * (one + ui * (one + ui * s[i])))
        if mode == _ADD:
            for i in range(m):
                o[i] += terms(i, a1, b1, a2, b2)
        elif mode == _SET:
            for i in range(m):
                o[i] = terms(i, a1, b1, a2, b2)
        elif mode == _COMBINE:
            b, yc = base[start:end], y[start:end]
            for i in range(m):
                o[i] = b[i] + coef * yc[i] + terms(i, a1, b1, a2, b2)
        else:
            b, yc, c = base[start:end], y[start:end], out_c[start:end]
            for i in range(m):
                ci = b[i] + coef_c * yc[i]
                c[i] = ci
                o[i] = ci + coef * yc[i] + terms(i, a1, b1, a2, b2)


def _entry(out, out_c, base, y, x1, g1, x2, g2, n, coef_c, coef, tau1, tau2, w1, w2, wlr1, wlr2, count, lam, mode):
    """C entry point of the kernel, with raw pointers to n elements each instead of numpy arrays:
    making the arrays from tensors cost about 2 µs each against 0.2 µs for a pointer, and a step
    passes up to eight, at a time when the interpreter runs from cold caches."""
    _kernel(
        _carray(out, n),
        _carray(out_c, n),
        _carray(base, n),
        _carray(y, n),
        _carray(x1, n),
        _carray(g1, n),
        _carray(x2, n),
        _carray(g2, n),
        coef_c,
        coef,
        tau1,
        tau2,
        w1,
        w2,
        wlr1,
        wlr2,
        count,
        lam,
        mode,
    )


def _load() -> bool:
    global _carray, _kernel, _missing
    if _kernel is None and not _missing:
        try:
            import numba
        except ImportError:
            _missing = True
            return False
        _carray = numba.carray
        # "contract" only lets LLVM fuse a·b + c into one instruction; inf and NaN keep their
        # meaning, unlike with the other fast-math flags.
        _kernel = numba.njit(cache=True, nogil=True, error_model="numpy", fastmath={"contract"})(_prediction_kernel)
    return _kernel is not None


def _launcher(dtype: torch.dtype):
    """The kernel for dtype as a ctypes function (compiled, or loaded from the cache, on first use).
    ctypes releases the GIL for the call."""
    found = _launchers.get(dtype)
    if found is None:
        import ctypes

        import numba
        from numba import types as nt

        real, c_real = {torch.float32: (nt.float32, ctypes.c_float), torch.float64: (nt.float64, ctypes.c_double)}[
            dtype
        ]
        i64, c_i64 = nt.int64, ctypes.c_int64
        signature = nt.void(*[nt.CPointer(real)] * 8, i64, real, real, i64, i64, real, real, real, real, i64, real, i64)
        compiled = numba.cfunc(signature, cache=True)(_entry)
        prototype = ctypes.CFUNCTYPE(
            None,
            *[ctypes.c_void_p] * 8,
            c_i64,
            c_real,
            c_real,
            c_i64,
            c_i64,
            c_real,
            c_real,
            c_real,
            c_real,
            c_i64,
            c_real,
            c_i64,
        )
        found = _launchers[dtype] = (prototype(compiled.address), compiled)
    return found[0]


def available() -> bool:
    """Whether the kernel can run (numba imports). The first call pays the import."""
    return _load()


def prepare(dtype: torch.dtype) -> bool:
    """Imports numba and compiles (or loads from the cache) the kernel for dtype now, so that the
    cost is paid where the caller chooses rather than at the first stale neighbour."""
    if dtype not in _DTYPES or not _load():
        return False
    _launcher(dtype)
    return True


def supports(*tensors: Tensor) -> bool:
    """Whether the kernel takes these tensors: on the CPU, contiguous, all of the same shape and
    of one dtype among float32 and float64. Does not import numba."""
    dtype, shape = tensors[0].dtype, tensors[0].shape
    # Runs every step next to passes that evict the interpreter's data from the caches, hence
    # the cheapest attributes.
    return dtype in _DTYPES and all(
        t.is_cpu and t.dtype is dtype and t.shape == shape and t.is_contiguous() for t in tensors
    )


def _run(
    mode: int,
    out: Tensor,
    out_c: Tensor | None,
    base: Tensor | None,
    coef_c: float,
    y: Tensor | None,
    coef: float,
    terms: Sequence[Term],
    lr: float,
    lam: float,
) -> Tensor:
    if not terms:
        raise ValueError("no prediction term given")
    if lam < 0 or any(tau < 2 for _, _, _, tau in terms):  # φ(c, 0) = 0, φ(c, 1) = 1: no kernel needed
        raise ValueError(f"need lam >= 0 and every staleness >= 2, got {lam} and {[tau for _, _, _, tau in terms]}")
    operands = [t for t in (out, out_c, base, y) if t is not None]
    if not supports(*operands, *(t for _, x, g, _ in terms for t in (x, g))):
        # also what makes the raw pointers below safe: every vector holds n elements
        raise ValueError("the kernel needs contiguous CPU tensors of one shape and one dtype, float32 or float64")
    if not _load():
        raise RuntimeError("numba is not available; use the torch code in pcasgd_mpi.rule")
    launch = _launcher(out.dtype)
    o = out.data_ptr()
    c, b, yv = (o if t is None else t.data_ptr() for t in (out_c, base, y))
    for first in range(0, len(terms), _PER_CALL):
        part = list(terms[first : first + _PER_CALL])
        count = len(part)
        part += part[:1] * (_PER_CALL - count)  # padding, never read
        (w1, x1, g1, tau1), (w2, x2, g2, tau2) = part
        launch(
            o,
            c,
            b,
            yv,
            x1.data_ptr(),
            g1.data_ptr(),
            x2.data_ptr(),
            g2.data_ptr(),
            out.numel(),
            coef_c,
            coef,
            int(tau1),
            int(tau2),
            w1,
            w2,
            w1 * lr,
            w2 * lr,
            count,
            lr * lam,
            mode if first == 0 else _ADD,
        )
    return out


def predict(x_stale: Tensor, grad: Tensor, staleness: int, lr: float, lam: float, out: Tensor | None = None) -> Tensor:
    """x̂ = x_s − lr·g·φ(clamp(lr·lam·g⊙g, 0, 1), staleness) into ``out`` (a new tensor if None);
    staleness ≥ 2."""
    if out is None:
        out = torch.empty_like(x_stale, memory_format=torch.contiguous_format)
    return _run(_SET, out, None, None, 0.0, None, 0.0, [(1.0, x_stale, grad, staleness)], lr, lam)


def add_predictions_(out: Tensor, terms: Sequence[Term], lr: float, lam: float) -> Tensor:
    """out += Σ weight·x̂ over the terms; returns ``out``."""
    return _run(_ADD, out, None, None, 0.0, None, 0.0, terms, lr, lam)


def combine(
    out: Tensor | None,
    base: Tensor,
    coef: float,
    y: Tensor,
    terms: Sequence[Term],
    lr: float,
    lam: float,
    *,
    out_c: Tensor | None = None,
    coef_c: float = 0.0,
) -> Tensor:
    """out = base + coef·y + Σ weight·x̂ over the terms, in one pass; returns ``out`` (a new
    tensor if None).

    With ``out_c``, also out_c = base + coef_c·y, and then out = out_c + coef·y + Σ weight·x̂:
    both PC-ASGD candidates in one pass when no neighbour is fresh (out_c = x^C with
    base = Δ, y = x^j_k; out = x^P).
    """
    if out is None:
        out = torch.empty_like(base, memory_format=torch.contiguous_format)
    mode = _COMBINE if out_c is None else _CANDIDATES
    return _run(mode, out, out_c, base, coef_c, y, coef, terms, lr, lam)
