"""Snapshot failures never stop training and leave nothing behind: a snapshot that cannot even start (pinned or
staging memory refused, a non-contiguous state tensor, a host state JSON cannot hold) is skipped on every rank and
reported by ``poll``; a failed exchange closes every mapping of its segments and its SMP drops them (never handed
out again); a failed collective of the snapshot's own groups has every rank rebuild them at the next snapshot, and
only repeated failures, or a rebuild that fails, turn snapshots off, with one warning line. A node whose SMP
cannot be reached at start-up leaves snapshots off only until a later try, every rank together, hooks it up; and
each snapshot's timeout grows with the bytes it moves.

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


def _snapshotter(rank, smp_dir, *, fault=None, timeout_s=20.0, fake_cuda=False, min_gbps=1.0):
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
                       copier=copier, min_gbps=min_gbps)
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



def test_the_snapshots_off_warning_reaches_stderr_in_one_write(monkeypatch):
    """Ranks share a stderr; ``print`` writes a line and its newline separately, so two ranks' warnings came out
    as one line in CI (rank 1's inside rank 0's) and the line count above saw one warning for two."""
    import sys
    import types

    from loomtrain.faulttol.snapshot import Snapshotter

    writes = []
    monkeypatch.setattr(sys, "stderr", types.SimpleNamespace(write=writes.append, flush=lambda: None))
    snap = types.SimpleNamespace(rank=1, broken=False, _destroy_groups=lambda: None)
    Snapshotter._turn_off(snap, "rebuilding their process groups failed", "RuntimeError: injected")
    assert snap.broken
    assert writes == ["faulttol: WARNING: in-memory snapshots are off for the rest of this run (rank 1): rebuilding "
                      "their process groups failed (RuntimeError: injected)\n"]

# ---------------------------------------------------------------- H2, start-up: a node whose SMP cannot be reached
def _hookup_run(rank, out, how, attempt):
    """A FaultTolerance over a small model in a forked rank, as the trainer drives it. Attempt 0: node 1's first
    rank (rank 1) cannot start its SMP at start-up, nor at the next try (``how`` "smp"), or then cannot create its
    snapshot groups ("groups"); 8 steps with a snapshot every 2; returns (committed epochs, snapshot failures,
    final parameters). Attempt 1 (a restart): (why memory cannot serve, or the restored epoch, step and host
    state, and the restored parameters)."""
    from loomtrain.faulttol import manager
    from loomtrain.faulttol.smp import SMPError
    from loomtrain.launch.env import init_distributed
    from loomtrain.trainer.checks import check_experiment
    from loomtrain.trainer.config import load_config

    exp = load_config("tiny", [f"train.output_dir={out}", "parallel.dp_shard=2", "faulttol.snapshot.every_steps=2",
                               "faulttol.ranks_per_node=1", "faulttol.hang_timeout_s=0",
                               "faulttol.snapshot.timeout_s=20"])
    env = init_distributed(exp.parallel)
    dims = check_experiment(exp, env.world_size, env.local_world_size)
    if rank == 1 and attempt == 0:
        real, calls = manager.ensure_daemon, []

        def refusing(*args, **kw):
            calls.append(True)
            if len(calls) <= (2 if how == "smp" else 1):
                raise SMPError(f"injected: node 1's snapshot process does not start (try {len(calls)})")
            return real(*args, **kw)

        manager.ensure_daemon = refusing
        build = getattr(manager.FaultTolerance, "_snapshotter", None)
        if how == "groups" and build is not None:

            def failing_once(self):
                snapshots = build(self)  # every rank's collectives of new_group complete; then this rank fails
                if len(calls) == 2:
                    raise RuntimeError("injected: no snapshot groups on rank 1")
                return snapshots

            manager.FaultTolerance._snapshotter = failing_once
    torch.manual_seed(rank + 10 * attempt)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ft = manager.FaultTolerance(exp, env, dims)
    try:
        if attempt == 1:
            located, why = ft.locate()
            if located is None:
                return why
            restored = ft.snapshots.restore(located, model, opt)
            return (located.epoch, restored.step, restored.host), [p.detach().clone() for p in model.parameters()]
        for step in range(1, 9):
            ft.before_update()
            _step(model, opt)
            ft.after_step(step, model, opt, lambda step=step: {"step": step})
        if ft.snapshots is not None:
            ft.snapshots.wait()
            ft.report_failures()
        committed = list(ft.snapshots.committed) if ft.snapshots is not None else []
        return committed, ft.snapshot_failures, [p.detach().clone() for p in model.parameters()]
    finally:
        ft.close(finished=False)  # as a crash would: the SMPs keep the epochs for the restart


@pytest.mark.parametrize("how", ["smp", "groups"])
def test_a_node_whose_smp_cannot_start_at_start_up_joins_later_and_a_restart_restores_from_memory(how, tmp_path,
                                                                                                  capfd):
    """Node 1's SMP is not running and its first rank fails to start it at start-up, and at the first retry (step
    2) it fails again, or rank 1 then fails to create its snapshot groups. Training goes on without snapshots (it
    used to stay so for the whole run); the hookup is tried again by every rank together with doubling gaps (step
    2, then step 6: step 4 is let pass), each failure in one line naming the rank and why; at step 6 node 1's SMP
    answers, snapshots 6 and 8 commit on both ranks, and a restart of the run restores step 8 from memory, every
    parameter exact."""
    import uuid

    d = str(tmp_path / "smp")
    start_daemon(d, 0)  # node 1's is left to its rank to start
    env = {"LOOMTRAIN_SMP_DIR": d, "LOOMTRAIN_RUN_ID": f"h2-{uuid.uuid4().hex[:8]}",
           "LOOMTRAIN_CHAIN": f"launch-{uuid.uuid4().hex[:8]}"}
    out = str(tmp_path / "run")
    try:
        first = run_ranks(_hookup_run, WORLD, out, how, 0, env=env | {"LOOMTRAIN_ATTEMPT": "0"}, timeout=120)
        err = capfd.readouterr().err
        restart = run_ranks(_hookup_run, WORLD, out, how, 1, env=env | {"LOOMTRAIN_ATTEMPT": "1"}, timeout=120)
    finally:
        stop_daemons(d, range(WORLD))
    assert not [f for n in range(WORLD) for f in orphan_segments(segment_prefix(d, n))], "shared memory leaked"
    for committed, failures, _ in first:
        assert committed == [6, 8] and failures == 0, (committed, failures)
    off = [line for line in err.splitlines() if "in-memory snapshots are off" in line]
    second = ("injected: node 1's snapshot process does not start (try 2)" if how == "smp" else
              "creating the snapshot process groups: RuntimeError: injected: no snapshot groups on rank 1")
    assert off == [
        "faulttol: WARNING: in-memory snapshots are off: hooking up the snapshot processes failed at start-up "
        "(try 1 of 8): rank 1 (node 1): injected: node 1's snapshot process does not start (try 1); trying again at "
        "the next snapshot step",
        "faulttol: WARNING: in-memory snapshots are off: hooking up the snapshot processes failed at step 2 "
        f"(try 2 of 8): rank 1 (node 1): {second}; trying again at step 6"], err
    assert err.count("faulttol: in-memory snapshots are on from step 6: every node's snapshot process answers "
                     "(after 2 failed tries)") == 1
    assert f"faulttol: started the snapshot process of node 1 ({d})" in err
    for rank, restored in enumerate(restart):
        assert not isinstance(restored, str), restored  # memory could not serve: why
        (epoch, step, host), params = restored
        assert (epoch, step, host) == (8, 8, {"step": 8})
        assert all(torch.equal(a, b) for a, b in zip(params, first[rank][2])), f"rank {rank} restored other values"


def _never_hooked_up(rank, out):
    """Node 1's SMP never starts: every try fails; (committed, tries, why locate gives)."""
    from loomtrain.faulttol import manager
    from loomtrain.faulttol.smp import SMPError
    from loomtrain.launch.env import init_distributed
    from loomtrain.trainer.checks import check_experiment
    from loomtrain.trainer.config import load_config

    exp = load_config("tiny", [f"train.output_dir={out}", "parallel.dp_shard=2", "faulttol.snapshot.every_steps=1",
                               "faulttol.ranks_per_node=1", "faulttol.hang_timeout_s=0"])
    env = init_distributed(exp.parallel)
    dims = check_experiment(exp, env.world_size, env.local_world_size)
    if rank == 1:
        def refusing(*args, **kw):
            raise SMPError("injected: no snapshot process on node 1")

        manager.ensure_daemon = refusing
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ft = manager.FaultTolerance(exp, env, dims)
    tried_at = []
    for step in range(1, 200):
        before = getattr(ft, "hookup_tries", 0)
        ft.after_step(step, model, opt, dict)
        if getattr(ft, "hookup_tries", 0) != before:
            tried_at.append(step)
    ft.close(finished=False)
    return ft.snapshots is None, tried_at, ft.locate()


