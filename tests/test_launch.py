"""Launch paths: --nproc (elastic), torchrun, Slurm srun variables, sbatch writer, plan, data prepare."""
import datetime
import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch.distributed as dist

from conftest import run_ranks
from loomtrain.launch.cli import main
from loomtrain.launch.env import expand_slurm_nodelist, read_env, slurm_rendezvous
from loomtrain.launch.forked import held_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sets(overrides):
    return [a for o in overrides for a in ("--set", o)]


def test_nproc_launch_end_to_end(overrides, tmp_path):
    """``loomtrain train --nproc 2``: real spawned ranks, metrics, saved config, final checkpoint."""
    out = tmp_path / "run"
    args = ["loomtrain", "train", "--nproc", "2"] + _sets(
        overrides + ["train.steps=3", "train.log_every=1", "checkpoint.at_end=true", "parallel.tp=2"])
    p = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2, 3]
    for key in ("step", "loss", "lr", "tokens_per_s", "mfu", "grad_norm", "step_time_s"):
        assert key in records[0]
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 for r in records)
    assert all(r["attention"] == "cpu_flash" and r["dtype"] == "float32" for r in records)  # the run's choices
    assert "float32, attention cpu_flash" in p.stdout  # ... and the start line's
    assert (out / "config.yaml").is_file()
    assert (out / "checkpoints" / "step_00000003" / ".metadata").is_file()
    assert "tp=2" in p.stdout


# The loss on fixed validation batches, evaluated after every step: it falls step after step only if the
# optimizer updated the parameters (the training loss of 3 different batches is too noisy to tell).
EVAL_EVERY_STEP = ["train.eval_every=1", "train.eval_batches=1"]


def test_torchrun_module_entry_point_trains(overrides, tmp_path):
    """``torchrun -m loomtrain.launch.train``: the ranks train (validation loss falls every step), log every
    step with a finite loss, report the layout and write the final checkpoint."""
    out = tmp_path / "run"
    settings = EVAL_EVERY_STEP + ["train.steps=3", "train.log_every=1", "parallel.dp_shard=2", "checkpoint.at_end=true"]
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "loomtrain.launch.train", "tiny"] + _sets(overrides + settings)
    p = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "dp_shard=2" in p.stdout
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in records), records
    val = [r["val_loss"] for r in records]
    assert val[0] > val[1] > val[2], val
    assert (out / "checkpoints" / "step_00000003" / ".metadata").is_file()


def _threads_after_training(rank, overrides, fail):
    import threading

    from loomtrain.trainer.config import load_config
    from loomtrain.launch.train import run

    exp = load_config("tiny", overrides)
    if fail:  # parameters blown up by the first update: the loss is not finite and fit raises
        exp.optim.lr = 1e30
    try:
        run(exp)
        assert not fail, "a learning rate of 1e30 trained"
    except FloatingPointError:
        assert fail
    return sorted(t.name for t in threading.enumerate() if t is not threading.main_thread())


def test_training_leaves_no_thread_running_into_interpreter_exit(overrides):
    """The data prefetcher is joined when training ends, cleanly or not. Left running, it is inside a
    torch op when the interpreter finalizes and the process aborts ("terminate called without an active
    exception", SIGABRT: seen once in CI as torchrun's entry point exiting 1 after a good run)."""
    for fail in (False, True):
        left = run_ranks(_threads_after_training, 2, overrides + ["train.steps=3", "parallel.dp_shard=2"], fail)
        assert left == [[], []], (fail, left)


def _train_slurm(rank, overrides):
    from loomtrain.launch.env import read_env
    from loomtrain.trainer.config import load_config
    from loomtrain.launch.train import run

    r = run(load_config("tiny", overrides))
    return read_env(), r.losses, r.val_losses


def test_srun_environment_trains(overrides):
    """Ranks given only srun's SLURM_* variables find their rank, world and rendezvous and train together:
    a finite loss every step and a validation loss that falls every step."""
    results = run_ranks(_train_slurm, 2, overrides + EVAL_EVERY_STEP + ["train.steps=3", "parallel.dp_shard=2"],
                        launcher="slurm")
    assert [r[0] for r in results] == [(0, 2, 0, 2, "slurm"), (1, 2, 1, 2, "slurm")]
    for _, losses, val in results:
        assert sorted(losses) == [1, 2, 3] and all(math.isfinite(x) for x in losses.values()), losses
        assert val[1] > val[2] > val[3], val


