"""Activation memory per block: ``parallel.activation_checkpoint`` = none | full | selective | offload, or
``full+offload`` / ``selective+offload``.

- ``full``: each block keeps only its input and recomputes its forward in backward (torch's non-reentrant
  checkpoint).
- ``selective``: torch's selective checkpointing (``create_selective_checkpoint_contexts``): in a checkpointed
  block the outputs of the ops named by ``parallel.ac_save_ops`` are kept (default: the matmuls and the attention
  kernels, see :data:`SAVE_OPS`) and everything else — norms, RoPE, SwiGLU's elementwise products, casts — is
  recomputed in backward. ``parallel.ac_every: N`` checkpoints every Nth block of each model part (pipeline
  stage), counted from 1, and leaves the others alone (torchtitan's selective layer mode); with
  ``ac_save_ops: ""`` those blocks recompute everything (plain full checkpointing of every Nth block).
- ``offload``: every block's saved activations go to host memory in forward and come back for backward
  (``parallel/offload.py``: saved-tensor hooks; side stream and pinned buffers on CUDA).
- ``full+offload``: blocks are checkpointed and their inputs — all full checkpointing keeps — are offloaded.
- ``selective+offload``: checkpointed blocks offload their inputs (the op outputs selective checkpointing keeps
  stay on the device: torch holds them outside the saved-tensor hooks) and the blocks ``ac_every`` leaves out
  offload everything they save.

Refused (:func:`check`): ``none`` with anything, ``full`` with ``selective``, a mode twice, an unknown op name,
``ac_every``/``ac_save_ops`` away from their defaults without ``selective``, and offload with ``parallel.compile``
(dynamo does not trace the saved-tensor hooks).

Every mode applies through ``checkpoint_wrapper``, so a wrapped block's parameters carry the one prefix
(``_checkpoint_wrapped_module.``) checkpoints and imports already strip.
"""
from __future__ import annotations

import contextlib
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as torch_checkpoint

MODES = ("none", "full", "selective", "offload")
DEFAULT_SAVE_OPS = "matmul,attention"


def _aten(*names: str) -> list:
    """The default overloads of these aten ops that this torch has."""
    return [getattr(torch.ops.aten, n).default for n in names if hasattr(torch.ops.aten, n)]


def _attention_ops() -> list:
    """The attention kernels the backends call (``trainer/attention.py``: SDPA dispatches to them;
    ``parallel/cp/block_kernels.py`` and ``parallel/cp/varlen.py`` call them directly), flash-attn's own ops where
    it is installed, and FlexAttention's (compiled CUDA blocks)."""
    ops = _aten("_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
                "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
                "_flash_attention_forward", "_efficient_attention_forward")
    for name in ("_flash_attn_forward", "_flash_attn_varlen_forward"):  # flash-attn >= 2.6 registers torch ops
        ns = getattr(torch.ops, "flash_attn", None)
        try:
            ops.append(getattr(ns, name).default)
        except (AttributeError, RuntimeError):
            pass
    flex = getattr(torch.ops.higher_order, "flex_attention", None)
    return ops + ([flex] if flex is not None else [])


# Names ``parallel.ac_save_ops`` takes: aten op names, and two groups.
SAVE_OPS = {
    "matmul": lambda: _aten("mm", "addmm", "bmm"),
    "attention": _attention_ops,
    "mm": lambda: _aten("mm"), "addmm": lambda: _aten("addmm"), "bmm": lambda: _aten("bmm"),
    **{n: partial(_aten, n) for n in ("_scaled_dot_product_flash_attention",
                                      "_scaled_dot_product_flash_attention_for_cpu",
                                      "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
                                      "_flash_attention_forward", "_efficient_attention_forward")},
}


def parse_mode(value: str) -> frozenset[str]:
    """``full+offload`` -> {full, offload}; a ValueError naming what is valid for anything else."""
    parts = [p.strip() for p in value.split("+")]
    valid = "none, full, selective, offload, full+offload or selective+offload"
    if any(p not in MODES for p in parts):
        raise ValueError(f"must be {valid}, got {value!r}")
    modes = frozenset(parts)
    if len(modes) != len(parts) or ("none" in modes and len(modes) > 1) or {"full", "selective"} <= modes:
        raise ValueError(f"{value!r} does not combine: use {valid}")
    return modes - {"none"}


