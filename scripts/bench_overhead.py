"""Tokens/s of loomtrain's trainer (one process) vs a plain PyTorch loop, same model/batch/threads, one run.

The plain loop is what a user would write by hand: the same Transformer, the same
batches from the same packed dataset, AdamW + clipping + the same LR schedule, no
metrics, no checkpoints, no process group. loomtrain runs its full loop (progress
metrics, all-reduces of a 1-rank group, stop-flag agreement). Both are timed over the
same steps after the same warm-up; runs alternate (plain, loomtrain, plain, ...) so
drift of the machine affects both. Target: ratio >= 0.95.

    python scripts/bench_overhead.py --steps 30 --repeats 3
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F


def plain_loop(exp, prepared, steps: int, warmup: int) -> float:
    from loomtrain.data.loader import PackedDataset, TrainBatches
    from loomtrain.trainer.models.llama.model import ModelArgs, Transformer
    from loomtrain.trainer.optim import build_optimizer, build_scheduler

    data = PackedDataset(prepared.train_prefix, exp.data.seq_len)
    batches = TrainBatches(data, exp.train.seed, exp.train.global_batch_size, 0, 0, 1)
    args = ModelArgs.from_config(exp.model, prepared.vocab_size, exp.data.seq_len)
    torch.manual_seed(exp.train.seed)
    model = Transformer(args)
    model.init_weights(exp.train.seed)
    opt = build_optimizer(model.parameters(), exp.optim, torch.device("cpu"))
    sched = build_scheduler(opt, exp.optim, exp.train.steps)
    start = None
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        [b] = batches.next_step()
        logits = model(b["input_ids"], b["position_ids"], b.get("doc_ids"))
        loss = F.cross_entropy(logits.flatten(0, 1).float(), b["labels"].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), exp.optim.grad_clip, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        loss.item()  # the trainer reads the loss every step too
    return steps * exp.train.global_batch_size * exp.data.seq_len / (time.perf_counter() - start)


def loomtrain_loop(exp, steps: int, warmup: int) -> float:
    from loomtrain.launch.train import run

    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        r = run(exp)
    assert r.last_step == warmup + steps
    with open(os.path.join(exp.train.output_dir, "metrics.jsonl")) as f:
        stamps = [json.loads(line)["time"] for line in f]
    # Wall clock from the end of the last warm-up step to the end of the last step: includes
    # everything the loop does between steps (metrics, stop-flag agreement, progress).
    return steps * exp.train.global_batch_size * exp.data.seq_len / (stamps[-1] - stamps[warmup - 1])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="tiny")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--set", dest="overrides", action="append", default=[])
    a = p.parse_args()

    from loomtrain.data.prepare import prepare
    from loomtrain.trainer.config import load_config

    torch.set_num_threads(a.threads)
    out = tempfile.mkdtemp(prefix="bench-overhead-")
    exp = load_config(a.config, a.overrides + [
        f"train.steps={a.steps + a.warmup}", "train.log_every=1", "train.eval_every=0", "train.progress=false",
        f"train.threads={a.threads}", "checkpoint.at_end=false", f"train.output_dir={out}",
        "logging.peak_tflops=1"])  # skip the CPU peak probe: it is not part of the step
    prepared = prepare(exp.data)
    plain, ours = [], []
    for i in range(a.repeats):
        plain.append(plain_loop(exp, prepared, a.steps, a.warmup))
        ours.append(loomtrain_loop(exp, a.steps, a.warmup))
        print(f"repeat {i + 1}: plain {plain[-1]:,.0f} tok/s   loomtrain {ours[-1]:,.0f} tok/s", flush=True)
    mp, mo = statistics.median(plain), statistics.median(ours)
    print()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {a.threads} threads")
    print(f"model: config '{a.config}' {' '.join(a.overrides)}; {a.steps} timed steps after {a.warmup} warm-up, "
          f"median of {a.repeats}")
    print("| loop | tokens/s (median) | ratio |")
    print("|---|---:|---:|")
    print(f"| plain PyTorch | {mp:,.0f} | 1.000 |")
    print(f"| loomtrain | {mo:,.0f} | {mo / mp:.3f} |")


if __name__ == "__main__":
    main()
