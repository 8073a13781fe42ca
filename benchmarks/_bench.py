"""Shared pieces of the benchmark parts: the result line the driver collects, and statistics.

Every part prints exactly one line ``BENCH_JSON {...}`` on rank 0; the driver (run.py) picks it
out of the output, so the parts can print anything else they like.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
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


def emit(record: dict) -> None:
    record.setdefault("load_average", list(os.getloadavg()))
    print(MARKER + json.dumps(record), flush=True)


def median(values) -> float:
    return float(statistics.median(values))


def ms(seconds: float) -> float:
    return round(seconds * 1e3, 4)
