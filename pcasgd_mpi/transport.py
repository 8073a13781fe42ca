"""Where message buffers live and how tensor bytes get into and out of them.

The exchange sends one contiguous buffer per message: a header of int64 words, then the payload
(weights, then optionally the gradient). A transport owns those buffers and the copies around
them, so the exchange code is the same whether the model sits in host memory or on a GPU.

A buffer is a `Slot`:

- `slot.raw`     what is handed to MPI (`[slot.raw, MPI.BYTE]`);
- `slot.header`  the header words as an int64 numpy array in host memory, always;
- `slot.payload` the payload bytes as a uint8 tensor on the compute device; the exchange takes
  dtype views of it (`slot.payload.view(dtype)[:numel]`), mixes from them and may write a
  message into them.

and five calls make up the interface:

- `alloc(header_bytes, payload_bytes, device_view=True) -> Slot`, once, at set-up; nothing is
  allocated afterwards. A slot that is only ever filled by `stage_out(slot, parts)` can be
  allocated with `device_view=False`: its payload may then stay in host memory, which spares the
  staging transport a device buffer per slot.
- `stage_out(slot, parts=None)` after writing the header: puts the tensors `parts` one after the
  other into the message (`None` in `parts` stands for zeros as long as the first part: a
  message without a gradient); with `parts=None` the message is what was written into
  `slot.payload`. May return before the bytes are in place.
- `ready(slot) -> bool`: the last copy touching the slot has finished; polled before `Isend`, so a
  send starts only once its bytes are complete, without blocking the caller meanwhile.
- `wait(slot)`: block until the slot may be handed to MPI, for a send or to receive into it.
- `stage_in(slot)` once a receive into the slot completed: makes `slot.header` and
  `slot.payload` hold the message.

Three transports implement it:

- `HostTransport`: the model is in host memory; the buffers are numpy allocations (full MPI
  bandwidth, see the MPI notes), the payload is the receive buffer itself, nothing is staged.
- `CudaAwareTransport`: the MPI reads and writes GPU memory; the buffers are device tensors given
  to mpi4py as they are. Only the 128-byte header crosses to the host.
- `StagingTransport`: the MPI only understands host memory. Messages go through pinned host
  buffers: device-to-host copies run on a side stream and a per-slot event tells when the send
  may start; received bytes are copied to a per-slot device buffer before mixing. That is two
  extra copies over the host link per message (one at each end).

Without CUDA, streams and events are replaced by no-op stand-ins, so the staging code path runs,
and is tested, on CPU tensors exactly as it runs on a GPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


class Slot:
    """One message-sized buffer (module docstring); fields with a leading underscore are the transport's."""

    __slots__ = ("raw", "header", "payload", "device_view", "nbytes", "_host_payload", "_host_header", "_event")

    def __init__(
        self,
        raw: Any,
        header: np.ndarray,
        payload: torch.Tensor,
        *,
        device_view: bool,
        nbytes: int,
        host_payload: torch.Tensor | None = None,
        host_header: torch.Tensor | None = None,
        event: Any = None,
    ):
        self.raw = raw
        self.header = header
        self.payload = payload
        self.device_view = device_view
        self.nbytes = nbytes
        self._host_payload = host_payload
        self._host_header = host_header
        self._event = event


# ----------------------------------------------------------------- streams and events
class _NoEvent:
    def record(self, stream=None) -> None:
        pass

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass


class _NoStream:
    def wait_stream(self, other) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def synchronize(self) -> None:
        pass


class HostStreams:
    """Stand-ins for CUDA streams and events on CPU: host copies are complete when they return."""

    pinned = False

    def __init__(self):
        self._current = _NoStream()

    def current(self):
        return self._current

    def new_stream(self):
        return _NoStream()

    def new_event(self):
        return _NoEvent()

    def use(self, stream):
        return contextlib.nullcontext()


class CudaStreams:
    """The streams and events of one CUDA device; host buffers are pinned so copies can be asynchronous."""

    pinned = True

    def __init__(self, device: torch.device):
        self.device = device

    def current(self):
        return torch.cuda.current_stream(self.device)

    def new_stream(self):
        return torch.cuda.Stream(self.device)

    def new_event(self):
        return torch.cuda.Event()

    def use(self, stream):
        return torch.cuda.stream(stream)


