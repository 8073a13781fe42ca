"""The drop-in optimizer in a user's own loop (examples/own_training_loop.py) under mpirun -n 4."""

import importlib.util
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "own_training_loop.py"


def _example():
    spec = importlib.util.spec_from_file_location("own_training_loop", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.mpi(min_size=2)
def test_users_own_loop_trains_with_the_distributed_optimizer_in_lockstep():
    # Lockstep is deterministic: the same seeds give the same accuracy every time, so a bar cannot flake.
    accuracy = _example().main(steps=300, algorithm="pc-asgd-av", mode="lockstep")
    assert accuracy > 0.85


@pytest.mark.mpi(min_size=2)
def test_users_own_loop_runs_asynchronously_and_every_rank_gets_the_same_average():
    # Async accuracy depends on timing: check what does not, the average model every rank loads.
    from mpi4py import MPI

    accuracy = _example().main(steps=300, algorithm="pc-asgd-pv", mode="async")
    assert 0.0 <= accuracy <= 1.0
    assert len(set(MPI.COMM_WORLD.allgather(accuracy))) == 1
