"""``loomtrain export CKPT --hf OUT``: transformers loads the result and computes loomtrain's logits."""
import os

import pytest
import torch

from conftest import run_ranks


def _train(rank, overrides):
    from loomtrain.trainer.config import load_config
    from loomtrain.launch.train import run

    return run(load_config("tiny", overrides)).checkpoint


@pytest.mark.parametrize("world, layout", [
    (4, ["parallel.tp=2", "parallel.dp_shard=2"]),
    (2, ["parallel.pp=2", "parallel.dp_shard=1", "parallel.pp_schedule=interleaved_1f1b",
         "parallel.pp_virtual_stages=2", "model.n_layers=4"]),
], ids=["tp2_dp_shard2", "pp2_interleaved"])
def test_exported_model_gives_loomtrain_logits(world, layout, overrides, tmp_path):
    transformers = pytest.importorskip("transformers")
    from loomtrain.data.tokenizer import ByteTokenizer
    from loomtrain.launch.cli import main
    from loomtrain.trainer.config import load_config
    from loomtrain.trainer.hf_export import read_model_state
    from loomtrain.trainer.models.llama.model import ModelArgs, Transformer

    ov = overrides + ["train.steps=2", "checkpoint.at_end=true", "model.rope_theta=5000"] + layout
    checkpoint = run_ranks(_train, world, ov)[0]
    out = str(tmp_path / "hf")
    assert main(["export", checkpoint, "--hf", out]) == 0
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]

    tok = transformers.AutoTokenizer.from_pretrained(out)
    text = open(os.__file__).read()[:300]
    ids = tok(text)["input_ids"]
    assert ids == ByteTokenizer().encode(text).tolist()  # the byte-level default, id for id
    assert tok.decode(ids) == text and tok.eos_token_id == ByteTokenizer.eos_id

    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    exp = load_config(str(tmp_path / "run" / "config.yaml"))
    state = read_model_state(checkpoint)
    ours = Transformer(ModelArgs.from_config(exp.model, state["tok_embeddings.weight"].shape[0], exp.data.seq_len))
    ours.load_state_dict(state, strict=True)
    tokens = torch.tensor([ids[:64]])
    with torch.no_grad():
        want, got = ours(tokens), hf(tokens).logits
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-4
    assert want.std().item() > 0.1  # real logits, not a degenerate model


def test_export_refuses_a_non_checkpoint(tmp_path, capsys):
    from loomtrain.launch.cli import main

    (tmp_path / "run" / "checkpoints" / "step_00000001").mkdir(parents=True)
    (tmp_path / "run" / "config.yaml").write_text("train:\n  steps: 1\n")
    assert main(["export", str(tmp_path / "run" / "checkpoints" / "step_00000001"), "--hf", str(tmp_path / "o")]) == 2
    assert "not a complete DCP checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
