"""What each neighbour contributes at a step: its copy, its slope and its staleness (ALGORITHM.md).

Lockstep hands out the message of step k − d from a short history (exact τ = d). Async uses each
neighbour's newest message and counts its staleness in the neighbour's own steps (staleness.py).
Both turn the message into the slope the prediction needs (`Slope`):
- update: the sender's last actual step Δ, sent as g = −Δ/α (plain SGD sends g itself);
- gradient: the sender's raw gradient;
- velocity: no slope on the wire; (x_s − x_s')/(s − s') from the two newest messages, as g = −v/α;
- own: no slope on the wire; the receiver's own recent steps (trail.py), set by the optimizer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import rule
from .delay import DelayModel
from .exchange import INITIAL, Exchange, Message
from .staleness import SenderClock


@dataclass
class View:
    """The neighbours at one step, in the order of the exchange's neighbour list."""

    neighbours: list[rule.Neighbour]
    steps: list[int | None]  # the step of each message used (None: nothing usable)
    sender_steps: list[int | None]  # the step each neighbour is at now (estimated in async)
    made_at: list[float | None] | None = None  # async: when each copy was made (this rank's clock)
    self_weight: float | None = None  # the agent's own weight when the neighbours' were rescaled
    back: list[int | None] | None = None  # async: how old each neighbour's copy of this rank is, in its steps


def _slope(msg_grad: torch.Tensor | None, alpha: float, lr: float, scratch: dict, source: int):
    """The slope as the receiver's rule reads it, x̂ = x_s − lr·g·φ: rescaled when the sender's
    step size differs from ours, so that lr·g is the sender's own step."""
    if msg_grad is None or alpha <= 0 or alpha == lr:
        return msg_grad
    buf = scratch.get(source)
    if buf is None or buf.shape != msg_grad.shape:
        buf = scratch[source] = torch.empty_like(msg_grad)
    return torch.mul(msg_grad, alpha / lr, out=buf)


