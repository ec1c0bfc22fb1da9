"""In-memory snapshots vs disk checkpoints: training-loop stall, recovery time, affordable frequency.

One run, the same model and training state on every line: W forked ranks (FSDP over all of
them), each rank its own simulated node with its own snapshot process, erasure coded k+m
across nodes. Per rank it measures

- the step time without any saving (baseline, median over --steps);
- the stall a save adds to the loop. In-memory snapshot: (a) the time the main thread is
  blocked (the ``start`` call plus waiting, before the next optimizer step, for the copy to
  finish) and (b) the whole-loop overhead, median step time with a snapshot after *every*
  step minus the baseline, which also counts the background thread's use of the cores (on
  a 2-core machine running 4 ranks, every background cycle is taken from training).
  ``torch.save`` of the rank's shards (synchronous, no fsync) and DCP ``async_save`` (its
  staging call): the time the call blocks;
  Both disk saves are timed cold (first call) and warm (median of three more);
- recovery: restoring the newest snapshot from the SMPs (locate + exchange + verify + load in
  place), with every node intact and again with the last node's memory wiped (its chunks
  rebuilt from parity: the decode path), vs ``dcp.load`` of a checkpoint of the same state
  (page cache warm: a lower bound for disk);
- the snapshot interval whose cost stays under 2% of training time.

    python scripts/bench_snapshot.py --world 4 --steps 10 --set model.dim=384 --set model.n_layers=6
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time

import torch


def _bench_rank(rank, overrides, steps, out_dir):
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from loomtrain.faulttol.smp import remove_segments, segment_prefix
    from loomtrain.launch.env import init_distributed, shutdown
    from loomtrain.trainer.checkpoint import Checkpointer
    from loomtrain.trainer.config import load_config
    from loomtrain.trainer.train import Trainer, set_threads

    exp = load_config("tiny", overrides)
    env = init_distributed(exp.parallel)
    set_threads(exp, env)
    tr = Trainer(exp, env)
    snaps = tr.ft.snapshots
    state_bytes = sum(t.numel() * t.element_size() for t in _local_tensors(tr))

    def step_times(after_step=None):
        times = []
        for _ in range(steps):
            dist.barrier()
            t0 = time.perf_counter()
            tr.train_step()
            tr.step += 1
            if after_step:
                after_step()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    step_times()  # warm-up
    base = step_times()
    starts = []

    def snapshot():
        snaps.start(tr.step, tr.model, tr.optimizer, tr.state.host_state())
        starts.append(snaps.last_stall_s)

    snaps.wait_s = 0.0
    snap_step = step_times(snapshot)
    snaps.wait()
    blocking = statistics.median(starts) + snaps.wait_s / steps
    background = snaps.last_seconds

    def torch_save():
        model_sd, optim_sd = get_state_dict(tr.model, tr.optimizer)
        torch.save({"model": model_sd, "optim": optim_sd}, os.path.join(out_dir, f"torch_save_rank{rank}.pt"))

    def timed(fn, repeats=3, before=lambda: None):
        """(first call, median of the warm ones): the first call of DCP pays for planning and pools."""
        times = []
        for _ in range(repeats + 1):
            before()  # untimed: e.g. the previous save's background write must not overlap this call
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return times[0], statistics.median(times[1:])

    torch_save_cold, torch_save_s = timed(torch_save)
    ckpt = Checkpointer(os.path.join(out_dir, "dcp"), keep=1, async_save=True, rank=rank)
    saved = []

    def dcp_async():
        saved.append(ckpt.save(tr.state, tr.step))

    dcp_async_cold, dcp_async_s = timed(dcp_async, before=ckpt.wait)
    ckpt.wait()
    path = saved[-1]

    # Recovery of the same state: memory (newest committed snapshot), with every node and with one node's
    # memory lost (its chunks rebuilt from parity), vs the DCP checkpoint.
    snaps.start(tr.step, tr.model, tr.optimizer, tr.state.host_state())
    snaps.wait()
    assert not snaps.poll()

    def memory_restore():
        dist.barrier()
        t0 = time.perf_counter()
        located, why = snaps.locate()
        assert located is not None, why
        restored = snaps.restore(located, tr.model, tr.optimizer)
        return time.perf_counter() - t0, restored.rebuilt

    memory_restore_s, _ = memory_restore()
    lost = tr.ft.layout.nodes - 1
    if tr.ft.layout.parity and tr.ft.layout.node_of(rank) == lost and rank == tr.ft.layout.node_ranks(lost)[0]:
        remove_segments(segment_prefix(tr.ft.smp_dir, lost))  # that node's RAM is gone
    parity_restore_s, rebuilt = memory_restore() if tr.ft.layout.parity else (float("nan"), 0)
    dist.barrier()
    t0 = time.perf_counter()
    ckpt.load(path, tr.state)
    disk_restore_s = time.perf_counter() - t0
    tr.ft.close(finished=True)
    shutdown()
    return {"base": base, "snap_step": snap_step, "blocking": blocking, "background": background,
            "torch_save": torch_save_s, "torch_save_cold": torch_save_cold, "dcp_async": dcp_async_s,
            "dcp_async_cold": dcp_async_cold, "memory_restore": memory_restore_s, "parity_restore": parity_restore_s,
            "rebuilt": rebuilt, "disk_restore": disk_restore_s, "state_bytes": state_bytes,
            "layout": tr.ft.layout.describe()}


def _local_tensors(tr):
    from loomtrain.faulttol.snapshot import flatten_state

    return flatten_state(tr.model, tr.optimizer)[0]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--parity", type=int, default=1)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    a = p.parse_args()

    from loomtrain.faulttol.smp import start_daemon, stop_daemons
    from loomtrain.launch.forked import run_ranks

    work = tempfile.mkdtemp(prefix="bench-snapshot-", dir=os.getcwd())
    smp_dir = tempfile.mkdtemp(prefix="bench-smp-")
    overrides = ["train.progress=false", "train.eval_every=0", "checkpoint.at_end=false",
                 f"train.output_dir={work}/run", f"parallel.dp_shard={a.world}", "train.steps=1000",
                 "faulttol.snapshot.every_steps=1000000", "faulttol.ranks_per_node=1",
                 f"faulttol.ec_parity={a.parity}", "faulttol.hang_timeout_s=0"] + a.overrides
    for node in range(a.world):
        start_daemon(smp_dir, node)
    try:
        results = run_ranks(_bench_rank, a.world, overrides, a.steps, work, env={"LOOMTRAIN_SMP_DIR": smp_dir},
                            timeout=1800)
    finally:
        stop_daemons(smp_dir, range(a.world))
        shutil.rmtree(smp_dir, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)

    worst = {k: max(r[k] for r in results) for k in results[0]}  # the slowest rank sets the pace
    base = worst["base"]
    snapshot_stall = max(0.0, worst["snap_step"] - base)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; {a.world} ranks = "
          f"{worst['layout']}; overrides: {' '.join(a.overrides)}")
    print(f"state per rank: {worst['state_bytes'] / 2**20:.1f} MiB (parameters + AdamW state, FSDP shard); "
          f"step time {base * 1000:.0f} ms (median of {a.steps}, slowest rank)\n")
    print("| save | stall per save | vs snapshot's blocking |")
    print("|---|---:|---:|")
    blocking = worst["blocking"]
    rows = [("in-memory snapshot: main thread blocked (start + wait for copy)", blocking),
            ("in-memory snapshot: whole-loop overhead (incl. background CPU use)", snapshot_stall),
            ("torch.save of the shards (sync, no fsync), warm median of 3", worst["torch_save"]),
            ("torch.save, first call", worst["torch_save_cold"]),
            ("DCP async_save (staging call), warm median of 3", worst["dcp_async"]),
            ("DCP async_save, first call", worst["dcp_async_cold"])]
    for name, s in rows:
        print(f"| {name} | {s * 1000:.1f} ms | {s / blocking:.1f}x |")
    print(f"\nbackground time of one snapshot (copy, encode, exchange, commit): {worst['background'] * 1000:.1f} ms "
          f"= {worst['background'] / base:.2f} step(s): snapshots more often than every "
          f"{max(1, int(-(-worst['background'] // base)))} step(s) would wait for the previous one")
    print("\n| recovery | time | vs memory |")
    print("|---|---:|---:|")
    mem = worst["memory_restore"]
    print(f"| from memory, every node intact (locate + exchange + verify + load) | {mem * 1000:.1f} ms | 1.0x |")
    if a.parity:
        print(f"| from memory, node {a.world - 1}'s memory lost ({worst['rebuilt']} rank(s) "
              f"{'taken from a replica' if 'replicas' in worst['layout'] else 'rebuilt from parity'}) | "
              f"{worst['parity_restore'] * 1000:.1f} ms | {worst['parity_restore'] / mem:.1f}x |")
    print(f"| from disk (dcp.load, warm page cache) | {worst['disk_restore'] * 1000:.1f} ms | "
          f"{worst['disk_restore'] / mem:.1f}x |")
    every = max(1, int(-(-snapshot_stall // (0.02 * base)))) if snapshot_stall > 0 else 1
    print(f"\nsnapshot every {every} step(s) keeps the cost under 2% "
          f"({100 * snapshot_stall / (every * base):.2f}% of training time)")


if __name__ == "__main__":
    main()
