"""Variable-length attention: many (query segment, key segment) pairs packed along one token axis, one call.

``q: (Tq, H, D)``, ``k, v: (Tk, H_kv, D)`` with ``H % H_kv == 0`` hold the segments back to back:
segment ``s`` is queries ``cu_q[s]:cu_q[s+1]`` against keys ``cu_k[s]:cu_k[s+1]`` (``cu_q``, ``cu_k``:
int cumulative lengths, one more than the segments, starting at 0 and ending at Tq, Tk). A segment may
have no queries (its keys get zero gradients) or no keys (its queries come out with out 0, lse -inf).
``causal``: every segment is causal, which needs its query and key lengths equal (the only causal
segments callers make: a document on a diagonal chunk pair).

- :func:`varlen_forward` -> ``(out (Tq, H, D) fp32, lse (H, Tq) fp32)`` (lse: natural log, the flash op's
  unpadded varlen layout);
- :func:`varlen_backward` -> ``(dq, dk, dv)`` fp32, dk/dv with k's heads, exact given the *final*
  ``out``/``lse`` of the query rows (as ``block_kernels.backward``: partial gradients of a merged result
  add up).

Two implementations with that one contract (:func:`flash_route` says which runs):

- **CUDA, fp16/bf16, head_dim % 8 == 0 and <= 256, a flash-family kernel** (``block_kernels.choose`` gives a
  kernel that takes no mask): torch's ``aten._flash_attention_forward`` / ``_flash_attention_backward``
  with ``cum_seq_q/cum_seq_k`` (the calls ``torch/nn/attention/varlen.py`` makes), K/V with their own heads
  (``flash_api.cpp``'s ``mha_varlen_fwd/bwd`` take H_kv dividing H and sum dk/dv back). With FA3 activated
  in torch (``fa3``) the same op runs FlashAttention-3. The kernel writes lse = +inf for rows of a segment
  without keys; those rows are set to -inf (out 0) here. ``max_q`` is raised to 2 for the call: at
  ``max_q == 1`` with GQA, ``mha_varlen_fwd`` swaps query heads into the sequence axis assuming one query
  per segment, which segments without queries break.
- **Anything else** (CPU, fp32 on CUDA, other devices): one ``block_kernels.forward`` / ``backward`` call
  per segment with both queries and keys, written into place. ``cu_q``/``cu_k`` are read on the host
  (pass CPU tensors: no device sync) and must cover q and k.

Tested (tests/test_cp_kernel_calls.py): both against float64 attention on CPU, the flash route through a
stand-in CPU kernel registered for the aten ops that enforces ``mha_varlen_fwd/bwd``'s checks (dtype,
int32 contiguous cu_seqlens on the device, shapes, heads, lse layout) and its empty-segment behaviour, and
the aten calls on meta tensors.
"""
from __future__ import annotations

import torch

from loomtrain.parallel.cp import block_kernels as kernels

_HALF = (torch.float16, torch.bfloat16)


def flash_route(q: torch.Tensor, kernel: str = "auto") -> bool:
    """Whether varlen calls with queries like ``q`` (T, H, D) run torch's varlen flash op (else per-segment
    block kernels): the block kernel chosen for them takes no mask (a flash-family one), in fp16/bf16 with a
    head size the flash op takes."""
    d = q.shape[-1]
    return (q.dtype in _HALF and d % 8 == 0 and d <= 256
            and kernels.choose(q, False, kernel) not in kernels.MASKABLE)


def cu_device(q: torch.Tensor, kernel: str = "auto") -> torch.device:
    """Where ``cu_q``/``cu_k`` should live for calls with queries like ``q``: q's device on the flash route
    (the op reads them there), else the host (the per-segment loop reads them there)."""
    return q.device if flash_route(q, kernel) else torch.device("cpu")


def segments(cu_q, cu_k):
    """[(q_start, q_end, k_start, k_end)] of every segment (host lists)."""
    cq, ck = cu_q.tolist(), cu_k.tolist()
    if len(cq) != len(ck) or cq[0] != 0 or ck[0] != 0:
        raise ValueError(f"cu_q and cu_k must be cumulative lengths from 0 of the same segments; got {cq}, {ck}")
    return list(zip(cq[:-1], cq[1:], ck[:-1], ck[1:]))


