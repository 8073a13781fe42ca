"""Which directories a run may write into, so that no file of the user's is ever overwritten.

`--out DIR` may be new, empty, or a directory this project made (it holds the MARKER file,
written before anything else). An earlier run there that finished needs --overwrite (its outputs
are removed first) or --resume; one that was interrupted (checkpoints, no summary) needs one of
the two as well, so old checkpoints never mix with a new run's. Called on rank 0 only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from enum import Enum
from pathlib import Path

MARKER = ".pcasgd-run"
# What a run writes into its directory; --overwrite removes these and nothing else.
OUTPUTS = ("config.yaml", "metrics.jsonl", "metrics", "summary.json", "stopped.json", "checkpoints", "tensorboard")
_CHECKPOINT = re.compile(r"^rank-\d+$")


class RunDirError(ValueError):
    """A run directory that must not be used as asked; one line naming it and what to do."""


class State(Enum):
    NEW = "new"  # does not exist or is empty
    OURS = "ours"  # an earlier run's directory with nothing worth keeping (no summary, no checkpoints)
    FINISHED = "finished"
    INTERRUPTED = "interrupted"


def has_checkpoints(folder: Path) -> bool:
    """Whether `folder` holds per-rank checkpoint folders with at least one checkpoint file."""
    if not folder.is_dir():
        return False
    return any(_CHECKPOINT.match(d.name) and d.is_dir() and any(d.glob("step-*.pt")) for d in folder.iterdir())


def inspect(out: Path, checkpoint_dir: Path) -> State:
    """What `out` holds; raises RunDirError for a file or a directory of someone else's files."""
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out} is a file, not a directory; choose another --out")
    if not out.exists() or not any(out.iterdir()):
        return State.NEW
    if not (out / MARKER).is_file():
        raise RunDirError(f"--out {out} holds files that pcasgd-mpi did not write; choose another --out or empty it")
    if (out / "summary.json").exists():
        return State.FINISHED
    if has_checkpoints(checkpoint_dir):
        return State.INTERRUPTED
    return State.OURS


def prepare(
    out: str | Path, checkpoint_dir: str | Path | None = None, *, overwrite: bool = False, resume: bool = False
) -> Path:
    """Check the rules, create the directory, mark it as ours and (with overwrite) clear our outputs."""
    out = Path(out)
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else out / "checkpoints"
    state = inspect(out, ckpt)
    if state is State.FINISHED and not (overwrite or resume):
        raise RunDirError(f"--out {out} already holds a finished run; choose another --out or pass --overwrite")
    if state is State.INTERRUPTED and not (overwrite or resume):
        raise RunDirError(
            f"--out {out} holds an interrupted run: pass --resume to continue it or --overwrite to start afresh"
        )
    if checkpoint_dir is not None:
        _check_checkpoint_dir(ckpt, overwrite=overwrite, resume=resume)
    _make(out, "--out")
    _write_marker(out)
    if overwrite:
        for name in OUTPUTS:
            _remove(out / name)
        if checkpoint_dir is not None:
            for d in ckpt.glob("rank-*"):
                if _CHECKPOINT.match(d.name):
                    for f in d.glob("step-*.pt"):
                        f.unlink(missing_ok=True)
    if checkpoint_dir is not None:
        _make(ckpt, "--checkpoint-dir")
    return out


def _check_checkpoint_dir(ckpt: Path, *, overwrite: bool, resume: bool) -> None:
    if ckpt.exists() and not ckpt.is_dir():
        raise RunDirError(f"--checkpoint-dir {ckpt} is a file, not a directory; choose another --checkpoint-dir")
    if has_checkpoints(ckpt) and not (overwrite or resume):
        raise RunDirError(
            f"--checkpoint-dir {ckpt} holds checkpoints of an earlier run: pass --resume to "
            f"continue it, --overwrite to start afresh, or choose another --checkpoint-dir"
        )


def _make(folder: Path, option: str) -> None:
    """Create `folder` and prove it writable now, rather than fail on every rank in the middle of training."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise RunDirError(f"{option} {folder} cannot be written ({reason}); choose a writable place") from None


def _write_marker(out: Path) -> None:
    marker = out / MARKER
    if not marker.exists():
        try:
            marker.write_text(json.dumps({"format": "pcasgd-mpi-run/1"}) + "\n")
        except OSError as exc:
            raise RunDirError(f"--out {out} cannot be written ({exc.strerror}); choose a writable place") from None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        os.unlink(path)
