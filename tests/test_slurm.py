"""The generated sbatch script under a real Slurm (Debian's slurm-wlm 22.05: slurmctld + slurmd on loopback,
two placeholder GPUs): the pre-emption warning writes a checkpoint and requeues, the requeued job resumes
with the losses of an uninterrupted run, a rank killed inside the job is restored from memory, scancel
leaves nothing in /dev/shm. Needs root and the packages (``.ci/run`` installs them)."""
import json
import os
import re
import shutil
import socket
import subprocess
import time

import pytest

from conftest import SLURM_CONF_POLICY, TEST_OVERRIDES, free_port, run_ranks

HAVE_SLURM = all(shutil.which(c) for c in ("slurmctld", "slurmd", "munged", "sbatch", "scontrol"))
pytestmark = pytest.mark.skipif(not HAVE_SLURM or os.geteuid() != 0,
                                reason="needs root and Debian's slurm-wlm + munge (installed by .ci/run)")

STEPS = 300
CONF = """ClusterName=loomtrain-test
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
""" + SLURM_CONF_POLICY + """NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=4000 Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A one-host Slurm cluster for this module; its environment (SLURM_CONF) for the commands."""
    d = tmp_path_factory.mktemp("slurm")
    host = socket.gethostname().split(".")[0]
    for sub in ("state", "spool"):
        (d / sub).mkdir()
    for i in range(2):  # slurmd 22.05 drops GPUs without device files ("Removing file-less GPU")
        subprocess.run(["mknod", str(d / f"fakegpu{i}"), "c", "1", "3"], check=True)
    (d / "slurm.conf").write_text(CONF.format(host=host, d=d, ctld_port=free_port(), d_port=free_port(),
                                              cpus=os.cpu_count()))
    (d / "gres.conf").write_text(f"NodeName={host} Name=gpu File={d}/fakegpu[0-1]\n")
    env = dict(os.environ, SLURM_CONF=str(d / "slurm.conf"))
    started_munge = subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode != 0
    if started_munge:
        os.makedirs("/run/munge", exist_ok=True)
        subprocess.run(["munged", "--force"], check=True, capture_output=True)
    subprocess.run(["slurmctld", "-f", env["SLURM_CONF"]], check=True, env=env)
    subprocess.run(["slurmd", "-f", env["SLURM_CONF"]], check=True, env=env)
    try:
        deadline = time.monotonic() + 60
        while "idle" not in subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True,
                                           env=env).stdout:
            assert time.monotonic() < deadline, (d / "slurmd.log").read_text()[-2000:]
            time.sleep(0.5)
        yield env
    finally:
        subprocess.run(["scontrol", "shutdown"], env=env, capture_output=True)
        for pid_file in ("slurmd.pid", "slurmctld.pid"):
            try:
                os.kill(int((d / pid_file).read_text()), 15)
            except (OSError, ValueError):
                pass
        if started_munge:
            subprocess.run(["pkill", "-x", "munged"])


def _job(env, job: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, env=env).stdout
    return dict(re.findall(r"(\w+)=(\S+)", out))


def _wait(env, job: str, states: set[str], timeout: float = 240, log: str | None = None) -> dict:
    deadline = time.monotonic() + timeout
    while (info := _job(env, job)).get("JobState") not in states:
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job} is {info.get('JobState')}, waited for {states}:\n"
                                 + (open(log).read()[-3000:] if log and os.path.exists(log) else ""))
        time.sleep(0.5)
    return info


def _submit(env, tmp_path, corpus, extra=(), max_restarts=0, cli=()) -> tuple[str, str, list[str]]:
    from loomtrain.launch.cli import main

    out = tmp_path / "run"
    sets = TEST_OVERRIDES + [f"data.prepared={corpus}", f"train.output_dir={out}", f"train.steps={STEPS}",
                             "parallel.dp_shard=2", "faulttol.snapshot.every_steps=2", "train.log_every=1",
                             "faulttol.hang_timeout_s=30"] + list(extra)
    args = ["slurm", "tiny", "--nodes", "1", "--gpus-per-node", "2", "--cpus-per-task", str(os.cpu_count()),
            "--time", "10:00", "--max-restarts", str(max_restarts)] + list(cli)
    for s in sets:
        args += ["--set", s]
    assert main(args) == 0
    sub = subprocess.run(["sbatch", "--parsable", str(out / "launch.sbatch")], capture_output=True, text=True,
                         env=env, check=True)
    job = sub.stdout.strip().split(";")[0]
    return job, str(out / f"slurm-{job}.out"), sets


