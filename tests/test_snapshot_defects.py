"""Snapshot failures never stop training and leave nothing behind: a snapshot that cannot even start (pinned or
staging memory refused, a non-contiguous state tensor, a host state JSON cannot hold) is skipped on every rank and
reported by ``poll``; a failed exchange closes every mapping of its segments and its SMP drops them (never handed
out again); a failed collective of the snapshot's own groups has every rank rebuild them at the next snapshot, and
only repeated failures, or a rebuild that fails, turn snapshots off, with one warning line.

Two forked ranks, one simulated node each (k=1, m=1: each rank holds its own chunk and its peer's), with a real
snapshot process per node."""
import os

import pytest
import torch

from conftest import run_ranks
from loomtrain.faulttol.layout import NodeLayout
from loomtrain.faulttol.smp import orphan_segments, segment_path, segment_prefix, start_daemon, stop_daemons
from loomtrain.faulttol.snapshot import PinnedStaging, Snapshotter  # imported once here, not in every forked rank
from loomtrain.trainer.config import FaultTolConfig
from test_device_contracts_faulttol import BUFFER, FakeCopies

WORLD = 2


@pytest.fixture
def smp2(tmp_path):
    """One snapshot process per simulated node; after the test none of their segments may be left."""
    d = str(tmp_path / "smp")
    for node in range(WORLD):
        start_daemon(d, node)
    yield d
    stop_daemons(d, range(WORLD))
    assert not [f for n in range(WORLD) for f in orphan_segments(segment_prefix(d, n))], "shared memory leaked"


