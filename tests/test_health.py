"""Naming the slow rank from each rank's time outside collectives: a slowed rank and a slow data loader are
named 8 steps after the onset, and clean runs (snapshots and checkpoints included) raise nothing.

The runs on real ranks time their steps with a virtual clock that only the work the test charges advances:
what is named then depends on the trainer's measuring and the detector, not on how this shared 2-core
machine schedules the ranks (4 ranks taking turns on the cores look like slow ranks to a wall clock). How
fast a real slowdown is named, and that real clean runs raise nothing: ``scripts/bench_health.py`` (2 ranks)
and ``scripts/bench_fault_margins.py`` (4 ranks), in BENCHMARKS.md."""
import random

import pytest

from conftest import run_ranks
from loomtrain.faulttol.health import StragglerDetector


def test_detector_names_a_125x_rank_within_the_window_and_ignores_jitter():
    rng = random.Random(0)
    hosts = [f"h{i}" for i in range(8)]
    d = StragglerDetector(hosts)
    found = []
    for step in range(1, 2001):  # clean: every rank 100 ms +- 5% jitter, one rank at +15% every third step
        busy = [0.1 * (1 + rng.uniform(-0.05, 0.05)) for _ in hosts]
        if step % 3 == 0:
            busy[rng.randrange(8)] *= 1.15
        found += [f for f in [d.observe(step, busy, [0.001] * 8)] if f]
    assert found == [] and d.current is None
    for step in range(2001, 2011):  # rank 5 from now on 1.25x slower in compute
        busy = [0.1 * (1 + rng.uniform(-0.05, 0.05)) for _ in hosts]
        busy[5] *= 1.25
        if (f := d.observe(step, busy, [0.001] * 8)) is not None:
            found.append(f)
    assert [(f.rank, f.host, f.cause) for f in found] == [(5, "h5", "compute")]
    assert found[0].since_step <= 2010 and found[0].slowdown == pytest.approx(1.25, abs=0.08)
    for step in range(2011, 2035):  # recovered: cleared after a clean window
        d.observe(step, [0.1] * 8, [0.001] * 8)
    assert d.current is None


def test_detector_tells_a_slow_data_loader_from_slow_compute():
    d = StragglerDetector(["a", "b", "c", "d"])
    found = None
    for step in range(1, 11):
        found = d.observe(step, [0.1, 0.1, 0.14, 0.1], [0.001, 0.001, 0.041, 0.001]) or found
    assert found is not None and found.since_step <= 8
    assert found is not None and (found.rank, found.cause) == (2, "data loader")


COMPUTE_S, DATA_S = 0.1, 0.001  # what one step's forward/backward and its batch cost on the virtual clock
ONSET, NEED = 4, 8  # the slowdown starts after step ONSET; the detector names a rank slow in NEED of 10 steps


def _monitored(rank, overrides, slow_rank, slow_kind, outside_s=0.0, jitter=0.0):
    """One rank of a run whose health monitor reads a virtual clock: the batch costs DATA_S, the forward/
    backward COMPUTE_S (times 1 + U(0, ``jitter``)), collectives nothing. From step ONSET + 1 on, rank
    ``slow_rank``'s compute costs 1.25x (``slow_kind`` "compute") or its batch 30 ms more ("data loader").
    ``outside_s``: what each snapshot and checkpoint costs rank 1 (work outside the measured step).
    Returns the (step, rank, cause) of every newly named straggler, the last step, and the snapshots and
    checkpoints charged."""
    from loomtrain.data.loader import Prefetcher
    from loomtrain.faulttol import health
    from loomtrain.faulttol.snapshot import Snapshotter
    from loomtrain.launch import train as launch_train
    from loomtrain.trainer import train as train_mod
    from loomtrain.trainer.checkpoint import Checkpointer
    from loomtrain.trainer.config import load_config

    now, rng, found = [0.0], random.Random(rank), []
    batches, counts = [0], {"snapshot": 0, "checkpoint": 0}
    init, observe = health.HealthMonitor.__init__, health.HealthMonitor.observe
    next_step, forward_backward = Prefetcher.next_step, train_mod.MicroBatchSteps.forward_backward
    start, save = Snapshotter.start, Checkpointer.save

    def virtual_init(self, *args, **kw):
        init(self, *args, clock=lambda: now[0], blocked=lambda: 0.0, **kw)

    def keep(self, step, busy, data):
        before = self.detector.current
        observe(self, step, busy, data)
        if self.detector.current is not None and self.detector.current is not before:
            found.append((step, self.detector.current.rank, self.detector.current.cause))

    def charged_batch(self):
        out = next_step(self)
        batches[0] += 1
        now[0] += DATA_S + (0.03 if (rank, slow_kind) == (slow_rank, "data loader") and batches[0] > ONSET else 0.0)
        return out

    def charged_compute(self, micro, scale):
        out = forward_backward(self, micro, scale)
        slow = (rank, slow_kind) == (slow_rank, "compute") and batches[0] > ONSET
        now[0] += COMPUTE_S * (1 + rng.uniform(0.0, jitter)) * (1.25 if slow else 1.0)
        return out

    def charged(kind, original):
        def run(self, *args, **kw):
            if rank == 1:
                now[0] += outside_s
                counts[kind] += 1
            return original(self, *args, **kw)

        return run

    health.HealthMonitor.__init__, health.HealthMonitor.observe = virtual_init, keep
    Prefetcher.next_step, train_mod.MicroBatchSteps.forward_backward = charged_batch, charged_compute
    Snapshotter.start, Checkpointer.save = charged("snapshot", start), charged("checkpoint", save)
    r = launch_train.run(load_config("tiny", overrides))
    return found, r.last_step, counts


@pytest.mark.parametrize("kind", ["compute", "data loader"])
def test_a_slowed_rank_is_named_with_its_cause_8_steps_after_the_onset(kind, overrides):
    """4 ranks; rank 2's compute 1.25x, or its batches 30 ms late, from step 5: named with that cause at the
    8th slow step (the trainer's times travel to every rank in rank order and reach the detector)."""
    ov = overrides + ["parallel.dp_shard=4", f"train.steps={ONSET + NEED + 2}", "train.log_every=100"]
    results = run_ranks(_monitored, 4, ov, 2, kind, env={})
    for found, last, _ in results:  # every rank names it, from the same gathered times
        assert last == ONSET + NEED + 2
        assert found == [(ONSET + NEED, 2, kind)], found


def test_snapshots_and_checkpoints_are_outside_the_measured_step(overrides, tmp_path):
    """2 ranks, compute jittered 0-10%, a snapshot every step and a checkpoint every 2 steps, each costing
    rank 1 ten steps' time: none of it is in rank 1's measured steps, so no straggler is named."""
    from loomtrain.faulttol.smp import start_daemon, stop_daemons

    steps = 16
    smp = str(tmp_path / "smp")
    for node in range(2):
        start_daemon(smp, node)
    try:
        ov = overrides + ["parallel.dp_shard=2", f"train.steps={steps}", "train.log_every=100",
                          "faulttol.snapshot.every_steps=1", "faulttol.ranks_per_node=1",
                          "checkpoint.every_steps=2", "checkpoint.keep=1"]
        results = run_ranks(_monitored, 2, ov, -1, "compute", 10 * COMPUTE_S, 0.1,
                            env={"LOOMTRAIN_SMP_DIR": smp}, timeout=300)
    finally:
        stop_daemons(smp, range(2))
    for found, last, _ in results:
        assert last == steps and found == [], found
    assert results[1][2] == {"snapshot": steps, "checkpoint": steps // 2 - 1}  # the final step saves none
