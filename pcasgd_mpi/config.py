"""The options of one training run, as a dataclass; importable without MPI or torch."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field


@dataclass
class TrainConfig:
    topology: str = "ring"
    weights: str = "metropolis"
    algorithm: str = "pc-asgd-pv"
    theta: float = 0.5
    lam: float = 0.04
    lam_mode: str = "fixed"
    tolerance: int | None = None
    horizon: int = 16
    mode: str = "async"
    delay: str = "none"
    straggler: list[str] = field(default_factory=list)
    dataset: str = "digits"
    data_dir: str | None = None
    partition: str = "iid"
    model: str = "mlp"
    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 32
    lr: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0
    seed: int = 0
    out: str | None = None
    eval_every: int = 0
    log_every: int = 1
    timeout: float = 120.0
    threads: int | None = None
    progress: bool = True
    overwrite: bool = False
    checkpoint_every: int = 0
    checkpoint_dir: str | None = None
    keep_checkpoints: int = 3
    resume: bool = False
    fault_tolerant: bool = False
    tensorboard: bool = False
    device: str = "cpu"
    cuda_aware: str = "auto"
    synthetic_shape: list[int] = field(default_factory=lambda: [1, 8, 8])

    def config_hash(self) -> str:
        """Every rank must run with the same options (progress and threads are per-rank matters)."""
        return _hash({k: v for k, v in dataclasses.asdict(self).items() if k not in ("progress", "threads")})

    def training_hash(self) -> str:
        """What a checkpoint must agree on to be continued: the options that change the trajectory."""
        skip = {"progress", "threads", "out", "overwrite", "steps", "epochs", "eval_every", "log_every",
                "timeout", "straggler", "fault_tolerant", "tensorboard", "device", "cuda_aware", "checkpoint_every", "checkpoint_dir", "keep_checkpoints", "resume"}
        return _hash({k: v for k, v in dataclasses.asdict(self).items() if k not in skip})


def _hash(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]
