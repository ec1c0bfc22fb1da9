"""Fault tolerance end to end: a run hit by an injected fault restarts, restores from the in-memory
snapshot (rebuilding a lost node's chunks from parity) and finishes bit-identical to an uninterrupted run."""
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import run_ranks, run_ranks_restarting, signal_self_after_step
from loomtrain.faulttol.layout import NodeLayout, choose_chunks
from loomtrain.faulttol.smp import orphan_segments, segment_prefix, start_daemon, stop_daemons
from loomtrain.trainer.config import ConfigError, FaultTolConfig

WORLD, STEPS, EVERY = 4, 8, 2
# The watchdog's limit is far above any step of the tiny model here, even with 4 ranks and 4 snapshot processes
# on 2 busy cores (scripts/bench_fault_margins.py, BENCHMARKS.md): only a hang reaches it. The injected hang
# cuts its own rank's limit to HUNG_S when it starts (_train_hang_caught_soon), so that test stays short.
WATCHDOG_S, HUNG_S = 60, 1.0
FT = ["parallel.dp_shard=4", f"train.steps={STEPS}", f"faulttol.snapshot.every_steps={EVERY}",
      "faulttol.ranks_per_node=1", f"faulttol.hang_timeout_s={WATCHDOG_S}"]


# ---------------------------------------------------------------- layout and epoch choice (pure)
def _ft(**kw) -> FaultTolConfig:
    ft = FaultTolConfig()
    for k, v in kw.items():
        setattr(ft, k, v)
    return ft


@pytest.mark.parametrize("world, rpn, group, parity", [(4, 1, 4, 1), (8, 2, 4, 2), (12, 1, 6, 2), (6, 3, 2, 1)])
def test_any_m_node_losses_leave_k_chunks_of_every_payload(world, rpn, group, parity):
    layout = NodeLayout.from_config(_ft(ranks_per_node=rpn, ec_group_nodes=group, ec_parity=parity), world, world)
    assert (layout.data, layout.parity) == (group - parity, parity)
    for rank in range(world):
        holders = [layout.holder(rank, j) for j in range(group)]
        assert len({layout.node_of(h) for h in holders}) == group  # every chunk on a different node
        assert holders[0] == rank  # chunk 0 stays home
    for lost in itertools.combinations(range(layout.nodes), parity):
        for rank in range(world):
            alive = [j for j in range(group) if layout.node_of(layout.holder(rank, j)) not in lost]
            assert len(alive) >= layout.data


def test_a_stride_spreads_each_ec_group_over_racks():
    """8 nodes in 4 racks of 2 (nodes 2i, 2i+1). Consecutive groups of 4 lose 2 nodes with a rack (m=1 is
    not enough); with ec_group_stride=2 every group has one node per rack, so any rack may go."""
    racks = [(2 * i, 2 * i + 1) for i in range(4)]

    def survives_every_rack(layout):
        return all(len([j for j in range(4) if layout.node_of(layout.holder(r, j)) not in rack]) >= layout.data
                   for rack in racks for r in range(8))

    consecutive = NodeLayout.from_config(_ft(ranks_per_node=1, ec_group_nodes=4, ec_parity=1), 8, 8)
    spread = NodeLayout.from_config(_ft(ranks_per_node=1, ec_group_nodes=4, ec_parity=1, ec_group_stride=2), 8, 8)
    assert consecutive.group_of(0) == [0, 1, 2, 3] and spread.group_of(0) == [0, 2, 4, 6]
    assert spread.group_of(5) == [1, 3, 5, 7] and sorted(sum(spread.stripes(), [])) == list(range(8))
    assert not survives_every_rack(consecutive) and survives_every_rack(spread)
    with pytest.raises(ConfigError, match="faulttol.ec_group_stride: groups of 4 nodes over racks of 3 nodes of 8: "
                                          "one rack's loss would cost a group 2 nodes"):
        NodeLayout.from_config(_ft(ranks_per_node=1, ec_group_nodes=4, ec_group_stride=3), 8, 8)
    # No parity, nothing a rack's loss could cost: the same stride is accepted (nodes 0, 3, 6, 1 | 4, 7, 2, 5).
    unprotected = NodeLayout.from_config(_ft(ranks_per_node=1, ec_group_nodes=4, ec_group_stride=3, ec_parity=0), 8, 8)
    assert unprotected.groups == ((0, 1, 3, 6), (2, 4, 5, 7)) and (unprotected.data, unprotected.parity) == (4, 0)


def _survives_any_rack(layout, racks) -> bool:
    return all(len([j for j in range(layout.group_nodes) if racks[layout.node_of(layout.holder(r, j))] != rack])
               >= layout.data for rack in set(racks) for r in range(layout.world))


def test_ec_groups_are_spread_over_the_fabric_groups_of_the_cluster_description():
    """Racks from the cluster description (placement=fabric), no stride set: each group takes one node per
    fabric group, and with ec_group_nodes left to auto its size is the largest that survives a rack's loss."""
    four = list("aabbccdd")  # 8 nodes in 4 fabric groups of 2
    layout = NodeLayout.from_config(_ft(ranks_per_node=1, ec_parity=1), 8, 8, racks=four)
    assert layout.group_nodes == 4 and layout.groups == ((0, 2, 4, 6), (1, 3, 5, 7))
    assert _survives_any_rack(layout, four) and "spread over 4 fabric groups" in layout.describe()
    assert not _survives_any_rack(NodeLayout.from_config(_ft(ranks_per_node=1, ec_parity=1), 8, 8), four)
    two = ["a"] * 4 + ["b"] * 4  # two racks and m=1: only groups of 2 (one node per rack) survive one
    paired = NodeLayout.from_config(_ft(ranks_per_node=1, ec_parity=1), 8, 8, racks=two)
    assert paired.group_nodes == 2 and paired.groups[0] == (0, 4) and _survives_any_rack(paired, two)
    wide = NodeLayout.from_config(_ft(ranks_per_node=1, ec_parity=2), 8, 8, racks=two)  # m=2: 4 nodes, 2 per rack
    assert wide.group_nodes == 4 and _survives_any_rack(wide, two) and "memory 2.00x the state" in wide.describe()
    # Members in rank order: a stripe's group (and its all_gather) orders ranks that way (dealt: 0, 4, 1, 5).
    assert wide.groups == ((0, 1, 4, 5), (2, 3, 6, 7)) and all(s == sorted(s) for s in wide.stripes())
    forced = NodeLayout.from_config(_ft(ranks_per_node=1, ec_parity=1, ec_group_nodes=8), 8, 8, racks=two)
    assert "a rack loss costs a group 4 nodes > ec_parity" in forced.describe()  # said, not refused
    consecutive = NodeLayout.from_config(_ft(ranks_per_node=1, ec_parity=1, ec_group_stride=1), 8, 8, racks=four)
    assert consecutive.groups == ((0, 1, 2, 3, 4, 5, 6, 7),)  # stride 1: the racks are ignored


