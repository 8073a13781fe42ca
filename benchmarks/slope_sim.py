"""Which roll-forward predicts where a stale neighbour has got to? A single-process lockstep simulation.

N agents on a ring with Metropolis weights, the digits MLP of `pcasgd_mpi.models`, batch 32, SGD
with momentum (torch's form: v ← μ v + g, Δ = −α v), dsgd mixing; the messages of ranks 0 and 2
reach their neighbours D steps late. Data, partition, minibatch order and the initial model come
from the project's modules with the seeds `pcasgd-mpi train` uses. After the run, for each delayed
sender l and each step s ≥ 50, the truth x^l_{s+D} is compared with predictions made from the
copy x^l_s:

- none: the copy as it is, x_s;
- update: x_s + D·Δ_s (the sender's own optimizer step, `--slope update` with λ = 0);
- gradient: x_s − D·α·g_s (`--slope gradient` with λ = 0);
- velocity: x_s + D·(x_s − x_{s−1}) (`--slope velocity`);
- drift β: x_s + D·m_s, m the bias-corrected exponential average of x_s − x_{s−1} (`--slope drift`
  uses β = 0.95).

Printed: the root mean square of each error over those steps, and its ratio to `none`; also the
share of the sender's movement that its own steps do not explain (‖x_{s+D} − x_s − Σ Δ‖ over
‖x_{s+D} − x_s‖), the part its mixing undid or added.

    python benchmarks/slope_sim.py --partition dirichlet:0.3 --delay 8 --lr 0.02 --momentum 0.9
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import torch
from torch.nn.utils import parameters_to_vector

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "benchmarks"))

import av_sim  # noqa: E402

BETAS = (0.8, 0.9, 0.95, 0.97, 0.98)
DELAYED = (0, 2)
SKIP = 50  # the first steps, before the averages have anything to average


def trajectories(args) -> list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """Per step, per agent: (x_k, Δ_k, g_k)."""
    ds, W, nbrs, samplers, model = av_sim.agents(args.agents, args.partition, args.seed, 32)
    n = args.agents
    xs = [parameters_to_vector(model.parameters()).detach().clone() for _ in range(n)]
    vel = [torch.zeros_like(xs[0]) for _ in range(n)]
    hist = []
    for k in range(args.steps):
        msgs = []
        for r in range(n):
            g = av_sim.gradient(model, xs[r], ds, samplers[r].next_batch())
            vel[r].mul_(args.momentum).add_(g)
            msgs.append((xs[r].clone(), -args.lr * vel[r], g))
        hist.append(msgs)
        new = []
        for j in range(n):
            x = W[j, j] * msgs[j][0]
            for l in nbrs[j]:
                s = k - (args.delay if l in DELAYED else 0)
                x = x + W[j, l] * (hist[s][l][0] if s >= 0 else msgs[j][0])
            new.append(x + msgs[j][1])
        xs = new
    return hist


def errors(hist, args) -> tuple[dict[str, list[float]], list[float]]:
    D, out, unexplained = args.delay, {}, []
    for l in DELAYED:
        ema = {b: torch.zeros_like(hist[0][l][0]) for b in BETAS}
        for s in range(1, len(hist) - D):
            x_s, delta, g = hist[s][l]
            move = x_s - hist[s - 1][l][0]
            for b in BETAS:
                ema[b].mul_(b).add_(move, alpha=1 - b)
            if s < SKIP:
                continue
            truth = hist[s + D][l][0] - x_s
            preds = {
                "none": torch.zeros_like(truth),
                "update": D * delta,
                "gradient": -D * args.lr * g,
                "velocity": D * move,
            }
            for b in BETAS:
                preds[f"drift {b}"] = D * ema[b] / (1 - b**s)
            for name, p in preds.items():
                out.setdefault(name, []).append((truth - p).norm().item())
            own = sum(hist[s + i][l][1] for i in range(D))
            unexplained.append((truth - own).norm().item() / max(truth.norm().item(), 1e-30))
    return out, unexplained


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--partition", default="iid")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--delay", type=int, default=8)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--agents", type=int, default=4)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    out, unexplained = errors(trajectories(args), args)
    rms = {k: math.sqrt(statistics.fmean(e * e for e in v)) for k, v in out.items()}
    print(
        f"{args.partition}, seed {args.seed}, delay {args.delay}, lr {args.lr}, momentum {args.momentum}: "
        f"movement not explained by the sender's own steps {statistics.fmean(unexplained):.2f} of it (mean)"
    )
    print("| prediction | rms error | / none |\n|---|---|---|")
    for k, v in rms.items():
        print(f"| {k} | {v:.4f} | {v / rms['none']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
