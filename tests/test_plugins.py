"""Extension from outside the package: plugins named in YAML register a context-parallel strategy, a model
family and a data-parallel sync method (``tests/plugins/``, no loomtrain file edited), and each trains on 4
gloo ranks exactly like one process (losses and grad norms 1e-4 relative, parameters 1e-5, fp32).

Plugins are loaded only in forked ranks, so the registries of the test process stay the built-in ones.
"""
import os

import pytest
import yaml

from conftest import TEST_OVERRIDES, run_ranks
from test_parallel_parity import STEPS, full_params

PLUGINS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plugins")


def _experiment_file(tmp_path, name: str, plugin: str, sections: dict) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"plugins": [os.path.join(PLUGINS, plugin)], **sections}))
    return str(path)


def _train(rank, config, overrides):
    from loomtrain.trainer.config import load_config
    from loomtrain.launch.train import run

    result = run(load_config(config, overrides))
    return result.losses, result.checkpoint, result.grad_norms


def _run(config, world, small_corpus, out):
    ov = TEST_OVERRIDES + [f"data.prepared={small_corpus}", f"train.output_dir={out}", f"train.steps={STEPS}",
                           "checkpoint.at_end=true"]
    return run_ranks(_train, world, config, ov)


def _params(ckpt, tmp_path):
    worker = os.path.join(ckpt, "worker000")  # replicas with local updates save one checkpoint per worker
    params = full_params(worker if os.path.isdir(worker) else ckpt, tmp_path)
    return {k.removeprefix("model."): v for k, v in params.items()}


def _assert_same(results, reference, tmp_path):
    [(ref_losses, ref_ckpt, ref_norms)] = reference
    ref_params = _params(ref_ckpt, tmp_path / "ref")
    for losses, _, norms in results:
        assert sorted(losses) == list(range(1, STEPS + 1))
        for step, ref in ref_losses.items():
            assert abs(losses[step] - ref) <= 1e-4 * abs(ref), (step, losses[step], ref)
            assert abs(norms[step] - ref_norms[step]) <= 1e-4 * ref_norms[step], (step, norms[step], ref_norms[step])
    params = _params(results[0][1], tmp_path / "par")
    assert params.keys() == ref_params.keys()
    for name, ref in ref_params.items():
        assert (params[name].float() - ref.float()).abs().max().item() <= 1e-5, name
    assert ref_losses[STEPS] < ref_losses[1]


@pytest.fixture(scope="module")
def plain_reference(small_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("plain")
    return _run(_experiment_file(out, "plain", "allgather_cp.py", {}), 0, small_corpus, out / "run")


def test_a_cp_strategy_from_a_plugin_trains_like_one_process(plain_reference, small_corpus, tmp_path):
    """All-gather K/V attention (tests/plugins/allgather_cp.py) on cp=2 x dp_shard=2."""
    config = _experiment_file(tmp_path, "cp", "allgather_cp.py",
                              {"parallel": {"cp": 2, "dp_shard": 2, "cp_impl": "allgather"}})
    (tmp_path / "ref").mkdir(), (tmp_path / "par").mkdir()
    _assert_same(_run(config, 4, small_corpus, tmp_path / "run"), plain_reference, tmp_path)


def test_a_dp_sync_method_from_a_plugin_trains_like_one_process(plain_reference, small_corpus, tmp_path):
    """Gradients averaged over the replicas by the plugin (tests/plugins/grad_allreduce_sync.py): workers of
    dp_shard=2 ranks, dp_replicate=2. Without its all-reduce the workers would drift apart."""
    config = _experiment_file(tmp_path, "sync", "grad_allreduce_sync.py",
                              {"parallel": {"dp_replicate": 2, "dp_shard": 2, "dp_sync": "grad_allreduce"}})
    (tmp_path / "ref").mkdir(), (tmp_path / "par").mkdir()
    results = _run(config, 4, small_corpus, tmp_path / "run")
    assert os.path.isdir(os.path.join(results[0][1], "worker001"))  # the method's local_updates reached the mesh
    _assert_same(results, plain_reference, tmp_path)


def test_a_model_family_from_a_plugin_trains_like_one_process(small_corpus, tmp_path):
    """Llama with q/k/v biases (tests/plugins/qkv_bias_model.py) on tp=2 x dp_shard=2, against itself on one
    process; the biases are really there (and sharded over tp)."""
    config = _experiment_file(tmp_path, "family", "qkv_bias_model.py", {"model": {"family": "llama_qkv_bias"}})
    (tmp_path / "ref").mkdir(), (tmp_path / "par").mkdir()
    reference = _run(config, 0, small_corpus, tmp_path / "one")
    results = run_ranks(_train, 4, config, TEST_OVERRIDES + [
        f"data.prepared={small_corpus}", f"train.output_dir={tmp_path / 'run'}", f"train.steps={STEPS}",
        "checkpoint.at_end=true", "parallel.tp=2", "parallel.dp_shard=2"])
    assert "layers.0.attention.wq.bias" in _params(reference[0][1], tmp_path / "ref")
    _assert_same(results, reference, tmp_path)


def test_plugin_errors_are_one_line_and_exit_2(tmp_path, capsys):
    from loomtrain.launch.cli import main
    from loomtrain.parallel.cp import CP_STRATEGIES

    missing = tmp_path / "missing.yaml"
    missing.write_text(yaml.safe_dump({"plugins": ["no_such_loomtrain_plugin"]}))
    assert main(["plan", str(missing), "--world-size", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: plugins: cannot import 'no_such_loomtrain_plugin': ModuleNotFoundError: "
                   "No module named 'no_such_loomtrain_plugin'"), err

    clash = tmp_path / "clash.py"
    clash.write_text("from loomtrain.parallel.cp import CP_STRATEGIES\n"
                     "CP_STRATEGIES.add('ring', object())\n")
    dup = tmp_path / "dup.yaml"
    dup.write_text(yaml.safe_dump({"plugins": ["clash.py"]}))  # relative to the YAML file
    assert main(["plan", str(dup), "--world-size", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: parallel.cp_impl: context-parallel strategy 'ring' is already registered"), err
    assert "\n" not in err
    assert type(CP_STRATEGIES.get("ring")).__name__ != "object"  # the built-in is untouched


def test_registered_names_are_what_the_config_accepts(tmp_path):
    """The one-line error lists the registry's names, a registered one is accepted, and removed again."""
    from loomtrain.errors import ConfigError
    from loomtrain.parallel.dp_sync import DP_SYNC
    from loomtrain.parallel.dp_sync.every_step import StatelessSync
    from loomtrain.trainer.config import load_config

    with pytest.raises(ConfigError, match=r"^parallel.dp_sync: must be one of every_step, diloco, co2, got 'mine'$"):
        load_config("tiny", ["parallel.dp_sync=mine"])
    DP_SYNC.add("mine", StatelessSync)
    try:
        assert load_config("tiny", ["parallel.dp_sync=mine"]).parallel.dp_sync == "mine"
    finally:
        DP_SYNC.remove("mine")
