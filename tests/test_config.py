"""Config loading: precedence, validation messages, exit codes, the saved resolved config."""
import os
import subprocess
import sys

import pytest
import yaml

from loomtrain.launch.cli import main
from loomtrain.trainer.config import ConfigError, load_config, parse_overrides


def test_defaults_file_and_cli_precedence(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text("train:\n  steps: 7\n  seed: 3\nmodel:\n  dim: 128\n")
    exp = load_config(f, ["train.steps=9", "optim.lr=2e-4", "parallel.compile=true"])
    assert exp.train.steps == 9  # CLI beats file
    assert exp.train.seed == 3  # file beats default
    assert exp.model.dim == 128
    assert exp.optim.lr == pytest.approx(2e-4)
    assert exp.parallel.compile is True
    assert exp.train.log_every == 1  # default kept


def _leaves(values, path=""):
    for key, value in values.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{path}{key}.")
        else:
            yield f"{path}{key}", value


def test_shipped_configs_load_by_name(tmp_path):
    """Every shipped YAML loads by its bare name and every value it sets is the loaded experiment's (a recipe that
    imports a model directory the user makes first is loaded with a stand-in directory)."""
    import loomtrain.configs
    from test_hf_import import make_sparse_hf_model

    shipped = os.path.dirname(loomtrain.configs.__file__)
    names = sorted(f[:-5] for f in os.listdir(shipped) if f.endswith(".yaml"))
    assert names == sorted(["tiny", "cpu_tp2_dp2", "cpu_long_cp2", "llama8b_64k_cluster", "cpu_adaptive_sp",
                            "llama8b_512k_adaptive_cluster", "cpu_extend_yarn", "llama3_8b_extend_128k_cluster",
                            "llama70b_256k_cluster", "llama405b_128k_cluster",
                            "llama70b_256k_adaptive_cluster"])
    stand_in = make_sparse_hf_model(tmp_path / "hf")  # a Llama-3-8B's config and headers
    for name in names:
        with open(os.path.join(shipped, f"{name}.yaml")) as f:
            values = yaml.safe_load(f)
        imports = "init_from" in values.get("model", {})
        exp = load_config(name, [f"model.init_from={tmp_path / 'hf'}"] if imports else [])
        leaves = [(k, v) for k, v in _leaves(values) if k != "model.init_from"]
        assert leaves, name
        assert stand_in is not None
        for key, value in leaves:
            got = exp
            for part in key.split("."):
                got = getattr(got, part)
            if isinstance(value, list) and value and isinstance(value[0], dict):  # a list of entries (data.sources)
                got = [{k: getattr(entry, k) for k in given} for entry, given in zip(got, value)]
            assert got == value, (name, key, got, value)


@pytest.mark.parametrize("override, message", [
    (["train.stepz=3"], "train.stepz: unknown key; did you mean 'steps'?"),
    (["trian.steps=3"], "trian: unknown key; did you mean 'train'?"),
    (["train.steps=abc"], "train.steps: expected an integer, got 'abc'"),
    (["train.steps=0"], "train.steps: must be > 0, got 0"),
    (["model.dtype=fp16"], "model.dtype: must be one of auto, float32, bfloat16, got 'fp16'"),
    (["model.n_kv_heads=3"], "model.n_kv_heads: must divide model.n_heads (8), got 3"),
    (["parallel.tp=3"], "parallel.tp: must divide model.n_heads (8) and model.n_kv_heads (4), got 3"),
    (["parallel.mesh_order=tp,cp"], "parallel.mesh_order: must be a permutation"),
    (["train.micro_batch_size=5"], "train.micro_batch_size: must divide train.global_batch_size (16), got 5"),
    (["data.valid_fraction=1.5"], "data.valid_fraction: must be in [0, 1), got 1.5"),
    (["parallel.compile=maybe"], "parallel.compile: expected true or false, got 'maybe'"),
    (["train"], "--set train: expected section.key=value"),
    (["parallel.pp=8"], "parallel.pp: 8 pipeline stages (pp x pp_virtual_stages) but model.n_layers is 4"),
    (["parallel.pp=2", "train.microbatches=1"], "train.microbatches: 1f1b needs at least parallel.pp (2)"),
    (["parallel.pp=2", "parallel.pp_virtual_stages=2"],
     "parallel.pp_virtual_stages: 2 stages per rank need parallel.pp_schedule=interleaved_1f1b"),
    (["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b", "parallel.pp_virtual_stages=2",
      "train.microbatches=5"], "train.microbatches: interleaved_1f1b needs a multiple"),
    (["parallel.pp=2", "parallel.pp_split=3,2"], "parallel.pp_split: needs 2 positive counts summing to"),
    (["parallel.pp=2", "train.micro_batch_size=4"], "train.micro_batch_size: with parallel.pp > 1"),
    (["faulttol.inject.kind=boom"], "faulttol.inject.kind: must be one of none, sigkill"),
    (["parallel.dp_sync=localsgd"], "parallel.dp_sync: must be one of every_step, diloco, co2"),
    (["optim.name=lion"], "optim.name: must be one of adamw, sgd, got 'lion'"),
    (["optim.momentum=1.0"], "optim.momentum: must be in [0, 1), got 1.0"),
    (["parallel.dp_sync=co2", "parallel.dp_replicate=2", "parallel.dp_engine=deepspeed"],
     "parallel.dp_sync: co2 runs on parallel.dp_engine=fsdp"),
    (["parallel.dp_sync=diloco", "parallel.dp_replicate=2", "dp_sync.diloco.fragments=2", "dp_sync.diloco.sync_every=5"],
     "dp_sync.diloco.sync_every: 5 must be a multiple of dp_sync.diloco.fragments (2)"),
    (["parallel.dp_sync=diloco", "parallel.dp_replicate=2", "dp_sync.diloco.sync_every=4",
      "dp_sync.diloco.fragments=2", "dp_sync.diloco.fragment_sync_delay=2"],
     "dp_sync.diloco.fragment_sync_delay: must be < sync_every/fragments = 2, got 2"),
    (["parallel.dp_sync=diloco", "parallel.dp_replicate=2", "dp_sync.diloco.fragment_update_alpha=1.5"],
     "dp_sync.diloco.fragment_update_alpha: must be in [0, 1], got 1.5"),
    (["parallel.dp_sync=diloco", "parallel.dp_replicate=2", "dp_sync.diloco.quantize=fp8"],
     "dp_sync.diloco.quantize: must be one of none, int8, fp4, fp4_e3m0"),
    (["parallel.dp_sync=diloco", "parallel.dp_replicate=2", "dp_sync.diloco.error_feedback=true"],
     "dp_sync.diloco.error_feedback: needs a quantize other than none"),
    (["parallel.dp_sync=co2", "parallel.dp_replicate=2", "dp_sync.co2.clip=-1"], "dp_sync.co2.clip: must be >= 0"),
    (["parallel.dp_sync=co2", "parallel.dp_replicate=2", "dp_sync.co2.staleness_penalty=0.5"],
     "dp_sync.co2.staleness_penalty: must be >= 1 (1 = no penalty"),
    (["parallel.dp_sync=diloco", "parallel.dp_replicate=2", "parallel.pp=2", "model.n_layers=4",
      "dp_sync.diloco.fragments=4", "dp_sync.diloco.sync_every=8"],
     "dp_sync.diloco.fragments: must be <= 2, the layers of the pipeline rank with the fewest"),
    (["faulttol.snapshot.every=2"], "faulttol.snapshot.every: unknown key; did you mean 'every_steps'?"),
    (["faulttol.snapshot.min_gbps=0"], "faulttol.snapshot.min_gbps: must be > 0, got 0.0"),
])
def test_bad_values_name_the_field(override, message):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", override)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_yaml_and_missing_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(f)
    with pytest.raises(ConfigError, match="no such file 'nope.yaml'"):
        load_config("nope.yaml")


def test_override_parsing_keeps_yaml_types():
    assert parse_overrides(["a.b=1", "a.c=true", "d.e=x=y"]) == {"a": {"b": 1, "c": True}, "d": {"e": "x=y"}}


@pytest.mark.parametrize("argv", [
    ["train", "--set", "train.stepz=1"],
    ["train", "--nproc", "4", "--set", "parallel.tp=8", "--set", "model.n_heads=8", "--set", "model.n_kv_heads=8"],
    ["train", "--nproc", "3", "--set", "parallel.tp=2"],
    ["train", "--set", "data.corpus=/does/not/exist"],
    ["train", "--set", "parallel.pp=2"],
    ["train", "--nproc", "2", "--set", "parallel.pp=2", "--set", "train.microbatches=3"],  # 16 per rank
    ["train", "--nproc", "4", "--set", "faulttol.ranks_per_node=3"],
    ["plan", "--world-size", "6", "--set", "parallel.tp=4"],
    ["plan", "--world-size", "0"],
    ["slurm", "--nodes", "0", "--gpus-per-node", "8"],
    ["slurm", "--nodes", "1", "--gpus-per-node", "1", "--spare-nodes", "-1"],
    ["train", "--nproc", "2", "--max-restarts", "-1"],
    ["train", "--resume", "/no/such/checkpoint"],
])
def test_cli_rejects_before_starting_with_exit_2(argv, capsys, tmp_path):
    assert main(argv + ["--set", f"train.output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert not any(tmp_path.iterdir())  # nothing written


def test_console_script_exit_code(tmp_path):
    p = subprocess.run([sys.executable, "-m", "loomtrain.launch.cli", "train", "--set", "optim.lr=-1"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 2
    assert p.stderr.strip() == "error: optim.lr: must be > 0, got -1.0"


def test_resolved_config_round_trips(tmp_path):
    from loomtrain.trainer.config import save_config

    exp = load_config("tiny", ["train.steps=5"])
    save_config(exp, str(tmp_path / "config.yaml"))
    again = load_config(tmp_path / "config.yaml")
    assert again == exp
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["train"]["steps"] == 5