def test_retries_of_a_failed_start_up_hookup_back_off_and_stop_after_8_tries(tmp_path, capfd):
    """A node that never gets its SMP: the retries come at doubling gaps of snapshot steps (1, 2, 4, ... capped at
    32), the same on every rank, and after the 8th try snapshots stay off with one last line."""
    d = str(tmp_path / "smp")
    start_daemon(d, 0)
    try:
        results = run_ranks(_never_hooked_up, WORLD, str(tmp_path / "run"), env={"LOOMTRAIN_SMP_DIR": d}, timeout=120)
    finally:
        stop_daemons(d, range(WORLD))
    err = capfd.readouterr().err
    for off, tried_at, (located, why) in results:
        assert off and located is None
        assert tried_at == [1, 3, 7, 15, 31, 63, 95], tried_at  # start-up was the first try
        assert why == "the snapshot processes could not be reached at start-up (rank 1 (node 1): injected: no " \
                      "snapshot process on node 1)"
    lines = [line for line in err.splitlines() if "hooking up the snapshot processes failed" in line]
    assert len(lines) == 8 and lines[-1].endswith("(try 8 of 8): rank 1 (node 1): injected: no snapshot process on "
                                                  "node 1; no more tries: in-memory snapshots are off for the rest "
                                                  "of this run"), lines[-1]