def test_the_racks_are_the_fabric_groups_of_the_placed_cluster():
    from types import SimpleNamespace

    from loomtrain.faulttol.manager import node_racks
    from loomtrain.launch.topology import Cluster, Fabric, Host

    fabrics = {"pod1": Fabric("pod1", "ib", 400), "pod2": Fabric("pod2", "ib", 400), "dc": Fabric("dc", "ethernet", 25)}
    cluster = Cluster(fabrics, [Host(f"h{i}", "pod1" if i < 2 else "pod2", 2) for i in range(4)], "dc")
    env = SimpleNamespace(world_size=8, local_world_size=2)
    assert node_racks(cluster, _ft(), env) == ["pod1", "pod1", "pod2", "pod2"]  # a node is a host
    assert node_racks(cluster, _ft(ranks_per_node=1), env) == ["pod1"] * 4 + ["pod2"] * 4  # simulated nodes
    assert node_racks(None, _ft(), env) is None


def test_replicas_are_the_redundancy_when_they_hold_the_same_state_on_other_nodes():
    replicas = [[0, 2], [1, 3]]  # dp_replicate=2 x dp_shard=2, one rank per node
    layout = NodeLayout.from_config(_ft(ranks_per_node=1), 4, 4, replicas=replicas)
    assert layout.by_replicas and (layout.data, layout.parity, layout.group_nodes) == (1, 1, 2)
    assert layout.stripes() == [[0, 2], [1, 3]] and layout.holder(0, 1) == 2 and layout.holder(3, 1) == 1
    assert "redundancy by 2 data-parallel replicas" in layout.describe()
    assert not NodeLayout.from_config(_ft(ranks_per_node=1, redundancy="erasure"), 4, 4, replicas=replicas).by_replicas
    same_node = NodeLayout.from_config(_ft(ranks_per_node=2), 4, 4, replicas=[[0, 1], [2, 3]])
    assert not same_node.by_replicas and same_node.parity == 1  # auto: replicas sharing a node protect nothing
    with pytest.raises(ConfigError, match="faulttol.redundancy: replicas needs each rank's dp_replicate peers on "
                                          "other nodes"):
        NodeLayout.from_config(_ft(ranks_per_node=2, redundancy="replicas"), 4, 4, replicas=[[0, 1], [2, 3]])
    with pytest.raises(ConfigError, match="faulttol.redundancy: replicas needs parallel.dp_replicate > 1 with "
                                          "parallel.dp_sync=every_step"):
        NodeLayout.from_config(_ft(ranks_per_node=1, redundancy="replicas"), 4, 4, replicas=None)


@pytest.mark.parametrize("kw, world, message", [
    ({"ranks_per_node": 3}, 4, "faulttol.ranks_per_node: must divide the world size 4"),
    ({"ranks_per_node": 1, "ec_group_nodes": 3}, 4, "faulttol.ec_group_nodes: must divide the number of nodes"),
    ({"ranks_per_node": 1, "ec_parity": 4}, 4, "faulttol.ec_parity: must be smaller than the EC group's 4 nodes"),
])
def test_bad_layouts_are_one_line_errors(kw, world, message):
    with pytest.raises(ConfigError, match=message):
        NodeLayout.from_config(_ft(**kw), world, world)


def _choose_epoch(inventories, layout):
    """locate's choice, with the all-reduces done by hand: generations newest first, for each the table of
    the lowest holder of every (rank, chunk), until one leaves every rank k chunks."""
    for generation in sorted({(e["attempt"], e["step"]) for inv in inventories for e in inv}, reverse=True):
        table = torch.full((layout.world, layout.group_nodes), layout.world, dtype=torch.int32)
        for holder, inv in enumerate(inventories):
            for e in inv:
                if (e["attempt"], e["step"]) == generation:
                    table[e["src"], e["chunk"]] = min(int(table[e["src"], e["chunk"]]), holder)
        chosen = choose_chunks(table, layout.data)
        if chosen is not None:
            return generation, chosen
    return None


def test_choose_epoch_never_picks_a_torn_snapshot_or_mixes_generations():
    layout = NodeLayout.from_config(_ft(ranks_per_node=1, ec_parity=1), 4, 4)  # k=3, m=1

    def held(holder, generations):
        return [{"src": src, "chunk": j, "attempt": a, "step": e}
                for a, e in generations for src in range(4) for j in range(4) if layout.holder(src, j) == holder]

    def drop(inv, generation):
        return [e for e in inv if (e["attempt"], e["step"]) != generation]

    inv = [held(h, [(0, 4), (0, 6)]) for h in range(4)]
    assert _choose_epoch(inv, layout)[0] == (0, 6)
    inv[2] = drop(inv[2], (0, 6))  # epoch 6 committed on holder 2 only partially (torn): one node missing is fine
    generation, chosen = _choose_epoch(inv, layout)
    assert generation == (0, 6) and chosen.sum(dim=1).tolist() == [3] * 4 and chosen[:, 3].any()  # parity used
    inv[3] = drop(inv[3], (0, 6))  # two holders without epoch 6: too few chunks -> fall back to 4
    generation, chosen = _choose_epoch(inv, layout)
    assert generation == (0, 4) and chosen[:, :3].all() and not chosen[:, 3].any()  # data chunks preferred
    # Epoch 6 of attempt 0 on holders 0 and 1, epoch 6 of attempt 1 on holders 2 and 3: together they would
    # be "4 chunks of epoch 6", but chunks of two generations never make one payload.
    mixed = [held(h, [(0, 4), (0, 6) if h < 2 else (1, 6)]) for h in range(4)]
    assert _choose_epoch(mixed, layout)[0] == (0, 4)
    assert _choose_epoch([held(h, [(1, 2), (0, 8)]) for h in range(4)], layout)[0] == (1, 2)  # newest generation
    assert _choose_epoch([[] for _ in range(4)], layout) is None