def test_slurm_environment_parsing():
    env = {"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "8(x2)",
           "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "4242"}
    assert read_env(env) == (9, 16, 1, 8, "slurm")
    assert slurm_rendezvous(env) == ("gpu07", str(20000 + 4242))
    assert expand_slurm_nodelist("node[01-03,7],gpu5") == ["node01", "node02", "node03", "node7", "gpu5"]
    assert read_env({"RANK": "1", "WORLD_SIZE": "2"})[4] == "torchrun"  # torchrun wins over srun variables
    assert read_env({}) == (0, 1, 0, 1, "single")


def test_sbatch_script(tmp_path, capsys):
    script = tmp_path / "job.sbatch"
    assert main(["slurm", "tiny", "--nodes", "4", "--gpus-per-node", "2", "--output", str(script),
                 "--set", "train.steps=5", "--set", "parallel.tp=2"]) == 0
    text = script.read_text()
    assert "#SBATCH --nodes=4" in text and "--nnodes=4 --nproc-per-node=2" in text
    assert "--rdzv-backend=c10d" in text and "-m loomtrain.launch.train" in text
    assert "--set train.steps=5" in text and "--resume auto" in text
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert "#SBATCH --cpus-per-task=16" in text and "#SBATCH --open-mode=append" in text  # 8 per GPU by default
    assert "kill -TERM" not in text and "set -e" not in text  # srun would SIGKILL; a trapped wait would exit
    assert main(["slurm", "tiny", "--nodes", "4", "--gpus-per-node", "2", "--output", str(script), "--cpus-per-task",
                 "3", "--mem", "64G", "--no-requeue", "--preempt-lead-s", "600", "--sbatch-arg=--account=proj",
                 "--set", "parallel.tp=2"]) == 0
    text = script.read_text()
    assert all(line in text.splitlines() for line in ("#SBATCH --cpus-per-task=3", "#SBATCH --mem=64G",
                                                       "#SBATCH --signal=B:USR1@600", "#SBATCH --account=proj"))
    assert '[ "0" = 1 ]' in text  # no requeue
    assert main(["slurm", "tiny", "--nodes", "3", "--gpus-per-node", "1", "--set", "parallel.tp=2"]) == 2
    assert main(["slurm", "tiny", "--nodes", "1", "--gpus-per-node", "1", "--cpus-per-task", "0"]) == 2


FAKE_SLURM = {  # just enough of Slurm for the script's requeue path; calls logged to $LOG
    "srun": 'echo "srun $*" >> "$LOG"\ncase "$*" in *--cleanup-job*) exit 0;; esac\nexit 1\n',  # the step fails
    "python": 'case "$*" in *--exclude-list*) echo gpu-b;; esac\n',  # the hang monitor names a failed host
    "scontrol": """echo "scontrol $*" >> "$LOG"
case "$1 $2" in
  "show hostnames") echo "$3";;
  "show job") releases=$(grep -c '^scontrol release' "$LOG")
    # Held until a second release: the first lands while the job is still ending (a race Slurm can lose).
    if grep -q '^scontrol requeuehold' "$LOG" && [ "$releases" -lt 2 ]; then reason=JobHeldUser; else reason=None; fi
    echo "JobId=7 JobState=PENDING Reason=$reason ExcNodeList=(null)";;
  requeuehold*) kill -TERM "$PPID";;  # Slurm ends the batch shell of a job it requeues
esac
""",
}


def test_a_job_requeued_without_a_failed_host_is_never_left_held(tmp_path):
    """M4: a job that failed with a host to exclude is requeued held (Slurm changes ExcNodeList only then), the
    host excluded, and released until Slurm no longer reports the hold: one release that did not take left the
    job held for good. Run on the generated script with a fake Slurm on PATH (modelled: the first release lost)."""
    script = tmp_path / "job.sbatch"
    assert main(["slurm", "tiny", "--nodes", "2", "--gpus-per-node", "1", "--output", str(script),
                 "--set", f"train.output_dir={tmp_path / 'run'}"]) == 0
    fake = tmp_path / "bin"
    fake.mkdir()
    for name, body in FAKE_SLURM.items():
        (fake / name).write_text("#!/bin/bash\n" + body)
        (fake / name).chmod(0o755)
    log = tmp_path / "calls"
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}", LOG=str(log), SLURM_JOB_ID="7",
               SLURM_JOB_NODELIST="gpu-[a-b]")
    out = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    calls = log.read_text().splitlines()
    assert "requeueing job 7 without host(s) gpu-b" in out.stdout, out.stdout + out.stderr
    assert "scontrol update JobId=7 ExcNodeList=gpu-b" in calls, calls
    last = next(i for i in reversed(range(len(calls))) if calls[i] == "scontrol show job 7")
    assert calls.count("scontrol release 7") == 2 and last > calls.index("scontrol release 7"), calls  # checked


