"""Tiled MLP (``parallel.tiled_mlp_tokens``): a block's position-wise modules run over tiles of the sequence, each
tile under its own checkpoint, so only one tile's intermediates ever exist (ALST's TiledMLP, arXiv 2506.13996).

At long sequence the SwiGLU MLP's intermediates dominate a block's activations: four (rows x positions x
ffn_hidden) tensors (``w1``'s and ``w3``'s outputs, the silu and the product) against one (rows x positions x dim)
input, ffn_hidden being ~3.5 x dim. Here the module's input is split along the sequence into tiles of at most
``tokens`` tokens, each tile runs under torch's non-reentrant checkpoint and the outputs are concatenated: forward
keeps nothing of a tile but its input (a view of the module's input, which the untiled MLP keeps too), and backward
recomputes one tile's intermediates at a time (autograd finishes the last-made tile's nodes before the next).
Unlike DeepSpeed's ``TiledMLP`` (an autograd.Function that runs a nested backward per tile and accumulates weight
gradients itself), the backward graph is the one forward built: weight gradients reach ``.grad`` through autograd as
always, so FSDP2's hooks, pipeline schedules and ``torch.autograd.grad`` see nothing different.

The modules come from the model (``model.position_wise_modules()``: names inside each block of ``model.layers``);
nothing here knows them. Each is wrapped with ``checkpoint_wrapper`` (``parallel/ac.py`` wraps the blocks the same
way), so parameter names only gain the ``_checkpoint_wrapped_module.`` prefix that checkpoints and imports strip.

Layouts. A position-wise module gives each position's output from that position's input alone, so any split of
the positions is exact. Under tensor parallelism the input is this rank's sequence shard (a DTensor sharded on the
sequence, or its local tensor) and the module's own plan gathers it and scatters its output (Llama: the input
gathered to replicated, column- then row-parallel, reduce-scattered on the sequence); every rank tiles its local
shard, so a tile is gathered from the same tile of every rank and its output scattered back to the same ranks: the
tile's positions come back where they belong. Tokens count as the module's matmuls see them: rows x positions x
shards (as ``train.loss_chunk_tokens`` counts logits rows). Context and pipeline parallelism hand each rank a part
of the sequence or of the layers; the tiling is local. With activation checkpointing the tiles' checkpoints nest
inside the block's (torch supports nesting; ``full``'s recompute then holds one tile's intermediates); offload's
saved-tensor hooks do not see inside a tile (its checkpoint's hooks are innermost), so what offload moves of the
MLP is its input.
"""
from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint as torch_checkpoint


def check(par) -> None:
    """``parallel.tiled_mlp_tokens``: 0 (off) or a positive token count; a ConfigError naming the field."""
    from loomtrain.errors import ConfigError

    if par.tiled_mlp_tokens < 0:
        raise ConfigError(f"parallel.tiled_mlp_tokens: must be >= 0 (0 = off, N = tiles of at most N tokens), "
                          f"got {par.tiled_mlp_tokens}")


def tile_positions(x: torch.Tensor, tokens: int) -> int:
    """Positions per tile of ``x`` (rows, positions, ...): at most ``tokens`` tokens as the module's matmuls see
    them (rows x positions x the shards of a DTensor sharded on the sequence), at least one position."""
    shards = x.shape[1] // x.to_local().shape[1] if isinstance(x, DTensor) else 1
    return max(1, tokens // (x.shape[0] * shards))


def _split(x: torch.Tensor, positions: int) -> list[torch.Tensor]:
    """``x`` cut along dim 1 into pieces of ``positions`` (the last shorter); a DTensor cut on its local tensor,
    each piece the same placements (a sharded sequence: every rank's piece i together form tile i)."""
    if not isinstance(x, DTensor):
        return list(x.split(positions, dim=1))
    return [DTensor.from_local(t, x.device_mesh, x.placements, run_check=False)
            for t in x.to_local().split(positions, dim=1)]


def _cat(pieces: list[torch.Tensor]) -> torch.Tensor:
    """The inverse of :func:`_split` for the module's outputs (local tensors, or DTensors of equal placements)."""
    if not isinstance(pieces[0], DTensor):
        return torch.cat(pieces, dim=1)
    first = pieces[0]
    return DTensor.from_local(torch.cat([p.to_local() for p in pieces], dim=1), first.device_mesh, first.placements,
                              run_check=False)


def tiled_forward(module: nn.Module, x: torch.Tensor, *, tokens: int) -> torch.Tensor:
    """``module(x)`` over tiles of at most ``tokens`` tokens along dim 1, each under a non-reentrant checkpoint
    (``checkpoint_wrapper``'s ``checkpoint_fn``: ``module`` is the wrapped module, called with its hooks, so a
    tensor-parallel plan gathers and scatters per tile). One tile: ``module(x)`` as it is, nothing recomputed;
    without autograd (evaluation) the tiles run plainly, one at a time."""
    pieces = _split(x, tile_positions(x, tokens))
    if len(pieces) == 1:
        return module(x)
    if not torch.is_grad_enabled():
        return _cat([module(p) for p in pieces])
    return _cat([torch_checkpoint(module, p, use_reentrant=False, preserve_rng_state=False) for p in pieces])


def apply_tiled_mlp(model: nn.Module, tokens: int) -> int:
    """Wrap each block's position-wise modules (``model.position_wise_modules()``) to run over tiles of at most
    ``tokens`` tokens; returns how many were wrapped. Before ``apply_ac``, which wraps the blocks around them."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    from loomtrain.errors import ConfigError

    if not hasattr(model, "position_wise_modules"):
        raise ConfigError(f"parallel.tiled_mlp_tokens: the model ({type(model).__name__}) names no position-wise "
                          f"modules (position_wise_modules()); set 0")
    wrapped = 0
    for block in model.layers.values():
        for name in model.position_wise_modules():
            parent_name, _, attr = name.rpartition(".")
            parent = block.get_submodule(parent_name) if parent_name else block
            setattr(parent, attr, checkpoint_wrapper(getattr(parent, attr),
                                                     checkpoint_fn=partial(tiled_forward, tokens=tokens)))
            wrapped += 1
    return wrapped