class _History:
    """Per neighbour, the last few messages by step, so lockstep can hand out the one from step k − d."""

    def __init__(
        self, neighbours: list[int], depth: int, numel: int, dtype: torch.dtype, with_grad: bool, device: torch.device
    ):
        self.depth = depth
        self.steps = {n: [-1] * depth for n in neighbours}
        self.x = {n: torch.empty(depth, numel, dtype=dtype, device=device) for n in neighbours}
        self.g = {n: torch.empty(depth, numel, dtype=dtype, device=device) for n in neighbours} if with_grad else None

    def store(self, msg) -> None:
        slot = msg.step % self.depth
        self.steps[msg.source][slot] = msg.step
        self.x[msg.source][slot].copy_(msg.weights)
        if self.g is not None:
            self.g[msg.source][slot].copy_(msg.grad)

    def state_dict(self) -> dict:
        return {
            "steps": {str(n): list(v) for n, v in self.steps.items()},
            "x": {str(n): v.clone() for n, v in self.x.items()},
            "g": {str(n): v.clone() for n, v in self.g.items()} if self.g is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        for n in self.steps:
            self.steps[n] = list(state["steps"][str(n)])
            self.x[n].copy_(state["x"][str(n)])
            if self.g is not None:
                self.g[n].copy_(state["g"][str(n)])

    def get(self, source: int, step: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The message of `step`, or (None, None) when it was refused (treated as never received)."""
        slot = step % self.depth
        if self.steps[source][slot] != step:
            return None, None
        return self.x[source][slot], (self.g[source][slot] if self.g is not None else None)


class LockstepNeighbours:
    def __init__(
        self,
        exchange: Exchange,
        weights: dict[int, float],
        delay: DelayModel,
        rank: int,
        numel: int,
        dtype: torch.dtype,
        device: torch.device,
        with_grad: bool,
        velocity: bool = False,
    ):
        self.exchange, self.weights, self.delay, self.rank = exchange, weights, delay, rank
        self.velocity = velocity
        # A neighbour can be one step ahead while we wait, hence depth max_delay + 2; the velocity
        # also reads the message before the one used.
        depth = delay.max_delay + (3 if velocity else 2)
        self.history = _History(list(weights), depth, numel, dtype, with_grad, device)
        self.stop_at: int | None = None  # the earliest stop step any message asked for
        self.done_steps: dict[int, int] = {}  # ranks that finished training, and after how many steps
        self._scaled: dict[int, torch.Tensor] = {}
        self._alpha: dict[tuple[int, int], float] = {}

    def _store(self, msg: Message) -> None:
        self.history.store(msg)
        self._alpha[(msg.source, msg.step % self.history.depth)] = msg.alpha
        if msg.stop_at is not None and (self.stop_at is None or msg.stop_at < self.stop_at):
            self.stop_at = msg.stop_at

    def _check_done(self, k: int) -> None:
        # Any rank, not only a neighbour: a rank that stopped early holds up the whole graph.
        early = {n: s for n, s in self.done_steps.items() if s <= k}
        if early:
            n, s = next(iter(early.items()))
            raise ValueError(
                f"rank {n} finished after {s} steps while this rank waits for its step {k}: "
                f"in lockstep every rank must make the same number of steps"
            )

    def at(self, k: int, deadline: float, lr: float, poll=None) -> View:
        def also():
            if poll is not None:
                poll()
            self._check_done(k)

        self.exchange.wait_for_step(k, deadline, self._store, also=also)
        nbs, steps = [], []
        for n, w in self.weights.items():
            s = k - self.delay.delay(n, self.rank, k)
            xs, gs = self.history.get(n, s) if s >= 0 else (None, None)
            if xs is not None and self.velocity:
                gs = self._velocity(n, s, xs, lr)
            elif xs is not None:
                gs = _slope(gs, self._alpha.get((n, s % self.history.depth), 0.0), lr, self._scaled, n)
            nbs.append(rule.Neighbour(w, xs, gs, k - s if xs is not None else 0))
            steps.append(s if xs is not None else None)
        return View(nbs, steps, [k if s is not None else None for s in steps])

    def _velocity(self, n: int, s: int, xs: torch.Tensor, lr: float) -> torch.Tensor | None:
        """−(x_s − x_{s−1})/lr: the sender's whole last movement (its step and its mixing) as a
        slope; None when the message of step s − 1 is not held."""
        prev, _ = self.history.get(n, s - 1) if s >= 1 else (None, None)
        if prev is None:
            return None
        buf = self._scaled.get(n)
        if buf is None or buf.shape != xs.shape:
            buf = self._scaled[n] = torch.empty_like(xs)
        return torch.sub(prev, xs, out=buf).div_(lr)


class AsyncNeighbours:
    def __init__(self, exchange: Exchange, weights: dict[int, float], clock: SenderClock, velocity: bool):
        self.exchange, self.weights, self.clock = exchange, weights, clock
        self.velocity = velocity
        self._scaled: dict[int, torch.Tensor] = {}
        # velocity: per neighbour the slope −(x_s − x_s')/((s − s')·α) and the step it belongs to
        self._vel: dict[int, torch.Tensor] = {}
        self._vel_step: dict[int, int] = {}
        self._lr = 0.0
        self.observe: Callable[[Message], None] | None = None  # sees every message as it arrives

    def start(self, deadline: float) -> None:
        """Wait (up to `deadline`) for every neighbour's starting weights, the message of step
        `INITIAL` each rank sends before its first step."""
        self.exchange.wait_for_step(INITIAL, deadline, self._on_message)

    def _on_message(self, msg: Message) -> None:
        if msg.step == INITIAL:
            return  # weights from before the first step: no rate, no slope, nothing to measure
        self.clock.observe(msg.source, msg.step, msg.made_at)
        if self.observe is not None:
            self.observe(msg)
        if not self.velocity:
            return
        old = self.exchange.latest(msg.source)  # still the previous newest: the swap comes after this call
        if old is None or old.step == INITIAL or msg.step <= old.step or self._lr <= 0:
            return
        buf = self._vel.get(msg.source)
        if buf is None:
            buf = self._vel[msg.source] = torch.empty_like(msg.weights)
        torch.sub(old.weights, msg.weights, out=buf).div_((msg.step - old.step) * self._lr)
        self._vel_step[msg.source] = msg.step

    def at(self, k: int, lr: float, now: float) -> View:
        self._lr = lr
        self.exchange.poll(self._on_message)
        nbs, steps, current, made, back = [], [], [], [], []
        for n, w in self.weights.items():
            msg = self.exchange.latest(n)
            if msg is None or n in self.exchange.failed:
                nbs.append(rule.Neighbour(w, None, None, 0))
                steps.append(None)
                current.append(None)
                made.append(None)
                back.append(None)
                continue
            est = self.clock.estimate(n, msg.step, msg.made_at, now)
            if self.velocity:
                grad = self._vel[n] if self._vel_step.get(n) == msg.step else None
            else:
                grad = _slope(msg.grad, msg.alpha, lr, self._scaled, n)
            nbs.append(rule.Neighbour(w, msg.weights, grad, est.staleness))
            steps.append(msg.step)
            # the starting weights stand for no step of the sender's: nothing to measure them against
            current.append(None if msg.step == INITIAL else est.sender_step)
            made.append(msg.made_at)
            back.append((msg.lags or {}).get(self.exchange.rank))
        return View(nbs, steps, current, made, back=back)
