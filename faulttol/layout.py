"""Which ranks share a node, which nodes form an erasure-coding group, and who holds whose chunks.

Every rank's snapshot (its payload) is split into k data chunks and encoded into n = k + m
chunks (or, with data-parallel replicas as the redundancy, kept whole by each replica: k = 1);
chunk j of the member at position i of a *stripe* (one rank per node of an EC group, the ranks
with the same index inside their nodes; or a rank's replicas) is held by the member at (i + j) mod n.
Chunk 0 stays on the rank's own node, so each node holds one chunk of every stripe member
and losing any m nodes of a group still leaves k chunks of every payload.
"""
from __future__ import annotations

from dataclasses import dataclass

from loomtrain.errors import ConfigError

MAX_DATA, MAX_PARITY = 32, 8  # what faulttol.erasure.ReedSolomon supports


def spread_groups(racks: list, n: int) -> list[list[int]]:
    """Nodes (``racks[node]`` = its failure domain: rack, switch or fabric group) in EC groups of ``n``:
    the nodes are dealt round-robin over the racks (first node of every rack, then the second...) and the
    groups cut from that order, so each group takes as few nodes of one rack as the racks allow.
    With every node its own rack the groups are consecutive nodes."""
    by_rack: dict = {}
    for node, rack in enumerate(racks):
        by_rack.setdefault(rack, []).append(node)
    columns = list(by_rack.values())
    dealt = [col[i] for i in range(max(map(len, columns))) for col in columns if i < len(col)]
    # Members in ascending order: a stripe's process group (and so its all_gather) orders ranks that way.
    return [sorted(dealt[i:i + n]) for i in range(0, len(dealt), n)]


def identical_replicas(dims) -> list[list[int]] | None:
    """The dp_replicate groups of ranks when they hold the same state after every step (gradients averaged
    over them every step: dp_sync every_step), else None (local updates: replicas differ)."""
    return dims.groups("dp_replicate") if dims.dp_replicate > 1 and not dims.local_updates else None


def worst_rack_loss(groups: list[list[int]], racks: list) -> int:
    """The most nodes one rack's loss takes from one group."""
    return max((sum(1 for node in g if racks[node] == rack) for g in groups for rack in set(racks)), default=0)


def auto_group_nodes(nodes: int, parity: int, racks: list | None = None) -> int:
    """The largest divisor of ``nodes`` that leaves 1 <= k <= MAX_DATA data chunks (else all nodes,
    which ``from_config`` then rejects with a message naming the limit). With racks known, the largest
    such size whose groups survive the loss of any one rack, when there is one."""
    sizes = [n for n in range(min(nodes, MAX_DATA + parity), 0, -1) if nodes % n == 0 and n > parity]
    if racks is not None and len(set(racks)) > 1:
        tolerant = [n for n in sizes if n > 1 and worst_rack_loss(spread_groups(racks, n), racks) <= parity]
        if tolerant:
            return tolerant[0]
    return sizes[0] if sizes else nodes


