"""``loomtrain slurm --spare-nodes`` under the real Slurm (Debian's slurm-wlm 22.05) with several nodes on one
machine: each node is a namespace host (launch/netns.py: its own network, hostname, ``/dev/shm`` and TMPDIR)
running its own slurmd, and slurmctld runs on a fifth host. Several slurmds on one network (``slurmd -N``, a
port per node) run too, but share one hostname, address, /dev/shm and host id: none could be lost alone.

A job of 3 training nodes + 1 spare: a node other than the batch host (which runs the rendezvous store) is
lost whole mid-run (every process on it SIGKILLed, its slurmd included, its tmpfs gone). What must hold: the
job and its step go on (``--no-kill``), the spare joins the world, the lost node's snapshot chunks are rebuilt
on it from parity, every logged step's loss is bit-identical to an undisturbed run, and the job ends
COMPLETED. Needs root, iproute2 and the packages (``.ci/run`` installs them)."""
import os
import re
import shutil
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

import test_spare_hosts
from conftest import SLURM_CONF_POLICY
from test_spare_hosts import SETS, _assert_bit_identical, _steps

reference = test_spare_hosts.reference  # the undisturbed run of the same world (a fixture)

HAVE_SLURM = all(shutil.which(c) for c in ("slurmctld", "slurmd", "munged", "sbatch", "scontrol", "ip"))
pytestmark = pytest.mark.skipif(not HAVE_SLURM or os.geteuid() != 0,
                                reason="needs root, iproute2 and Debian's slurm-wlm + munge (installed by .ci/run)")

