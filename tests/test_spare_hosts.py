"""Losing a host whole on a cluster of namespace hosts (launch/netns.py): each host runs its own torchrun
agent (torchrun with two fixes for spares, launch/agent.py), ranks and snapshot process over its own /dev/shm;
the agents meet at a c10d store on a host that trains nothing (launch/rdzv_store.py) with ``--nnodes=N:N``, so
spare hosts wait in the rendezvous. A host is
lost by SIGKILL of everything on it, its tmpfs with it. What must hold: the survivors and a spare form the
new world, the lost host's chunks are rebuilt from parity on the spare (or, with more hosts lost than
parity covers, the run falls back to its disk checkpoint and says why), and every logged step's loss is
bit-identical to an undisturbed run of the same world.
"""
import json
import os
import re
import sys
import time

import pytest

from loomtrain.launch.forked import run_ranks
from loomtrain.launch.netns import read_log

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")
pytestmark = needs_root

WORKERS, STEPS, PORT = 3, 40, 29400
SETS = [f"parallel.dp_shard={WORKERS}", f"train.steps={STEPS}", "train.global_batch_size=6", "train.log_every=1",
        "faulttol.ranks_per_node=1", "faulttol.snapshot.every_steps=2", "faulttol.ec_parity=1",
        "faulttol.persist_every_steps=4", "faulttol.hang_timeout_s=120"]


def _losses(rank, overrides):
    from loomtrain.launch import train as launch_train
    from loomtrain.trainer.config import load_config

    return launch_train.run(load_config("tiny", overrides)).losses


@pytest.fixture(scope="module")
def reference(small_corpus, tmp_path_factory):
    """The undisturbed run: the same world of 3 data-parallel ranks, forked on this host."""
    from conftest import TEST_OVERRIDES

    out = tmp_path_factory.mktemp("reference")
    overrides = TEST_OVERRIDES + [f"data.prepared={small_corpus}", f"train.output_dir={out}"] + SETS + [
        "faulttol.snapshot.every_steps=0", "faulttol.persist_every_steps=0"]
    return run_ranks(_losses, WORKERS, overrides)[0]


def _agent(cluster, host, store, overrides, log):
    return cluster.spawn_agent(host, f"{store}:{PORT}", WORKERS, "spares", overrides, log, join_timeout_s=180,
                               env={"OMP_NUM_THREADS": "1"})


def _steps(out) -> list[dict]:
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [r for r in map(json.loads, f) if "loss" in r and "step" in r]