def test_host_state_round_trips_as_json_and_cannot_run_code():
    import pickle
    import random

    import numpy as np

    from loomtrain.faulttol import codec
    from loomtrain.trainer.checkpoint import rng_state

    state = {"rng": rng_state(), "optimizer": [[{"lr": 1e-3, "betas": (0.9, 0.95)}], {3: {"step": 7}}],
             "sampler": {"consumed": 12, "seed": 0}, "nan": float("nan"), "bytes": b"\x00\xff",
             "bf16": torch.tensor([1.5, -2.0], dtype=torch.bfloat16), "empty": torch.empty(0, 3)}
    back = codec.loads(codec.dumps(state))
    assert back["optimizer"] == [[{"lr": 1e-3, "betas": (0.9, 0.95)}], {3: {"step": 7}}]  # tuples, int keys kept
    assert torch.equal(back["rng"]["torch"], state["rng"]["torch"]) and back["bytes"] == b"\x00\xff"
    assert torch.equal(back["bf16"], state["bf16"]) and back["bf16"].dtype == torch.bfloat16
    assert back["empty"].shape == (0, 3) and back["nan"] != back["nan"]
    np.random.set_state(back["rng"]["numpy"])
    random.setstate(back["rng"]["python"])
    assert np.random.rand() == (np.random.set_state(state["rng"]["numpy"]) or np.random.rand())

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch /tmp/loomtrain-pwned",))

    with pytest.raises(ValueError):  # pickle bytes (what a forged segment would hold) are not JSON
        codec.loads(pickle.dumps(Evil()))
    with pytest.raises(TypeError, match="cannot store a Evil"):
        codec.dumps({"x": Evil()})


def _generations(rank, out):
    from types import SimpleNamespace

    import torch.distributed as dist

    from loomtrain.faulttol.manager import FaultTolerance

    os.environ.pop("LOOMTRAIN_RUN_ID", None)  # plain torchrun: no launcher names the run
    dist.init_process_group("gloo")
    me = SimpleNamespace(env=SimpleNamespace(is_main=rank == 0), exp=SimpleNamespace(train=SimpleNamespace(
        output_dir=out)))
    seen = []
    for attempts in ([0, 0], [1, 0], [0, 0], [2, 2]):  # a launch, an uneven restart, a relaunch, its restart
        os.environ["LOOMTRAIN_ATTEMPT"] = str(attempts[rank])
        seen.append(FaultTolerance._agree_generation(me))
    dist.destroy_process_group()
    return seen


def test_every_rank_agrees_on_the_attempt_and_a_relaunch_is_a_new_run(tmp_path):
    """torchrun's agents count restarts per node; without a run id from the launcher each launch names its run."""
    first, second = run_ranks(_generations, 2, str(tmp_path))
    assert first == second  # the same (attempt, run) on every rank
    (a0, launch), (a1, restart), (a2, relaunch), (a3, relaunch_restart) = first
    assert (a0, a1, a2, a3) == (0, 1, 0, 2)  # the restart counts as one although only node 0 saw it
    assert restart == launch and relaunch != launch and relaunch_restart == relaunch and launch.startswith("run-")


# ---------------------------------------------------------------- end to end
def _train(rank, overrides, resume=None):
    from loomtrain.trainer import train as train_mod
    from loomtrain.launch import train as launch_train
    from loomtrain.trainer.config import load_config

    trainer_cls = train_mod.Trainer
    params = {}
    original_fit = trainer_cls.fit

    def fit_and_keep_params(self):
        out = original_fit(self)
        params.update({n: getattr(p, "to_local", lambda p=p: p)().detach().clone()
                       for n, p in self.model.named_parameters()})
        return out

    trainer_cls.fit = fit_and_keep_params
    r = launch_train.run(load_config("tiny", overrides), resume=resume)
    return r.losses, r.restored_from, r.last_step, r.snapshots, params, r.snapshot_failures


@pytest.fixture
def smp_dir(tmp_path):
    """What the launcher does: one snapshot process per simulated node, alive across restarts."""
    d = str(tmp_path / "smp")
    nodes = range(WORLD)
    for node in nodes:
        start_daemon(d, node)
    yield d
    leaked = [f for n in nodes for f in orphan_segments(segment_prefix(d, n))]
    stop_daemons(d, nodes)
    assert not leaked, f"shared memory left after the run: {leaked}"


@pytest.fixture(scope="module")
def uninterrupted(small_corpus, tmp_path_factory):
    from conftest import TEST_OVERRIDES

    out = tmp_path_factory.mktemp("full")
    base = TEST_OVERRIDES + [f"data.prepared={small_corpus}", f"train.output_dir={out}"] + FT
    smp = str(out / "smp")
    for node in range(WORLD):
        start_daemon(smp, node)
    try:
        results = run_ranks(_train, WORLD, base, env={"LOOMTRAIN_SMP_DIR": smp})
    finally:
        stop_daemons(smp, range(WORLD))
    assert results[0][3] == list(range(EVERY, STEPS + 1, EVERY))  # every snapshot committed
    return results


