"""Tiled MLP (``parallel.tiled_mlp_tokens``) at a long sequence on CPU: peak memory and step time against untiled.

One process trains a small Llama (dim 256, 4 layers, SwiGLU ffn_hidden 704) on one sequence of ``--seq`` tokens
per step, for each activation checkpointing mode with and without the tiled MLP, each configuration in a fresh
forked process. Measured: the growth of the process's peak resident memory (VmHWM, reset just before the first
step) over the steps, i.e. gradients, AdamW state, activations and logits (the parameters exist before), and the
median step time after the first step. The loss and gradient norm of the last step are printed to show the runs
train alike (tests/test_activation_memory.py checks 1e-5; here they are a sanity column).

    python scripts/bench_tiled_mlp.py [--seq 8192] [--tiled-tokens 1024] [--steps 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

MODEL = ["model.dim=256", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=2", "train.global_batch_size=1",
         "train.eval_every=0", "train.progress=false", "train.threads=1", "checkpoint.at_end=false",
         "train.log_every=100", "optim.warmup_steps=1"]
MODES = ["none", "full", "offload"]


def _measure(rank, overrides, steps):
    """(peak memory growth in bytes, median step time, last loss, last gradient norm) of ``steps`` steps."""
    from bench_memory import _kib  # scripts/ is on the path of a script run from it

    from loomtrain.launch.env import init_distributed
    from loomtrain.trainer import train as train_mod
    from loomtrain.trainer.config import load_config
    from loomtrain.trainer.metrics import PeakMemory

    exp = load_config("tiny", overrides)
    env = init_distributed(exp.parallel)
    train_mod.set_threads(exp, env)
    trainer = train_mod.Trainer(exp, env)
    peak = PeakMemory(env.device)  # VmHWM := the current RSS
    if not peak.resettable:
        raise SystemExit("needs Linux's /proc/self/clear_refs to reset the peak resident memory")
    before, times = _kib("VmRSS") * 1024, []
    for _ in range(steps):
        start = time.perf_counter()
        loss, norm = trainer.train_step()
        times.append(time.perf_counter() - start)
    return peak.read_mib() * 2 ** 20 - before, statistics.median(times[1:] or times), float(loss), float(norm)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--tiled-tokens", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=3)
    a = ap.parse_args()
    from loomtrain.data.prepare import prepare
    from loomtrain.launch.forked import run_ranks
    from loomtrain.trainer.config import DataConfig

    tmp = tempfile.mkdtemp(prefix="bench_tiled_mlp_")
    prepare(DataConfig(corpus="stdlib", max_documents=300), out_prefix=os.path.join(tmp, "c"), writer="builtin")
    base = MODEL + [f"data.seq_len={a.seq}", f"train.steps={a.steps}", f"data.prepared={os.path.join(tmp, 'c')}"]
    print(f"seq {a.seq} tokens, one process, tiles of {a.tiled_tokens} tokens")
    print("| activation_checkpoint | tiled MLP | peak memory growth (MiB) | vs untiled | step (s) | vs untiled | loss | grad norm |")
    print("|---|---|---|---|---|---|---|---|")
    for mode in MODES:
        untiled = None
        for tiles in (0, a.tiled_tokens):
            ov = base + [f"parallel.activation_checkpoint={mode}", f"parallel.tiled_mlp_tokens={tiles}",
                         f"train.output_dir={tmp}/{mode}_{tiles}"]
            peak, step, loss, norm = run_ranks(_measure, 0, ov, a.steps, timeout=3600)[0]
            untiled = untiled or (peak, step)
            print(f"| {mode} | {tiles or 'off'} | {peak / 2**20:.0f} | {peak / untiled[0]:.2f}x | {step:.2f} | "
                  f"{step / untiled[1]:.2f}x | {loss:.5f} | {norm:.5f} |", flush=True)


if __name__ == "__main__":
    main()
