"""The Llama family (Llama 2/3-style decoder: RMSNorm, RoPE, SwiGLU, grouped-query attention), and Qwen2 (the same
decoder with biases on q, k and v)."""
from __future__ import annotations

import dataclasses


class LlamaFamily:
    """``model.family: llama``. Subclass it to vary the model (``build``) and keep the rest."""

    hf_model_type = "llama"  # config.json's model_type (the adapter's import and export)
    qkv_bias = False

    @property
    def hf_adapter(self):
        from loomtrain.trainer import hf_export

        return hf_export

    def args(self, model_cfg, vocab_size: int, max_seq_len: int):
        from loomtrain.trainer.models.llama.model import ModelArgs

        args = ModelArgs.from_config(model_cfg, vocab_size, max_seq_len)
        return dataclasses.replace(args, qkv_bias=self.qkv_bias)

    def build(self, args):
        from loomtrain.trainer.models.llama.model import Transformer

        return Transformer(args)


class Qwen2Family(LlamaFamily):
    """``model.family: qwen2`` (Qwen2, Qwen2.5): the Llama decoder with biases on the q, k and v projections."""

    hf_model_type = "qwen2"
    qkv_bias = True


LLAMA = LlamaFamily()
QWEN2 = Qwen2Family()
