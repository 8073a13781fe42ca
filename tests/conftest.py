from pathlib import Path

import pytest

MPI_DIR = Path(__file__).resolve().parent / "mpi"


def pytest_ignore_collect(collection_path, config):
    # tests/mpi only makes sense under mpirun with --with-mpi; test_mpi_suite.py launches it that way.
    path = Path(collection_path).resolve()
    if not config.getoption("with_mpi", default=False) and (path == MPI_DIR or MPI_DIR in path.parents):
        return True
    return None


@pytest.fixture
def single_thread():
    """Tiny tensors: a thread pool only adds overhead, badly so on a busy machine."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
