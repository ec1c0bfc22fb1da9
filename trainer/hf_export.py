"""``loomtrain export CHECKPOINT --hf OUT_DIR``: a checkpoint of any layout as a Hugging Face Llama (or Qwen2)
model; and the names and row order ``model.init_from`` imports with (``hf_import``): the Llama family's adapter.

Reads the model tensors of a DCP checkpoint at their global shapes (DCP reassembles the
shards of whatever tp/dp/pp layout wrote them, without a process group), renames them to
``LlamaForCausalLM``'s (``Qwen2ForCausalLM``'s) names and writes ``config.json``, ``model.safetensors`` and a tokenizer
``AutoTokenizer`` loads. loomtrain's RoPE rotates adjacent pairs (x[2i], x[2i+1]); Hugging
Face's rotates halves (x[i], x[i + d/2]), so the rows of q/k projections are permuted per head
(the permutation Meta-to-HF conversion uses; q.k is unchanged because both are permuted alike).
Needs ``safetensors`` (and ``tokenizers`` for the tokenizer): the ``dev`` extra.
"""
from __future__ import annotations

import json
import os
import re
import sys

import torch

from loomtrain.errors import ConfigError
from loomtrain.fsutil import atomic_write_text
from loomtrain.trainer.hf_import import FAMILIES
from loomtrain.trainer.models.llama.model import ModelArgs, canonical_name

EOS_TOKEN = "<|endoftext|>"
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_BLOCK_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight", "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight", "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight", "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight", "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight", "attention.wq.bias": "self_attn.q_proj.bias",
    "attention.wk.bias": "self_attn.k_proj.bias", "attention.wv.bias": "self_attn.v_proj.bias",
}
_ROTATED = {"attention.wq.weight": "n_heads", "attention.wk.weight": "n_kv_heads", "attention.wq.bias": "n_heads",
            "attention.wk.bias": "n_kv_heads"}  # rows in RoPE pair order: permuted per head
_TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}


def read_model_state(checkpoint: str) -> dict[str, torch.Tensor]:
    """Full (unsharded) model tensors of a DCP checkpoint, under the unsplit model's names. A run whose
    workers took local updates (dp_sync diloco | co2) saved one checkpoint per worker: what is read is the
    outer model they share (the sync's anchors), not one worker's local parameters. Nothing in the checkpoint is
    unpickled beyond DCP metadata and plain data (a checkpoint on a shared path may have been planted): one that
    would run code is refused with a one-line ``ConfigError``."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from loomtrain.trainer.checkpoint import UnsafeCheckpointError, read_dcp_metadata, safe_dcp_load

    if not os.path.isdir(checkpoint):
        raise ConfigError(f"CHECKPOINT: '{checkpoint}' is not a directory")
    prefix = "model."
    if not os.path.isfile(os.path.join(checkpoint, ".metadata")) and \
            os.path.isfile(os.path.join(checkpoint, "worker000", ".metadata")):
        checkpoint, prefix = os.path.join(checkpoint, "worker000"), "dp_sync.tensors.anchor."
    if not os.path.isfile(os.path.join(checkpoint, ".metadata")):
        deepspeed = any(f.startswith("loomtrain_rng_rank") for f in os.listdir(checkpoint))
        kind = "a DeepSpeed checkpoint (not supported by export)" if deepspeed else "not a complete DCP checkpoint"
        raise ConfigError(f"CHECKPOINT: '{checkpoint}' is {kind}")
    try:
        meta = read_dcp_metadata(checkpoint, label="CHECKPOINT").state_dict_metadata
        template = {key[len(prefix):]: torch.empty(m.size, dtype=m.properties.dtype)
                    for key, m in meta.items() if key.startswith(prefix) and isinstance(m, TensorStorageMetadata)}
        safe_dcp_load({prefix + k: v for k, v in template.items()}, checkpoint, label="CHECKPOINT", no_dist=True)
    except UnsafeCheckpointError as e:
        raise ConfigError(str(e)) from None
    out = {}
    for name, t in template.items():
        name = canonical_name(name)
        head, _, rest = name.partition(".")
        out[rest if head.isdigit() else name] = t  # interleaved stages were saved under a ModuleList index
    return out


def _halves_rope(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows (head, pair i, member j) -> (head, member j, pair i): adjacent-pair RoPE to rotate-half RoPE (a weight's
    rows or a bias)."""
    rows, rest = w.shape[0], w.shape[1:]
    return w.reshape(heads, rows // heads // 2, 2, *rest).transpose(1, 2).reshape(rows, *rest)


def hf_name(name: str, args: ModelArgs) -> tuple[str, int]:
    """(Hugging Face tensor name, head_dim if its rows are in RoPE pair order else 0) of a loomtrain parameter
    (the unsplit model's name); ``hf_import.load_pretrained`` reads with it."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name], 0
    m = _LAYER.match(name)
    if not m or m.group(2) not in _BLOCK_NAMES:
        raise ValueError(f"unexpected parameter '{name}' (no Hugging Face name)")
    return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}", args.head_dim if m.group(2) in _ROTATED else 0


def to_hf_state(state: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in state.items():
        try:
            target, rotated = hf_name(name, args)
        except ValueError as e:
            raise ValueError(f"export: {e} in the checkpoint") from None
        if rotated:
            t = _halves_rope(t, getattr(args, _ROTATED[_LAYER.match(name).group(2)]))
        out[target] = t
    return {k: v.contiguous() for k, v in out.items()}


def hf_config(args: ModelArgs, eos_id: int, dtype: str, model_type: str = "llama") -> dict:
    """``config.json``. RoPE goes where each transformers version reads it: ``rope_parameters`` (5.x: the type, theta
    and the scaling's parameters), and for a scaled RoPE also ``rope_scaling`` beside the top-level ``rope_theta``
    (4.x; 5.x takes rope_scaling in place of rope_parameters and adds rope_theta from the top level). ``model_type``:
    llama or qwen2 (whose q/k/v biases are implied by the type)."""
    from loomtrain.trainer.hf_import import FAMILIES

    rope = {"rope_type": "default", "rope_theta": args.rope_theta} | (args.rope_scaling or {})
    scaling = {"rope_scaling": dict(args.rope_scaling)} if args.rope_scaling else {}
    return scaling | {
        "architectures": [FAMILIES[model_type][1]], "model_type": model_type, "hidden_size": args.dim,
        "intermediate_size": args.ffn_hidden, "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim,
        "vocab_size": args.vocab_size, "max_position_embeddings": args.max_seq_len, "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta, "rope_parameters": rope,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
        "bos_token_id": None, "eos_token_id": eos_id, "torch_dtype": dtype,
    } | ({"use_sliding_window": False} if model_type == "qwen2" else {})


def byte_tokenizer_json(eos_id: int) -> str:
    """loomtrain's byte tokenizer (id = UTF-8 byte, ``eos_id`` ends a document) as a ``tokenizers`` model:
    byte-level BPE with the 256 byte symbols as its vocabulary and no merges."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    symbols = ByteLevel.alphabet()  # the 256 printable stand-ins of the bytes, in GPT-2's mapping
    byte_to_symbol = _gpt2_byte_symbols()
    assert set(byte_to_symbol.values()) == set(symbols)
    vocab = {byte_to_symbol[b]: b for b in range(256)}
    vocab[EOS_TOKEN] = eos_id
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(EOS_TOKEN, special=True)])
    return tok.to_str()


