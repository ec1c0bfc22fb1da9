"""Model families: the interface the trainer, ``parallel/`` and ``plan`` use instead of a model's names.

``model.family`` names one of :data:`MODEL_FAMILIES` (built-in: ``llama`` and ``qwen2``, ``models/llama``). A plugin adds
one with ``MODEL_FAMILIES.add("name", family)``.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

from loomtrain.registry import Registry


@runtime_checkable
class ModelFamily(Protocol):
    """The contract of a model family.

    - ``args(model_cfg, vocab_size, max_seq_len)``: the model's arguments from the ``model`` config section
      (``vocab_size``: the tokenizer's; ``max_seq_len``: the longest row the run feeds). A dataclass with
      at least ``dim, n_layers, n_heads, n_kv_heads, head_dim, vocab_size, max_seq_len`` (the attention
      shape the cost models and checks use), ``num_params(embeddings=True)`` and
      ``flops_per_token(seq_len)`` (MFU and ``plan``); ``dataclasses.replace(args, n_layers=k)`` gives the
      arguments of a k-layer copy (adaptive sp's calibration).
    - ``build(args)``: the model, built under whatever device context the caller sets (the trainer: meta).
      It carries its own parallelisation plan, so ``parallel/`` never names a module:
      ``layers`` (a ModuleDict of the repeated blocks; activation checkpointing, compile, FSDP and DiLoCo's
      fragments act per block), ``tp_plan(loss_parallel) -> (plan, block_plan)`` for
      ``parallelize_module``, ``fsdp_units()`` (module groups sharded as units besides the blocks),
      ``pipeline_stage(layer_names, first, last)`` (a pruned copy for a pipeline stage, FQNs unchanged),
      ``init_weights(seed)`` (deterministic, on any sharding), the attributes ``context_parallel`` (the
      attention callable of ``parallel/cp`` that its attention layers call when set) and
      ``attention_backend``; ``forward(tokens, position_ids=None, doc_ids=None) -> logits``. For the chunked loss
      (``train.loss_chunk_tokens``, ``trainer/loss.py``): ``head(hidden) -> logits`` (what forward applies last:
      the final norm and the output projection; under tensor parallelism it takes this rank's sequence shard and
      gathers a chunk's shards in rank order, as ``tp_plan`` lays them out) and the attribute ``hidden_output``
      (False; the trainer sets it True on the model or pipeline stage holding the head, whose forward then
      returns the hidden states before ``head``). For the tiled MLP (``parallel.tiled_mlp_tokens``,
      ``parallel/tiled_mlp.py``): ``position_wise_modules()``, the names inside each block of the modules whose
      output at a position depends on that position's input alone (under tensor parallelism taking and giving
      sequence shards, as ``tp_plan`` lays them out).
    - ``hf_adapter``: the module that converts to and from Hugging Face (names, RoPE layout, config.json),
      or None; with it ``hf_model_type`` (config.json's model_type: what ``model.init_from`` reads and export
      writes).
    """

    hf_adapter: object

    def args(self, model_cfg, vocab_size: int, max_seq_len: int): ...

    def build(self, args): ...


MODEL_FAMILIES = Registry("model.family", "model family")
MODEL_FAMILIES.add("llama", "loomtrain.trainer.models.llama:LLAMA")
MODEL_FAMILIES.add("qwen2", "loomtrain.trainer.models.llama:QWEN2")


def model_family(name: str) -> ModelFamily:
    return MODEL_FAMILIES.get(name)