def test_sbatch_script_with_spare_nodes_survives_a_lost_node(tmp_path):
    """Spares: N + S nodes held, a lost node ends neither the job (--no-kill) nor the step, the rendezvous is a
    store outside torchrun that agents only join (is_host=false, no shared bootstrap store) and N:N agents
    train while S wait. Without spares the script is today's (a failed task ends the step)."""
    script = tmp_path / "job.sbatch"
    assert main(["slurm", "tiny", "--nodes", "4", "--gpus-per-node", "2", "--spare-nodes", "1", "--output",
                 str(script), "--set", "train.output_dir=" + str(tmp_path / "run")]) == 0
    text = script.read_text()
    lines = text.splitlines()
    assert "#SBATCH --nodes=5" in lines and "#SBATCH --no-kill" in lines
    assert "--nnodes=4:4 --nproc-per-node=2" in text and "srun --no-kill --kill-on-bad-exit=0 python" in text
    assert "-- python -m loomtrain.launch.agent \\" in text  # torchrun with the spare fixes
    assert 'srun --no-kill --kill-on-bad-exit=0 python -m loomtrain.launch.spare_watch --store ' \
           '"$MASTER_ADDR:$MASTER_PORT" -- python -m loomtrain.faulttol.hang_monitor' in text  # the batch host's loss
    assert "export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in lines and "--rdzv-conf=is_host=false," in text
    store = text.index("python -m loomtrain.launch.rdzv_store --port \"$MASTER_PORT\"")
    assert store < text.index("srun --no-kill") < text.index('kill "$store_pid"')
    # The cleanup step runs on the nodes left: the shell's node count still includes a lost one (srun refuses it).
    cleanup = next(line for line in lines if "--cleanup-job" in line)
    assert cleanup.startswith("env -u SLURM_JOB_NUM_NODES -u SLURM_NNODES srun --nodes=\"$(scontrol show job"), cleanup
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert main(["slurm", "tiny", "--nodes", "4", "--gpus-per-node", "2", "--output", str(script)]) == 0
    plain = script.read_text()
    assert "#SBATCH --nodes=4" in plain and "--no-kill" not in plain and "rdzv_store" not in plain
    assert "spare_watch" not in plain
    assert "srun --kill-on-bad-exit=1 python" in plain and "--nnodes=4 --nproc-per-node=2" in plain
    assert "\nsrun --ntasks-per-node=1 --overlap python -m loomtrain.faulttol.smp --cleanup-job" in plain


def _spare_watch(tmp_path, store: str, command: list[str]) -> tuple[int, list[str]]:
    """Run spare_watch (probes every 0.2 s, 2 misses) under a fake Slurm whose job lost its batch host n1."""
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    log = tmp_path / "calls"
    (fake / "scontrol").write_text(f"""#!/bin/sh
echo "scontrol $*" >> {log}
case "$1 $2" in
  "show job") echo "JobId=7 JobState=RUNNING Requeue=1 BatchHost=n1 NodeList=n[2-4]";;
  "show hostnames") printf 'n2\\nn3\\nn4\\n';;
esac
""")
    (fake / "scontrol").chmod(0o755)
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}", SLURM_JOB_ID="7")
    rc = subprocess.run([sys.executable, "-m", "loomtrain.launch.spare_watch", "--store", store, "--every-s", "0.2",
                         "--misses", "2", "--", *command], env=env, timeout=60).returncode
    return rc, log.read_text().splitlines() if log.exists() else []


