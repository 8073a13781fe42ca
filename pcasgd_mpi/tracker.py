"""pc-asgd-av's measured substitution errors, per neighbour (ALGORITHM.md "Adaptive variant").

Pure tensor code, no MPI: the optimizer records the substitutes it used for a stale neighbour at
the neighbour's step t and, when that neighbour's message of step t arrives, the tracker measures
both substitutes against it and turns the errors into θ_l.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class SubstitutionTracker:
    """Section "Adaptive variant": measured error of the two substitutes for one neighbour l.

    ``record(t, x̂, x^j)`` keeps the two substitutes that stood for x^l_t, one record per step t;
    ``observe(s, x^l_s)`` measures the record of exactly step s against it (a substitute is
    compared with the truth of its own step, not with a later one whose weights have moved on) and
    discards the records older than s, which a newer message has overtaken. Each measurement
    e_P = ‖x̂_t − x^l_t‖, e_C = ‖x^j_t − x^l_t‖ and the cross term ⟨x̂_t − x^l_t, x^j_t − x^l_t⟩
    updates the averages E² ← β E² + (1 − β) e² (the first one initialises them); the default
    β = 0.97 remembers about 30 measurements.

    Memory: at most ``horizon`` records, those of the steps t_new − H < t ≤ t_new (an older one
    could only be measured by a message staler than the horizon, which the rule drops anyway).
    A record holds only ``sketch_size`` coordinates of each substitute, a fixed random subset
    drawn once from ``seed`` and used for x̂, x^j and the truth alike; the norms are scaled by
    sqrt(n / m), so E_P and E_C estimate the full-vector norms and θ does not depend on the scale.
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
        self._e_p: float | None = None  # E_P and E_C, both set by the first measurement
        self._e_c: float | None = None
        self._cross: float | None = None  # mean of ⟨e_P, e_C⟩ (vectors), same averaging
        self._count = 0
        self._numel: int | None = None  # n, fixed by the first vector seen
        self._index: Tensor | None = None  # the sketch's coordinates; None: all of them
        self._records: dict[int, tuple[Tensor, Tensor]] = {}  # t -> (x̂_t, x^j_t) on the sketch

    @property
    def theta(self) -> float:
        """θ_l = (E_C² − E_PC) / (E_P² + E_C² − 2 E_PC + ε), clamped to [0, 1]; 0.5 before measuring.

        This is the θ that minimises the measured mean squared error of the blend
        θ x̂ + (1 − θ) x^j against the truth, E‖e_C + θ (e_P − e_C)‖². The two substitutes miss
        the truth largely in the same direction (both lack the neighbour's recent movement), so
        E_PC is large: ignoring it, as the weight E_C² / (E_P² + E_C²) of independent estimators
        does, gave the prediction about 40 % when it measured 15–30 % worse than clipping.
        """
        if self._e_p is None or self._e_c is None:
            return 0.5
        cross = self._cross or 0.0
        num = self._e_c**2 - cross
        den = self._e_p**2 + self._e_c**2 - 2.0 * cross
        if den <= self.eps:  # the two substitutes coincide: any θ gives the same blend
            return 0.5
        return min(1.0, max(0.0, num / den))

    e_p = property(lambda self: self._e_p, doc="E_P (float), None before the first measurement.")
    e_c = property(lambda self: self._e_c, doc="E_C (float), None before the first measurement.")
    cross = property(lambda self: self._cross, doc="E_PC = mean ⟨e_P, e_C⟩ (float), None before measuring.")
    measurements = property(lambda self: self._count, doc="Number of measurements made.")
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

    def record(self, t: int, x_hat: Tensor, x_self: Tensor) -> bool:
        """Keep the substitutes that stood for x^l_t; returns whether a record was made.

        A step that already has a record keeps its first one, and a step at least ``horizon``
        behind the newest record is refused: either would break the bound of H records.
        """
        t = int(t)
        newest = max(self._records, default=t)
        if t in self._records or t <= newest - self.horizon:
            return False
        self._records[t] = (self._sketch(x_hat), self._sketch(x_self))
        for old in [s for s in self._records if s <= t - self.horizon]:
            del self._records[old]
        return True

    def observe(self, s: int, x_true: Tensor) -> bool:
        """Measure the record of step s against x^l_s and drop the older ones; returns whether it
        measured.

        A measurement whose square is inf or NaN (a non-finite truth or substitute, or an error
        beyond 1e154) would stay in the averages for good and pin θ to NaN or 0: the record is
        dropped unmeasured instead, and False returned, so that later records can be measured.
        """
        s = int(s)
        for old in [t for t in self._records if t < s]:
            del self._records[old]
        pending = self._records.pop(s, None)
        if pending is None:
            return False
        truth = self._sketch(x_true)
        d_p, d_c = pending[0].sub_(truth), pending[1].sub_(truth)
        scale = self._scale()
        e_p = math.sqrt(scale) * torch.linalg.vector_norm(d_p).item()
        e_c = math.sqrt(scale) * torch.linalg.vector_norm(d_c).item()
        cross = scale * torch.dot(d_p, d_c).item()
        if not (math.isfinite(e_p * e_p) and math.isfinite(e_c * e_c) and math.isfinite(cross)):
            return False  # squares are averaged
        self._average(e_p, e_c, cross)
        self._count += 1
        return True

    def _average(self, e_p: float, e_c: float, cross: float) -> None:
        """E² ← β E² + (1 − β) e²: θ weighs mean squares, so a rare prediction that overshoots
        by far (a gradient spike rolled forward τ steps) lowers θ as much as it costs, where an
        average of norms would let it pass as one ordinary error among many."""
        if self._e_p is None or self._e_c is None:
            self._e_p, self._e_c, self._cross = e_p, e_c, cross
        else:
            self._e_p = math.sqrt(self.beta * self._e_p**2 + (1.0 - self.beta) * e_p**2)
            self._e_c = math.sqrt(self.beta * self._e_c**2 + (1.0 - self.beta) * e_c**2)
            self._cross = self.beta * (self._cross or 0.0) + (1.0 - self.beta) * cross

    def state_dict(self) -> dict:
        """Settings, averages, the sketch's coordinates and copies of the pending records."""
        return {
            "beta": self.beta,
            "eps": self.eps,
            "horizon": self.horizon,
            "sketch_size": self.sketch_size,
            "seed": self.seed,
            "e_p": self._e_p,
            "e_c": self._e_c,
            "cross": self._cross,
            "measurements": self._count,
            "numel": self._numel,
            "index": None if self._index is None else self._index.clone(),
            "records": {t: (h.clone(), c.clone()) for t, (h, c) in self._records.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.beta, self.eps = float(state["beta"]), float(state["eps"])
        self.horizon, self.sketch_size = int(state["horizon"]), int(state["sketch_size"])
        self.seed = int(state["seed"])
        self._e_p, self._e_c = state["e_p"], state["e_c"]
        self._cross = state.get("cross")  # absent in checkpoints of the independent-error rule
        self._count = int(state["measurements"])
        self._numel = state["numel"]
        self._index = None if state["index"] is None else state["index"].clone()
        self._records = {int(t): (h.clone(), c.clone()) for t, (h, c) in state["records"].items()}