def _losses(run_dir) -> dict[int, float]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def _reference(rank, overrides):
    from loomtrain.launch import train as launch_train
    from loomtrain.trainer.config import load_config

    return launch_train.run(load_config("tiny", overrides)).losses


def _present() -> set[str]:
    """Snapshot segments in /dev/shm and SMP directories in /tmp, as they are now."""
    return {f for f in os.listdir("/dev/shm") if f.startswith("lt")} | \
        {os.path.join("/tmp", f) for f in os.listdir("/tmp") if f.startswith("loomtrain-smp-")}


def _leftovers(before: set[str]) -> list[str]:
    """What the job left behind (anything already there when the test started is not its doing)."""
    return sorted(_present() - before)


def test_preemption_warning_checkpoints_requeues_and_resumes_identically(slurm, small_corpus, tmp_path):
    before = _present()
    job, log, sets = _submit(slurm, tmp_path, small_corpus)
    _wait(slurm, job, {"RUNNING"}, log=log)
    deadline = time.monotonic() + 120
    while not (os.path.exists(log) and re.search(r"^step=2\d/", open(log).read(), re.M)):
        assert time.monotonic() < deadline, open(log).read()[-3000:] if os.path.exists(log) else "no log"
        time.sleep(0.2)
    # What `#SBATCH --signal=B:USR1@LEAD` sends before the time limit.
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm, check=True)
    _wait(slurm, job, {"PENDING"}, log=log)  # requeued by the script after its checkpoint
    # It starts again once the old credential expires (cred_expire=10 s here; Slurm's default is 120 s).
    info = _wait(slurm, job, {"COMPLETED", "FAILED", "CANCELLED"}, log=log)
    text = open(log).read()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "1", text[-3000:]
    stopped = int(re.search(r"stopped by signal after step (\d+)", text).group(1))
    assert "requeue count 0" in text and "requeue count 1" in text  # one log, appended across the requeue
    assert f"resume: step {stopped} from the disk checkpoint" in text
    reference = run_ranks(_reference, 2, [s for s in sets if not s.startswith("train.output_dir")]
                          + [f"train.output_dir={tmp_path / 'ref'}"])[0]
    losses = _losses(tmp_path / "run")
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert all(losses[s] == reference[s] for s in losses), "losses differ from the uninterrupted run"
    assert _leftovers(before) == []


def test_rank_killed_inside_the_job_is_restored_from_memory(slurm, small_corpus, tmp_path):
    before = _present()
    job, log, _ = _submit(slurm, tmp_path, small_corpus, ["faulttol.inject={kind: sigkill, rank: 1, step: 5}"],
                          max_restarts=1)
    info = _wait(slurm, job, {"COMPLETED", "FAILED", "CANCELLED"}, log=log)
    text = open(log).read()
    assert info["JobState"] == "COMPLETED", text[-3000:]
    assert "restored step 4 from memory" in text and f"step={STEPS}/{STEPS} " in text
    assert _leftovers(before) == []


def test_scancel_leaves_nothing_behind(slurm, small_corpus, tmp_path):
    before = _present()
    job, log, _ = _submit(slurm, tmp_path, small_corpus, ["train.steps=100000"])
    _wait(slurm, job, {"RUNNING"}, log=log)
    deadline = time.monotonic() + 120
    while not [f for f in set(os.listdir("/dev/shm")) - before if f.startswith("lt")]:  # snapshots are in memory
        assert time.monotonic() < deadline, open(log).read()[-3000:] if os.path.exists(log) else "no log"
        time.sleep(0.2)
    subprocess.run(["scancel", job], env=slurm, check=True)
    _wait(slurm, job, {"CANCELLED"}, log=log)
    deadline = time.monotonic() + 60
    while _leftovers(before):  # the job's processes get SIGTERM first: the SMP frees its segments
        assert time.monotonic() < deadline, _leftovers(before)
        time.sleep(0.5)


