"""The training loop: data shard, model, DistributedOptimizer, metrics and the final summary."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from mpi4py import MPI

from . import checkpoint, collectives, data, models, repair, stopping
from .config import Stop, TrainConfig
from .device import local_rank, local_rank_from_comm
from .metrics import beyond_horizon, evaluate, finite_json, merge_metrics, metrics_before, model_sha256, progress
from .optimizer import NEVER, Algorithm, Mode
from .roster import StopReason
from .startup import (  # noqa: F401  (SetupError is part of this module's API)
    SETUP_TIMEOUT,
    UNBOUNDED,
    Setup,
    SetupError,
    agree,
    checkpoint_state,
    output_dir,
    resume,
    set_threads,
)
from .world import init

BN_CALIBRATION_SAMPLES = 4096  # training samples that give the average model its BatchNorm statistics


def run(cfg: TrainConfig, comm: MPI.Comm | None = None) -> dict | None:
    """Train on every rank; returns the summary on rank 0 (None elsewhere)."""
    comm = comm if comm is not None else MPI.COMM_WORLD
    rank = comm.Get_rank()
    set_threads(cfg.threads, comm)
    node_rank = local_rank()
    if node_rank is None:
        node_rank = local_rank_from_comm(comm)  # collective: every rank takes this branch or none
    error, setup = None, None
    try:
        world = init(cfg.topology, cfg.weights, comm=comm, seed=cfg.seed)
        setup = Setup(cfg, world, node_rank)
    except (ValueError, SetupError, OSError) as exc:
        error = str(exc)
    agree(comm, error, cfg.config_hash())
    out = output_dir(cfg, comm)
    if rank == 0:
        import yaml

        # Repeat the run exactly (into a new directory) with: pcasgd-mpi train --config OUT/config.yaml
        used = cfg.effective(steps=setup.steps, tolerance=setup.opt.tolerance)
        (out / "config.yaml").write_text(yaml.safe_dump(used.to_file(), sort_keys=False, allow_unicode=True))
    ckpt_dir = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else out / "checkpoints"
    resumed_from = resume(cfg, setup, ckpt_dir, comm) if cfg.resume else None
    return _Loop(cfg, setup, out, ckpt_dir, resumed_from).run()


class _Loop:
    def __init__(self, cfg: TrainConfig, setup: Setup, out: Path, ckpt_dir: Path, resumed_from: int | None):
        self.cfg, self.s, self.out, self.ckpt_dir = cfg, setup, out, ckpt_dir
        self.world, self.opt, self.model = setup.world, setup.opt, setup.model
        self.rank = self.world.rank
        path = out / "metrics" / f"rank-{self.rank}.jsonl"
        kept = metrics_before(path, resumed_from) if resumed_from is not None else ""
        self.metrics = open(path, "w")
        self.metrics.write(kept)
        self.board = None
        if cfg.tensorboard and self.rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            self.board = SummaryWriter(log_dir=str(out / "tensorboard"))
        self.last_accuracy: float | None = None

    def _checkpoint(self) -> Path:
        # Metrics up to the checkpoint must survive a kill, or a resumed run would have a gap.
        self.metrics.flush()
        os.fsync(self.metrics.fileno())
        return checkpoint.save(
            self.ckpt_dir,
            self.rank,
            self.opt.step_count,
            checkpoint_state(self.cfg, self.s),
            self.cfg.keep_checkpoints,
        )

    def _log(self, record: dict) -> None:
        self.metrics.write(json.dumps(finite_json(record)) + "\n")

    def run(self) -> dict | None:
        cfg, s, opt = self.cfg, self.s, self.opt
        self.slow = s.stragglers.get(self.rank, 1.0)
        self.stale_sum = self.stale_n = 0
        self.stopped: int | None = None
        if self.rank == 0 and s.device.type != "cpu":
            print(f"pcasgd-mpi: device {s.device}; CUDA-aware MPI: {s.cuda_aware}", file=sys.stderr, flush=True)
        bar = progress(cfg, s.steps, self.rank)
        self._warm_up()
        collectives.barrier(self.world.comm, time.monotonic() + SETUP_TIMEOUT, "not every rank started training")
        opt.mark_start()
        t0 = time.perf_counter()
        self.end_time = None if cfg.duration is None else time.monotonic() + cfg.duration
        first = opt.step_count
        opt.on_repair = self._adopt
        if bar is not None and first < s.steps:
            bar.update(first)
        stopping.install()
        for k in range(first, s.steps):
            self._step(k, bar, t0)
            if self._should_stop(k):
                break
        wall = time.perf_counter() - t0
        if bar is not None:
            bar.close()
        opt.finalize()
        if self.stopped is not None:
            self.metrics.close()
            return {"stopped_at": self.stopped, "checkpoint_dir": str(self.ckpt_dir)}
        return self._finish(wall, opt.step_count, opt.step_count - first)

    def _warm_up(self) -> None:
        s = self.s
        idx = torch.from_numpy(s.sampler.indices[: s.sampler.batch_size])
        models.warm_up(self.model, s.dataset.x_train[idx].to(s.device), s.dataset.y_train[idx].to(s.device))
        # the wrapped optimizer's first zero_grad pays for torch's lazy set-up too (about 0.2 s)
        self.opt.zero_grad()

    def _adopt(self, record) -> None:
        """A rank died: take over this rank's part of its data shard, so no data is lost."""
        extra = repair.adopted_indices(self.s.shards, record.failed, record.survivors, self.rank)
        if len(extra):
            s = self.s
            s.sampler = data.ShardSampler(
                np.concatenate([s.sampler.indices, extra]), self.cfg.batch_size, self.cfg.seed, self.rank
            )
        record.adopted = int(len(extra))

    def _should_stop(self, k: int) -> bool:
        """A stop every rank shares: a signal to any rank, or (async) a step or wall-time budget.

        A signal makes every rank checkpoint and leave (continue with --resume); a budget ends the
        run normally. In async mode without --stop each, the first rank to finish its --steps
        ends the run for all, so no rank trains alone against neighbours that have stopped.
        """
        cfg, opt = self.cfg, self.opt
        if stopping.received() is not None:
            opt.request_stop(StopReason.SIGNAL)
        elif Mode(cfg.mode) is Mode.ASYNC:
            out_of_time = self.end_time is not None and time.monotonic() >= self.end_time
            last = k + 1 >= self.s.steps and Stop(cfg.stop) is Stop.FIRST
            if out_of_time or last:
                opt.request_stop(StopReason.BUDGET)
        if not opt.should_stop():
            return False
        if opt.stop_reason is StopReason.SIGNAL:
            self._checkpoint()
            self.stopped = k + 1
            if self.rank == 0:
                # Also on disk: a launcher that was itself signalled may drop the ranks' last output.
                (self.out / "stopped.json").write_text(
                    json.dumps(
                        {
                            "stopped_after_step": k + 1,
                            "signal": stopping.received(),
                            "checkpoint_dir": str(self.ckpt_dir),
                            "continue_with": "--resume",
                        }
                    )
                    + "\n"
                )
                print(
                    f"pcasgd-mpi: stopped by signal after step {k + 1}; checkpoint in {self.ckpt_dir}; "
                    f"continue with --resume",
                    file=sys.stderr,
                    flush=True,
                )
        return True

    def _step(self, k: int, bar, t0: float) -> None:
        cfg, s, opt, model, ds = self.cfg, self.s, self.opt, self.model, self.s.dataset
        t_step = time.perf_counter()
        idx = torch.from_numpy(s.sampler.next_batch())
        xb, yb = ds.x_train[idx].to(s.device, non_blocking=True), ds.y_train[idx].to(s.device, non_blocking=True)
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        if self.slow > 1.0:
            # A slower machine: its gradient is ready later, so is the message made from it. Sleep
            # rather than compute, so that a straggler does not steal the other ranks' cores.
            time.sleep((self.slow - 1.0) * (time.perf_counter() - t_step))
        t_opt = time.perf_counter()
        info = opt.step(closure=lambda: F.cross_entropy(model(xb), yb))
        if self.slow > 1.0:
            time.sleep((self.slow - 1.0) * (time.perf_counter() - t_opt))
        known = [t for t in info.staleness.values() if t is not None]
        self.stale_sum += sum(known)
        self.stale_n += len(known)
        if cfg.log_every and k % cfg.log_every == 0:
            rec = {
                "rank": self.rank,
                "step": k,
                "t": round(time.perf_counter() - t0, 6),
                "loss": round(loss.item(), 6),
                "staleness": {str(n): t for n, t in info.staleness.items()},
            }
            if info.choice is not None:
                rec["choice"] = info.choice
            if info.thetas:
                rec["theta"] = {str(n): round(t, 4) for n, t in info.thetas.items()}
            if opt.scale != 1.0:
                rec["scale"] = round(opt.scale, 4)
            self._log(rec)
        if cfg.eval_every and (k + 1) % cfg.eval_every == 0:
            self._eval(k + 1)
        mean_stale = self.stale_sum / max(self.stale_n, 1)
        if self.board is not None and cfg.log_every and k % cfg.log_every == 0:
            self.board.add_scalar("train/loss", loss.item(), k)
            self.board.add_scalar("train/mean_staleness", mean_stale, k)
        if bar is not None:
            bar.update(1)
            if k % 10 == 0:
                post = {"loss": f"{loss.item():.3f}", "stale": f"{mean_stale:.2f}"}
                if self.last_accuracy is not None:
                    post["acc"] = f"{self.last_accuracy:.3f}"
                bar.set_postfix(post, refresh=False)
        if cfg.checkpoint_every and (k + 1) % cfg.checkpoint_every == 0:
            self._checkpoint()

    def _eval(self, step: int) -> None:
        ds = self.s.dataset
        acc, loss = evaluate(self.model, ds.x_test, ds.y_test)
        rec = {"rank": self.rank, "step": step, "eval": {"agent_accuracy": acc, "agent_loss": loss}}
        if Mode(self.cfg.mode) is Mode.LOCKSTEP or self.opt.algorithm is Algorithm.ALLREDUCE:
            avg_acc, avg_loss, _ = self._average_model_eval()
            rec["eval"] |= {"accuracy": avg_acc, "test_loss": avg_loss, "consensus_distance": self._last_consensus}
        self.last_accuracy = rec["eval"].get("accuracy", acc)
        if self.board is not None:
            for key, value in rec["eval"].items():
                self.board.add_scalar(f"eval/{key}", value, step)
        self._log(rec)

    def _average_model_eval(self):
        avg = self.opt.average()
        self._last_consensus = self.opt.consensus_distance(avg)
        # Evaluation must leave training untouched: parameters, BatchNorm statistics and mode.
        saved = self.opt.parameters_vector.clone()
        buffers = [b.clone() for b in self.model.buffers()]
        was_training = self.model.training
        self.opt.parameters_vector.copy_(avg)
        # BatchNorm statistics are local; the average model gets its own from training data.
        models.recalibrate_bn(self.model, self.s.dataset.x_train[:BN_CALIBRATION_SAMPLES].to(self.s.device))
        acc, loss = evaluate(self.model, self.s.dataset.x_test, self.s.dataset.y_test)
        digest = model_sha256(self.model)
        self.opt.parameters_vector.copy_(saved)
        with torch.no_grad():
            for b, kept in zip(self.model.buffers(), buffers):
                b.copy_(kept)
        self.model.train(was_training)
        return acc, loss, digest

    def _finish(self, wall: float, steps: int, done: int) -> dict | None:
        ds, opt = self.s.dataset, self.opt
        comm = opt.collective_comm  # every rank, or the survivors of a failure
        agent_acc, _ = evaluate(self.model, ds.x_test, ds.y_test)
        acc, loss, digest = self._average_model_eval()
        self.metrics.close()
        if self.board is not None:
            self.board.add_scalar("final/accuracy", acc, steps)
            self.board.close()
        per_rank = collectives.allgather_object(
            comm,
            {
                "rank": self.rank,
                "steps": steps,
                "device": str(self.s.device),
                # where the rank ran: a multi-node job's placement, and the local rank its device follows
                "node": MPI.Get_processor_name(),
                "local_rank": self.s.local_rank,
                "cuda_aware": self.s.cuda_aware.to_dict(),
                "transport": opt.transport_name,
                "done": done,
                "wall_time_s": wall,
                "agent_accuracy": agent_acc,
                "staleness": {
                    str(n): {str(t): c for t, c in sorted(h.items(), key=lambda kv: (kv[0] == NEVER, str(kv[0])))}
                    for n, h in opt.staleness_histogram.items()
                },
                "pv_wins": opt.pv_wins,
                "beyond_horizon": beyond_horizon(opt.staleness_histogram, opt.horizon),
                "exchange": opt.exchange_stats(),
                "non_finite": {str(n): c for n, c in sorted(opt.non_finite.items())},
                "av": opt.av_state(),
                "clock_offset_s": opt.clock_offset,
                "scale": opt.scale,
                "repairs": [r.to_dict() for r in opt.repairs],
                "diverged_at": opt.diverged_at,
            },
            time.monotonic() + self.cfg.timeout,
            "not every rank reported its results",
        )
        if comm.Get_rank() != 0:
            return {"failed_ranks": opt.failed_ranks} if opt.failed_ranks else None
        summary = {
            "algorithm": opt.algorithm.value,
            "mode": opt.mode.value,
            "world_size": self.world.size,
            "topology": self.cfg.topology,
            "spectral_gap": self.world.spectral_gap,
            "delay": str(opt.delay),
            "dataset": self.cfg.dataset,
            "model": self.cfg.model,
            "steps": [p["steps"] for p in per_rank],
            "wall_time_s": max(p["wall_time_s"] for p in per_rank),
            "steps_per_second": [p["done"] / p["wall_time_s"] for p in per_rank],
            "final_accuracy": acc,
            "final_test_loss": loss,
            "agent_accuracies": [p["agent_accuracy"] for p in per_rank],
            "consensus_distance": self._last_consensus,
            "staleness_histogram": {str(p["rank"]): p["staleness"] for p in per_rank},
            # per rank and neighbour: the share of steps its copy was past the horizon (or missing)
            "beyond_horizon": {str(p["rank"]): p["beyond_horizon"] for p in per_rank},
            "slope": str(self.cfg.slope),
            "link_delay": list(self.cfg.link_delay),
            "balance": str(self.cfg.balance),
            "stop": str(self.cfg.stop) if opt.mode is Mode.ASYNC else None,
            "duration": self.cfg.duration,
            "step_scale": [p["scale"] for p in per_rank],
            "clock_offsets_s": [p["clock_offset_s"] for p in per_rank],
            "pv_wins": {side: sum(p["pv_wins"][side] for p in per_rank) for side in ("predict", "clip")},
            "exchange": [p["exchange"] for p in per_rank],
            # per rank: how many steps each neighbour's message was left out for inf/NaN values
            "non_finite_left_out": [p["non_finite"] for p in per_rank],
            "model_sha256": digest,
            "devices": [p["device"] for p in per_rank],
            "nodes": [p["node"] for p in per_rank],
            "local_ranks": [p["local_rank"] for p in per_rank],
            "cuda_aware": per_rank[0]["cuda_aware"],
            "transports": [p["transport"] for p in per_rank],
            "out": str(self.out),
        }
        if opt.fault_tolerant:
            summary["survivors"] = [p["rank"] for p in per_rank]
            summary["failed_ranks"] = opt.failed_ranks
            # per repair: who died at which step, the edges that closed the holes, and the samples
            # of the dead ranks' shards each survivor took over
            summary["repairs"] = [
                dict(
                    r,
                    adopted_samples={
                        str(p["rank"]): p["repairs"][i]["adopted_samples"] for p in per_rank if i < len(p["repairs"])
                    },
                )
                for i, r in enumerate(per_rank[0]["repairs"])
            ]
        if opt.algorithm is Algorithm.PC_ASGD_AV:
            summary["av"] = {str(p["rank"]): p["av"] for p in per_rank}
        # --on-diverge continue: the ranks whose weights became inf or NaN, and at which step
        summary["diverged"] = {str(p["rank"]): p["diverged_at"] for p in per_rank if p["diverged_at"] is not None}
        summary = finite_json(summary)
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        (self.out / "stopped.json").unlink(missing_ok=True)  # a resumed run that finished
        merge_metrics(self.out, [p["rank"] for p in per_rank])
        return summary
