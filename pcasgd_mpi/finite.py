"""Whether vectors are finite, checked cheaply: one read of a sum instead of a mask."""

from __future__ import annotations

import torch

from . import rule


def all_finite(t: torch.Tensor) -> bool:
    """Whether every element of ``t`` is finite.

    An inf or NaN anywhere makes the sum inf or NaN, so a finite sum proves the whole vector
    finite in one read without a temporary; ``isfinite().all()`` writes a mask as long as the
    vector and measured 20 times slower on 16 MiB. Only a sum that overflowed from finite values
    needs the exact check. Low-precision vectors are summed in float32 so that ordinary
    magnitudes do not overflow the accumulator.
    """
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    return bool(torch.isfinite(t.sum(dtype=acc))) or bool(torch.isfinite(t).all())


def message_finite(nb: rule.Neighbour) -> bool:
    return all_finite(nb.x) and (nb.grad is None or all_finite(nb.grad))


def left_out(nb: rule.Neighbour) -> rule.Neighbour:
    """The neighbour as if nothing had been received from it: dropped, its weight goes to x^j_k."""
    return rule.Neighbour(nb.weight, None, None, 0)
