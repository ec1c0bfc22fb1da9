"""Context parallelism across two network tiers on real sockets: 2 hosts x 2 ranks, fast inside a host,
shaped between hosts; measured step time of each cp strategy at cp=4 against the cost model's choice.

Four network namespaces (``launch/netns.py``), one per rank, all on one bridge; ranks 0, 1 form host A and
2, 3 host B. Each rank's link is an htb qdisc in both directions (its veth out, the bridge port in): traffic
with the other rank of its host goes unshaped (a node's NVLink), everything else at ``--rates`` (the NICs
between nodes), so every process group, whatever its members, gets the two tiers a cluster gives it.

Per rate: forward + backward time of causal attention (slowest rank) for ring, TokenRing, Ulysses over all 4
ranks and the two-dimensional Ulysses x ring / Ulysses x TokenRing with Ulysses inside a host (U = 2), and each
rank's attention compute alone at the kernel-call shape of each strategy (``cost.block_shape``: ring's chunk
pairs, the outer ring's larger ones on half the heads, Ulysses' whole sequence). The items run round robin:
``--repeats`` rounds of every item after one warm-up round, so drift on a shared machine hits every strategy
alike; the table gives the median and the spread [min–max]. The cost model (``parallel/cp/cost.py``) is given
the links measured in the same run (a 32 MiB transfer inside a host and across) and the measured attention rate
per call shape (``cost.block_rates``), and its choice (``parallel.cp.choose`` with the inner link: what
``cp_impl: auto`` does) is checked against the measured fastest (goal: within 10%); "one rate picks" is the
choice with one rate for every call (ring's), as the model had before. Needs root; every namespace is removed at
the end, also on failure.

    python scripts/bench_context_tiers.py --seq 4096 --rates 1000mbit 200mbit
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

STRATS = ("ring", "tokenring", "ulysses", "ulysses_ring", "ulysses_tokenring")
PORT = 29931


# ----------------------------------------------------------------------------- one rank (inside a namespace)
def _link_seconds(dist, torch, src: int, dst: int, nbytes: int) -> float:
    """Seconds to move ``nbytes`` from rank ``src`` to ``dst`` (every rank calls; the pair times it)."""
    buf = torch.empty(nbytes // 4)
    dist.barrier()
    start = time.perf_counter()
    if dist.get_rank() == src:
        dist.send(buf, dst)
        dist.recv(buf[:1], dst)  # the receiver's acknowledgement: the data has arrived
    elif dist.get_rank() == dst:
        dist.recv(buf, src)
        dist.send(buf[:1], src)
    elapsed = torch.tensor([time.perf_counter() - start if dist.get_rank() in (src, dst) else 0.0])
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return elapsed.item()


def _compute_items(args, rank: int, world: int, torch) -> dict:
    """{block shape: this rank's attention alone (forward + backward, no transfers), run as the strategy whose
    kernel calls have that shape runs it}: ring's and TokenRing's 2W+1 chunk-pair calls over all 4 ranks
    (``cost.block_shape``), the outer ring's over the 2 hosts on half the heads (Ulysses x ring / TokenRing,
    U = 2), Ulysses' one whole-sequence call on a quarter of the heads. Every one is 1/W of the attention's
    FLOPs: the cost model's rate at that shape is those FLOPs over the time."""
    from loomtrain.parallel.cp.attention import _chunk_ids, _LocalAttention, block_backward, block_forward
    from loomtrain.parallel.cp.cost import Shape, block_shape, two_dim_shapes

    g = torch.Generator().manual_seed(1)
    full = Shape(1, args.seq, args.heads, args.kv_heads, args.head_dim, world)

    def chunk_pairs(heads, kv_heads, ring_world, ring_rank):
        chunk = args.seq // (2 * ring_world)
        q, dout = (torch.randn(1, 2 * chunk, heads, args.head_dim, generator=g) for _ in range(2))
        k, v = (torch.randn(1, args.seq, kv_heads, args.head_dim, generator=g) for _ in range(2))
        mine, every = _chunk_ids(ring_rank, ring_world, "zigzag"), tuple(range(2 * ring_world))

        def run():
            out, lse = block_forward(q, k, v, mine, every, True, None)
            block_backward(dout, q, k, v, out, lse, mine, every, True, None)
        return run

    def whole_sequence(heads, kv_heads):
        q, k, v = (torch.randn(1, args.seq, h, args.head_dim, generator=g).requires_grad_()
                   for h in (heads, kv_heads, kv_heads))
        dout = torch.randn(1, args.seq, heads, args.head_dim, generator=g)
        held = tuple(c for r in range(world) for c in _chunk_ids(r, world, "zigzag"))  # the all-to-all's order

        def run():
            out, _ = _LocalAttention.apply(q, k, v, held, True, None)
            out.backward(dout)
        return run

    u = 2
    _, outer = two_dim_shapes(full, u)
    items = {block_shape(full, "ring"): chunk_pairs(args.heads, args.kv_heads, world, rank),
             block_shape(outer, "ring"): chunk_pairs(args.heads // u, args.kv_heads // u, world // u, rank // u)}
    if args.heads % world == 0 and args.kv_heads % world == 0:
        items[block_shape(full, "ulysses")] = whole_sequence(args.heads // world, args.kv_heads // world)
    return items


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from loomtrain.parallel.cp import strategy, two_dimensional
    from loomtrain.parallel.cp.attention import shard_sequence
    from loomtrain.parallel.cp.cost import Shape, attention_flops

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    result = {"links": {}, "seconds": {}, "rates": {}}
    nbytes = 32 * 2 ** 20
    _link_seconds(dist, torch, 0, 1, 2 ** 20)  # connections up
    _link_seconds(dist, torch, 1, 2, 2 ** 20)
    result["links"]["inside"] = nbytes / statistics.median(_link_seconds(dist, torch, 0, 1, nbytes) for _ in range(3))
    result["links"]["across"] = nbytes / statistics.median(_link_seconds(dist, torch, 1, 2, nbytes) for _ in range(3))

    g = torch.Generator().manual_seed(0)
    shape = (1, args.seq, args.heads, args.head_dim)
    q = torch.randn(*shape, generator=g)
    k, v = (torch.randn(1, args.seq, args.kv_heads, args.head_dim, generator=g) for _ in range(2))
    dout = torch.randn(*shape, generator=g)
    reverse = dist.new_group(list(range(world)))
    runs = {}  # name -> a callable: one forward + backward
    for name in STRATS:
        s = strategy(name)
        if two_dimensional(s):
            s = s.with_ulysses(2)
        if s.unsupported(args.heads, args.kv_heads, world):
            continue
        attn = s.make(None, reverse_group=reverse) if s.needs_reverse_group else s.make(None)
        ql, kl, vl = (shard_sequence(t).requires_grad_() for t in (q, k, v))
        runs[name] = lambda attn=attn, ql=ql, kl=kl, vl=vl, dl=shard_sequence(dout): attn(ql, kl, vl).backward(dl)
    blocks = _compute_items(args, rank, world, torch)
    runs.update({f"compute {b}": run for b, run in blocks.items()})
    # Round robin: every repeat runs every item once (its start rotating), so drift on this shared machine (other
    # processes, frequency) hits all of them alike; round 0 warms up and is not kept.
    names, times = list(runs), {n: [] for n in runs}
    for i in range(args.repeats + 1):
        for name in names[i % len(names):] + names[:i % len(names)]:
            dist.barrier()
            start = time.perf_counter()
            runs[name]()
            elapsed = torch.tensor([time.perf_counter() - start])
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # a step waits for the slowest rank
            if i:
                times[name].append(elapsed.item())
    result["seconds"] = {n: times[n] for n in runs if not n.startswith("compute")}
    per_rank = attention_flops(Shape(1, args.seq, args.heads, args.kv_heads, args.head_dim, 1)) / world
    result["rates"] = [[list(b), per_rank / statistics.median(times[f"compute {b}"]),
                        per_rank / min(times[f"compute {b}"])] for b in blocks]
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


# ----------------------------------------------------------------------------- the two tiers
def shape_links(cluster, rate: str | None) -> None:
    """Each rank's veth (out) and bridge port (in): the same-host peer unshaped, the rest at ``rate``."""
    hosts = list(cluster.hosts.values())
    for i, host in enumerate(hosts):
        peer = hosts[i ^ 1].address  # the other rank of its host
        port = f"lt{cluster.tag}p{i}"
        for ns, dev, match in ((host.namespace, host.interface, "dst"), (cluster.switch, port, "src")):
            tc = ["ip", "netns", "exec", ns, "tc"]
            subprocess.run(tc + ["qdisc", "del", "dev", dev, "root"], capture_output=True)
            if not rate:
                continue
            for cmd in (["qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "20"],
                        ["class", "add", "dev", dev, "parent", "1:", "classid", "1:10", "htb", "rate", "20gbit"],
                        ["class", "add", "dev", dev, "parent", "1:", "classid", "1:20", "htb", "rate", rate],
                        ["filter", "add", "dev", dev, "protocol", "ip", "parent", "1:", "prio", "1", "u32", "match",
                         "ip", match, f"{peer}/32", "flowid", "1:10"]):
                subprocess.run(tc + cmd, check=True, capture_output=True)


def run_rate(cluster, rate: str | None, args, port: int) -> dict:
    out = tempfile.NamedTemporaryFile(prefix="lt-tiers-", suffix=".json", delete=False).name
    shape_links(cluster, rate)
    master = cluster.hosts["r0"].address
    procs = []
    for i, name in enumerate(cluster.hosts):
        env = {"RANK": str(i), "WORLD_SIZE": "4", "MASTER_ADDR": master, "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1"}
        argv = [sys.executable, os.path.abspath(__file__), "--worker", "--out", out, "--seq", str(args.seq),
                "--heads", str(args.heads), "--kv-heads", str(args.kv_heads), "--head-dim", str(args.head_dim),
                "--repeats", str(args.repeats)]
        procs.append(cluster.spawn(name, argv, env=env, log=args.log))
    codes = [p.wait(timeout=1800) for p in procs]
    if any(codes):
        raise SystemExit(f"ranks exited with {codes} (log: {args.log})")
    with open(out) as f:
        result = json.load(f)
    os.unlink(out)
    return result


def modelled(result: dict, args, flops=None):
    """(modelled seconds per strategy, the strategy ``cp_impl: auto`` picks, its U) from the measured links and the
    measured attention rate at each strategy's kernel-call shape (``cost.block_rates``; ``flops``: another rate)."""
    from loomtrain.parallel.cp import choose, predict, splits
    from loomtrain.parallel.cp.cost import Shape, block_rates

    shape = Shape(1, args.seq, args.heads, args.kv_heads, args.head_dim, 4)
    across, inside = result["links"]["across"], result["links"]["inside"]
    # Measured with all 4 ranks computing at once on this machine's cores: no scaling by cores / ranks.
    flops = flops or block_rates({tuple(b): median for b, median, _ in result["rates"]})
    latency = args.latency_us * 1e-6
    model = predict(shape, across, latency, flops)
    model.update({b.name: b.seconds(shape, across, latency, flops) for b in splits(shape, inside) if b.ulysses == 2})
    pick = choose(shape, across, latency, flops, inner_bandwidth=inside)
    return model, getattr(pick, "name", pick), getattr(pick, "ulysses", 0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=10, help="rounds of every strategy (after one warm-up round)")
    p.add_argument("--rates", nargs="+", default=["none", "1000mbit", "200mbit"],
                   help="the link between hosts (tc rate), per direction; none = unshaped")
    p.add_argument("--latency-us", type=float, default=50.0, help="per-transfer latency given to the cost model")
    p.add_argument("--log", default="/tmp/bench_context_tiers.log")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if os.geteuid() != 0:
        raise SystemExit("bench_context_tiers: needs root (network namespaces and tc)")
    from loomtrain.launch.netns import HostCluster
    from loomtrain.parallel.cp.cost import Shape, block_shape

    print(f"cp=4 as 2 hosts x 2 ranks; seq {args.seq}, {args.heads}/{args.kv_heads} heads, head_dim "
          f"{args.head_dim}, fp32, forward + backward, {args.repeats} rounds (round robin, after a warm-up)\n")
    header = ("| link between hosts | inside / across MB/s | " + " | ".join(STRATS) +
              " | fastest | auto picks (measured s) | within 10% | one rate picks |")
    rows, rates = [], []
    with HostCluster(["r0", "r1", "r2", "r3"]) as cluster:
        for i, rate in enumerate(args.rates):
            t0 = time.time()
            result = run_rate(cluster, None if rate == "none" else rate, args, PORT + i)
            model, pick, u = modelled(result, args)
            ring = block_shape(Shape(1, args.seq, args.heads, args.kv_heads, args.head_dim, 4), "ring")
            one_pick = modelled(result, args, next(m for b, m, _ in result["rates"] if tuple(b) == ring))[1]
            spread = result["seconds"]
            got = {n: statistics.median(ts) for n, ts in spread.items()}
            fastest = min(got, key=got.get)
            ok = got[pick] <= 1.10 * got[fastest]
            cells = " | ".join(f"{got[n]:.3f} [{min(spread[n]):.3f}–{max(spread[n]):.3f}] ({model[n]:.3f})"
                               if n in got else "n/a" for n in STRATS)
            links = f"{result['links']['inside'] / 1e6:.0f} / {result['links']['across'] / 1e6:.0f}"
            rows.append(f"| {rate} | {links} | {cells} | {fastest} | {pick}{f' (U={u})' if u else ''} "
                        f"({got[pick]:.3f}) | {'yes' if ok else f'NO (+{got[pick] / got[fastest] - 1:.1%})'} "
                        f"| {one_pick} ({'yes' if got[one_pick] <= 1.10 * got[fastest] else 'no'}) |")
            rates.append(f"| {rate} | " + " | ".join(f"{m / 1e9:.1f} [{top / 1e9:.1f}]" for _, m, top in result["rates"])
                         + " |")
            print(f"{rate}: {json.dumps({'seconds': spread, 'model': model, 'links': result['links'], 'rates': result['rates'], 'pick': pick})} "
                  f"({time.time() - t0:.0f} s)", flush=True)
    print("\nmeasured seconds, median [min–max] of the rounds (modelled in brackets):\n")
    print(header)
    print("|---|---|" + "---:|" * len(STRATS) + "---|---|---|---|")
    print("\n".join(rows))
    shapes = " | ".join(f"{tuple(b)}" for b, _, _ in result["rates"])
    print(f"\nattention GFLOP/s per rank, 4 ranks at once, median [best], by kernel call (query tokens, key tokens, "
          f"heads):\n\n| link between hosts | {shapes} |\n|---|" + "---:|" * len(result["rates"]))
    print("\n".join(rates))


if __name__ == "__main__":
    main()
