"""Running a grid: every missing run, one after another in the same MPI job, then the report.

Starting an MPI job costs seconds while a small run costs about as much, so the runs share the
processes. Every run writes OUT/runs/<name>/; a run whose summary.json exists is not run again,
so a grid that was stopped resumes where it was.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .config import TrainConfig
from .grid import Grid, GridError
from .plot import read_config
from .report import write_report

# Options that change neither the trajectory nor the results of a finished run.
_BOOKKEEPING = (
    "out",
    "progress",
    "overwrite",
    "resume",
    "threads",
    "timeout",
    "checkpoint_every",
    "checkpoint_dir",
    "keep_checkpoints",
    "on_diverge",
)


def _existing_run(run_dir: Path, fields: dict) -> str | None:
    """'done' when the run finished with the same configuration; None when it must be run.

    A finished run made with other settings is an error, not a skip: mixing it into the tables
    would report numbers for a configuration the grid does not describe.
    """
    if not (run_dir / "summary.json").exists():
        return None
    saved = read_config(run_dir)
    if not saved:
        return None
    differ = TrainConfig(**fields).first_difference(saved, ignore=_BOOKKEEPING)
    if differ:
        key, there, here = differ
        raise GridError(
            f"{run_dir} holds a finished run with other settings ({key}: {there!r} there, "
            f"{here!r} in the grid); use another --out or delete that run"
        )
    return "done"


def run_grid(grid: Grid, out: Path, comm, log=print) -> None:
    """Collective: run every missing run of the grid, then write the report on rank 0."""
    from .trainer import run

    rank, size = comm.Get_rank(), comm.Get_size()
    if size != grid.ranks:
        raise GridError(
            f"{grid.path}: the grid is for {grid.ranks} ranks but the job has {size}; "
            f"launch with mpirun -n {grid.ranks}"
        )
    runs = grid.runs()
    if rank == 0:
        (out / "runs").mkdir(parents=True, exist_ok=True)
        (out / "grid.json").write_text(json.dumps(grid.describe(), indent=2) + "\n")
        log(f"{grid.name}: {len(runs)} runs on {size} ranks, results in {out}")
    t_start = time.perf_counter()
    for i, spec in enumerate(runs, 1):
        run_dir = out / "runs" / spec.name
        fields = spec.train_fields(grid.base, run_dir)
        status = None
        if rank == 0:
            try:
                status = _existing_run(run_dir, fields)
            except GridError as exc:
                status = exc
        status = comm.bcast(status, root=0)
        if isinstance(status, GridError):
            raise status
        t0 = time.perf_counter()
        if status == "done":
            if rank == 0:
                acc = json.loads((run_dir / "summary.json").read_text())["final_accuracy"]
                log(f"[{i}/{len(runs)}] {spec.name}: accuracy {acc:.4f} (finished earlier, skipped)")
            continue
        # A run directory without a summary is one this grid started and was stopped in: start it again.
        summary = run(TrainConfig(**fields, overwrite=True), comm)
        if rank == 0:
            diverged = summary.get("diverged")
            log(
                f"[{i}/{len(runs)}] {spec.name}: accuracy {summary['final_accuracy']:.4f} "
                f"({time.perf_counter() - t0:.1f} s)" + (f"; ranks {', '.join(diverged)} diverged" if diverged else "")
            )
    comm.Barrier()
    if rank == 0:
        log(f"all runs done in {time.perf_counter() - t_start:.0f} s; writing the report")
        write_report(grid, out)
        log(f"report: {out / 'results.md'}")
