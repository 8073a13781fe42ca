"""The MPI world an agent lives in: communicator, graph, mixing weights, its neighbours."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import networkx as nx
import numpy as np
from mpi4py import MPI

from . import topology as topo


@dataclass
class World:
    comm: MPI.Comm
    rank: int
    size: int
    graph: nx.Graph
    W: np.ndarray
    topology: str
    weight_rule: str

    @property
    def neighbours(self) -> list[int]:
        return topo.neighbours(self.graph, self.rank)

    @property
    def self_weight(self) -> float:
        return float(self.W[self.rank, self.rank])

    def weight(self, other: int) -> float:
        return float(self.W[self.rank, other])

    @property
    def spectral_gap(self) -> float:
        return topo.spectral_gap(self.W)

    @cached_property
    def mu_max(self) -> float:
        """The largest |eigenvalue| of I − W (θ by the delay); a repaired graph is a new World."""
        return topo.largest_disagreement_rate(self.W)


def init(topology: str = "ring", weights: str = "metropolis", *, comm: MPI.Comm | None = None, seed: int = 0) -> World:
    """Build the graph for this MPI world (same on every rank: it is a pure function of its inputs)."""
    comm = comm if comm is not None else MPI.COMM_WORLD
    size = comm.Get_size()
    graph = topo.build(topology, size, seed=seed)
    topo.validate(graph, size)
    W = topo.mixing_matrix(graph, weights)
    return World(comm, comm.Get_rank(), size, graph, W, topology, str(weights))
