"""The attention backend of a run, and the kernels of one context-parallel block.

**The run's backend** (``run_backend``): one name per run, for the model's attention and for every
context-parallel block, from what the machine offers (``machine``: compute capability, torch and cuDNN
versions, flash-attn 2 and FlashAttention-3 installed) and the run's dtype and head size:

==================  ============================================================================
backend             chosen (``requested="auto"``) when
==================  ============================================================================
``cpu_flash``       CPU tensors (torch's CPU flash op)
``sdpa_efficient``  CUDA with fp32 (flash kernels take fp16/bf16 only), head_dim not a multiple of 8
                    or above 256, a GPU older than sm80; and every block with a mask
``fa3``             CUDA fp16/bf16 on sm90 with FlashAttention-3 installed (``flash_attn_interface``):
                    activated once in torch (``torch.nn.attention.activate_flash_attention_impl``),
                    so torch's flash op runs FA3
``cudnn``           otherwise on sm90+ with torch >= 2.10 and cuDNN 9, head_dim <= 128, unless
                    deterministic algorithms are on (cuDNN's backward is not deterministic)
``flash_attn``      otherwise with flash-attn 2 installed on sm80/sm90 (its kernels stop at sm9x)
``sdpa_flash``      otherwise (torch's own FlashAttention-2 op)
``math``            devices other than CPU and CUDA; an explicit fp32 softmax (the tests' twin)
==================  ============================================================================

A forced choice (``requested=``) is checked: a backend this machine lacks, or one that cannot take the
run's dtype or head size, is a ValueError naming those that can.

**Per block** (``choose``): the same rule, so context-parallel blocks run the run's backend. A forced
``kernel`` (pass the run's backend) serves every block it can; a masked block falls back to a maskable
kernel, and a block in a dtype or head size a flash kernel cannot take falls back to the rule.

Forward returns (out, lse); backward is exact given the *final* out and lse of the query rows (so
partial gradients of a merged result add up). Grouped-query attention: K/V go to the kernels with their
own heads (dk/dv come back so) except to ``sdpa_efficient`` and ``math``, which need them repeated, and
to ``cpu_flash`` on a torch whose CPU op does not take fewer K/V heads (probed once).

Blocks of packed documents with sorted document ids never need a mask: ``context.py`` cuts
them into unmasked rectangles, so on CUDA the masked kernel only serves unsorted ids.

Tested (tests/test_block_kernels.py, tests/test_attention_backends.py): ``cpu_flash`` and ``math``
numerically against float64 on CPU; ``flash_attn`` numerically on CPU through a stand-in package that
enforces flash-attn 2.8's contract (dtype, layout, head size, heads; ``flash_api.cpp``);
``sdpa_flash``, ``fa3`` (torch's flash op), ``cudnn`` and ``sdpa_efficient`` by their exact aten calls
on meta tensors (argument order, shapes, K/V heads, lse padding), and numerically by tests marked
``gpu``. The choice of backend is tested against modelled machines (H100/A100/B200/T4, with and without
flash-attn, FA3, cuDNN).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import inspect
import re

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import _disable_current_modes

BACKENDS = ("cudnn", "fa3", "flash_attn", "sdpa_flash", "sdpa_efficient", "cpu_flash", "math")
KERNELS = ("auto",) + BACKENDS
MASKABLE = ("cpu_flash", "math", "sdpa_efficient")
HALF_ONLY = ("cudnn", "fa3", "flash_attn", "sdpa_flash")  # fp16/bf16 kernels (fp32 is an error in each)
_MAX_HEAD_DIM = {"cudnn": 128, "fa3": 256, "flash_attn": 256, "sdpa_flash": 256}
_HALF = (torch.float16, torch.bfloat16)

# The torch SDPA backend (``torch.nn.attention.SDPBackend`` member name) that runs each backend, for
# callers of ``F.scaled_dot_product_attention``; ``flash_attn`` is called directly.
SDPA_BACKEND = {"cudnn": "CUDNN_ATTENTION", "fa3": "FLASH_ATTENTION", "sdpa_flash": "FLASH_ATTENTION",
                "sdpa_efficient": "EFFICIENT_ATTENTION", "cpu_flash": "FLASH_ATTENTION", "math": "MATH"}

_DESCRIPTIONS = {
    "cudnn": "cuDNN fused attention (torch aten._scaled_dot_product_cudnn_attention)",
    "fa3": "FlashAttention-3 through torch's flash op (torch.nn.attention FA3)",
    "flash_attn": "FlashAttention-2 (flash-attn package)",
    "sdpa_flash": "torch's FlashAttention-2 (aten._scaled_dot_product_flash_attention)",
    "sdpa_efficient": "torch's memory-efficient attention (aten._scaled_dot_product_efficient_attention)",
    "cpu_flash": "torch's CPU flash attention",
    "math": "explicit fp32 softmax",
}


def check_kernel(name: str) -> str:
    """``name`` if it is a kernel (``auto``: chosen per block), else a ValueError naming the choices."""
    if name not in KERNELS:
        raise ValueError(f"kernel: must be one of {', '.join(KERNELS)}, got {name!r}")
    return name


def describe(name: str) -> str:
    """One phrase for the start line, e.g. ``cudnn (cuDNN fused attention (...))``."""
    return f"{name} ({_DESCRIPTIONS[name]})"


# ----------------------------------------------------------------------------- what the machine offers
@dataclasses.dataclass(frozen=True)
class Machine:
    """What ``run_backend`` reads of the machine; tests build one to model a GPU (an H100 with and
    without flash-attn, FA3 or cuDNN) on CPU."""
    device_type: str
    capability: tuple[int, int] | None = None  # CUDA compute capability, e.g. (9, 0) on H100/H200
    torch_version: tuple[int, int] = (0, 0)
    cudnn_version: int | None = None  # torch.backends.cudnn.version(), None without cuDNN
    flash_attn: bool = False  # flash-attn 2 (flash_attn.flash_attn_interface) importable
    fa3: bool = False  # FlashAttention-3 (flash_attn_interface) importable and torch's "FA3" registered


@functools.cache
def flash_attn_installed() -> bool:
    try:  # imported, not just found: a wheel built for another torch fails here (undefined symbol)
        importlib.import_module("flash_attn.flash_attn_interface")
    except ImportError:
        return False
    return True


def _fa3_installed() -> bool:
    """FA3's Python module (the ``hopper`` build's ``flash_attn_interface``) is importable and this
    torch can route its flash op to it (``torch.nn.attention``'s FA3 registry, torch >= 2.10)."""
    try:
        import torch.nn.attention as attention
        registered = "FA3" in attention.list_flash_attention_impls()
    except (ImportError, AttributeError):
        return False
    return registered and importlib.util.find_spec("flash_attn_interface") is not None


def _torch_version() -> tuple[int, int]:
    major, minor = re.match(r"(\d+)\.(\d+)", torch.__version__).groups()
    return int(major), int(minor)


@functools.cache
def machine(device_type: str) -> Machine:
    """This machine, probed once per device type."""
    if device_type != "cuda" or not torch.cuda.is_available():
        return Machine(device_type, torch_version=_torch_version())
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return Machine(device_type, tuple(torch.cuda.get_device_capability()), _torch_version(), cudnn,
                   flash_attn_installed(), _fa3_installed())


def available_backends(device_type: str, probe: Machine | None = None) -> tuple[str, ...]:
    """The backends this machine can run on ``device_type``, in ``BACKENDS`` order (preference aside)."""
    m = probe or machine(device_type)
    if device_type == "cpu":
        return ("cpu_flash", "math")
    if device_type != "cuda" or m.capability is None:
        return ("math",)
    cap = m.capability
    offered = {
        "cudnn": cap >= (8, 0) and (m.cudnn_version or 0) >= 90000,
        "fa3": m.fa3 and cap[0] == 9,  # torch's FA3 checks "compute capability 9.0"
        "flash_attn": m.flash_attn and cap[0] in (8, 9),  # flash_api.cpp: "Ampere GPUs or newer" = sm8x/sm90
        "sdpa_flash": cap >= (8, 0),
        "sdpa_efficient": True,
        "math": True,
    }
    return tuple(name for name in BACKENDS if offered.get(name, False))


def _takes(name: str, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether kernel ``name`` takes this dtype and head size at all."""
    if name not in HALF_ONLY:
        return True
    return dtype in _HALF and head_dim % 8 == 0 and head_dim <= _MAX_HEAD_DIM[name]


def run_backend(device_type: str, dtype: torch.dtype, head_dim: int, requested: str = "auto",
                probe: Machine | None = None, deterministic: bool | None = None) -> str:
    """The attention backend of a run on ``device_type`` in ``dtype`` with heads of ``head_dim``.

    ``requested``: ``auto`` (the table in this module's docstring) or one of ``BACKENDS``, checked.
    ``probe``: the machine (default: this one). ``deterministic``: default
    ``torch.are_deterministic_algorithms_enabled()`` (strict mode excludes cuDNN, as torch's SDPA does).
    """
    m = probe or machine(device_type)
    if deterministic is None:
        deterministic = (torch.are_deterministic_algorithms_enabled()
                         and not torch.is_deterministic_algorithms_warn_only_enabled())
    offered = [name for name in available_backends(device_type, m)
               if _takes(name, dtype, head_dim) and not (deterministic and name == "cudnn")]
    if requested != "auto":
        if requested not in BACKENDS:
            raise ValueError(f"attention backend: must be auto or one of {', '.join(BACKENDS)}, got {requested!r}")
        if requested not in offered:
            raise ValueError(f"attention backend {requested!r} cannot run here ({device_type}, {dtype}, head_dim "
                             f"{head_dim}{', deterministic' if deterministic else ''}); valid: auto, "
                             f"{', '.join(offered)}")
        return requested
    if device_type == "cpu":
        return "cpu_flash"
    if device_type != "cuda":
        return "math"
    cap = m.capability or (0, 0)
    if "fa3" in offered:
        return "fa3"
    if "cudnn" in offered and cap >= (9, 0) and m.torch_version >= (2, 10):
        return "cudnn"
    for name in ("flash_attn", "sdpa_flash"):
        if name in offered:
            return name
    return "sdpa_efficient"


_FA3_ACTIVE = False


def activate(name: str) -> str:
    """Side effects a backend needs before its first call (idempotent): ``fa3`` routes torch's flash op
    to FlashAttention-3, for the whole process. Returns ``name``."""
    global _FA3_ACTIVE
    if name == "fa3" and not _FA3_ACTIVE:
        from torch.nn.attention import activate_flash_attention_impl
        activate_flash_attention_impl("FA3")
        _FA3_ACTIVE = True
    return name


# ----------------------------------------------------------------------------- per block
def choose(q: torch.Tensor, masked: bool, kernel: str = "auto", probe: Machine | None = None) -> str:
    """The kernel for a block with queries like ``q`` (B, S, H, D), with or without an additive mask."""
    return choose_for(q.device.type, q.dtype, q.shape[-1], masked, kernel, probe)


def choose_for(device_type: str, dtype: torch.dtype, head_dim: int, masked: bool, kernel: str = "auto",
               probe: Machine | None = None) -> str:
    """``run_backend``'s rule for one block. A forced ``kernel`` serves every block it can take (on any
    device: the meta-tensor tests force CUDA kernels); a masked block needs a maskable kernel and a
    half-precision kernel an fp16/bf16 block, else the block falls back to the rule."""
    if kernel != "auto" and (not masked or kernel in MASKABLE) and _takes(kernel, dtype, head_dim):
        return kernel
    if masked:
        return {"cpu": "cpu_flash", "cuda": "sdpa_efficient"}.get(device_type, "math")
    return run_backend(device_type, dtype, head_dim, probe=probe)


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


def _bhsd(q, k, v, gqa: bool = False):
    """(rep, [q, k, v] as (B, H, S, D)); K/V keep their heads if the kernel takes grouped-query
    attention (``gqa``: rep 1), else are repeated to H (rep = H / H_kv, summed back by ``_grads``)."""
    rep = 1 if gqa else q.shape[2] // k.shape[2]
    return rep, [t.transpose(1, 2) for t in (q, _repeat_kv(k, rep), _repeat_kv(v, rep))]


def _grads(dq, dk, dv, rep):
    """(B, H, S, D) gradients -> (B, S, H, D) fp32, dk/dv summed back to the KV heads."""
    return (dq.transpose(1, 2).float(), _reduce_kv(dk.transpose(1, 2).float(), rep),
            _reduce_kv(dv.transpose(1, 2).float(), rep))


def _bhsd_out(t, dtype):
    """A (B, S, H, D) out / grad-out as the kernels' (B, H, S, D) view, in ``dtype``, last dim contiguous."""
    return t.to(dtype).contiguous().transpose(1, 2)


def _dead_rows(mask):
    """(B, 1, Sq) rows a mask hides completely (kernels return lse 0 or nan there)."""
    return torch.isneginf(mask).all(-1)


def _kill_dead(out, lse, mask):
    if mask is None:
        return out, lse
    dead = _dead_rows(mask)
    return out.masked_fill(dead.transpose(1, 2).unsqueeze(-1), 0.0), lse.masked_fill(dead, float("-inf"))


# ----------------------------------------------------------------------------- CPU flash (torch)
@functools.cache
def _cpu_flash_gqa() -> bool:
    """Whether this torch's CPU flash op takes fewer K/V heads than query heads (2.13 does), forward and
    backward, with the grouping of ``repeat_interleave``: probed once on tiny fixed tensors.

    The probe runs outside every active dispatch mode: its first call may come from inside a block under
    selective checkpointing (``parallel/ac.py``), whose mode records the outputs of the attention op in call
    order and hands them back, in that order, to the block's recompute; a probe recorded there (and not
    repeated by the recompute: cached) would shift every later output by one call."""
    with _disable_current_modes():
        return _probe_cpu_flash_gqa()


def _probe_cpu_flash_gqa() -> bool:
    op, bwd = (torch.ops.aten._scaled_dot_product_flash_attention_for_cpu,
               torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward)
    q = torch.linspace(-1, 1, 4 * 3 * 8).reshape(1, 4, 3, 8)
    k, v = q[:, :2] * 0.5, q[:, 2:].flip(-1)
    kr, vr = _repeat_kv(k.transpose(1, 2), 2).transpose(1, 2), _repeat_kv(v.transpose(1, 2), 2).transpose(1, 2)
    try:
        out, lse = op(q, k, v, 0.0, True)
        dq, dk, dv = bwd(out, q, k, v, out, lse, 0.0, True)
    except RuntimeError:
        return False
    ref_out, ref_lse = op(q, kr, vr, 0.0, True)
    ref = bwd(ref_out, q, kr, vr, ref_out, ref_lse, 0.0, True)
    return (dk.shape == k.shape and torch.allclose(out, ref_out) and torch.allclose(dq, ref[0])
            and torch.allclose(dk, _reduce_kv(ref[1].transpose(1, 2), 2).transpose(1, 2)))


def _cpu_flash_fwd(q, k, v, causal, mask):
    _, (qt, kt, vt) = _bhsd(q, k, v, _cpu_flash_gqa())
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        qt, kt, vt, 0.0, causal and mask is None, attn_mask=mask)
    return _kill_dead(out.transpose(1, 2).float(), lse.float(), mask)


def _cpu_flash_bwd(dout, q, k, v, out, lse, causal, mask):
    rep, (qt, kt, vt) = _bhsd(q, k, v, _cpu_flash_gqa())
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
    _, (qt, kt, vt) = _bhsd(q, k, v, gqa=True)  # the flash op takes H_kv dividing H (mha_fwd)
    out, lse, *_ = torch.ops.aten._scaled_dot_product_flash_attention(qt, kt, vt, 0.0, causal, False)
    return out.transpose(1, 2).float(), lse.float()


def _sdpa_flash_bwd(dout, q, k, v, out, lse, causal, mask):
    # torch's flash backward is deterministic when torch.use_deterministic_algorithms(True) (not warn_only)
    rep, (qt, kt, vt) = _bhsd(q, k, v, gqa=True)  # dk/dv come back with k's heads
    seed, offset = _philox(q)
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
        _bhsd_out(dout, q.dtype), qt, kt, vt, _bhsd_out(out, q.dtype), lse.contiguous(),
        None, None, qt.shape[2], kt.shape[2], 0.0, causal, seed, offset)
    return _grads(dq, dk, dv, rep)


# ----------------------------------------------------------------------------- FlashAttention-3 via torch
def _fa3_fwd(q, k, v, causal, mask):
    """Torch's flash op with FA3 activated (torch/nn/attention/_fa3.py: same schema, lse (B, H, S) fp32)."""
    activate("fa3")
    return _sdpa_flash_fwd(q, k, v, causal, mask)


def _fa3_bwd(dout, q, k, v, out, lse, causal, mask):
    activate("fa3")  # FA3's backward reads torch.are_deterministic_algorithms_enabled() itself
    return _sdpa_flash_bwd(dout, q, k, v, out, lse, causal, mask)


# ----------------------------------------------------------------------------- cuDNN (torch)
# The cuDNN backward takes the logsumexp its forward returned: (B, H, S, 1) in torch 2.13's meta kernel;
# the shape the forward last returned is kept here so a torch that returns (B, H, S) gets that back.
_CUDNN_LSE_4D = True


def _cudnn_fwd(q, k, v, causal, mask):
    global _CUDNN_LSE_4D
    b, sq, h, _ = q.shape
    _, (qt, kt, vt) = _bhsd(q, k, v, gqa=True)  # cuDNN's graph takes K/V with their own heads
    out, lse, *_ = torch.ops.aten._scaled_dot_product_cudnn_attention(qt, kt, vt, None, True, 0.0, causal, False)
    _CUDNN_LSE_4D = lse.dim() == 4
    return out.transpose(1, 2).float(), lse.reshape(b, h, sq).float()


def _cudnn_bwd(dout, q, k, v, out, lse, causal, mask):
    rep, (qt, kt, vt) = _bhsd(q, k, v, gqa=True)
    stats = (lse.unsqueeze(-1) if _CUDNN_LSE_4D else lse).contiguous()
    seed, offset = (torch.empty((), dtype=torch.int64, device=q.device) for _ in range(2))  # dropout 0: unused
    # grad_out with out's strides (cuDNN < 9.5.1 assumes it; both (B, S, H, D) contiguous, viewed BHSD)
    dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        _bhsd_out(dout, q.dtype), qt, kt, vt, _bhsd_out(out, q.dtype), stats, seed, offset,
        None, None, None, qt.shape[2], kt.shape[2], 0.0, causal)
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


