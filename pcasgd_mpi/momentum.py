"""What happens to the wrapped torch SGD's momentum buffer between steps, besides torch's own update.

Quasi-global momentum (`--momentum-kind quasi-global`; Lin et al., "Quasi-Global Momentum:
Accelerating Decentralized Deep Learning on Heterogeneous Data", ICML 2021). The wrapped torch SGD
keeps its momentum step, d = β m + g, but m accumulates this rank's whole movement instead of its
gradients: after each step, m ← β m + (1 − β)(x_k − x_{k+1}) / α, mixing included. Under label skew
a rank's own gradients pull towards its own shard, and a local momentum carries that pull on for
about 1/(1 − β) steps; the movement after mixing is what the rank and its neighbours agreed on.

Shared momentum (pc-asgd-av under the local momentum, ALGORITHM.md "Adaptive variant"): after each
update the buffer is mixed with the buffers the neighbours' messages carry, like the weights.

Pure tensor code, no MPI. m lives in the wrapped optimizer's own momentum buffers between steps, so
checkpoints carry it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import rule
from .choices import Balance, Slope


class QuasiGlobalMomentum:
    def __init__(self, inner: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> None:
        check(inner)
        self.inner, self.params = inner, params
        self.beta = float(inner.param_groups[0]["momentum"])
        self.m: torch.Tensor | None = None  # made at the first step

    def before_step(self) -> None:
        """Takes m from the wrapped optimizer's buffers once (zeros when it has none yet: a new run)."""
        if self.m is not None:
            return
        buffers = _buffers(self.inner, self.params)
        p = self.params[0]
        dtype = torch.promote_types(p.dtype, torch.float32)  # sums of small movements need the bits
        if all(b is not None for b in buffers):
            self.m = torch.cat([b.reshape(-1) for b in buffers]).to(dtype)
        else:
            self.m = torch.zeros(sum(q.numel() for q in self.params), dtype=dtype, device=p.device)

    def after_step(self, x_k: torch.Tensor, x_next: torch.Tensor) -> None:
        """m ← β m + (1 − β)(x_k − x_{k+1}) / α, written back as the wrapped optimizer's momentum."""
        lr = float(self.inner.param_groups[0]["lr"])
        c = (1.0 - self.beta) / lr
        self.m.mul_(self.beta).add_(x_k.reshape(-1), alpha=c).sub_(x_next.reshape(-1), alpha=c)
        _write(self.inner, self.params, self.m)


class SharedMomentum:
    """After each update, m^j ← m^j + Σ_l W_jl (m^l_s − m^j) (`rule.mix_momentum`): the momentum of
    a rank's own gradients is what keeps agents apart under a weak coupling, since the mixing moves
    the weights and never the buffer. A neighbour's m^l_s is the slope of its message, its update
    over −α, which is exactly its buffer under torch SGD (see `why_not_shared`)."""

    def __init__(self, inner: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> None:
        self.inner, self.params = inner, params

    def mix(self, neighbours: Sequence[rule.Neighbour], *, tolerance: int, horizon: int) -> bool:
        """Mixes the buffers (none before the first step); False when the result would not be
        finite, in which case they are left as they were."""
        buffers = _buffers(self.inner, self.params)
        if any(b is None for b in buffers):
            return True
        m = torch.cat([b.reshape(-1) for b in buffers])
        mixed = rule.mix_momentum(m, neighbours, tolerance=tolerance, horizon=horizon)
        if not bool(torch.isfinite(mixed).all()):
            return False
        _write(self.inner, self.params, mixed)
        return True


def why_not_shared(inner: torch.optim.Optimizer, slope: Slope, balance: Balance) -> str | None:
    """Why the neighbours' messages do not carry their momentum buffers (None: they do)."""
    if type(inner) is not torch.optim.SGD:
        return f"{type(inner).__name__} is not torch.optim.SGD"
    if any(g.get("nesterov") or g.get("maximize") for g in inner.param_groups):
        return "with Nesterov momentum or maximize the step is not the momentum buffer"
    if slope is not Slope.UPDATE:
        return f"--slope {slope.value} sends no momentum (use --slope update)"
    if balance is Balance.LR:
        return "--balance lr scales each rank's step, so its update is not its buffer"
    return None


def has_momentum(inner: torch.optim.Optimizer) -> bool:
    return any(float(g.get("momentum", 0.0) or 0.0) > 0 for g in inner.param_groups)


def _buffers(inner: torch.optim.Optimizer, params) -> list[torch.Tensor | None]:
    return [inner.state.get(p, {}).get("momentum_buffer") for p in params]


def _write(inner: torch.optim.Optimizer, params, flat: torch.Tensor) -> None:
    offset = 0
    for p in params:
        n = p.numel()
        state = inner.state[p]
        view = flat[offset : offset + n].view_as(p)
        if state.get("momentum_buffer") is None:
            state["momentum_buffer"] = view.to(p.dtype).clone()
        else:
            state["momentum_buffer"].copy_(view)
        offset += n


def check(inner: torch.optim.Optimizer) -> None:
    """Quasi-global momentum replaces torch SGD's momentum buffer: one β and α, no dampening or Nesterov."""
    groups = inner.param_groups
    if type(inner) is not torch.optim.SGD:
        raise ValueError(
            f"--momentum-kind quasi-global works on torch.optim.SGD, not {type(inner).__name__}; "
            "use --momentum-kind local"
        )
    if not all(g.get("momentum", 0) > 0 for g in groups):
        raise ValueError("--momentum-kind quasi-global needs a momentum > 0 (--momentum 0.9, say)")
    if any(g.get("nesterov") or g.get("dampening", 0) for g in groups):
        raise ValueError("--momentum-kind quasi-global needs SGD without Nesterov momentum or dampening")
    if len({(g["lr"], g["momentum"]) for g in groups}) > 1:
        raise ValueError("--momentum-kind quasi-global needs one learning rate and momentum for all parameters")
