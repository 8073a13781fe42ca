"""Test tiers, and the pytest-mpi suite kept out of ordinary sessions.

    python -m pytest                 the fast tier: unit and in-process tests (about a minute)
    python -m pytest -m mpi          tests that start mpirun jobs (tests/mpi runs inside one of them)
    python -m pytest -m slurm        tests that start a Slurm cluster
    python -m pytest -m bench        the benchmark smoke tests
    python -m pytest --all-tiers     every tier in one session: what CI runs

A test belongs to a slow tier by its marker; `-m EXPR` selects by marker as usual and turns the
default selection off.
"""

from pathlib import Path

import pytest

import launch

MPI_DIR = Path(__file__).resolve().parent / "mpi"
SLOW_TIERS = ("mpi", "slurm", "bench")


def pytest_addoption(parser):
    parser.addoption(
        "--all-tiers",
        action="store_true",
        default=False,
        help="run every tier (fast, " + ", ".join(SLOW_TIERS) + "); without it and without -m, only the fast tier runs",
    )


def _under_mpirun(config) -> bool:
    # tests/mpi runs with pytest-mpi's --with-mpi inside an mpirun job that test_mpi_suite.py starts.
    return bool(config.getoption("with_mpi", default=False))


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    if not _under_mpirun(config):
        # Without --with-mpi pytest-mpi skips every test marked `mpi`; outside mpirun those are the
        # tests that start mpirun themselves, and they must run when their tier is asked for.
        for plugin in config.pluginmanager.get_plugins():
            if type(plugin).__name__ == "MPIPlugin":
                config.pluginmanager.unregister(plugin)


def pytest_ignore_collect(collection_path, config):
    path = Path(collection_path).resolve()
    if not _under_mpirun(config) and (path == MPI_DIR or MPI_DIR in path.parents):
        return True
    return None


def _tier(item) -> str | None:
    return next((t for t in SLOW_TIERS if item.get_closest_marker(t) is not None), None)


def pytest_collection_modifyitems(config, items):
    if _under_mpirun(config):
        return
    if config.getoption("all_tiers"):
        if config.args_source is pytest.Config.ArgsSource.TESTPATHS:
            empty = [t for t in SLOW_TIERS if not any(_tier(i) == t for i in items)]
            if empty:
                # CI runs this session: a tier that lost its tests must fail it, not pass it quietly.
                raise pytest.UsageError(
                    f"--all-tiers: no test is marked {', '.join(empty)}; "
                    f"mark the tests of that tier (pytest.mark.<tier>)"
                )
        return
    if config.option.markexpr:
        return
    slow = [i for i in items if _tier(i)]
    if slow:
        items[:] = [i for i in items if not _tier(i)]
        config.hook.pytest_deselected(items=slow)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _under_mpirun(config) or config.getoption("all_tiers") or config.option.markexpr:
        return
    deselected = terminalreporter.stats.get("deselected", [])
    counts = {t: sum(_tier(i) == t for i in deselected) for t in SLOW_TIERS}
    if any(counts.values()):
        tiers = ", ".join(f"{n} {t}" for t, n in counts.items() if n)
        terminalreporter.write_line(f"fast tier only; not run: {tiers} (-m TIER for one tier, --all-tiers for all)")


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    if session.config.getoption("all_tiers", default=False) and exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(autouse=True)
def _launch_needs_a_tier(request):
    """Starting mpirun is allowed only in a test of a slow tier (tests/launch.py refuses otherwise)."""
    launch.LAUNCH_ALLOWED = _tier(request.node) is not None
    yield
    launch.LAUNCH_ALLOWED = True


@pytest.fixture
def single_thread():
    """Tiny tensors: a thread pool only adds overhead, badly so on a busy machine."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
