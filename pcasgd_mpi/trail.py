"""This rank's own path: the slopes of `--slope own`, `--slope movement` and `--slope drift`
(ALGORITHM.md "The predicting step").

Pure tensor code, no MPI.

`OwnTrail` (receiver side, `own`): the trail keeps U_k = Σ_{t<k} Δ_t, the local optimizer's steps summed
(mixing left out), at the start of each of the last ``depth`` steps, with the time each step began.
A stale copy of a neighbour, made at its step s, is then rolled forward by the steps this rank made
since: x̂ = x_s + τ · (U_k − U_then) / n, the average own step over the n own steps since the copy
was made, times the τ steps the neighbour is estimated to have made meanwhile. In lockstep n = τ
and this is x_s + U_k − U_s exactly.

Why the own updates: every rank moves the common part of the model the same way, so under any
delay its own recent steps say how far a neighbour's weights have moved on, without the delay of
the neighbour's own slope (which arrives as old as the copy) and without a slope on the wire.

`movement`: the same trail summing this rank's whole movement x_{k+1} − x_k (mixing included), so
U_k − U_then = x_k − x_then, and the copy is rolled forward by exactly that: x̂ = x_s + x_k − x_then
(`slope(..., over=τ)`), whatever the two ranks' speeds.
"""

from __future__ import annotations

import math

import torch


