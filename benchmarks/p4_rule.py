"""P4, rule overhead: one PC-ASGD-PV update against one plain SGD step, ResNet-20 parameters.

The update is `rule.candidates` (both candidates x^P and x^C, two stale neighbours with weights
and gradients, τ = 3 and 5, which go through the general φ) plus `rule.pv_choose` on two given
losses: the two forward passes PV needs are left out, as forward/backward are on both sides. It
runs on flat contiguous buffers as the optimizer holds them. The reference is
`torch.optim.SGD(model.parameters(), lr=0.1).step()` with defaults, on the model's own
per-tensor parameters, as users have it. One torch thread (what every rank gets when the ranks
fill the cores). The two are timed alternately and the ratio is median / median.
"""

from __future__ import annotations

import resource
import time

import _bench

import numpy as np
import torch

from pcasgd_mpi import models, rule

LR, LAM = 0.1, 0.04


def flat(numel: int, gen: torch.Generator, scale: float) -> torch.Tensor:
    # numpy-allocated like the optimizer's and the exchange's buffers
    out = torch.from_numpy(np.empty(numel, dtype=np.float32))
    return out.copy_(torch.randn(numel, generator=gen)).mul_(scale)


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


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
    kw = dict(lr=LR, lam=LAM, tolerance=1, horizon=16)

    def update(nbs) -> bool:
        x_p, x_c = rule.candidates(x, delta, w, nbs, **kw)
        return rule.pv_choose(0.5, 0.6)  # the losses of x_p and x_c come from forward passes

    cases = {"sgd": sgd.step, "pv": lambda: update(stale), "pv_tau2": lambda: update(common)}
    times: dict[str, list[float]] = {k: [] for k in cases}
    minflt: dict[str, int] = {k: 0 for k in cases}
    for f in cases.values():
        for _ in range(5):
            f()
    for _ in range(reps):
        for name, f in cases.items():
            f0 = faults()
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
            minflt[name] += faults() - f0
    med = {k: _bench.median(v) for k, v in times.items()}
    _bench.emit({
        "part": "P4",
        "ratio": med["pv"] / med["sgd"],
        "detail": {
            "parameters": n, "parameter_tensors": len(params), "reps": reps, "torch_threads": 1,
            "median_us": {k: round(v * 1e6, 1) for k, v in med.items()},
            "ratio_tau_2_2": med["pv_tau2"] / med["sgd"],
            "page_faults_per_call": {k: round(v / reps, 1) for k, v in minflt.items()},
        },
    })


if __name__ == "__main__":
    main()
