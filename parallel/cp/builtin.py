"""The built-in context-parallel strategies: TokenRing, ring attention and Ulysses, and the two-dimensional
Ulysses x ring and Ulysses x TokenRing.

Their kernels are ``attention.py``'s (``two_dim.py`` wires the 2-D ones); their cost is ``cost.py``'s model of
that code. Imported on first use through :data:`loomtrain.parallel.cp.CP_STRATEGIES` (config validation needs
no torch).
"""
from __future__ import annotations

from loomtrain.parallel.cp import cost


class _Builtin:
    needs_reverse_group = False
    overlaps_compute = True

    def __init__(self, name: str):
        self.name = name

    def unsupported(self, heads: int, kv_heads: int, world: int) -> str | None:
        return None

    def document_pieces(self, world: int) -> int:
        """Pieces per document under ``parallel.cp_layout: zigzag_documents`` (``doc_layout.py``): the ring's 2W
        chunks."""
        return 2 * world

    def bytes_per_rank(self, shape) -> tuple[float, float]:
        return cost.bytes_per_rank(shape)[self.name]

    def seconds(self, shape, bandwidth, latency, flops, topology="full_mesh") -> float:
        return cost.predict_seconds(shape, bandwidth, latency, flops, topology)[self.name]

    def make(self, group, *, reverse_group=None, layout="zigzag", comm=None, kernel="auto"):
        from loomtrain.parallel.cp.attention import ContextParallelAttention

        return ContextParallelAttention(self.name, group, reverse_group=reverse_group, layout=layout, comm=comm,
                                        kernel=kernel)

    def __repr__(self) -> str:
        return self.name


class TokenRing(_Builtin):
    """Q travels one way round the ring, partial results return the other way (on their own group)."""

    needs_reverse_group = True


class Ulysses(_Builtin):
    """All-to-all to whole sequences of a slice of the heads, local attention, all-to-all back. Nothing
    overlaps compute, and each rank needs whole heads: query and key/value heads divisible by the group."""

    overlaps_compute = False

    def unsupported(self, heads: int, kv_heads: int, world: int) -> str | None:
        if heads % world or kv_heads % world:
            return f"ulysses needs heads ({heads}) and kv heads ({kv_heads}) divisible by {world} ranks"
        return None

    def document_pieces(self, world: int) -> int:
        """1: every rank attends over the whole sequence (its heads), balanced whatever the documents."""
        return 1


TOKENRING = TokenRing("tokenring")
RING = _Builtin("ring")  # Q stays, K/V travel one hop per step
ULYSSES = Ulysses("ulysses")


class UlyssesAcross:
    """Ulysses inside groups of ``ulysses`` (U) consecutive cp ranks, ``outer`` (ring | tokenring) across the W/U
    groups (``two_dim.py``). The registered instances have no U (:meth:`unsupported` says so, so ``auto`` and
    adaptive sp pass them by); a run binds the configured ``parallel.cp_ulysses`` with :meth:`with_ulysses`.

    - :meth:`sub_groups`: the rank sets of one cp group it needs as process groups (inner, outer, and the outer
      TokenRing's return direction); ``parallel.cp.build`` creates them for every cp group and hands this
      rank's to :meth:`make`.
    - cost (``cost.two_dim_*``): the all-to-all inside a group on ``inner_bandwidth`` (the fast links; None: the
      same as across), the outer ring across groups on the link that ``seconds`` is given.
    """

    needs_reverse_group = False
    overlaps_compute = True  # the outer ring's hops hide behind compute (the all-to-all does not: in the cost)

    def __init__(self, name: str, outer, ulysses: int = 0, inner_bandwidth: float | None = None):
        self.name, self.outer, self.ulysses, self.inner_bandwidth = name, outer, ulysses, inner_bandwidth

    def with_ulysses(self, ulysses: int, inner_bandwidth: float | None = None) -> "UlyssesAcross":
        """This strategy with U = ``ulysses`` (and the link inside a group, for the cost model)."""
        return type(self)(self.name, self.outer, ulysses, inner_bandwidth)

    def unsupported(self, heads: int, kv_heads: int, world: int) -> str | None:
        u = self.ulysses
        if not u:
            return f"{self.name} needs parallel.cp_ulysses (the Ulysses group size U: 1 < U < cp, dividing cp)"
        if u == 1:
            return f"cp_ulysses 1 leaves no Ulysses dimension: use parallel.cp_impl={self.outer.name}"
        if u == world:
            return f"cp_ulysses = cp ({world}) leaves no {self.outer.name} dimension: use parallel.cp_impl=ulysses"
        if u < 1 or world % u:
            return (f"cp_ulysses {u} must divide cp ({world}) and be below it"
                    + (" (a two-dimensional split needs cp >= 4)" if world < 4 else ""))
        if heads % u or kv_heads % u:
            return (f"{self.name} splits heads over cp_ulysses {u} ranks: needs heads ({heads}) and kv heads "
                    f"({kv_heads}) divisible by {u} (cp_ulysses x tp must divide model.n_kv_heads)")
        return None

    def sub_groups(self, ranks: list[int]) -> dict[str, list[list[int]]]:
        from loomtrain.parallel.cp.two_dim import rank_sets

        inner, outer = rank_sets(ranks, self.ulysses)
        return {"inner": inner, "outer": outer, **({"outer_reverse": outer} if self.outer.needs_reverse_group else {})}

    def document_pieces(self, world: int) -> int:
        """2W/U: the outer ring's chunks (Ulysses inside a group splits heads, balanced whatever the documents)."""
        return 2 * world // self.ulysses

    def bytes_per_rank(self, shape) -> tuple[float, float]:
        return cost.two_dim_bytes(shape, self.ulysses, self.outer.name)

    def seconds(self, shape, bandwidth, latency, flops, topology="full_mesh") -> float:
        return cost.two_dim_seconds(shape, self.ulysses, self.outer.name, bandwidth, self.inner_bandwidth or bandwidth,
                                    latency, flops, topology)

    def make(self, group, *, reverse_group=None, layout="zigzag", comm=None, kernel="auto", sub_groups=None):
        """``sub_groups``: this rank's {name: process group} of :meth:`sub_groups` (``parallel.cp.build``); None
        creates them, which is collective over the world: only for a group of the whole world."""
        import torch.distributed as dist

        from loomtrain.parallel.cp import extra_groups
        from loomtrain.parallel.cp.two_dim import TwoDimAttention

        if sub_groups is None:
            if group is not None and dist.get_world_size(group) != dist.get_world_size():
                raise ValueError(f"{self.name}: pass sub_groups for a cp group smaller than the world "
                                 f"(loomtrain.parallel.cp.build creates them)")
            sub_groups = extra_groups(self, [list(range(dist.get_world_size()))])[1]
        return TwoDimAttention(self.outer.name, group, inner_group=sub_groups["inner"],
                               outer_group=sub_groups["outer"], outer_reverse_group=sub_groups.get("outer_reverse"),
                               layout=layout, comm=comm, kernel=kernel)

    def __repr__(self) -> str:
        return f"{self.name} (cp_ulysses {self.ulysses})" if self.ulysses else self.name


ULYSSES_RING = UlyssesAcross("ulysses_ring", RING)
ULYSSES_TOKENRING = UlyssesAcross("ulysses_tokenring", TOKENRING)
