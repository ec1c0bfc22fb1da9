"""A checkpoint saved at one layout resumes at another and continues the same run.

Saved at step 3 of a tp=2 x dp_shard=2 run on 4 ranks; resumed on 2 ranks (dp_shard=2), on
2 pipeline ranks (pp=2) and on 1 rank: losses at steps 4-6 equal the uninterrupted 4-rank run
within 1e-5 (DCP reshards the model and the flattened optimizer state; the sampler position is
global, so the data order continues).
"""
import pytest

from conftest import run_ranks

STEPS, SAVED = 6, 3


def _train(rank, overrides, resume):
    from loomtrain.trainer.config import load_config
    from loomtrain.launch.train import run

    result = run(load_config("tiny", overrides), resume=resume)
    return result.losses, result.resumed_from


@pytest.fixture(scope="module")
def saved_run(small_corpus, tmp_path_factory):
    from conftest import TEST_OVERRIDES

    out = tmp_path_factory.mktemp("tp2_dp2")
    ov = TEST_OVERRIDES + [f"data.prepared={small_corpus}", f"train.output_dir={out}", f"train.steps={STEPS}",
                           f"checkpoint.every_steps={SAVED}", "checkpoint.keep=0", "parallel.tp=2",
                           "parallel.dp_shard=2"]
    losses = run_ranks(_train, 4, ov, None)[0][0]
    return losses, str(out / "checkpoints" / f"step_{SAVED:08d}")


@pytest.mark.parametrize("world, layout", [(2, ["parallel.dp_shard=2"]), (2, ["parallel.pp=2", "parallel.dp_shard=1"]),
                                           (0, [])], ids=["dp_shard2", "pp2", "single"])
def test_resume_on_another_layout(world, layout, saved_run, overrides, tmp_path):
    full, checkpoint = saved_run
    ov = overrides + [f"train.steps={STEPS}"] + layout
    for losses, resumed in run_ranks(_train, world, ov, checkpoint):
        assert resumed == checkpoint and sorted(losses) == list(range(SAVED + 1, STEPS + 1))
        for step in losses:
            assert losses[step] == pytest.approx(full[step], rel=1e-5), step
