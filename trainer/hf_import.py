"""``model.init_from: DIR``: start a run from a Hugging Face model directory (config.json, safetensors, tokenizer).

Two halves. :func:`resolve_init_from` runs when the config is loaded, before any work: it reads config.json and
every safetensors header (no tensor data), checks that the tensors the model needs are all there with the shapes
config.json implies, and fills the ``model`` section (family, shape, vocabulary, RoPE) and ``data.tokenizer`` from
the directory; a YAML value that contradicts config.json is a one-line error. :func:`load_pretrained` runs on every
rank once its model is parallelized: it fills each parameter's local shard (DTensor or plain) with only that
region of the file, through safetensors' lazy slices, so a rank's host memory while loading is about one shard
plus the rows of a few attention heads. The names and the q/k row order come from the Llama adapter
(``hf_export``): Hugging Face rotates halves of each head, loomtrain adjacent pairs.

Decisions: tied embeddings (Llama 3.2 1B/3B, small Qwen2 models) are untied on import: the output projection
starts as a copy of the embedding and the two train apart (an export then writes both, ``tie_word_embeddings:
false``). A YAML ``model.rope_theta`` or ``model.rope_scaling`` overrides config.json's: changing RoPE is what a
context extension does.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

from loomtrain.errors import ConfigError

FIELD = "model.init_from"
# config.json's model_type -> (loomtrain model family, the architectures entry transformers writes)
FAMILIES = {"llama": ("llama", "LlamaForCausalLM"), "qwen2": ("qwen2", "Qwen2ForCausalLM")}
# model.<key> -> config.json's key
SHAPE_KEYS = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
              "n_kv_heads": "num_key_value_heads", "ffn_hidden": "intermediate_size", "vocab_size": "vocab_size",
              "norm_eps": "rms_norm_eps"}
IGNORED_TENSORS = (".rotary_emb.inv_freq",)  # buffers old exports saved; loomtrain computes its own


@dataclass
class HFModel:
    """What a Hugging Face directory holds, read and checked (headers only)."""

    path: str
    family: str
    shape: dict  # model.<key> -> value
    rope_theta: float
    rope_scaling: dict | None  # rope_parameters without rope_theta (rope_type linear|llama3|yarn), or None
    tied: bool
    qkv_bias: bool
    files: dict = field(default_factory=dict)  # tensor name -> safetensors file (absolute)
    tokenizer: str | None = None  # tokenizer.json beside config.json


def _fail(path: str, message: str) -> ConfigError:
    return ConfigError(f"{FIELD}: {path}: {message}")


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, ValueError) as e:
        raise _fail(path, f"not readable JSON ({type(e).__name__}: {e})") from None
    if not isinstance(value, dict):
        raise _fail(path, "expected a JSON object")
    return value


def _rope(cfg: dict, path: str) -> tuple[float, dict | None]:
    """(rope_theta, scaling) from either layout: transformers 5's ``rope_parameters`` or 4.x's top-level
    ``rope_theta`` with ``rope_scaling``."""
    from loomtrain.trainer.config import ROPE_SCALING_PARAMS

    params = cfg.get("rope_parameters") or {}
    scaling = dict(cfg.get("rope_scaling") or params)
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    kind = scaling.pop("rope_type", scaling.pop("type", "default"))
    scaling.pop("rope_theta", None)
    if kind not in ROPE_SCALING_PARAMS:
        raise _fail(path, f"rope type {kind!r} is not supported (supported: {', '.join(ROPE_SCALING_PARAMS)})")
    if kind == "default":
        return float(theta), None
    spec = ROPE_SCALING_PARAMS[kind]
    unknown = sorted(set(scaling) - set(spec["required"] + spec["optional"]))
    if unknown:
        raise _fail(path, f"rope type {kind} with parameters loomtrain does not implement: {', '.join(unknown)}")
    return float(theta), {"rope_type": kind} | {k: v for k, v in scaling.items() if v is not None}


def _refuse_unsupported(cfg: dict, path: str) -> None:
    """Features of these families that loomtrain's decoder does not have: refused, not silently dropped."""
    checks = [("hidden_act", cfg.get("hidden_act", "silu") == "silu", "silu"),
              ("attention_bias", not cfg.get("attention_bias", False), "false (bias on o_proj is not implemented)"),
              ("mlp_bias", not cfg.get("mlp_bias", False), "false"),
              ("use_sliding_window", not cfg.get("use_sliding_window", False), "false"),
              ("head_dim", cfg.get("head_dim") in (None, cfg["hidden_size"] // cfg["num_attention_heads"]),
               "hidden_size / num_attention_heads")]
    for key, ok, valid in checks:
        if not ok:
            raise _fail(path, f"{key}: {cfg.get(key)!r} is not supported (loomtrain needs {valid})")


def expected_tensors(shape: dict, qkv_bias: bool, tied: bool) -> dict[str, list[int]]:
    """Every tensor name the model needs -> its shape (lm_head absent when tied)."""
    d, heads, kv, ffn = shape["dim"], shape["n_heads"], shape["n_kv_heads"], shape["ffn_hidden"]
    hd = d // heads
    block = {"self_attn.q_proj.weight": [heads * hd, d], "self_attn.k_proj.weight": [kv * hd, d],
             "self_attn.v_proj.weight": [kv * hd, d], "self_attn.o_proj.weight": [d, heads * hd],
             "mlp.gate_proj.weight": [ffn, d], "mlp.up_proj.weight": [ffn, d], "mlp.down_proj.weight": [d, ffn],
             "input_layernorm.weight": [d], "post_attention_layernorm.weight": [d]}
    if qkv_bias:
        block |= {"self_attn.q_proj.bias": [heads * hd], "self_attn.k_proj.bias": [kv * hd],
                  "self_attn.v_proj.bias": [kv * hd]}
    out = {"model.embed_tokens.weight": [shape["vocab_size"], d], "model.norm.weight": [d]}
    if not tied:
        out["lm_head.weight"] = [shape["vocab_size"], d]
    for i in range(shape["n_layers"]):
        out |= {f"model.layers.{i}.{k}": v for k, v in block.items()}
    return out


def _weight_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise _fail(index, "has no weight_map")
        files = sorted(set(weight_map.values()))
        for name in files:
            if not os.path.isfile(os.path.join(path, name)):
                raise _fail(os.path.join(path, name), "is missing (named by model.safetensors.index.json)")
        return [os.path.join(path, name) for name in files]
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    found = "; only PyTorch .bin weights are there (convert them to safetensors)" if any(
        f.endswith(".bin") for f in os.listdir(path)) else ""
    raise _fail(path, f"no model.safetensors or model.safetensors.index.json{found}")


def read_hf_model(path: str) -> HFModel:
    """config.json and the safetensors headers of ``path``, checked: a supported family, the features loomtrain's
    decoder has, every needed tensor present once with its shape, readable files."""
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError:
        raise ConfigError(f"{FIELD}: needs the 'safetensors' package (pip install safetensors, or loomtrain[data])") \
            from None

    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(path):
        raise _fail(path, "is not a directory")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise _fail(path, "has no config.json (not a Hugging Face model directory)")
    cfg = _read_json(cfg_path)
    model_type = cfg.get("model_type")
    if model_type not in FAMILIES:
        arch = ", ".join(cfg.get("architectures") or []) or "none"
        raise _fail(cfg_path, f"model_type {model_type!r} (architectures: {arch}) is not supported "
                              f"(supported: {', '.join(FAMILIES)})")
    missing = [v for v in SHAPE_KEYS.values() if v not in cfg and v != "intermediate_size"]
    if missing or "intermediate_size" not in cfg:
        raise _fail(cfg_path, f"lacks {', '.join(missing or ['intermediate_size'])}")
    _refuse_unsupported(cfg, cfg_path)
    shape = {k: cfg[v] for k, v in SHAPE_KEYS.items()}
    theta, scaling = _rope(cfg, cfg_path)
    family = FAMILIES[model_type][0]
    tied = bool(cfg.get("tie_word_embeddings", False))  # both families' default
    hf = HFModel(path, family, shape, theta, scaling, tied, qkv_bias=model_type == "qwen2")
    shapes = {}
    for file in _weight_files(path):
        try:
            with safe_open(file, "pt") as f:
                for name in f.keys():
                    if name in hf.files:
                        raise _fail(file, f"tensor '{name}' is also in {hf.files[name]}")
                    hf.files[name] = file
                    shapes[name] = f.get_slice(name).get_shape()
        except SafetensorError as e:
            raise _fail(file, f"not a readable safetensors file ({e})") from None
    if "lm_head.weight" in shapes:
        hf.tied = False  # a tied model that saved its head anyway: the saved head is what it computes with
    need = expected_tensors(shape, hf.qkv_bias, hf.tied)
    for name, want in need.items():
        if name not in shapes:
            raise _fail(path, f"tensor '{name}' is missing")
        if list(shapes[name]) != want:
            raise _fail(hf.files[name], f"tensor '{name}' has shape {list(shapes[name])}; config.json implies {want}")
    extra = sorted(n for n in shapes if n not in need and not n.endswith(IGNORED_TENSORS))
    if extra:
        raise _fail(hf.files[extra[0]], f"tensor '{extra[0]}' has no place in a {model_type} model "
                                        f"({len(extra)} such tensor(s))")
    tokenizer = os.path.join(path, "tokenizer.json")
    hf.tokenizer = tokenizer if os.path.isfile(tokenizer) else None
    return hf


def given_keys(values: dict, prefix: str = "") -> set[str]:
    """The dotted keys a YAML mapping (or ``--set`` overrides) sets."""
    out = set()
    for key, value in (values or {}).items():
        path = f"{prefix}{key}"
        out.add(path)
        if isinstance(value, dict):
            out |= given_keys(value, path + ".")
    return out


def resolve_init_from(exp, given: set[str]) -> HFModel:
    """Fill ``exp.model`` and ``exp.data.tokenizer`` from the directory; ``given``: the keys the user set (a given
    shape value must agree with config.json; RoPE values override it)."""
    from loomtrain.trainer.config import RopeScalingConfig

    hf = read_hf_model(exp.model.init_from)
    cfg_path = os.path.join(hf.path, "config.json")
    values = {"family": hf.family} | hf.shape
    for key, value in values.items():
        mine = getattr(exp.model, key)
        same = math.isclose(mine, value, rel_tol=1e-9) if isinstance(value, float) else mine == value
        if f"model.{key}" in given and not same:
            source = SHAPE_KEYS.get(key, "model_type")
            raise ConfigError(f"model.{key}: {mine!r} contradicts {source} = {value!r} in {cfg_path} (leave "
                              f"model.{key} out to take the model's)")
        setattr(exp.model, key, value)
    if "model.rope_theta" not in given:
        exp.model.rope_theta = hf.rope_theta
    if not any(k.startswith("model.rope_scaling") for k in given):
        rs = RopeScalingConfig()
        for key, value in (hf.rope_scaling or {}).items():
            setattr(rs, "type" if key == "rope_type" else key, value)
        exp.model.rope_scaling = rs
    if "data.tokenizer" not in given:
        if hf.tokenizer is None:
            raise _fail(hf.path, "has no tokenizer.json (set data.tokenizer to the model's tokenizer.json)")
        exp.data.tokenizer = hf.tokenizer
    elif exp.data.tokenizer != hf.tokenizer and not _same_file_content(exp.data.tokenizer, hf.tokenizer):
        raise ConfigError(f"data.tokenizer: {exp.data.tokenizer} is not the tokenizer of {FIELD} "
                          f"({hf.tokenizer or 'none there'}); leave data.tokenizer out to take the model's")
    return hf


def _same_file_content(a: str, b: str | None) -> bool:
    if b is None or not (os.path.isfile(a) and os.path.isfile(b)):
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        return fa.read() == fb.read()


# ---------------------------------------------------------------------------------------------- loading on ranks
def local_region(param) -> tuple[list[int], list[int]]:
    """(global offset, local shape) of the part of ``param`` this rank holds: all of a plain tensor, the shard of
    a DTensor (tensor parallel, FSDP2 over it, or both)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(param, DTensor):
        return [0] * param.dim(), list(param.shape)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return list(offset), list(shape)


def _read_rows_as_pairs(view, offset: list[int], shape: list[int], head_dim: int):
    """The region of a q/k projection (weight rows or bias) in loomtrain's adjacent-pair row order, reading only
    the whole heads that cover it from the file's rotate-half order."""
    import torch

    first, end = offset[0], offset[0] + shape[0]
    lo, hi = first // head_dim * head_dim, -(-end // head_dim) * head_dim
    index = (slice(lo, hi),) + tuple(slice(o, o + s) for o, s in zip(offset[1:], shape[1:]))
    rows = view[index]
    heads = (hi - lo) // head_dim
    rest = rows.shape[1:]
    # file: (head, member j, pair i); loomtrain: (head, pair i, member j)
    paired = rows.reshape(heads, 2, head_dim // 2, *rest).transpose(1, 2).reshape(hi - lo, *rest)
    return torch.narrow(paired, 0, first - lo, shape[0])


def load_pretrained(model, init_from: "str | HFModel", hf_names) -> dict:
    """Fill every parameter of ``model`` (the whole model or one pipeline stage, parallelized) from the directory
    (its path, or :func:`read_hf_model`'s answer for it), each rank reading only the regions it holds.
    ``hf_names(fqn) -> (file tensor name, q/k head_dim or 0)`` maps loomtrain's names (the family's adapter).
    Returns {tensors, bytes_read, largest_read} (what the tests and ``scripts/bench_import.py`` measure)."""
    import torch
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor

    from loomtrain.trainer.models.llama.model import canonical_name

    hf = init_from if isinstance(init_from, HFModel) else read_hf_model(init_from)
    handles: dict = {}
    stats = {"tensors": 0, "bytes_read": 0, "largest_read": 0}
    try:
        with torch.no_grad():
            for name, param in model.named_parameters():
                src, head_dim = hf_names(canonical_name(name))
                if src == "lm_head.weight" and hf.tied:
                    src = "model.embed_tokens.weight"
                file = hf.files[src]
                if file not in handles:
                    handles[file] = safe_open(file, "pt")
                view = handles[file].get_slice(src)
                offset, shape = local_region(param)
                local = param.to_local() if isinstance(param, DTensor) else param
                if 0 in shape:
                    continue
                if head_dim:
                    part = _read_rows_as_pairs(view, offset, shape, head_dim)
                else:
                    part = view[tuple(slice(o, o + s) for o, s in zip(offset, shape))]
                stats["tensors"] += 1
                stats["bytes_read"] += part.numel() * part.element_size()
                stats["largest_read"] = max(stats["largest_read"], part.numel() * part.element_size())
                local.copy_(part.reshape(local.shape))
                del part
    finally:
        handles.clear()
    return stats


def import_weights(parts, init_from: str, family, args) -> dict:
    """:func:`load_pretrained` over this rank's model parts with the family's adapter; adds the seconds taken."""
    import time

    adapter = family.hf_adapter
    if adapter is None or not hasattr(adapter, "hf_name"):
        raise ConfigError(f"{FIELD}: model family {type(family).__name__} has no Hugging Face adapter to import with")
    start = time.perf_counter()
    hf = read_hf_model(init_from)  # the headers once, for every part this rank holds
    total = {"tensors": 0, "bytes_read": 0, "largest_read": 0}
    for part in parts:
        stats = load_pretrained(part, hf, lambda name: adapter.hf_name(name, args))
        total = {k: max(total[k], v) if k == "largest_read" else total[k] + v for k, v in stats.items()}
    return total | {"seconds": time.perf_counter() - start}
