"""The Llama family (Llama 2/3-style decoder: RMSNorm, RoPE, SwiGLU, grouped-query attention)."""
from __future__ import annotations


class LlamaFamily:
    """``model.family: llama``. Subclass it to vary the model (``build``) and keep the rest."""

    @property
    def hf_adapter(self):
        from loomtrain.trainer import hf_export

        return hf_export

    def args(self, model_cfg, vocab_size: int, max_seq_len: int):
        from loomtrain.trainer.models.llama.model import ModelArgs

        return ModelArgs.from_config(model_cfg, vocab_size, max_seq_len)

    def build(self, args):
        from loomtrain.trainer.models.llama.model import Transformer

        return Transformer(args)


LLAMA = LlamaFamily()
