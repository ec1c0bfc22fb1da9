"""``plan`` and ``slurm`` check and describe the job that will run (its device, its data's vocabulary), not the
machine that writes the plan or the script."""
import pytest

from loomtrain.launch.cli import main


def test_slurm_checks_the_job_for_gpus_not_the_login_node(tmp_path, capsys):
    """compile with tp > 1 is refused on CPU only; a CPU login node writing a GPU job's script must accept it,
    and must refuse it when the config itself asks for cpu."""
    script = tmp_path / "job.sbatch"
    gpu_only = ["--set", "parallel.tp=2", "--set", "parallel.compile=true"]
    assert main(["slurm", "tiny", "--nodes", "2", "--gpus-per-node", "2", "--output", str(script), *gpu_only]) == 0
    assert script.exists()
    capsys.readouterr()
    assert main(["slurm", "tiny", "--nodes", "2", "--gpus-per-node", "2", "--output", str(tmp_path / "cpu.sbatch"),
                 *gpu_only, "--set", "parallel.device=cpu"]) == 2
    assert "parallel.compile: not with parallel.tp > 1 on CPU" in capsys.readouterr().err
    assert not (tmp_path / "cpu.sbatch").exists()


def _model_line(capsys) -> str:
    return next(line for line in capsys.readouterr().out.splitlines() if line.startswith("model: "))


def test_plan_takes_the_vocabulary_from_the_tokenizer(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    assert main(["plan", "tiny", "--world-size", "1"]) == 0
    line = _model_line(capsys)
    assert "vocab 320 from the tokenizer's 257 (byte)" in line  # 257 byte ids, rounded up to 64
    assert "3.1" in line.split("parameters")[0] and "M parameters" in line  # 3.1M, not 0.029B at vocab 50304

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(["def f(x):\n    return x + 1\n"] * 20,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]", "</s>"]))
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    vocab = Tokenizer.from_file(str(path)).get_vocab_size()
    assert main(["plan", "tiny", "--world-size", "1", "--set", f"data.tokenizer={path}"]) == 0
    rounded = 64 * -(-vocab // 64)
    assert f"vocab {rounded} from the tokenizer's {vocab} ({path})" in _model_line(capsys)
    assert main(["plan", "tiny", "--world-size", "1", "--set", "model.vocab_size=1024"]) == 0
    assert "vocab 1024 from model.vocab_size" in _model_line(capsys)


def test_plan_takes_the_vocabulary_of_prepared_data(small_corpus, capsys):
    assert main(["plan", "tiny", "--world-size", "1", "--set", f"data.prepared={small_corpus}"]) == 0
    assert "vocab 320 from the tokenizer's 257" in _model_line(capsys)


@pytest.mark.parametrize("missing", ["data.tokenizer=/nonexistent/tokenizer.json", "data.prepared=/nonexistent/p"])
def test_plan_states_an_assumed_vocabulary_when_the_data_is_elsewhere(missing, capsys):
    """Planning a cluster job where its data is not mounted: the figures use a stated assumption."""
    assert main(["plan", "tiny", "--world-size", "1", "--set", missing]) == 0
    assert "vocab 50304 from ASSUMED 50304" in _model_line(capsys)


def _plan(capsys, *argv) -> str:
    assert main(["plan", *argv]) == 0
    return capsys.readouterr().out


def test_plan_figures_agree_with_each_other(tmp_path, capsys):
    """One step estimate per plan, in the units metrics.jsonl uses; the node line and memory limit match the
    job's device; rank groups read as the ranks they are."""
    import yaml

    out = _plan(capsys, "tiny", "--world-size", "1")
    assert "(1 node x 1 GPU)" in out and "of 80 GiB" in out
    mfu = float(out.split(", MFU ")[1].split()[0])  # a fraction, as in metrics.jsonl
    assert 0 < mfu <= 1 and "%" not in out.split(", MFU ")[1].split()[0]
    out = _plan(capsys, "tiny", "--world-size", "2", "--set", "parallel.device=cpu", "--set", "parallel.dp_shard=2")
    assert "(1 node x 2 CPU processes)" in out and "of 80 GiB" not in out and "estimated step time" not in out
    out = _plan(capsys, "llama8b_512k_adaptive_cluster", "--world-size", "512")
    assert "predicted makespan" in out and "estimated step time" not in out  # the sample step is the estimate
    cluster = {"fabrics": {"pod-a": {"kind": "ib", "gbps": 400}, "pod-b": {"kind": "ib", "gbps": 400},
                           "dc": {"kind": "ethernet", "gbps": 25}}, "between": "dc",
               "hosts": [{"name": f"{p}{i}", "fabric": f"pod-{p}", "devices": 8} for p in "ab" for i in range(2)]}
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(cluster))
    out = _plan(capsys, "tiny", "--cluster", str(path), "--set", "parallel.pp=2", "--set", "parallel.dp_shard=16",
                "--set", "train.global_batch_size=64")
    assert "Gbit/s between nodes" not in out and "estimated step time" not in out  # the file's fabrics decide
    assert "modelled step" in out and "ranks 0,16 on a0,b0 via dc" in out  # a pipeline pair, not 17 ranks
    assert "ranks 0-15 on a0,a1 via pod-a" in out


@pytest.mark.parametrize("config, world, layout", [
    ("llama70b_256k_cluster", 512, "pp=4 x dp_replicate=1 x dp_shard=4 x cp=8 x tp=4"),
    ("llama405b_128k_cluster", 1024, "pp=16 x dp_replicate=1 x dp_shard=4 x cp=2 x tp=8"),
    ("llama8b_512k_adaptive_cluster", 512, None),
    ("llama70b_256k_adaptive_cluster", 512, "dp_shard=128 x cp=1 x tp=4"),
])
def test_the_large_cluster_configs_plan_within_80_gib(config, world, layout, capsys):
    """The 70B at 256K (2-D cp inside pp), 405B at 128K and 8B at 512K recipes fit an 80 GiB GPU by plan's memory
    model, with their activation modes; without them (plain full checkpointing for the 405B, no loss chunks for
    the 8B; the 70B's adaptive pool with the whole model gathered, ``sp_mode: adaptive``, instead of
    ``adaptive_sharded``) they would not, which is why the configs set them."""
    import re

    def total(extra):
        assert main(["plan", config, "--world-size", str(world), *extra]) == 0
        out = capsys.readouterr().out
        if layout:
            assert layout in out
        return float(re.search(r"total\s+([\d.]+) GiB\s+of 80 GiB", out).group(1))

    assert total([]) < 80 * 0.9  # a 10% margin for the model's error
    if config == "llama405b_128k_cluster":
        assert total(["--set", "parallel.activation_checkpoint=full"]) > 80 * 0.9
    if config == "llama8b_512k_adaptive_cluster":
        assert total(["--set", "train.loss_chunk_tokens=0"]) > 80
    if config == "llama70b_256k_adaptive_cluster":
        assert total(["--set", "parallel.sp_mode=adaptive"]) > 80
