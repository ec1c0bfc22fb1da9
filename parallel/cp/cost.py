"""Cost model of one context-parallel attention (forward + backward) per rank, per strategy.

Bytes are exact counts of what ``parallel/cp/attention.py`` sends (tested against its byte
accounting); times are a model:

- compute: causal attention is 2*B*S^2*H*D FLOPs forward (half of 4*B*S^2*H*D), backward
  2.5x forward, split evenly over W ranks and W blocks per rank (zigzag balances it). The rate is
  ``flops``: one number for every kernel call (a GPU's datasheet figure), or a :data:`Rate` callable of the
  shape of the calls a strategy makes (:func:`block_shape`), since one kernel call does not run equally fast
  at every size: ring and TokenRing make 2W+1 calls per rank per pass on S/(2W)-token chunk pairs, Ulysses one
  whole-sequence call on H/W heads (with one rate the model called ring and Ulysses equal on an unshaped link
  where ring measured 10% slower: ``scripts/bench_context_tiers.py``). :func:`block_rates` builds one from
  measured rates.
- ring / TokenRing: pipelined steps, each max(block compute, hop transfer), see
  :func:`predict_seconds`. TokenRing's results travel the other direction: with
  ``topology="full_mesh"`` (NVSwitch) straight to the owner, with ``topology="ring"``
  over W/2 hops on average.
- Ulysses: all-to-all does not overlap compute; on a full mesh each rank's W-1 pieces go
  in parallel over W-1 links, on a ring they cross W/4 hops on average in each direction.
- Ulysses x ring / TokenRing (``two_dim_*``): Ulysses' all-to-alls inside a group of U on the link
  inside it, plus the outer strategy over W/U ranks with 1/U of the heads on the link between groups.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Union

# Attention FLOP/s (forward + backward) one kernel call reaches: a number for every call, or a function of the
# call's (query tokens, key tokens, heads) -- heads counting batch rows x heads, the independent problems of one
# call; a causal (diagonal) call gets the rate of its shape.
Rate = Union[float, Callable[[int, int, int], float]]


@dataclass
class Shape:
    batch: int
    seq: int  # full sequence length
    heads: int
    kv_heads: int
    head_dim: int
    world: int
    elem_bytes: int = 4  # q/k/v dtype size
    causal: bool = True


def _sizes(s: Shape) -> dict[str, float]:
    """Bytes of each per-rank tensor the strategies move (q/k/v in their dtype; out, lse, grads in fp32)."""
    rows = s.batch * s.seq // s.world  # tokens per rank
    return {"q": rows * s.heads * s.head_dim * s.elem_bytes, "kv": rows * s.kv_heads * s.head_dim * s.elem_bytes,
            "kv32": rows * s.kv_heads * s.head_dim * 4, "out32": rows * s.heads * s.head_dim * 4,
            "lse": rows * s.heads * 4,
            # TokenRing: after wrapping only half of Q (and of its results) travels: 3/4 on average.
            "frac": 0.75 if s.causal else 1.0}


def bytes_per_rank(s: Shape) -> dict[str, tuple[float, float]]:
    """(forward bytes, backward bytes) each rank sends, per strategy (zigzag layout)."""
    w, z = s.world, _sizes(s)
    q, kv, kv32, out32, lse, frac = z["q"], z["kv"], z["kv32"], z["out32"], z["lse"], z["frac"]
    hops = w - 1
    token_ring = (hops * frac * (q + out32 + lse), hops * frac * (3 * q + lse + out32))
    ring = (hops * 2 * kv, hops * (2 * kv + 2 * kv32) + 2 * kv32)
    a2a = (w - 1) / w
    ulysses = (a2a * (2 * q + 2 * kv), a2a * (2 * q + 2 * kv))
    return {"tokenring": token_ring, "ring": ring, "ulysses": ulysses}


def attention_flops(s: Shape) -> float:
    fwd = 4.0 * s.batch * s.seq * s.seq * s.heads * s.head_dim * (0.5 if s.causal else 1.0)
    return fwd * 3.5  # forward + backward (2.5x)


def block_shape(s: Shape, strategy: str) -> tuple[int, int, int]:
    """(query tokens, key tokens, heads x batch) of one kernel call of ``strategy`` on ``s`` (``attention.py``):
    ring and TokenRing attend chunk pairs of the zigzag's 2W chunks; Ulysses the whole sequence on its H/W heads
    in one causal call; one rank (W = 1) the whole sequence on every head. (A two-dimensional split's calls are its
    outer ring's, on :func:`two_dim_shapes`' outer shape.)"""
    if s.world == 1:
        return s.seq, s.seq, s.batch * s.heads
    if strategy == "ulysses":
        return s.seq, s.seq, s.batch * s.heads // s.world
    chunk = s.seq // (2 * s.world)
    return chunk, chunk, s.batch * s.heads


def rate_of(flops: Rate, block: tuple[int, int, int]) -> float:
    """The FLOP/s of one kernel call of shape ``block`` under ``flops`` (:data:`Rate`)."""
    return float(flops(*block)) if callable(flops) else float(flops)


def block_rates(measured: dict[tuple[int, int, int], float]) -> Callable[[int, int, int], float]:
    """A :data:`Rate` from FLOP/s measured at some call shapes ({(query tokens, key tokens, heads): FLOP/s}): a
    measured shape gets its own rate, any other one the rate of the measured shape nearest in work per call
    (log of query x key tokens x heads), the quantity a call's efficiency follows (per-call overhead, matmul
    sizes) -- a table lookup, no fit."""
    if not measured or any(r <= 0 for r in measured.values()):
        raise ValueError(f"block_rates: needs at least one positive measured rate, got {measured!r}")
    table = dict(measured)

    def rate(q: int, k: int, heads: int) -> float:
        if (q, k, heads) in table:
            return table[(q, k, heads)]
        size = math.log(max(1, q * k * heads))
        return table[min(table, key=lambda b: (abs(math.log(max(1, b[0] * b[1] * b[2])) - size), b))]

    return rate


def predict_seconds(s: Shape, bandwidth: float, latency: float, flops: Rate,
                    topology: str = "full_mesh") -> dict[str, float]:
    """Modelled fwd+bwd seconds per strategy for one rank. ``bandwidth`` in bytes/s per link direction.

    Step-level model of the code in ``parallel/cp/attention.py``: ring overlaps hop i+1 with
    block i; in backward K/V and the dK/dV accumulator (one hop behind) both overlap the
    blocks, and only the accumulator's last hop home is exposed; TokenRing overlaps Q's next hop
    with the current block and each block's results with the next block, leaving the last
    result transfer as a tail (at W=2 nothing overlaps the result); Ulysses overlaps nothing. ``flops``: a
    :data:`Rate`, taken at each strategy's :func:`block_shape`.
    """
    w = s.world
    fwd_flops = attention_flops(s) / 3.5 / w  # one rank's forward FLOPs, whatever the strategy
    if w == 1:
        return {k: fwd_flops * 3.5 / rate_of(flops, block_shape(s, k)) for k in ("tokenring", "ring", "ulysses")}
    z = _sizes(s)
    q, kv, kv32, out32, lse, frac = z["q"], z["kv"], z["kv32"], z["out32"], z["lse"], z["frac"]
    t = lambda nbytes, hops=1: latency + nbytes * hops / bandwidth  # noqa: E731

    def pipelined(step_compute, hop_time, tail):
        return (w - 1) * max(step_compute, hop_time) + step_compute + tail

    fwd_total = fwd_flops / rate_of(flops, block_shape(s, "ring"))  # ring's and TokenRing's chunk pairs
    c_f, c_b = fwd_total / w, 2.5 * fwd_total / w
    ring = pipelined(c_f, t(2 * kv), 0) + pipelined(c_b, t(2 * kv + 2 * kv32), t(2 * kv32))
    hops = 1 if topology == "full_mesh" else w / 2
    tr_f = pipelined(max(c_f, t(frac * (out32 + lse), hops)), t(frac * q), t(frac * (out32 + lse), hops))
    tr_b = pipelined(max(c_b, t(frac * out32, hops)), t(frac * (3 * q + lse)), t(frac * out32, hops))
    ulysses = 3.5 * fwd_flops / rate_of(flops, block_shape(s, "ulysses")) + _all_to_all_seconds(s, bandwidth, latency, topology)
    return {"tokenring": tr_f + tr_b, "ring": ring, "ulysses": ulysses}


def _all_to_all_seconds(s: Shape, bandwidth: float, latency: float, topology: str) -> float:
    """Ulysses' four all-to-alls (q, k, v and out forward; their gradients backward), exposed.

    ``bandwidth`` is what one rank can send (its NVLink total inside a node, its NIC between nodes): on a
    switched full mesh a rank's (W-1)/W of the data leaves through it whatever the number of peers. (This model
    once divided by W-1 links, as if every peer had a link of its own: Ulysses over 2 hosts x 2 ranks measured
    1.3-1.5 s where it predicted 0.79, scripts/bench_context_tiers.py.) On a ring, traffic crosses W/4 hops on
    average over the two directions."""
    w, z = s.world, _sizes(s)
    links = 1.0 if topology == "full_mesh" else 2 / max(1.0, w / 4)
    a2a = (w - 1) / w * (2 * z["q"] + 2 * z["kv"])
    return 2 * a2a / (bandwidth * links) + 8 * latency


def two_dim_shapes(s: Shape, ulysses: int) -> tuple[Shape, Shape]:
    """(inner, outer) of a two-dimensional split of ``s`` (``two_dim.py``): Ulysses over ``ulysses`` ranks holding
    the same tokens per rank; the outer ring over world/ulysses ranks with 1/ulysses of the heads each."""
    inner = Shape(s.batch, s.seq * ulysses // s.world, s.heads, s.kv_heads, s.head_dim, ulysses, s.elem_bytes, s.causal)
    outer = Shape(s.batch, s.seq, s.heads // ulysses, s.kv_heads // ulysses, s.head_dim, s.world // ulysses,
                  s.elem_bytes, s.causal)
    return inner, outer


def two_dim_bytes(s: Shape, ulysses: int, outer: str) -> tuple[float, float]:
    """(forward, backward) bytes a rank sends: the inner all-to-alls plus the outer ring's."""
    inner_shape, outer_shape = two_dim_shapes(s, ulysses)
    a, b = bytes_per_rank(inner_shape)["ulysses"], bytes_per_rank(outer_shape)[outer]
    return a[0] + b[0], a[1] + b[1]


def two_dim_seconds(s: Shape, ulysses: int, outer: str, bandwidth: float, inner_bandwidth: float, latency: float,
                    flops: Rate, topology: str = "full_mesh") -> float:
    """The outer ring's modelled seconds (compute included: 1/U of the heads over W/U ranks is the same work
    per rank, in the outer ring's calls: S*U/(2W)-token chunk pairs on H/U heads) on ``bandwidth`` between groups, plus the exposed all-to-alls on ``inner_bandwidth`` inside one."""
    inner_shape, outer_shape = two_dim_shapes(s, ulysses)
    return (predict_seconds(outer_shape, bandwidth, latency, flops, topology)[outer]
            + _all_to_all_seconds(inner_shape, inner_bandwidth, latency, topology))
