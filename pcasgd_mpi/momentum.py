"""Quasi-global momentum (`--momentum-kind quasi-global`; Lin et al., "Quasi-Global Momentum:
Accelerating Decentralized Deep Learning on Heterogeneous Data", ICML 2021).

The wrapped torch SGD keeps its momentum step, d = β m + g, but m accumulates this rank's whole
movement instead of its gradients: after each step, m ← β m + (1 − β)(x_k − x_{k+1}) / α, mixing
included. Under label skew a rank's own gradients pull towards its own shard, and a local momentum
carries that pull on for about 1/(1 − β) steps; the movement after mixing is what the rank and its
neighbours agreed on. Pure tensor code, no MPI.

m lives in the wrapped optimizer's own momentum buffers between steps (written after each step), so
its checkpoints carry it; a flat copy is kept here, taken from those buffers at the first step.
"""

from __future__ import annotations

import torch


class QuasiGlobalMomentum:
    def __init__(self, inner: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> None:
        check(inner)
        self.inner, self.params = inner, params
        self.beta = float(inner.param_groups[0]["momentum"])
        self.m: torch.Tensor | None = None  # made at the first step

    def _buffers(self) -> list[torch.Tensor | None]:
        return [self.inner.state.get(p, {}).get("momentum_buffer") for p in self.params]

    def before_step(self) -> None:
        """Takes m from the wrapped optimizer's buffers once (zeros when it has none yet: a new run)."""
        if self.m is not None:
            return
        buffers = self._buffers()
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
        offset = 0
        for p in self.params:
            n = p.numel()
            state = self.inner.state[p]
            view = self.m[offset : offset + n].view_as(p)
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
