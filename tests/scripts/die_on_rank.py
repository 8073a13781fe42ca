"""`pcasgd-mpi` where one rank is killed (SIGKILL, no clean-up) at one step: a hardware failure."""

import os
import signal
import sys

import pcasgd_mpi.optimizer as optimizer
from pcasgd_mpi import cli

DIE_RANK, DIE_STEP = int(os.environ["DIE_RANK"]), int(os.environ["DIE_STEP"])
_step = optimizer.DistributedOptimizer.step


def step(self, closure=None):
    if self.world.rank == DIE_RANK and self.step_count == DIE_STEP:
        os.kill(os.getpid(), signal.SIGKILL)
    return _step(self, closure)


optimizer.DistributedOptimizer.step = step
sys.exit(cli.main(sys.argv[1:]))