def _train_hang_caught_soon(rank, overrides):
    """``_train``, with the watchdog's limit cut to HUNG_S on the rank the injected hang hits, as it starts: no
    slow step before it can reach the test's generous limit, and the hang is still the watchdog's to catch."""
    from loomtrain.faulttol import inject

    watchdogs, init, fire = [], inject.Watchdog.__init__, inject.Hang.fire

    def keep(self, *args, **kw):
        init(self, *args, **kw)
        watchdogs.append(self)

    def hang_soon_caught(self, *args):
        watchdogs[-1].timeout_s = HUNG_S
        fire(self, *args)

    inject.Watchdog.__init__, inject.Hang.fire = keep, hang_soon_caught
    return _train(rank, overrides)


def _faulty(overrides, smp_dir, inject, extra=()):
    ov = overrides + FT + [f"faulttol.inject={{kind: {inject[0]}, rank: {inject[1]}, step: {inject[2]}}}"] + list(extra)
    fn = _train_hang_caught_soon if inject[0] == "hang" else _train
    return run_ranks_restarting(fn, WORLD, ov, max_restarts=1, env={"LOOMTRAIN_SMP_DIR": smp_dir}, timeout=180)


def _assert_identical_after(results, reference, restored_step):
    for (losses, _, last, _, params, _), (ref_losses, *_, ref_params, _) in zip(results, reference):
        assert last == STEPS and sorted(losses) == list(range(restored_step + 1, STEPS + 1))
        for step in losses:
            assert losses[step] == ref_losses[step], step  # bit-identical, not approximately
        for name, p in params.items():
            assert torch.equal(p, ref_params[name]), name


@pytest.mark.parametrize("kind, rank", [("sigkill", 1), ("exception", 2), ("hang", 0),
                                        ("node_loss", 0), ("node_loss", 1), ("node_loss", 2), ("node_loss", 3)])
def test_fault_is_survived_from_memory_bit_identically(kind, rank, overrides, smp_dir, uninterrupted, capfd):
    results, failures = _faulty(overrides, smp_dir, (kind, rank, 5))
    assert len(failures) == 1, failures  # it did fail once, and the restarted attempt ran through
    assert all(r[1] == "memory" for r in results)
    _assert_identical_after(results, uninterrupted, restored_step=4)
    if kind == "hang":  # ended by the hung rank's watchdog
        assert f"watchdog: rank {rank} made no progress for {HUNG_S:g}s between steps" in capfd.readouterr().err


def test_a_killed_smp_is_restarted_and_adopted_without_stopping_training(overrides, smp_dir, uninterrupted, capfd):
    ov = overrides + FT + ["faulttol.inject={kind: smp_kill, rank: 3, step: 5}"]
    results = run_ranks(_train, WORLD, ov, env={"LOOMTRAIN_SMP_DIR": smp_dir}, timeout=180)
    err = capfd.readouterr().err
    assert "smp: adopted epochs [2, 4]" in err and "restarted the snapshot process of node 3" in err
    assert all(r[1] is None and r[3] == [2, 4, 6, 8] and r[5] == 0 for r in results)  # nothing was lost
    _assert_identical_after(results, uninterrupted, restored_step=0)


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a small tmpfs")


@needs_root
def test_failed_snapshots_are_skipped_counted_and_training_goes_on(overrides, smp_dir, uninterrupted, tmp_path,
                                                                    capfd):
    """A /dev/shm too small for any chunk: every snapshot fails; training must not."""
    shm = tmp_path / "shm"
    shm.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(shm)], check=True)
    try:
        stop_daemons(smp_dir, range(WORLD))
        for node in range(WORLD):  # the SMPs see the small tmpfs
            start_daemon(smp_dir, node, env={"LOOMTRAIN_SHM_DIR": str(shm)})
        results = run_ranks(_train, WORLD, overrides + FT, env={"LOOMTRAIN_SMP_DIR": smp_dir,
                                                                "LOOMTRAIN_SHM_DIR": str(shm)}, timeout=180)
    finally:
        stop_daemons(smp_dir, range(WORLD))
        subprocess.run(["umount", str(shm)], check=True)
    assert all(r[3] == [] and r[5] == STEPS // EVERY for r in results)
    assert "snapshot of step 2 skipped on rank" in capfd.readouterr().err
    _assert_identical_after(results, uninterrupted, restored_step=0)
    metrics = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    # Logged before that step's own snapshot starts; snapshot 6's failure may still be in flight.
    assert metrics[-1]["step"] == STEPS and metrics[-1]["snapshot_failures"] in (STEPS // EVERY - 2, STEPS // EVERY - 1)


@pytest.mark.parametrize("resume", [None, "step_00000002"])
def test_a_fresh_start_never_loads_a_stale_snapshot(resume, overrides, smp_dir, uninterrupted, tmp_path, capfd):
    """A run killed at step 5 leaves epochs 2 and 4 in its SMPs. Relaunching (same config, a new run) must
    start where the user says — step 0, or the --resume checkpoint — not from that memory."""
    with pytest.raises(AssertionError, match="rank 1 died"):
        run_ranks_restarting(_train, WORLD, overrides + FT + ["faulttol.persist_every_steps=2",
                                                              "faulttol.inject={kind: sigkill, rank: 1, step: 5}"],
                             max_restarts=0, env={"LOOMTRAIN_SMP_DIR": smp_dir}, timeout=180)
    path = str(tmp_path / "run" / "checkpoints" / resume) if resume else None
    results = run_ranks(_train, WORLD, overrides + FT, path, env={"LOOMTRAIN_SMP_DIR": smp_dir}, timeout=180)
    assert all(r[1] == ("disk" if resume else None) for r in results)
    _assert_identical_after(results, uninterrupted, restored_step=2 if resume else 0)
    if resume:
        assert f"resume: step 2 from the disk checkpoint {path} in " in capfd.readouterr().out


def test_the_launch_chain_is_the_agent_that_started_the_rank(monkeypatch):
    """Under torch elastic a launch is its agent (pid and start time): the same across the agent's restarts,
    another for a relaunch. Without a launcher there is no chain (nothing restarts a bare process)."""
    from loomtrain.faulttol.manager import launch_chain

    monkeypatch.delenv("LOOMTRAIN_CHAIN", raising=False)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "fixed")
    code = "from loomtrain.faulttol.manager import launch_chain; print(launch_chain())"
    children = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
                for _ in range(2)]
    assert children[0] == children[1] and f":{os.getpid()}:" in children[0]  # this process is their agent
    assert launch_chain() != children[0] and f":{os.getppid()}:" in launch_chain()
    monkeypatch.setenv("LOOMTRAIN_CHAIN", "named")
    assert launch_chain() == "named"
    monkeypatch.delenv("LOOMTRAIN_CHAIN")
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    assert launch_chain() == ""


