"""Grids of lockstep runs in one MPI job, and their tables and figures.

`pcasgd-mpi experiment GRID.yaml [--out DIR]` (or `mpirun -n N python -m pcasgd_mpi.experiment
GRID.yaml`) runs every combination of the grid's axes with the trainer, one after another in the
same processes. Every run writes DIR/runs/<name>/; a stopped grid resumes where it was. Rank 0 then
writes DIR/results.md, DIR/results.json and the figures. Started without mpirun, the command starts
its own job of the grid's `ranks`.

The grid file is described in `pcasgd_mpi.grid`; running it in `pcasgd_mpi.runner`; the tables in
`pcasgd_mpi.aggregation` and `pcasgd_mpi.report`; the figures in `pcasgd_mpi.plot`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .grid import Grid, GridError, load_grid
from .launch import TIMED_OUT, abort_job, env_rank, run_under_mpirun, under_launcher

PROG = "pcasgd-mpi experiment"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="GRID.yaml", help="grid file (its keys: python -m pydoc pcasgd_mpi.grid)")
    parser.add_argument("--out", default=None, help="results directory (default: runs/<grid name>)")
    parser.add_argument(
        "--job-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="time limit of the MPI job when it is launched from here (default: the grid's 'job_timeout', else 3600)",
    )
    parser.add_argument("--list", action="store_true", help="print the runs of the grid and exit")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="write results.md, results.json and the figures from the finished runs; run nothing",
    )


def main(args: argparse.Namespace) -> int:
    rank = env_rank() or 0
    try:
        grid = load_grid(args.config)
    except GridError as exc:
        if rank == 0:
            print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path("runs") / grid.name
    if args.list:
        if rank == 0:
            for i, spec in enumerate(grid.runs(), 1):
                print(f"{i:4d} {spec.name}")
        return 0
    if args.report_only:
        if rank == 0:
            from .report import write_report

            write_report(grid, out)
            print(f"report: {out / 'results.md'}")
        return 0
    if not under_launcher() and grid.ranks > 1:
        return _relaunch(grid, args.config, out, args.job_timeout or grid.timeout)
    from mpi4py import MPI

    from .runner import run_grid
    from .trainer import SetupError

    try:
        run_grid(grid, out, MPI.COMM_WORLD, log=lambda msg: print(msg, flush=True))
    except (GridError, SetupError) as exc:
        # Both are raised on every rank alike (the check is shared), so nobody is left waiting.
        if MPI.COMM_WORLD.Get_rank() == 0:
            print(f"{PROG}: error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


def _relaunch(grid: Grid, config: str, out: Path, timeout: float) -> int:
    try:
        status = run_under_mpirun(grid.ranks, ["-m", "pcasgd_mpi.experiment", str(config), "--out", str(out)], timeout)
    except RuntimeError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    if status == TIMED_OUT:
        print(
            f"{PROG}: error: the job passed its time limit of {timeout:.0f} s and was stopped; finished "
            f"runs are kept, run the same command again to resume",
            file=sys.stderr,
        )
    return status


def _script() -> int:
    parser = argparse.ArgumentParser(prog="python -m pcasgd_mpi.experiment", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args()
    try:
        return main(args)
    except Exception as exc:  # noqa: BLE001 - one rank failing must not leave the others waiting
        print(f"{PROG} [rank {env_rank() or 0}]: error: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        abort_job(1)
        return 1


if __name__ == "__main__":
    sys.exit(_script())
