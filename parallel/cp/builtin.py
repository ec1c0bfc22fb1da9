"""The built-in context-parallel strategies: TokenRing, ring attention and Ulysses.

Their kernels are ``attention.py``'s; their cost is ``cost.py``'s model of that code. Imported on
first use through :data:`loomtrain.parallel.cp.CP_STRATEGIES` (config validation needs no torch).
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


TOKENRING = TokenRing("tokenring")
RING = _Builtin("ring")  # Q stays, K/V travel one hop per step
ULYSSES = Ulysses("ulysses")
