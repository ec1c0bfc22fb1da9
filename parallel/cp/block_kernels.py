"""Attention kernels for one context-parallel block: forward returns (out, lse), backward is exact
given the *final* out and lse of the query rows (so partial gradients of a merged result add up).

Which kernel runs is decided per block at run time (``choose``):

========================  ==========================================  ===================
kernel                    used when                                   masks
========================  ==========================================  ===================
``cpu_flash``             CPU tensors                                 yes (additive)
``flash_attn``            CUDA, fp16/bf16, head_dim % 8 == 0, <= 256, no
                          flash-attn installed
``sdpa_flash``            as above without flash-attn (torch's op)    no
``sdpa_efficient``        CUDA fp32, or any CUDA block with a mask     yes (additive)
``math``                  any other device; forced for testing         yes (additive)
========================  ==========================================  ===================

Blocks of packed documents with sorted document ids never need a mask: ``context.py`` cuts
them into unmasked rectangles, so on CUDA the masked kernel only serves unsorted ids.

Tested (tests/test_block_kernels.py): ``cpu_flash`` and ``math`` numerically against float64 on CPU;
``sdpa_flash`` and ``sdpa_efficient`` by their exact calls on meta tensors (argument order, shapes,
lse padding), and numerically by tests marked ``gpu`` that have not run yet (no GPU so far).
``flash_attn`` is written against flash-attn 2.6+'s ``_flash_attn_forward`` / ``_flash_attn_backward``
(older ``window_size=`` tuples handled) but has never run.
"""
from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F

KERNELS = ("auto", "cpu_flash", "math", "sdpa_flash", "sdpa_efficient", "flash_attn")
MASKABLE = ("cpu_flash", "math", "sdpa_efficient")
_HALF = (torch.float16, torch.bfloat16)


def check_kernel(name: str) -> str:
    """``name`` if it is a kernel (``auto``: chosen per block), else a ValueError naming the choices."""
    if name not in KERNELS:
        raise ValueError(f"kernel: must be one of {', '.join(KERNELS)}, got {name!r}")
    return name


@functools.cache
def flash_attn_installed() -> bool:
    try:
        import flash_attn.flash_attn_interface  # noqa: F401
    except ImportError:
        return False
    return True


def choose(q: torch.Tensor, masked: bool, kernel: str = "auto") -> str:
    """The kernel for a block with queries like ``q`` (B, S, H, D), with or without an additive mask.
    A forced ``kernel`` serves every block it can (masked blocks fall back to a maskable one)."""
    return choose_for(q.device.type, q.dtype, q.shape[-1], masked, kernel)


def choose_for(device_type: str, dtype: torch.dtype, head_dim: int, masked: bool, kernel: str = "auto") -> str:
    if kernel != "auto" and (not masked or kernel in MASKABLE):
        return kernel
    if device_type == "cpu":
        return "cpu_flash"
    if device_type != "cuda":
        return "math"
    if masked or dtype not in _HALF or head_dim % 8 or head_dim > 256:
        return "sdpa_efficient"
    return "flash_attn" if flash_attn_installed() else "sdpa_flash"


def forward(q, k, v, causal: bool, mask=None, kernel: str = "auto"):
    """(out (B,S,H,D) fp32, lse (B,H,S) fp32) of one block; rows that see no key get lse = -inf, out 0.

    ``mask``: additive (B, 1, Sq, Sk) or None; ``causal`` is top-left aligned (Sq == Sk here).
    """
    return _FORWARD[choose(q, mask is not None, kernel)](q, k, v, causal, mask)


def backward(dout, q, k, v, out, lse, causal: bool, mask=None, kernel: str = "auto"):
    """(dq, dk, dv) in fp32 (dk, dv with k's heads) of one block, from the final ``out``/``lse``."""
    return _BACKWARD[choose(q, mask is not None, kernel)](dout, q, k, v, out, lse, causal, mask)


# ----------------------------------------------------------------------------- helpers
def _repeat_kv(t: torch.Tensor, rep: int) -> torch.Tensor:
    return t if rep == 1 else t.repeat_interleave(rep, dim=2)


