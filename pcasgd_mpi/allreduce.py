"""The centralised reference: synchronous data-parallel SGD with gradients averaged over all ranks.

It shares the decentralized optimizer's parameters, checkpoints and end-of-run collectives, but has
no exchange and no rule: each step averages the flat gradient (in rank order, the same bits every
run, with the job's deadline) and then takes the wrapped optimizer's step.
"""

from __future__ import annotations

from collections import Counter

from .collectives import mean_in_rank_order
from .optimizer import DistributedOptimizer, StepInfo
from .roster import StopReason

_NO_STOP = -1e30  # representable in float32, the width gradients may be reduced in


class AllreduceOptimizer(DistributedOptimizer):
    def _setup_exchange(self, link_delay: float, av_beta: float) -> None:
        self.exchange = None
        self.view = None
        self.clock = None
        self.neighbours = []
        self.staleness_histogram, self._bad_step, self.non_finite = {}, {}, Counter()
        self._reason = StopReason.SIGNAL

    @property
    def transport_name(self) -> str | None:
        return None

    def exchange_stats(self) -> dict | None:
        return None

    def step(self, closure=None) -> StepInfo:
        k = self.step_count
        grad = self.flat.gather_grad()
        if self.world.size > 1:
            # A stop request rides along: every rank learns the earliest requested stop step (and
            # why: a signal wins over a budget at the same step) in the same step.
            mine = -float(self._stop_at * 4 + self._reason) if self._stop_at is not None else _NO_STOP
            latest = mean_in_rank_order(
                self.world.comm, grad, self._deadline(), on_device=self._device_collectives, extra=mine
            )
            if latest > _NO_STOP / 2:
                self._stop_at, reason = divmod(int(round(-latest)), 4)
                self._reason = StopReason(reason)
            self.flat.scatter_grad()
        self.inner.step()
        self.step_count += 1
        return StepInfo(k, {})

    def request_stop(self, reason: StopReason = StopReason.SIGNAL) -> None:
        target = self.step_count + 1
        if self._stop_at is None or (target, reason) < (self._stop_at, self._reason):
            self._stop_at, self._reason = target, reason

    def should_stop(self) -> bool:
        return self._stop_at is not None and self.step_count >= self._stop_at

    @property
    def stop_reason(self) -> StopReason | None:
        return self._reason if self._stop_at is not None else None

    def finalize(self) -> None:
        self.roster.finish(self._deadline(), step=self.step_count)
        self.roster.free()
