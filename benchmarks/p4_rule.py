"""P4, rule overhead: one PC-ASGD-PV update against one plain SGD step, ResNet-20 parameters.

The update is `rule.candidates` (both candidates x^P and x^C, two stale neighbours with weights
and gradients, τ = 3 and 5, which go through the general φ; fixed λ) plus `rule.pv_choose` on two
given losses: the two forward passes PV needs are left out, as forward/backward are on both sides.
It runs as the optimizer calls it: on flat contiguous buffers, writing both candidates into two
buffers allocated once (`out=`). On the CPU both candidates then come from one call of the numba
kernel of `pcasgd_mpi.fused` (the details say whether and how often it ran); its compilation or
cache load happens before the warm-up, outside the timing. The details also time both neighbours
at τ = 2 (the common case in async mode) and at τ = 8 and 12 (beyond fused.INLINE_MAX, where the
kernel computes φ in scratch rows). The reference is `torch.optim.SGD(model.parameters(),
lr=0.1).step()` with defaults, on the model's own per-tensor parameters, as users have it. One
torch thread (what every rank gets when the ranks fill the cores). Each ratio comes from calls
timed in interleaved pairs (SGD step, update, SGD step, update, ...): the ratio of each pair,
then their median, reported with quartiles and extremes.
"""

from __future__ import annotations

import resource
import time

import numpy as np
import torch

import _bench
from pcasgd_mpi import fused, models, rule

LR, LAM = 0.1, 0.04


def flat(numel: int, gen: torch.Generator, scale: float) -> torch.Tensor:
    # numpy-allocated like the optimizer's and the exchange's buffers
    out = torch.from_numpy(np.empty(numel, dtype=np.float32))
    return out.copy_(torch.randn(numel, generator=gen)).mul_(scale)


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def count_kernel_calls(f) -> int:
    """Runs f once and counts the calls of the numba kernel (0 if numba is missing)."""
    if not fused.available():
        return 0
    calls = 0
    launcher = fused._launcher

    def counting(dtype):
        launch = launcher(dtype)  # compiles or loads the kernel on first use

        def counted(*args):
            nonlocal calls
            calls += 1
            return launch(*args)

        return counted

    fused._launcher = counting
    try:
        f()
    finally:
        fused._launcher = launcher
    return calls


def main() -> None:
    args = _bench.parse_args(__doc__.splitlines()[0])
    torch.set_num_threads(1)
    reps = 60 if args.quick else 400
    model = models.build("resnet20", (3, 32, 32), 10)
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 0.01
    sgd = torch.optim.SGD(params, lr=LR)
    n = sum(p.numel() for p in params)
    x = flat(n, gen, 0.1)
    delta = flat(n, gen, 0.01 * LR)
    w = 1.0 / 3.0  # Metropolis weights on a ring
    stale = [rule.Neighbour(w, flat(n, gen, 0.1), flat(n, gen, 0.01), tau) for tau in (3, 5)]
    common = [rule.Neighbour(w, nb.x, nb.grad, 2) for nb in stale]
    older = [rule.Neighbour(w, nb.x, nb.grad, tau) for nb, tau in zip(stale, (8, 12))]
    kw = dict(lr=LR, lam=LAM, tolerance=1, horizon=16)

    buffers = (torch.empty_like(x), torch.empty_like(x))

    def update(nbs) -> bool:
        x_p, x_c = rule.candidates(x, delta, w, nbs, out=buffers, **kw)
        return rule.pv_choose(0.5, 0.6)  # the losses of x_p and x_c come from forward passes

    kernel_calls = count_kernel_calls(lambda: update(stale))
    faults_per_call: dict[str, float] = {}

    def counting_faults(name: str, f):
        """f, also counting its page faults (outside its own timing: read before and after)."""

        def run() -> float:
            f0 = faults()
            t0 = time.perf_counter()
            f()
            seconds = time.perf_counter() - t0
            faults_per_call[name] = faults_per_call.get(name, 0) + faults() - f0
            return seconds

        return run

    sgd_step = counting_faults("sgd", sgd.step)
    goal = _bench.interleave(sgd_step, counting_faults("pv", lambda: update(stale)), reps, warmup=10)
    side = reps // 3
    tau2 = _bench.interleave(sgd_step, _bench.timed(lambda: update(common)), side, warmup=3)
    tau8_12 = _bench.interleave(sgd_step, _bench.timed(lambda: update(older)), side, warmup=3)
    summary = goal.summary()
    _bench.emit(
        {
            "part": "P4",
            "ratio": summary["median"],
            "pairs": summary,
            "detail": {
                "parameters": n,
                "parameter_tensors": len(params),
                "torch_threads": 1,
                "median_us": {
                    "sgd": round(_bench.median(goal.a) * 1e6, 1),
                    "pv": round(_bench.median(goal.b) * 1e6, 1),
                    "pv_tau2": round(_bench.median(tau2.b) * 1e6, 1),
                    "pv_tau8_12": round(_bench.median(tau8_12.b) * 1e6, 1),
                },
                "ratio_tau_2_2": tau2.summary(),
                "ratio_tau_8_12": tau8_12.summary(),
                "fused_kernel": kernel_calls > 0,
                "kernel_calls_per_update": kernel_calls,
                "page_faults_per_call": {
                    "sgd": round(faults_per_call["sgd"] / (reps + 10), 1),
                    "pv": round(faults_per_call["pv"] / (reps + 10), 1),
                },
            },
        }
    )


if __name__ == "__main__":
    main()
