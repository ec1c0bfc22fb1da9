"""Stop (SIGTERM mid-run) and resume: the resumed run reaches exactly the uninterrupted run's losses."""
import json
import signal

import pytest

from conftest import run_ranks, signal_self_after_step

STEPS, STOP_AT = 6, 3


def _train(rank, overrides, signal_at, resume):
    from loomtrain.launch import train as launch_train
    from loomtrain.trainer.config import load_config

    if signal_at and rank == 0:  # only rank 0 is signalled: every rank must still stop at the same step
        signal_self_after_step(signal_at, signal.SIGTERM)
    r = launch_train.run(load_config("tiny", overrides), resume=resume)
    return r.losses, r.last_step, r.stopped_by_signal, r.resumed_from


@pytest.mark.parametrize("world, layout", [(0, []), (2, ["parallel.dp_shard=2"]),
                                           (2, ["parallel.pp=2", "parallel.dp_shard=1"]),
                                           (2, ["parallel.dp_shard=2", "data.batching=documents",
                                                "train.global_batch_tokens=500", "data.max_doc_tokens=40"])],
                         ids=["single", "dp_shard2", "pp2", "documents_dp2"])
def test_stop_and_resume_matches_uninterrupted(world, layout, overrides, tmp_path):
    base = overrides + [f"train.steps={STEPS}", "checkpoint.keep=1", "train.log_every=1"] + layout
    full = run_ranks(_train, world, base + [f"train.output_dir={tmp_path / 'full'}"], 0, None)[0][0]

    out = [f"train.output_dir={tmp_path / 'split'}"]
    first = run_ranks(_train, world, base + out, STOP_AT, None)
    for losses, last, stopped, _ in first:
        assert stopped and last == STOP_AT and sorted(losses) == [1, 2, 3]
    ckpt_root = tmp_path / "split" / "checkpoints"
    assert (ckpt_root / "latest").read_text().strip() == f"step_{STOP_AT:08d}"
    assert not list(ckpt_root.glob("*.tmp"))

    with open(tmp_path / "split" / "metrics.jsonl", "a") as f:  # as if step 4 was logged, then the job died
        f.write(json.dumps({"step": 4, "loss": 0.0}) + "\n")
    second = run_ranks(_train, world, base + out, 0, "latest")
    for losses, last, stopped, resumed in second:
        assert resumed.endswith(f"step_{STOP_AT:08d}") and last == STEPS and not stopped
        assert sorted(losses) == [4, 5, 6]
        for step in (4, 5, 6):
            assert losses[step] == pytest.approx(full[step], rel=1e-6, abs=0), step
    metrics = [json.loads(line) for line in open(tmp_path / "split" / "metrics.jsonl")]
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))  # appended across the restart, no stale step 4
    assert all(m["loss"] > 0 for m in metrics)


def test_resume_without_checkpoint_is_an_error(overrides, tmp_path):
    with pytest.raises(AssertionError, match="--resume: no checkpoint under"):
        run_ranks(_train, 0, overrides + ["train.steps=1"], 0, "latest")
