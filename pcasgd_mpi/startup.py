"""What each rank builds and checks before training: its world, data shard, model and optimizer;
errors agreed on by every rank; the run directory; resuming from checkpoints."""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path

import torch
from mpi4py import MPI

from . import checkpoint, collectives, data, models, rundir
from .config import TrainConfig
from .delay import DelayModel, Straggler, link_delays
from .device import decide_cuda_aware, select_device
from .optimizer import DistributedOptimizer, Mode
from .transport import make_transport
from .world import World


class SetupError(RuntimeError):
    """A problem with the configuration or the inputs, found before training started."""


UNBOUNDED = 2**62
SETUP_TIMEOUT = 900.0


def warn(rank: int):
    return lambda msg: print(f"pcasgd-mpi [rank {rank}]: warning: {msg}", file=sys.stderr, flush=True)


class Setup:
    """Everything a rank builds before training; errors are collected, then agreed on by all ranks."""

    def __init__(self, cfg: TrainConfig, world: World, node_rank: int):
        self.cfg, self.world = cfg, world
        rank, size = world.rank, world.size
        self.local_rank = node_rank
        self.device = select_device(cfg.device, node_rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.cuda_aware = decide_cuda_aware(cfg.cuda_aware, self.device)
        self.stragglers = {s.rank: s.factor for s in map(Straggler.parse, cfg.straggler)}
        bad = sorted(r for r in self.stragglers if r >= size)
        if bad:
            raise SetupError(f"--straggler names ranks {bad} but the job has {size} ranks")
        delay = DelayModel.parse(cfg.delay, seed=cfg.seed)
        if delay.max_delay > 0 and Mode(cfg.mode) is Mode.ASYNC:
            raise SetupError("--delay injects delays in --mode lockstep; in async mode use --straggler")
        if cfg.tensorboard and world.rank == 0 and importlib.util.find_spec("tensorboard") is None:
            raise SetupError("--tensorboard needs the tensorboard package: pip install tensorboard")
        self.dataset = data.load(
            cfg.dataset, root=cfg.data_dir, seed=cfg.seed, synthetic_shape=tuple(cfg.synthetic_shape)
        )
        shards = data.partition(self.dataset.y_train, size, cfg.partition, seed=cfg.seed)
        smallest = min(range(size), key=lambda r: len(shards[r]))
        if cfg.batch_size > len(shards[smallest]):
            # Every rank sees every shard: all raise the same line, naming the smallest shard.
            raise SetupError(
                f"--batch-size {cfg.batch_size} is larger than rank {smallest}'s shard of "
                f"{len(shards[smallest])} samples; use --batch-size {len(shards[smallest])} or less"
            )
        self.shards = shards  # a survivor of a failed rank takes over part of its shard (repair.py)
        self.sampler = data.ShardSampler(shards[rank], cfg.batch_size, cfg.seed, rank)
        self.link_delays = link_delays(cfg.link_delay, size)
        if cfg.duration is not None and Mode(cfg.mode) is not Mode.ASYNC:
            raise SetupError("--duration is a shared wall-time stop for --mode async; in lockstep use --steps")
        if cfg.duration is not None and cfg.steps is None and cfg.epochs is None:
            self.steps = UNBOUNDED  # the wall-time budget ends the run
        else:
            self.steps = cfg.resolved_steps(len(self.dataset.y_train), size)
        if self.steps < 1:
            raise SetupError(f"--steps must be >= 1, got {self.steps}")
        self.model = models.build(cfg.model, self.dataset.input_shape, self.dataset.num_classes, seed=cfg.seed).to(
            self.device
        )
        inner = torch.optim.SGD(
            self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
        self.opt = DistributedOptimizer(
            inner,
            self.model,
            world=world,
            algorithm=cfg.algorithm,
            mode=cfg.mode,
            theta=cfg.theta,
            theta_rule=cfg.theta_rule,
            lam=cfg.lam,
            lam_mode=cfg.lam_mode,
            tolerance=cfg.tolerance,
            horizon=cfg.horizon,
            delay=delay,
            timeout=cfg.timeout,
            fault_tolerant=cfg.fault_tolerant,
            warn=warn(rank),
            transport=make_transport(self.device, self.cuda_aware.cuda_aware),
            slope=cfg.slope,
            link_delay=self.link_delays.get(rank, 0.0),
            balance=cfg.balance,
            on_diverge=cfg.on_diverge,
            momentum_kind=cfg.momentum_kind,
            av_momentum=cfg.av_momentum,
        )


def agree(comm: MPI.Comm, error: str | None, cfg_hash: str) -> None:
    """All ranks learn whether any rank failed its setup, and whether all run the same config."""
    # Start-up may include compiling a kernel and loading data: a generous deadline, but a deadline.
    reports = collectives.allgather_object(
        comm, (error, cfg_hash), time.monotonic() + SETUP_TIMEOUT, "not every rank finished its set-up"
    )
    for r, (err, _) in enumerate(reports):
        if err is not None:
            raise SetupError(err if comm.Get_size() == 1 else f"[rank {r}] {err}")
    hashes = {h for _, h in reports}
    if len(hashes) > 1:
        groups = {h: [r for r, (_, hh) in enumerate(reports) if hh == h] for h in hashes}
        raise SetupError(
            f"ranks were started with different configurations (ranks by config: "
            f"{sorted(groups.values())}); launch every rank with the same options"
        )


def output_dir(cfg: TrainConfig, comm: MPI.Comm) -> Path:
    """Rank 0 picks the run directory and checks it by the run-directory rules; all ranks agree."""
    out, error = cfg.out, None
    if comm.Get_rank() == 0:
        if out is None:
            out = os.path.join("runs", time.strftime("%Y%m%d-%H%M%S") + f"-{cfg.algorithm}")
        try:
            rundir.prepare(out, cfg.checkpoint_dir, overwrite=cfg.overwrite, resume=cfg.resume)
            (Path(out) / "metrics").mkdir(exist_ok=True)
        except (rundir.RunDirError, OSError) as exc:
            error = str(exc)
    agree(comm, error, cfg.config_hash())
    return Path(comm.bcast(out, root=0))


def checkpoint_state(cfg: TrainConfig, setup: Setup) -> dict:
    return {
        "world_size": setup.world.size,
        "signature": setup.opt.signature,
        "training_hash": cfg.training_hash(),
        "optimizer": setup.opt.state_dict(),
        "sampler": setup.sampler.state_dict(),
        "torch_rng": torch.get_rng_state(),
    }


def resume(cfg: TrainConfig, setup: Setup, ckpt_dir: Path, comm: MPI.Comm) -> int | None:
    """Load the newest checkpoint step all ranks have (lockstep) or each rank's newest (async)."""
    rank, size = comm.Get_rank(), comm.Get_size()
    available = collectives.allgather_object(
        comm,
        checkpoint.steps_available(ckpt_dir, rank),
        time.monotonic() + SETUP_TIMEOUT,
        "not every rank looked for checkpoints",
    )
    if not all(available):
        missing = [r for r, steps in enumerate(available) if not steps]
        if rank == 0:
            print(
                f"pcasgd-mpi: --resume: no checkpoint for ranks {missing} in {ckpt_dir}; starting from step 0",
                file=sys.stderr,
                flush=True,
            )
        return None
    if Mode(cfg.mode) is Mode.LOCKSTEP:
        common = set.intersection(*map(set, available))
        if not common:
            raise SetupError(
                f"--resume: the ranks in {ckpt_dir} share no checkpoint step; delete the folder to start afresh"
            )
        step = max(common)
    else:
        step = available[rank][-1]
    error = None
    try:
        state = checkpoint.load(
            ckpt_dir,
            rank,
            step,
            {"rank": rank, "world_size": size, "signature": setup.opt.signature, "training_hash": cfg.training_hash()},
        )
        setup.opt.load_state_dict(state["optimizer"])
        setup.sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["torch_rng"])
    except (ValueError, KeyError, RuntimeError) as exc:
        error = str(exc) if not isinstance(exc, KeyError) else f"checkpoint of step {step} lacks {exc}"
    agree(comm, error, cfg.config_hash())
    return step


def set_threads(threads: int | None, comm: MPI.Comm) -> None:
    """Share the node's cores among the ranks on it: oversubscribed torch threads slow everyone."""
    if threads is None:
        local = comm.Split_type(MPI.COMM_TYPE_SHARED)
        threads = max(1, (os.cpu_count() or 1) // local.Get_size())
        local.Free()
    torch.set_num_threads(threads)
