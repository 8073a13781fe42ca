"""Message buffers and their copies: the staging path runs on CPU exactly as on a GPU."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from fake_cuda import Recorder
from launch import ROOT, mpi_env
from pcasgd_mpi.transport import CudaAwareTransport, HostTransport, StagingTransport, make_transport

HEADER = 64
NUMEL = 1000
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _parts(device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(NUMEL, generator=gen).to(device)
    g = torch.randn(NUMEL, generator=gen).to(device)
    return w, g


def _payload_bytes(*tensors) -> bytes:
    return b"".join(t.detach().cpu().numpy().tobytes() for t in tensors)


def _message_bytes(raw) -> bytes:
    return (raw.cpu().numpy() if isinstance(raw, torch.Tensor) else raw).tobytes()


def _deliver(send, recv) -> None:
    """What MPI does between Isend and a completed Irecv, for host buffers."""
    recv.raw[:] = send.raw


def _slots(transport):
    send = transport.alloc(HEADER, 2 * NUMEL * 4, device_view=False)
    recv = transport.alloc(HEADER, 2 * NUMEL * 4)
    return send, recv


# --------------------------------------------------------------------------- staging on CPU


def test_staging_round_trip_on_cpu():
    t = StagingTransport("cpu")
    send, recv = _slots(t)
    w, g = _parts()
    send.header[:] = np.arange(8) * 11
    t.stage_out(send, [w, g])
    assert t.ready(send)
    assert _message_bytes(send.raw)[HEADER:] == _payload_bytes(w, g)
    _deliver(send, recv)
    t.wait(recv)
    t.stage_in(recv)
    assert recv.header.tolist() == [i * 11 for i in range(8)]
    x = recv.payload.view(torch.float32)
    assert recv.payload.device == torch.device("cpu")
    assert torch.equal(x[:NUMEL], w) and torch.equal(x[NUMEL:], g)
    # The device-side copy is a buffer of its own, as on a GPU: staging really stages.
    assert recv.payload.data_ptr() != recv.raw.ctypes.data + HEADER


def test_missing_gradient_is_sent_as_zeros():
    t = StagingTransport("cpu")
    send, recv = _slots(t)
    send.raw[:] = 0xFF
    w, _ = _parts()
    t.stage_out(send, [w, None])
    _deliver(send, recv)
    t.stage_in(recv)
    x = recv.payload.view(torch.float32)
    assert torch.equal(x[:NUMEL], w) and torch.count_nonzero(x[NUMEL:]) == 0


def test_parts_that_do_not_fit_are_refused():
    t = StagingTransport("cpu")
    send, _ = _slots(t)
    with pytest.raises(ValueError, match="payload bytes"):
        t.stage_out(send, [torch.zeros(NUMEL), torch.zeros(NUMEL + 1)])
    with pytest.raises(ValueError, match="first tensor part"):
        t.stage_out(send, [None, torch.zeros(NUMEL)])
    with pytest.raises(ValueError, match="device_view=True"):
        t.stage_in(send)
    with pytest.raises(ValueError, match="device_view=True"):
        t.stage_out(send)


@pytest.mark.parametrize(
    "make",
    [HostTransport, lambda: StagingTransport("cpu"), lambda: CudaAwareTransport("cpu")],
    ids=["host", "staging", "cuda-aware"],
)
def test_a_message_written_in_place_into_the_payload_is_sent_as_it_is(make):
    t = make()
    slot = t.alloc(HEADER, 2 * NUMEL * 4)
    w, g = _parts()
    slot.header[:] = np.arange(8) - 3
    x = slot.payload.view(torch.float32)
    x[:NUMEL].copy_(w)
    torch.mul(g, 1.0, out=x[NUMEL:])
    t.stage_out(slot)
    t.wait(slot)
    assert t.ready(slot)
    assert _message_bytes(slot.raw) == (np.arange(8) - 3).astype(np.int64).tobytes() + _payload_bytes(w, g)


def test_staging_allocates_nothing_per_step(monkeypatch):
    t = StagingTransport("cpu")
    send, recv = _slots(t)

    def pointers():
        return send.raw.ctypes.data, send.payload.data_ptr(), recv.raw.ctypes.data, recv.payload.data_ptr()

    before = pointers()
    calls = []
    for module, names in (
        (torch, ("empty", "zeros", "empty_like", "zeros_like", "from_numpy")),
        (np, ("empty", "zeros", "empty_like")),
    ):
        for name in names:
            real = getattr(module, name)
            monkeypatch.setattr(module, name, lambda *a, _r=real, _n=name, **k: (calls.append(_n), _r(*a, **k))[1])
    w, g = _parts()
    for step in range(100):
        w.fill_(step)
        send.header[2] = step
        t.stage_out(send, [w, g if step % 2 else None])
        t.wait(send)
        _deliver(send, recv)
        t.wait(recv)
        t.stage_in(recv)
        assert recv.header[2] == step and float(recv.payload.view(torch.float32)[0]) == step
    assert calls == []
    assert pointers() == before


# ------------------------------------------------------------- stream and event choreography


def test_send_waits_for_the_copy_event_and_compute_waits_for_the_copy():
    streams = Recorder(delay=3)
    t = StagingTransport("cpu", streams=streams)
    send, recv = _slots(t)
    streams.log.clear()
    t.stage_out(send, list(_parts()))
    ev = send._event
    assert streams.log == [
        ("wait_stream", "side0", "main"),
        ("enter", "side0"),
        ("record", ev, "side0"),
        ("exit", "side0"),
        ("wait_event", "main", ev),
    ]
    assert [t.ready(send) for _ in range(4)] == [False, False, False, True]
    t.stage_out(send, list(_parts()))
    assert not t.ready(send)
    t.wait(send)
    assert t.ready(send)


def test_receive_copy_is_ordered_on_the_current_stream():
    streams = Recorder(delay=1)
    t = StagingTransport("cpu", streams=streams)
    _, recv = _slots(t)
    streams.log.clear()
    t.stage_in(recv)
    assert streams.log == [("record", recv._event, "main")]
    assert not t.ready(recv)
    t.wait(recv)
    assert streams.log[-1] == ("event_sync", recv._event)


# ------------------------------------------------------------------------ host: no copies


class _NoCopy(torch.Tensor):
    """A tensor that fails the test if anyone makes a copy of it on the way into the buffer."""

    def _copied(self, *args, **kwargs):
        raise AssertionError("the host transport made an intermediate copy")

    cpu = to = clone = contiguous = numpy = detach = _copied


def test_host_transport_receives_straight_into_the_tensors_it_hands_out():
    t = HostTransport()
    send, recv = _slots(t)
    assert recv.payload.data_ptr() == recv.raw.ctypes.data + HEADER
    assert recv.header.ctypes.data == recv.raw.ctypes.data
    w, g = _parts()
    x = recv.payload.view(torch.float32)
    # MPI writes raw; the tensors seen by the exchange change with no stage_in and no copy.
    recv.raw[HEADER:] = np.frombuffer(_payload_bytes(w, g), dtype=np.uint8)
    assert torch.equal(x[:NUMEL], w) and torch.equal(x[NUMEL:], g)
    ptr = recv.payload.data_ptr()
    t.wait(recv)
    t.stage_in(recv)
    assert recv.payload.data_ptr() == ptr and torch.equal(x[:NUMEL], w)


def test_host_transport_sends_with_a_single_copy_into_the_buffer():
    t = HostTransport()
    send, _ = _slots(t)
    w, g = _parts()
    t.stage_out(send, [w.as_subclass(_NoCopy), g.as_subclass(_NoCopy)])
    assert t.ready(send)
    assert _message_bytes(send.raw)[HEADER:] == _payload_bytes(w, g)


def test_host_transport_refuses_device_memory():
    with pytest.raises(ValueError, match="host memory"):
        HostTransport("meta")


# -------------------------------------------------------------------- CUDA-aware, on a CPU device


def test_cuda_aware_transport_keeps_the_header_in_step_with_the_device_buffer():
    t = CudaAwareTransport("cpu")
    send, recv = _slots(t)
    assert isinstance(send.raw, torch.Tensor) and send.payload.data_ptr() == send.raw.data_ptr() + HEADER
    send.header[:] = np.arange(8) + 100
    w, g = _parts()
    t.stage_out(send, [w, g])
    t.wait(send)
    assert t.ready(send)
    assert _message_bytes(send.raw) == (np.arange(8) + 100).astype(np.int64).tobytes() + _payload_bytes(w, g)
    recv.raw.copy_(send.raw)
    t.stage_in(recv)
    assert recv.header.tolist() == list(range(100, 108))
    assert torch.equal(recv.payload.view(torch.float32)[NUMEL:], g)


def test_make_transport_picks_by_device_and_decision():
    assert isinstance(make_transport("cpu"), HostTransport)
    assert isinstance(make_transport(torch.device("cpu"), cuda_aware=True), HostTransport)


def test_mpi_takes_every_transports_buffers():
    """Self-messages through the real MPI of this machine (in a fresh process, where MPI starts)."""
    code = f"""
