"""What finding the epoch to restore costs (``Snapshotter.locate``), against the all-gather of every rank's
inventory it replaced: bytes each rank sends (counted by ``comms/traffic.py``) and time, over real gloo
process groups of W forked ranks on this machine. Inventories are synthetic but shaped like real ones
(two committed generations, every field a real entry has); nothing else of a snapshot is involved.

    python scripts/bench_locate.py --worlds 4 8 16 --group 4

Printed per world size: a markdown table (bytes per rank, old / new, and the time of each), then the
same byte counts from the formulas at cluster sizes (computed, not run).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import pickle
import socket
import statistics
import time


def _entries(layout, rank: int, generations) -> list[dict]:
    k = layout.data
    return [{"name": f"loomtrain-smp-h{rank:020x}-{src:04x}{j:02x}{step:06x}", "size": 123_456_789, "src": src,
             "chunk": j, "step": step, "run": "run-0123456789ab", "attempt": attempt, "crc": 2_000_000_000 + src,
             "data_crcs": [1_000_000_000 + i for i in range(k)], "payload": 987_654_321 * k,
             "tensor_bytes": 987_000_000 * k, "signature": "0123456789abcdef"}
            for attempt, step in generations for src in range(layout.world) for j in range(layout.group_nodes)
            if layout.holder(src, j) == rank]


def _rank(rank: int, world: int, group: int, port: int, repeats: int, out) -> None:
    import torch.distributed as dist

    from loomtrain.comms import traffic
    from loomtrain.faulttol.layout import NodeLayout
    from loomtrain.faulttol.snapshot import Snapshotter
    from loomtrain.trainer.config import FaultTolConfig

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    traffic.install()
    ft = FaultTolConfig()
    ft.ranks_per_node, ft.ec_group_nodes, ft.ec_parity = 1, group, 1
    layout = NodeLayout.from_config(ft, world, world)
    import torch

    snaps = Snapshotter(layout, rank, "/nonexistent", "0123456789abcdef", str(rank), torch.device("cpu"),
                        run="run-0123456789ab", attempt=0)
    inventory = _entries(layout, rank, [(0, 40), (0, 42)])
    snaps._inventory = lambda: inventory

    @traffic.counted_as("snapshot")
    def old():
        every = [None] * world
        dist.all_gather_object(every, inventory, group=snaps.world_group)
        return every

    result = {}
    for name, fn in (("old", old), ("new", snaps.locate)):
        times = []
        for _ in range(repeats):
            dist.barrier()
            traffic.reset()
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        result[name] = (traffic.counts().get("snapshot", 0), statistics.median(times))
    result["entry_bytes"] = len(pickle.dumps(inventory)) / max(1, len(inventory))
    out.put((rank, result))
    dist.destroy_process_group()


def measure(world: int, group: int, repeats: int) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, world, group, port, repeats, q)) for r in range(world)]
    for p in procs:
        p.start()
    results = dict(q.get(timeout=300) for _ in procs)
    for p in procs:
        p.join()
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worlds", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--group", type=int, default=4, help="EC group size n (k = n - 1)")
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    print("| ranks | EC group | bytes sent per rank, all-gather of inventories | locate | ratio | time, all-gather "
          "| locate |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    entry = 0.0
    for world in a.worlds:
        r = measure(world, a.group, a.repeats)
        old = statistics.mean(v["old"][0] for v in r.values())
        new = statistics.mean(v["new"][0] for v in r.values())
        entry = statistics.mean(v["entry_bytes"] for v in r.values())
        print(f"| {world} | {a.group} | {old / 1e3:,.1f} KB | {new / 1e3:,.2f} KB | {old / new:.1f}x | "
              f"{statistics.median(v['old'][1] for v in r.values()) * 1e3:.1f} ms | "
              f"{statistics.median(v['new'][1] for v in r.values()) * 1e3:.1f} ms |")
    # Formulas (gloo ring all-gather / all-reduce): the old path sends (W-1) x one inventory (2 generations x n
    # entries, pickled) per rank; locate sends one all-reduced int64 per generation tried and 2(W-1)/W x the
    # W x n int32 table, plus n records of k + 4 int64 point to point.
    print(f"\nComputed from the formulas (one generation tried, {entry:.0f} B per pickled entry measured above):\n")
    print("| ranks | all-gather of inventories, per rank | locate, per rank |\n|---:|---:|---:|")
    for world in (1024, 8192, 16384):
        n, k = a.group, a.group - 1
        old = (world - 1) * 2 * n * entry
        new = 2 * (world - 1) / world * (4 * world * n + 8) + n * 8 * (k + 4)
        print(f"| {world:,} | {old / 1e6:,.1f} MB | {new / 1e3:,.0f} KB |")


if __name__ == "__main__":
    main()
