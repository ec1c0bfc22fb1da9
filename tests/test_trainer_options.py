"""Trainer options: bf16 mixed precision, activation checkpointing, torch.compile, async checkpoints,
wandb (offline), a Hugging Face tokenizer, SIGINT, validation loss."""
import json
import os
import signal

import pytest

from conftest import BF16_LOSS_RTOL, BF16_NORM_RTOL, run_ranks, signal_self_after_step, train_capturing


def _run(rank, overrides, resume=None, signal_at=0, sig=signal.SIGINT):
    from loomtrain.launch import train as launch_train
    from loomtrain.trainer.config import load_config

    if signal_at:
        signal_self_after_step(signal_at, sig)
    r = launch_train.run(load_config("tiny", overrides), resume=resume)
    return r.losses, r.val_losses, r.stopped_by_signal, r.checkpoint


def rel(a, b):
    return abs(a - b) / abs(b)


@pytest.fixture(scope="module")
def eager_run(small_corpus, tmp_path_factory):
    from conftest import TEST_OVERRIDES

    ov = TEST_OVERRIDES + [f"data.prepared={small_corpus}", f"train.output_dir={tmp_path_factory.mktemp('eager')}",
                           "train.steps=3"]
    return ov, run_ranks(train_capturing, 0, ov)[0]


@pytest.mark.parametrize("option, rtol, atol_params, timeout", [
    ("parallel.activation_checkpoint=full", 1e-6, 1e-6, 300), ("parallel.compile=true", 1e-5, 1e-5, 600)],
    ids=["ac", "compile"])
def test_activation_checkpointing_and_compile_match_eager(option, rtol, atol_params, timeout, eager_run):
    """Recomputed activations and the compiled model: losses and gradient norms within ``rtol`` relative, final
    parameters within ``atol_params`` of eager (a x2 gradient moves the norm by 100%; 3 steps move the parameters by
    ~3e-3). Recomputation is exact here; compile reorders float sums, by how much depends on the CPU's vector width
    (1.75e-6 on this session's machine, under 1e-6 on the previous one)."""
    ov, (ref_losses, ref_norms, ref) = eager_run
    losses, norms, captured = run_ranks(train_capturing, 0, ov + [option], timeout=timeout)[0]
    assert sorted(losses) == sorted(ref_losses) == [1, 2, 3]
    for step in ref_losses:
        assert losses[step] == pytest.approx(ref_losses[step], rel=rtol), step
        assert norms[step] == pytest.approx(ref_norms[step], rel=rtol), step
    assert captured["params"].keys() == ref["params"].keys()
    for name, want in ref["params"].items():
        assert (captured["params"][name] - want).abs().max().item() <= atol_params, name


@pytest.mark.parametrize("world, layout", [(0, []), (2, ["parallel.dp_shard=2"])], ids=["autocast", "fsdp_mp"])
def test_bf16_mixed_precision_tracks_fp32(world, layout, overrides):
    """bf16 against fp32: loss and gradient norm within the measured spread's tolerances (conftest), a run that
    learns by more than the tolerance, and numbers that really differ (bf16 ran)."""
    base = overrides + ["train.steps=4", "optim.lr=3e-3"] + layout
    fp32, fp32_norms, _ = run_ranks(train_capturing, world, base)[0]
    bf16, bf16_norms, _ = run_ranks(train_capturing, world, base + ["model.dtype=bfloat16"])[0]
    for step in fp32:
        assert rel(bf16[step], fp32[step]) < BF16_LOSS_RTOL, (step, bf16[step], fp32[step])
        assert rel(bf16_norms[step], fp32_norms[step]) < BF16_NORM_RTOL, (step, bf16_norms[step], fp32_norms[step])
    assert bf16 != fp32  # bf16 really ran in bf16
    assert bf16[1] - bf16[4] > BF16_LOSS_RTOL * bf16[1] * 10


