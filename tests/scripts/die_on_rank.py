"""`pcasgd-mpi` where one rank is killed (SIGKILL, no clean-up) at one step: a hardware failure."""

import os
import signal
import sys

from mpi4py import MPI

import pcasgd_mpi.optimizer as optimizer
from pcasgd_mpi import cli

DIE_RANK, DIE_STEP = int(os.environ["DIE_RANK"]), int(os.environ["DIE_STEP"])
_step = optimizer.DistributedOptimizer.step


def step(self, closure=None):
    # The rank in MPI_COMM_WORLD: after a repair the optimizer's own world renumbers the survivors.
    if MPI.COMM_WORLD.Get_rank() == DIE_RANK and self.step_count == DIE_STEP:
        os.kill(os.getpid(), signal.SIGKILL)
    return _step(self, closure)


optimizer.DistributedOptimizer.step = step
sys.exit(cli.main(sys.argv[1:]))
