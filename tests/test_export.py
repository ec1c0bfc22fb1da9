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


class _Planted:
    """Unpickling it makes directory ``path``: a stand-in for whatever code a planted pickle could run."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_export_refuses_a_planted_metadata_pickle_without_running_it(tmp_path, capsys):
    """A checkpoint on a shared path may be anyone's: a ``.metadata`` whose unpickling runs code is refused in one
    line naming what it refers to (exit 2), and its code never runs (DCP's own reader unpickled it whole)."""
    import pickle

    from loomtrain.launch.cli import main

    ckpt = tmp_path / "run" / "checkpoints" / "step_00000001"
    ckpt.mkdir(parents=True)
    (tmp_path / "run" / "config.yaml").write_text("train:\n  steps: 1\n")
    marker = tmp_path / "planted_code_ran"
    (ckpt / ".metadata").write_bytes(pickle.dumps(_Planted(str(marker))))
    assert main(["export", str(ckpt), "--hf", str(tmp_path / "o")]) == 2
    assert not marker.exists(), "the planted pickle ran"
    err = capsys.readouterr().err.strip()
    assert err == f"error: CHECKPOINT: refusing {ckpt / '.metadata'}: it refers to posix.mkdir, which DCP metadata " \
                  "never holds", err
    assert not (tmp_path / "o").exists()


def test_a_dcp_checkpoint_written_without_a_process_group_reads_back_exactly(tmp_path):
    """The safe reader still reads what DCP writes: the model tensors come back bit for bit, under the unsplit
    model's names, and the rest of the checkpoint (optimizer state, a step) is left unread."""
    import torch.distributed.checkpoint as dcp

    from loomtrain.trainer.hf_export import read_model_state

    torch.manual_seed(0)
    model = {"tok_embeddings.weight": torch.randn(16, 8), "layers.0.attention.wq.weight": torch.randn(8, 8),
             "norm.weight": torch.rand(8)}
    state = {f"model.{k}": v for k, v in model.items()} | {"optim.state.norm.weight.exp_avg": torch.ones(8),
                                                           "trainer.step": 3}
    dcp.save(state, checkpoint_id=str(tmp_path / "ckpt"), no_dist=True)
    read = read_model_state(str(tmp_path / "ckpt"))
    assert read.keys() == model.keys()
    assert all(torch.equal(read[k], v) for k, v in model.items())
