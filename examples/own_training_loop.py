"""Your own model and training loop, made decentralized with two extra lines.

    mpirun -n 4 --oversubscribe python examples/own_training_loop.py

Each rank trains the same small network on its own slice of a two-moons style problem made here
from numpy; PC-ASGD-PV mixes the weights with the ring neighbours in the background.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from torch import nn

import pcasgd_mpi as pc


class TwoLayerNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 2))

    def forward(self, x):
        return self.body(x)


def make_data(rank: int, size: int, n: int = 2000, seed: int = 0):
    rng = np.random.default_rng(seed)
    t = rng.uniform(0, np.pi, n)
    label = rng.integers(0, 2, n)
    x = np.stack([np.cos(t) + label, np.sin(t) * (1 - 2 * label) + 0.5 * label], 1) + 0.1 * rng.normal(size=(n, 2))
    x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(label)
    mine = slice(rank, n, size)  # every rank its own shard
    return x[mine], y[mine], x, y


def main(steps: int = 300, algorithm: str = "pc-asgd-pv", mode: str = "async") -> float:
    world = pc.init(topology="ring")
    torch.manual_seed(0)  # the same initial model everywhere
    model = TwoLayerNet()
    opt = pc.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.2), model, world=world, algorithm=algorithm, mode=mode
    )
    loss_fn = nn.CrossEntropyLoss()
    x, y, x_all, y_all = make_data(world.rank, world.size)
    gen = torch.Generator().manual_seed(world.rank)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (32,), generator=gen)
        xb, yb = x[idx], y[idx]
        loss = loss_fn(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step(closure=lambda: loss_fn(model(xb), yb))
    opt.finalize()
    with torch.no_grad():
        opt.load_average()  # the average model, into the model on every rank
        accuracy = float((model(x_all).argmax(1) == y_all).float().mean())
    if world.rank == 0:
        print(f"accuracy of the average model: {accuracy:.3f}")
    return accuracy


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--algorithm", default="pc-asgd-pv")
    p.add_argument("--mode", default="async", choices=("async", "lockstep"))
    a = p.parse_args()
    main(a.steps, a.algorithm, a.mode)