NODES, SPARES = ["n1", "n2", "n3"], ["n4"]
CONF = """ClusterName=loomtrain-spares
SlurmctldHost=ctl({ctl})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={d}/state
SlurmdSpoolDir=/dev/shm/slurmd
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile=/dev/shm/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd-%n.log
SlurmdTimeout=10
""" + SLURM_CONF_POLICY + """{nodes}PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def _cgroup_mounts() -> str:
    """Shell lines mounting this machine's cgroup hierarchies again: ``ip netns exec`` mounts a fresh /sys, and
    slurmd will not start without them."""
    with open("/proc/self/mounts") as f:
        mounts = [line.split() for line in f if line.split()[1].startswith("/sys/fs/cgroup")]
    return "".join(f"mkdir -p {m[1]} && mount -t {m[2]} -o {m[3]} {m[0]} {m[1]} && " for m in mounts)


@pytest.fixture
def slurm_hosts(tmp_path):
    """``.cluster`` (the hosts), ``.slurm(*argv)`` (a Slurm command run on the controller's host, its output),
    ``.boot(node)`` (start a node's slurmd again, as after a reboot)."""
    from loomtrain.launch.netns import HostCluster

    d = tmp_path / "slurm"
    (d / "state").mkdir(parents=True)
    subprocess.run(["mknod", str(d / "fakegpu0"), "c", "1", "3"], check=True)  # slurmd keeps only GPUs with files
    names = ["ctl"] + NODES + SPARES
    munged = None
    if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode != 0:
        os.makedirs("/run/munge", exist_ok=True)
        subprocess.run(["munged", "--force"], check=True, capture_output=True)
        munged = int(open("/run/munge/munged.pid").read())
    try:
        with HostCluster(names, shm_size="256m") as cluster:
            addr = {n: cluster.hosts[n].address for n in names}
            nodes = "".join(f"NodeName={n} NodeAddr={addr[n]} CPUs={os.cpu_count()} RealMemory=1000 Gres=gpu:1 "
                            f"State=UNKNOWN\n" for n in NODES + SPARES)
            (d / "slurm.conf").write_text(CONF.format(ctl=addr["ctl"], d=d, nodes=nodes))
            (d / "gres.conf").write_text(f"Name=gpu File={d}/fakegpu0\n")
            (d / "hosts").write_text("127.0.0.1 localhost\n" + "".join(f"{addr[n]} {n}\n" for n in names))

            def boot(n):  # its own hostname (Slurm's node name), an /etc/hosts naming every node, its daemon
                daemon = (f"slurmctld -D -f {d}/slurm.conf" if n == "ctl" else
                          f"mkdir -p /dev/shm/slurmd && exec slurmd -D -f {d}/slurm.conf")
                cluster.spawn(n, ["sh", "-c", f"{_cgroup_mounts()}mount --bind {d}/hosts /etc/hosts && "
                                              f"exec unshare --uts sh -c 'hostname {n} && {daemon}'"],
                              log=str(d / f"{n}.out"))

            for n in names:
                boot(n)
            env = {k: v for k, v in os.environ.items() if k != "GLOO_SOCKET_IFNAME"}
            # The job's environment is the submitter's: each node's TMPDIR on its own tmpfs, one thread a rank.
            env.update(SLURM_CONF=str(d / "slurm.conf"), TMPDIR="/dev/shm/tmp", OMP_NUM_THREADS="1",
                       PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])  # this python

            def slurm(*argv, check=True) -> str:
                return subprocess.run(["ip", "netns", "exec", cluster.hosts["ctl"].namespace, *argv], env=env,
                                      capture_output=True, text=True, check=check).stdout

            deadline = time.monotonic() + 60
            while slurm("sinfo", "-h", "-N", "-o", "%T", check=False).split().count("idle") < len(NODES + SPARES):
                assert time.monotonic() < deadline, slurm("sinfo", "-N", check=False)
                time.sleep(0.5)
            yield SimpleNamespace(cluster=cluster, slurm=slurm, boot=boot)
            slurm("scontrol", "shutdown", check=False)
    finally:
        if munged:
            os.kill(munged, 15)


def _leftovers(cluster, host: str) -> list[str]:
    """Snapshot segments in host's /dev/shm and SMP directories in its TMPDIR, seen from inside its mounts."""
    pid = cluster.pids(host)[0]
    out = subprocess.run(["nsenter", "-t", str(pid), "-m", "sh", "-c", "ls -A /dev/shm /dev/shm/tmp"],
                         capture_output=True, text=True, check=True).stdout.split()
    return [f for f in out if f.startswith(("lt", "loomtrain-smp-"))]


def _training(cluster, host: str) -> bool:
    """A rank (not only a waiting agent) runs on ``host``: a process whose own module is loomtrain.launch.train
    (the agent names that module among its arguments too: ``-m loomtrain.launch.agent ... -m loomtrain.launch.train``;
    matching any argument took the waiting spare's agent for a rank, and CI killed the spare)."""
    for pid in cluster.pids(host):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if b"-m" in args and args[args.index(b"-m") + 1:args.index(b"-m") + 2] == [b"loomtrain.launch.train"]:
            return True
    return False


def _job(slurm, job: str) -> dict:
    return dict(re.findall(r"(\w+)=(\S+)", slurm("scontrol", "show", "job", job, check=False)))


def _submit(slurm, overrides, tmp_path):
    """Write the job (3 nodes + 1 spare, snapshots every 2 steps, checkpoints every 4) and submit it; returns
    (job id, output directory, log path, wait(predicate, timeout_s, what))."""
    from loomtrain.launch.cli import main

    out = str(tmp_path / "run")
    sets = overrides + SETS + [f"train.output_dir={out}"]
    args = ["slurm", "tiny", "--nodes", str(len(NODES)), "--spare-nodes", str(len(SPARES)), "--gpus-per-node", "1",
            "--cpus-per-task", str(os.cpu_count()), "--time", "10:00", "--max-restarts", "3"]
    assert main(args + [a for s in sets for a in ("--set", s)]) == 0
    job = slurm("sbatch", "--parsable", os.path.join(out, "launch.sbatch")).strip().split(";")[0]
    log = os.path.join(out, f"slurm-{job}.out")

    def wait(predicate, timeout_s, what):
        deadline = time.monotonic() + timeout_s
        while not predicate():
            assert time.monotonic() < deadline, (what, _job(slurm, job), open(log).read()[-6000:]
                                                 if os.path.exists(log) else "no log")
            time.sleep(0.1)

    return job, out, log, wait


ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")


def test_a_lost_node_is_replaced_by_a_spare_node_inside_the_job_and_training_goes_on_from_memory(
        slurm_hosts, overrides, reference, tmp_path):
    cluster, slurm = slurm_hosts.cluster, slurm_hosts.slurm
    job, out, log, wait = _submit(slurm, overrides, tmp_path)
    try:
        wait(lambda: any(r["step"] >= 5 for r in _steps(out)), 400, "step 5")  # 40 steps take ~5 s: poll fast
        # A node that trains (all four agents start together; whichever is left out of the world is the spare),
        # not the batch host n1: its loss ends the job by design (it runs the rendezvous store).
        lost = next(h for h in NODES + SPARES if h != "n1" and _training(cluster, h))
        cluster.kill(lost)
        info = _job(slurm, job)
        assert info["BatchHost"] == "n1", info
        wait(lambda: _job(slurm, job).get("JobState") in ENDED, 400, "the job's end")
        info, text = _job(slurm, job), open(log).read()
        assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", (info, text[-6000:])
        restored = re.search(r"faulttol: restored step (\d+) from memory .*rebuilt (\d+) rank\(s\)' state from "
                             r"parity", text)
        assert restored, text[-6000:]
        # The world was three nodes' SMPs, then the spare's: four hosts in all.
        assert len(set(re.findall(r"started the snapshot process of node (\w+)", text))) == 4, text[-6000:]
        _assert_bit_identical(_steps(out), reference, int(restored.group(1)))
        # The job's last step cleaned every node it still held (it runs on the nodes left, not the count at start).
        assert "environment variable conflicts with allocated node count" not in text, text[-3000:]
        left = [h for h in NODES + SPARES if h != lost]
        assert {h: _leftovers(cluster, h) for h in left} == {h: [] for h in left}
        assert lost in slurm("sinfo", "-h", "-N", "-t", "down,fail,unknown", "-o", "%N", check=False), \
            slurm("sinfo", "-N", check=False)  # Slurm saw the node go; the job went on without it
    finally:
        slurm("scancel", job, check=False)
