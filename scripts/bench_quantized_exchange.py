"""Bytes per parameter per worker of DiLoCo's quantized outer average, today's all-gather against the two-stage
reduce-scatter (``dp_sync.diloco.exchange``), counted at the transport (``comms/traffic.py``) over real gloo
process groups of M forked ranks, and the error of each against the exact fp32 mean.

    python scripts/bench_quantized_exchange.py --workers 2 4 8 --numel 1000000

Each worker's pseudo-gradient is synthetic: one Gaussian component shared by all workers plus one of its own,
of equal variance (workers' pseudo-gradients agree in part, as real ones do). Printed: a markdown table of the
measured figures, then the formulas at larger M (computed, not run).
"""
from __future__ import annotations

import argparse


def _deltas(rank: int, numel: int):
    import torch

    common = torch.randn(numel, generator=torch.Generator().manual_seed(0))
    own = torch.randn(numel, generator=torch.Generator().manual_seed(1 + rank))
    return common + own


def _rank(rank: int, world: int, numel: int, kinds):
    import torch.distributed as dist

    from loomtrain.comms import traffic
    from loomtrain.parallel.dp_sync.quantize import PendingMean
    from loomtrain.parallel.dp_sync.sharded import PendingShardedMean

    dist.init_process_group("gloo")
    try:
        traffic.install()
        exact = sum(_deltas(r, numel) for r in range(world)) / world
        mine = _deltas(rank, numel)
        rows = {}
        for kind in kinds:
            for exchange in ("all_gather", "reduce_scatter"):
                traffic.reset()
                with traffic.counted_as("dp_sync"):
                    if exchange == "all_gather":
                        mean = PendingMean(mine, kind, dist.group.WORLD).wait()
                    else:
                        [part] = PendingShardedMean([mine], kind, dist.group.WORLD).parts()
                        mean = part.wait()
                rows[(kind, exchange)] = (traffic.counts()["dp_sync"] / numel,
                                          ((mean - exact).norm() / exact.norm()).item())
        return rows
    finally:
        dist.destroy_process_group()


def main() -> None:
    from loomtrain.launch.forked import run_ranks
    from loomtrain.parallel.dp_sync.quantize import BLOCK, wire_bytes
    from loomtrain.parallel.dp_sync.sharded import bytes_per_value

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--numel", type=int, default=1_000_000)
    ap.add_argument("--kinds", nargs="+", default=["fp4", "fp4_e3m0", "int8"])
    args = ap.parse_args()

    print("| M | kind | exchange | bytes/param/worker (measured) | bf16 ring 4(M-1)/M | fp32 ring 8(M-1)/M "
          "| rel. L2 error of the mean |")
    print("|---:|---|---|---:|---:|---:|---:|")
    for world in args.workers:
        rows = run_ranks(_rank, world, world, args.numel, args.kinds)[0]
        for (kind, exchange), (per_param, err) in rows.items():
            print(f"| {world} | {kind} | {exchange} | {per_param:.4f} | {4 * (world - 1) / world:.4f} | "
                  f"{8 * (world - 1) / world:.4f} | {err:.4f} |")
    q = wire_bytes(BLOCK, "fp4") / BLOCK
    print("\nFormulas (fp4, no padding): all_gather (M-1) * q, reduce_scatter 2 (M-1)/M * q, q = 0.5625\n")
    print("| M | all_gather | reduce_scatter | bf16 ring |")
    print("|---:|---:|---:|---:|")
    for world in (2, 4, 7, 8, 16, 64, 1024):
        print(f"| {world} | {(world - 1) * q:.4f} | {bytes_per_value('fp4', world):.4f} | "
              f"{4 * (world - 1) / world:.4f} |")


if __name__ == "__main__":
    main()
