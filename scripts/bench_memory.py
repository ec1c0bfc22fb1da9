"""``plan``'s per-rank memory estimate against the peak measured while training, on CPU, 4 ranks.

Each layout trains a few steps of one model (fp32, no activation checkpointing) on 4 forked
gloo ranks. Measured: growth of each rank's peak resident memory (VmHWM) from just before the
first step to the end, i.e. gradients, AdamW state, FSDP's gathered parameters and
accumulation buffers, activations and logits (the parameter shards already exist before).
Estimated: ``launch.plan.memory_estimate`` for the same experiment, minus its parameter line.
CPU resident memory also holds allocator slack and gloo buffers, so this checks the model's
terms and their scaling with the layout, not a GPU's exact figure.

    python scripts/bench_memory.py
"""
from __future__ import annotations

import argparse
import os
import tempfile

MODEL = ["model.dim=512", "model.n_layers=4", "model.n_heads=8", "model.n_kv_heads=4", "data.seq_len=512",
         "train.global_batch_size=8", "train.steps=3", "train.eval_every=0", "train.progress=false",
         "train.threads=1", "checkpoint.at_end=false", "logging.peak_tflops=1", "train.log_every=100"]
LAYOUTS = {
    "dp_shard=4": ["parallel.dp_shard=4"],
    "tp=2 x dp_shard=2": ["parallel.tp=2", "parallel.dp_shard=2"],
    "dp_shard=4, 2 micro-batches": ["parallel.dp_shard=4", "train.micro_batch_size=1"],
    "pp=2 x dp_shard=2": ["parallel.pp=2", "parallel.dp_shard=2", "train.microbatches=2",
                          "parallel.pp_schedule=gpipe"],
}


def _kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _measure(rank, overrides):
    from loomtrain.launch.env import init_distributed
    from loomtrain.trainer import train as train_mod
    from loomtrain.trainer.config import load_config

    exp = load_config("tiny", overrides)
    env = init_distributed(exp.parallel)
    train_mod.set_threads(exp, env)
    trainer = train_mod.Trainer(exp, env)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # peak := current
    before = _kib("VmRSS")
    for _ in range(exp.train.steps):
        trainer.train_step()
    return (_kib("VmHWM") - before) * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.parse_args()
    from loomtrain.data.prepare import prepare
    from loomtrain.launch.forked import run_ranks
    from loomtrain.launch.plan import memory_estimate
    from loomtrain.parallel.mesh import ParallelDims
    from loomtrain.trainer.config import DataConfig, load_config
    from loomtrain.trainer.models.llama.model import ModelArgs

    tmp = tempfile.mkdtemp(prefix="bench_memory_")
    prepared = prepare(DataConfig(corpus="stdlib", max_documents=300), out_prefix=os.path.join(tmp, "c"),
                       writer="builtin")
    print("| layout | estimate (MiB) | measured peak growth, max over ranks (MiB) | error |")
    print("|---|---|---|---|")
    for name, layout in LAYOUTS.items():
        ov = MODEL + layout + [f"data.prepared={os.path.join(tmp, 'c')}", f"train.output_dir={tmp}/{len(name)}"]
        exp = load_config("tiny", ov)
        dims = ParallelDims.from_config(exp.parallel, 4)
        args = ModelArgs.from_config(exp.model, prepared.vocab_size, exp.data.seq_len)
        est = memory_estimate(exp, args, dims, args.vocab_size)
        want = sum(v for k, v in est.items() if k not in ("parameters", "activations (checkpointed)"))
        got = max(run_ranks(_measure, 4, ov, timeout=900))
        print(f"| {name} | {want / 2**20:.0f} | {got / 2**20:.0f} | {100 * (want - got) / got:+.0f}% |", flush=True)


if __name__ == "__main__":
    main()