def _flash_attn_fwd(q, k, v, causal, mask):
    fwd, _, kw, _ = _flash_attn_calls()
    res = fwd(q.contiguous(), k.contiguous(), v.contiguous(), dropout_p=0.0, softmax_scale=q.shape[-1] ** -0.5,
              causal=causal, **kw)
    out, lse = res[0], res[1] if len(res) == 4 else res[5]  # 2.6+: (out, lse, p, rng); older: 8 outputs
    return out.float(), lse.float()


def _flash_attn_bwd(dout, q, k, v, out, lse, causal, mask):
    _, bwd, _, kw = _flash_attn_calls()
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)  # GQA native: dk/dv as k
    if "deterministic" in kw:  # else dq accumulates by atomic adds: bits vary run to run
        kw = {**kw, "deterministic": torch.are_deterministic_algorithms_enabled()}
    bwd(dout.to(q.dtype).contiguous(), q, k, v, out.to(q.dtype).contiguous(), lse.contiguous(), dq, dk, dv,
        dropout_p=0.0, softmax_scale=q.shape[-1] ** -0.5, causal=causal, **kw)
    return dq.float(), dk.float(), dv.float()


_FORWARD = {"cpu_flash": _cpu_flash_fwd, "math": _math_fwd, "sdpa_flash": _sdpa_flash_fwd,
            "sdpa_efficient": _sdpa_efficient_fwd, "flash_attn": _flash_attn_fwd, "fa3": _fa3_fwd,
            "cudnn": _cudnn_fwd}
_BACKWARD = {"cpu_flash": _cpu_flash_bwd, "math": _math_bwd, "sdpa_flash": _sdpa_flash_bwd,
             "sdpa_efficient": _sdpa_efficient_bwd, "flash_attn": _flash_attn_bwd, "fa3": _fa3_bwd,
             "cudnn": _cudnn_bwd}
