"""After ranks die (ULFM, `--fault-tolerant`): a graph for the survivors, and who takes whose data.

Pure functions, no MPI. The survivors keep their graph and close each hole: the surviving
neighbours of a dead rank are joined in a ring (two of them: one edge), so consensus goes on
through them for any topology, and mixing weights are made anew for the repaired graph. The dead
ranks' data shards are split among the survivors, so no data is lost.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx
import numpy as np


@dataclass
class Repair:
    """One repair: at which step, who died, who is left, which edges were added, samples adopted."""

    step: int
    failed: list[int]
    survivors: list[int]
    added_edges: list[tuple[int, int]] = field(default_factory=list)
    adopted: int = 0  # samples this rank took over

    def to_dict(self) -> dict:
        return {
            "step": self.step,
            "failed": self.failed,
            "survivors": self.survivors,
            "added_edges": [list(e) for e in self.added_edges],
            "adopted_samples": self.adopted,
        }


def repair_graph(graph: nx.Graph, dead: list[int]) -> tuple[nx.Graph, list[tuple[int, int]]]:
    """The graph without `dead`, each dead node's surviving neighbours joined in a ring.

    Node names stay the original ranks. Joining the neighbours keeps every path that went
    through a dead node, so a connected graph stays connected unless every node died but one.
    """
    dead_set = set(dead)
    out = graph.copy()
    added: list[tuple[int, int]] = []
    for d in sorted(dead_set):
        around = sorted(n for n in graph.neighbors(d) if n not in dead_set)
        pairs = (
            list(zip(around, around[1:] + around[:1]))
            if len(around) > 2
            else ([(around[0], around[1])] if len(around) == 2 else [])
        )
        for u, v in pairs:
            if not out.has_edge(u, v):
                added.append((min(u, v), max(u, v)))
                out.add_edge(u, v)
    out.remove_nodes_from(dead_set)
    if out.number_of_nodes() > 1 and not nx.is_connected(out):
        # Several dead nodes next to each other can cut it: join the pieces in a chain.
        parts = [sorted(c) for c in nx.connected_components(out)]
        parts.sort()
        for a, b in zip(parts, parts[1:]):
            out.add_edge(a[0], b[0])
            added.append((min(a[0], b[0]), max(a[0], b[0])))
    return out, sorted(set(added))


def relabel(graph: nx.Graph, survivors: list[int]) -> nx.Graph:
    """The repaired graph with nodes renamed to the survivors' new ranks 0..N'-1 (in rank order)."""
    return nx.relabel_nodes(graph, {orig: new for new, orig in enumerate(survivors)}, copy=True)


def adopted_indices(shards: list[np.ndarray], dead: list[int], survivors: list[int], me: int) -> np.ndarray:
    """The samples of the dead ranks' shards that survivor `me` takes over: each dead shard split
    into as many nearly equal parts as there are survivors, part i to the i-th survivor."""
    position = survivors.index(me)
    parts = [np.array_split(np.asarray(shards[d]), len(survivors))[position] for d in sorted(dead)]
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
