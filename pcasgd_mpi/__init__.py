"""pcasgd-mpi: decentralized asynchronous training over MPI with PC-ASGD."""

__version__ = "0.1.0"