def test_a_relaunch_with_the_same_run_id_loads_its_explicit_resume_not_memory(overrides, smp_dir, uninterrupted,
                                                                              tmp_path, capfd):
    """A relaunch that keeps the run id (a fixed ``--rdzv-id``, one Slurm job, a fixed LOOMTRAIN_RUN_ID) after
    a launch killed at step 7 is a new launch, not a restart: its ``--resume step_4`` (a rollback) wins over
    the newer memory snapshot and disk checkpoint (step 6) the killed launch left."""
    env = {"LOOMTRAIN_SMP_DIR": smp_dir, "LOOMTRAIN_RUN_ID": "one-allocation"}
    with pytest.raises(AssertionError, match="rank 1 died"):
        run_ranks_restarting(_train, WORLD, overrides + FT + ["faulttol.persist_every_steps=2",
                                                              "faulttol.inject={kind: sigkill, rank: 1, step: 7}"],
                             max_restarts=0, env=env, timeout=180)
    path = str(tmp_path / "run" / "checkpoints" / "step_00000004")
    results = run_ranks(_train, WORLD, overrides + FT, path, env=env, timeout=180)
    assert [r[1] for r in results] == ["disk"] * WORLD
    _assert_identical_after(results, uninterrupted, restored_step=4)
    assert f"resume: step 4 from the disk checkpoint {path} in " in capfd.readouterr().out


def test_snapshot_torn_by_the_failure_is_never_loaded(overrides, smp_dir, uninterrupted):
    # Killed right after starting the step-6 snapshot: no rank can have committed it (the commit needs
    # every rank's agreement), so the restore must use step 4.
    results, failures = _faulty(overrides, smp_dir, ("sigkill", 2, 6))
    assert len(failures) == 1 and all(r[1] == "memory" for r in results)
    _assert_identical_after(results, uninterrupted, restored_step=4)


@pytest.mark.parametrize("phase", ["copy", "request", "exchange", "commit"])
def test_sigkill_inside_each_snapshot_phase_restores_a_whole_epoch(phase, overrides, smp_dir, uninterrupted):
    """Killed inside the step-6 snapshot: before its commit nothing of epoch 6 may serve; after this rank's
    commit, epoch 6 serves only if every rank committed it (the others may be killed first), else 4."""
    ov = overrides + FT + [f"faulttol.inject={{kind: snapshot_kill, rank: 2, step: 6, phase: {phase}}}"]
    results, failures = run_ranks_restarting(_train, WORLD, ov, max_restarts=1, env={"LOOMTRAIN_SMP_DIR": smp_dir},
                                             timeout=180)
    assert len(failures) == 1 and "rank 2 died" in failures[0] and all(r[1] == "memory" for r in results)
    restored = min(results[0][0]) - 1
    assert restored == 4 if phase != "commit" else restored in (4, 6)
    _assert_identical_after(results, uninterrupted, restored_step=restored)


def _killed_at_step_5_on_attempt_0(rank, overrides):
    if rank == 1 and os.environ["LOOMTRAIN_ATTEMPT"] == "0":
        signal_self_after_step(5, signal.SIGKILL, settled=True)
    return _train(rank, overrides)


def test_two_faults_the_second_during_the_restore(overrides, smp_dir, uninterrupted):
    """Rank 1 dies after step 5; restarted, rank 3 dies while restoring epoch 4; the third attempt restores
    epoch 4 (nothing of it was consumed or freed by the failed restore) and finishes bit-identical."""
    ov = overrides + FT + ["faulttol.inject={kind: snapshot_kill, phase: restore, rank: 3, step: 4, attempt: 1}"]
    results, failures = run_ranks_restarting(_killed_at_step_5_on_attempt_0, WORLD, ov, max_restarts=2,
                                             env={"LOOMTRAIN_SMP_DIR": smp_dir}, timeout=180)
    assert len(failures) == 2 and "rank 1 died" in failures[0] and "rank 3 died" in failures[1], failures
    assert all(r[1] == "memory" for r in results)
    _assert_identical_after(results, uninterrupted, restored_step=4)


