"""Which ranks share a node, which nodes form an erasure-coding group, and who holds whose chunks.

Every rank's snapshot (its payload) is split into k data chunks and encoded into n = k + m
chunks; chunk j of the member at position i of a *stripe* (one rank per node of an EC group,
the ranks with the same index inside their nodes) is held by the member at (i + j) mod n.
Chunk 0 stays on the rank's own node, so each node holds one chunk of every stripe member
and losing any m nodes of a group still leaves k chunks of every payload.
"""
from __future__ import annotations

from dataclasses import dataclass

from loomtrain.errors import ConfigError

MAX_DATA, MAX_PARITY = 32, 8  # what faulttol.erasure.ReedSolomon supports


def auto_group_nodes(nodes: int, parity: int) -> int:
    """The largest divisor of ``nodes`` that leaves 1 <= k <= MAX_DATA data chunks (else all nodes,
    which ``from_config`` then rejects with a message naming the limit)."""
    for n in range(min(nodes, MAX_DATA + parity), 0, -1):
        if nodes % n == 0 and n > parity:
            return n
    return nodes


@dataclass(frozen=True)
class NodeLayout:
    world: int
    ranks_per_node: int
    group_nodes: int  # n = k + m
    parity: int  # m (0 when a group is a single node: nothing to protect across nodes)
    simulated: bool = False  # nodes are groups of ranks on one host, not hosts
    stride: int = 1  # an EC group's nodes are this far apart (one per rack when it is the nodes per rack)

    @classmethod
    def from_config(cls, ft, world: int, local_world: int) -> NodeLayout:
        rpn = ft.ranks_per_node or local_world
        if rpn < 1 or world % rpn:
            raise ConfigError(f"faulttol.ranks_per_node: must divide the world size {world}, got {rpn}")
        nodes = world // rpn
        parity = ft.ec_parity if nodes > 1 else 0
        n = ft.ec_group_nodes or auto_group_nodes(nodes, parity)
        if n == 1:
            parity = 0
        if nodes % n:
            raise ConfigError(f"faulttol.ec_group_nodes: must divide the number of nodes ({nodes}), got {n}")
        if n > 1 and parity >= n:
            raise ConfigError(f"faulttol.ec_parity: must be smaller than the EC group's {n} nodes, got {parity}")
        stride = ft.ec_group_stride
        if n > 1 and nodes % (n * stride):
            raise ConfigError(f"faulttol.ec_group_stride: groups of {n} nodes every {stride} nodes need a multiple "
                              f"of {n * stride} nodes, have {nodes}")
        if n - parity > MAX_DATA:
            raise ConfigError(f"faulttol.ec_group_nodes: at most {MAX_DATA + parity} nodes per group with "
                              f"ec_parity={parity}, got {n}")
        if ft.inject.kind != "none" and not 0 <= ft.inject.rank < world:
            raise ConfigError(f"faulttol.inject.rank: must be in [0, {world}), got {ft.inject.rank}")
        return cls(world, rpn, n, parity, simulated=bool(ft.ranks_per_node) and ft.ranks_per_node != local_world,
                   stride=stride if n > 1 else 1)

    @property
    def nodes(self) -> int:
        return self.world // self.ranks_per_node

    @property
    def data(self) -> int:  # k
        return self.group_nodes - self.parity

    def node_of(self, rank: int) -> int:
        return rank // self.ranks_per_node

    def node_ranks(self, node: int) -> list[int]:
        return list(range(node * self.ranks_per_node, (node + 1) * self.ranks_per_node))

    def group_of(self, node: int) -> list[int]:
        """The nodes of ``node``'s EC group, in member order: ``group_nodes`` nodes ``stride`` apart inside a
        block of ``group_nodes * stride`` consecutive nodes (stride 1: consecutive nodes)."""
        span = self.group_nodes * self.stride
        first = node // span * span + node % self.stride
        return [first + i * self.stride for i in range(self.group_nodes)]

    def stripe(self, rank: int) -> list[int]:
        """The ranks, one per node of this rank's EC group, that exchange chunks with it (position = member)."""
        local = rank % self.ranks_per_node
        return [node * self.ranks_per_node + local for node in self.group_of(self.node_of(rank))]

    def stripes(self) -> list[list[int]]:
        """Every stripe, in the same order on every rank (for creating their process groups)."""
        return [self.stripe(r) for r in range(self.world) if self.stripe(r)[0] == r]

    def member(self, rank: int) -> int:
        return self.stripe(rank).index(rank)

    def holder(self, rank: int, chunk: int) -> int:
        """The rank whose node keeps chunk ``chunk`` of ``rank``'s payload."""
        s = self.stripe(rank)
        return s[(s.index(rank) + chunk) % len(s)]

    def describe(self) -> str:
        kind = "simulated nodes" if self.simulated else "nodes"
        spread = f", every {self.stride}th node" if self.stride > 1 else ""
        ec = (f"EC groups of {self.group_nodes} nodes{spread} (k={self.data}, m={self.parity}: any {self.parity} "
              f"node(s) per group may be lost)" if self.parity else "no erasure coding (one node per group)")
        return f"{self.nodes} {kind} x {self.ranks_per_node} ranks, {ec}"


def choose_epoch(inventories: list[list[dict]], layout: NodeLayout) -> tuple[tuple[int, int], dict] | None:
    """Newest epoch — by (attempt, epoch): one generation's chunks are never mixed with another's — from
    which every rank can rebuild its payload, and where its chunks are.

    ``inventories[h]`` lists the committed, verified entries holder rank ``h`` has (already filtered to
    this run and configuration): ``{"attempt", "step", "src", "chunk", ...}``. Returns
    ``((attempt, epoch), sources)`` with ``sources[src] = {chunk: holder}`` (the k chunks to use, data
    chunks preferred), or None.
    """
    generations = sorted({(int(e["attempt"]), int(e["step"])) for inv in inventories for e in inv}, reverse=True)
    k = layout.data
    for generation in generations:
        found: dict[int, dict[int, int]] = {r: {} for r in range(layout.world)}
        for holder, inv in enumerate(inventories):
            for entry in inv:
                if (int(entry["attempt"]), int(entry["step"])) == generation and \
                        0 <= entry["src"] < layout.world and 0 <= entry["chunk"] < layout.group_nodes:
                    # Any holder serves: after hosts were renumbered or replaced, chunks are not where
                    # layout.holder would put them now (their CRCs were checked by the holder).
                    found[entry["src"]].setdefault(entry["chunk"], holder)
        if all(len(chunks) >= k for chunks in found.values()):
            return generation, {src: dict(sorted(chunks.items())[:k]) for src, chunks in found.items()}
    return None