def test_a_node_of_a_job_with_spares_requeues_it_when_the_batch_host_and_its_store_are_lost(tmp_path):
    """Slurm keeps a --no-kill job RUNNING after its batch host (and the rendezvous store on it) died; the watch
    around each node's task requeues it once the store stops answering and Slurm has dropped the batch host. While
    the store answers, Slurm is never asked; the task's exit status is passed on."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{closed.getsockname()[1]}"  # nothing listens there once closed
    for task in ("sleep 2; exit 3", "exit 3"):  # still running, or already failed (agents give up before Slurm)
        rc, calls = _spare_watch(tmp_path, dead, ["sh", "-c", task])
        assert rc == 3 and calls.count("scontrol requeue 7") == 1, (task, calls)
        assert calls.index("scontrol show job 7") < calls.index("scontrol requeue 7")
        (tmp_path / "calls").unlink()
    with socket.socket() as store:
        store.bind(("127.0.0.1", 0))
        store.listen(64)
        for task, code in (("sleep 1", 0), ("exit 4", 4)):
            rc, calls = _spare_watch(tmp_path, f"127.0.0.1:{store.getsockname()[1]}", ["sh", "-c", task])
            assert rc == code and calls == [], (task, calls)


def test_the_spare_fixes_apply_to_this_torch(monkeypatch):
    """launch/agent.py patches torch's elastic internals; a torch whose internals moved must fail here, not
    fall back quietly to restarts for every waiting spare."""
    from torch.distributed.elastic.agent.server import api as agent_api
    from torch.distributed.elastic.rendezvous import dynamic_rendezvous as dr

    from loomtrain.launch.agent import patch_torch_elastic

    for owner, name in ((dr._RendezvousJoinOp, "__call__"), (dr.DynamicRendezvousHandler, "num_nodes_waiting"),
                        (agent_api.SimpleElasticAgent, "run")):
        monkeypatch.setattr(owner, name, getattr(owner, name))  # restored after the test

    assert patch_torch_elastic() and patch_torch_elastic()  # idempotent
    assert getattr(dr._RendezvousJoinOp.__call__, "_loomtrain", False)


def test_plan_at_cluster_scale(capsys):
    assert main(["plan", "llama8b_64k_cluster", "--world-size", "1024", "--gpus-per-node", "8"]) == 0
    out = capsys.readouterr().out
    assert "dp_shard=32" in out and "cp=4" in out and "tp=8" in out
    assert "B parameters" in out and "GFLOP" in out and "peak memory per rank (estimate" in out
    tp_row = next(line for line in out.splitlines() if line.startswith("tp "))
    assert tp_row.split()[1:3] == ["8", "128"]  # size 8, 128 groups
    assert main(["plan", "llama8b_64k_cluster", "--world-size", "64", "--gpus-per-node", "4"]) == 0
    out = capsys.readouterr().out
    assert "warning: tp=8 spans nodes" in out
    assert main(["plan", "llama8b_64k_cluster", "--world-size", "100"]) == 2


def _estimated(capsys, *extra):
    assert main(["plan", "llama8b_64k_cluster", "--world-size", "256", *extra]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "estimated step time" in x)
    step, mfu = line.split("time ")[1].split(" s, MFU ")
    return float(step), float(mfu.split()[0])


def test_plan_step_estimate_responds_to_links_and_peak(capsys):
    step, mfu = _estimated(capsys)
    assert 0 < mfu <= 1
    slow_step, slow_mfu = _estimated(capsys, "--inter-node-gbps", "25")
    assert slow_step > step and slow_mfu < mfu  # FSDP and cp groups span nodes: slower links cost time
    half_peak_step, _ = _estimated(capsys, "--peak-tflops", "494.5")
    assert half_peak_step > step
    assert main(["plan", "llama8b_64k_cluster", "--world-size", "256", "--inter-node-gbps", "0"]) == 2


def test_data_prepare_command(tmp_path, capsys):
    corpus = tmp_path / "texts"
    corpus.mkdir()
    for i in range(5):
        (corpus / f"{i}.txt").write_text(f"text {i} " * 50)
    prefix = tmp_path / "out" / "tokens"
    assert main(["data", "prepare", "--set", f"data.corpus={corpus}", "--set", "data.valid_fraction=0.2",
                 "--output", str(prefix), "--writer", "builtin"]) == 0
    assert (tmp_path / "out" / "tokens_train.bin").is_file() and (tmp_path / "out" / "tokens.json").is_file()
    assert f"data.prepared={prefix}" in capsys.readouterr().out


def test_a_held_port_is_taken_by_no_other_bind_but_by_rank_0s_store():
    """What held_port promises run_ranks: while it is held, no other bind gets the port (the race free_port
    had), and torch's TCPStore, which sets SO_REUSEADDR, binds and serves on it."""
    holder = held_port()
    port = holder.getsockname()[1]
    try:
        with socket.socket() as other, pytest.raises(OSError):
            other.bind(("127.0.0.1", port))
        store = dist.TCPStore("127.0.0.1", port, 1, is_master=True, timeout=datetime.timedelta(seconds=30))
        store.set("k", "v")
        assert dist.TCPStore("127.0.0.1", port, 1, is_master=False).get("k") == b"v"
    finally:
        holder.close()
