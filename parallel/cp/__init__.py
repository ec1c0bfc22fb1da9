"""Context-parallel attention: the strategy interface, its registry, and the cost model's choice.

A strategy runs attention over the zigzag shards that the ranks of one context-parallel group hold of
each sequence. ``parallel.cp_impl`` names one (or ``auto``: :func:`choose` picks the fastest by the
cost model); the static cp group (``parallel/parallelize.py::apply_cp``), adaptive sequence
parallelism's per-step groups (``parallel/sp``), ``loomtrain plan`` and the cost models all go
through :data:`CP_STRATEGIES`. Built-ins: ``tokenring``, ``ring``, ``ulysses`` (``builtin.py``, over the
kernels of ``attention.py``). A plugin adds one with ``CP_STRATEGIES.add("name", strategy)`` (an instance).
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

from loomtrain.registry import Registry


@runtime_checkable
class ContextParallelStrategy(Protocol):
    """The contract of a context-parallel strategy (stateless: one instance serves every group).

    - ``needs_reverse_group``: :meth:`make` gets a second process group over the same ranks (TokenRing
      returns results on it, so the two directions do not queue behind each other);
    - ``overlaps_compute``: its transfers hide behind attention compute (``plan``'s step model);
    - :meth:`unsupported`: why it cannot split a layer of ``heads`` query and ``kv_heads`` key/value heads
      (this rank's, after tensor parallelism) over ``world`` ranks, or None;
    - :meth:`bytes_per_rank`: (forward, backward) bytes each rank sends for one attention of ``shape``
      (a ``cost.Shape``: full sequence length, this rank's heads, the group size);
    - :meth:`seconds`: modelled forward + backward seconds on links of ``bandwidth`` bytes/s per direction
      and ``latency`` s per transfer, at ``flops`` FLOP/s, on ``topology`` (full_mesh | ring);
    - :meth:`make`: the attention callable for ``group`` (a process group; None = the world):
      ``attention(q, k, v, *, causal=True, doc_ids=None, return_lse=False)`` takes this rank's
      (B, S/W, H, D) zigzag shards (``doc_ids``: (B, S/W) document ids of the same tokens) and returns
      this rank's output shard (and its (B, H, S/W) log-sum-exp with ``return_lse``), with gradients.
    """

    needs_reverse_group: bool
    overlaps_compute: bool

    def unsupported(self, heads: int, kv_heads: int, world: int) -> str | None: ...

    def bytes_per_rank(self, shape) -> tuple[float, float]: ...

    def seconds(self, shape, bandwidth: float, latency: float, flops: float, topology: str) -> float: ...

    def make(self, group, *, reverse_group=None, layout: str = "zigzag", comm=None, kernel: str = "auto"): ...


CP_STRATEGIES = Registry("parallel.cp_impl", "context-parallel strategy", special=("auto",))
CP_STRATEGIES.add("tokenring", "loomtrain.parallel.cp.builtin:TOKENRING")
CP_STRATEGIES.add("ring", "loomtrain.parallel.cp.builtin:RING")
CP_STRATEGIES.add("ulysses", "loomtrain.parallel.cp.builtin:ULYSSES")


def strategy(name: str) -> ContextParallelStrategy:
    """The registered strategy ``name`` (a one-line ConfigError naming the valid ones otherwise)."""
    return CP_STRATEGIES.get(name)


def usable(heads: int, kv_heads: int, world: int, names=None) -> list[str]:
    """The strategies (of ``names``; default all registered) that can split this shape over ``world``."""
    return [n for n in (names or CP_STRATEGIES.names()) if strategy(n).unsupported(heads, kv_heads, world) is None]


def predict(shape, bandwidth: float, latency: float, flops: float, topology: str = "full_mesh",
            names=None) -> dict[str, float]:
    """Modelled seconds of every usable strategy (of ``names``) for ``shape``."""
    return {n: strategy(n).seconds(shape, bandwidth, latency, flops, topology)
            for n in usable(shape.heads, shape.kv_heads, shape.world, names)}


def choose(shape, bandwidth: float, latency: float, flops: float, topology: str = "full_mesh", names=None) -> str:
    """The predicted fastest usable strategy (of ``names``; default every registered one)."""
    t = predict(shape, bandwidth, latency, flops, topology, names)
    if not t:
        raise ValueError(f"no context-parallel strategy of {', '.join(names or CP_STRATEGIES.names())} splits "
                         f"{shape.heads}/{shape.kv_heads} heads over {shape.world} ranks")
    return min(t, key=t.get)
