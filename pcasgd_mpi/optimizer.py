"""DistributedOptimizer: wraps a torch optimizer; `step()` does the local step, the exchange and the rule.

The parameters of the model are re-pointed into one contiguous flat buffer (flat.py), so mixing,
sending and the rule work on a single vector (ALGORITHM.md "Setting"). The local step Δ is whatever
the wrapped optimizer does (plain SGD, momentum, weight decay, ...): Δ = x after its step − x before.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Callable

import networkx as nx
import torch
from mpi4py import MPI

from . import collectives, momentum, rule
from .config import (
    Algorithm,
    AvMomentum,
    Balance,
    Mode,
    MomentumKind,
    OnDiverge,
    Slope,
    ThetaRule,
    TrainConfig,
    check_kinds,
    check_rule_settings,
    resolve_balance,
)
from .delay import DelayModel, LinkDelays
from .exchange import INITIAL, Exchange
from .flat import FlatParameters
from .links import LinkPulls
from .momentum import QuasiGlobalMomentum, SharedMomentum
from .neighbours import AsyncNeighbours, LockstepNeighbours, View
from .roster import Roster, StopReason
from .staleness import SenderClock, clock_offset
from .trail import Drift, OwnTrail
from .transport import CudaAwareTransport, Transport, make_transport
from .update import Diverged, RuleStep, StepInfo  # noqa: F401  (Diverged: part of this module's API)
from .world import World

_D = TrainConfig()  # the defaults are defined once, there
NEVER = "never"  # staleness histogram key for a neighbour that has not sent anything yet
BALANCE_CAP = 8.0  # the largest factor a slow rank's step is scaled by (--balance lr)


class DistributedOptimizer(RuleStep):
    """Decentralized training step over MPI with the PC-ASGD family of rules (ALGORITHM.md).

    Call `step(closure)` once per iteration after `loss.backward()`; `closure()` must return the
    loss of the current parameters on the same minibatch (no backward), it is needed by
    `pc-asgd-pv`. Call `finalize()` on every rank at the end, then `average()` for the average
    model (`load_average()` puts it into the model).
    """

    def __new__(cls, *args, **kwargs):
        if cls is DistributedOptimizer and Algorithm(kwargs.get("algorithm", _D.algorithm)) is Algorithm.ALLREDUCE:
            from .allreduce import AllreduceOptimizer

            return super().__new__(AllreduceOptimizer)
        return super().__new__(cls)

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: torch.nn.Module,
        *,
        world: World,
        algorithm: Algorithm | str = _D.algorithm,
        mode: Mode | str = _D.mode,
        theta: float = _D.theta,
        theta_rule: ThetaRule | str = _D.theta_rule,
        lam: float = _D.lam,
        lam_mode: str = _D.lam_mode,
        tolerance: int | None = None,
        horizon: int = _D.horizon,
        delay: DelayModel | str | None = None,
        timeout: float = _D.timeout,
        check_finite: bool = True,
        av_beta: float = 0.97,
        fault_tolerant: bool = False,
        warn: Callable[[str], None] | None = None,
        transport: Transport | None = None,
        slope: Slope | str = _D.slope,
        link_delay: float = 0.0,
        balance: Balance | str = Balance.AUTO,
        on_diverge: OnDiverge | str = _D.on_diverge,
        momentum_kind: MomentumKind | str = _D.momentum_kind,
        av_momentum: AvMomentum | str = _D.av_momentum,
    ):
        self.inner, self.model, self.world = optimizer, model, world
        self.algorithm, self.mode = Algorithm(algorithm), Mode(mode)
        self.theta, self.lam, self.lam_mode = float(theta), float(lam), lam_mode
        self.theta_rule = ThetaRule(theta_rule)
        self.tolerance = tolerance if tolerance is not None else (0 if self.mode is Mode.LOCKSTEP else 1)
        self.horizon = int(horizon)
        self.delay = DelayModel.parse(delay) if isinstance(delay, str) else (delay or DelayModel())
        self.timeout = float(timeout)
        self.check_finite = check_finite
        self.on_diverge = OnDiverge(on_diverge)
        self.diverged_at: int | None = None  # the step this agent's weights became inf or NaN
        self.fault_tolerant = fault_tolerant
        self.slope, self.balance = Slope(slope), resolve_balance(balance, self.mode)
        self.momentum_kind = MomentumKind(momentum_kind)
        self.av_momentum = AvMomentum(av_momentum)
        self._warn = warn or (lambda msg: None)
        _check_settings(self, link_delay)
        self.delay.check_ranks(world.size)
        self.flat = FlatParameters(model)
        self.neighbours = world.neighbours
        self.quasi_global = (
            QuasiGlobalMomentum(optimizer, [p for _, p in self.flat.named])
            if self.momentum_kind is MomentumKind.QUASI_GLOBAL
            else None
        )
        self.shared_momentum = self._make_shared_momentum()
        self.step_count = 0
        # Collectives after training run among these ranks: all of them, or the survivors (ULFM).
        self.collective_comm: MPI.Comm = world.comm
        self.failed_ranks: list[int] = []
        self.staleness_histogram = {n: Counter() for n in self.neighbours}
        self.pv_wins = {"predict": 0, "clip": 0}
        # Per neighbour: steps at which its message was left out for non-finite values, and the
        # step of the newest message known to be so (it is not mixed in again while it is held).
        self.non_finite = Counter()
        self._bad_step: dict[int, int | None] = {n: None for n in self.neighbours}
        self._delta = torch.empty_like(self.flat.data)
        self._pv_buffers: tuple[torch.Tensor, torch.Tensor] | None = None
        self._pull: torch.Tensor | None = None  # --theta-rule link: the step's pulls, summed
        self.transport = transport if transport is not None else make_transport(self.flat.device)
        # Collectives can pass device memory to MPI directly only when the MPI reads it.
        self._device_collectives = isinstance(self.transport, CudaAwareTransport)
        self.roster = Roster(world.comm)
        self.clock_offset = 0.0  # async: this rank's clock offset to rank 0, in seconds
        self._stop_at: int | None = None  # lockstep: the step after which every rank stops
        self.scale = 1.0  # --balance lr: this rank's step-size factor
        self.trackers = {}
        self.repairs: list = []  # --fault-tolerant: the graph repairs made after ranks died
        self.on_repair: Callable | None = None  # called with each Repair (the trainer adopts shards)
        self._original_group = world.comm.Get_group()
        self._graph = world.graph  # named by original ranks; repaired when ranks die
        self.names = list(range(world.size))  # rank in the current communicator -> original rank
        self._link_delay, self._av_beta = link_delay, av_beta
        self.trail = self._make_trail()
        self.drift = Drift(self.flat.data) if self.slope is Slope.DRIFT and self.algorithm.sends_gradient else None
        self._own_slopes: dict[int, torch.Tensor] = {}
        self._lags: dict[int, int] | None = None  # async movement: the ages of the copies at the last step
        self._started = False  # async: the starting weights went out (mark_start)
        self.links = self._make_links()
        self._setup_exchange(link_delay, av_beta)

    def _make_trail(self) -> OwnTrail | None:
        """--slope own / movement: this rank's recent path. Lockstep uses copies at most max_delay
        steps old; async keeps 2(H + 1) steps, and rolls an older copy forward by the average step
        over them."""
        if not self.slope.receiver_side or not self.algorithm.sends_gradient:
            return None
        depth = self.delay.max_delay + 2 if self.mode is Mode.LOCKSTEP else 2 * (self.horizon + 1)
        return OwnTrail(self.flat.numel, self.flat.dtype, self.flat.device, depth)

    def _make_shared_momentum(self) -> SharedMomentum | None:
        """pc-asgd-av under a local momentum mixes the momentum buffers too (ALGORITHM.md "Adaptive
        variant"); another optimizer keeps its moments to itself, and is told so."""
        plain_sgd = type(self.inner) is torch.optim.SGD and not momentum.has_momentum(self.inner)
        if (
            self.algorithm is not Algorithm.PC_ASGD_AV
            or self.av_momentum is AvMomentum.OWN
            or self.momentum_kind is not MomentumKind.LOCAL
            or plain_sgd
        ):
            return None
        reason = momentum.why_not_shared(self.inner, self.slope, self.balance)
        if reason is not None:
            self._warn(f"pc-asgd-av leaves each rank's momentum its own: {reason}")
            return None
        return SharedMomentum(self.inner, [p for _, p in self.flat.named])

    def _make_links(self) -> LinkPulls | None:
        """--theta-rule link: one γ for the whole graph (every rank computes the same), from the
        links' longest delays and the momentum the pulls go through."""
        if self.theta_rule is not ThetaRule.LINK:
            return None
        size, W = self.world.size, self.world.W
        delays = [[self.delay.link_delay(a, b) if W[a, b] > 0 else 0 for b in range(size)] for a in range(size)]
        beta = 0.0 if self.quasi_global is None else self.quasi_global.beta
        gain = rule.link_gain(W, delays, momentum=beta)
        links = {n: (self.world.weight(n), delays[self.world.rank][n]) for n in self.neighbours}
        return LinkPulls(links, gain, self.flat.numel, self.flat.dtype, self.flat.device)

    def _setup_exchange(self, link_delay: float, av_beta: float, measure_clock: bool = True) -> None:
        wire_slope = (
            self.algorithm.sends_gradient
            and self.links is None  # the link pulls read no slope
            and not (self.slope is Slope.VELOCITY or self.slope.receiver_side)
        )
        self.exchange = Exchange(
            self.world.comm,
            self.neighbours,
            self.flat.numel,
            self.flat.dtype,
            signature=self.flat.signature,
            with_grad=wire_slope,
            warn=self._warn,
            transport=self.transport,
            hold=link_delay,
        )
        weights = {n: self.world.weight(n) for n in self.neighbours}
        deadline = self._deadline()
        if self.mode is Mode.LOCKSTEP:
            self.view = LockstepNeighbours(
                self.exchange,
                weights,
                self.delay if self.links is None else LinkDelays(self.delay),
                self.world.rank,
                self.flat.numel,
                self.flat.dtype,
                self.flat.device,
                wire_slope,
                velocity=self.slope is Slope.VELOCITY,
            )
            self._diameter = nx.diameter(self.world.graph) if self.world.size > 1 else 0
            self.clock = None
        else:
            if measure_clock:
                self.clock_offset = clock_offset(self.world.comm, deadline) if self.world.size > 1 else 0.0
            offset = self.clock_offset
            self.clock = SenderClock(self.neighbours, now=lambda: time.time() + offset, start_allowance=self.horizon)
            self.clock.start = self.clock.now()
            self.view = AsyncNeighbours(self.exchange, weights, self.clock, self.slope is Slope.VELOCITY)
        if self.algorithm is Algorithm.PC_ASGD_AV:
            self.trackers = {n: rule.SubstitutionTracker(beta=av_beta, horizon=self.horizon) for n in self.neighbours}
            if self.mode is Mode.ASYNC:
                self.view.observe = self._observe_arrival
        if self.algorithm.sends_gradient:
            # at set-up, not in the middle of training when the first neighbour turns stale
            rule.prepare(self.flat.data, self.lam, self.lam_mode)
        self._plain_sgd = _is_plain_sgd(self.inner)

    # ------------------------------------------------------------------ accessors
    @property
    def lr(self) -> float:
        return float(self.inner.param_groups[0]["lr"])

    @property
    def signature(self) -> int:
        """Hash of the model's parameter names, shapes and dtypes."""
        return self.flat.signature

    @property
    def parameters_vector(self) -> torch.Tensor:
        """All trained parameters as one flat vector (a view: writing it changes the model)."""
        return self.flat.data

    @property
    def transport_name(self) -> str | None:
        return self.transport.name

    def av_state(self) -> dict | None:
        """pc-asgd-av: θ_l, r_l, E_P, E_C, E_PC and the number of measurements per neighbour."""
        if not self.trackers:
            return None
        return {
            str(n): {
                "theta": t.theta,
                "reach": t.reach,
                "e_p": t.e_p,
                "e_c": t.e_c,
                "cross": t.cross,
                "measurements": t.measurements,
            }
            for n, t in self.trackers.items()
        }

    def exchange_stats(self) -> dict | None:
        return dataclasses.asdict(self.exchange.stats)

    def mark_start(self) -> None:
        """Every rank starts stepping now (call it on every rank after a barrier).

        Async: each rank first sends its starting weights and waits for its neighbours' (up to
        the timeout), so that a neighbour slow to finish its first step is mixed in from the start
        instead of being dropped until its first message; then the staleness clock's reference
        time is taken. The first `step()` calls it when nobody did."""
        self._started = True
        if self.clock is None:
            return
        weights, grad = self.exchange.send_buffer()
        weights.copy_(self.flat.data)
        if grad is not None:
            grad.zero_()  # no step made yet: the prediction leaves the starting weights where they are
        self.exchange.send_prepared(INITIAL, deadline=self._deadline(), made_at=self._now())
        self.view.start(self._deadline())
        self.clock.start = self.clock.now()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def _deadline(self) -> float:
        return time.monotonic() + self.timeout

    def _now(self) -> float:
        return self.clock.now() if self.clock is not None else time.time()

    # ------------------------------------------------------------------ the step
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> StepInfo:
        k = self.step_count
        if self.algorithm is Algorithm.PC_ASGD_PV and closure is None:
            raise ValueError(
                "pc-asgd-pv needs step(closure=...): a function returning the loss of the "
                "current parameters on the same minibatch, without backward"
            )
        if not self._started:
            self.mark_start()
        x = self.flat.data
        weights, grad = self.exchange.send_buffer()
        weights.copy_(x)  # x_k: the message and the snapshot the rule reads (not written before the next step)
        x_k = weights
        if self.trail is not None:
            self.trail.mark(k, self._now())
        send_after = grad is not None and self.slope is Slope.UPDATE
        if grad is not None and self.drift is not None:
            self.drift.slope(x_k, self.lr, out=grad)
        elif grad is not None and not send_after:
            self.flat.gather_grad(out=grad)
        if not send_after:
            self._send(k)
        if self.quasi_global is not None:
            self.quasi_global.before_step()
        self._local_step()
        torch.sub(x, x_k, out=self._delta)
        if send_after:
            if self._plain_sgd and self.scale == 1.0:
                self.flat.gather_grad(out=grad)  # Δ = −α·g exactly: the gradient is the slope, bit for bit
            else:
                torch.div(self._delta, -self.lr, out=grad)
            self._send(k)
        view = self._view(k)
        if self.fault_tolerant and (self.exchange.failed or self.exchange.revoked):
            self._repair(k)
            view = self._view(k)
        info = StepInfo(
            k, {n: (None if nb.x is None else nb.staleness) for n, nb in zip(self.neighbours, view.neighbours)}
        )
        if self.trail is not None:
            self._use_own_slopes(view)
        for n, tau in info.staleness.items():
            self.staleness_histogram.setdefault(self.names[n], Counter())[NEVER if tau is None else tau] += 1
        self._update_checked(x_k, view, closure, info)
        self._share_momentum(view.neighbours)
        if self.links is not None:
            self.links.commit()
        if info.choice is not None:
            self.pv_wins[info.choice] += 1
        if self.quasi_global is not None:
            self.quasi_global.after_step(x_k, self.flat.data)
        if self.trail is not None and self.slope is Slope.MOVEMENT:
            self.trail.add_movement(self.flat.data, x_k)
        elif self.trail is not None:
            self.trail.add(self._delta)
        self.step_count += 1
        return info

    def _use_own_slopes(self, view: View) -> None:
        """--slope own: each copy's slope is this rank's average step since the copy was made;
        --slope movement: this rank's whole movement since then, over the copy's staleness.

        In async mode a movement copy's age is then this rank's own steps since it was made (the
        loop it closes): a straggler's copy, fresh in its sender's steps, is several of a fast
        rank's. The horizon still reads the sender's steps, so a slow rank that keeps sending is
        never dropped for being slow (ALGORITHM.md, "θ by the delay")."""
        if self.slope is Slope.MOVEMENT and view.made_at is not None:
            self._age_by_own_steps(view)
        for i, (n, nb) in enumerate(zip(self.neighbours, view.neighbours)):
            if nb.x is None or nb.staleness == 0:
                continue
            buf = self._own_slopes.get(n)
            over = nb.staleness if self.slope is Slope.MOVEMENT else None
            if view.made_at is None:
                g = self.trail.slope(self.lr, step=view.steps[i], out=buf, over=over)
            else:
                g = self.trail.slope(self.lr, made_at=view.made_at[i], out=buf, over=over)
            if g is not None:
                self._own_slopes[n] = g
            view.neighbours[i] = dataclasses.replace(nb, grad=g)

    def _age_by_own_steps(self, view: View) -> None:
        """Also keeps the ages, which this rank's next message tells its neighbours."""
        lags = {}
        for i, (n, nb) in enumerate(zip(self.neighbours, view.neighbours)):
            if nb.x is None or view.made_at[i] is None or nb.staleness > self.horizon:
                continue
            own = self.trail.steps_since(view.made_at[i])
            if own is not None:
                view.neighbours[i] = dataclasses.replace(nb, staleness=min(own, self.horizon))
                lags[n] = view.neighbours[i].staleness
        self._lags = lags

    def _send(self, k: int) -> None:
        self.exchange.send_prepared(
            k,
            block=self.mode is Mode.LOCKSTEP,
            deadline=self._deadline(),
            made_at=self._now(),
            alpha=self.lr,
            stop_at=self._stop_at,
            lags=self._lags,
        )

    def _local_step(self) -> None:
        """The wrapped optimizer's step; with --balance lr, scaled by this rank's measured slowness."""
        if self.clock is not None:
            self.clock.tick(self.step_count)
        if self.balance is not Balance.LR or self.clock is None:
            self.inner.step()
            return
        own = self.clock.own.rate
        rates = [self.clock.rates[n].rate for n in self.neighbours]
        known = [r for r in rates if r is not None]
        self.scale = min(BALANCE_CAP, max(1.0, max(known) / own)) if own and known else 1.0
        saved = [g["lr"] for g in self.inner.param_groups]
        for g in self.inner.param_groups:
            g["lr"] = g["lr"] * self.scale
        try:
            self.inner.step()
        finally:
            for g, lr in zip(self.inner.param_groups, saved):
                g["lr"] = lr

    def _view(self, k: int) -> View:
        if self.mode is Mode.LOCKSTEP:
            self.view.done_steps = self.roster.done_steps
            view = self.view.at(k, self._deadline(), self.lr, poll=self.roster.poll)
            if self.view.stop_at is not None and (self._stop_at is None or self.view.stop_at < self._stop_at):
                self._stop_at = self.view.stop_at
            return view
        view = self.view.at(k, self.lr, self._now())
        if self.balance is Balance.MIX:
            self._mix_per_time(view)
        if self._takes_theta_by_the_delay and self.slope is not Slope.MOVEMENT:  # movement: by the trail
            self._lags_in_sender_steps(view)
        return view

    def _lags_in_sender_steps(self, view: View) -> None:
        """Async, without the trail that counts this rank's own steps: the ages of the copies in use,
        in their senders' steps, for this rank's next message; a copy past the horizon is dropped
        and says nothing. (Counted in this rank's own steps from its step rate instead, AV did
        worse on slow links under label skew: RESULTS-fidelity.md section 18.)"""
        self._lags = {
            n: nb.staleness
            for n, nb in zip(self.neighbours, view.neighbours)
            if nb.x is not None and nb.staleness <= self.horizon
        }

    def _mix_per_time(self, view: View) -> None:
        """--balance mix: a neighbour slower than this rank weighs W·r_l/r_own per step, so that
        the two mix as much per second as each other; the rest stays with this rank's own weights."""
        own = self.clock.own.rate
        if not own:
            return
        moved = 0.0
        for i, (n, nb) in enumerate(zip(self.neighbours, view.neighbours)):
            rate = self.clock.rates[n].rate
            if rate is None or rate >= own:
                continue
            w = nb.weight * rate / own
            moved += nb.weight - w
            view.neighbours[i] = dataclasses.replace(nb, weight=w)
        if moved:
            view.self_weight = self.world.self_weight + moved

    # ------------------------------------------------------------- stopping
    def request_stop(self, reason: StopReason = StopReason.SIGNAL) -> None:
        """Ask every rank to stop: in async after its current step, in lockstep all after one
        common step (announced in the messages, a graph diameter ahead, so every rank hears of it)."""
        if self.mode is Mode.LOCKSTEP:
            target = self.step_count + self._diameter + 2
            if self._stop_at is None or target < self._stop_at:
                self._stop_at = target
        else:
            self.roster.request_stop(reason)

    def should_stop(self) -> bool:
        """Whether this rank must stop now (collective meaning, checked by every rank each step)."""
        if self.mode is Mode.LOCKSTEP:
            return self._stop_at is not None and self.step_count >= self._stop_at
        return self.roster.poll() is not None

    @property
    def stop_reason(self) -> StopReason | None:
        if self.mode is Mode.LOCKSTEP:
            return StopReason.SIGNAL if self._stop_at is not None else None
        return self.roster.stop_reason

    # ------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """Everything needed to continue exactly where this agent stopped (tensors and plain types)."""
        return {
            "step": self.step_count,
            "x": self.flat.data.detach().clone(),
            "buffers": {n: b.detach().clone() for n, b in self.model.named_buffers()},
            "inner": self.inner.state_dict(),
            "history": self.view.history.state_dict() if self.mode is Mode.LOCKSTEP else None,
            "trackers": {str(n): t.state_dict() for n, t in self.trackers.items()},
            "trail": self.trail.state_dict() if self.trail is not None else None,
            "drift": self.drift.state_dict() if self.drift is not None else None,
            "links": self.links.state_dict() if self.links is not None else None,
            "staleness_histogram": {
                str(n): {str(t): c for t, c in h.items()} for n, h in self.staleness_histogram.items()
            },
            "pv_wins": dict(self.pv_wins),
            "non_finite": {str(n): c for n, c in self.non_finite.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step"])
        with torch.no_grad():
            self.flat.data.copy_(state["x"])
            for n, b in self.model.named_buffers():
                b.copy_(state["buffers"][n])
        self.inner.load_state_dict(state["inner"])
        if self.mode is Mode.LOCKSTEP and state.get("history") is not None:
            self.view.history.load_state_dict(state["history"])
        for n, t in self.trackers.items():
            t.load_state_dict(state["trackers"][str(n)])
        if self.trail is not None and state.get("trail") is not None:
            self.trail.load_state_dict(state["trail"])
        if self.drift is not None and state.get("drift") is not None:
            self.drift.load_state_dict(state["drift"])
        if self.links is not None:
            if state.get("links") is None:
                raise ValueError(
                    "the checkpoint was not made with --theta-rule link; resume it with its own --theta-rule"
                )
            self.links.load_state_dict(state["links"])
        for n in self.neighbours:
            hist = state["staleness_histogram"].get(str(n), {})
            self.staleness_histogram[n] = Counter({(t if t == NEVER else int(t)): c for t, c in hist.items()})
        self.pv_wins = dict(state["pv_wins"])
        self.non_finite = Counter({int(n): c for n, c in state.get("non_finite", {}).items()})

    # ------------------------------------------------------------------- the end
    def finalize(self) -> None:
        """Collective: complete and drain every message so that no rank is left waiting.

        First every rank says it is done and waits for the others' word (a rank that never says so
        by the deadline is named in the error); then the exchange closes. With `fault_tolerant`,
        only the surviving ranks take part, and afterwards `average()` and `consensus_distance()`
        run among them (`failed_ranks` names the others).
        """
        while True:
            self.roster.finish(
                self._deadline(),
                tolerate_failures=self.fault_tolerant,
                poll=self._keep_flowing,
                step=self.step_count,
                interrupted=self._failure_seen,
            )
            if not (self.fault_tolerant and self._failure_seen()):
                break
            # A rank died near the end: this rank repairs now, those still training at their next
            # step, and they all meet in the repair's shrink; then everyone is waited for again.
            self._repair(self.step_count)
        survivors = self.exchange.close(self._deadline(), shrink=self.fault_tolerant)
        self.roster.free()
        if self.fault_tolerant:
            self.collective_comm = survivors
            late = [self.names[r] for r in self.exchange.failed_world_ranks(survivors)]
            self.failed_ranks = sorted(set(self.failed_ranks) | set(late))

    def _repair(self, k: int) -> None:
        """ULFM: the survivors agree on who is left, close the holes in the graph and go on
        (survivors.py); a new exchange and roster start on the survivors' communicator."""
        from .repair import Repair
        from .survivors import shrink_and_repair

        self._abandoned = getattr(self, "_abandoned", []) + [self.exchange, self.roster]
        self.world, survivors, failed, added, self._graph = shrink_and_repair(
            self.exchange, self._original_group, self._graph, self.world, self.failed_ranks
        )
        self.names = survivors  # new rank -> original rank
        self.neighbours = self.world.neighbours
        self.failed_ranks = sorted(set(self.failed_ranks) | set(failed))
        self.collective_comm = self.world.comm
        stop = self.roster.stop_reason
        self.roster = Roster(self.world.comm)
        if stop is not None:
            self.roster.request_stop(stop)
        self._bad_step = {n: None for n in self.neighbours}
        self._lags = None  # numbered on the old communicator
        self._setup_exchange(self._link_delay, self._av_beta, measure_clock=False)
        record = Repair(k, failed, survivors, added)
        self.repairs.append(record)
        self._warn(
            f"ranks {failed} failed at step {k}; training goes on among {survivors}"
            + (f" with edges {added} added" if added else "")
        )
        if self.on_repair is not None:
            self.on_repair(record)

    def _failure_seen(self) -> bool:
        return bool(self.exchange.failed) or self.exchange.revoked or self.roster.saw_failure

    def _keep_flowing(self) -> None:
        # Neighbours that are still training may wait on this rank's messages (lockstep).
        self.exchange.poll()
        self.exchange.send_ready()

    def average(self) -> torch.Tensor:
        """Collective: the average of all agents' flat parameters."""
        avg = self.flat.data.detach().clone()
        collectives.mean_in_rank_order(self.collective_comm, avg, self._deadline(), on_device=self._device_collectives)
        return avg

    def load_average(self) -> torch.Tensor:
        """Collective: put the average of all agents' parameters into this rank's model."""
        avg = self.average()
        with torch.no_grad():
            self.flat.data.copy_(avg)
        return avg

    def consensus_distance(self, average: torch.Tensor) -> float:
        """Collective: (1/N) Σ_j ‖x^j − x̄‖²."""
        local = float(torch.sum((self.flat.data.double() - average.double()) ** 2))
        comm = self.collective_comm
        total = collectives.allreduce_sum(
            comm, local, self._deadline(), "not every rank took part in the consensus distance"
        )
        return total / comm.Get_size()


def _is_plain_sgd(opt: torch.optim.Optimizer) -> bool:
    """Whether the step is exactly −α·g (so the raw gradient is the update's slope)."""
    return type(opt) is torch.optim.SGD and all(
        not g.get("momentum") and not g.get("weight_decay") and not g.get("maximize") for g in opt.param_groups
    )


def _check_settings(opt: DistributedOptimizer, link_delay: float) -> None:
    check_rule_settings(opt.theta, opt.lam, opt.lam_mode, opt.tolerance, opt.horizon)
    momentum = max((float(g.get("momentum", 0.0) or 0.0) for g in opt.inner.param_groups), default=0.0)
    check_kinds(opt.theta_rule, opt.momentum_kind, opt.algorithm, opt.mode, momentum)
    if opt.theta_rule is ThetaRule.LINK and type(opt.inner) is not torch.optim.SGD:
        opt._warn(
            "--theta-rule link was measured with torch.optim.SGD only (plain, or with quasi-global momentum); "
            f"{type(opt.inner).__name__} keeps a momentum of its own gradients, with which SGD's agents fell apart"
        )
    if opt.fault_tolerant and (opt.mode is not Mode.ASYNC or opt.algorithm is Algorithm.ALLREDUCE):
        raise ValueError("--fault-tolerant needs --mode async and a decentralized algorithm (not allreduce)")
    if not opt.timeout > 0 or opt.timeout == float("inf"):
        raise ValueError(f"timeout must be a finite number of seconds > 0, got {opt.timeout}")
    if opt.mode is Mode.LOCKSTEP and (link_delay > 0 or opt.balance is not Balance.NONE):
        raise ValueError("--link-delay and --balance are for --mode async; in lockstep use --delay for delays")
    for group in opt.inner.param_groups:
        lr = group.get("lr", 1.0)
        if not (isinstance(lr, (int, float)) and 0 < lr < float("inf")):
            raise ValueError(f"the learning rate must be a finite number > 0, got {lr}")