def _snapshotter(rank, smp_dir, *, fault=None, timeout_s=20.0, fake_cuda=False):
    """(model, optimizer after one step, Snapshotter) in a forked rank. ``fake_cuda``: the CUDA staging path
    (pinned buffers, side stream) on the fake device of test_device_contracts_faulttol."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    torch.manual_seed(rank)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _step(model, opt)
    ft = FaultTolConfig()
    ft.ranks_per_node = 1
    copier = PinnedStaging(FakeCopies(eager=True), buffer_bytes=BUFFER) if fake_cuda else None
    snap = Snapshotter(NodeLayout.from_config(ft, WORLD, WORLD), rank, smp_dir, "sig", rank,
                       torch.device("cuda" if fake_cuda else "cpu"), run="defects", timeout_s=timeout_s, fault=fault,
                       copier=copier)
    return model, opt, snap


def _step(model, opt):
    model(torch.randn(4, 8)).square().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _snapshot(snap, step, model, opt, host=None) -> list[str]:
    """What the trainer does around a snapshot (start after the step, before_update before the next), run to
    its end; the failures ``poll`` reports."""
    snap.start(step, model, opt, host if host is not None else {"step": step})
    snap.before_update()  # must not block, whether or not the snapshot started
    snap.wait()
    return snap.poll()


def _restores_exactly(snap, model, opt):
    """Zero the parameters, locate and restore the newest epoch: (epoch, restored step, every parameter back),
    or why not (returned, not raised: the caller's other results still reach the test)."""
    saved = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    try:
        located, why = snap.locate()
        if located is None:
            return why
        restored = snap.restore(located, model, opt)
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return located.epoch, restored.step, all(torch.equal(a, p) for a, p in zip(saved, model.parameters()))


# ---------------------------------------------------------------- M1: nothing in start() raises into training
def _start_fails_once(rank, smp_dir, how):
    model, opt, snap = _snapshotter(rank, smp_dir, timeout_s=5.0, fake_cuda=how in ("pinned", "contiguity"))
    host, undo = {"step": 1}, lambda: None
    if rank == 1:
        if how == "pinned":
            ops = snap._copier.ops

            def refuse(nbytes):
                raise RuntimeError("CUDA error: out of memory (pinned buffer, injected)")

            ops.pinned = refuse
            undo = lambda: delattr(ops, "pinned")  # noqa: E731
        elif how == "staging":
            empty = torch.empty

            def refuse_bytes(*args, **kw):
                if kw.get("dtype") is torch.uint8:
                    raise RuntimeError("out of memory (staging buffer, injected)")
                return empty(*args, **kw)

            torch.empty = refuse_bytes
            undo = lambda: setattr(torch, "empty", empty)  # noqa: E731
        elif how == "contiguity":
            state = opt.state[model[0].weight]
            state["exp_avg"] = state["exp_avg"].t().contiguous().t()  # same values and shape, strides (1, 16)
            undo = lambda: state.__setitem__("exp_avg", state["exp_avg"].contiguous())  # noqa: E731
        else:
            host = {"step": 1, "sampler": object()}
    first = _snapshot(snap, 1, model, opt, host)
    undo()
    _step(model, opt)
    second = _snapshot(snap, 2, model, opt)
    return first, second, list(snap.committed)


@pytest.mark.parametrize("how, message", [
    ("pinned", "prepare: RuntimeError: CUDA error: out of memory (pinned buffer, injected)"),
    ("staging", "prepare: RuntimeError: out of memory (staging buffer, injected)"),
    ("contiguity", "prepare: RuntimeError: snapshot: state tensor [0][1]['state']['0.weight']['exp_avg'] of "
                   "shape (16, 8) is not contiguous"),
    ("json", "prepare: TypeError: snapshot: cannot store a object in the host state"),
])
def test_a_snapshot_that_cannot_start_is_skipped_on_every_rank_and_the_next_one_commits(how, message, smp2):
    """Rank 1's start() meets a refused pinned or staging allocation, a non-contiguous state tensor, or a host
    state JSON cannot hold: start() returns on both ranks, poll() names the cause on rank 1 and the skip on rank
    0 (which never waits for rank 1 in a snapshot collective), and the next snapshot commits on both."""
    results = run_ranks(_start_fails_once, WORLD, smp2, how, timeout=120)
    for rank, (first, second, committed) in enumerate(results):
        expected = message if rank == 1 else "another rank could not prepare its snapshot"
        assert first == [f"snapshot of step 1 skipped on rank {rank}: {expected}"], first
        assert second == [] and committed == [2], (second, committed)


# ---------------------------------------------------------------- M3: a failed exchange leaves no mapping behind
def _exchange_fails_at_step_2(rank, smp_dir):
    def fault(phase, step):
        if (rank, phase, step) == (1, "exchange", 2):
            raise RuntimeError("injected failure mid-exchange")

    model, opt, snap = _snapshotter(rank, smp_dir, fault=fault)
    allocated, alloc = {}, snap.client.alloc

    def recording_alloc(key, size, epoch):
        name = alloc(key, size, epoch)
        allocated.setdefault(epoch, []).append(name)
        return name

    snap.client.alloc = recording_alloc
    failures, mapped, kept = {}, None, None
    for step in (1, 2, 3):
        _step(model, opt)
        failures[step] = _snapshot(snap, step, model, opt)
        if step == 2:
            maps = open("/proc/self/maps").read()
            mapped = [name for name in allocated[2] if name in maps]  # still mapped by this rank
            kept = [name for name in allocated[2] if os.path.exists(segment_path(name))]  # still held by its SMP
    return failures, list(snap.committed), allocated, mapped, kept, _restores_exactly(snap, model, opt)


def test_a_failed_exchange_closes_its_mappings_and_its_segments_are_never_handed_out_again(smp2):
    """Rank 1 fails inside the exchange of snapshot 2 (its chunk transfers are posted): afterwards neither rank
    maps any segment reserved for snapshot 2 (/proc/self/maps), both SMPs have unlinked them, snapshot 3 gets
    other segments, commits, and restores every parameter."""
    results = run_ranks(_exchange_fails_at_step_2, WORLD, smp2, timeout=120)
    for rank, (failures, committed, allocated, mapped, kept, restored) in enumerate(results):
        assert failures[1] == failures[3] == [] and len(failures[2]) == 1, failures
        assert ("injected failure mid-exchange" if rank == 1 else "another rank could not exchange") in failures[2][0]
        assert committed == [1, 3]
        assert len(allocated[2]) == WORLD  # it did reserve its chunk and its peer's for snapshot 2
        assert mapped == [], f"rank {rank} still maps {mapped}"
        assert kept == [], f"node {rank}'s SMP still holds {kept}"
        assert not set(allocated[3]) & set(allocated[2])
        assert restored == (3, 3, True)


# ---------------------------------------------------------------- H2: a failed snapshot-group collective
def _group_collective_fails_once(rank, smp_dir, how):
    armed = []
    phase = "exchange" if how == "rank 0 times out" else "commit"

    def fault(at, step):
        if (rank, at, step) == (1, phase, 1):
            armed.append(True)  # rank 1's next snapshot-group collective fails

    model, opt, snap = _snapshotter(rank, smp_dir, fault=fault, timeout_s=3.0)
    agree = snap._agree

    def failing_agree(ok):
        if armed:
            armed.clear()
            if how == "only rank 1 sees it":
                agree(ok)  # rank 0 gets its answer and goes on; rank 1 then fails
            raise RuntimeError("injected: the snapshot group's all-reduce timed out")
        return agree(ok)

    snap._agree = failing_agree
    failures = {}
    for step in (1, 2):
        _step(model, opt)
        failures[step] = _snapshot(snap, step, model, opt)
    return failures, list(snap.committed), snap.broken, _restores_exactly(snap, model, opt)


@pytest.mark.parametrize("how", ["rank 0 times out", "only rank 1 sees it"])
def test_after_a_snapshot_group_collective_fails_every_rank_rebuilds_the_groups_and_snapshots_go_on(how, smp2,
                                                                                                    capfd):
    """Rank 1's snapshot-group all-reduce fails in snapshot 1: instead of entering it after the exchange (rank 0
    times out waiting in it), or after it completed for the commit (rank 0 commits snapshot 1 and sees nothing
    wrong). Each rank that failed says the groups will be rebuilt; at snapshot 2 both ranks rebuild them (rank 0
    too: it learns of rank 1's failure from start()'s all-reduce), it commits, locates and restores every
    parameter."""
    results = run_ranks(_group_collective_fails_once, WORLD, smp2, how, timeout=120)
    for rank, (failures, committed, broken, restored) in enumerate(results):
        if rank == 0 and how == "only rank 1 sees it":
            assert failures[1] == [] and committed == [1, 2], (failures, committed)
        else:
            [line] = failures[1]
            assert line.startswith(f"snapshot of step 1 skipped on rank {rank}: a snapshot collective failed: ")
            assert line.endswith("; the snapshot process groups are rebuilt at the next snapshot")
            assert rank == 0 or "injected: the snapshot group's all-reduce timed out" in line
            assert committed == [2]
        assert failures[2] == [] and not broken
        assert restored == (2, 2, True)
    err = capfd.readouterr().err
    assert err.count("faulttol: rebuilt the snapshot process groups after a failed collective (1 failure(s) in a "
                     "row; snapshots go off at 3)") == 1
    assert "in-memory snapshots are off" not in err


def _groups_keep_failing(rank, smp_dir, how):
    import torch.distributed as dist

    model, opt, snap = _snapshotter(rank, smp_dir, timeout_s=3.0)
    failed = []

    def failing_agree(ok):
        if how == "repeated" or not failed:
            failed.append(True)
            raise RuntimeError("injected: the snapshot group's all-reduce timed out")

    snap._agree = failing_agree  # on both ranks: neither waits for the other
    if how == "rebuild fails" and rank == 1:
        def refuse(*args, **kw):
            raise RuntimeError("injected: new_group failed")

        dist.new_group = refuse  # rank 0's new_group then times out waiting for rank 1
    failures = []
    for step in range(1, 6):
        _step(model, opt)
        failures.append(len(_snapshot(snap, step, model, opt)))
    return failures, list(snap.committed), snap.broken, snap.world_group


@pytest.mark.parametrize("how", ["repeated", "rebuild fails"])
def test_snapshots_go_off_with_one_warning_only_after_3_group_failures_in_a_row_or_a_failed_rebuild(how, smp2,
                                                                                                    capfd):
    """Snapshot-group collectives fail at every snapshot: the groups are rebuilt twice, the third failure in a
    row turns snapshots off on both ranks (rank 0 says why in one line) and later snapshots do nothing. Or the
    rebuild after the first failure fails (rank 1's new_group): snapshots go off at once, each rank that could
    not rebuild saying how."""
    results = run_ranks(_groups_keep_failing, WORLD, smp2, how, timeout=120)
    err = capfd.readouterr().err
    off = [line for line in err.splitlines() if "in-memory snapshots are off" in line]
    rebuilt = err.count("faulttol: rebuilt the snapshot process groups after a failed collective")
    for failures, committed, broken, world_group in results:
        assert committed == [] and broken and world_group is None
        assert failures == ([1, 1, 1, 0, 0] if how == "repeated" else [1, 0, 0, 0, 0])
    if how == "repeated":
        assert rebuilt == 2
        assert off == ["faulttol: WARNING: in-memory snapshots are off for the rest of this run (rank 0): their "
                       "process groups failed at 3 snapshots in a row"]
    else:
        assert rebuilt == 0 and len(off) == 2, off
        assert "faulttol: WARNING: in-memory snapshots are off for the rest of this run (rank 1): rebuilding " \
               "their process groups failed (RuntimeError: injected: new_group failed)" in off
        assert any(line.startswith("faulttol: WARNING: in-memory snapshots are off for the rest of this run "
                                   "(rank 0): rebuilding their process groups failed (") for line in off)
