"""Single-process lockstep simulation: a stale copy rolled forward by the receiver's whole movement,
with the largest gain the delayed loop tolerates.

Every link is `--delay` steps late (the grids' `fixed:d`). Agent j's step is

    x^j_{k+1} = x^j_k + θ_d Σ_l W_jl (x^l_{k−d} − x^j_{k−d}) + Δ^j_k

that is the stale copy x^l_{k−d} rolled forward by everything j itself did since (x^j_k − x^j_{k−d}),
blended with weight θ_d. Along the part all agents share the term is zero, so the average model
moves at the full step size whatever the delay. Along a disagreement mode of the mixing matrix
(eigenvalue μ of I − W) it is the delayed loop e_{k+1} = e_k − θμ e_{k−d}, which is stable only
for θμ < 2 sin(π / (2(2d + 1))); `whole` takes θ_d = c · 2 sin(π / (2(2d + 1))) / μ_max (c =
`--margin`, capped at 1), computed from the graph, not tuned per setting.

Compared with dsgd without delay (the gap reference) and dsgd with the late copies as they are.
`--momentum quasi-global` builds each agent's momentum from its whole movement instead of its
gradients (m ← β m + (1 − β)(x_k − x_{k+1})/α), which keeps a rank's own data out of its momentum.
The reference always uses the local momentum of torch's SGD.
`whole-gt-qgm` adds gradient tracking (DIGing; Nedić, Olshevsky and Shi, 2017) in the same delayed
form: each agent descends along y^j instead of its own gradient, with

    y^j_{k+1} = y^j_k + θ_y Σ_l W_jl (y^l_{k−d} − y^j_{k−d}) + g^j_{k+1} − g^j_k

so Σ_j y^j = Σ_j g^j at every step and y^j tends to the agents' mean gradient: a rank's label skew
is taken out of its step. y's loop has no momentum, so θ_y is the bound at β = 0.
`link-qgm` predicts each link's disagreement instead (a Smith predictor): in lockstep both ends of
a link see the same late pair and pull with opposite actions, so what the link itself did since
is known, and the pull is

    a^{jl}_k = γ W_jl (x^l_{k−d} − x^j_{k−d} − 2 C^{jl}_k),   C^{jl}_k = Σ_{t=k−d}^{k−1} a^{jl}_t

(γ = `--link-gain`, by default `rule.link_gain`: half the edge of this loop on the ring, with the
momentum). It leaves unseen only what the two ends' other links and data did in the last d steps.
`link-own-qgm` is the same pull where the two directions of a link differ, as with the grids'
`ranks:0,2,4,6:d` (messages from the even agents d steps late, from the odd ones on time), and each
end uses its own late pair instead of the link's common one, as an async rank would: the pulls of
a link no longer cancel (γ as for `link-qgm` at delay d).

    python benchmarks/delay_gain_sim.py                       # MNIST-1D CNN, 8-ring, fixed:8, 3 seeds
    python benchmarks/delay_gain_sim.py --seeds 0 --lrs 0.1 --partitions iid
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.utils import parameters_to_vector, vector_to_parameters

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pcasgd_mpi import data, models, rule, topology  # noqa: E402
from pcasgd_mpi import rule as rule_math  # noqa: E402  (run() names its argument `rule`)

RULES = ("dsgd", "dsgd-late", "whole", "whole-qgm", "whole-gt-qgm", "link-qgm", "link-own-qgm")


def delay_gain(delay: int, mu_max: float, margin: float, momentum: float = 0.0) -> float:
    """The gain θ_d: `margin` times the largest stable one for the stiffest mode, at most 1
    (``momentum``: β of quasi-global momentum, whose buffer carries the mixing too)."""
    return rule.stable_theta(delay, mu_max, margin, momentum=momentum)


def track(Y, G, G_prev, y_late, W, theta_y: float):
    """One step of the delayed tracker: the late y's of both ends of every link, so the sum holds."""
    Y = Y + G - G_prev
    return Y if y_late is None else Y + theta_y * (W @ y_late - y_late)