def test_random_kills_from_outside_leave_the_run_bit_identical(overrides, smp_dir, tmp_path):
    """Three SIGKILLs sent from outside at random moments (mid-step, mid-snapshot, mid-restore: wherever they
    land), each after the run made progress; the finished run equals an undisturbed one bit for bit."""
    import random
    import threading

    from loomtrain.faulttol.smp import SMPError, SnapshotClient, socket_path

    steps = 24
    ov = overrides + FT + [f"train.steps={steps}"]
    reference = run_ranks(_train, WORLD, [o for o in ov if not o.startswith("train.output_dir")]
                          + [f"train.output_dir={tmp_path / 'reference'}"], env={"LOOMTRAIN_SMP_DIR": smp_dir})
    for node in range(WORLD):
        start_daemon(smp_dir, node)  # the reference's clean end shut them down
    rng, kills, done = random.Random(1234), [], threading.Event()

    def progressed(attempt: int) -> bool:
        """Attempt ``attempt`` is running and has committed a snapshot of its own."""
        try:
            latest = SnapshotClient(socket_path(smp_dir, 0))._call(op="latest")
        except SMPError:
            return False
        return latest["attempt"] == attempt and any(e["attempt"] == attempt and e["complete"]
                                                    for e in latest["epochs"])

    def killer():
        while len(kills) < 3 and not done.is_set():
            attempt = len(kills)  # each kill ends one attempt
            if not progressed(attempt):
                time.sleep(0.05)
                continue
            time.sleep(rng.uniform(0.0, 0.4))
            node = rng.randrange(WORLD)
            try:
                info = SnapshotClient(socket_path(smp_dir, node))._call(op="ping")
                if info["attempt"] == attempt:
                    os.kill(next(iter(info["ranks"].values())), signal.SIGKILL)
                    kills.append((attempt, node))
            except (SMPError, ProcessLookupError, StopIteration):
                pass

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        results, failures = run_ranks_restarting(_train, WORLD, ov, max_restarts=5, env={"LOOMTRAIN_SMP_DIR": smp_dir},
                                                 timeout=240)
    finally:
        done.set()
        thread.join()
    assert len(kills) == 3 and len(failures) >= 3, (kills, failures)
    for (losses, _, last, _, params, _), (ref_losses, *_, ref_params, _) in zip(results, reference):
        assert last == steps and losses and max(losses) == steps
        assert all(losses[s] == ref_losses[s] for s in losses)
        assert all(torch.equal(p, ref_params[n]) for n, p in params.items())


def _on_hosts(rank, overrides, hosts_by_attempt):
    attempt = int(os.environ["LOOMTRAIN_ATTEMPT"])
    os.environ["LOOMTRAIN_HOST_ID"] = hosts_by_attempt[min(attempt, len(hosts_by_attempt) - 1)][rank]
    return _train(rank, overrides)


@pytest.mark.parametrize("restart", ["renumbered", "replaced"])
def test_hosts_renumbered_or_replaced_at_the_restart_still_restore_from_memory(restart, overrides, smp_dir,
                                                                                 uninterrupted, capfd):
    """A new rendezvous orders hosts differently (every rank on another host than before), or brings a new
    host in place of one: nodes are hosts, not rank numbers, so memory still serves (parity rebuilds what
    the replaced host held)."""
    from loomtrain.faulttol.smp import directory_nodes

    first = ["host-a", "host-b", "host-c", "host-d"]
    then = first[1:] + first[:1] if restart == "renumbered" else first[:3] + ["host-e"]
    ov = overrides + FT + ["faulttol.inject={kind: sigkill, rank: 1, step: 5}"]
    try:
        results, failures = run_ranks_restarting(_on_hosts, WORLD, ov, [first, then], max_restarts=1,
                                                 env={"LOOMTRAIN_SMP_DIR": smp_dir}, timeout=180)
    finally:
        stop_daemons(smp_dir, directory_nodes(smp_dir))
    assert len(failures) == 1 and all(r[1] == "memory" for r in results), failures
    _assert_identical_after(results, uninterrupted, restored_step=4)
    rebuilt = re.search(r"rebuilt (\d+) rank\(s\)' state from parity", capfd.readouterr().out)
    # Renumbered: every chunk is still on some host (fetched from wherever it is). Replaced: host-d's chunk of
    # every payload is gone with it; for the 3 payloads whose lost chunk was a data chunk, parity rebuilds it.
    assert (rebuilt is None) if restart == "renumbered" else (rebuilt and rebuilt.group(1) == str(WORLD - 1))


def _uneven_restart_counters(rank, overrides):
    """torchrun's agents count a restart only on the node whose workers failed: rank 1's node fails first,
    rank 3's next, so the counters read (0,0,0,0), then (1,1,0,0), then (1,1,1,1)."""
    attempt = int(os.environ["LOOMTRAIN_ATTEMPT"])
    os.environ["LOOMTRAIN_ATTEMPT"] = str([[0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]][attempt][rank])
    if (attempt, rank) in ((0, 1), (1, 3)):
        signal_self_after_step(3 if attempt == 0 else 5, signal.SIGKILL, settled=True)
    return _train(rank, overrides)


def test_every_restart_is_a_new_generation_even_when_node_counters_repeat(overrides, smp_dir, uninterrupted,
                                                                            capfd):
    results, failures = run_ranks_restarting(_uneven_restart_counters, WORLD, overrides + FT, max_restarts=2,
                                             env={"LOOMTRAIN_SMP_DIR": smp_dir}, timeout=180)
    assert len(failures) == 2 and all(r[1] == "memory" for r in results), failures
    out = capfd.readouterr().out
    assert "restored step 2 from memory" in out and "restart 1 of run" in out
    assert "restored step 4 from memory" in out and "restart 2 of run" in out  # not "restart 1" twice
    _assert_identical_after(results, uninterrupted, restored_step=4)


def test_memory_that_cannot_serve_falls_back_to_disk_loudly(overrides, smp_dir, uninterrupted, capfd):
    # No parity: a lost node takes chunks nobody else has; the step-4 disk checkpoint serves instead.
    results, failures = _faulty(overrides, smp_dir, ("node_loss", 1, 5),
                                ["faulttol.ec_parity=0", "faulttol.persist_every_steps=4"])
    assert len(failures) == 1 and all(r[1] == "disk" for r in results)
    assert "memory snapshots could not serve" in capfd.readouterr().err
    _assert_identical_after(results, uninterrupted, restored_step=4)


def test_nodes_of_two_ranks_mirror_each_other(overrides, tmp_path):
    """2 simulated nodes x 2 ranks (k=1, m=1): losing node 1 kills ranks 2 and 3 and its memory."""
    smp = str(tmp_path / "smp2")
    for node in range(2):
        start_daemon(smp, node)
    ov = [o.replace("ranks_per_node=1", "ranks_per_node=2") for o in overrides + FT]
    ref_ov = ov + [f"train.output_dir={tmp_path / 'ref'}"]
    try:
        reference = run_ranks(_train, WORLD, ref_ov, env={"LOOMTRAIN_SMP_DIR": smp})
        for node in range(2):
            start_daemon(smp, node)  # the reference run's clean end shut them down
        results, failures = run_ranks_restarting(_train, WORLD, ov + ["faulttol.inject={kind: node_loss, rank: 2, step: 5}"],
                                                 max_restarts=1, env={"LOOMTRAIN_SMP_DIR": smp}, timeout=180)
    finally:
        stop_daemons(smp, range(2))
    assert len(failures) == 1 and all(r[1] == "memory" for r in results)
    _assert_identical_after(results, reference, restored_step=4)


