"""Context-parallel attention: the strategy interface, its registry, and the cost model's choice.

A strategy runs attention over the zigzag shards that the ranks of one context-parallel group hold of
each sequence. ``parallel.cp_impl`` names one (or ``auto``: :func:`choose` picks the fastest by the
cost model); the static cp group (``parallel/parallelize.py::apply_cp``, through :func:`build`), adaptive
sequence parallelism's per-step groups (``parallel/sp``), ``loomtrain plan`` and the cost models all go
through :data:`CP_STRATEGIES`. Built-ins: ``tokenring``, ``ring``, ``ulysses`` (``builtin.py``, over the
kernels of ``attention.py``) and the two-dimensional ``ulysses_ring`` / ``ulysses_tokenring`` (Ulysses inside
groups of ``parallel.cp_ulysses`` ranks, ring or TokenRing across: ``two_dim.py``). A plugin adds one with
``CP_STRATEGIES.add("name", strategy)`` (an instance).
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
      and ``latency`` s per transfer, at ``flops`` FLOP/s (a ``cost.Rate``: a number, or a function of the
      shape of a kernel call, ``cost.block_shape``), on ``topology`` (full_mesh | ring);
    - optional ``sub_groups(ranks)``: {name: [rank set, ...]} a strategy needs as process groups inside one cp
      group (``ranks``, in cp order); :func:`build` creates them and passes ``make(..., sub_groups={name: group})``
      (this rank's). Optional ``with_ulysses(u)``: a two-dimensional strategy bound to ``parallel.cp_ulysses``.
      Optional ``document_pieces(world)``: how many pieces ``parallel.cp_layout: zigzag_documents`` cuts each
      packed document into for it (``doc_layout.py``; default 2W, the zigzag's chunks).
    - :meth:`make`: the attention callable for ``group`` (a process group; None = the world):
      ``attention(q, k, v, *, causal=True, doc_ids=None, return_lse=False)`` takes this rank's
      (B, S/W, H, D) zigzag shards (``doc_ids``: (B, S/W) document ids of the same tokens) and returns
      this rank's output shard (and its (B, H, S/W) log-sum-exp with ``return_lse``), with gradients.
    """

    needs_reverse_group: bool
    overlaps_compute: bool

    def unsupported(self, heads: int, kv_heads: int, world: int) -> str | None: ...

    def bytes_per_rank(self, shape) -> tuple[float, float]: ...

    def seconds(self, shape, bandwidth: float, latency: float, flops, topology: str) -> float: ...

    def make(self, group, *, reverse_group=None, layout: str = "zigzag", comm=None, kernel: str = "auto"): ...


CP_STRATEGIES = Registry("parallel.cp_impl", "context-parallel strategy", special=("auto",))
CP_STRATEGIES.add("tokenring", "loomtrain.parallel.cp.builtin:TOKENRING")
CP_STRATEGIES.add("ring", "loomtrain.parallel.cp.builtin:RING")
CP_STRATEGIES.add("ulysses", "loomtrain.parallel.cp.builtin:ULYSSES")
CP_STRATEGIES.add("ulysses_ring", "loomtrain.parallel.cp.builtin:ULYSSES_RING")
CP_STRATEGIES.add("ulysses_tokenring", "loomtrain.parallel.cp.builtin:ULYSSES_TOKENRING")


def strategy(name) -> ContextParallelStrategy:
    """The registered strategy ``name`` (a one-line ConfigError naming the valid ones otherwise); a strategy
    object (a two-dimensional one bound to its Ulysses group size) is returned as it is."""
    return CP_STRATEGIES.get(name) if isinstance(name, str) else name


def two_dimensional(s) -> bool:
    """Whether strategy ``s`` takes ``parallel.cp_ulysses`` (Ulysses inside groups, another strategy across)."""
    return hasattr(s, "with_ulysses")


def extra_groups(s, all_groups) -> tuple[object, dict]:
    """(reverse group, {name: sub group}) of strategy ``s`` for this rank, created for every cp group of
    ``all_groups`` (each one's ranks in cp order). Creating a process group is collective over the world: every
    rank creates all of them, in the same order, and keeps its own."""
    import torch.distributed as dist

    me, reverse, subs = dist.get_rank(), None, {}
    for ranks in all_groups:
        wanted = {"": [ranks]} if s.needs_reverse_group else {}
        wanted.update(s.sub_groups(ranks) if hasattr(s, "sub_groups") else {})
        for name, sets in wanted.items():
            for members in sets:
                created = dist.new_group(list(members))
                if me in members:
                    if name:
                        subs[name] = created
                    else:
                        reverse = created
    return reverse, subs


def build(impl, group, all_groups, *, kernel: str = "auto"):
    """The attention callable of strategy ``impl`` (a name or a strategy) for this rank's cp ``group``, with the
    process groups it needs made for every cp group in ``all_groups`` (:func:`extra_groups`)."""
    s = strategy(impl)
    reverse, subs = extra_groups(s, all_groups)
    return s.make(group, reverse_group=reverse, kernel=kernel, **({"sub_groups": subs} if subs else {}))


def usable(heads: int, kv_heads: int, world: int, names=None) -> list[str]:
    """The strategies (of ``names``; default all registered) that can split this shape over ``world``."""
    return [n for n in (names or CP_STRATEGIES.names()) if strategy(n).unsupported(heads, kv_heads, world) is None]


def predict(shape, bandwidth: float, latency: float, flops, topology: str = "full_mesh",
            names=None) -> dict[str, float]:
    """Modelled seconds of every usable strategy (of ``names``) for ``shape``; ``flops``: a ``cost.Rate``."""
    return {n: strategy(n).seconds(shape, bandwidth, latency, flops, topology)
            for n in usable(shape.heads, shape.kv_heads, shape.world, names)}


def splits(shape, inner_bandwidth) -> list:
    """Every two-dimensional strategy bound to every Ulysses group size U that splits ``shape`` (1 < U < world,
    dividing it and the heads), its all-to-all costed on ``inner_bandwidth`` (the link inside a group, bytes/s).
    ``inner_bandwidth`` may be a {U: bytes/s} mapping instead: only those U, each on its own link (the group sizes
    whose groups really sit on a faster tier: ``launch/cp_links.py``)."""
    links = inner_bandwidth if isinstance(inner_bandwidth, dict) else {
        u: inner_bandwidth for u in range(2, shape.world) if shape.world % u == 0}
    return [b for _, s in CP_STRATEGIES.items() if two_dimensional(s)
            for b in (s.with_ulysses(u, bw) for u, bw in sorted(links.items()) if 1 < u < shape.world
                      and shape.world % u == 0)
            if b.unsupported(shape.heads, shape.kv_heads, shape.world) is None]


def choose(shape, bandwidth: float, latency: float, flops, topology: str = "full_mesh", names=None,
           inner_bandwidth=None):
    """The predicted fastest usable strategy (of ``names``; default every registered one): a name, or with
    ``inner_bandwidth`` (the link inside groups of consecutive cp ranks, or {U: that link} for the group sizes U
    allowed: :func:`splits`; ``bandwidth`` is then the link between them) possibly a two-dimensional strategy
    bound to its Ulysses group size."""
    t = predict(shape, bandwidth, latency, flops, topology, names)
    if inner_bandwidth:
        t.update({b: b.seconds(shape, bandwidth, latency, flops, topology) for b in splits(shape, inner_bandwidth)})
    if not t:
        raise ValueError(f"no context-parallel strategy of {', '.join(names or CP_STRATEGIES.names())} splits "
                         f"{shape.heads}/{shape.kv_heads} heads over {shape.world} ranks")
    return min(t, key=t.get)
