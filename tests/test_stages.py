"""Growing the context in stages: a run resumed from the previous stage's checkpoint with a longer ``data.seq_len``
and a new RoPE continues with no conversion: the step, the optimizer state and the data position carry over
(windows: the same tokens consumed; documents: the same document and piece)."""
import pytest

from conftest import run_ranks

RS = "model.rope_scaling"


def _stage(rank, overrides, resume):
    """Train one stage in a forked rank: (losses, the data position and Adam's step count right after the
    restore, the data position at the end)."""
    from loomtrain.launch import train as launch_train
    from loomtrain.trainer import train as train_mod
    from loomtrain.trainer.config import load_config

    seen, original = {}, train_mod.Trainer._restore

    def restore(self, path):
        original(self, path)
        adam = [s["step"] for s in self.optimizer.state.values() if "step" in s]
        seen.update(position=self.batches.state_dict(), adam_steps=sorted({int(a) for a in adam}))

    train_mod.Trainer._restore = restore
    end = {}
    fit = train_mod.Trainer.fit

    def fit_and_report(self):
        out = fit(self)
        end.update(self.batches.state_dict())
        return out

    train_mod.Trainer.fit = fit_and_report
    result = launch_train.run(load_config("tiny", overrides), resume=resume)
    return result.losses, seen, end


@pytest.mark.parametrize("batching", [[], ["data.batching=documents", "train.global_batch_tokens=512",
                                           "data.max_doc_tokens=48"]], ids=["windows", "documents"])
def test_a_longer_stage_resumes_the_previous_ones_checkpoint(batching, overrides, tmp_path):
    first = overrides + batching + ["train.steps=3", "checkpoint.at_end=true", "data.seq_len=64",
                                    f"train.output_dir={tmp_path / 'stage1'}"]
    [(losses1, _, end1)] = run_ranks(_stage, 0, first, None)
    assert sorted(losses1) == [1, 2, 3]
    ckpt = str(tmp_path / "stage1" / "checkpoints" / "step_00000003")
    second = overrides + batching + ["train.steps=5", "data.seq_len=128", f"{RS}.type=yarn", f"{RS}.factor=2",
                                     f"{RS}.original_max_position_embeddings=64",
                                     f"train.output_dir={tmp_path / 'stage2'}"]
    [(losses2, seen, _)] = run_ranks(_stage, 0, second, ckpt)
    assert sorted(losses2) == [4, 5] and seen["adam_steps"] == [3]
    if batching:  # whole documents: exactly where stage 1 stopped
        assert {k: seen["position"][k] for k in ("documents_started", "piece")} == \
               {k: end1[k] for k in ("documents_started", "piece")}
    else:  # 3 steps x 8 windows of 64 tokens = 12 windows of 128
        assert end1["consumed"] == 24 and end1["seq_len"] == 64
        assert seen["position"]["consumed"] == 12 and seen["position"]["seq_len"] == 128


def test_a_checkpoint_of_other_data_still_fails(overrides, tmp_path):
    """The length change is recognised only for the same data: another corpus at another length is refused."""
    first = overrides + ["train.steps=1", "checkpoint.at_end=true", "data.seq_len=64",
                         f"train.output_dir={tmp_path / 'a'}"]
    run_ranks(_stage, 0, first, None)
    other = [o for o in overrides if not o.startswith("data.prepared")] + [
        "data.corpus=stdlib", "data.max_documents=120", f"data.cache_dir={tmp_path / 'cache'}", "train.steps=2",
        "data.seq_len=128", f"train.output_dir={tmp_path / 'b'}"]
    with pytest.raises(AssertionError, match="different data"):
        run_ranks(_stage, 0, other, str(tmp_path / "a" / "checkpoints" / "step_00000001"))
