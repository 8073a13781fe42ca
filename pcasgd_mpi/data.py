"""Per-agent partitions of a data set and per-agent minibatch streams.

The data sets themselves (loaded, generated or read from the user's files) are in datasets.py;
`load`, `Dataset`, `DataError` and `DATASETS` are re-exported here.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .datasets import DATASETS, DataError, Dataset, load  # noqa: F401  (part of this module's API)


def _parse_scheme(scheme: str) -> float | None:
    """Return None for ``iid`` or the Dirichlet concentration for ``dirichlet:ALPHA``."""
    if scheme == "iid":
        return None
    kind, _, value = scheme.partition(":")
    try:
        alpha = float(value) if kind == "dirichlet" else None
    except ValueError:
        alpha = None
    if alpha is None or not math.isfinite(alpha) or alpha <= 0:
        raise DataError(
            f"bad partition scheme {scheme!r}; use 'iid' or 'dirichlet:ALPHA' with ALPHA > 0 (e.g. dirichlet:0.5)"
        )
    return alpha


def partition(labels, num_agents: int, scheme: str = "iid", seed: int = 0) -> list[np.ndarray]:
    """Split sample indices among agents; each index is used exactly once and no agent is empty.

    ``dirichlet:ALPHA`` gives label skew: smaller ALPHA concentrates each class
    on fewer agents.
    """
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    labels = np.asarray(labels).reshape(-1)
    alpha = _parse_scheme(scheme)
    n = len(labels)
    if num_agents < 1 or num_agents > n:
        raise DataError(f"cannot split {n} samples among {num_agents} agents; need 1 <= agents <= samples")
    rng = np.random.default_rng(seed)
    if alpha is None:
        return [np.sort(s) for s in np.array_split(rng.permutation(n), num_agents)]

    shards: list[list[np.ndarray]] = [[] for _ in range(num_agents)]
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        proportions = rng.dirichlet(np.full(num_agents, alpha))
        cuts = np.round(np.cumsum(proportions)[:-1] * len(idx)).astype(int)
        for agent, part in enumerate(np.split(idx, cuts)):
            shards[agent].append(part)
    result = [np.sort(np.concatenate(parts)) for parts in shards]

    # Tiny alpha can leave agents empty; every agent must be able to train.
    for agent in range(num_agents):
        if len(result[agent]) == 0:
            donor = max(range(num_agents), key=lambda a: (len(result[a]), -a))
            result[agent] = result[donor][-1:]
            result[donor] = result[donor][:-1]
    return result


class ShardSampler:
    """Deterministic, resumable minibatch index stream over one agent's shard.

    The order of epoch ``e`` depends only on ``(seed, rank, e)``, so a resumed
    run reproduces the stream of an uninterrupted one.
    """

    def __init__(self, indices: np.ndarray, batch_size: int, seed: int, rank: int):
        self.indices = np.asarray(indices, dtype=np.int64).reshape(-1).copy()
        if len(self.indices) == 0:
            raise DataError(f"rank {rank} has an empty data shard; use fewer agents or another partition")
        if batch_size < 1:
            raise DataError(f"batch size must be positive, got {batch_size}")
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rank = int(rank)
        self.epoch = 0
        self.position = 0
        self._order: np.ndarray | None = None

    @property
    def _effective_batch(self) -> int:
        return min(self.batch_size, len(self.indices))

    @property
    def steps_per_epoch(self) -> int:
        return len(self.indices) // self._effective_batch

    def _epoch_order(self) -> np.ndarray:
        if self._order is None:
            rng = np.random.default_rng([self.seed, self.rank, self.epoch])
            self._order = rng.permutation(len(self.indices))
        return self._order

    def next_batch(self) -> np.ndarray:
        size = self._effective_batch
        batch = self.indices[self._epoch_order()[self.position : self.position + size]]
        self.position += size
        # Advance eagerly so ``epoch`` counts completed epochs; the partial tail is dropped.
        if self.position + size > len(self.indices):
            self.epoch += 1
            self.position = 0
            self._order = None
        return batch

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "rank": self.rank,
            "batch_size": self.batch_size,
            "num_indices": len(self.indices),
        }

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("seed", "rank", "batch_size", "num_indices"):
            if state[key] != mine[key]:
                raise DataError(
                    f"sampler state has {key}={state[key]} but this run has {mine[key]}; "
                    "resume with the original settings"
                )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._order = None
