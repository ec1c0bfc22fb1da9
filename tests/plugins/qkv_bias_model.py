"""A model family from outside loomtrain: Llama with biases on the q/k/v projections, as Qwen2 has.

Registered as ``model.family: llama_qkv_bias``. Tensor parallelism shards the biases with their
column-parallel weights (the Llama plan already names wq/wk/wv); nothing else changes.
"""
from torch import nn

from loomtrain.trainer.models import MODEL_FAMILIES
from loomtrain.trainer.models.llama import LlamaFamily


class QKVBiasFamily(LlamaFamily):
    hf_adapter = None  # no Hugging Face conversion for this family

    def build(self, args):
        model = super().build(args)
        for block in model.layers.values():
            att = block.attention
            for name in ("wq", "wk", "wv"):
                old = getattr(att, name)
                setattr(att, name, nn.Linear(old.in_features, old.out_features, bias=True))
        return model


MODEL_FAMILIES.add("llama_qkv_bias", QKVBiasFamily())
