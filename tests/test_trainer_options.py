"""Trainer options: bf16 mixed precision, activation checkpointing, torch.compile, async checkpoints,
wandb (offline), a Hugging Face tokenizer, SIGINT, validation loss."""
import json
import os
import signal

import pytest

from conftest import run_ranks, signal_self_after_step


def _run(rank, overrides, resume=None, signal_at=0, sig=signal.SIGINT):
    from loomtrain.launch import train as launch_train
    from loomtrain.trainer.config import load_config

    if signal_at:
        signal_self_after_step(signal_at, sig)
    r = launch_train.run(load_config("tiny", overrides), resume=resume)
    return r.losses, r.val_losses, r.stopped_by_signal, r.checkpoint


def rel(a, b):
    return abs(a - b) / abs(b)


def test_activation_checkpointing_and_compile_match_eager(overrides):
    base = overrides + ["train.steps=3"]
    eager = run_ranks(_run, 0, base)[0][0]
    ac = run_ranks(_run, 0, base + ["parallel.activation_checkpoint=full"])[0][0]
    compiled = run_ranks(_run, 0, base + ["parallel.compile=true"], timeout=600)[0][0]
    for step in eager:
        assert ac[step] == pytest.approx(eager[step], rel=1e-6)
        assert compiled[step] == pytest.approx(eager[step], rel=1e-5)


@pytest.mark.parametrize("world, layout", [(0, []), (2, ["parallel.dp_shard=2"])], ids=["autocast", "fsdp_mp"])
def test_bf16_mixed_precision_tracks_fp32(world, layout, overrides):
    base = overrides + ["train.steps=4", "optim.lr=3e-3"] + layout
    fp32 = run_ranks(_run, world, base)[0][0]
    bf16 = run_ranks(_run, world, base + ["model.dtype=bfloat16"])[0][0]
    for step in fp32:
        assert rel(bf16[step], fp32[step]) < 2e-2, (step, bf16[step], fp32[step])
    assert bf16 != fp32  # bf16 really ran in bf16
    assert bf16[4] < bf16[1]


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
    assert sorted(val) == [2, 4] and all(v > 0 for v in val.values())
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r.get("val_loss") for r in records if "val_loss" in r] == [val[2], val[4]]
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1


def test_hugging_face_tokenizer(tmp_path):
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
    losses = run_ranks(_run, 0, ov)[0][0]
    meta = json.loads(next((tmp_path / "c").glob("*/tokens.json")).read_text())
    assert meta["vocab_size"] == 500 and meta["eos_id"] == 1
    assert all(l > 0 for l in losses.values())