def test_sigterm_checkpoints_where_a_relative_output_dir_says_from_any_submit_directory(slurm, small_corpus,
                                                                                         tmp_path, monkeypatch):
    """A pre-emption without warning, a time limit and scancel all send SIGTERM to every process of the job
    (SIGKILL KillWait s later): the ranks finish their step and checkpoint. The script was written with a
    relative output_dir and submitted from another directory: the trainer still writes where the STOP file,
    the log and the exclude list are (the script passes the directory as an absolute path)."""
    from loomtrain.launch.cli import main

    (tmp_path / "project").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "project")
    out = tmp_path / "project" / "run-rel"
    args = ["slurm", "tiny", "--nodes", "1", "--gpus-per-node", "2", "--cpus-per-task", str(os.cpu_count()),
            "--time", "10:00", "--max-restarts", "0"]
    for s in TEST_OVERRIDES + [f"data.prepared={small_corpus}", "train.output_dir=run-rel", "train.steps=100000",
                               "parallel.dp_shard=2", "faulttol.snapshot.every_steps=2", "train.log_every=1",
                               "checkpoint.every_steps=0"]:
        args += ["--set", s]
    assert main(args) == 0
    job = subprocess.run(["sbatch", "--parsable", str(out / "launch.sbatch")], capture_output=True, text=True,
                         env=slurm, check=True, cwd=tmp_path / "elsewhere").stdout.strip().split(";")[0]
    log = str(out / f"slurm-{job}.out")
    try:
        _wait(slurm, job, {"RUNNING"}, log=log)
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").exists() or len(_losses(out)) < 5:
            assert time.monotonic() < deadline, open(log).read()[-3000:] if os.path.exists(log) else "no log"
            time.sleep(0.2)
    finally:
        subprocess.run(["scancel", job], env=slurm, check=True)
        _wait(slurm, job, {"CANCELLED", "COMPLETED", "FAILED"}, log=log)
    text = open(log).read()
    stopped = int(re.search(r"stopped by signal after step (\d+)", text).group(1))
    assert os.path.isfile(out / "checkpoints" / f"step_{stopped:08d}" / ".metadata"), text[-3000:]
    assert stopped >= 5 and "loomtrain: SIGTERM" in text
    assert not (tmp_path / "elsewhere" / "run-rel").exists()


def test_a_host_whose_rank_hangs_is_named_and_excluded_when_the_job_is_requeued(slurm, small_corpus, tmp_path):
    """Rank 1 hangs at step 5 with no torchrun restarts left: the node's hang monitor names it and kills it, the
    job fails, and the script requeues it without that host (--exclude-after 1). On this one-node cluster the
    requeued job then cannot start: PENDING, its ExcNodeList the host."""
    host = socket.gethostname().split(".")[0]
    job, log, _ = _submit(slurm, tmp_path, small_corpus, ["faulttol.inject={kind: hang, rank: 1, step: 5}",
                                                          "faulttol.monitor.warmup_steps=3"],
                          cli=["--exclude-after", "1"])
    try:
        deadline = time.monotonic() + 240
        while (info := _job(slurm, job)).get("ExcNodeList") != host or info.get("JobState") != "PENDING":
            assert time.monotonic() < deadline, (info, open(log).read()[-3000:] if os.path.exists(log) else "no log")
            time.sleep(0.5)
        time.sleep(3)  # it stays out of the excluded host: not started again
        info = _job(slurm, job)
        text = open(log).read()
        assert info["JobState"] == "PENDING" and info["Restarts"] == "1", (info, text[-3000:])
        assert f"health: HANG: rank 1 on host {socket.gethostname()}" in text, text[-3000:]
        assert f"requeueing job {job} without host(s) {host}" in text
        [failure] = [json.loads(line) for line in open(tmp_path / "run" / "health" / "failures.jsonl")]
        assert (failure["slurm_node"], failure["rank"], failure["job"]) == (host, 1, job)
        assert list((tmp_path / "run" / "health").glob("hang-*-rank1.txt"))  # the stacks
    finally:
        subprocess.run(["scancel", job], env=slurm)
        _wait(slurm, job, {"CANCELLED"})
