"""Two-dimensional context parallelism: Ulysses inside groups of U cp ranks, ring or TokenRing across them.

Ulysses sends the fewest bytes but splits heads, so it stops at the number of K/V heads; ring and
TokenRing scale to any cp degree but every hop of a group larger than a node crosses the slow links.
USP (yunchang), Megatron-core's ``a2a+p2p`` and LoongTrain combine them: a cp group of W ranks is cut
into W/U groups of U consecutive cp ranks (the mesh puts consecutive cp ranks on the closest links:
cp sits just outside tp). Inside a group, Ulysses' all-to-all turns each rank's zigzag part of all heads
into the group's parts of 1/U of the heads. The group's parts are exactly one zigzag part of the
sequence cut for W/U ranks (chunks oU..oU+U-1 and their mirror images), so in natural order they are
the input of ring or TokenRing over the W/U ranks that hold the same heads (one per group), unchanged.
The output takes the reverse all-to-all home. Documents are planned once per step over the whole cp
group and cut for the outer ring.

Everything is the 1-D strategies' code (``attention.py``): the Ulysses frame (:func:`heads_exchange`)
around a :class:`ContextParallelAttention` of the outer ring; only the wiring is here.
"""
from __future__ import annotations

from loomtrain.comms.p2p import P2P
from loomtrain.parallel.cp.attention import (ContextParallelAttention, _PlanCache, _check, _chunk_ids,
                                             _group_info, _inverse, _num_chunks, _reorder, gathered_documents,
                                             heads_exchange)


class TwoDimAttention:
    """Attention over a cp group's zigzag (or contiguous) shards, Ulysses over ``inner_group`` (U consecutive
    ranks of ``group``), ``outer`` (ring | tokenring) over ``outer_group`` (the ranks of ``group`` at the same
    place of every inner group; ``outer_reverse_group``: TokenRing's return direction). The call is that of
    :class:`ContextParallelAttention`: this rank's (B, S/W, H, D) shards in, its output shard (and lse) out."""

    def __init__(self, outer: str, group=None, *, inner_group, outer_group, outer_reverse_group=None,
                 layout: str = "zigzag", comm: P2P | None = None, kernel: str = "auto"):
        self.group, self.world, self.rank = _group_info(group)
        self.layout = layout
        self.inner = ContextParallelAttention("ulysses", inner_group, layout=layout, comm=comm, kernel=kernel)
        self.comm, self.kernel = self.inner.comm, self.inner.kernel
        self.outer = ContextParallelAttention(outer, outer_group, reverse_group=outer_reverse_group, layout=layout,
                                              comm=self.comm, kernel=kernel)
        u = self.inner.world
        if (self.outer.world * u, self.inner.rank, self.outer.rank) != (self.world, self.rank % u, self.rank // u):
            raise ValueError(f"two-dimensional cp: rank {self.rank} of {self.world} needs inner groups of {u} "
                             f"consecutive ranks and outer groups of every {u}th (got inner rank {self.inner.rank}, "
                             f"outer rank {self.outer.rank} of {self.outer.world})")
        first = self.rank - self.inner.rank
        # The chunks the inner group holds, in its rank order (the all-to-all's layout), and the order that puts
        # them in the outer ring's layout (natural order: one zigzag part over W/U ranks).
        self.held = tuple(c for r in range(first, first + u) for c in _chunk_ids(r, self.world, layout))
        self.order = tuple(self.held.index(c) for c in sorted(self.held))
        self._plans = _PlanCache()

    def __call__(self, q, k, v, *, causal: bool = True, doc_ids=None, return_lse: bool = False):
        _check(q, k, v, self.layout, self.world)
        docs = gathered_documents(self._plans, doc_ids, self.group, self.layout,
                                  _num_chunks(self.outer.world, self.layout))

        def across(qh, kh, vh, held):
            parts = (_reorder(t, self.order, 1) for t in (qh, kh, vh))
            out, lse = self.outer.run(*parts, causal, docs)
            back = _inverse(self.order)
            return _reorder(out, back, 1), _reorder(lse, back, 2)

        out, lse = heads_exchange(q, k, v, self.inner, self.held, across, return_lse)
        return (out, lse) if return_lse else out


def rank_sets(ranks: list[int], ulysses: int) -> tuple[list[list[int]], list[list[int]]]:
    """(inner groups, outer groups) of one cp group listed in cp order: U consecutive ranks; every U-th."""
    inner = [ranks[i:i + ulysses] for i in range(0, len(ranks), ulysses)]
    outer = [ranks[u::ulysses] for u in range(ulysses)]
    return inner, outer