def test_async_checkpoint_resumes(overrides, tmp_path):
    base = overrides + ["train.steps=4", "checkpoint.async_save=true", "checkpoint.every_steps=2",
                        "checkpoint.at_end=true", "checkpoint.keep=1", "parallel.dp_shard=2"]
    full = run_ranks(_run, 2, base)[0][0]
    ckpts = sorted(os.listdir(tmp_path / "run" / "checkpoints"))
    assert ckpts == ["latest", "step_00000004"]  # keep=1 pruned step 2; nothing left as .tmp
    out = [f"train.output_dir={tmp_path / 'split'}", "checkpoint.at_end=false"]
    run_ranks(_run, 2, base + out, None, 3, signal.SIGTERM)  # stops after step 3 with a checkpoint
    resumed = run_ranks(_run, 2, base + out, "latest")[0][0]
    assert sorted(resumed) == [4] and resumed[4] == pytest.approx(full[4], rel=1e-6)


def test_sigint_checkpoints_and_stops(overrides, tmp_path):
    losses, _, stopped, ckpt = run_ranks(_run, 0, overrides + ["train.steps=50"], None, 2)[0]
    assert stopped and sorted(losses) == [1, 2] and ckpt.endswith("step_00000002")


def test_validation_loss_and_wandb_offline(overrides, tmp_path):
    ov = overrides + ["train.steps=4", "train.eval_every=2", "train.eval_batches=2", "logging.wandb=true",
                      "train.log_every=1"]
    losses, val, _, _ = run_ranks(_run, 0, ov, env={"WANDB_SILENT": "true"})[0]
    assert sorted(val) == [2, 4]
    for step, v in val.items():  # a mean over held-out tokens, near the training loss (a sum would be far off)
        assert abs(v - losses[step]) < 0.15 * losses[step], (step, v, losses[step])
    assert val[4] < val[2]
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r.get("val_loss") for r in records if "val_loss" in r] == [val[2], val[4]]
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1


def test_hugging_face_tokenizer_prepares_its_ids_and_trains(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from conftest import TEST_OVERRIDES
    from loomtrain.data.corpus import read_documents

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    texts = [t for _, t in read_documents("stdlib", max_documents=40)]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=500, special_tokens=["[UNK]", "</s>"]))
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    ov = TEST_OVERRIDES + [f"data.tokenizer={path}", "data.max_documents=40", f"data.cache_dir={tmp_path / 'c'}",
                           f"train.output_dir={tmp_path / 'run'}", "train.steps=2"]
    losses, _, captured = run_ranks(train_capturing, 0, ov)[0]
    assert sorted(losses) == [1, 2]
    meta_path = next((tmp_path / "c").glob("*/tokens.json"))
    meta = json.loads(meta_path.read_text())
    assert meta["vocab_size"] == 500 and meta["eos_id"] == 1
    # every prepared document is the tokenizer's own ids for one text, then the end-of-document token
    from loomtrain.data.indexed import IndexedTokens

    prefix = str(meta_path)[:-len(".json")]
    prepared = [tuple(int(t) for t in split[i]) for split in (IndexedTokens(prefix + "_train"),
                                                              IndexedTokens(prefix + "_valid"))
                for i in range(len(split))]
    assert sorted(prepared) == sorted(tuple(tok.encode(t).ids) + (1,) for t in texts)
    # the model was built for the tokenizer's 500 ids, rounded up to a multiple of 64 (model.vocab_size: 0)
    assert captured["params"]["tok_embeddings.weight"].shape[0] == captured["params"]["output.weight"].shape[0] == 512


def test_log_lines_show_progress_checkpoints_and_the_end(overrides, tmp_path, capfd):
    """Without a terminal (Slurm logs): step lines carry step/N and an ETA, a saved checkpoint is announced,
    and one end-of-run line gives steps, tokens, wall time, checkpoint and metrics paths."""
    ov = overrides + ["train.steps=4", "train.log_every=2", "checkpoint.every_steps=2", "checkpoint.at_end=true"]
    run_ranks(_run, 0, ov)
    lines = capfd.readouterr().out.splitlines()
    steps = [line for line in lines if line.startswith("step=")]
    assert [line.split()[0] for line in steps] == ["step=2/4", "step=4/4"]
    assert all(" eta=" in line for line in steps) and steps[-1].endswith("eta=0m00s")
    run = tmp_path / "run"
    assert f"checkpoint of step 2: {run / 'checkpoints' / 'step_00000002'}" in lines
    assert lines[-1] == next(line for line in lines if line.startswith("done: ")) and lines[-1].startswith(
        "done: step 4/4 (4 this run), 2,048 tokens, ")
    assert lines[-1].endswith(f"checkpoint {run / 'checkpoints' / 'step_00000004'}; metrics {run / 'metrics.jsonl'}")