# ---------------------------------------------------------------- M7: the timeout grows with the bytes moved
def test_the_snapshot_timeout_is_the_floor_plus_the_bytes_moved_at_the_slowest_healthy_rate():
    """timeout = timeout_s + bytes * 8 / (min_gbps * 1e9); bytes: the payload copied plus, with erasure coding, the
    n-1 chunks a rank sends and the n-1 it receives (replicas: its copy written once more)."""
    from types import SimpleNamespace

    from loomtrain.faulttol.snapshot import snapshot_timeout_s

    assert snapshot_timeout_s(120.0, 0, 1.0) == 120.0
    assert snapshot_timeout_s(120.0, 10**9, 1.0) == pytest.approx(128.0)  # 1 GB at 1 Gbit/s: 8 s more
    assert snapshot_timeout_s(5.0, 3 * 10**9, 0.5) == pytest.approx(5.0 + 48.0)
    assert snapshot_timeout_s(5.0, 2 * 10**9, 1.0) > snapshot_timeout_s(5.0, 10**9, 1.0)
    ft = FaultTolConfig()
    ft.ranks_per_node, ft.ec_group_nodes, ft.ec_parity = 1, 4, 1
    erasure = SimpleNamespace(layout=NodeLayout.from_config(ft, 4, 4))  # k=3, m=1, n=4
    assert Snapshotter.moved_bytes(erasure, payload=300, chunk=100) == 300 + 2 * 3 * 100
    replicas = SimpleNamespace(layout=SimpleNamespace(by_replicas=True))
    assert Snapshotter.moved_bytes(replicas, payload=300, chunk=300) == 600


MIN_GBPS = 0.001  # 125 kB/s: a megabyte adds 8 s, so the test sees the growth without moving much


def _timeouts_by_state_size(rank, smp_dir):
    """Snapshot 1 of the small model; snapshot 2 with 1 MiB more state on rank 1 only. Per snapshot: the bytes
    this rank moves, and the timeouts its world and stripe groups, its SMP client and its transfers' waits got."""
    import datetime

    import torch.distributed as dist

    model, opt, snap = _snapshotter(rank, smp_dir, timeout_s=5.0, min_gbps=MIN_GBPS)
    moved, waited = [], []
    measure = snap.moved_bytes

    def recording_moved(*args, **kw):
        moved.append(measure(*args, **kw))
        return moved[-1]

    class Work:
        def __init__(self, work):
            self.work = work

        def wait(self, timeout=None):
            waited.append(timeout.total_seconds() if isinstance(timeout, datetime.timedelta) else timeout)
            return self.work.wait(timeout) if timeout is not None else self.work.wait()

    batch = dist.batch_isend_irecv
    dist.batch_isend_irecv = lambda ops: [Work(w) for w in batch(ops)]
    snap.moved_bytes = recording_moved

    def group_timeout(group):
        return group._get_backend(torch.device("cpu")).options._timeout.total_seconds()

    seen = {}
    for step, extra in ((1, None), (2, {"big": torch.zeros(1 << 18)} if rank == 1 else None)):
        waited.clear()
        _step(model, opt)
        snap.start(step, model, opt, {"step": step}, extra)
        snap.before_update()
        snap.wait()
        seen[step] = {"moved": moved[-1], "world": group_timeout(snap.world_group),
                      "stripe": group_timeout(snap.stripe_group), "client": snap.client.timeout_s,
                      "waits": sorted(set(waited)), "failures": snap.poll()}
    return seen, list(snap.committed)


def test_each_snapshot_waits_in_proportion_to_the_most_bytes_any_rank_moves(smp2):
    """The timeout of a snapshot's group collectives, its chunk transfers and its SMP requests is
    snapshot_timeout_s of the largest number of bytes any rank moves: the same on both ranks although only rank 1's
    state grew by 1 MiB, and at least 8 s longer (1 MiB+ at 125 kB/s) than the small snapshot's."""
    from loomtrain.faulttol.snapshot import snapshot_timeout_s

    results = run_ranks(_timeouts_by_state_size, WORLD, smp2, timeout=120)
    expected = {step: snapshot_timeout_s(5.0, max(seen[step]["moved"] for seen, _ in results), MIN_GBPS)
                for step in (1, 2)}
    for rank, (seen, committed) in enumerate(results):
        assert committed == [1, 2]
        for step in (1, 2):
            got = seen[step]
            assert got["failures"] == []
            want = pytest.approx(expected[step], abs=2e-3)  # gloo keeps milliseconds
            assert [got["world"], got["stripe"], got["client"]] == [want, want, want], got
            assert got["waits"] == [want], got  # every transfer's wait, and no other
    assert results[1][0][2]["moved"] > results[0][0][2]["moved"] + (1 << 20)
    assert expected[2] > expected[1] + 8.0
