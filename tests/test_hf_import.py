"""``model.init_from``: a Hugging Face model directory (Llama untied, tied and with llama3 RoPE in sharded files;
Qwen2 with q/k/v biases) becomes a loomtrain model with transformers' logits (1e-4, fp32, past the original
context); the adapter maps the imported tensors back bit-equal; on 4 ranks every layout (tp x FSDP, pp x tp,
cp x tp) reads only its shards and holds the same full model; a run imports, trains and exports a model that
transformers loads with loomtrain's logits; bad directories and contradicting YAML stop with one line."""
import json
import os

import pytest
import torch

from conftest import run_ranks

VOCAB = 320  # the byte tokenizer's 257 ids, padded
SEQ = 96
TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=VOCAB, max_position_embeddings=32, rms_norm_eps=1e-5, initializer_range=0.15)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32, "rope_theta": 500.0}
CASES = {  # name: (model_type, tie_word_embeddings, rope_parameters, max_shard_size)
    "llama": ("llama", False, {"rope_type": "default", "rope_theta": 10000.0}, None),
    "llama_tied": ("llama", True, {"rope_type": "default", "rope_theta": 10000.0}, None),
    "llama3_sharded": ("llama", False, LLAMA3_ROPE, "40KB"),
    "qwen2": ("qwen2", True, {"rope_type": "default", "rope_theta": 1e6}, None),
}


