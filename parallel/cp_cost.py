"""Cost model of one context-parallel attention (forward + backward) per rank, per strategy.

Bytes are exact counts of what ``parallel/context.py`` sends (tested against its byte
accounting); times are a model:

- compute: causal attention is 2*B*S^2*H*D FLOPs forward (half of 4*B*S^2*H*D), backward
  2.5x forward, split evenly over W ranks (zigzag balances it); at ``flops`` per rank.
- ring / TokenRing overlap each step's transfer with the step's compute, so each of the
  W-1 communicating steps costs max(compute_step, transfer_step) + latency.
  Ring sends everything over one link direction. TokenRing sends Q one way and results
  the other: with ``topology="full_mesh"`` (NVSwitch) the result goes straight to its
  owner on its own link, so the step costs the larger of the two directions; with
  ``topology="ring"`` the results take (on average W/2) hops on the reverse direction.
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


def bytes_per_rank(s: Shape) -> dict[str, tuple[float, float]]:
    """(forward bytes, backward bytes) each rank sends, per strategy (zigzag layout)."""
    w, e = s.world, s.elem_bytes
    rows = s.batch * s.seq // w  # tokens per rank
    q = rows * s.heads * s.head_dim * e
    kv = rows * s.kv_heads * s.head_dim * e
    hops = w - 1
    # TokenRing: after wrapping only half of Q (and of its results) travels: 3/4 on average.
    frac = 0.75 if s.causal else 1.0
    lse = rows * s.heads * 4
    out32 = rows * s.heads * s.head_dim * 4
    token_ring = (hops * frac * (q + out32 + lse), hops * frac * (3 * q + lse + out32))
    ring = (hops * 2 * kv, hops * (2 * kv + 2 * rows * s.kv_heads * s.head_dim * 4) + 2 * rows * s.kv_heads * s.head_dim * 4)
    a2a = (w - 1) / w
    ulysses = (a2a * (2 * q + 2 * kv), a2a * (2 * q + 2 * kv))
    return {"tokenring": token_ring, "ring": ring, "ulysses": ulysses}


def attention_flops(s: Shape) -> float:
    fwd = 4.0 * s.batch * s.seq * s.seq * s.heads * s.head_dim * (0.5 if s.causal else 1.0)
    return fwd * 3.5  # forward + backward (2.5x)


def predict_seconds(s: Shape, bandwidth: float, latency: float, flops: float,
                    topology: str = "full_mesh") -> dict[str, float]:
    """Modelled fwd+bwd seconds per strategy for one rank. ``bandwidth`` in bytes/s per link direction."""
    w = s.world
    compute = attention_flops(s) / w / flops
    if w == 1:
        return {k: compute for k in ("tokenring", "ring", "ulysses")}
    b = bytes_per_rank(s)
    step_compute = compute / w
    out = {}
    ring_bytes = sum(b["ring"]) / (w - 1) / 2  # per step, per pass (fwd, bwd)
    out["ring"] = step_compute * 2 + 2 * (w - 1) * (max(step_compute, ring_bytes / bandwidth) + latency)
    tr = sum(b["tokenring"]) / (w - 1) / 2
    share_q = 0.45  # Q-direction share of TokenRing bytes (Q / Q,dO,O,lse) vs results (out, lse / dQ)
    q_dir, r_dir = tr * share_q, tr * (1 - share_q)
    hops = 1 if topology == "full_mesh" else w / 2
    step_comm = max(q_dir, r_dir * hops) / bandwidth
    out["tokenring"] = step_compute * 2 + 2 * (w - 1) * (max(step_compute, step_comm) + latency)
    ub = sum(b["ulysses"])
    links = (w - 1) if topology == "full_mesh" else 2 / max(1.0, w / 4)
    out["ulysses"] = compute + ub / (bandwidth * links) + 8 * latency
    return out


def choose(s: Shape, bandwidth: float, latency: float, flops: float, topology: str = "full_mesh") -> str:
    """The predicted fastest strategy that applies (Ulysses needs heads divisible by W)."""
    t = predict_seconds(s, bandwidth, latency, flops, topology)
    if s.heads % s.world or s.kv_heads % s.world:
        t.pop("ulysses")
    return min(t, key=t.get)