def _train_and_measure_held(rank, overrides):
    """_train, plus what this rank's node SMP holds of the newest epoch at the end and this rank's state bytes."""
    from loomtrain.faulttol.manager import FaultTolerance
    from loomtrain.faulttol.snapshot import flatten_state

    original, seen = FaultTolerance.close, {}

    def close(self, finished):
        if finished and self.snapshots is not None:
            self.snapshots.wait()
            newest = self.snapshots.client._call(op="latest")["epochs"][0]
            mine = [e for entries in newest["owners"].values() for e in entries.values()]
            seen["held"] = sum({e["name"]: e["size"] for e in mine}.values())  # a segment counts once
            seen["state"] = sum(t.numel() * t.element_size() for t in flatten_state(trainer[0].model,
                                                                                    trainer[0].optimizer)[0])
        return original(self, finished)

    from loomtrain.trainer import train as train_mod


    trainer, init = [], train_mod.Trainer.__init__

    def keep(self, *a, **kw):
        trainer.append(self)
        init(self, *a, **kw)

    train_mod.Trainer.__init__ = keep
    FaultTolerance.close = close
    return _train(rank, overrides) + (seen,)


def test_replicas_restore_a_lost_node_from_their_copies_keeping_one_copy_per_rank(overrides, tmp_path, capfd):
    """dp_replicate=2 x dp_shard=2 on 4 nodes: ranks 0 and 2 (1 and 3) hold the same state, on other nodes. Each
    rank keeps only its own copy (1x its state per node, against (k+m)/k = 4/3x with EC over 4 nodes) and
    sends only host states; a lost node's ranks take their state from their replica, bit-identically."""
    smp = str(tmp_path / "smp")
    ov = [o.replace("parallel.dp_shard=4", "parallel.dp_shard=2") for o in overrides + FT] + \
        ["parallel.dp_replicate=2"]

    def runs(extra, out, inject=None):
        for node in range(WORLD):
            start_daemon(smp, node)
        faulty = [f"faulttol.inject={{kind: node_loss, rank: {inject}, step: 5}}"] if inject is not None else []
        return run_ranks_restarting(_train_and_measure_held, WORLD, ov + extra + faulty +
                                    [f"train.output_dir={tmp_path / out}"], max_restarts=1,
                                    env={"LOOMTRAIN_SMP_DIR": smp}, timeout=180)

    try:
        reference, _ = runs([], "ref")
        erasure, _ = runs(["faulttol.redundancy=erasure"], "ec")
        results, failures = runs([], "lost", inject=0)
    finally:
        stop_daemons(smp, range(WORLD))
    assert "redundancy by 2 data-parallel replicas" in capfd.readouterr().out
    assert len(failures) == 1 and all(r[1] == "memory" for r in results), failures
    _assert_identical_after([r[:6] for r in results], [r[:6] for r in reference], restored_step=4)
    for replica, ec in zip(reference, erasure):
        held, state = replica[6]["held"], replica[6]["state"]
        assert state < held < state + 2**16  # its own copy, plus both replicas' host states (~25 KB each here)
        assert ec[6]["held"] > state * 4 / 3  # EC over 4 nodes holds (k+m)/k of it
    sent = [json.loads(line).get("bytes_snapshot", 0) for line in open(tmp_path / "ref" / "metrics.jsonl")]
    sent_ec = [json.loads(line).get("bytes_snapshot", 0) for line in open(tmp_path / "ec" / "metrics.jsonl")]
    assert 0 < sum(sent) < sum(sent_ec) / 20  # host states and CRCs only, not (n-1)/k of every state


def test_sigusr1_writes_a_checkpoint_and_training_goes_on(overrides, tmp_path):
    def train(rank, ov):
        signal_self_after_step(3, signal.SIGUSR1)
        return _train(rank, ov)

    losses, _, last, *_ = run_ranks(train, 0, overrides + ["train.steps=5"])[0]
    assert last == 5 and sorted(losses) == [1, 2, 3, 4, 5]
    assert (tmp_path / "run" / "checkpoints" / "step_00000003" / ".metadata").exists()


def test_cli_restarts_and_restores_from_memory(small_corpus, tmp_path):
    """The real path: `loomtrain train --nproc 4 --max-restarts 1` (torch elastic), SMPs started by the launcher,
    a rank that hangs caught by the launcher's hang monitor."""
    from conftest import TEST_OVERRIDES

    sets = TEST_OVERRIDES + [f"data.prepared={small_corpus}", f"train.output_dir={tmp_path / 'run'}"] + FT + WARM + [
        "faulttol.inject={kind: hang, rank: 1, step: 5}"]
    cmd = [sys.executable, "-m", "loomtrain.launch.cli", "train", "--nproc", "4", "--max-restarts", "1"]
    for s in sets:
        cmd += ["--set", s]
    before = set(os.listdir("/dev/shm"))
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "health: HANG: rank 1 on host" in out.stderr and "not in a collective while ranks 0, 2, 3" in out.stderr
    assert "restored step 4 from memory" in out.stdout, out.stdout[-2000:]
    assert "step=8" in out.stdout
    assert not [f for f in set(os.listdir("/dev/shm")) - before if f.startswith("lt")], "shared memory leaked"