def _wait(predicate, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise TimeoutError(what)


def _holder_host(cluster, out) -> str:
    """The host whose process holds the output directory's lock: global rank 0's."""
    with open(os.path.join(out, ".lock")) as f:
        pid = json.load(f)["pid"]
    return next(name for name in cluster.hosts if pid in cluster.pids(name))


def _run_losing(tmp_path, overrides, hosts, spares, lose, after_step, then=None):
    """Start ``hosts`` (the world) and then ``spares``; once step ``after_step`` is logged, lose the hosts
    ``lose(cluster, out)`` names; ``then(cluster, logs)``, polled after that, names more hosts to lose once
    (an empty list: not yet). Returns (every logged step record, the agents' logs, exit codes, hosts lost)."""
    from loomtrain.launch.netns import HostCluster

    out = _output_dir(overrides)
    logs = {h: str(tmp_path / f"{h}.log") for h in hosts + spares + ["store"]}
    with HostCluster(hosts + spares + ["store"], shm_size="256m") as cluster:
        store = cluster.hosts["store"].address
        cluster.spawn("store", [sys.executable, "-m", "loomtrain.launch.rdzv_store", "--port", str(PORT)],
                      log=logs["store"])
        agents = {h: _agent(cluster, h, store, overrides, logs[h]) for h in hosts}
        _wait(lambda: _steps(out), 240, "the first step of the world")
        agents.update({h: _agent(cluster, h, store, overrides, logs[h]) for h in spares})  # they wait as spares
        _wait(lambda: any(r["step"] >= after_step for r in _steps(out)), 120, f"step {after_step}")
        lost = lose(cluster, out)
        for host in lost:
            cluster.kill(host)
        if then is not None:
            more = []
            _wait(lambda: more.extend(then(cluster, logs)) or more, 120, "the moment for the second loss")
            for host in more:
                cluster.kill(host)
            lost = lost + more
        codes = {}
        for host, proc in agents.items():
            try:
                codes[host] = proc.wait(timeout=300)
            except Exception:
                codes[host] = None
    text = {h: open(p).read() if os.path.exists(p) else "" for h, p in logs.items()}
    return _steps(out), text, codes, lost


def _output_dir(overrides) -> str:
    return next(o.split("=", 1)[1] for o in reversed(overrides) if o.startswith("train.output_dir="))


def _assert_bit_identical(records, reference, restored_step):
    assert max(r["step"] for r in records) == STEPS
    after = [r for r in records if r["step"] > restored_step]
    for r in records:
        assert r["loss"] == reference[r["step"]], (r["step"], r["loss"], reference[r["step"]])  # bit-identical
    assert sorted({r["step"] for r in after}) == list(range(restored_step + 1, STEPS + 1))


def test_the_host_of_rank_0_is_lost_and_a_spare_rebuilds_its_chunks_from_parity(overrides, reference, tmp_path):
    """3 hosts (one EC group, k=2, m=1) + 1 spare: losing rank 0's host (the output lock's and the workers'
    store's) leaves the survivors and the spare to form the world; the restart restores from memory with the
    lost host's chunks rebuilt from parity, and every step's loss equals the undisturbed run's."""
    records, logs, codes, lost = _run_losing(tmp_path, overrides + SETS, ["a", "b", "c"], ["d", "e"],
                                             lambda cluster, out: [_holder_host(cluster, out)], after_step=7)
    survivors = [h for h in "abcde" if h not in lost]
    assert all(codes[h] == 0 for h in survivors), (codes, {h: logs[h][-3000:] for h in survivors})
    text = "\n".join(logs[h] for h in survivors)
    restored = re.search(r"faulttol: restored step (\d+) from memory .*rebuilt (\d+) rank\(s\)' state from parity", text)
    assert restored, text[-6000:]
    joined = [h for h in "de" if "started the snapshot process" in logs[h]]
    assert len(joined) == 1, logs  # one spare took the lost host's place; the other waited and ended with the job
    _assert_bit_identical(records, reference, int(restored.group(1)))


def test_two_hosts_of_one_group_lost_fall_back_to_disk_and_say_why(overrides, reference, tmp_path):
    """More hosts of an EC group lost than it has parity (2 of k=2 + m=1): memory cannot serve, the new world
    (one survivor, two spares) loads the last disk checkpoint, says why, and trains on bit-identically."""
    records, logs, codes, lost = _run_losing(tmp_path, overrides + SETS, ["a", "b", "c"], ["d", "e"],
                                             lambda cluster, out: ["a", "b"], after_step=9)
    survivors = ["c", "d", "e"]
    assert all(codes[h] == 0 for h in survivors), (codes, {h: logs[h][-3000:] for h in survivors})
    text = "\n".join(logs[h] for h in survivors)
    fallback = re.search(r"memory snapshots could not serve \((.+)\); restored step (\d+) from the disk", text)
    assert fallback and "from memory" not in text, text[-6000:]
    _assert_bit_identical(records, reference, int(fallback.group(2)))


def test_a_second_host_lost_during_the_restore_falls_back_to_disk_on_the_last_spare(overrides, reference, tmp_path):
    """Rank 0's host is lost; the moment a spare's rank has come up for the restore (it started its node's
    snapshot process, which it does right before locating the epoch), a second host of the group goes too.
    The recovery in progress fails, the world forms again with the other spare, and with two of the group's
    three hosts gone memory cannot serve: the run loads its disk checkpoint, says why, and trains on
    bit-identically."""
    def when_a_spare_restores(cluster, logs):
        spare_up = any("started the snapshot process" in read_log(logs[h]) for h in "de")
        return [next(h for h in "bc" if h not in first)] if spare_up else []

    first = []
    records, logs, codes, lost = _run_losing(
        tmp_path, overrides + SETS, ["a", "b", "c"], ["d", "e"],
        lambda cluster, out: first.extend([_holder_host(cluster, out)]) or first, after_step=7,
        then=when_a_spare_restores)
    survivors = [h for h in "abcde" if h not in lost]
    assert len(lost) == 2 and all(codes[h] == 0 for h in survivors), (lost, codes, {h: logs[h][-3000:] for h in survivors})
    text = "\n".join(logs[h] for h in survivors)
    fallback = re.search(r"memory snapshots could not serve \((.+)\); restored step (\d+) from the disk", text)
    assert fallback, text[-6000:]
    _assert_bit_identical(records, reference, int(fallback.group(2)))
