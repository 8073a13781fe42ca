"""Shared pieces of the benchmark parts: the result line the driver collects, and statistics.

Every part prints exactly one line ``BENCH_JSON {...}`` on rank 0; the driver (run.py) picks it
out of the output, so the parts can print anything else they like.

A goal compares two sides, A (the reference) and B. On a shared machine the speed of a core
changes from one second to the next, so the sides are timed in interleaved pairs, A B A B ...,
and the ratio is taken pair by pair: both halves of a pair saw nearly the same machine. The
median of those ratios is the measurement, their quartiles and extremes its spread.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# `python benchmarks/x.py` puts benchmarks/ first on sys.path, not the checkout: without this an
# installed copy of pcasgd_mpi elsewhere would be the one measured.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MARKER = "BENCH_JSON "


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="a few seconds instead of a minute")
    return parser.parse_args()


def run_meta(started: float, load_start: tuple[float, float, float]) -> dict:
    """What a benchmark's JSON records about its own run: command, cores, load at both ends, minutes."""
    return {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "nproc": os.cpu_count(),
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "minutes": (time.time() - started) / 60,
    }


def emit(record: dict) -> None:
    record.setdefault("load_average", list(os.getloadavg()))
    print(MARKER + json.dumps(record), flush=True)


def median(values) -> float:
    return float(statistics.median(values))


def ms(seconds: float) -> float:
    return round(seconds * 1e3, 4)


@dataclass
class Pairs:
    """Timings of two sides taken in interleaved pairs; ``order`` is the sequence as it ran."""

    a: list[float] = field(default_factory=list)
    b: list[float] = field(default_factory=list)
    order: str = ""

    def ratios(self, *, inverse: bool = False) -> list[float]:
        """b/a per pair (a time ratio); ``inverse``: a/b (a bandwidth ratio from times)."""
        return [(ta / tb) if inverse else (tb / ta) for ta, tb in zip(self.a, self.b)]

    def summary(self, *, inverse: bool = False) -> dict:
        return spread(self.ratios(inverse=inverse)) | {"order": self.order}


def interleave(side_a: Callable[[], float], side_b: Callable[[], float], pairs: int, *, warmup: int = 1) -> Pairs:
    """Runs A then B, ``pairs`` times after ``warmup`` untimed pairs. A side returns the seconds
    it measured itself, so that it can leave its set-up out (see ``timed``)."""
    for _ in range(warmup):
        side_a()
        side_b()
    out = Pairs()
    for _ in range(pairs):
        for side, times, name in ((side_a, out.a, "A"), (side_b, out.b, "B")):
            seconds = side()
            if type(seconds) is not float:  # a side that returns something else is a bug here
                raise TypeError(f"side {name} returned {seconds!r}, not its time in seconds")
            times.append(seconds)
            out.order += name
    return out


def timed(f: Callable[[], object]) -> Callable[[], float]:
    """A side that times the whole call of f."""

    def side() -> float:
        t0 = time.perf_counter()
        f()
        return time.perf_counter() - t0

    return side


def spread(values: list[float]) -> dict:
    """Median, quartiles, extremes and count: the ratio and how far single pairs strayed."""
    # inclusive: the quartiles stay within the measured range, also for a handful of pairs
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else (values[0],) * 3
    return {
        "median": median(values),
        "q1": float(q1),
        "q3": float(q3),
        "min": float(min(values)),
        "max": float(max(values)),
        "pairs": len(values),
    }