def test_bad_injection_rank_is_refused_before_start(small_corpus, tmp_path):
    cmd = [sys.executable, "-m", "loomtrain.launch.cli", "train", "--nproc", "4", "--set",
           f"data.prepared={small_corpus}", "--set", "faulttol.inject={kind: sigkill, rank: 9, step: 2}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip() == "error: faulttol.inject.rank: must be in [0, 4), got 9"


# ---------------------------------------------------------------- hangs caught from outside (faulttol/hang_monitor.py)
WARM = ["faulttol.monitor.warmup_steps=3"]  # the step limit applies from step 4 (the hangs come at step 5)


def _stopped_after_step(step: int) -> None:
    """In a forked rank: SIGSTOP right after optimizer step ``step``, and stay in ``stays_stopped`` once continued.
    The monitor continues a stopped rank only to have it dump its stack (then stops and kills it); a rank that
    ran on meanwhile would show wherever it got to, or a stack caught half-changed."""
    from loomtrain.trainer import train as train_mod

    original = train_mod.Trainer.train_step

    def stays_stopped(self):
        out = original(self)
        if self.step + 1 == step:
            os.kill(os.getpid(), signal.SIGSTOP)
            while True:  # calls into C only: the frames the dump reads do not change
                time.sleep(1.0)
        return out

    train_mod.Trainer.train_step = stays_stopped


def _train_hanging(rank, overrides, hang_rank, how):
    """``_train``, with rank ``hang_rank`` hanging on the first attempt only: ``sigstop`` stops it right after
    optimizer step 5; ``startup`` leaves it sleeping in rank placement while the others wait in its gather."""
    if rank == hang_rank and os.environ["LOOMTRAIN_ATTEMPT"] == "0":
        if how == "sigstop":
            _stopped_after_step(5)
        else:
            from loomtrain.launch import train as launch_train

            def never_returns(*args):
                while True:
                    time.sleep(1.0)

            launch_train.place_ranks = never_returns
    return _train(rank, overrides)


def _hang_report(monitor, rank: int) -> str:
    [hang] = monitor.hangs
    assert hang.ranks == [rank] and hang.stalled_s >= hang.limit_s, hang.summary()
    text = open(hang.report).read()
    for r in range(WORLD):  # every rank's Python stack, the blamed one's too
        section = text.split(f"---- rank {r} ")[1].split("---- rank")[0]
        assert 'File "' in section, section
    return text


def test_a_sigstopped_rank_is_named_and_the_job_resumes_from_memory(overrides, smp_dir, uninterrupted, tmp_path,
                                                                     capfd):
    from loomtrain.faulttol.hang_monitor import HangMonitor, exclude_list

    monitor = HangMonitor(str(tmp_path / "heartbeats"))
    results, failures = run_ranks_restarting(_train_hanging, WORLD, overrides + FT + WARM, 2, "sigstop", max_restarts=1,
                                             env={"LOOMTRAIN_SMP_DIR": smp_dir}, timeout=180, monitor=monitor)
    assert failures == ["attempt 0: rank 2 died (exit code -9)"]  # killed by the monitor, not by itself
    text = _hang_report(monitor, 2)
    [hang] = monitor.hangs
    # After the warm-up steps, the limit is max(3 x p99 step time, 5 s) of the ranks' records. (Which of the two it
    # is depends on the machine's speed: the 5 s floor here, scripts/bench_fault_margins.py.)
    assert hang.limit_s == max(5.0, 3 * max(r["p99"] for r in hang.live)) and all(r["p99"] > 0 for r in hang.live)
    assert hang.limit_why.startswith("max(3 x p99 step time") and hang.culprits[0]["step"] == 4
    assert "stopped by a signal (process state T); ranks 0, 1, 3 wait for it" in hang.cause
    assert "stays_stopped" in text.split("---- rank 2 ")[1].split("---- rank")[0]  # where it stopped
    assert "health: HANG: rank 2 on host" in capfd.readouterr().err
    assert all(r[1] == "memory" for r in results)
    _assert_identical_after(results, uninterrupted, restored_step=4)  # stopped in step 5: snapshot 4 is the newest
    assert exclude_list(str(tmp_path / "run"), 1) != [] and exclude_list(str(tmp_path / "run"), 2) == []


def test_a_rank_hung_in_start_up_is_named_while_the_others_wait(overrides, smp_dir, uninterrupted, tmp_path):
    from loomtrain.faulttol.hang_monitor import HangMonitor

    monitor = HangMonitor(str(tmp_path / "heartbeats"))
    results, failures = run_ranks_restarting(_train_hanging, WORLD, overrides + FT + ["faulttol.monitor.phase_timeout_s=4"],
                                             1, "startup", max_restarts=1, env={"LOOMTRAIN_SMP_DIR": smp_dir},
                                             timeout=180, monitor=monitor)
    assert failures == ["attempt 0: rank 1 died (exit code -9)"]
    text = _hang_report(monitor, 1)
    [hang] = monitor.hangs
    assert hang.culprits[0]["phase"] == "build" and "not in a collective while ranks 0, 2, 3 wait in one" in hang.cause
    assert hang.limit_s == 4.0 and "never_returns" in text
    assert all(r[1] is None for r in results)  # nothing to restore: it never took a step
    _assert_identical_after(results, uninterrupted, restored_step=0)


def test_an_injected_hang_is_caught_by_the_monitor_not_the_watchdog(overrides, smp_dir, uninterrupted, tmp_path):
    from loomtrain.faulttol.hang_monitor import HangMonitor

    monitor = HangMonitor(str(tmp_path / "heartbeats"))
    ov = overrides + FT + WARM + ["faulttol.hang_timeout_s=2", "faulttol.inject={kind: hang, rank: 3, step: 5}"]
    results, failures = run_ranks_restarting(_train, WORLD, ov, max_restarts=1, env={"LOOMTRAIN_SMP_DIR": smp_dir},
                                             timeout=180, monitor=monitor)
    assert failures == ["attempt 0: rank 3 died (exit code -9)"]  # not the watchdog's exit code 124
    _hang_report(monitor, 3)
    assert "not in a collective while ranks 0, 1, 2 wait in one" in monitor.hangs[0].cause
    _assert_identical_after(results, uninterrupted, restored_step=4)

