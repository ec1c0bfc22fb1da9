"""Health monitoring on real ranks: what it costs, that clean runs raise nothing, how fast it names faults.

Ranks are forked (gloo, CPU), a Llama-style model on the standard-library corpus, one rank per simulated node.

- ``overhead``: the same job with the hang monitor on (heartbeats on every collective, the launcher's
  monitor thread polling) and off, interleaved on/off/on/off...; median step time of each. The straggler
  detector is on in both: its numbers ride along with the step's stop-flag exchange (no collective of its
  own). Also the cost of one heartbeat write and the writes per step, which predict the overhead.
- ``clean``: ``--clean-steps`` steps (2,000) with every rank's compute jittered (+0..10 %, random per rank
  and step), a snapshot every 50 steps and a checkpoint every 500, monitor on: straggler alarms and hangs.
- ``slow``: one rank's compute 1.25x from step 30 on: steps until it is named, and the cause given.
- ``stop``: one rank SIGSTOPped after step 40: seconds without progress when the monitor acted, against its
  limit max(3 x p99 step time, 5 s), and the restart from memory that follows.

    python scripts/bench_health.py --world 2 --clean-steps 2000
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

MODEL = ["model.dim=128", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=2", "data.seq_len=128",
         "train.global_batch_size=8", "train.progress=false", "train.eval_every=0", "train.threads=1",
         "optim.warmup_steps=5", "checkpoint.at_end=false", "train.log_every=1", "faulttol.ranks_per_node=1"]


def _job(rank, overrides, fault):
    """One rank: ``fault`` = (kind, rank, step) with kind jitter | slow | sigstop | none."""
    from conftest import signal_self_after_step
    from loomtrain.trainer import train as train_mod
    from loomtrain.launch import train as launch_train
    from loomtrain.trainer.config import load_config

    kind, target, onset = fault
    original = train_mod.MicroBatchSteps.forward_backward
    rng = random.Random(1000 + rank)
    count = {"n": 0}

    def perturbed(self, micro, scale):
        t0 = time.perf_counter()
        out = original(self, micro, scale)
        spent = time.perf_counter() - t0
        count["n"] += 1
        if kind == "jitter":
            time.sleep(rng.uniform(0.0, 0.10) * spent)
        elif kind == "slow" and rank == target and count["n"] > onset:
            time.sleep(0.25 * spent)  # this rank's compute 1.25x
        return out

    train_mod.MicroBatchSteps.forward_backward = perturbed
    if kind == "sigstop" and rank == target and os.environ.get("LOOMTRAIN_ATTEMPT") == "0":
        signal_self_after_step(onset, signal.SIGSTOP)
    r = launch_train.run(load_config("tiny", overrides))
    return r.last_step, r.restored_from


def _metrics(out_dir: str) -> list[dict]:
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _with_smps(world: int, fn):
    from loomtrain.faulttol.smp import start_daemon, stop_daemons

    smp = tempfile.mkdtemp(prefix="bench-health-smp-")
    for node in range(world):
        start_daemon(smp, node)
    try:
        return fn({"LOOMTRAIN_SMP_DIR": smp})
    finally:
        stop_daemons(smp, range(world))


def _run(world, base, steps, fault, monitor: bool, extra=(), restarts=0):
    from loomtrain.faulttol.hang_monitor import HangMonitor
    from loomtrain.launch.forked import run_ranks_restarting

    out = tempfile.mkdtemp(prefix="bench-health-")
    ov = base + [f"train.steps={steps}", f"train.output_dir={out}"] + list(extra)
    mon = HangMonitor(os.path.join(out, "heartbeats"), quiet=True) if monitor else None
    results, failures = run_ranks_restarting(_job, world, ov, fault, max_restarts=restarts, timeout=3600,
                                             monitor=mon)
    return _metrics(out), mon, results, failures


def heartbeat_write_us(n: int = 200_000) -> float:
    from loomtrain.faulttol.heartbeat import Heartbeat

    d = tempfile.mkdtemp(prefix="bench-hb-")
    hb = Heartbeat(d, 0, 0, 0)
    t0 = time.perf_counter()
    for i in range(n):
        hb.set_waiting(i % 2 == 0)
    us = (time.perf_counter() - t0) / n * 1e6
    hb.close()
    return us


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--overhead-steps", type=int, default=200)
    p.add_argument("--repeats", type=int, default=3, help="on/off pairs for the overhead")
    p.add_argument("--clean-steps", type=int, default=2000)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()

    from loomtrain.data.prepare import prepare
    from loomtrain.trainer.config import DataConfig

    corpus = os.path.join(tempfile.gettempdir(), "bench-health-corpus", "stdlib")
    prepare(DataConfig(corpus="stdlib", max_documents=600, valid_fraction=0.02), out_prefix=corpus, writer="builtin")
    base = MODEL + [f"data.prepared={corpus}", f"parallel.dp_shard={args.world}"]
    w = args.world
    results: dict = {"world": w}

    # -- overhead: interleaved on/off runs
    medians = {True: [], False: []}
    writes = []
    for i in range(args.repeats):
        for on in (True, False):
            metrics, mon, _, _ = _run(w, base, args.overhead_steps, ("none", -1, 0), on)
            times = [m["step_time_s"] for m in metrics if "step_time_s" in m][10:]
            medians[on].append(statistics.median(times))
            if on:
                from loomtrain.faulttol.heartbeat import read_record, record_path

                rec = read_record(record_path(mon.directory, 0))
                writes.append(rec["seq"] / 2 / args.overhead_steps)
            print(f"overhead run {i + 1}/{args.repeats} monitor {'on ' if on else 'off'}: median step "
                  f"{medians[on][-1] * 1e3:.2f} ms", flush=True)
    on_ms, off_ms = statistics.median(medians[True]) * 1e3, statistics.median(medians[False]) * 1e3
    write_us = heartbeat_write_us()
    per_step = statistics.median(writes)
    results["overhead"] = {"step_ms_on": on_ms, "step_ms_off": off_ms, "ratio": on_ms / off_ms,
                           "heartbeat_write_us": write_us, "writes_per_step": per_step,
                           "predicted_fraction": per_step * write_us / 1e3 / off_ms}

    # -- clean: jitter, snapshots, checkpoints; nothing may be named
    def clean(env):
        os.environ.update(env)
        try:
            return _run(w, base, args.clean_steps, ("jitter", -1, 0), True,
                        ["faulttol.snapshot.every_steps=50", "checkpoint.every_steps=500", "checkpoint.keep=1"])
        finally:
            for k in env:
                os.environ.pop(k, None)

    t0 = time.perf_counter()
    metrics, mon, _, _ = _with_smps(w, clean)
    alarms = sorted({m["step"] for m in metrics if "straggler_rank" in m})
    results["clean"] = {"steps": max(m["step"] for m in metrics), "straggler_steps": len(alarms),
                        "first_alarm": alarms[:1], "hangs": len(mon.hangs), "seconds": time.perf_counter() - t0,
                        "median_step_ms": 1e3 * statistics.median(m["step_time_s"] for m in metrics
                                                                  if "step_time_s" in m)}
    print(f"clean: {results['clean']}", flush=True)

    # -- slow: 1.25x compute on rank w-1 from step 30
    metrics, _, _, _ = _run(w, base, 60, ("slow", w - 1, 30), False)
    named = [m for m in metrics if m.get("straggler_rank") == w - 1]
    results["slow"] = {"onset_step": 30, "named_at_step": named[0]["step"] if named else None,
                       "cause": named[0]["straggler_cause"] if named else None,
                       "slowdown": named[0]["straggler_slowdown"] if named else None}
    print(f"slow: {results['slow']}", flush=True)

    # -- stop: SIGSTOP after step 40, the monitor acts, the job restarts from memory
    def stopped(env):
        os.environ.update(env)
        try:
            return _run(w, base, 60, ("sigstop", w - 1, 41), True, ["faulttol.snapshot.every_steps=10"], restarts=1)
        finally:
            for k in env:
                os.environ.pop(k, None)

    _, mon, ranks, failures = _with_smps(w, stopped)
    hang = mon.hangs[0] if mon.hangs else None
    results["stop"] = {"limit_s": hang.limit_s if hang else None, "limit_why": hang.limit_why if hang else None,
                       "stalled_s_at_action": hang.stalled_s if hang else None, "blamed": hang.ranks if hang else None,
                       "failures": failures, "restored_from": [r[1] for r in ranks]}
    print(f"stop: {results['stop']}", flush=True)

    o = results["overhead"]
    print("\n| measurement | result |\n|---|---|")
    print(f"| step time, monitor on vs off ({w} ranks, median of {args.repeats} runs each) | {o['step_ms_on']:.2f} ms "
          f"vs {o['step_ms_off']:.2f} ms: **{o['ratio']:.3f}x** |")
    print(f"| heartbeat write; writes per step; predicted share of the step | {o['heartbeat_write_us']:.2f} us; "
          f"{o['writes_per_step']:.0f}; {100 * o['predicted_fraction']:.3f}% |")
    c = results["clean"]
    print(f"| clean steps (jitter 0-10%, snapshot/50, checkpoint/500): straggler alarms, hangs | {c['steps']} steps: "
          f"**{c['straggler_steps']}**, **{c['hangs']}** |")
    s = results["slow"]
    print(f"| 1.25x compute from step 30: named at step | {s['named_at_step']} ({s['cause']}, {s['slowdown']}x) |")
    t = results["stop"]
    print(f"| SIGSTOP: no progress when the monitor acted, limit | {t['stalled_s_at_action']:.2f} s, "
          f"{t['limit_s']:.1f} s ({t['limit_why']}); restored from {t['restored_from']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
