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
@pytest.mark.parametrize("algorithm, mode", [("pc-asgd-pv", "async"), ("pc-asgd-av", "lockstep")])
def test_users_own_loop_trains_with_the_distributed_optimizer(algorithm, mode):
    accuracy = _example().main(steps=300, algorithm=algorithm, mode=mode)
    assert accuracy > 0.85
