"""pc-asgd-av's measured substitution errors, per neighbour (ALGORITHM.md "Adaptive variant").

Pure tensor code, no MPI: the optimizer records the substitutes it used for a stale neighbour at
the neighbour's step t and, when that neighbour's message of step t arrives, the tracker measures
both substitutes against it and turns the errors into the blend (θ_l, r_l).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class SubstitutionTracker:
    """Section "Adaptive variant": measured error of the substitutes for one neighbour l.

    ``record(t, x̂, x^j, x_s)`` keeps what stood for x^l_t, one record per step t: the prediction
    x̂, the agent's own weights x^j and the stale copy x_s the prediction started from.
    ``observe(s, x^l_s)`` measures the record of exactly step s against it (a substitute is
    compared with the truth of its own step, not with a later one whose weights have moved on) and
    discards the records older than s, which a newer message has overtaken.

    A measurement is the Gram matrix of three vectors: the clipping error e_C = x^j − x^l, the
    way to the stale copy u = x_s − x^j and the roll-forward ρ = x̂ − x_s (so the prediction's
    error is e_P = e_C + u + ρ). Its entries are averaged G ← β G + (1 − β) g (the first one
    initialises them; the default β = 0.97 remembers about 30 measurements). From G follow E_P,
    E_C and the blend x^j + θ (x_s + r ρ − x^j) whose averaged squared error against the truth is
    least, with 0 ≤ θ ≤ 1 and 0 ≤ r ≤ 1: θ how far to move towards the neighbour, r how much of
    the roll-forward to take. Without x_s (``record(t, x̂, x^j)``) ρ is not known apart from u,
    and r stays 1.

    Memory: at most ``horizon`` records, those of the steps t_new − H < t ≤ t_new (an older one
    could only be measured by a message staler than the horizon, which the rule drops anyway).
    A record holds only ``sketch_size`` coordinates of each vector, a fixed random subset drawn
    once from ``seed`` and used for every vector alike; inner products are scaled by n / m, so
    E_P and E_C estimate the full-vector norms and the blend does not depend on the scale.
    """

    def __init__(
        self, beta: float = 0.97, eps: float = 1e-12, *, horizon: int = 16, sketch_size: int = 4096, seed: int = 0
    ) -> None:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must lie in [0, 1), got {beta}")
        if horizon < 1 or sketch_size < 1:
            raise ValueError(f"horizon and sketch_size must be >= 1, got {horizon} and {sketch_size}")
        self.beta, self.eps = float(beta), float(eps)
        self.horizon, self.sketch_size, self.seed = int(horizon), int(sketch_size), int(seed)
        self._gram: Tensor | None = None  # averaged Gram matrix of (e_C, u, ρ), float64 3×3
        self._split = True  # every measured record had its x_s, so ρ is known apart from u
        self._count = 0
        self._numel: int | None = None  # n, fixed by the first vector seen
        self._index: Tensor | None = None  # the sketch's coordinates; None: all of them
        self._records: dict[int, tuple[Tensor, ...]] = {}  # t -> (x̂_t, x^j_t[, x_s]) on the sketch

    # ------------------------------------------------------------------ the averages and the blend
    @property
    def e_p(self) -> float | None:
        """E_P, root mean square of ‖x̂ − x^l‖; None before the first measurement."""
        if self._gram is None:
            return None
        return math.sqrt(max(0.0, self._gram.sum().item()))  # ‖e_C + u + ρ‖²

    @property
    def e_c(self) -> float | None:
        """E_C, root mean square of ‖x^j − x^l‖; None before the first measurement."""
        return None if self._gram is None else math.sqrt(max(0.0, self._gram[0, 0].item()))

    @property
    def cross(self) -> float | None:
        """E_PC, mean of ⟨x̂ − x^l, x^j − x^l⟩; None before the first measurement."""
        return None if self._gram is None else self._gram[0].sum().item()

    measurements = property(lambda self: self._count, doc="Number of measurements made.")

    @property
    def theta(self) -> float:
        """θ_l of the blend (see ``blend``)."""
        return self.blend[0]

    @property
    def reach(self) -> float:
        """r_l of the blend (see ``blend``)."""
        return self.blend[1]

    @property
    def blend(self) -> tuple[float, float]:
        """(θ, r) minimising the averaged ‖e_C + θ u + θ r ρ‖² over 0 ≤ θ ≤ 1, 0 ≤ r ≤ 1;
        (0.5, 1) before the first measurement.

        With b = θ r this is a quadratic in (θ, b) over the triangle 0 ≤ b ≤ θ ≤ 1: its least
        value is at the unconstrained minimum when that lies inside, otherwise on an edge. The
        edge b = θ (r = 1) is the blend θ x̂ + (1 − θ) x^j alone, whose best θ is
        (E_C² − E_PC) / (E_P² + E_C² − 2 E_PC). Where the averages leave a choice open (the two
        substitutes coincide) the earlier value wins: θ = 0.5, r = 1.
        """
        return self.within(1.0)

    def within(self, top: float) -> tuple[float, float]:
        """(θ, r) as ``blend``, with θ held to 0 ≤ θ ≤ top: the least averaged error over the
        smaller triangle 0 ≤ θ r ≤ θ ≤ top, so that r is the best share for the θ allowed."""
        top = min(1.0, max(0.0, float(top)))
        if self._gram is None:
            return min(0.5, top), 1.0
        g = self._gram.tolist()
        if not self._split:
            return self._along_prediction(g, top), 1.0
        return self._least_on_triangle(g, top)

    def _along_prediction(self, g, top: float) -> float:
        # v = u + ρ = x̂ − x^j: minimise ‖e_C + θ v‖²
        vv = g[1][1] + 2 * g[1][2] + g[2][2]
        cv = g[0][1] + g[0][2]
        if vv <= self.eps * max(1.0, g[0][0]):
            return min(0.5, top)
        return min(top, max(0.0, -cv / vv))

    def _least_on_triangle(self, g, top: float) -> tuple[float, float]:
        uu, ur, rr, cu, cr = g[1][1], g[1][2], g[2][2], g[0][1], g[0][2]

        def cost(a: float, b: float) -> float:  # the averaged error minus its constant E_C²
            return uu * a * a + 2 * ur * a * b + rr * b * b + 2 * cu * a + 2 * cr * b

        def clamp(v: float) -> float:
            return min(top, max(0.0, v))

        tiny = self.eps * max(1.0, g[0][0])
        points = [(0.0, 0.0), (top, 0.0), (top, top)]
        if uu > tiny:  # edge b = 0
            points.append((clamp(-cu / uu), 0.0))
        if rr > tiny:  # edge θ = top
            points.append((top, clamp(-(ur * top + cr) / rr)))
        vv = uu + 2 * ur + rr
        if vv > tiny:  # edge b = θ
            a = clamp(-(cu + cr) / vv)
            points.append((a, a))
        det = uu * rr - ur * ur
        if det > tiny * max(uu, rr, tiny):
            a, b = (-(cu * rr) + cr * ur) / det, (-(cr * uu) + cu * ur) / det
            if 0.0 <= b <= a <= top:
                points.append((a, b))
        best = min(points, key=lambda p: cost(*p))
        if vv <= tiny and uu <= tiny:
            return min(0.5, top), 1.0  # both substitutes coincide with x^j: nothing to choose
        a, b = best
        return a, (b / a if a > 0 else 1.0)

    # ------------------------------------------------------------------ records and measurements
    pending_steps = property(
        lambda self: tuple(sorted(self._records)), doc="Steps t of the records waiting for their truth, oldest first."
    )
    pending_step = property(
        lambda self: min(self._records, default=None), doc="The oldest pending step, or None when no record waits."
    )

    def _sketch(self, x: Tensor) -> Tensor:
        """The sketch's coordinates of x, as a new float64 vector (the same subset for every x)."""
        x = x.detach().reshape(-1)
        if self._numel is None:
            self._numel = x.numel()
            if x.numel() > self.sketch_size:
                gen = torch.Generator().manual_seed(self.seed)
                self._index = torch.randperm(x.numel(), generator=gen)[: self.sketch_size].sort().values
        if x.numel() != self._numel:
            raise ValueError(f"vector of {x.numel()} elements; this tracker measures {self._numel}")
        picked = x if self._index is None else x.index_select(0, self._index.to(x.device))
        return picked.to(device="cpu", dtype=torch.float64, copy=True)

    def _scale(self) -> float:
        """n / m: a sum of squares over the sketch times this estimates the full vector's."""
        return 1.0 if self._index is None else self._numel / self._index.numel()

    def record(self, t: int, x_hat: Tensor, x_self: Tensor, x_stale: Tensor | None = None) -> bool:
        """Keep what stood for x^l_t; returns whether a record was made.

        A step that already has a record keeps its first one, and a step at least ``horizon``
        behind the newest record is refused: either would break the bound of H records.
        """
        t = int(t)
        newest = max(self._records, default=t)
        if t in self._records or t <= newest - self.horizon:
            return False
        kept = (x_hat, x_self) if x_stale is None else (x_hat, x_self, x_stale)
        self._records[t] = tuple(self._sketch(v) for v in kept)
        for old in [s for s in self._records if s <= t - self.horizon]:
            del self._records[old]
        return True

    def observe(self, s: int, x_true: Tensor) -> bool:
        """Measure the record of step s against x^l_s and drop the older ones; returns whether it
        measured.

        A measurement that is not finite (a non-finite truth or substitute, or an error beyond
        1e154) would stay in the averages for good and pin the blend: the record is dropped
        unmeasured instead, and False returned, so that later records can be measured.
        """
        s = int(s)
        for old in [t for t in self._records if t < s]:
            del self._records[old]
        pending = self._records.pop(s, None)
        if pending is None:
            return False
        x_hat, x_self = pending[0], pending[1]
        e_c = x_self - self._sketch(x_true)
        if len(pending) == 3:
            u, rho = pending[2] - x_self, x_hat - pending[2]
        else:
            self._split = False
            u, rho = x_hat - x_self, torch.zeros_like(x_hat)
        basis = torch.stack([e_c, u, rho])
        gram = (basis @ basis.T).mul_(self._scale())
        if not bool(torch.isfinite(gram).all()) or gram.abs().max().item() > 1e300:
            return False
        self._average(gram)
        self._count += 1
        return True

    def _average(self, gram: Tensor) -> None:
        """G ← β G + (1 − β) g: the blend weighs mean squares, so a rare prediction that
        overshoots by far (a gradient spike rolled forward τ steps) lowers its weight as much as
        it costs, where an average of norms would let it pass as one ordinary error among many."""
        if self._gram is None:
            self._gram = gram
        else:
            self._gram.mul_(self.beta).add_(gram, alpha=1.0 - self.beta)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Settings, averages, the sketch's coordinates and copies of the pending records."""
        return {
            "beta": self.beta,
            "eps": self.eps,
            "horizon": self.horizon,
            "sketch_size": self.sketch_size,
            "seed": self.seed,
            "gram": None if self._gram is None else self._gram.clone(),
            "split": self._split,
            "measurements": self._count,
            "numel": self._numel,
            "index": None if self._index is None else self._index.clone(),
            "records": {t: tuple(v.clone() for v in rec) for t, rec in self._records.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.beta, self.eps = float(state["beta"]), float(state["eps"])
        self.horizon, self.sketch_size = int(state["horizon"]), int(state["sketch_size"])
        self.seed = int(state["seed"])
        if "gram" in state:
            self._gram = None if state["gram"] is None else state["gram"].clone().to(torch.float64)
            self._split = bool(state["split"])
        else:  # a checkpoint of the rule that averaged E_P², E_C² (and maybe E_PC) alone
            self._gram, self._split = _gram_from_errors(state["e_p"], state["e_c"], state.get("cross")), False
        self._count = int(state["measurements"])
        self._numel = state["numel"]
        self._index = None if state["index"] is None else state["index"].clone()
        self._records = {int(t): tuple(v.clone() for v in rec) for t, rec in state["records"].items()}


def _gram_from_errors(e_p: float | None, e_c: float | None, cross: float | None) -> Tensor | None:
    """The Gram matrix of (e_C, v = x̂ − x^j, 0) with the given E_P, E_C and E_PC (0 if unknown)."""
    if e_p is None or e_c is None:
        return None
    cc = e_c * e_c
    cv = (cross if cross is not None else 0.0) - cc  # E_PC = ⟨e_C + v, e_C⟩
    vv = e_p * e_p - cc - 2 * cv  # E_P² = ‖e_C + v‖²
    return torch.tensor([[cc, cv, 0.0], [cv, vv, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