def link_action(late, C, links, gain: float):
    """a^{jl} for every link: the late disagreement less what both ends' pulls on it did since."""
    return gain * links[:, :, None] * (late[None, :, :] - late[:, None, :] - 2 * C)


def own_pair_action(history, actions, lags, links, gain: float):
    """link-own-qgm: a^{jl} from j's own late pair (x^l, x^j at k − lags[j][l]) and j's own pulls
    of the last lags[j][l] steps. ``history``: x_{k−d} … x_k; ``actions``: the pulls of the last
    steps, newest last."""
    H = torch.stack(history)
    n = H.shape[1]
    ready = lags < len(history)
    slot = (len(history) - 1 - lags).clamp(min=0)
    x_l = H[slot, torch.arange(n)[None, :]]
    x_j = H[slot, torch.arange(n)[:, None]]
    pulled = torch.zeros_like(x_l)
    for age, past in enumerate(reversed(actions), start=1):
        pulled += (age <= lags).to(past.dtype)[:, :, None] * past
    return gain * (links * ready)[:, :, None] * (x_l - x_j - 2 * pulled)


def run(ds, rule: str, *, partition: str, lr: float, seed: int, args) -> dict:
    n, delay = args.agents, (0 if rule == "dsgd" else args.delay)
    W = torch.tensor(topology.mixing_matrix(topology.build("ring", n), "metropolis"), dtype=torch.float32)
    mu_max = topology.largest_disagreement_rate(W.numpy())
    quasi_global, tracking = rule.endswith("-qgm"), rule == "whole-gt-qgm"
    beta = args.momentum if quasi_global else 0.0
    theta = delay_gain(delay, mu_max, args.margin, beta) if rule.startswith("whole") else None
    theta_y = delay_gain(delay, mu_max, args.margin, 0.0)
    links = W * (1 - torch.eye(n))
    gain = args.link_gain
    lags = torch.tensor([[delay if l % 2 == 0 else 0 for l in range(n)] for _ in range(n)])
    if rule in ("link-qgm", "link-own-qgm") and gain is None:
        gain = rule_math.link_gain(W.numpy(), (links > 0).int().numpy() * delay, momentum=args.momentum)
    if rule in ("link-qgm", "link-own-qgm"):
        theta = gain  # reported as the run's θ
    actions, C = [], 0.0  # link-qgm: a^{jl}_t of the last d steps and their sum
    shards = data.partition(ds.y_train.numpy(), n, partition, seed=seed)
    samplers = [data.ShardSampler(s, args.batch, seed, r) for r, s in enumerate(shards)]
    nets = [models.build(args.model, ds.input_shape, ds.num_classes, seed=seed) for _ in range(n)]
    opts = [torch.optim.SGD(m.parameters(), lr=lr, momentum=args.momentum) for m in nets]
    X = torch.stack([parameters_to_vector(m.parameters()).detach() for m in nets])
    momentum = torch.zeros_like(X)
    history = [X.clone()]  # x_{k−d}, ..., x_k
    Y = G_prev = None
    y_history = []  # y_{k−d}, ..., y_k
    self_weight = torch.diag(W)
    off = W - torch.diag(self_weight)
    for _ in range(args.steps):
        step = torch.empty_like(X)
        for j, (net, opt, sampler) in enumerate(zip(nets, opts, samplers)):
            vector_to_parameters(X[j], net.parameters())
            idx = sampler.next_batch()
            opt.zero_grad()
            F.cross_entropy(net(ds.x_train[idx]), ds.y_train[idx]).backward()
            if quasi_global:
                step[j] = torch.cat([p.grad.reshape(-1) for p in net.parameters()])  # g, stepped below
            else:
                opt.step()
                step[j] = parameters_to_vector(net.parameters()).detach() - X[j]
        late = history[0] if len(history) > delay else None  # nothing has arrived before step d
        if tracking:
            y_late = y_history[0] if len(y_history) > delay else None
            Y, G_prev = (step.clone() if Y is None else track(Y, step, G_prev, y_late, W, theta_y)), step.clone()
            y_history.append(Y.clone())
            if len(y_history) > delay + 1:
                y_history.pop(0)
        if quasi_global:
            step = -lr * (args.momentum * momentum + (Y if tracking else step))
        if delay == 0:
            mixed = W @ X
        elif late is None and rule != "link-own-qgm":
            mixed = X.clone()
        elif rule == "link-own-qgm":
            action = own_pair_action(history, actions, lags, links, gain)
            mixed = X + action.sum(1)
            actions = [*actions, action][-delay:] if delay else []
        elif rule == "link-qgm":
            action = link_action(late, C, links, gain)
            mixed = X + action.sum(1)
            actions.append(action)
            C = C + action
            if len(actions) > delay:
                C = C - actions.pop(0)
        elif rule == "dsgd-late":
            mixed = self_weight[:, None] * X + off @ late
        else:
            mixed = X + theta * (W @ late - late)
        new = mixed + step
        if quasi_global:
            momentum = args.momentum * momentum + (1 - args.momentum) * (X - new) / lr
        X = new
        history.append(X.clone())
        if len(history) > delay + 1:
            history.pop(0)
        if not torch.isfinite(X).all():
            return {
                "accuracy": float("nan"),
                "consensus": float("inf"),
                "theta": gain if rule.startswith("link") else theta,
            }
    average = X.mean(0)
    vector_to_parameters(average, nets[0].parameters())
    with torch.no_grad():
        accuracy = (nets[0](ds.x_test).argmax(1) == ds.y_test).float().mean().item()
    return {"accuracy": accuracy, "consensus": float(((X - average) ** 2).sum(1).mean()), "theta": theta}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="mnist1d")
    ap.add_argument("--model", default="cnn")
    ap.add_argument("--agents", type=int, default=8)
    ap.add_argument("--delay", type=int, default=8, help="every link's delay in steps (fixed:d)")
    ap.add_argument("--partitions", default="iid;dirichlet:0.3")
    ap.add_argument("--lrs", default="0.1,0.2")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--margin", type=float, default=0.5, help="fraction of the largest stable gain")
    ap.add_argument("--link-gain", type=float, help="link-qgm's γ (default: rule.link_gain)")
    ap.add_argument("--rules", default=",".join(RULES), help=f"comma list of {', '.join(RULES)}")
    ap.add_argument("--json", type=Path, help="write every run's result here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    ds = data.load(args.dataset)
    rules = args.rules.split(",")
    rows = []
    for partition in args.partitions.split(";"):
        for lr in (float(x) for x in args.lrs.split(",")):
            for seed in (int(s) for s in args.seeds.split(",")):
                for name in rules:
                    t = time.perf_counter()
                    r = run(ds, name, partition=partition, lr=lr, seed=seed, args=args)
                    r.update(
                        rule=name, partition=partition, lr=lr, seed=seed, seconds=round(time.perf_counter() - t, 1)
                    )
                    rows.append(r)
                    print(json.dumps(r), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "runs": rows}, indent=1))
    print(
        f"\nfixed:{args.delay}, {args.agents}-ring, {args.dataset} {args.model}, momentum {args.momentum}, "
        f"{args.steps} steps; accuracy of the average model (%), mean over seeds {args.seeds}; gap to dsgd"
    )
    print("| partition | lr | " + " | ".join(rules) + " |")
    print("|---|---|" + "---|" * len(rules))
    for partition in args.partitions.split(";"):
        for lr in (float(x) for x in args.lrs.split(",")):
            acc = {
                name: [
                    100 * r["accuracy"] for r in rows if (r["rule"], r["partition"], r["lr"]) == (name, partition, lr)
                ]
                for name in rules
            }
            ref = statistics.mean(acc["dsgd"]) if "dsgd" in acc else None
            cells = []
            for name in rules:
                m = statistics.mean(acc[name])
                gap = "" if ref is None or name == "dsgd" else f" ({ref - m:+.1f})"
                cells.append(f"{m:.1f}{gap}")
            print(f"| {partition} | {lr} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