def _reduce_kv(t: torch.Tensor, rep: int) -> torch.Tensor:
    """Gradient of ``_repeat_kv``: sum the ``rep`` query heads that shared each KV head."""
    if rep == 1:
        return t
    b, s, h, d = t.shape
    return t.view(b, s, h // rep, rep, d).sum(3)


def _bhsd(q, k, v):
    """(rep, [q, k, v] as (B, H, S, D) with K/V heads repeated to H) for kernels without GQA."""
    rep = q.shape[2] // k.shape[2]
    return rep, [t.transpose(1, 2) for t in (q, _repeat_kv(k, rep), _repeat_kv(v, rep))]


def _grads(dq, dk, dv, rep):
    """(B, H, S, D) gradients -> (B, S, H, D) fp32, dk/dv summed back to the KV heads."""
    return (dq.transpose(1, 2).float(), _reduce_kv(dk.transpose(1, 2).float(), rep),
            _reduce_kv(dv.transpose(1, 2).float(), rep))


def _dead_rows(mask):
    """(B, 1, Sq) rows a mask hides completely (kernels return lse 0 or nan there)."""
    return torch.isneginf(mask).all(-1)


def _kill_dead(out, lse, mask):
    if mask is None:
        return out, lse
    dead = _dead_rows(mask)
    return out.masked_fill(dead.transpose(1, 2).unsqueeze(-1), 0.0), lse.masked_fill(dead, float("-inf"))


# ----------------------------------------------------------------------------- CPU flash (torch)
def _cpu_flash_fwd(q, k, v, causal, mask):
    _, (qt, kt, vt) = _bhsd(q, k, v)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        qt, kt, vt, 0.0, causal and mask is None, attn_mask=mask)
    return _kill_dead(out.transpose(1, 2).float(), lse.float(), mask)


def _cpu_flash_bwd(dout, q, k, v, out, lse, causal, mask):
    rep, (qt, kt, vt) = _bhsd(q, k, v)
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout.to(q.dtype).transpose(1, 2), qt, kt, vt, out.to(q.dtype).transpose(1, 2), lse.contiguous(), 0.0,
        causal and mask is None, attn_mask=mask)
    return _grads(dq, dk, dv, rep)


# ----------------------------------------------------------------------------- explicit softmax twin
def _math_scores(qt, kt, causal, mask):
    scores = torch.matmul(qt.float(), kt.float().transpose(-1, -2)) * qt.shape[-1] ** -0.5
    if mask is not None:
        return scores + mask.float()
    if causal:
        sq, sk = scores.shape[-2:]
        keep = torch.ones(sq, sk, dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    return scores


def _math_fwd(q, k, v, causal, mask):
    _, (qt, kt, vt) = _bhsd(q, k, v)
    scores = _math_scores(qt, kt, causal, mask)
    lse = torch.logsumexp(scores, -1)
    probs = torch.nan_to_num(torch.exp(scores - lse.unsqueeze(-1)))
    return torch.matmul(probs, vt.float()).transpose(1, 2), lse


def _math_bwd(dout, q, k, v, out, lse, causal, mask):
    rep, (qt, kt, vt) = _bhsd(q, k, v)
    do, o = dout.float().transpose(1, 2), out.float().transpose(1, 2)
    probs = torch.nan_to_num(torch.exp(_math_scores(qt, kt, causal, mask) - lse.unsqueeze(-1)))
    dv = torch.matmul(probs.transpose(-1, -2), do)
    dp = torch.matmul(do, vt.float().transpose(-1, -2))
    ds = probs * (dp - (do * o).sum(-1, keepdim=True)) * qt.shape[-1] ** -0.5
    return _grads(torch.matmul(ds, kt.float()), torch.matmul(ds.transpose(-1, -2), qt.float()), dv, rep)


# ----------------------------------------------------------------------------- torch CUDA flash op
def _philox(t):
    """Placeholder RNG state for dropout-free backward calls (the forward's rng_state / unused)."""
    return torch.empty(2, dtype=torch.uint64, device=t.device), torch.empty(0, dtype=torch.uint64, device=t.device)


def _sdpa_flash_fwd(q, k, v, causal, mask):
    _, (qt, kt, vt) = _bhsd(q, k, v)
    out, lse, *_ = torch.ops.aten._scaled_dot_product_flash_attention(qt, kt, vt, 0.0, causal, False)
    return out.transpose(1, 2).float(), lse.float()


def _sdpa_flash_bwd(dout, q, k, v, out, lse, causal, mask):
    rep, (qt, kt, vt) = _bhsd(q, k, v)
    seed, offset = _philox(q)
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
        dout.to(q.dtype).transpose(1, 2), qt, kt, vt, out.to(q.dtype).transpose(1, 2), lse.contiguous(),
        None, None, qt.shape[2], kt.shape[2], 0.0, causal, seed, offset)
    return _grads(dq, dk, dv, rep)


