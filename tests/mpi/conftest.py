"""Under mpirun: every rank writes its own outcome counts so the launcher can check all of them."""

import json
import os
from collections import Counter

_outcomes: Counter = Counter()


def pytest_runtest_logreport(report):
    if report.when == "call" or report.outcome != "passed":
        _outcomes[report.outcome] += 1


def pytest_sessionfinish(session, exitstatus):
    folder = os.environ.get("PCASGD_TEST_REPORT_DIR")
    if not folder:
        return
    from mpi4py import MPI

    rank = MPI.COMM_WORLD.Get_rank()
    with open(os.path.join(folder, f"rank-{rank}.json"), "w") as f:
        json.dump({"outcomes": dict(_outcomes), "exitstatus": int(exitstatus)}, f)
