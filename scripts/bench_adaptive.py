"""Adaptive sequence parallelism: planner quality and speed under one declared cost model, and CPU training.

Cost model (declared, for every planner section): ``parallel.sp_cost.SequenceCost`` for a Llama-3-8B-like
model (32 layers, 32/8 heads of 128, bf16) on H100-class devices: attention alpha1 = 2.3e-9 s/token^2
and alpha2 = 1.2e-4 s/token (6N FLOPs at 400 TFLOP/s), 32K tokens per device, 8 devices per node at
200 GB/s per direction, 25 GB/s between nodes, 10 us per transfer. Each group's attention strategy is
the cost model's choice (ulysses | ring | tokenring; none for one device).

- ``quality``: 1,000 random instances with <= 8 ranks and <= 8 sequences (lengths Pareto-distributed,
  512 to 256K tokens): makespan against the optimum by enumeration (``exact_makespan``).
- ``longtail``: steps of long-tailed batches (the standard-library documents as byte tokens, and a Pareto
  tail to 512K tokens) at 64-1024 ranks, each step's budget half the pool's memory: makespan of the
  planner vs the best single static degree (powers of two dividing the pool, longest-first to the
  least-loaded group), vs FlexSP's space (powers of two, Ulysses only, our solver) and vs a
  Megatron-style greedy (power-of-two groups per sequence, balanced on s^2/d; its makespan evaluated
  with the same cost model, ranks' loads summed, waits between overlapping groups ignored, which
  favours it).
- ``speed``: solve time p50/p99 (one core) for 512 sequences on 64 ranks and 4,096 on 1,024.
- ``stall``: the longest stall of a thread beside the planner while it solves its slowest (MILP) steps.
- ``train``: 4 forked CPU ranks on the standard-library documents: step time of ``sp_mode: adaptive`` vs
  static cp=4 and cp=2 over the same steps, and the planner's predicted makespan vs the measured step.
- ``sharded``: 4 forked CPU ranks: ``sp_mode: adaptive`` vs ``adaptive_sharded``, measured peak memory
  (``mem_peak_mib``), ``plan``'s estimate and step time.

    python scripts/bench_adaptive.py quality longtail speed
    python scripts/bench_adaptive.py train
    python scripts/bench_adaptive.py sharded   # adaptive vs adaptive_sharded: peak memory and step time
    ip netns exec slow python scripts/bench_adaptive.py train --link-gbps 0.2   # shaped loopback (TESTING.md)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time

import numpy as np

CAPACITY = 32 * 1024


def declared_cost(impls=("tokenring", "ring", "ulysses")):
    from loomtrain.parallel.sp.cost import SequenceCost

    return SequenceCost(alpha1=2.3e-9, alpha2=1.2e-4, heads=32, kv_heads=8, head_dim=128, layers=32, elem_bytes=2,
                        intra_bw=200e9, inter_bw=25e9, latency_s=10e-6, ranks_per_node=8, impls=impls)


def megatron_makespan(lengths, world, T):
    """Power-of-two group per sequence (smallest that fits), greedy on s^2/d onto aligned rank blocks."""
    est = np.zeros(world)
    true = np.zeros(world)
    seqs = []
    for L in lengths:
        d = 1
        while -(-L // d) > CAPACITY:
            d *= 2
        if d > world:
            return math.inf
        seqs.append((L * L / d, L, d))
    for _, L, d in sorted(seqs, reverse=True):
        blocks = est[: world // d * d].reshape(-1, d).max(axis=1)
        b = int(blocks.argmin())
        est[b * d:(b + 1) * d] += L * L / d
        true[b * d:(b + 1) * d] += T(L, d)
    return float(true.max())


def pareto_batch(rng, budget, alpha=1.1, lo=512, hi=512 * 1024):
    out, total = [], 0
    while total < budget:
        L = int(min(hi, lo * (1 - rng.random()) ** (-1 / alpha)))
        out.append(L)
        total += L
    return out


def stdlib_batches(budget, steps, seed=0):
    from loomtrain.data.corpus import read_documents

    lengths = [len(t.encode()) for _, t in read_documents("stdlib", "*.py")]
    rng = random.Random(seed)
    for _ in range(steps):
        rng.shuffle(lengths)
        out, total = [], 0
        for L in lengths:
            if total + L > budget:
                break
            out.append(L)
            total += L
        yield out


def quality(args):
    from loomtrain.parallel.sp.planner import exact_makespan, plan_groups

    T = declared_cost()
    rng = random.Random(0)
    ratios, greedy = [], []
    start = time.perf_counter()
    for k in range(args.instances):
        world, n = rng.randint(1, 8), rng.randint(1, 8)
        lengths = [min(int(512 * (1 - rng.random()) ** (-1 / 1.0)), CAPACITY * world, 256 * 1024) for _ in range(n)]
        opt = exact_makespan(lengths, world, CAPACITY, T)
        ratios.append(plan_groups(lengths, world, CAPACITY, T, ranks_per_node=8).makespan / opt)
        greedy.append(plan_groups(lengths, world, CAPACITY, T, ranks_per_node=8, exact=False).makespan / opt)
    print(f"\n### quality: {args.instances} instances (<= 8 ranks, <= 8 sequences), {time.perf_counter() - start:.0f} s\n")
    print("| planner | within 1% of optimum | within 0.1% | worst ratio | mean ratio |")
    print("|---|---:|---:|---:|---:|")
    for name, r in (("plan_groups (greedy + MILP refinement)", ratios), ("greedy + local search only", greedy)):
        r = np.asarray(r)
        print(f"| {name} | {100 * np.mean(r <= 1.01):.1f}% | {100 * np.mean(r <= 1.001):.1f}% | {r.max():.4f} | "
              f"{r.mean():.4f} |")


def longtail(args):
    from loomtrain.parallel.sp.planner import plan_groups, static_makespan

    T = declared_cost()
    T_uly = declared_cost(impls=("ulysses",))
    print("\n### long-tailed batches (makespan in s per step; ratio = other / adaptive, higher is better for "
          "adaptive)\n")
    print("| batch | ranks | seqs/step | adaptive s | best static (d) | x | FlexSP space s | x | Megatron greedy s | x |")
    print("|---|---:|---:|---:|---|---:|---:|---:|---:|---:|")
    for world in args.worlds:
        budget = world * CAPACITY // 2
        rng = random.Random(world)
        sources = {"stdlib docs": list(stdlib_batches(budget, args.steps, seed=world)),
                   "Pareto to 512K": [pareto_batch(rng, budget) for _ in range(args.steps)]}
        for name, batches in sources.items():
            rows = []
            for lengths in batches:
                a = plan_groups(lengths, world, CAPACITY, T, ranks_per_node=8).makespan
                statics = {d: static_makespan(lengths, world, CAPACITY, T, d) for d in (2 ** k for k in range(11)) if d <= world}
                d_best = min(statics, key=statics.get)
                pow2 = [2 ** k for k in range(11) if 2 ** k <= world]
                f = plan_groups(lengths, world, CAPACITY, T_uly, degrees=pow2, ranks_per_node=8).makespan
                m = megatron_makespan(lengths, world, T)
                rows.append((len(lengths), a, statics[d_best], d_best, f, m))
            n, a, s, d, f, m = (statistics.median(c) for c in zip(*rows))
            ds = sorted({r[3] for r in rows})
            print(f"| {name} | {world} | {n:.0f} | {a:.3f} | {s:.3f} ({'/'.join(map(str, ds))}) | {s / a:.2f} | "
                  f"{f:.3f} | {f / a:.2f} | {m:.3f} | {m / a:.2f} |", flush=True)


def speed(args):
    from loomtrain.parallel.sp.planner import plan_groups

    print("\n### solve time (one core)\n")
    print("| sequences | ranks | p50 ms | p99 ms | max ms | instances |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n, world, reps in ((512, 64, args.speed_reps), (4096, 1024, max(3, args.speed_reps // 4))):
        rng = random.Random(n)
        times = []
        for _ in range(reps):
            lengths = [min(int(512 * (1 - rng.random()) ** (-1 / 1.1)), 512 * 1024) for _ in range(n)]
            start = time.perf_counter()
            plan_groups(lengths, world, CAPACITY, declared_cost(), ranks_per_node=8)  # fresh cost-model cache
            times.append(1000 * (time.perf_counter() - start))
        times.sort()
        p99 = times[min(len(times) - 1, int(math.ceil(0.99 * len(times))) - 1)]
        print(f"| {n} | {world} | {statistics.median(times):.0f} | {p99:.0f} | {max(times):.0f} | {reps} |", flush=True)


def stall(args):
    """The training thread's longest stall while the prefetch thread plans (the MILP's worst case: 8 sequences
    on 8 ranks): HiGHS releases the GIL, so the other thread waits at most a switch interval."""
    import threading

    from loomtrain.parallel.sp.planner import plan_groups

    rng = random.Random(3)
    instances = [[min(int(512 * (1 - rng.random()) ** (-1 / 1.1)), 256 * 1024) for _ in range(8)]
                 for _ in range(args.speed_reps)]
    solve_s = []
    for lengths in instances:  # alone, to find the slowest instances
        start = time.perf_counter()
        plan_groups(lengths, 8, CAPACITY, declared_cost())
        solve_s.append(time.perf_counter() - start)
    slow = [instances[i] for i in sorted(range(len(instances)), key=solve_s.__getitem__)[-5:]]
    done = threading.Event()

    def solve():
        for lengths in slow:
            plan_groups(lengths, 8, CAPACITY, declared_cost())
        done.set()

    gaps, thread = [], threading.Thread(target=solve)
    last = time.perf_counter()
    thread.start()
    while not done.is_set():
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
    thread.join()
    print("\n### the training thread while a plan is solved beside it (8 sequences, 8 ranks, the 5 slowest of "
          f"{len(instances)})\n")
    print("| slowest solve alone s | longest main-thread stall ms | Python switch interval ms |")
    print("|---:|---:|---:|")
    print(f"| {max(solve_s):.2f} | {1000 * max(gaps):.1f} | {1000 * sys.getswitchinterval():.0f} |")


def _train_rank(rank, overrides):
    from loomtrain.parallel.sp import modes as hybrid_dp
    from loomtrain.trainer.config import load_config
    from loomtrain.launch.train import run

    predicted = []
    original = hybrid_dp.AdaptiveBatches.plan

    def plan(self, position=None):
        out = original(self, position)
        predicted.append(out[0].makespan)
        return out

    hybrid_dp.AdaptiveBatches.plan = plan
    exp = load_config("tiny", overrides)
    run(exp)
    with open(os.path.join(exp.train.output_dir, "metrics.jsonl")) as f:
        times = [json.loads(line)["step_time_s"] for line in f if "step_time_s" in line]
    return times, predicted


def train(args):
    from loomtrain.launch.forked import run_ranks

    base = ["model.dim=128", "model.n_layers=2", "model.n_heads=8", "model.n_kv_heads=4", "train.progress=false",
            "train.eval_every=0", "train.threads=1", "checkpoint.at_end=false", "data.batching=documents",
            f"train.global_batch_tokens={args.budget}", f"data.max_doc_tokens={args.max_doc}", f"train.steps={args.train_steps}",
            "train.log_every=1", f"parallel.cp_link_gbps={args.link_gbps}"]
    layouts = {"adaptive, cp=4's memory": ["parallel.sp_mode=adaptive", f"data.seq_len={args.max_doc // 4}"],
               "adaptive, cp=2's memory": ["parallel.sp_mode=adaptive", f"data.seq_len={args.max_doc // 2}"],
               "static cp=4": ["parallel.cp=4", "parallel.dp_shard=1", f"data.seq_len={args.max_doc}"],
               "static cp=2 x dp=2": ["parallel.cp=2", "parallel.dp_shard=2", f"data.seq_len={args.max_doc}"]}
    print(f"\n### CPU training, 4 forked ranks on 2 cores: stdlib documents (byte tokens), <= {args.budget} tokens/step, "
          f"pieces <= {args.max_doc}; median step time over steps 2-{args.train_steps}\n")
    print("| layout | step s (median) | vs adaptive (cp=4's memory) | planner predicted s (median) |")
    print("|---|---:|---:|---:|")
    results = {}
    for name, extra in layouts.items():
        with tempfile.TemporaryDirectory() as out:
            res = run_ranks(_train_rank, 4, base + extra + [f"train.output_dir={out}"], timeout=3600)
        times, predicted = res[0]
        results[name] = (statistics.median(times[1:]), statistics.median(predicted[1:]) if predicted else None)
    adaptive = results["adaptive, cp=4's memory"][0]
    for name, (t, p) in results.items():
        print(f"| {name} | {t:.3f} | {t / adaptive:.2f} | {'' if p is None else f'{p:.3f}'} |")


def _sharded_rank(rank, overrides):
    from bench_memory import fix_malloc
    from loomtrain.launch.train import run
    from loomtrain.trainer.config import load_config

    fix_malloc()  # the resident size follows the live tensors, not what malloc keeps cached
    exp = load_config("tiny", overrides)
    run(exp)
    with open(os.path.join(exp.train.output_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    rows = [r for r in rows if "step_time_s" in r]
    return [r["step_time_s"] for r in rows], [r["mem_peak_mib"] for r in rows]


def sharded(args):
    """``adaptive`` (the whole model gathered over the step, unsharded gradients) against ``adaptive_sharded``
    (waves of one row per rank, FSDP resharding and reduce-scattering after every pass): the measured peak
    (``mem_peak_mib``: the busiest rank's peak resident set, interpreter included), ``plan``'s estimate and the
    step time, 4 forked CPU ranks, the same documents and plans."""
    from loomtrain.launch.forked import run_ranks
    from loomtrain.launch.memory import estimate
    from loomtrain.launch.plan import planned_model_args
    from loomtrain.trainer.checks import check_experiment
    from loomtrain.trainer.config import load_config

    base = ["model.dim=512", "model.n_layers=8", "model.n_heads=8", "model.n_kv_heads=4", "model.vocab_size=4096",
            "train.progress=false", "train.eval_every=0", "train.threads=1", "checkpoint.at_end=false",
            "data.batching=documents", f"train.global_batch_tokens={args.budget}",
            f"data.max_doc_tokens={args.max_doc}", f"data.seq_len={args.max_doc // 4}",
            f"train.steps={args.train_steps}", "train.log_every=1", "parallel.dp_shard=4",
            "parallel.activation_checkpoint=full", "parallel.sp_alpha1=1e-9", "parallel.sp_alpha2=2e-6"]
    print(f"\n### Sharded adaptive pools, 4 forked CPU ranks on 2 cores: stdlib documents, <= {args.budget} "
          f"tokens/step, pieces <= {args.max_doc}, {args.max_doc // 4} tokens per rank; 8 layers x 512, full "
          f"checkpointing; median over steps 2-{args.train_steps}\n")
    print("| sp_mode | step s (median) | measured peak MiB (max over steps) | plan's estimate MiB | "
          "gathered params + unsharded grads in the estimate MiB |")
    print("|---|---:|---:|---:|---:|")
    for mode in ("adaptive", "adaptive_sharded"):
        ov = base + [f"parallel.sp_mode={mode}"]
        exp = load_config("tiny", ov)
        margs, _ = planned_model_args(exp)
        est = estimate(exp, margs, check_experiment(exp, 4, 4, "cpu"), "cpu")
        whole = est["parts"].get("FSDP gathered parameters", 0) + est["parts"].get(
            "accumulation gradients (unsharded fp32)", 0)
        with tempfile.TemporaryDirectory() as out:
            res = run_ranks(_sharded_rank, 4, ov + [f"train.output_dir={out}"], timeout=3600)
        times, peaks = res[0]
        print(f"| {mode} | {statistics.median(times[1:]):.3f} | {max(peaks):.0f} | {est['peak'] / 2**20:.0f} | "
              f"{whole / 2**20:.0f} |", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", nargs="+", choices=("quality", "longtail", "speed", "stall", "train", "sharded"))
    p.add_argument("--instances", type=int, default=1000)
    p.add_argument("--worlds", type=int, nargs="+", default=[64, 256, 1024])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--speed-reps", type=int, default=40)
    p.add_argument("--budget", type=int, default=16384)
    p.add_argument("--max-doc", type=int, default=4096)
    p.add_argument("--train-steps", type=int, default=6)
    p.add_argument("--link-gbps", type=float, default=100.0,
                   help="train: the link speed the cost models are told (parallel.cp_link_gbps)")
    args = p.parse_args()
    for what in args.what:
        globals()[what](args)


if __name__ == "__main__":
    main()
