"""Lay a model over a DeviceMesh: ``apply_tp``, ``apply_cp``, ``apply_tiled_mlp``, ``apply_ac``, ``apply_compile``,
``apply_fsdp``.

Applied in that fixed order by :func:`parallelize_model`, outside the model code (the
torchtitan pattern). Nothing here knows a module name: the model family supplies its plan
(torchtitan's TrainSpec idea) through this protocol:

- ``model.layers``: the repeated blocks (a ModuleDict); AC (and activation offload), compile and FSDP act per block;
- ``model.tp_plan(loss_parallel) -> (plan, block_plan)``: ``parallelize_module`` plans;
- ``model.fsdp_units() -> [[module, ...], ...]``: groups FSDP shards on their own;
- ``model.position_wise_modules() -> [name, ...]``: modules inside each block that the tiled MLP runs over tiles;
- ``model.context_parallel``: set here to the ``ContextParallelAttention`` its attention layers call.

FSDP2 (``fully_shard``) shards over ``dp_shard_cp`` and replicates over ``dp_replicate`` (HSDP).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor.parallel import parallelize_module


def loss_parallel_context(enabled: bool):
    """Vocabulary-parallel cross entropy over tensor-parallel logits (a context manager)."""
    if enabled:
        from torch.distributed.tensor.parallel import loss_parallel

        return loss_parallel()
    import contextlib

    return contextlib.nullcontext()


def apply_tp(model: nn.Module, tp_mesh, loss_parallel: bool) -> None:
    """DTensor tensor parallelism with the model's own plan."""
    plan, block_plan = model.tp_plan(loss_parallel)
    parallelize_module(model, tp_mesh, plan)
    for block in model.layers.values():
        parallelize_module(block, tp_mesh, block_plan)


def apply_cp(model: nn.Module, dims, cp_mesh, impl) -> None:
    """Attention over the cp group's zigzag shards (the loader hands each cp rank its shard), by the
    registered strategy ``impl`` (``parallel/cp``; a name, or a two-dimensional strategy bound to its Ulysses
    group size). The process groups it needs beyond the cp group (TokenRing's reverse direction, a 2-D
    strategy's inner and outer groups) are made collectively for every cp group (``parallel.cp.build``).
    """
    from loomtrain.parallel.cp import build

    # The run's attention backend (``model.attention_backend``) serves the cp blocks too.
    model.context_parallel = build(impl, cp_mesh.get_group(), dims.groups("cp"),
                                   kernel=getattr(model, "attention_backend", "auto"))


def apply_tiled_mlp(model: nn.Module, tokens: int) -> None:
    """Each block's position-wise modules over tiles of at most ``tokens`` tokens (``parallel/tiled_mlp.py``)."""
    from loomtrain.parallel import tiled_mlp

    tiled_mlp.apply_tiled_mlp(model, tokens)


def apply_ac(model: nn.Module, mode: str = "full", every: int = 1, save_ops: str | None = None):
    """Activation checkpointing and offload per block, by ``mode`` (``parallel/ac.py``): none, full, selective,
    offload, full+offload, selective+offload. Returns the offloader when offloading, else None."""
    from loomtrain.parallel import ac

    return ac.apply_ac(model, mode, every, ac.DEFAULT_SAVE_OPS if save_ops is None else save_ops)


def apply_compile(model: nn.Module) -> None:
    """Compile each block separately (repeated structure: one compilation reused by all)."""
    for block in model.layers.values():
        block.compile()


def apply_fsdp(model: nn.Module, dp_mesh, param_dtype: torch.dtype, keep_gathered: bool = False) -> None:
    """Each block, each of the model's ``fsdp_units`` and then the root are FSDP units.

    Parameters are resharded after forward (gathered again for backward) except where that
    buys nothing: the last block and the final unit, which backward needs at once, and
    everything with ``keep_gathered``: under pipeline parallelism, whose schedule would re-gather each
    unit for every microbatch (torchtitan's choice too), and under adaptive sequence parallelism,
    whose ranks run different numbers of micro-batches (one gather per step keeps collectives aligned).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    blocks = list(model.layers.values())
    for i, block in enumerate(blocks):
        fully_shard(block, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=not keep_gathered and i < len(blocks) - 1)
    units = model.fsdp_units()
    for j, unit in enumerate(units):
        fully_shard(unit, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=not keep_gathered and j < len(units) - 1)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=False)


def parallelize_model(model: nn.Module, dims, mesh, *, loss_parallel: bool, activation_checkpoint: str,
                      compile: bool, param_dtype: torch.dtype, cp_impl: str = "tokenring", fsdp: bool = True,
                      keep_gathered: bool = False, ac_every: int = 1, ac_save_ops: str | None = None,
                      tiled_mlp_tokens: int = 0) -> None:
    """``fsdp=False`` leaves data parallelism to another engine (DeepSpeed); ``keep_gathered``: FSDP units stay
    gathered from the first forward to the step's last backward (pipeline stages, adaptive sp);
    ``activation_checkpoint``, ``ac_every``, ``ac_save_ops``: ``parallel/ac.py``; ``tiled_mlp_tokens`` (0: off):
    ``parallel/tiled_mlp.py``."""
    if dims.tp > 1:
        apply_tp(model, mesh["tp"], loss_parallel)
    if dims.cp > 1:
        apply_cp(model, dims, mesh["cp"], cp_impl)
    if tiled_mlp_tokens:
        apply_tiled_mlp(model, tiled_mlp_tokens)
    if activation_checkpoint != "none":
        apply_ac(model, activation_checkpoint, ac_every, ac_save_ops)
    if compile:
        apply_compile(model)
    if dims.fsdp_enabled and fsdp:
        hsdp = dims.dp_replicate > 1 and not dims.local_updates  # workers with local updates shard inside only
        dp_mesh = mesh["dp_replicate", "dp_shard_cp"] if hsdp else mesh["dp_shard_cp"]
        apply_fsdp(model, dp_mesh, param_dtype, keep_gathered)