def streams_for(device: torch.device):
    return CudaStreams(device) if device.type == "cuda" else HostStreams()


# ------------------------------------------------------------ buffers and copies
def _numpy_bytes(nbytes: int) -> np.ndarray:
    # numpy-allocated host memory transfers at twice the speed of torch's here (huge pages).
    return np.empty(nbytes, dtype=np.uint8)


def _header_view(raw: np.ndarray, header_bytes: int) -> np.ndarray:
    if header_bytes % 8:
        raise ValueError(f"the header must be whole int64 words, got {header_bytes} bytes")
    return raw[:header_bytes].view(np.int64)


def _copy_parts(dst: torch.Tensor, parts: Sequence[torch.Tensor | None], non_blocking: bool = False) -> None:
    """Write `parts` back to back into the uint8 tensor `dst`, each in its own dtype."""
    offset, first = 0, None
    for part in parts:
        ref = part if part is not None else first
        if ref is None:
            raise ValueError("a None part takes its size from the first tensor part, and there is none before it")
        n = ref.numel() * ref.element_size()
        if offset + n > dst.numel():
            raise ValueError(f"the parts need more than the {dst.numel()} payload bytes of the slot")
        region = dst[offset : offset + n]
        if part is None:
            region.zero_()
        else:
            region.view(part.dtype).copy_(part.reshape(-1), non_blocking=non_blocking)
            if first is None:
                first = part
        offset += n


class Transport:
    """Common interface; see the module docstring."""

    name = "abstract"
    device: torch.device

    def alloc(self, header_bytes: int, payload_bytes: int, *, device_view: bool = True) -> Slot:
        raise NotImplementedError

    def stage_out(self, slot: Slot, parts: Sequence[torch.Tensor | None] | None = None) -> None:
        raise NotImplementedError

    def ready(self, slot: Slot) -> bool:
        return True

    def wait(self, slot: Slot) -> None:
        pass

    def stage_in(self, slot: Slot) -> None:
        pass


class HostTransport(Transport):
    """Host tensors: the MPI buffers are the tensors the exchange reads and writes, nothing is staged."""

    name = "host"

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        if self.device.type != "cpu":
            raise ValueError(f"the host transport keeps buffers in host memory, not on {self.device}")

    def alloc(self, header_bytes: int, payload_bytes: int, *, device_view: bool = True) -> Slot:
        raw = _numpy_bytes(header_bytes + payload_bytes)
        return Slot(
            raw,
            _header_view(raw, header_bytes),
            torch.from_numpy(raw[header_bytes:]),
            device_view=device_view,
            nbytes=raw.nbytes,
        )

    def stage_out(self, slot: Slot, parts: Sequence[torch.Tensor | None] | None = None) -> None:
        if parts is not None:
            _copy_parts(slot.payload, parts)


