"""`pcasgd-mpi` with an exception injected on one rank at one step (for the no-hang test)."""

import os
import sys

import pcasgd_mpi.optimizer as optimizer
from pcasgd_mpi import cli

FAIL_RANK, FAIL_STEP = int(os.environ["FAIL_RANK"]), int(os.environ["FAIL_STEP"])
_step = optimizer.DistributedOptimizer.step


def step(self, closure=None):
    if self.world.rank == FAIL_RANK and self.step_count == FAIL_STEP:
        raise RuntimeError(f"injected failure at step {FAIL_STEP}")
    return _step(self, closure)


optimizer.DistributedOptimizer.step = step
sys.exit(cli.main(sys.argv[1:]))