def save_op_names(value: str) -> list[str]:
    """The names in ``parallel.ac_save_ops`` (comma-separated); a ValueError naming the valid ones."""
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in SAVE_OPS]
    if unknown:
        raise ValueError(f"unknown op {unknown[0]!r}; valid: {', '.join(SAVE_OPS)}")
    return names


def check(par) -> None:
    """``parallel.activation_checkpoint`` and its settings (``par``: the ``parallel`` section); a ConfigError
    naming the field."""
    from loomtrain.errors import ConfigError

    try:
        modes = parse_mode(par.activation_checkpoint)
    except ValueError as e:
        raise ConfigError(f"parallel.activation_checkpoint: {e}") from None
    try:
        save_op_names(par.ac_save_ops)
    except ValueError as e:
        raise ConfigError(f"parallel.ac_save_ops: {e}") from None
    if par.ac_every < 1:
        raise ConfigError(f"parallel.ac_every: must be >= 1, got {par.ac_every}")
    if "selective" not in modes:
        if par.ac_every != 1:
            raise ConfigError(f"parallel.ac_every: only used with activation_checkpoint selective or "
                              f"selective+offload, got {par.activation_checkpoint!r}")
        if par.ac_save_ops != DEFAULT_SAVE_OPS:
            raise ConfigError(f"parallel.ac_save_ops: only used with activation_checkpoint selective or "
                              f"selective+offload, got {par.activation_checkpoint!r}")
    if "offload" in modes and par.compile:
        raise ConfigError("parallel.compile: not with activation_checkpoint offload (torch.compile does not trace "
                          "its saved-tensor hooks); use full or selective")


def _selective_context(op_names: list[str]):
    """The ``context_fn`` of torch's selective checkpointing: keep these ops' outputs, recompute the rest."""
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    ops = [op for name in op_names for op in SAVE_OPS[name]()]
    return partial(create_selective_checkpoint_contexts, ops)


def _run(module, *args, checkpoint: bool, context_fn=None, offloader=None, **kwargs):
    """A wrapped block's forward: checkpointed or not, under the offload hooks or not."""
    with offloader.block() if offloader is not None else contextlib.nullcontext():
        if not checkpoint:
            return module(*args, **kwargs)
        extra = {"context_fn": context_fn} if context_fn is not None else {}
        return torch_checkpoint(module, *args, use_reentrant=False, preserve_rng_state=False, **extra, **kwargs)


def apply_ac(model: nn.Module, mode: str = "full", every: int = 1, save_ops: str = DEFAULT_SAVE_OPS,
             min_offload_bytes: int | None = None, offloader=None):
    """Wrap ``model.layers`` for ``mode`` (see the module docstring); returns the Offloader when offloading (its
    counters say what moved), else None. ``min_offload_bytes``: smaller tensors stay on the device (default:
    ``parallel/offload.py::CUDA_MIN_BYTES`` on CUDA, every tensor elsewhere); ``offloader``: the Offloader to use
    (tests hand one with logging copies)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    from loomtrain.parallel.offload import Offloader

    modes = parse_mode(mode)
    if "offload" not in modes:
        offloader = None
    elif offloader is None:
        offloader = Offloader(min_offload_bytes)
    context_fn = _selective_context(save_op_names(save_ops)) if "selective" in modes and save_ops.strip() else None
    for i, (name, block) in enumerate(list(model.layers.items())):
        checkpointed = "full" in modes or ("selective" in modes and (i + 1) % every == 0)
        if not checkpointed and offloader is None:
            continue
        fn = partial(_run, checkpoint=checkpointed, context_fn=context_fn if checkpointed else None,
                     offloader=offloader)
        model.layers[name] = checkpoint_wrapper(block, checkpoint_fn=fn)
    return offloader
