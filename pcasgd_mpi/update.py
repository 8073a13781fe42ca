"""How x^j_{k+1} is made from x^j_k, the local step Δ and the neighbours (ALGORITHM.md "The two
candidates and the update"): the rule applied per algorithm, PV's choice, AV's θ_l, and the check
that the result is finite. A part of DistributedOptimizer, kept apart to keep each file to one job.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from . import rule
from .config import Algorithm, Mode, OnDiverge, Slope, ThetaRule
from .finite import all_finite, left_out, message_finite
from .neighbours import View

_FOREVER = 2**62


@dataclass
class StepInfo:
    step: int
    staleness: dict[int, int | None]  # None: nothing received yet
    choice: str | None = None  # PV: "predict" or "clip" when a neighbour was stale
    thetas: dict[int, float] | None = None  # AV and --theta-rule stable: θ_l of each stale neighbour


class Diverged(RuntimeError):
    """This agent's own weights became inf or NaN."""


class RuleStep:
    @property
    def _takes_theta_by_the_delay(self) -> bool:
        """θ by the delay, on both ends of a late link: pc-asgd-av's bound, and --theta-rule stable."""
        return self.algorithm is Algorithm.PC_ASGD_AV or (
            self.algorithm is Algorithm.PC_ASGD and self.theta_rule is ThetaRule.STABLE
        )

    def _rule_kwargs(self) -> dict:
        plain = self.slope in (Slope.VELOCITY, Slope.DRIFT) or self.slope.receiver_side
        lam = 0.0 if plain else self.lam  # plain extrapolations
        if self.algorithm is Algorithm.DSGD:
            # Consensus SGD uses whatever arrived as it is: nothing is ever stale or too old.
            return dict(
                lr=self.lr,
                lam=lam,
                tolerance=_FOREVER,
                horizon=_FOREVER,
                lam_mode=self.lam_mode,
                segments=self.flat.sizes,
            )
        return dict(
            lr=self.lr,
            lam=lam,
            tolerance=self.tolerance,
            horizon=self.horizon,
            lam_mode=self.lam_mode,
            segments=self.flat.sizes,
        )

    def _update_checked(self, x_k: torch.Tensor, view: View, closure, info: StepInfo) -> None:
        """The update, with neighbours whose message holds an inf or NaN left out (as if dropped).

        Messages are not checked on arrival: most are replaced by a newer one before they are
        used. Instead the result is checked, one read per step; only when it is not finite are
        the neighbours' messages checked, and the update is made again without the bad ones.
        If the result is still not finite, this agent itself diverged: `Diverged` is raised.
        """
        if not self.check_finite:
            self._update(x_k, view, closure, info)
            return
        nbs = [
            left_out(nb) if s is not None and s == self._bad_step[n] else nb
            for n, nb, s in zip(self.neighbours, view.neighbours, view.steps)
        ]
        view.neighbours = nbs
        self._update(x_k, view, closure, info)
        if all_finite(self.flat.data):
            return
        bad = [i for i, nb in enumerate(nbs) if nb.x is not None and not message_finite(nb)]
        for i in bad:
            n = self.neighbours[i]
            self._bad_step[n] = view.steps[i]
            if not self.non_finite[n]:
                self._warn(
                    f"left out the message of step {view.steps[i]} from rank {n}: it holds non-finite "
                    "values (later ones are counted in non_finite, not reported)"
                )
            self.non_finite[n] += 1
            nbs[i] = left_out(nbs[i])
        if bad:
            info.choice = None
            self._update(x_k, view, closure, info)
        if not all_finite(self.flat.data):
            what = f"rank {self.world.rank}: the model's weights became inf or NaN at step {self.step_count}"
            if self.on_diverge is not OnDiverge.CONTINUE:
                raise Diverged(f"{what}; lower --lr (now {self.lr:g}) or --momentum")
            if self.diverged_at is None:
                # Its neighbours leave its messages out from now on, as they do any non-finite message.
                self.diverged_at = self.step_count
                self._warn(f"{what}; training goes on without it (--on-diverge continue)")

    def _share_momentum(self, nbs) -> None:
        """pc-asgd-av, after the update: the momentum buffer mixed with the neighbours' (their
        messages' slopes, those the update used); with a neighbour's non-finite slope among them,
        with the finite ones only, and not at all when this agent's own buffer is not finite."""
        if self.shared_momentum is None:
            return
        kw = dict(tolerance=self.tolerance, horizon=self.horizon)
        if not self.shared_momentum.mix(nbs, **kw):
            finite = [nb if nb.grad is None or all_finite(nb.grad) else left_out(nb) for nb in nbs]
            self.shared_momentum.mix(finite, **kw)

    def _update(self, x_k: torch.Tensor, view: View, closure, info: StepInfo) -> None:
        """Writes x^j_{k+1} into the parameters (ALGORITHM.md "The two candidates and the update")."""
        x, delta, nbs = self.flat.data, self._delta, view.neighbours
        w_self = self.world.self_weight if view.self_weight is None else view.self_weight
        kw = self._rule_kwargs()
        stale = [rule.classify(nb, kw["tolerance"], kw["horizon"]) is rule.Status.STALE for nb in nbs]
        if self.algorithm is Algorithm.PC_ASGD_PV and any(stale):
            x_p, x_c = rule.candidates(x_k, delta, w_self, nbs, out=self._candidate_buffers(), **kw)
            loss_p = self._loss_at(x_p, closure)
            loss_c = self._loss_at(x_c, closure)  # leaves x^C in the parameters
            keep_p = rule.pv_choose(loss_p, loss_c)
            info.choice = "predict" if keep_p else "clip"
            if keep_p:
                x.copy_(x_p)
            return
        if self.links is not None:
            # x_{k+1} = x_k + Δ + Σ_l a^{jl}_k (ALGORITHM.md, "Link prediction")
            pulled = self.links.pull(
                info.step, x_k, {n: nb.x for n, nb in zip(self.neighbours, nbs)}, out=self._pull_buffer()
            )
            torch.add(x_k, delta, out=x).add_(self._pull)
            info.thetas = dict.fromkeys(pulled, self.links.gain)
            return
        on_predict, reaches = None, None
        av = self.algorithm is Algorithm.PC_ASGD_AV
        if self._takes_theta_by_the_delay:
            # θ by the delay, which also pulls both ends of a late link; for AV it bounds the blend of
            # least measured error (ALGORITHM.md, "Adaptive variant").
            thetas, nbs, w_self, info.thetas = self._stable_thetas(
                nbs, stale, w_self, info.step, view.made_at, view.back
            )
            if av:
                thetas, reaches, on_predict = self._av_blend(view, x_k, thetas)
                info.thetas.update({n: t for n, t, s in zip(self.neighbours, thetas, stale) if s})
        else:
            # PV without a stale neighbour: both candidates are x^C, the θ = 0 mix.
            theta = {Algorithm.CLIP: 0.0, Algorithm.PREDICT: 1.0, Algorithm.PC_ASGD_PV: 0.0}.get(
                self.algorithm, self.theta
            )
            thetas = [theta] * len(nbs)
        rule.mix(x_k, delta, w_self, nbs, thetas, on_predict=on_predict, out=x, reaches=reaches, **kw)

    def _stable_thetas(self, nbs, stale, w_self: float, k: int, made_at=None, backs=None):
        """θ by the delay (--theta-rule stable, and the bound of pc-asgd-av's θ_l): θ_l from the lag
        of the link, the longer of its two directions (ALGORITHM.md, "θ by the delay"). The lag of
        this rank's own copy at neighbour l is, in lockstep, the delay model's (a function of
        sender, receiver and step) and, in async mode, what l's newest message says (``backs``).
        A fresh neighbour whose copy of this rank is late is then pulled towards with weight θ·W
        too, the rest staying with this rank's own weights, so that both ends of the link pull
        alike. In async mode a stale copy's lag is counted in this rank's own steps since the copy
        was made (the steps of the loop it closes) when the trail holds them, else in its sender's."""
        lockstep = self.mode is Mode.LOCKSTEP
        beta = 0.0 if self.quasi_global is None else self.quasi_global.beta  # its buffer carries the mixing too
        thetas, out, logged = [], list(nbs), {}
        for i, (n, nb, s) in enumerate(zip(self.neighbours, nbs, stale)):
            if lockstep:
                back = self.delay.delay(self.world.rank, n, k)
            else:  # within the tolerance a copy counts as fresh, here as there
                back = (backs[i] if backs is not None else None) or 0
                back = back if back > self.tolerance else 0
            if s:
                lag = nb.staleness
                if not lockstep and self.trail is not None and made_at is not None and made_at[i] is not None:
                    own = self.trail.steps_since(made_at[i])
                    lag = nb.staleness if own is None else own
                thetas.append(rule.stable_theta(max(lag, back), self.world.mu_max, momentum=beta))
                logged[n] = thetas[-1]
                continue
            thetas.append(0.0)
            if back > 0 and nb.x is not None:
                theta = rule.stable_theta(back, self.world.mu_max, momentum=beta)
                out[i] = dataclasses.replace(nb, weight=nb.weight * theta)
                w_self += nb.weight * (1.0 - theta)
                logged[n] = theta
        return thetas, out, w_self, logged

    def _pull_buffer(self) -> torch.Tensor:
        if self._pull is None:
            self._pull = torch.empty_like(self.flat.data)
        return self._pull

    def _candidate_buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._pv_buffers is None:
            self._pv_buffers = (torch.empty_like(self.flat.data), torch.empty_like(self.flat.data))
        return self._pv_buffers

    def _av_blend(self, view: View, x_k, caps):
        """θ_l ≤ caps[i] and r_l from each tracker, the blend of least measured error with θ so
        bounded; measure the substitutes of earlier steps against what arrived.

        Records are keyed by the sender's step: the substitute made now stands for the sender's
        weights at its current (estimated) step, and is measured against its message of that step.
        """
        trackers = [self.trackers[n] for n in self.neighbours]
        for n, tracker, nb, s in zip(self.neighbours, trackers, view.neighbours, view.steps):
            if nb.x is None:
                continue
            if self.mode is Mode.LOCKSTEP:  # async measures every message as it arrives instead
                self._measure_overtaken(n, tracker, s)
            tracker.observe(s, nb.x)
        thetas, reaches = zip(*(t.within(c) for t, c in zip(trackers, caps))) if trackers else ((), ())

        def record(i: int, x_hat: torch.Tensor) -> None:
            if view.sender_steps[i] is not None:
                trackers[i].record(view.sender_steps[i], x_hat, x_k, view.neighbours[i].x)

        return list(thetas), list(reaches), record

    def _measure_overtaken(self, n: int, tracker, s: int) -> None:
        """Lockstep: the message of step s makes every older one delivered too (newest wins), so a
        record it overtook is measured against the kept message of its own step, not lost."""
        for t in tracker.pending_steps:  # oldest first
            if t >= s:
                return
            x_t, _ = self.view.history.get(n, t)
            if x_t is not None:
                tracker.observe(t, x_t)

    def _observe_arrival(self, msg) -> None:
        """Async AV: every message measures the record of its step as it arrives, also one that a
        newer message replaces before the next step reads it."""
        tracker = self.trackers.get(msg.source)
        if tracker is not None:
            tracker.observe(msg.step, msg.weights)

    @torch.no_grad()
    def _loss_at(self, vec: torch.Tensor, closure) -> float:
        # Forward passes for the PV check must not move BatchNorm statistics.
        buffers = [b.clone() for b in self.model.buffers()]
        self.flat.data.copy_(vec)
        loss = float(closure())
        for b, saved in zip(self.model.buffers(), buffers):
            b.copy_(saved)
        return loss