# ----------------------------------------------------------------------------- torch CUDA mem-efficient op
def _aligned_bias(mask, heads):
    """The additive mask expanded to (B, H, Sq, Sk) with its rows 16-element aligned, as the kernel needs."""
    if mask is None:
        return None
    sk = mask.shape[-1]
    padded = F.pad(mask, (0, -sk % 16)) if sk % 16 else mask
    return padded[..., :sk].expand(mask.shape[0], heads, *mask.shape[2:])


def _sdpa_efficient_fwd(q, k, v, causal, mask):
    _, (qt, kt, vt) = _bhsd(q, k, v)
    out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(
        qt, kt, vt, _aligned_bias(mask, qt.shape[1]), True, 0.0, causal and mask is None)
    return _kill_dead(out.transpose(1, 2).float(), lse[..., :qt.shape[2]].float(), mask)  # lse rows pad to 32


def _sdpa_efficient_bwd(dout, q, k, v, out, lse, causal, mask):
    rep, (qt, kt, vt) = _bhsd(q, k, v)
    sq = qt.shape[2]
    lse_padded = F.pad(lse, (0, -sq % 32)).contiguous()  # the layout the forward hands its backward
    seed, offset = (torch.empty((), dtype=torch.int64, device=q.device) for _ in range(2))
    dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
        dout.to(q.dtype).transpose(1, 2), qt, kt, vt, _aligned_bias(mask, qt.shape[1]),
        out.to(q.dtype).transpose(1, 2), lse_padded, seed, offset, 0.0, [True, True, True, False],
        causal and mask is None)
    return _grads(dq, dk, dv, rep)


# ----------------------------------------------------------------------------- flash-attn package
@functools.cache
def _flash_attn_calls():
    """(forward, backward, extra keyword arguments each accepts), matched to the installed version."""
    from flash_attn.flash_attn_interface import _flash_attn_backward, _flash_attn_forward

    def extras(fn, own):
        names = inspect.signature(getattr(fn, "_init_fn", fn)).parameters
        kw = dict(own)
        if "window_size_left" in names:
            kw.update(window_size_left=-1, window_size_right=-1)
        elif "window_size" in names:
            kw["window_size"] = (-1, -1)
        kw.update({k: v for k, v in (("softcap", 0.0), ("alibi_slopes", None)) if k in names})
        return {k: v for k, v in kw.items() if k in names}

    return (_flash_attn_forward, _flash_attn_backward,
            extras(_flash_attn_forward, {"return_softmax": False}),
            extras(_flash_attn_backward, {"deterministic": False, "rng_state": None}))


def _flash_attn_fwd(q, k, v, causal, mask):  # pragma: no cover - needs CUDA + flash-attn
    fwd, _, kw, _ = _flash_attn_calls()
    res = fwd(q.contiguous(), k.contiguous(), v.contiguous(), dropout_p=0.0, softmax_scale=q.shape[-1] ** -0.5,
              causal=causal, **kw)
    out, lse = res[0], res[1] if len(res) == 4 else res[5]  # 2.6+: (out, lse, p, rng); older: 8 outputs
    return out.float(), lse.float()


def _flash_attn_bwd(dout, q, k, v, out, lse, causal, mask):  # pragma: no cover - needs CUDA + flash-attn
    _, bwd, _, kw = _flash_attn_calls()
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)  # GQA native: dk/dv as k
    bwd(dout.to(q.dtype).contiguous(), q, k, v, out.to(q.dtype).contiguous(), lse.contiguous(), dq, dk, dv,
        dropout_p=0.0, softmax_scale=q.shape[-1] ** -0.5, causal=causal, **kw)
    return dq.float(), dk.float(), dv.float()


_FORWARD = {"cpu_flash": _cpu_flash_fwd, "math": _math_fwd, "sdpa_flash": _sdpa_flash_fwd,
            "sdpa_efficient": _sdpa_efficient_fwd, "flash_attn": _flash_attn_fwd}
_BACKWARD = {"cpu_flash": _cpu_flash_bwd, "math": _math_bwd, "sdpa_flash": _sdpa_flash_bwd,
             "sdpa_efficient": _sdpa_efficient_bwd, "flash_attn": _flash_attn_bwd}