def _gpt2_byte_symbols() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (what ByteLevel pre-tokenization emits)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def export_hf(checkpoint: str, out_dir: str, exp) -> dict:
    """Write the Hugging Face model directory; returns a summary for the CLI. The Llama family's adapter (its
    ``hf_adapter``); a family without one is refused in one line."""
    from loomtrain.trainer.models import model_family

    family = model_family(exp.model.family)
    if family.hf_adapter is not sys.modules[__name__]:
        raise ConfigError(f"export: model.family {exp.model.family} has no Hugging Face adapter (its hf_adapter is "
                          "not loomtrain.trainer.hf_export)")
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise ConfigError("export: needs the 'safetensors' package (pip install safetensors, or loomtrain[dev])") \
            from None
    from loomtrain.data.tokenizer import build_tokenizer

    state = read_model_state(checkpoint)
    tokenizer = build_tokenizer(exp.data.tokenizer)
    vocab = state["tok_embeddings.weight"].shape[0]
    args = family.args(exp.model, vocab, exp.data.seq_len)
    args.vocab_size = vocab  # the checkpoint's, even if --config names another run's
    hf = to_hf_state(state, args)
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, ".model.safetensors.tmp")
    save_file(hf, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(out_dir, "model.safetensors"))
    dtype = str(next(iter(hf.values())).dtype).removeprefix("torch.")
    atomic_write_text(os.path.join(out_dir, "config.json"), json.dumps(hf_config(args, tokenizer.eos_id, dtype,
                                                                           family.hf_model_type), indent=2))
    if exp.data.tokenizer == "byte":
        atomic_write_text(os.path.join(out_dir, "tokenizer.json"), byte_tokenizer_json(tokenizer.eos_id))
        eos = EOS_TOKEN
    else:
        with open(exp.data.tokenizer) as f:
            atomic_write_text(os.path.join(out_dir, "tokenizer.json"), f.read())
        eos = tokenizer._tok.id_to_token(tokenizer.eos_id) or EOS_TOKEN
    atomic_write_text(os.path.join(out_dir, "tokenizer_config.json"), json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "model_max_length": args.max_seq_len,
        "clean_up_tokenization_spaces": False}, indent=2))
    return {"parameters": sum(t.numel() for t in hf.values()), "tensors": len(hf), "out_dir": out_dir,
            "architecture": FAMILIES[family.hf_model_type][1]}