def make_hf_model(path, case="llama", seed=0):
    """A random tiny transformers model saved as a Hugging Face directory (safetensors, config.json, a byte-level
    tokenizer.json with eos 256); norms and biases random too, so a misplaced one shows."""
    transformers = pytest.importorskip("transformers")
    from loomtrain.trainer.hf_export import byte_tokenizer_json

    model_type, tied, rope, shard = CASES[case]
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[model_type]
    cfg = cls[0](**TINY, tie_word_embeddings=tied, rope_parameters=dict(rope), eos_token_id=256)
    torch.manual_seed(seed)
    model = cls[1](cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    with open(os.path.join(path, "tokenizer.json"), "w") as f:
        f.write(byte_tokenizer_json(256))
    return model


def _import_one_process(path, extra=()):
    from loomtrain.trainer.config import load_config
    from loomtrain.trainer.hf_import import import_weights
    from loomtrain.trainer.models import model_family

    exp = load_config(None, [f"model.init_from={path}", f"data.seq_len={SEQ}", *extra])
    family = model_family(exp.model.family)
    args = family.args(exp.model, 257, SEQ)
    model = family.build(args)
    model.init_weights(0)
    stats = import_weights([model], exp.model.init_from, family, args)
    return exp, args, model.eval(), stats


@pytest.mark.parametrize("case", list(CASES))
def test_an_imported_model_computes_transformers_logits(case, tmp_path):
    """Shape, family and RoPE come from config.json; the logits equal transformers' within 1e-4 on 96 tokens
    (3x the original context of 32: the llama3 scaling matters); the tokenizer is the directory's."""
    hf = make_hf_model(tmp_path / "hf", case)
    exp, args, model, stats = _import_one_process(tmp_path / "hf")
    model_type, tied, rope, _ = CASES[case]
    assert (exp.model.family, exp.model.dim, exp.model.n_layers, exp.model.n_heads, exp.model.n_kv_heads,
            exp.model.ffn_hidden, exp.model.vocab_size) == (model_type, 64, 2, 4, 2, 96, VOCAB)
    assert exp.model.rope_theta == rope["rope_theta"] and args.qkv_bias == (model_type == "qwen2")
    assert (args.rope_scaling or {}).get("rope_type", "default") == rope["rope_type"]
    assert exp.data.tokenizer == str(tmp_path / "hf" / "tokenizer.json")
    assert stats["tensors"] == len(list(model.parameters()))
    tokens = torch.randint(0, 257, (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(tokens).logits
        got = model(tokens)
    assert torch.allclose(got, want, atol=1e-4, rtol=0), (got - want).abs().max()
    assert (got - want).abs().max() < 0.01 * want.abs().mean()  # and the logits are not ~0


@pytest.mark.parametrize("case", ["llama_tied", "qwen2", "llama3_sharded"])
def test_import_then_the_export_adapter_gives_the_original_tensors_bit_equal(case, tmp_path):
    from safetensors.torch import load_file

    from loomtrain.trainer.hf_export import to_hf_state

    make_hf_model(tmp_path / "hf", case)
    _, args, model, _ = _import_one_process(tmp_path / "hf")
    original = {}
    for f in sorted(os.listdir(tmp_path / "hf")):
        if f.endswith(".safetensors"):
            original |= load_file(tmp_path / "hf" / f)
    if CASES[case][1]:  # tied: the import unties; the export writes the head as a copy of the embedding
        original["lm_head.weight"] = original["model.embed_tokens.weight"]
    back = to_hf_state({k: v.detach() for k, v in model.state_dict().items()}, args)
    assert sorted(back) == sorted(original)
    for name, t in original.items():
        assert torch.equal(back[name], t), name


# ------------------------------------------------------------------------------------------- 4 ranks, any layout
def _train_imported(rank, config_path, overrides):
    """Train in a forked rank with the imported weights captured right after the import (full tensors), with
    what the import read on this rank and this rank's local bytes of each parameter."""
    from torch.distributed.tensor import DTensor

    from loomtrain.launch import train as launch_train
    from loomtrain.trainer import hf_import, train as train_mod
    from loomtrain.trainer.config import load_config
    from loomtrain.trainer.models.llama.model import canonical_name

    captured, original = {}, hf_import.load_pretrained

    def capturing(model, init_from, hf_names):
        stats = original(model, init_from, hf_names)
        local, rounding = 0, 0
        for name, p in model.named_parameters():
            t = p.to_local() if isinstance(p, DTensor) else p
            local += t.numel() * 4
            _, head_dim = hf_names(canonical_name(name))
            if head_dim and t.numel():
                rounding += 2 * head_dim * (t.numel() // t.shape[0]) * 4
            captured.setdefault("params", {})[canonical_name(name)] = \
                (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
        captured.setdefault("reads", []).append((stats["bytes_read"], local, rounding, stats["largest_read"]))
        return stats

    train_mod.import_weights.__globals__["load_pretrained"] = capturing
    result = launch_train.run(load_config(config_path, overrides))
    return captured, result.losses


def _write_config(tmp_path, hf_dir, prepared):
    path = tmp_path / "import.yaml"
    path.write_text(f"model:\n  init_from: {hf_dir}\n  dtype: float32\n"
                    f"data:\n  prepared: {prepared}\n  seq_len: 64\n"
                    "train:\n  steps: 2\n  global_batch_size: 8\n  progress: false\n  eval_every: 0\n  threads: 1\n"
                    "optim:\n  lr: 1.0e-3\n  warmup_steps: 1\n")
    return str(path)


LAYOUTS = {"tp2_fsdp2": ["parallel.tp=2", "parallel.dp_shard=2"],
           "pp2_tp2": ["parallel.pp=2", "parallel.tp=2", "parallel.dp_shard=1"],
           "cp2_tp2": ["parallel.cp=2", "parallel.tp=2", "parallel.dp_shard=1"]}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_reads_only_its_shards_into_the_same_model(layout, small_corpus, tmp_path):
    """4 ranks: each rank's import reads its shards' bytes (plus at most the rest of a RoPE head at each end of a
    q/k shard) and never more than one tensor at once; gathered, every layout holds exactly the imported
    model of one process; two steps of training give one process's losses (1e-5 relative)."""
    make_hf_model(tmp_path / "hf", "llama3_sharded")
    config = _write_config(tmp_path, tmp_path / "hf", small_corpus)
    [(ref, ref_losses)] = run_ranks(_train_imported, 0, config, [f"train.output_dir={tmp_path / 'one'}"])
    total = sum(t.numel() * 4 for t in ref["params"].values())
    largest = max(t.numel() * 4 for t in ref["params"].values())
    results = run_ranks(_train_imported, 4, config, LAYOUTS[layout] + [f"train.output_dir={tmp_path / 'four'}"])
    for captured, losses in results:
        for read, local, rounding, biggest in captured["reads"]:
            assert local <= read <= local + rounding and biggest <= largest, (read, local, rounding)
        assert sum(r[0] for r in captured["reads"]) < total * 0.75  # a rank never reads the whole model
        held = captured["params"]
        for name, t in held.items():
            assert torch.equal(t, ref["params"][name]), name
        for step, loss in ref_losses.items():
            assert losses[step] == pytest.approx(loss, rel=1e-5), step
    assert set().union(*(c["params"] for c, _ in results)) == set(ref["params"])  # pp: the stages cover all


def _final_params(rank, config_path, overrides):
    from loomtrain.launch import train as launch_train
    from loomtrain.trainer.config import load_config

    result = launch_train.run(load_config(config_path, overrides))
    return result.losses


def test_import_train_on_4_ranks_export_and_transformers_computes_loomtrains_logits(small_corpus, tmp_path):
    """A tied Qwen2 (q/k/v biases) imported on tp2 x FSDP2, trained 3 steps and exported: transformers loads the
    directory and its logits equal those of loomtrain's model holding the checkpoint (1e-4); training moved the
    weights (the export is not the import's copy)."""
    transformers = pytest.importorskip("transformers")
    from loomtrain.launch.cli import main
    from loomtrain.trainer.hf_export import read_model_state
    from loomtrain.trainer.models import model_family

    original = make_hf_model(tmp_path / "hf", "qwen2")
    config = _write_config(tmp_path, tmp_path / "hf", small_corpus)
    run = tmp_path / "run"
    run_ranks(_final_params, 4, config, LAYOUTS["tp2_fsdp2"] + [f"train.output_dir={run}", "train.steps=3",
                                                                "checkpoint.at_end=true"])
    [step] = [d for d in os.listdir(run / "checkpoints") if d.startswith("step_")]
    assert main(["export", str(run / "checkpoints" / step), "--hf", str(tmp_path / "out")]) == 0
    with open(tmp_path / "out" / "config.json") as f:
        assert json.load(f)["architectures"] == ["Qwen2ForCausalLM"]
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(exported).__name__ == "Qwen2ForCausalLM"

    exp, args, model, _ = _import_one_process(tmp_path / "hf")
    state = read_model_state(str(run / "checkpoints" / step))
    moved = max((state[n] - p).abs().max().item() for n, p in model.state_dict().items() if n in state)
    assert moved > 1e-4  # 3 steps at lr 1e-3 changed the weights
    model = model_family(exp.model.family).build(args).eval()
    model.load_state_dict(state)
    tokens = torch.randint(0, 257, (2, SEQ), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want, got = exported(tokens).logits, model(tokens)
        assert not torch.allclose(original(tokens).logits, want, atol=1e-3)
    assert torch.allclose(got, want, atol=1e-4, rtol=0), (got - want).abs().max()


def _truncate(path):
    [f] = [path / f for f in os.listdir(path) if f.endswith(".safetensors")]
    data = f.read_bytes()
    f.write_bytes(data[:len(data) - 1000])
    return f


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))
    return path / "config.json"


def _retensor(path, name, tensor):
    from safetensors.torch import load_file, save_file

    f = path / "model.safetensors"
    state = load_file(f)
    if tensor is None:
        del state[name]
    else:
        state[name] = tensor
    save_file(state, f, metadata={"format": "pt"})
    return f


BAD = {  # case: (how the directory is spoiled -> what the line names, the rest of the expected line)
    "no directory": (lambda p: p / "nowhere", "is not a directory"),
    "no config.json": (lambda p: (os.remove(p / "config.json"), p)[1], "has no config.json"),
    "unsupported architecture": (lambda p: _edit_config(p, model_type="gpt2", architectures=["GPT2LMHeadModel"]),
                                 "model_type 'gpt2' (architectures: GPT2LMHeadModel) is not supported"),
    "missing tensor": (lambda p: (_retensor(p, "model.layers.1.mlp.up_proj.weight", None), p)[1],
                       "tensor 'model.layers.1.mlp.up_proj.weight' is missing"),
    "mis-shaped tensor": (lambda p: _retensor(p, "model.layers.0.self_attn.k_proj.weight", torch.zeros(16, 64)),
                          "tensor 'model.layers.0.self_attn.k_proj.weight' has shape [16, 64]; config.json implies "
                          "[32, 64]"),
    "truncated file": (_truncate, "not a readable safetensors file"),
    "unknown rope type": (lambda p: _edit_config(p, rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4}),
                          "rope type 'dynamic' is not supported"),
    "gelu": (lambda p: _edit_config(p, hidden_act="gelu"), "hidden_act: 'gelu' is not supported"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_model_directory_is_one_line_naming_the_file(case, tmp_path, capsys):
    """Each spoiled directory stops ``loomtrain train`` before any work with one line naming the file and what
    is wrong, exit 2, and no run directory is written."""
    from loomtrain.launch.cli import main

    make_hf_model(tmp_path / "hf", "llama")
    spoil, message = BAD[case]
    named = spoil(tmp_path / "hf")
    out = tmp_path / "run"
    capsys.readouterr()  # transformers' progress bars
    assert main(["train", "--set", f"model.init_from={tmp_path / 'hf' if case != 'no directory' else named}",
                 "--set", f"train.output_dir={out}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: model.init_from: {os.path.abspath(named)}") and message in err, err
    assert "\n" not in err and not out.exists()


@pytest.mark.parametrize("given, message", [
    ("model.dim=128", "model.dim: 128 contradicts hidden_size = 64 in {cfg} (leave model.dim out to take the "
                      "model's)"),
    ("model.family=qwen2", "model.family: 'qwen2' contradicts model_type = 'llama' in {cfg}"),
    ("model.vocab_size=384", "model.vocab_size: 384 contradicts vocab_size = 320 in {cfg}"),
])
def test_yaml_that_contradicts_config_json_is_one_line(given, message, tmp_path):
    from loomtrain.errors import ConfigError
    from loomtrain.trainer.config import load_config

    make_hf_model(tmp_path / "hf", "llama")
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"model.init_from={tmp_path / 'hf'}", given])
    assert message.format(cfg=tmp_path / "hf" / "config.json") in str(e.value)


def test_yaml_rope_overrides_config_json_and_equal_shape_values_are_fine(tmp_path):
    """Extending the context: a YAML rope_theta and rope_scaling replace config.json's; a shape value equal to
    config.json's is accepted."""
    from loomtrain.trainer.config import load_config

    make_hf_model(tmp_path / "hf", "llama3_sharded")
    exp = load_config(None, [f"model.init_from={tmp_path / 'hf'}", "model.dim=64", "model.rope_theta=2e5",
                             "model.rope_scaling.type=yarn", "model.rope_scaling.factor=8",
                             "model.rope_scaling.original_max_position_embeddings=128"])
    assert exp.model.rope_theta == 2e5 and exp.model.rope_scaling.type == "yarn"
    assert exp.model.rope_scaling.parameters()["factor"] == 8
    plain = load_config(None, [f"model.init_from={tmp_path / 'hf'}"])
    assert plain.model.rope_scaling.parameters() == {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"}


def test_the_tokenizer_starts_documents_as_the_model_expects(tmp_path):
    """A tokenizer whose post-processor puts a BOS first (Llama 3's template) makes every document start with it,
    and the eos comes from tokenizer_config.json; one without (Qwen2, the byte tokenizer) adds nothing."""
    from tokenizers import Tokenizer, processors

    from loomtrain.data.tokenizer import build_tokenizer
    from loomtrain.trainer.hf_export import byte_tokenizer_json

    tok = Tokenizer.from_str(byte_tokenizer_json(256))
    tok.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>"])
    bos, eos = tok.token_to_id("<|begin_of_text|>"), tok.token_to_id("<|end_of_text|>")
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", bos)])
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|end_of_text|>"}))
    llama3 = build_tokenizer(str(tmp_path / "tokenizer.json"))
    assert list(llama3.encode("hi")) == [bos, ord("h"), ord("i")] and llama3.eos_id == eos
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "tokenizer.json").write_text(byte_tokenizer_json(256))
    plain = build_tokenizer(str(tmp_path / "plain" / "tokenizer.json"))
    assert list(plain.encode("hi")) == [ord("h"), ord("i")] and plain.eos_id == 256


def _resume_without_import(rank, config_path, overrides, resume):
    from loomtrain.launch import train as launch_train
    from loomtrain.trainer import hf_import
    from loomtrain.trainer.config import load_config

    def refuse(*args):
        raise AssertionError("imported weights although --resume PATH replaces them")

    hf_import.load_pretrained = refuse
    return launch_train.run(load_config(config_path, overrides), resume=resume).losses


def test_a_run_resumed_from_a_path_reads_no_weights(small_corpus, tmp_path):
    """The next stage of an extension (``--resume PATH``) checks config.json but does not read the weights."""
    make_hf_model(tmp_path / "hf", "llama")
    config = _write_config(tmp_path, tmp_path / "hf", small_corpus)
    run_ranks(_final_params, 0, config, [f"train.output_dir={tmp_path / 'one'}", "train.steps=1",
                                         "checkpoint.at_end=true"])
    [losses] = run_ranks(_resume_without_import, 0, config, [f"train.output_dir={tmp_path / 'two'}"],
                         str(tmp_path / "one" / "checkpoints" / "step_00000001"))
    assert sorted(losses) == [2]


LLAMA31_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
              "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
              "num_key_value_heads": 8, "vocab_size": 128256, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
              "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 8192, "rope_type": "llama3"},
              "max_position_embeddings": 131072, "hidden_act": "silu", "tie_word_embeddings": False,
              "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": "bfloat16"}


def make_sparse_hf_model(path, config=None, files=4):
    """A Hugging Face directory with a real model's config.json and bf16 safetensors files whose headers are real
    and whose data is a hole (sparse files: no disk, no time), for what reads only headers (``plan``, checks)."""
    import struct

    from loomtrain.trainer.hf_export import byte_tokenizer_json
    from loomtrain.trainer.hf_import import expected_tensors

    config = config or LLAMA31_8B
    os.makedirs(path, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    (path / "tokenizer.json").write_text(byte_tokenizer_json(256))
    shape = {"dim": config["hidden_size"], "n_heads": config["num_attention_heads"],
             "n_kv_heads": config["num_key_value_heads"], "ffn_hidden": config["intermediate_size"],
             "vocab_size": config["vocab_size"], "n_layers": config["num_hidden_layers"]}
    names = list(expected_tensors(shape, config["model_type"] == "qwen2", config["tie_word_embeddings"]).items())
    weight_map = {}
    for i in range(files):
        name = f"model-{i + 1:05d}-of-{files:05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for tensor, dims in names[i::files]:
            size = 2 * int(torch.Size(dims).numel())
            header[tensor] = {"dtype": "BF16", "shape": dims, "data_offsets": [offset, offset + size]}
            offset += size
            weight_map[tensor] = name
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(path / name, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.truncate(8 + len(raw) + offset)
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return path


def test_a_sparse_llama31_8b_directory_sets_the_model_and_plans(tmp_path, capsys):
    """config.json and the headers of a Llama-3.1-8B-shaped directory give the 8B model (and its llama3 RoPE);
    ``plan`` runs on it for 64 ranks."""
    from loomtrain.launch.cli import main
    from loomtrain.trainer.config import load_config

    make_sparse_hf_model(tmp_path / "l8b")
    exp = load_config(None, [f"model.init_from={tmp_path / 'l8b'}"])
    assert (exp.model.dim, exp.model.n_layers, exp.model.vocab_size, exp.model.rope_theta) == (4096, 32, 128256, 5e5)
    assert exp.model.rope_scaling.type == "llama3" and exp.model.rope_scaling.factor == 8
    (tmp_path / "x.yaml").write_text(f"model:\n  init_from: {tmp_path / 'l8b'}\n  dtype: bfloat16\n")
    assert main(["plan", str(tmp_path / "x.yaml"), "--set", "data.seq_len=8192", "--set", "parallel.tp=8",
                 "--world-size", "64"]) == 0
    assert "model: 8.030B parameters (32 layers, dim 4096, 32/8 heads, ffn 14336, vocab 128256" in capsys.readouterr().out


STAGES = {"8K": [], "32K": ["data.seq_len=32768", "parallel.cp=2", "train.global_batch_size=128"],
          "128K": ["data.seq_len=131072", "parallel.cp=8", "train.global_batch_size=32"]}


@pytest.mark.parametrize("stage", list(STAGES))
@pytest.mark.parametrize("world", [64, 256])
def test_the_cluster_recipe_plans_every_stage(stage, world, tmp_path, capsys):
    """configs/llama3_8b_extend_128k_cluster.yaml with a Llama-3-8B-shaped directory: every stage of the extension
    plans on 64 and 256 GPUs within 80 GiB per GPU (plan's estimate; BENCHMARKS.md says how far it is from
    measured peaks)."""
    import re

    from loomtrain.launch.cli import main

    config = dict(LLAMA31_8B, rope_scaling=None, max_position_embeddings=8192)  # Llama 3 (8K), not 3.1
    make_sparse_hf_model(tmp_path / "l8b", config)
    sets = [f"model.init_from={tmp_path / 'l8b'}"] + STAGES[stage]
    argv = ["plan", "llama3_8b_extend_128k_cluster", "--world-size", str(world)]
    assert main(argv + [a for s in sets for a in ("--set", s)]) == 0
    out = capsys.readouterr().out
    total = float(re.search(r"  total\s+([\d.]+) GiB\s+of 80 GiB", out).group(1))
    assert 0 < total < 80, out
