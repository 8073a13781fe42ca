"""One message of the exchange: a 128-byte header of int64 words, then the payload (weights, then
optionally the slope), in one contiguous buffer whose memory the transport owns.

Header words: magic, sender, step, payload length, model signature, flags (bit 0: a slope follows;
above bit 8: 1 + the step after which the sender asks every rank to stop), the time the message
was made on the clock the ranks share, and the sender's step size (both float64); then up to
eight lags, each `(rank + 1) << 32 | lag`: how many of the sender's own steps old its copy of that
neighbour was at its last step (0: no entry), so that a rank learns how late its own messages
arrive (`--theta-rule stable` in async mode).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from mpi4py import MPI

from .transport import Transport

MAGIC = 0x3144475341435050  # b"PPCASGD1" read as a little-endian int64
HEADER_BYTES = 128
_WORDS = HEADER_BYTES // 8
_MAGIC, _SENDER, _STEP, _NUMEL, _SIGNATURE, _FLAGS, _MADE_AT, _ALPHA = range(8)
_LAGS = 8  # the first of the lag words
MAX_LAGS = _WORDS - _LAGS
FLAG_GRAD = 1
_STOP_SHIFT = 8  # flags above this bit: 1 + the step after which the sender asks everyone to stop


@dataclass
class Message:
    """A received message. Tensors are views into exchange buffers, valid until the next poll."""

    source: int
    step: int
    weights: torch.Tensor
    grad: torch.Tensor | None
    made_at: float = 0.0  # when the sender made it, on the clock the ranks share
    alpha: float = 0.0  # the sender's step size, for reading its slope
    stop_at: int | None = None  # the sender asks every rank to stop after this step
    lags: dict[int, int] | None = None  # neighbour rank: age of the sender's copy of it, in its steps


def read(source: int, buf: Buffer) -> Message:
    """The message in a buffer a receive completed into (its header already checked)."""
    h = buf.header
    made_at, alpha = (float(v) for v in h[_MADE_AT : _ALPHA + 1].view(np.float64))
    stop = int(h[_FLAGS]) >> _STOP_SHIFT
    lags = {(int(w) >> 32) - 1: int(w) & 0xFFFFFFFF for w in h[_LAGS:] if w}
    return Message(source, int(h[_STEP]), buf.weights, buf.grad, made_at, alpha, stop - 1 if stop else None, lags)


class Buffer:
    """One message-sized buffer; where it lives and how bytes reach it is the transport's business."""

    def __init__(self, transport: Transport, nbytes: int, numel: int, dtype: torch.dtype, with_grad: bool):
        self.slot = transport.alloc(HEADER_BYTES, nbytes - HEADER_BYTES)
        self.raw = self.slot.raw
        self.header = self.slot.header
        self.payload = self.slot.payload.view(dtype)
        self.weights = self.payload[:numel]
        self.grad = self.payload[numel:] if with_grad else None
        self.requests: list[MPI.Request] = []
        self.staged = False  # its bytes are still being copied in; the sends start after that
        self.held = False  # waiting out an emulated link delay

    def busy(self) -> bool:
        if self.staged or self.held:
            return True
        if self.requests:
            self.requests = [r for r in self.requests if not done_or_failed(r)]
        return bool(self.requests)


def done_or_failed(req: MPI.Request) -> bool:
    # A send to a failed peer never completes; the exchange has recorded the failure already.
    try:
        return req.Test()
    except MPI.Exception:
        return True


def write_header(
    h: np.ndarray,
    *,
    sender: int,
    step: int,
    numel: int,
    signature: int,
    with_grad: bool,
    made_at: float,
    alpha: float,
    stop_at: int | None,
    lags: dict[int, int] | None = None,
) -> None:
    h[_MAGIC], h[_SENDER], h[_STEP], h[_NUMEL] = MAGIC, sender, step, numel
    stop = 0 if stop_at is None else (int(stop_at) + 1) << _STOP_SHIFT
    h[_SIGNATURE], h[_FLAGS] = signature, (FLAG_GRAD if with_grad else 0) | stop
    h[_MADE_AT : _ALPHA + 1] = np.array([made_at, alpha], dtype=np.float64).view(np.int64)
    h[_LAGS:] = 0
    # with more neighbours than words, the longest lags travel: those are the ones to damp
    chosen = sorted((lags or {}).items(), key=lambda item: -item[1])[:MAX_LAGS]
    for i, (rank, lag) in enumerate(chosen):
        h[_LAGS + i] = (int(rank) + 1) << 32 | min(max(int(lag), 0), 0xFFFFFFFF)


def header_problem(h: np.ndarray, *, source: int, numel: int, signature: int, with_grad: bool) -> str | None:
    """Why a received header is refused, or None when it is one of ours for this model."""
    if h[_MAGIC] != MAGIC or h[_SENDER] != source or h[_NUMEL] != numel:
        return "malformed header"
    if h[_SIGNATURE] != signature:
        return "foreign model signature"
    if bool(int(h[_FLAGS]) & FLAG_GRAD) != with_grad:
        return "gradient flag mismatch"
    return None


def step_of(h: np.ndarray) -> int:
    return int(h[_STEP])
