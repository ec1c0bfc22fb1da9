"""Cost model of one context-parallel attention (forward + backward) per rank, per strategy.

Bytes are exact counts of what ``parallel/cp/attention.py`` sends (tested against its byte
accounting); times are a model:

- compute: causal attention is 2*B*S^2*H*D FLOPs forward (half of 4*B*S^2*H*D), backward
  2.5x forward, split evenly over W ranks and W blocks per rank (zigzag balances it).
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

from dataclasses import dataclass


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


def predict_seconds(s: Shape, bandwidth: float, latency: float, flops: float,
                    topology: str = "full_mesh") -> dict[str, float]:
    """Modelled fwd+bwd seconds per strategy for one rank. ``bandwidth`` in bytes/s per link direction.

    Step-level model of the code in ``parallel/cp/attention.py``: ring overlaps hop i+1 with
    block i; in backward K/V and the dK/dV accumulator (one hop behind) both overlap the
    blocks, and only the accumulator's last hop home is exposed; TokenRing overlaps Q's next hop
    with the current block and each block's results with the next block, leaving the last
    result transfer as a tail (at W=2 nothing overlaps the result); Ulysses overlaps nothing.
    """
    w = s.world
    fwd_total = attention_flops(s) / 3.5 / w / flops
    if w == 1:
        return {k: fwd_total * 3.5 for k in ("tokenring", "ring", "ulysses")}
    z = _sizes(s)
    q, kv, kv32, out32, lse, frac = z["q"], z["kv"], z["kv32"], z["out32"], z["lse"], z["frac"]
    t = lambda nbytes, hops=1: latency + nbytes * hops / bandwidth  # noqa: E731

    def pipelined(step_compute, hop_time, tail):
        return (w - 1) * max(step_compute, hop_time) + step_compute + tail

    c_f, c_b = fwd_total / w, 2.5 * fwd_total / w
    ring = pipelined(c_f, t(2 * kv), 0) + pipelined(c_b, t(2 * kv + 2 * kv32), t(2 * kv32))
    hops = 1 if topology == "full_mesh" else w / 2
    tr_f = pipelined(max(c_f, t(frac * (out32 + lse), hops)), t(frac * q), t(frac * (out32 + lse), hops))
    tr_b = pipelined(max(c_b, t(frac * out32, hops)), t(frac * (3 * q + lse)), t(frac * out32, hops))
    ulysses = 3.5 * fwd_total + _all_to_all_seconds(s, bandwidth, latency, topology)
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
                    flops: float, topology: str = "full_mesh") -> float:
    """The outer ring's modelled seconds (compute included: 1/U of the heads over W/U ranks is the same work
    per rank) on ``bandwidth`` between groups, plus the exposed all-to-alls on ``inner_bandwidth`` inside one."""
    inner_shape, outer_shape = two_dim_shapes(s, ulysses)
    return (predict_seconds(outer_shape, bandwidth, latency, flops, topology)[outer]
            + _all_to_all_seconds(inner_shape, inner_bandwidth, latency, topology))
