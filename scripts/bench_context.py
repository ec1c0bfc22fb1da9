"""Context-parallel attention on CPU: TokenRing vs ring vs Ulysses vs single-device, fast and slow links.

For each W (ranks, forked on this machine) and sequence length: forward+backward time
(median over repeats, the slowest rank each repeat) and bytes sent per rank of each
strategy, against single-device attention on the full sequence measured in the same run.
With ``--bandwidth-gbps`` the transfers also pass through the in-process link simulator
(latency + bytes/bandwidth per transfer batch, overlapping compute as a real link
would), so slow links can be compared on this machine. The cost model
(``parallel/cp/cost.py``) predicts the same table; the last column says whether it picked
the measured winner.

    python scripts/bench_context.py --worlds 2 4 --seqs 2048 4096 --bandwidth-gbps 0 1 0.1
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from loomtrain.launch.forked import run_ranks

STRATS = ("tokenring", "ring", "ulysses")


def _bench_rank(rank, world, seq, heads, kv_heads, dim, repeats, gbps, latency_us):
    import torch.distributed as dist

    from loomtrain.comms.link_sim import SimulatedLink
    from loomtrain.comms.p2p import P2P
    from loomtrain.parallel.cp import attention as cp

    dist.init_process_group("gloo")
    try:
        reverse = dist.new_group(list(range(world)))
        g = torch.Generator().manual_seed(0)
        q = torch.randn(1, seq, heads, dim, generator=g)
        k, v = (torch.randn(1, seq, kv_heads, dim, generator=g) for _ in range(2))
        dout = torch.randn(1, seq, heads, dim, generator=g)
        result = {}
        for name in cp.IMPLS:
            if name == "ulysses" and (heads % world or kv_heads % world):
                continue
            comm = SimulatedLink(latency_us * 1e-6, gbps * 1e9 / 8) if gbps else P2P()
            attn = cp.ContextParallelAttention(name, reverse_group=reverse, comm=comm)
            ql, kl, vl = (cp.shard_sequence(t).requires_grad_() for t in (q, k, v))
            dl = cp.shard_sequence(dout)
            times = []
            for i in range(repeats + 1):
                dist.barrier()
                comm.stats.reset()
                start = time.perf_counter()
                attn(ql, kl, vl).backward(dl)
                elapsed = torch.tensor([time.perf_counter() - start])
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # a step waits for the slowest rank
                if i:  # first run warms up
                    times.append(elapsed.item())
            result[name] = (statistics.median(times), comm.stats.bytes)
        return result
    finally:
        dist.destroy_process_group()


def _single_device(rank, seq, heads, kv_heads, dim, repeats):
    from loomtrain.parallel.cp.attention import _LocalAttention

    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, seq, heads, dim, generator=g).requires_grad_()
    k, v = (torch.randn(1, seq, kv_heads, dim, generator=g).requires_grad_() for _ in range(2))
    dout = torch.randn(1, seq, heads, dim, generator=g)
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        out, _ = _LocalAttention.apply(q, k, v, (0,), True, None)
        out.backward(dout)
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_flops(repeats: int) -> float:
    """Attention FLOP/s of one thread on this machine (for the cost model)."""
    from loomtrain.parallel.cp.cost import Shape, attention_flops

    seq = 2048
    t = run_ranks(_single_device, 0, seq, 8, 4, 64, repeats)[0]
    return attention_flops(Shape(1, seq, 8, 4, 64, 1)) / t


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    p.add_argument("--seqs", type=int, nargs="+", default=[2048, 4096, 8192])
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--bandwidth-gbps", type=float, nargs="+", default=[0.0, 1.0, 0.1],
                   help="simulated link bandwidths in Gbit/s; 0 = only the real (loopback) transfer")
    p.add_argument("--latency-us", type=float, default=50.0)
    a = p.parse_args()

    from loomtrain.parallel.cp import choose
    from loomtrain.parallel.cp.cost import Shape, predict_seconds

    torch.set_num_threads(1)
    flops = measure_flops(a.repeats)
    print(f"single-thread attention throughput: {flops / 1e9:.2f} GFLOP/s (cost-model input)\n")
    print("| W | seq | link | single-device s | tokenring s | ring s | ulysses s | model s (tr / ring / uly) "
          "| MB sent/rank (tr / ring / uly) | fastest (measured) | model picks |")
    print("|---|---:|---|---:|---:|---:|---:|---|---|---|---|")
    for world in a.worlds:
        for seq in a.seqs:
            single = run_ranks(_single_device, 0, seq, a.heads, a.kv_heads, a.head_dim, a.repeats)[0]
            for gbps in a.bandwidth_gbps:
                res = run_ranks(_bench_rank, world, world, seq, a.heads, a.kv_heads, a.head_dim, a.repeats, gbps,
                                a.latency_us, timeout=1800)
                times = {n: max(r[n][0] for r in res) for n in res[0]}
                mbytes = {n: max(r[n][1] for r in res) / 1e6 for n in res[0]}
                fastest = min(times, key=times.get)
                shape = Shape(1, seq, a.heads, a.kv_heads, a.head_dim, world)
                # Unshaped loopback measured here: ~5.6 Gbit/s (shared/design/TESTING.md).
                bw = (gbps or 5.6) * 1e9 / 8
                # W ranks share this machine's cores: each rank computes at flops * cores / W at most.
                per_rank = flops * min(1.0, (os.cpu_count() or 1) / world)
                pick = choose(shape, bw, a.latency_us * 1e-6, per_rank)
                model = predict_seconds(shape, bw, a.latency_us * 1e-6, per_rank)
                if a.heads % world or a.kv_heads % world:
                    model.pop("ulysses")
                modelled = " / ".join(f"{model[n]:.3f}" if n in model else "n/a" for n in STRATS)
                link = f"{gbps:g} Gbit/s sim" if gbps else "loopback"
                cells = " | ".join(f"{times[n]:.3f}" if n in times else "n/a" for n in STRATS)
                mb = " / ".join(f"{mbytes[n]:.1f}" if n in mbytes else "n/a" for n in STRATS)
                # A pick within 5% of the fastest is a tie on this noisy shared machine.
                ok = "yes" if pick == fastest else ("tie" if times[pick] <= 1.05 * times[fastest] else "no")
                print(f"| {world} | {seq} | {link} | {single:.3f} | {cells} | {modelled} | {mb} | {fastest} | {pick} ({ok}) |",
                      flush=True)


if __name__ == "__main__":
    main()
