"""Time moving exchange messages between GPU ranks: staging through pinned host memory vs. CUDA-aware MPI.

    mpirun -n 2 python benchmarks/gpu_exchange.py [--sizes-mib 1,16,64] [--repeats 20]

Two ranks ping-pong one message (header + payload, as the exchange sends it) and report the
one-way time and bandwidth per transport. The CUDA-aware path is timed only when every rank's
MPI is CUDA-aware (or `--cuda-aware yes` forces it). With a single rank only the staging copies
themselves (device to host, host to device) are timed. Without a CUDA device it prints
"no CUDA device: skipped" and exits 0.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import _bench  # noqa: F401  (measure the checkout next to this script, not an installed copy)

HEADER_BYTES = 64
TAG = 7402


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes-mib", default="1,16,64", help="payload sizes in MiB, comma-separated")
    p.add_argument("--repeats", type=int, default=20, help="timed round trips per size")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--cuda-aware", default="auto", choices=("auto", "yes", "no"))
    return p.parse_args(argv)


def _ping_pong(comm, t, device, nbytes: int, repeats: int, warmup: int) -> float | None:
    """Median one-way seconds on rank 0 (None elsewhere); also checks the echo arrived intact."""
    import torch
    from mpi4py import MPI

    rank, peer = comm.Get_rank(), 1 - comm.Get_rank()
    numel = nbytes // 4
    src = torch.randn(numel, device=device)
    send, recv = t.alloc(HEADER_BYTES, nbytes), t.alloc(HEADER_BYTES, nbytes)
    times = []
    for i in range(warmup + repeats):
        comm.Barrier()
        t0 = time.perf_counter()
        if rank == 0:
            send.header[:] = i
            t.stage_out(send, [src])
            t.wait(send)
            comm.Send([send.raw, MPI.BYTE], peer, TAG)
            t.wait(recv)
            comm.Recv([recv.raw, MPI.BYTE], peer, TAG)
            t.stage_in(recv)
            torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
        else:
            t.wait(recv)
            comm.Recv([recv.raw, MPI.BYTE], peer, TAG)
            t.stage_in(recv)
            send.header[:] = recv.header
            # Echo from device memory, so both directions pay the full path.
            t.stage_out(send, [recv.payload.view(torch.float32)[:numel]])
            t.wait(send)
            comm.Send([send.raw, MPI.BYTE], peer, TAG)
    if rank != 0:
        return None
    echoed = recv.payload.view(torch.float32)[:numel]
    if not torch.equal(echoed, src) or int(recv.header[0]) != warmup + repeats - 1:
        raise RuntimeError(f"{t.name}: the echoed message differs from the one sent")
    return statistics.median(times[warmup:]) / 2


def _copies_only(t, device, nbytes: int, repeats: int, warmup: int) -> tuple[float, float]:
    """Median seconds of one staged copy out (device to host) and one in (host to device)."""
    import torch

    src = torch.randn(nbytes // 4, device=device)
    slot = t.alloc(HEADER_BYTES, nbytes)
    out_s, in_s = [], []
    for _ in range(warmup + repeats):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        t.stage_out(slot, [src])
        t.wait(slot)
        t1 = time.perf_counter()
        t.stage_in(slot)
        torch.cuda.synchronize(device)
        t2 = time.perf_counter()
        out_s.append(t1 - t0)
        in_s.append(t2 - t1)
    return statistics.median(out_s[warmup:]), statistics.median(in_s[warmup:])


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: skipped")
        return 0
    from mpi4py import MPI

    from pcasgd_mpi.device import decide_cuda_aware, local_rank, local_rank_from_comm, select_device
    from pcasgd_mpi.transport import CudaAwareTransport, StagingTransport

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    lrank = local_rank()
    device = select_device("cuda", lrank if lrank is not None else local_rank_from_comm(comm))
    torch.cuda.set_device(device)
    decision = decide_cuda_aware(args.cuda_aware, device)
    decisions = comm.allgather(str(decision))
    aware = comm.allreduce(decision.cuda_aware, op=MPI.LAND)
    sizes = [int(float(s) * 2**20) for s in args.sizes_mib.split(",") if s.strip()]
    if rank == 0:
        print(
            f"{size} rank(s); rank 0 on {torch.cuda.get_device_name(device)}; torch {torch.__version__}; "
            f"{MPI.Get_library_version().splitlines()[0]}"
        )
        for r, d in enumerate(decisions):
            print(f"  rank {r}: {d}")
        if not aware:
            print("cuda-aware transport: skipped (not every rank's MPI is CUDA-aware)")
    transports = [StagingTransport(device)] + ([CudaAwareTransport(device)] if aware else [])

    if size == 1:
        print(f"{'transport':<12}{'MiB':>8}{'D->H ms':>10}{'GB/s':>8}{'H->D ms':>10}{'GB/s':>8}")
        for nbytes in sizes:
            out_s, in_s = _copies_only(transports[0], device, nbytes, args.repeats, args.warmup)
            print(
                f"{'staging':<12}{nbytes / 2**20:>8.1f}{out_s * 1e3:>10.3f}{nbytes / out_s / 1e9:>8.2f}"
                f"{in_s * 1e3:>10.3f}{nbytes / in_s / 1e9:>8.2f}"
            )
        print("run with mpirun -n 2 to time whole messages between ranks")
        return 0

    pair = comm.Split(0 if rank < 2 else MPI.UNDEFINED, rank)
    if rank == 0:
        print(f"{'transport':<12}{'MiB':>8}{'one-way ms':>12}{'GB/s':>8}")
    if pair != MPI.COMM_NULL:
        for t in transports:
            for nbytes in sizes:
                one_way = _ping_pong(pair, t, device, nbytes, args.repeats, args.warmup)
                if rank == 0:
                    print(
                        f"{t.name:<12}{nbytes / 2**20:>8.1f}{one_way * 1e3:>12.3f}"
                        f"{(nbytes + HEADER_BYTES) / one_way / 1e9:>8.2f}",
                        flush=True,
                    )
        pair.Free()
    comm.Barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