class OwnTrail:
    def __init__(self, numel: int, dtype: torch.dtype, device: torch.device | str, depth: int) -> None:
        if depth < 2:
            raise ValueError(f"depth must be >= 2, got {depth}")
        self.dtype = dtype  # the slopes come out in the model's dtype, like the neighbours' copies
        dtype = torch.promote_types(dtype, torch.float32)  # sums of small steps need the bits
        self.depth = int(depth)
        self.total = torch.zeros(numel, dtype=dtype, device=device)  # U of the step under way
        self._marks = torch.zeros(depth, numel, dtype=dtype, device=device)
        self._steps = [-1] * depth
        self._times = [math.nan] * depth
        self._step = -1  # the newest marked step

    def mark(self, k: int, now: float) -> None:
        """Step k begins at time ``now``: keeps U_k (call before adding Δ_k)."""
        slot = k % self.depth
        self._marks[slot].copy_(self.total)
        self._steps[slot], self._times[slot], self._step = k, now, k

    def add(self, delta: torch.Tensor) -> None:
        """Δ_k, the local optimizer's step of the step under way."""
        self.total.add_(delta.reshape(-1))

    def add_movement(self, new: torch.Tensor, old: torch.Tensor) -> None:
        """x_{k+1} − x_k, this rank's whole movement in the step under way (`movement`)."""
        self.total.add_(new.reshape(-1)).sub_(old.reshape(-1))

    def _slot_of_step(self, s: int) -> int | None:
        slot = s % self.depth
        return slot if self._steps[slot] == s else None

    def _slot_of_time(self, made_at: float) -> int | None:
        """The newest step that began no later than ``made_at``; the oldest held if all began later."""
        held = [i for i in range(self.depth) if self._steps[i] >= 0]
        if not held:
            return None
        before = [i for i in held if self._times[i] <= made_at]
        if before:
            return max(before, key=lambda i: self._steps[i])
        return min(held, key=lambda i: self._steps[i])

    def steps_since(self, made_at: float) -> int | None:
        """This rank's own steps since a copy made at ``made_at`` (the n of `slope`), None: none held."""
        slot = self._slot_of_time(made_at)
        return None if slot is None else self._step - self._steps[slot]

    def slope(
        self,
        lr: float,
        *,
        step: int | None = None,
        made_at: float | None = None,
        out: torch.Tensor | None = None,
        over: float | None = None,
    ) -> torch.Tensor | None:
        """g = −(U_k − U_then) / (n·lr), read by the rule as x̂ = x_s − lr·τ·g: the average own step
        over the n steps since the copy (``step`` in lockstep, ``made_at`` in async) times τ.
        With ``over`` = τ the division is by τ instead, so that x̂ = x_s + U_k − U_then exactly.

        None when no own step was made since (nothing to roll forward) or, in lockstep, when the
        copy's step is no longer held.
        """
        if (step is None) == (made_at is None):
            raise ValueError("give the copy's step or the time it was made, not both")
        slot = self._slot_of_step(step) if step is not None else self._slot_of_time(made_at)
        if slot is None or lr <= 0:
            return None
        n = self._step - self._steps[slot]
        if n <= 0:
            return None
        if out is None:
            out = torch.empty_like(self.total, dtype=self.dtype)
        return torch.sub(self._marks[slot], self.total, out=out).div_((n if over is None else over) * lr)

    def state_dict(self) -> dict:
        return {
            "total": self.total.clone(),
            "marks": self._marks.clone(),
            "steps": list(self._steps),
            "times": list(self._times),
            "step": self._step,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["marks"].shape != self._marks.shape:
            raise ValueError(f"trail of shape {tuple(state['marks'].shape)}; this one is {tuple(self._marks.shape)}")
        self.total.copy_(state["total"])
        self._marks.copy_(state["marks"])
        self._steps, self._times, self._step = list(state["steps"]), list(state["times"]), int(state["step"])


class Drift:
    """Sender side, `--slope drift`: this rank's average movement per step, optimizer and mixing.

    m_k = β m_{k−1} + (1 − β)(x_k − x_{k−1}), bias-corrected as Adam's moments are (divided by
    1 − β^n after n movements), sent with x_k as the slope g = −m_k / α. The receiver rolls the
    copy forward as x_s + τ m_s: the sender's recent path extended.

    Why the whole movement: an agent's own optimizer step is mostly undone by its mixing (under
    momentum its velocity carries its own minibatches' noise and, under label skew, its own
    shard's pull, and the neighbours pull back), so rolling the copy forward by τ of its steps
    overshoots; what the weights actually did, averaged over a few tens of steps, keeps the drift
    they share and averages that noise out.
    """

    def __init__(self, like: torch.Tensor, beta: float = 0.95) -> None:
        if not 0.0 < beta < 1.0:
            raise ValueError(f"beta must be in (0, 1), got {beta}")
        self.beta = float(beta)
        dtype = torch.promote_types(like.dtype, torch.float32)
        self.mean = torch.zeros(like.numel(), dtype=dtype, device=like.device)
        self.prev = torch.zeros_like(self.mean)
        self.count = 0  # movements averaged so far
        self.started = False  # prev holds x_{k-1}

    def slope(self, x_k: torch.Tensor, lr: float, out: torch.Tensor) -> torch.Tensor:
        """Takes x_k (this step's weights), writes g = −m_k / lr into ``out`` (zero before any movement)."""
        x = x_k.reshape(-1)
        if self.started:  # m ← βm + (1 − β)(x − prev), without a model-sized temporary
            self.mean.mul_(self.beta).add_(x, alpha=1.0 - self.beta).sub_(self.prev, alpha=1.0 - self.beta)
            self.count += 1
        self.prev.copy_(x)
        self.started = True
        if self.count == 0 or lr <= 0:
            return out.zero_()
        return torch.mul(self.mean, -1.0 / ((1.0 - self.beta**self.count) * lr), out=out)

    def state_dict(self) -> dict:
        return {"mean": self.mean.clone(), "prev": self.prev.clone(), "count": self.count, "started": self.started}

    def load_state_dict(self, state: dict) -> None:
        if state["mean"].shape != self.mean.shape:
            raise ValueError(f"drift of shape {tuple(state['mean'].shape)}; this one is {tuple(self.mean.shape)}")
        self.mean.copy_(state["mean"])
        self.prev.copy_(state["prev"])
        self.count, self.started = int(state["count"]), bool(state["started"])
