"""ULFM's side of a repair: revoke, shrink, and the World the survivors train on next."""

from __future__ import annotations

import networkx as nx
from mpi4py import MPI

from . import repair
from . import topology as topo
from .world import World


def shrink_and_repair(
    exchange, original_group: MPI.Group, graph: nx.Graph, world: World, known_failed: list[int]
) -> tuple[World, list[int], list[int], list[tuple[int, int]], nx.Graph]:
    """Collective among the survivors: (new world, survivors and newly failed ranks by original
    rank, edges added, the repaired graph by original rank).

    The rank that notices a failure first revokes the exchange's communicator, so every survivor's
    next exchange call fails and brings it here too. The shrink is blocking: this Open MPI's
    nonblocking shrink fails with an internal error, and every survivor reaches it at its next step.
    """
    if not exchange.revoked:
        exchange.comm.Revoke()
    comm = exchange.comm.Shrink()
    alive = MPI.Group.Translate_ranks(comm.Get_group(), list(range(comm.Get_size())), original_group)
    survivors = [int(r) for r in alive]
    failed = sorted(set(graph.nodes) - set(survivors) - set(known_failed))
    repaired, added = repair.repair_graph(graph, failed)
    relabelled = repair.relabel(repaired, survivors)
    rule = world.weight_rule if world.weight_rule != "file" else "metropolis"  # file weights lost their graph
    W = topo.mixing_matrix(relabelled, rule)
    new = World(comm, comm.Get_rank(), comm.Get_size(), relabelled, W, world.topology, rule)
    return new, survivors, failed, added, repaired
