"""Fault tolerance end to end: a run hit by an injected fault restarts, restores from the in-memory
snapshot (rebuilding a lost node's chunks from parity) and finishes bit-identical to an uninterrupted run."""
import itertools
import os
import signal
import subprocess
import sys

import pytest
import torch

from conftest import run_ranks, run_ranks_restarting, signal_self_after_step
from loomtrain.faulttol.layout import NodeLayout, choose_epoch
from loomtrain.faulttol.smp import orphan_segments, segment_prefix, start_daemon, stop_daemons
from loomtrain.trainer.config import ConfigError, FaultTolConfig

WORLD, STEPS, EVERY = 4, 8, 2
FT = ["parallel.dp_shard=4", f"train.steps={STEPS}", f"faulttol.snapshot.every_steps={EVERY}",
      "faulttol.ranks_per_node=1", "faulttol.hang_timeout_s=5"]


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


@pytest.mark.parametrize("kw, world, message", [
    ({"ranks_per_node": 3}, 4, "faulttol.ranks_per_node: must divide the world size 4"),
    ({"ranks_per_node": 1, "ec_group_nodes": 3}, 4, "faulttol.ec_group_nodes: must divide the number of nodes"),
    ({"ranks_per_node": 1, "ec_parity": 4}, 4, "faulttol.ec_parity: must be smaller than the EC group's 4 nodes"),
])
def test_bad_layouts_are_one_line_errors(kw, world, message):
    with pytest.raises(ConfigError, match=message):
        NodeLayout.from_config(_ft(**kw), world, world)


def test_choose_epoch_never_picks_a_torn_or_foreign_snapshot():
    layout = NodeLayout.from_config(_ft(ranks_per_node=1, ec_parity=1), 4, 4)  # k=3, m=1

    def held(holder, epoch_sig):
        return {e: [{"src": src, "chunk": j, "signature": sig}
                    for src in range(4) for j in range(4) if layout.holder(src, j) == holder]
                for e, sig in epoch_sig.items()}

    inv = [held(h, {4: "s", 6: "s"}) for h in range(4)]
    assert choose_epoch(inv, layout, "s")[0] == 6
    inv[2].pop(6)  # epoch 6 committed on holder 2 only partially (torn): one node missing is still fine
    assert choose_epoch(inv, layout, "s")[0] == 6
    inv[3].pop(6)  # two holders without epoch 6: too few chunks -> fall back to 4
    epoch, sources = choose_epoch(inv, layout, "s")
    assert epoch == 4 and all(sorted(c) == [0, 1, 2] for c in sources.values())  # data chunks preferred
    assert choose_epoch([held(h, {4: "other-run"}) for h in range(4)], layout, "s") is None


# ---------------------------------------------------------------- end to end
def _train(rank, overrides):
    from loomtrain.trainer import train as train_mod
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
    r = train_mod.run(load_config("tiny", overrides))
    return r.losses, r.restored_from, r.last_step, r.snapshots, params


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


def _faulty(overrides, smp_dir, inject, extra=()):
    ov = overrides + FT + [f"faulttol.inject={{kind: {inject[0]}, rank: {inject[1]}, step: {inject[2]}}}"] + list(extra)
    return run_ranks_restarting(_train, WORLD, ov, max_restarts=1, env={"LOOMTRAIN_SMP_DIR": smp_dir}, timeout=180)


def _assert_identical_after(results, reference, restored_step):
    for (losses, _, last, _, params), (ref_losses, *_, ref_params) in zip(results, reference):
        assert last == STEPS and sorted(losses) == list(range(restored_step + 1, STEPS + 1))
        for step in losses:
            assert losses[step] == ref_losses[step], step  # bit-identical, not approximately
        for name, p in params.items():
            assert torch.equal(p, ref_params[name]), name


@pytest.mark.parametrize("kind, rank", [("sigkill", 1), ("exception", 2), ("hang", 0), ("smp_kill", 3),
                                        ("node_loss", 0), ("node_loss", 1), ("node_loss", 2), ("node_loss", 3)])
def test_fault_is_survived_from_memory_bit_identically(kind, rank, overrides, smp_dir, uninterrupted):
    results, failures = _faulty(overrides, smp_dir, (kind, rank, 5))
    assert len(failures) == 1, failures  # it did fail once, and the restarted attempt ran through
    assert all(r[1] == "memory" for r in results)
    _assert_identical_after(results, uninterrupted, restored_step=4)


def test_snapshot_torn_by_the_failure_is_never_loaded(overrides, smp_dir, uninterrupted):
    # Killed right after starting the step-6 snapshot: no rank can have committed it (the commit needs
    # every rank's agreement), so the restore must use step 4.
    results, failures = _faulty(overrides, smp_dir, ("sigkill", 2, 6))
    assert len(failures) == 1 and all(r[1] == "memory" for r in results)
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


def test_sigusr1_writes_a_checkpoint_and_training_goes_on(overrides, tmp_path):
    def train(rank, ov):
        signal_self_after_step(3, signal.SIGUSR1)
        return _train(rank, ov)

    losses, _, last, _, _ = run_ranks(train, 0, overrides + ["train.steps=5"])[0]
    assert last == 5 and sorted(losses) == [1, 2, 3, 4, 5]
    assert (tmp_path / "run" / "checkpoints" / "step_00000003" / ".metadata").exists()


def test_cli_restarts_and_restores_from_memory(small_corpus, tmp_path):
    """The real path: `loomtrain train --nproc 4 --max-restarts 1` (torch elastic), SMPs started by the launcher."""
    from conftest import TEST_OVERRIDES

    sets = TEST_OVERRIDES + [f"data.prepared={small_corpus}", f"train.output_dir={tmp_path / 'run'}"] + FT + [
        "faulttol.inject={kind: sigkill, rank: 1, step: 5}"]
    cmd = [sys.executable, "-m", "loomtrain.launch.cli", "train", "--nproc", "4", "--max-restarts", "1"]
    for s in sets:
        cmd += ["--set", s]
    before = set(os.listdir("/dev/shm"))
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "restored step 4 from memory" in out.stdout, out.stdout[-2000:]
    assert "step=8" in out.stdout
    assert not [f for f in set(os.listdir("/dev/shm")) - before if f.startswith("lt")], "shared memory leaked"


def test_bad_injection_rank_is_refused_before_start(small_corpus, tmp_path):
    cmd = [sys.executable, "-m", "loomtrain.launch.cli", "train", "--nproc", "4", "--set",
           f"data.prepared={small_corpus}", "--set", "faulttol.inject={kind: sigkill, rank: 9, step: 2}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip() == "error: faulttol.inject.rank: must be in [0, 4), got 9"
