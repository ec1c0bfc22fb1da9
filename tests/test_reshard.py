"""A checkpoint saved at one layout resumes at another and continues the same run.

Saved at step 3 of a tp=2 x dp_shard=2 run on 4 ranks; resumed on 2 ranks (dp_shard=2), on
2 pipeline ranks (pp=2) and on 1 rank: losses and grad norms at steps 4-6 equal the uninterrupted
4-rank run's within 1e-5 and its final parameters within 1e-5 (DCP reshards the model and the flattened optimizer state; the sampler position is
global, so the data order continues).
"""
import pytest

from conftest import assert_same_training, run_ranks, train_capturing

STEPS, SAVED = 6, 3


@pytest.fixture(scope="module")
def saved_run(small_corpus, tmp_path_factory):
    from conftest import TEST_OVERRIDES

    out = tmp_path_factory.mktemp("tp2_dp2")
    ov = TEST_OVERRIDES + [f"data.prepared={small_corpus}", f"train.output_dir={out}", f"train.steps={STEPS}",
                           f"checkpoint.every_steps={SAVED}", "checkpoint.keep=0", "parallel.tp=2",
                           "parallel.dp_shard=2"]
    return run_ranks(train_capturing, 4, ov), str(out / "checkpoints" / f"step_{SAVED:08d}")


@pytest.mark.parametrize("world, layout", [(2, ["parallel.dp_shard=2"]), (2, ["parallel.pp=2", "parallel.dp_shard=1"]),
                                           (0, [])], ids=["dp_shard2", "pp2", "single"])
def test_resume_on_another_layout(world, layout, saved_run, overrides, tmp_path):
    full, checkpoint = saved_run
    ov = overrides + [f"train.steps={STEPS}"] + layout
    resumed = run_ranks(train_capturing, world, ov, checkpoint)
    assert all(captured["resumed_from"] == checkpoint for _, _, captured in resumed)
    assert_same_training(resumed, full, rtol=1e-5, atol_params=1e-5, steps=range(SAVED + 1, STEPS + 1))
