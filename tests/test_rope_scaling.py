"""``model.rope_scaling``: loomtrain's RoPE is transformers' for each type the Llama family has (default with another
rope_theta, linear, llama3, yarn and yarn's options): a random LlamaForCausalLM given the same weights and that
``rope_parameters`` computes loomtrain's logits within 1e-4 on a sequence 3x the original context; the exported
config.json gives transformers the same RoPE; bad parameters stop with one line naming the field."""
import json

import pytest
import torch

from conftest import run_ranks

ORIGINAL = 32  # the context the tiny model was "trained for" (original_max_position_embeddings)
SEQ = 96  # compared on 3x that
VOCAB = 300
SHAPE = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_hidden=96",
         f"model.vocab_size={VOCAB}", "model.max_seq_len=128", "data.seq_len=128",
         "model.init_std=0.15"]  # q.k large enough that attention (and so RoPE) moves the logits

# case: (loomtrain --set overrides, the same RoPE as a transformers user writes rope_parameters)
CASES = {
    "default_theta": (["model.rope_theta=500"], {"rope_type": "default", "rope_theta": 500.0}),
    "linear": (["model.rope_scaling.type=linear", "model.rope_scaling.factor=4"],
               {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}),
    "llama3": (["model.rope_theta=10000", "model.rope_scaling.type=llama3", "model.rope_scaling.factor=8",
                "model.rope_scaling.low_freq_factor=1", "model.rope_scaling.high_freq_factor=4",
                f"model.rope_scaling.original_max_position_embeddings={ORIGINAL}"],
               {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": ORIGINAL, "rope_theta": 10000.0}),
    "yarn": (["model.rope_theta=500", "model.rope_scaling.type=yarn", "model.rope_scaling.factor=4",
              f"model.rope_scaling.original_max_position_embeddings={ORIGINAL}"],
             {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL, "rope_theta": 500.0}),
    "yarn_options": (["model.rope_theta=500", "model.rope_scaling.type=yarn", "model.rope_scaling.factor=3",
                      f"model.rope_scaling.original_max_position_embeddings={ORIGINAL}",
                      "model.rope_scaling.beta_fast=8", "model.rope_scaling.beta_slow=2",
                      "model.rope_scaling.truncate=false", "model.rope_scaling.mscale=1.5",
                      "model.rope_scaling.mscale_all_dim=0.5"],
                     {"rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": ORIGINAL,
                      "beta_fast": 8.0, "beta_slow": 2.0, "truncate": False, "mscale": 1.5, "mscale_all_dim": 0.5,
                      "rope_theta": 500.0}),
    "yarn_attention_factor": (["model.rope_scaling.type=yarn", "model.rope_scaling.factor=4",
                               f"model.rope_scaling.original_max_position_embeddings={ORIGINAL}",
                               "model.rope_scaling.attention_factor=1.3"],
                              {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL,
                               "attention_factor": 1.3, "rope_theta": 10000.0}),
}


def _args(overrides):
    from loomtrain.trainer.config import load_config
    from loomtrain.trainer.models.llama.model import ModelArgs

    exp = load_config(None, SHAPE + overrides)
    return ModelArgs.from_config(exp.model, VOCAB, exp.data.seq_len)


def _hf_model(rope_parameters, state=None):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters=dict(rope_parameters))
    cfg._attn_implementation = "eager"
    hf = transformers.LlamaForCausalLM(cfg).float().eval()
    if state is not None:
        hf.load_state_dict(state, strict=True)
    return hf


def _loomtrain(args):
    from loomtrain.trainer.models.llama.model import Transformer

    torch.manual_seed(0)
    model = Transformer(args).eval()
    model.init_weights(seed=1)
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_scaled_rope_gives_transformers_logits_beyond_the_original_context(case):
    """Same weights, same RoPE: the logits of all 96 positions (3x the original 32) within 1e-4; and the RoPE
    matters here (the logits without the scaling, or with another theta, are > 100x that far)."""
    from loomtrain.trainer.hf_export import to_hf_state
    from loomtrain.trainer.models.llama.model import Transformer

    overrides, rope_parameters = CASES[case]
    args = _args(overrides)
    ours = _loomtrain(args)
    hf = _hf_model(rope_parameters, to_hf_state(ours.state_dict(), args))
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want, got = ours(tokens), hf(tokens).logits
        plain = Transformer(_args([]))
        plain.load_state_dict(ours.state_dict())
        unscaled = plain.eval()(tokens)
    assert got.shape == want.shape == (2, SEQ, VOCAB)
    diff = (got - want).abs().max().item()
    assert diff <= 1e-4, (case, diff)
    assert (unscaled - want).abs().max().item() > 1e-2, "the test model's logits do not depend on the RoPE"


@pytest.mark.parametrize("case", list(CASES))
def test_exported_config_gives_transformers_the_same_rope(case, tmp_path):
    """config.json as ``loomtrain export`` writes it (``hf_config``) -> AutoConfig: its rope_parameters hold the
    case's, and transformers' rotary embedding built from it has the same inverse frequencies and attention
    factor as one built from the case's rope_parameters directly (and loomtrain's, in float64, within fp32)."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from loomtrain.trainer.hf_export import hf_config
    from loomtrain.trainer.models.llama.model import rope_frequencies

    overrides, rope_parameters = CASES[case]
    args = _args(overrides)
    (tmp_path / "config.json").write_text(json.dumps(hf_config(args, eos_id=0, dtype="float32")))
    loaded = transformers.AutoConfig.from_pretrained(str(tmp_path))
    assert loaded.rope_parameters.items() >= rope_parameters.items(), loaded.rope_parameters
    exported, native = LlamaRotaryEmbedding(loaded), LlamaRotaryEmbedding(_hf_model(rope_parameters).config)
    assert torch.equal(exported.inv_freq, native.inv_freq)
    assert exported.attention_scaling == native.attention_scaling
    freqs, attention = rope_frequencies(args.head_dim, args.rope_theta, args.rope_scaling)
    torch.testing.assert_close(freqs.float(), native.inv_freq, rtol=1e-6, atol=0)
    assert attention == pytest.approx(native.attention_scaling, rel=1e-12)


def test_rope_scaling_from_yaml(tmp_path):
    """The YAML mapping form; ``rope_scaling: null`` is the default (plain RoPE), and the parameters the model gets
    are transformers' rope_parameters (yarn's optional zeros left for transformers to compute)."""
    from loomtrain.trainer.config import load_config

    path = tmp_path / "run.yaml"
    path.write_text("model:\n  rope_theta: 500000\n  rope_scaling: {type: llama3, factor: 8, low_freq_factor: 1, "
                    "high_freq_factor: 4, original_max_position_embeddings: 8192}\n")
    assert load_config(str(path)).model.rope_scaling.parameters() == {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}
    path.write_text("model:\n  rope_scaling: {type: yarn, factor: 4, original_max_position_embeddings: 4096}\n")
    assert load_config(str(path)).model.rope_scaling.parameters() == {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096, "beta_fast": 32.0,
        "beta_slow": 1.0, "truncate": True}
    path.write_text("model:\n  rope_scaling: null\n")
    assert load_config(str(path)).model.rope_scaling.parameters() is None
    assert load_config(None).model.rope_scaling.type == "default"


RS = "model.rope_scaling"
BAD = [
    ([f"{RS}.type=ntk"], f"{RS}.type: must be one of default, linear, llama3, yarn, got 'ntk'"),
    ([f"{RS}.type=linear"], f"{RS}.factor: required by type linear (a number >= 1)"),
    ([f"{RS}.type=linear", f"{RS}.factor=0.5"], f"{RS}.factor: must be a number >= 1, got 0.5"),
    ([f"{RS}.type=linear", f"{RS}.factor=.nan"], f"{RS}.factor: must be a number >= 1, got nan"),
    ([f"{RS}.type=linear", f"{RS}.factor=abc"], f"{RS}.factor: expected a number, got 'abc'"),
    ([f"{RS}.type=linear", f"{RS}.factor=2", f"{RS}.low_freq_factor=1"],
     f"{RS}.low_freq_factor: not used by type linear, which takes factor"),
    ([f"{RS}.factor=2"], f"{RS}.factor: not used by type default, which takes no parameters (model.rope_theta sets "
                         "the base)"),
    ([f"{RS}.type=llama3", f"{RS}.factor=8", f"{RS}.high_freq_factor=4", f"{RS}.original_max_position_embeddings=64"],
     f"{RS}.low_freq_factor: required by type llama3 (a number > 0)"),
    ([f"{RS}.type=llama3", f"{RS}.factor=8", f"{RS}.low_freq_factor=4", f"{RS}.high_freq_factor=2",
      f"{RS}.original_max_position_embeddings=64"],
     f"{RS}.high_freq_factor: must be a number > low_freq_factor (4.0), got 2.0"),
    ([f"{RS}.type=llama3", f"{RS}.factor=8", f"{RS}.low_freq_factor=1", f"{RS}.high_freq_factor=4"],
     f"{RS}.original_max_position_embeddings: required by type llama3 (the context the model was trained for, > 0)"),
    ([f"{RS}.type=yarn", f"{RS}.factor=4", f"{RS}.original_max_position_embeddings=-8"],
     f"{RS}.original_max_position_embeddings: must be the context the model was trained for, > 0, got -8"),
    ([f"{RS}.type=yarn", f"{RS}.factor=4", f"{RS}.original_max_position_embeddings=64", f"{RS}.beta_fast=0.5"],
     f"{RS}.beta_fast: must be a number >= beta_slow (1.0), got 0.5"),
    ([f"{RS}.type=yarn", f"{RS}.factor=4", f"{RS}.original_max_position_embeddings=64", f"{RS}.attention_factor=-1"],
     f"{RS}.attention_factor: must be a number >= 0 (0: transformers' default), got -1.0"),
    ([f"{RS}.rope_type=yarn"], f"{RS}.rope_type: unknown key; did you mean 'type'?"),
]


@pytest.mark.parametrize("overrides, message", BAD, ids=[m.split(":")[0].split(".")[-1] + str(i)
                                                         for i, (_, m) in enumerate(BAD)])
def test_bad_rope_scaling_names_the_field(overrides, message):
    from loomtrain.errors import ConfigError
    from loomtrain.trainer.config import load_config

    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert str(e.value) == message
    assert "\n" not in str(e.value)


def test_bad_rope_scaling_in_yaml_and_on_the_command_line(tmp_path, capsys):
    from loomtrain.errors import ConfigError
    from loomtrain.launch.cli import main
    from loomtrain.trainer.config import load_config

    path = tmp_path / "run.yaml"
    path.write_text("model:\n  rope_scaling: yarn\n")
    with pytest.raises(ConfigError, match=r"^model\.rope_scaling: expected a mapping, got 'yarn'$"):
        load_config(str(path))
    assert main(["train", "--set", f"{RS}.type=yarn", "--set", f"{RS}.factor=4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {RS}.original_max_position_embeddings: required by type yarn (the context the model was " \
                  "trained for, > 0)", err


def _train(rank, overrides):
    from loomtrain.launch.train import run
    from loomtrain.trainer.config import load_config

    result = run(load_config("tiny", overrides))
    return result.losses, result.grad_norms


YARN = ["model.rope_theta=500", f"{RS}.type=yarn", f"{RS}.factor=4", f"{RS}.original_max_position_embeddings=16"]


def test_context_and_tensor_parallel_train_with_the_scaled_rope(overrides, tmp_path):
    """cp=2 x tp=2 (4 ranks, each holding a zigzag share of the positions) trains a yarn model exactly like one
    process (losses and gradient norms within 1e-4 relative over 3 steps): the cp shards rotate with the same
    scaled tables. The scaling is real on this run: without it one process's gradient norms differ by > 50x that
    (model.init_std 0.15: attention, and so RoPE, matters from the first step)."""
    ov = overrides + ["train.steps=3", "model.max_seq_len=64", "model.init_std=0.15"]
    [(ref, ref_norms)] = run_ranks(_train, 0, ov + YARN + [f"train.output_dir={tmp_path / 'ref'}"])
    [(plain, plain_norms)] = run_ranks(_train, 0, ov + [f"train.output_dir={tmp_path / 'plain'}"])
    moved = max(abs(plain_norms[step] - ref_norms[step]) / ref_norms[step] for step in ref)
    assert moved > 50 * 1e-4, moved  # the scaling moves the gradient norms far beyond the tolerance below
    cp_tp = ["parallel.cp=2", "parallel.tp=2", "parallel.dp_shard=1", f"train.output_dir={tmp_path / 'cp_tp'}"]
    for losses, norms in run_ranks(_train, 4, ov + YARN + cp_tp):
        for step in ref:
            assert losses[step] == pytest.approx(ref[step], rel=1e-4), step
            assert norms[step] == pytest.approx(ref_norms[step], rel=1e-4), step
