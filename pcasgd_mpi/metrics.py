"""What a run measures and writes: test accuracy, the model's hash, metric files, the progress bar."""

from __future__ import annotations

import hashlib
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import TrainConfig
from .optimizer import NEVER


def finite_json(value):
    """``value`` with every inf or NaN float replaced by None: strict JSON, which a diverged run's
    losses would otherwise break (json writes them as bare NaN, which other readers reject)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 512) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of the model on (x, y), in eval mode."""
    was_training = model.training
    model.eval()
    correct, loss = 0, 0.0
    device = next(model.parameters()).device
    for i in range(0, len(y), batch):
        xb, yb = x[i : i + batch].to(device), y[i : i + batch].to(device)
        logits = model(xb)
        loss += float(F.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(1) == yb).sum())
    model.train(was_training)
    return correct / len(y), loss / len(y)


def model_sha256(model: torch.nn.Module) -> str:
    """sha256 of the parameters as little-endian float32 bytes in state_dict order."""
    h = hashlib.sha256()
    params = dict(model.named_parameters())
    for name in model.state_dict():
        if name in params:
            h.update(params[name].detach().cpu().float().numpy().astype("<f4").tobytes())
    return h.hexdigest()


def beyond_horizon(histogram: dict, horizon: int) -> dict[str, float]:
    out = {}
    for n, h in histogram.items():
        total = sum(h.values())
        past = sum(c for t, c in h.items() if t == NEVER or t > horizon)
        out[str(n)] = round(past / total, 4) if total else 0.0
    return out


def metrics_before(path: Path, step: int) -> str:
    """The metric lines of steps before `step`: a resumed run redoes the later ones."""
    if not path.exists():
        return ""
    keep = [
        line for line in path.read_text().splitlines(keepends=True) if line.strip() and _before(json.loads(line), step)
    ]
    return "".join(keep)


def _before(record: dict, step: int) -> bool:
    # An eval line of step e was written after step e - 1 finished.
    return record.get("step", 0) <= step if "eval" in record else record.get("step", 0) < step


def merge_metrics(out: Path, ranks: list[int]) -> None:
    with open(out / "metrics.jsonl", "w") as merged:
        for r in ranks:
            with open(out / "metrics" / f"rank-{r}.jsonl") as part:
                merged.write(part.read())


def progress(cfg: TrainConfig, total: int, rank: int):
    if rank != 0 or not cfg.progress:
        return None
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=f"{cfg.algorithm} [{cfg.mode}] rank 0",
        unit="step",
        dynamic_ncols=True,
        mininterval=0.5,
        file=sys.stderr,
    )