import json, numpy as np, torch
from mpi4py import MPI
from pcasgd_mpi.transport import CudaAwareTransport, HostTransport, StagingTransport
comm, n, out = MPI.COMM_SELF, {NUMEL}, {{}}
w, g = torch.randn(n), torch.randn(n)
for t in (HostTransport(), StagingTransport("cpu"), CudaAwareTransport("cpu")):
    s, r = t.alloc({HEADER}, 8 * n, device_view=False), t.alloc({HEADER}, 8 * n)
    s.header[:] = np.arange(8) + 7
    t.wait(r)
    req = comm.Irecv([r.raw, MPI.BYTE], 0, 3)
    t.stage_out(s, [w, g])
    while not t.ready(s):
        pass
    comm.Isend([s.raw, MPI.BYTE], 0, 3).Wait()
    req.Wait()
    t.stage_in(r)
    x = r.payload.view(torch.float32)
    out[t.name] = (r.header.tolist() == list(range(7, 15)) and torch.equal(x[:n], w) and torch.equal(x[n:], g))
print(json.dumps(out))
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=mpi_env(), cwd=ROOT, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"host": True, "staging": True, "cuda-aware": True}


def test_exchange_starts_a_staged_send_when_its_copy_is_done_and_never_waits_for_it():
    """The exchange over StagingTransport with copies that take a while (fake CUDA events)."""
    code = f"""
import json, sys, time, torch
from mpi4py import MPI
from pcasgd_mpi.exchange import Exchange
from pcasgd_mpi.transport import StagingTransport
sys.path.insert(0, "tests")
from fake_cuda import Recorder

n = {NUMEL}
ex = Exchange(MPI.COMM_SELF, [0], n, with_grad=True,
              transport=StagingTransport("cpu", streams=Recorder(delay=5)))  # a copy ends at the 6th look
w = torch.arange(n, dtype=torch.float32)
out = {{"scheduled": ex.send(3, w, -w)}}
out["sent_at_once"] = ex.stats.sent
out["second"] = ex.send(4, w + 1, -w)  # the first is not out yet: flow control skips this one
polls = 0
while ex.latest(0) is None and polls < 1000:
    ex.poll()
    polls += 1
msg = ex.latest(0)
out["step"] = msg.step
out["intact"] = torch.equal(msg.weights, w) and torch.equal(msg.grad, -w)
out["sent"], out["skipped"] = ex.stats.sent, ex.stats.skipped
out["blocked_on_send_copies"] = sum(b.slot._event.blocked for b in ex._send_pool)
ex.close(time.monotonic() + 30)
print(json.dumps(out))
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=mpi_env(), cwd=ROOT, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got == {
        "scheduled": 1,
        "sent_at_once": 0,
        "second": 0,
        "step": 3,
        "intact": True,
        "sent": 1,
        "skipped": 1,
        "blocked_on_send_copies": 0,
    }


# ----------------------------------------------------------------------------------- on a GPU


@needs_cuda
def test_staging_on_a_gpu_uses_pinned_host_memory_and_survives_in_place_updates():
    device = torch.device("cuda", 0)
    t = make_transport(device, cuda_aware=False)
    assert isinstance(t, StagingTransport)
    send, recv = _slots(t)
    assert send._host_payload.is_pinned() and recv._host_payload.is_pinned()
    assert recv.payload.device == device
    w, g = _parts(device)
    for _ in range(20):
        sent = w.clone()
        t.stage_out(send, [w, g])
        # Issued right away, as the optimizer does: must not reach the bytes being copied out.
        w.add_(1.0)
        t.wait(send)
        assert _message_bytes(send.raw)[HEADER:] == _payload_bytes(sent, g)
    _deliver(send, recv)
    t.stage_in(recv)
    x = recv.payload.view(torch.float32)
    assert torch.equal(x[:NUMEL], sent) and torch.equal(x[NUMEL:], g)


@needs_cuda
def test_cuda_aware_on_a_gpu_keeps_buffers_on_the_device():
    device = torch.device("cuda", 0)
    t = make_transport(device, cuda_aware=True)
    assert isinstance(t, CudaAwareTransport)
    send, recv = _slots(t)
    assert send.raw.device == device and recv.payload.device == device
    send.header[:] = np.arange(8)
    w, g = _parts(device)
    t.stage_out(send, [w, None])
    t.wait(send)
    recv.raw.copy_(send.raw)
    t.wait(recv)
    t.stage_in(recv)
    assert recv.header.tolist() == list(range(8))
    x = recv.payload.view(torch.float32)
    assert torch.equal(x[:NUMEL], w) and torch.count_nonzero(x[NUMEL:]) == 0
