"""Timing margins of the fault-tolerance tests: what their limits are up against on this machine.

The tests' own 4-rank job (tests/test_faulttol.py: 4 forked ranks of the tests' tiny model, each its own
simulated node with its own snapshot process, a snapshot every 2 steps, the hang monitor watching with
``faulttol.monitor.warmup_steps=3``), run ``--repeats`` times for ``--steps`` steps, measuring per rank

- the gaps between two of its watchdog beats (a step plus its snapshot), against the tests' watchdog limit
  ``faulttol.hang_timeout_s`` (60 s; it was 5 s);
- the p99 step time its heartbeat records, after step 4 (the record the SIGSTOP test's hang is diagnosed from)
  and at the end, and the hang monitor's limit max(3 x p99, 5 s) that follows: the tests assert that formula,
  this shows which term applies here;
- straggler alarms on real clocks (tests/test_health.py names stragglers on a virtual clock), and hangs the
  monitor declared in these clean runs;

and, on real clocks again, the step at which rank 2 is named when its compute is 1.25x from step
``--onset`` + 1 (what tests/test_health.py used to assert on 4 ranks: within 10 steps of the onset).

    python scripts/bench_fault_margins.py --repeats 3 --steps 20
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

WORLD = 4
FT = ["parallel.dp_shard=4", "faulttol.snapshot.every_steps=2", "faulttol.ranks_per_node=1",
      "faulttol.hang_timeout_s=60", "faulttol.monitor.warmup_steps=3", "train.log_every=1000"]


def _job(rank, overrides, slow_from):
    """One rank: watchdog beat gaps, its heartbeat's p99 after each step, newly named stragglers (step, rank,
    cause). ``slow_from``: rank 2's compute 1.25x from that step on (None: clean)."""
    from loomtrain.faulttol import health, heartbeat, inject
    from loomtrain.launch import train as launch_train
    from loomtrain.trainer import train as train_mod
    from loomtrain.trainer.config import load_config

    beats, p99, found = [], {}, []
    beat, step_done, observe = inject.Watchdog.beat, heartbeat.Heartbeat.step_done, health.HealthMonitor.observe

    def timed_beat(self):
        beats.append(time.monotonic())
        beat(self)

    def recorded_step(self, step):
        step_done(self, step)
        p99[step] = self.fields["p99"]

    def keep(self, step, busy, data):
        before = self.detector.current
        observe(self, step, busy, data)
        if self.detector.current is not None and self.detector.current is not before:
            found.append((step, self.detector.current.rank, self.detector.current.cause))

    inject.Watchdog.beat, heartbeat.Heartbeat.step_done, health.HealthMonitor.observe = timed_beat, recorded_step, keep
    if slow_from is not None and rank == 2:
        forward_backward, calls = train_mod.MicroBatchSteps.forward_backward, [0]

        def slow_compute(self, micro, scale):
            t0 = time.perf_counter()
            out = forward_backward(self, micro, scale)
            calls[0] += 1
            if calls[0] >= slow_from:
                time.sleep(0.25 * (time.perf_counter() - t0))  # this rank's compute 1.25x
            return out

        train_mod.MicroBatchSteps.forward_backward = slow_compute
    launch_train.run(load_config("tiny", overrides))
    return [b - a for a, b in zip(beats, beats[1:])], p99, found


def _run(base, steps, slow_from):
    from loomtrain.faulttol.hang_monitor import HangMonitor
    from loomtrain.faulttol.smp import start_daemon, stop_daemons
    from loomtrain.launch.forked import run_ranks_restarting

    out = tempfile.mkdtemp(prefix="bench-margins-")
    smp = os.path.join(out, "smp")
    for node in range(WORLD):
        start_daemon(smp, node)
    monitor = HangMonitor(os.path.join(out, "heartbeats"), quiet=True)
    try:
        results, _ = run_ranks_restarting(_job, WORLD, base + [f"train.steps={steps}", f"train.output_dir={out}"],
                                          slow_from, max_restarts=0, timeout=1800,
                                          env={"LOOMTRAIN_SMP_DIR": smp}, monitor=monitor)
    except AssertionError as e:  # the monitor killed a rank: a hang declared in a run that had none
        print(f"run failed: {str(e).splitlines()[-1]}", flush=True)
        results = None
    finally:
        stop_daemons(smp, range(WORLD))
    return results, len(monitor.hangs)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=20, help="steps of each clean run")
    p.add_argument("--onset", type=int, default=20, help="rank 2's compute is 1.25x after this step")
    args = p.parse_args()

    from conftest import TEST_OVERRIDES
    from loomtrain.data.prepare import prepare
    from loomtrain.trainer.config import DataConfig

    corpus = os.path.join(tempfile.gettempdir(), "bench-margins-corpus", "stdlib300")
    prepare(DataConfig(corpus="stdlib", max_documents=300, valid_fraction=0.05), out_prefix=corpus, writer="builtin")
    base = TEST_OVERRIDES + [f"data.prepared={corpus}"] + FT

    gaps, p99_4, p99_end, alarms, hangs, failed = [], [], [], 0, 0, 0
    for i in range(args.repeats):
        t0 = time.perf_counter()
        results, declared = _run(base, args.steps, None)
        hangs += declared
        if results is None:
            failed += 1
            continue
        for rank_gaps, p99, found in results:
            gaps += rank_gaps
            p99_4.append(p99[4])
            p99_end.append(p99[args.steps])
            alarms += len(found)
        print(f"clean run {i + 1}/{args.repeats} ({time.perf_counter() - t0:.0f} s): longest beat gap "
              f"{max(g for r in results for g in r[0]):.2f} s, p99 after step 4 up to {max(r[1][4] for r in results):.3f} s, "
              f"alarms {[r[2] for r in results][0]}", flush=True)

    named = []
    for i in range(args.repeats):
        t0 = time.perf_counter()
        results, declared = _run(base, args.onset + 20, args.onset + 1)
        hangs += declared
        first = results[0][2][:1] if results is not None else ["run failed"]
        named.append(first[0] if first else None)
        print(f"slow run {i + 1}/{args.repeats} ({time.perf_counter() - t0:.0f} s): named {results and results[0][2]}",
              flush=True)

    limit = max(5.0, 3 * max(p99_4)) if p99_4 else float("nan")
    gaps.sort()
    print(f"\n| measurement ({WORLD} ranks + {WORLD} snapshot processes, {args.repeats} runs) | result |\n|---|---|")
    print(f"| gap between watchdog beats ({len(gaps)} gaps of {args.steps}-step runs): median, p99, longest | "
          f"{statistics.median(gaps):.3f} s, {gaps[min(len(gaps) - 1, int(0.99 * len(gaps)))]:.3f} s, "
          f"**{gaps[-1]:.2f} s** (watchdog limit 60 s: {60 / gaps[-1]:.0f}x) |")
    print(f"| heartbeat p99 step time after step 4, longest over ranks and runs; at step {args.steps} | "
          f"{max(p99_4):.3f} s; {max(p99_end):.3f} s |")
    print(f"| hang monitor limit max(3 x p99 after step 4, 5 s) | **{limit:.1f} s** "
          f"({'the 5 s floor' if limit == 5.0 else '3 x p99'}) |")
    print(f"| clean runs: straggler alarms, failed runs; hangs declared in all runs | {alarms}, {failed}; {hangs} |")
    print(f"| rank 2 compute 1.25x from step {args.onset + 1}: named (step, rank, cause) per run | {named} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
