"""Per-rank checkpoints: written atomically, the last K kept, validated before anything is loaded.

Layout: DIR/rank-R/step-000000123.pt. A file is written to a temporary name in the same folder,
fsynced and renamed, so a crash leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

FORMAT = "pcasgd-mpi-checkpoint/1"
_NAME = re.compile(r"^step-(\d+)\.pt$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names its path."""


def rank_dir(root: str | Path, rank: int) -> Path:
    return Path(root) / f"rank-{rank}"


def steps_available(root: str | Path, rank: int) -> list[int]:
    folder = rank_dir(root, rank)
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := _NAME.match(p.name)))


def path_for(root: str | Path, rank: int, step: int) -> Path:
    return rank_dir(root, rank) / f"step-{step:09d}.pt"


def save(root: str | Path, rank: int, step: int, state: dict, keep: int) -> Path:
    folder = rank_dir(root, rank)
    folder.mkdir(parents=True, exist_ok=True)
    final = path_for(root, rank, step)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        torch.save({"format": FORMAT, "rank": rank, "step": step, **state}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself must survive a crash too
    finally:
        os.close(dir_fd)
    for old in steps_available(root, rank)[:-keep] if keep > 0 else []:
        path_for(root, rank, old).unlink(missing_ok=True)
    return final


def _reason(exc: Exception) -> str:
    """Why torch could not read a file, in our words: its own text may advise loading the file
    with weights_only=False, which would run whatever code a hostile file holds."""
    text = str(exc)
    if "weights_only" in text or "Weights only load failed" in text or "Unsupported global" in text:
        return "it holds objects other than tensors and plain data, which are never loaded"
    first = text.splitlines()[0] if text.strip() else "corrupt"
    return f"{type(exc).__name__}: {first}"


def load(root: str | Path, rank: int, step: int, expect: dict) -> dict:
    """Load and check a checkpoint; `expect` maps keys to the values this run requires."""
    path = path_for(root, rank, step)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means the file is unusable
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({_reason(exc)}); delete it or point --checkpoint-dir elsewhere"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a pcasgd-mpi checkpoint")
    for key, want in expect.items():
        if state.get(key) != want:
            raise CheckpointError(
                f"checkpoint {path} was written with a different {key.replace('_', ' ')} "
                f"({state.get(key)!r}, this run has {want!r}); use a matching run or "
                f"another --checkpoint-dir"
            )
    return state
