"""``plan``'s peak memory per rank (``launch/memory.py``) against the peak measured while training, on CPU.

Each case trains a few steps of one small model (fp32) in the real trainer, on one process or on 4 forked gloo
ranks. What is measured, per rank: the largest resident set size of the process during the steps (``VmHWM``,
reset before each step by writing 5 to ``/proc/self/clear_refs``) minus its resident size just before the trainer
was built (Python, torch's libraries and the gloo process group are left out; the parameters, gradients, optimizer
state, activations, logits, communication buffers and everything else the trainer allocates are in). glibc's
malloc is told (``mallopt``) to serve every block of 64 KiB or more from its own mapping and to give freed memory
back at once, so the resident size follows the live tensors rather than what the allocator keeps cached; the
largest rank is shown. Estimated: ``launch.memory.estimate(...)["peak"]`` for the same experiment, CPU runtime
included.

    python scripts/bench_memory.py            # every case
    python scripts/bench_memory.py --case tp  # the cases whose name contains "tp"
"""
from __future__ import annotations

import argparse
import ctypes
import os
import tempfile
import time

MODEL = ["model.dim=256", "model.n_layers=4", "model.n_heads=8", "model.n_kv_heads=4", "model.vocab_size=4096",
         "data.seq_len=2048", "train.global_batch_size=4", "train.steps=3", "train.eval_every=0",
         "train.progress=false", "train.threads=1", "checkpoint.at_end=false", "logging.peak_tflops=1",
         "train.log_every=100"]
ADAPTIVE_COST = ["parallel.sp_alpha1=1e-9", "parallel.sp_alpha2=2e-6"]  # declared: no calibration run
# name -> (ranks, overrides)
CASES = {
    "1 process, none": (1, ["train.global_batch_size=2"]),
    "1 process, full": (1, ["train.global_batch_size=2", "parallel.activation_checkpoint=full"]),
    "1 process, selective": (1, ["train.global_batch_size=2", "parallel.activation_checkpoint=selective", "parallel.ac_save_ops=matmul"]),
    "1 process, offload": (1, ["train.global_batch_size=2", "parallel.activation_checkpoint=offload"]),
    "1 process, none, loss chunks of 512": (1, ["train.global_batch_size=2", "train.loss_chunk_tokens=512"]),
    "dp_shard=4, none": (4, ["parallel.dp_shard=4"]),
    "tp=2 x dp_shard=2, selective": (4, ["parallel.tp=2", "parallel.dp_shard=2",
                                         "parallel.activation_checkpoint=selective", "parallel.ac_save_ops=matmul"]),
    "cp=4, full+offload": (4, ["parallel.cp=4", "parallel.dp_shard=1", "train.global_batch_size=1",
                               "data.seq_len=8192", "parallel.activation_checkpoint=full+offload"]),
    "cp=2 x dp_shard=2, none, loss chunks": (4, ["parallel.cp=2", "parallel.dp_shard=2", "data.seq_len=4096",
                                                 "train.global_batch_size=2", "train.loss_chunk_tokens=512"]),
    "pp=2 x dp_shard=2, 1F1B, none": (4, ["parallel.pp=2", "parallel.dp_shard=2", "train.microbatches=4",
                                          "train.global_batch_size=8", "data.seq_len=1024",
                                          "parallel.pp_schedule=1f1b"]),
    "adaptive sp, 4 ranks, full": (4, ["parallel.sp_mode=adaptive", "parallel.dp_shard=4", "data.batching=documents",
                                       "train.global_batch_tokens=16384", "parallel.activation_checkpoint=full"]
                                   + ADAPTIVE_COST),
    "adaptive_sharded sp, 4 ranks, full": (4, ["parallel.sp_mode=adaptive_sharded", "parallel.dp_shard=4",
                                               "data.batching=documents", "train.global_batch_tokens=16384",
                                               "parallel.activation_checkpoint=full"] + ADAPTIVE_COST),
}


def fix_malloc() -> None:
    """Blocks of 64 KiB and more get their own mapping, freed memory goes back at once (glibc's ``mallopt``)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD (fixed: no dynamic raise)
    libc.mallopt(-1, 1 << 16)  # M_TRIM_THRESHOLD


def _kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def measure(rank, overrides) -> int:
    """This rank's peak growth in bytes over the steps (see the module docstring)."""
    from loomtrain.launch.env import init_distributed
    from loomtrain.trainer import train as train_mod
    from loomtrain.trainer.config import load_config

    fix_malloc()
    exp = load_config("tiny", overrides)
    env = init_distributed(exp.parallel)
    train_mod.set_threads(exp, env)
    before = _kib("VmRSS")
    trainer = train_mod.Trainer(exp, env)
    peak = 0
    for _ in range(exp.train.steps):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # peak := current
        trainer.train_step()
        peak = max(peak, _kib("VmHWM"))
    return (peak - before) * 1024


def estimate(overrides, ranks: int) -> float:
    """``launch.memory.estimate``'s peak for these overrides on ``ranks`` CPU ranks."""
    from loomtrain.launch.memory import estimate as memory_estimate
    from loomtrain.launch.plan import planned_model_args
    from loomtrain.trainer.checks import check_experiment
    from loomtrain.trainer.config import load_config

    exp = load_config("tiny", overrides)
    dims = check_experiment(exp, ranks, ranks, "cpu")
    args, _ = planned_model_args(exp)
    return memory_estimate(exp, args, dims, "cpu")["peak"]


def run_case(overrides, ranks: int) -> int:
    """The largest rank's measured peak growth (bytes)."""
    from loomtrain.launch.forked import run_ranks

    return max(run_ranks(measure, 0 if ranks == 1 else ranks, overrides, timeout=900))  # 0: one plain process


def prepared_corpus(tmp: str) -> str:
    from loomtrain.data.prepare import prepare
    from loomtrain.trainer.config import DataConfig

    prefix = os.path.join(tmp, "c")
    prepare(DataConfig(corpus="stdlib", max_documents=300), out_prefix=prefix, writer="builtin")
    return prefix


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", default="", help="only the cases whose name contains this")
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench_memory_")
    prefix = prepared_corpus(tmp)
    print("| case | ranks | estimate (MiB) | measured (MiB) | error |")
    print("|---|---:|---:|---:|---:|")
    worst, start = 0.0, time.perf_counter()
    for i, (name, (ranks, layout)) in enumerate(CASES.items()):
        if a.case not in name:
            continue
        ov = MODEL + layout + [f"data.prepared={prefix}", f"train.output_dir={tmp}/{i}"]
        want, got = estimate(ov, ranks), run_case(ov, ranks)
        err = (want - got) / got
        worst = max(worst, abs(err))
        print(f"| {name} | {ranks} | {want / 2**20:.0f} | {got / 2**20:.0f} | {100 * err:+.1f}% |", flush=True)
    print(f"\nlargest error {100 * worst:.1f}%, {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
