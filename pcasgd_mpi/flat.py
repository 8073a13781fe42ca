"""The model's floating-point parameters as views into one contiguous buffer.

Mixing, sending and the rule then work on a single vector (ALGORITHM.md "Setting"), and a message
can be written straight from it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch


def model_signature(named_shapes: Sequence[tuple[str, tuple[int, ...], str]]) -> int:
    """A 63-bit hash of parameter names, shapes and dtypes; messages from another model are refused."""
    text = ";".join(f"{n}:{tuple(s)}:{d}" for n, s, d in named_shapes)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


class FlatParameters:
    """All floating-point parameters of a model as views into one contiguous buffer."""

    def __init__(self, model: torch.nn.Module):
        self.named = [(n, p) for n, p in model.named_parameters() if p.is_floating_point()]
        if not self.named:
            raise ValueError("the model has no floating-point parameters to train")
        dtypes = {p.dtype for _, p in self.named}
        devices = {p.device for _, p in self.named}
        if len(dtypes) != 1 or len(devices) != 1:
            raise ValueError(f"all parameters must share one dtype and device, found {dtypes} on {devices}")
        self.dtype, self.device = dtypes.pop(), devices.pop()
        self.sizes = [p.numel() for _, p in self.named]
        self.numel = sum(self.sizes)
        self.data = self._empty()
        self._grad: torch.Tensor | None = None  # made on first use: only the allreduce baseline needs it
        offset = 0
        with torch.no_grad():
            for (_, p), n in zip(self.named, self.sizes):
                view = self.data[offset : offset + n].view_as(p)
                view.copy_(p)
                p.data = view
                offset += n
        self.signature = model_signature([(n, tuple(p.shape), str(p.dtype)) for n, p in self.named])

    def _empty(self) -> torch.Tensor:
        if self.device.type == "cpu":
            # numpy-allocated memory transfers at full MPI bandwidth (see MPI notes).
            nbytes = self.numel * torch.empty((), dtype=self.dtype).element_size()
            return torch.from_numpy(np.empty(nbytes, dtype=np.uint8)).view(self.dtype)
        return torch.empty(self.numel, dtype=self.dtype, device=self.device)

    def gather_grad(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """The gradients as one flat vector, in ``out`` or in this object's own buffer."""
        if out is None:
            if self._grad is None:
                self._grad = self._empty()
            out = self._grad
        grads = [
            p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), dtype=self.dtype, device=self.device)
            for _, p in self.named
        ]
        torch.cat(grads, out=out)
        return out

    def scatter_grad(self) -> None:
        """Writes this object's flat gradient (filled by ``gather_grad()``) back to the parameters."""
        offset = 0
        for (_, p), n in zip(self.named, self.sizes):
            if p.grad is not None:
                p.grad.copy_(self._grad[offset : offset + n].view_as(p))
            offset += n