class CudaAwareTransport(Transport):
    """Device buffers handed to mpi4py as they are; for an MPI that reads and writes GPU memory.

    On a CPU device it degenerates to torch-allocated host buffers, which keeps it testable here.
    """

    name = "cuda-aware"

    def __init__(self, device: torch.device | str, *, streams=None):
        self.device = torch.device(device)
        self._streams = streams or streams_for(self.device)
        # Received headers are read on a stream of their own: waiting for that copy then does not
        # also wait for the compute queued on the current stream.
        self._header_stream = self._streams.new_stream()

    def alloc(self, header_bytes: int, payload_bytes: int, *, device_view: bool = True) -> Slot:
        raw = torch.empty(header_bytes + payload_bytes, dtype=torch.uint8, device=self.device)
        # Pinned, so that the header's copies to and from the device can be asynchronous.
        host_header = torch.empty(header_bytes, dtype=torch.uint8, pin_memory=self._streams.pinned)
        header = _header_view(host_header.numpy(), header_bytes)
        return Slot(
            raw,
            header,
            raw[header_bytes:],
            device_view=device_view,
            nbytes=raw.numel(),
            host_header=host_header,
            event=self._streams.new_event(),
        )

    def stage_out(self, slot: Slot, parts: Sequence[torch.Tensor | None] | None = None) -> None:
        # Asynchronous even for the header: nobody writes it again before ready(slot), and the
        # event recorded after it covers this copy too.
        slot.raw[: slot.header.nbytes].copy_(slot._host_header, non_blocking=True)
        if parts is not None:
            _copy_parts(slot.payload, parts)
        slot._event.record(self._streams.current())

    def ready(self, slot: Slot) -> bool:
        return slot._event.query()

    def wait(self, slot: Slot) -> None:
        # MPI works outside the streams: before it reads the slot (send) or overwrites it
        # (receive), every kernel writing or still reading it must be done, and those were all
        # issued on the current stream.
        self._streams.current().synchronize()

    def stage_in(self, slot: Slot) -> None:
        # MPI wrote the bytes outside any stream, so the header copy depends on no queued kernel.
        with self._streams.use(self._header_stream):
            slot._host_header.copy_(slot.raw[: slot.header.nbytes], non_blocking=True)
        self._header_stream.synchronize()


class StagingTransport(Transport):
    """Device tensors, host-only MPI: messages pass through pinned host buffers (see module docstring)."""

    name = "staging"

    def __init__(self, device: torch.device | str, *, streams=None):
        self.device = torch.device(device)
        self._streams = streams or streams_for(self.device)
        # One side stream for all outgoing copies: they then overlap compute on the current stream.
        self._side = self._streams.new_stream()

    def _host_bytes(self, nbytes: int) -> torch.Tensor:
        if self._streams.pinned:
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        return torch.from_numpy(_numpy_bytes(nbytes))

    def alloc(self, header_bytes: int, payload_bytes: int, *, device_view: bool = True) -> Slot:
        host = self._host_bytes(header_bytes + payload_bytes)
        raw = host.numpy()
        host_payload = host[header_bytes:]
        payload = torch.empty(payload_bytes, dtype=torch.uint8, device=self.device) if device_view else host_payload
        return Slot(
            raw,
            _header_view(raw, header_bytes),
            payload,
            device_view=device_view,
            nbytes=raw.nbytes,
            host_payload=host_payload,
            event=self._streams.new_event(),
        )

    def stage_out(self, slot: Slot, parts: Sequence[torch.Tensor | None] | None = None) -> None:
        if parts is None:
            self._need_device_view(slot, "stage_out(slot) without parts")
        current = self._streams.current()
        # The copies must see every kernel already issued that writes the sources ...
        self._side.wait_stream(current)
        with self._streams.use(self._side):
            if parts is None:
                slot._host_payload.copy_(slot.payload, non_blocking=True)
            else:
                _copy_parts(slot._host_payload, parts, non_blocking=True)
            slot._event.record(self._side)
        # ... and whatever is issued next, such as the optimizer updating the weights in place,
        # must not overwrite a source before its copy has read it. The host is not blocked.
        current.wait_event(slot._event)

    def ready(self, slot: Slot) -> bool:
        return slot._event.query()

    def wait(self, slot: Slot) -> None:
        slot._event.synchronize()

    @staticmethod
    def _need_device_view(slot: Slot, what: str) -> None:
        if not slot.device_view:
            raise ValueError(f"{what} needs a slot allocated with device_view=True")

    def stage_in(self, slot: Slot) -> None:
        self._need_device_view(slot, "stage_in")
        current = self._streams.current()
        # On the current stream, so the mixing kernels issued next are ordered after the copy;
        # the event keeps MPI from receiving into the host bytes while the copy still reads them.
        slot.payload.copy_(slot._host_payload, non_blocking=True)
        slot._event.record(current)


def make_transport(device: torch.device | str, cuda_aware: bool = False) -> Transport:
    """The transport for a compute device and the CUDA-awareness decision (`Decision.cuda_aware`)."""
    device = torch.device(device)
    if device.type == "cpu":
        return HostTransport(device)
    return CudaAwareTransport(device) if cuda_aware else StagingTransport(device)
