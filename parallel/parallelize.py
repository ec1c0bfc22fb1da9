"""Lay a Transformer over a DeviceMesh: ``apply_tp``, ``apply_cp``, ``apply_ac``, ``apply_compile``, ``apply_fsdp``.

Applied in that fixed order (``apply_cp`` after TP) by :func:`parallelize_model`, outside the model code
(the torchtitan pattern). Tensor parallelism uses DTensor: column-wise q/k/v/w1/w3,
row-wise wo/w2, sequence-parallel norms (activations between blocks are sharded on the
sequence dimension), and a vocabulary-parallel loss when enabled. FSDP2 (``fully_shard``)
shards over ``dp_shard_cp`` and replicates over ``dp_replicate`` (HSDP).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                               SequenceParallel, parallelize_module)


def apply_tp(model: nn.Module, tp_mesh, loss_parallel: bool) -> None:
    """Between blocks (and between pipeline stages) activations are sequence-sharded local tensors."""
    plan = {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "norm": SequenceParallel(),
        "output": ColwiseParallel(input_layouts=Shard(1),
                                  output_layouts=Shard(-1) if loss_parallel else Replicate(),
                                  use_local_output=not loss_parallel),
    }
    # A pipeline stage may lack embeddings or norm + output.
    parallelize_module(model, tp_mesh, {k: v for k, v in plan.items() if getattr(model, k) is not None})
    for block in model.layers.values():
        parallelize_module(block, tp_mesh, {
            "attention_norm": SequenceParallel(),
            "attention": PrepareModuleInput(input_layouts=(Shard(1), None), desired_input_layouts=(Replicate(), None)),
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
            "ffn_norm": SequenceParallel(),
            "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
            "feed_forward.w3": ColwiseParallel(),
        })


def apply_cp(model: nn.Module, dims, cp_mesh, impl: str) -> None:
    """Attention over the cp group's zigzag shards (the loader hands each cp rank its shard).

    TokenRing's second (result) direction needs a group per cp group; creating groups is
    collective over the world, so every rank creates all of them and keeps its own.
    """
    from loomtrain.parallel import context

    if impl == "tokenring":
        import torch.distributed as dist

        mine = dist.get_process_group_ranks(cp_mesh.get_group())
        for ranks in dims.groups("cp"):
            group = dist.new_group(ranks)
            if ranks == mine:
                context.register_reverse_group(cp_mesh.get_group(), group)
    fn = {"tokenring": context.token_ring_attention, "ring": context.ring_attention,
          "ulysses": context.ulysses_attention}[impl]
    model.context_parallel = (fn, cp_mesh.get_group())


def apply_ac(model: nn.Module) -> None:
    """Full activation checkpointing: each block recomputes its forward during backward."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for name, block in list(model.layers.items()):
        model.layers[name] = checkpoint_wrapper(block, preserve_rng_state=False)


def apply_compile(model: nn.Module) -> None:
    """Compile each block separately (repeated structure: one compilation reused by all)."""
    for block in model.layers.values():
        block.compile()


def apply_fsdp(model: nn.Module, dp_mesh, param_dtype: torch.dtype) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    blocks = list(model.layers.values())
    for i, block in enumerate(blocks):
        # The last block's parameters are needed again right away by backward: keep them.
        fully_shard(block, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=False)


def parallelize_model(model: nn.Module, dims, mesh, *, loss_parallel: bool, activation_checkpoint: str,
                      compile: bool, param_dtype: torch.dtype, cp_impl: str = "tokenring", fsdp: bool = True) -> None:
    """``fsdp=False`` leaves data parallelism to another engine (DeepSpeed)."""
    if dims.tp > 1:
        apply_tp(model, mesh["tp"], loss_parallel)
    if dims.cp > 1:
        apply_cp(model, dims, mesh["cp"], cp_impl)
    if activation_checkpoint == "full":
        apply_ac(model)
    if compile:
        apply_compile(model)
    if dims.fsdp_enabled and fsdp:
        dp_mesh = mesh["dp_replicate", "dp_shard_cp"] if dims.dp_replicate > 1 else mesh["dp_shard_cp"]
        apply_fsdp(model, dp_mesh, param_dtype)
