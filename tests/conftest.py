from pathlib import Path

MPI_DIR = Path(__file__).resolve().parent / "mpi"


def pytest_ignore_collect(collection_path, config):
    # tests/mpi only makes sense under mpirun with --with-mpi; test_mpi_suite.py launches it that way.
    path = Path(collection_path).resolve()
    if not config.getoption("with_mpi", default=False) and (path == MPI_DIR or MPI_DIR in path.parents):
        return True
    return None
