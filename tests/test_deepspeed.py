"""DeepSpeed ZeRO as the data-parallel engine trains like the FSDP path; its checkpoints resume exactly."""
import signal

import pytest

from conftest import run_ranks, signal_self_after_step, train_capturing

STEPS = 5


def _train(rank, overrides, signal_at=0, resume=None):
    from loomtrain.launch import train as launch_train
    from loomtrain.trainer.config import load_config

    if signal_at and rank == 0:
        signal_self_after_step(signal_at, signal.SIGTERM)
    r = launch_train.run(load_config("tiny", overrides), resume=resume)
    return r.losses, r.last_step, r.resumed_from


@pytest.fixture(scope="module")
def fsdp_run(small_corpus, tmp_path_factory):
    from conftest import TEST_OVERRIDES

    ov = TEST_OVERRIDES + [f"data.prepared={small_corpus}", f"train.output_dir={tmp_path_factory.mktemp('fsdp')}",
                           f"train.steps={STEPS}", "parallel.dp_shard=2", "train.micro_batch_size=2"]
    return run_ranks(train_capturing, 2, ov)[0]


ZERO = {"zero1": (["parallel.zero_stage=1"], (1, False, "DeepSpeedZeroOptimizer")),
        "zero2": (["parallel.zero_stage=2"], (2, False, "DeepSpeedZeroOptimizer")),
        "zero3": (["parallel.zero_stage=3"], (3, False, "DeepSpeedZeroOptimizer_Stage3")),
        "zero2_offload": (["parallel.zero_stage=2", "parallel.zero_offload_optimizer=true"],
                          (2, True, "DeepSpeedZeroOptimizer"))}


@pytest.mark.parametrize("zero", ZERO)
def test_zero_stage_matches_fsdp(zero, fsdp_run, overrides):
    """Each ZeRO stage (and stage 2 with the optimizer offloaded) is what DeepSpeed applied, and trains like
    FSDP: losses and gradient norms within 1e-4 relative (a x2 gradient moves the norm by 100%), final
    parameters within 1e-5."""
    ref_losses, ref_norms, ref = fsdp_run
    settings, (stage, offload, optimizer) = ZERO[zero]
    ov = overrides + [f"train.steps={STEPS}", "parallel.dp_shard=2", "train.micro_batch_size=2",
                      "parallel.dp_engine=deepspeed"] + settings
    for losses, norms, captured in run_ranks(train_capturing, 2, ov):
        applied = captured["deepspeed"]
        assert (applied["stage"], applied["offload"], applied["optimizer"]) == (stage, offload, optimizer)
        assert applied["fp32_master_share"] == pytest.approx(0.5, abs=0.01)  # optimizer state split over 2 ranks
        assert sorted(losses) == sorted(ref_losses) == list(range(1, STEPS + 1))
        for step, want in ref_losses.items():
            assert abs(losses[step] - want) <= 1e-4 * abs(want), (zero, step, losses[step], want)
            assert abs(norms[step] - ref_norms[step]) <= 1e-4 * ref_norms[step], (zero, step, norms[step])
        assert captured["params"].keys() == ref["params"].keys()
        for name, want in ref["params"].items():
            diff = (captured["params"][name] - want).abs().max().item()
            assert diff <= 1e-5, (zero, name, diff)
    assert ref_losses[STEPS] < ref_losses[1]


def test_deepspeed_checkpoint_resumes_exactly(overrides, tmp_path):
    ov = overrides + [f"train.steps={STEPS}", "parallel.dp_shard=2", "parallel.dp_engine=deepspeed",
                      "parallel.zero_stage=2", "checkpoint.keep=1"]
    full = run_ranks(_train, 2, ov + [f"train.output_dir={tmp_path / 'full'}"])[0][0]
    split = ov + [f"train.output_dir={tmp_path / 'split'}"]
    first = run_ranks(_train, 2, split, 3)
    assert all(last == 3 for _, last, _ in first)
    assert (tmp_path / "split" / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    for losses, last, resumed in run_ranks(_train, 2, split, 0, "latest"):
        assert resumed.endswith("step_00000003") and last == STEPS and sorted(losses) == [4, 5]
        for step in (4, 5):
            assert losses[step] == pytest.approx(full[step], rel=1e-6, abs=0)


def test_deepspeed_with_tensor_parallel_is_refused():
    from loomtrain.trainer.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"parallel.dp_engine: deepspeed runs data parallelism only here; set "
                                          r"parallel.tp=1"):
        load_config("tiny", ["parallel.dp_engine=deepspeed", "parallel.tp=2"])
