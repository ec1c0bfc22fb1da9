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
    links = (w - 1) if topology == "full_mesh" else 2 / max(1.0, w / 4)
    a2a = (w - 1) / w * (2 * q + 2 * kv)
    ulysses = 3.5 * fwd_total + 2 * a2a / (bandwidth * links) + 8 * latency
    return {"tokenring": tr_f + tr_b, "ring": ring, "ulysses": ulysses}