def varlen_forward(q, k, v, cu_q, cu_k, max_q: int, max_k: int, causal: bool, kernel: str = "auto"):
    """(out (Tq, H, D) fp32, lse (H, Tq) fp32) of every segment; rows without keys: out 0, lse -inf.
    ``max_q``/``max_k``: at least the longest query / key segment (the CUDA op sizes its grid by them)."""
    if flash_route(q, kernel):
        return _flash_forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, kernel)
    t, h, d = q.shape
    out = torch.empty(t, h, d, dtype=torch.float32, device=q.device)
    lse = torch.empty((h, t), dtype=torch.float32, device=q.device)
    for qs, qe, ks, ke in _segments_of(q, k, cu_q, cu_k, causal):
        if ke == ks:  # no keys
            out[qs:qe] = 0.0
            lse[:, qs:qe] = float("-inf")
        elif qe > qs:
            o, lo = kernels.forward(q[None, qs:qe], k[None, ks:ke], v[None, ks:ke], causal, None, kernel)
            out[qs:qe] = o[0]
            lse[:, qs:qe] = lo[0]
    return out, lse


def varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q: int, max_k: int, causal: bool,
                    kernel: str = "auto"):
    """(dq, dk, dv) fp32 (dk/dv with k's heads) of every segment, from the final ``out`` (Tq, H, D) and
    ``lse`` (H, Tq); keys of segments without queries get 0."""
    if flash_route(q, kernel):
        return _flash_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, kernel)
    dq = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.empty(k.shape, dtype=torch.float32, device=k.device)
    dv = torch.empty(v.shape, dtype=torch.float32, device=v.device)
    for qs, qe, ks, ke in _segments_of(q, k, cu_q, cu_k, causal):
        if qe == qs or ke == ks:  # no call: no gradient
            dq[qs:qe] = 0.0
            dk[ks:ke] = 0.0
            dv[ks:ke] = 0.0
            continue
        a, b, c = kernels.backward(dout[None, qs:qe], q[None, qs:qe], k[None, ks:ke], v[None, ks:ke],
                                   out[None, qs:qe], lse[None, :, qs:qe], causal, None, kernel)
        dq[qs:qe] = a[0]
        dk[ks:ke] = b[0]
        dv[ks:ke] = c[0]
    return dq, dk, dv


def _segments_of(q, k, cu_q, cu_k, causal):
    """The segments, checked to cover q and k and (causal) to pair as many queries as keys."""
    segs = segments(cu_q, cu_k)
    if segs[-1][1] != q.shape[0] or segs[-1][3] != k.shape[0]:
        raise ValueError(f"the segments cover {segs[-1][1]} queries and {segs[-1][3]} keys of {q.shape[0]} and "
                         f"{k.shape[0]}")
    for qs, qe, ks, ke in segs:
        if causal and qe > qs and ke > ks and qe - qs != ke - ks:
            raise ValueError(f"causal varlen segments need as many queries as keys; got {qe - qs} and {ke - ks}")
    return segs


# ----------------------------------------------------------------------------- torch's varlen flash op
def _cu(t, device):
    return t.to(device=device, dtype=torch.int32).contiguous()


def _last_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _activate(q, kernel):
    """FA3 routes torch's flash op to FlashAttention-3 once activated (``block_kernels.activate``)."""
    if kernels.choose(q, False, kernel) == "fa3":
        kernels.activate("fa3")


def _flash_forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, kernel):
    _activate(q, kernel)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    out, lse, *_ = torch.ops.aten._flash_attention_forward(
        q, k, v, _cu(cu_q, q.device), _cu(cu_k, q.device), max(max_q, 2), max_k, 0.0, causal, False, scale=None)
    dead = ~torch.isfinite(lse)  # rows of segments without keys: the kernel writes lse +inf (and out 0)
    out = out.float().masked_fill_(dead.t().unsqueeze(-1), 0.0)
    return out, lse.float().masked_fill(dead, float("-inf"))


def _flash_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, kernel):
    _activate(q, kernel)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    rng_state = torch.zeros(2, dtype=torch.uint64, device=q.device)  # dropout 0: unused (as varlen.py passes)
    unused = torch.empty(0, dtype=torch.uint64, device=q.device)
    dq, dk, dv = torch.ops.aten._flash_attention_backward(
        _last_dim_contiguous(dout.to(q.dtype)), q, k, v, _last_dim_contiguous(out.to(q.dtype)),
        lse.float().contiguous(), _cu(cu_q, q.device), _cu(cu_k, q.device), max(max_q, 2), max_k, 0.0, causal,
        rng_state, unused, scale=None)
    return dq.float(), dk.float(), dv.float()
