"""Measured pipeline bubble of each schedule vs theory, 4 stages on gloo.

Each stage's forward sleeps ``--fwd-ms`` and its backward ``--bwd-ms`` per microbatch (split
evenly over a rank's virtual stages for interleaved 1F1B), so 4 stage processes on a
2-core machine behave like 4 devices: what is measured is torch.distributed.pipelining's
schedule (ordering, blocking sends/receives, gloo latency), not CPU contention. Measured
bubble = 1 - busy / step time, busy = microbatches x (fwd + bwd); theory (p-1)/(m+p-1)
for GPipe and 1F1B, (p-1)/v / (m + (p-1)/v) for interleaved 1F1B with v stages per rank.

    python scripts/bench_pipeline.py --microbatches 4 8 16 --repeats 3
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

PP = 4


class _Busy(torch.autograd.Function):
    """Identity that occupies its stage for a fixed time forward and backward."""

    @staticmethod
    def forward(ctx, x, fwd_s, bwd_s):
        ctx.bwd_s = bwd_s
        time.sleep(fwd_s)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        time.sleep(ctx.bwd_s)
        return grad, None, None


class BusyStage(torch.nn.Module):
    def __init__(self, fwd_s: float, bwd_s: float):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))
        self.fwd_s, self.bwd_s = fwd_s, bwd_s

    def forward(self, x):
        return _Busy.apply(x * self.w, self.fwd_s, self.bwd_s)


def _rank(rank, schedule, microbatches, virtual, fwd_s, bwd_s, repeats):
    import torch.distributed as dist
    from torch.distributed import pipelining

    dist.init_process_group("gloo")
    n_stages = PP * virtual
    ids = [rank + i * PP for i in range(virtual)]
    stages = [pipelining.PipelineStage(BusyStage(fwd_s / virtual, bwd_s / virtual), s, n_stages,
                                       torch.device("cpu")) for s in ids]
    cls = {"gpipe": pipelining.ScheduleGPipe, "1f1b": pipelining.Schedule1F1B,
           "interleaved_1f1b": pipelining.ScheduleInterleaved1F1B}[schedule]
    sched = cls(stages if virtual > 1 else stages[0], n_microbatches=microbatches,
                loss_fn=lambda y, t: (y - t).pow(2).mean())
    x = torch.randn(microbatches, 16)
    times = []
    for i in range(repeats + 1):
        dist.barrier()
        t0 = time.perf_counter()
        sched.step(*((x,) if 0 in ids else ()), target=x if n_stages - 1 in ids else None,
                   losses=[] if n_stages - 1 in ids else None)
        dist.barrier()
        if i:  # the first step also infers shapes
            times.append(time.perf_counter() - t0)
    dist.destroy_process_group()
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--microbatches", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--fwd-ms", type=float, default=20.0)
    p.add_argument("--bwd-ms", type=float, default=40.0)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()

    from loomtrain.launch.forked import run_ranks
    from loomtrain.parallel.pipeline import bubble_fraction

    fwd, bwd = a.fwd_ms / 1000, a.bwd_ms / 1000
    print(f"{PP} pipeline ranks (gloo, forked), per microbatch and rank: forward {a.fwd_ms:g} ms, backward "
          f"{a.bwd_ms:g} ms (sleep); median of {a.repeats} steps\n")
    print("| schedule | stages | microbatches | step time | measured bubble | theory | measured / theory |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for schedule, virtual in (("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 2)):
        for m in a.microbatches:
            step = max(run_ranks(_rank, PP, schedule, m, virtual, fwd, bwd, a.repeats, timeout=600))
            measured = 1 - m * (fwd + bwd) / step
            theory = bubble_fraction(schedule, PP, m, virtual)
            print(f"| {schedule} | {PP * virtual} | {m} | {step * 1000:.0f} ms | {100 * measured:.1f}% | "
                  f"{100 * theory:.1f}% | {measured / theory:.2f} |", flush=True)


if __name__ == "__main__":
    main()