@dataclass(frozen=True)
class NodeLayout:
    """Who protects whose snapshot. Two kinds of *stripes* (the ranks that hold each other's chunks, one per
    node): erasure coding (a stripe is the ranks with the same index inside the nodes of an EC group; k data +
    m parity chunks) or data-parallel replicas (a stripe is a rank's dp_replicate peers, whose states are the
    same bytes: each keeps its own copy, nothing is encoded or sent, and any one copy serves all; REFT)."""

    world: int
    ranks_per_node: int
    group_nodes: int  # n = k + m: the stripe's size (replicas: the number of replicas)
    parity: int  # m (0 when a group is a single node: nothing to protect across nodes; replicas: n - 1)
    groups: tuple = ()  # EC groups of nodes, member order (empty with replicas)
    simulated: bool = False  # nodes are groups of ranks on one host, not hosts
    spread: str = ""  # how groups were spread over racks, for describe()
    replicas: tuple = ()  # with redundancy by replicas: every dp_replicate group of ranks

    @classmethod
    def from_config(cls, ft, world: int, local_world: int, *, replicas: list[list[int]] | None = None,
                    racks: list | None = None) -> NodeLayout:
        """``replicas``: the dp_replicate groups of ranks when their states are identical (every-step sync);
        ``racks``: each node's failure domain when the cluster description gives it (placement=fabric)."""
        rpn = ft.ranks_per_node or local_world
        if rpn < 1 or world % rpn:
            raise ConfigError(f"faulttol.ranks_per_node: must divide the world size {world}, got {rpn}")
        nodes = world // rpn
        simulated = bool(ft.ranks_per_node) and ft.ranks_per_node != local_world
        if ft.inject.kind != "none" and not 0 <= ft.inject.rank < world:
            raise ConfigError(f"faulttol.inject.rank: must be in [0, {world}), got {ft.inject.rank}")
        by_replicas = cls._replica_stripes(ft.redundancy, replicas, rpn)
        if by_replicas:
            size = len(by_replicas[0])
            return cls(world, rpn, size, size - 1, simulated=simulated, replicas=by_replicas)
        stride = ft.ec_group_stride
        if stride > 1:
            racks, spread = [node // stride for node in range(nodes)], f"racks of {stride} nodes"
        elif stride == 0 and racks is not None and len(set(racks)) > 1:
            spread = f"{len(set(racks))} fabric groups"
        else:
            racks, spread = list(range(nodes)), ""
        parity = ft.ec_parity if nodes > 1 else 0
        n = ft.ec_group_nodes or auto_group_nodes(nodes, parity, racks)
        if n == 1:
            parity = 0
        if nodes % n:
            raise ConfigError(f"faulttol.ec_group_nodes: must divide the number of nodes ({nodes}), got {n}")
        if n > 1 and parity >= n:
            raise ConfigError(f"faulttol.ec_parity: must be smaller than the EC group's {n} nodes, got {parity}")
        if n - parity > MAX_DATA:
            raise ConfigError(f"faulttol.ec_group_nodes: at most {MAX_DATA + parity} nodes per group with "
                              f"ec_parity={parity}, got {n}")
        groups = spread_groups(racks, n)
        if spread and n > 1 and parity:
            worst = worst_rack_loss(groups, racks)
            if stride > 1 and worst > parity:
                raise ConfigError(f"faulttol.ec_group_stride: groups of {n} nodes over {spread} of {nodes}: one "
                                  f"rack's loss would cost a group {worst} nodes (ec_parity={parity}); use a stride "
                                  f"that divides the nodes into racks the groups can span, or a larger ec_parity")
            spread += "" if worst <= parity else f" (a rack loss costs a group {worst} nodes > ec_parity)"
        return cls(world, rpn, n, parity, tuple(tuple(g) for g in groups), simulated, spread if n > 1 else "")

    @staticmethod
    def _replica_stripes(redundancy: str, replicas, rpn: int) -> tuple:
        """The replica groups as stripes when redundancy by replicas applies (auto: when every rank's replicas
        are on other nodes than it and each other), else ()."""
        if redundancy == "erasure":
            return ()
        usable = bool(replicas) and len(replicas[0]) > 1 and all(
            len({r // rpn for r in group}) == len(group) for group in replicas)
        if redundancy == "replicas" and not usable:
            why = ("needs parallel.dp_replicate > 1 with parallel.dp_sync=every_step (replicas that hold the same "
                   "state)" if not replicas or len(replicas[0]) < 2 else
                   "needs each rank's dp_replicate peers on other nodes (some share one)")
            raise ConfigError(f"faulttol.redundancy: replicas {why}; or use erasure/auto")
        return tuple(tuple(sorted(g)) for g in sorted(replicas, key=min)) if usable else ()

    @property
    def by_replicas(self) -> bool:
        return bool(self.replicas)

    @property
    def nodes(self) -> int:
        return self.world // self.ranks_per_node

    @property
    def data(self) -> int:  # k
        return 1 if self.by_replicas else self.group_nodes - self.parity

    def node_of(self, rank: int) -> int:
        return rank // self.ranks_per_node

    def node_ranks(self, node: int) -> list[int]:
        return list(range(node * self.ranks_per_node, (node + 1) * self.ranks_per_node))

    def group_of(self, node: int) -> list[int]:
        """The nodes of ``node``'s EC group, in member order."""
        return list(next(g for g in self.groups if node in g))

    def stripe(self, rank: int) -> list[int]:
        """The ranks, one per node, that hold each other's chunks (position = member)."""
        if self.by_replicas:
            return list(next(g for g in self.replicas if rank in g))
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
        if self.by_replicas:
            return (f"{self.nodes} {kind} x {self.ranks_per_node} ranks, redundancy by {self.group_nodes} "
                    f"data-parallel replicas on different nodes (no erasure coding: any {self.parity} of a rank's "
                    f"replica nodes may be lost)")
        spread = f", spread over {self.spread}" if self.spread else ""
        ec = (f"EC groups of {self.group_nodes} nodes{spread} (k={self.data}, m={self.parity}: any {self.parity} "
              f"node(s) per group may be lost; memory {self.group_nodes / self.data:.2f}x the state)"
              if self.parity else "no erasure coding (one node per group)")
        return f"{self.nodes} {kind} x {self.ranks_per_node} ranks, {ec}"


def choose_chunks(table, k: int):
    """``table[r, j]``: the lowest rank holding chunk j of rank r's payload for one generation (the world
    size where nobody does), all-reduced with MIN so that every rank sees the same. The k chunks of every
    rank to use (a boolean mask, data chunks first), or None when some rank has fewer than k left (more
    nodes lost than the redundancy covers, or a torn snapshot: then an older generation must serve)."""
    present = table < table.shape[0]
    if not bool((present.sum(dim=1) >= k).all()):
        return None
    return present & (present.cumsum(dim=1) <= k)
