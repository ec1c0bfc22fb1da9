"""Importing a Hugging Face model on 4 ranks: loomtrain's sharded load (``model.init_from``: each rank reads only
the regions of the safetensors files it holds) vs the common way, every rank loading the whole state dict and then
keeping its shards (what a ``from_pretrained`` on every rank followed by sharding does).

A random Llama (``--dim``, ``--layers``, vocabulary 32,000) is saved by transformers as bf16 safetensors shards of
``--shard-mb``. Both ways run inside the real trainer (``loomtrain train``, forked ranks, tp 2 x FSDP 2, fp32
master weights), which then takes one step, and the two runs' imported parameters must be equal. Measured per rank
around the import alone: wall time, and the peak growth of its private resident memory (``RssAnon`` in
``/proc/self/status``, sampled every 2 ms by a thread; file pages of the page cache are not counted: mapped files
are shared and dropped under pressure).

    python scripts/bench_import.py --dim 1024 --layers 8
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time

LAYOUT = ["parallel.tp=2", "parallel.dp_shard=2"]


def _rss_kib() -> tuple[int, int]:
    """(private resident KiB, all resident KiB: private plus mapped file pages) of this process."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "VmRSS:")):
                values[line.split(":")[0]] = int(line.split()[1])
    return values.get("RssAnon", 0), values.get("VmRSS", 0)


class SampledGrowth:
    """Peak growth of this process's resident memory while the block runs (sampled): private (copies made) and
    all (with the file pages it maps: safetensors maps its files, so a whole-file load's tensors are file pages)."""

    def __enter__(self):
        self.base = _rss_kib()
        self.peak = list(self.base)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.002):
            self.peak = [max(a, b) for a, b in zip(self.peak, _rss_kib())]

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = [max(a, b) for a, b in zip(self.peak, _rss_kib())]
        self.private_mib, self.resident_mib = ((p - b) / 1024 for p, b in zip(self.peak, self.base))


def whole_state_dict_load(model, init_from, hf_names):
    """The baseline: every tensor of every file read into this rank's memory (as ``from_pretrained`` on every rank
    holds the whole model; safetensors' ``load_file`` alone only maps the files), then this rank's shards copied
    out."""
    import torch
    from safetensors.torch import load_file
    from torch.distributed.tensor import DTensor

    from loomtrain.trainer.hf_import import HFModel, local_region, read_hf_model
    from loomtrain.trainer.models.llama.model import canonical_name

    hf = init_from if isinstance(init_from, HFModel) else read_hf_model(init_from)
    state = {}
    for file in sorted(set(hf.files.values())):
        state |= {k: v.clone() for k, v in load_file(file).items()}
    read = sum(t.numel() * t.element_size() for t in state.values())
    with torch.no_grad():
        for name, param in model.named_parameters():
            src, head_dim = hf_names(canonical_name(name))
            full = state[src if src in state else "model.embed_tokens.weight"]
            if head_dim:  # rotate-half rows -> adjacent pairs, whole tensor
                heads = full.shape[0] // head_dim
                full = full.reshape(heads, 2, head_dim // 2, *full.shape[1:]).transpose(1, 2).reshape(full.shape)
            offset, shape = local_region(param)
            local = param.to_local() if isinstance(param, DTensor) else param
            local.copy_(full[tuple(slice(o, o + s) for o, s in zip(offset, shape))])
    return {"tensors": len(list(model.parameters())), "bytes_read": read, "largest_read": read}


def _rank(rank, config, overrides, mode):
    from torch.distributed.tensor import DTensor

    from loomtrain.launch import train as launch_train
    from loomtrain.trainer import hf_import
    from loomtrain.trainer.config import load_config
    from loomtrain.trainer.models.llama.model import canonical_name

    sharded, out = hf_import.load_pretrained, {}

    def measured(model, init_from, hf_names):
        load = sharded if mode == "sharded" else whole_state_dict_load
        with SampledGrowth() as mem:
            start = time.perf_counter()
            stats = load(model, init_from, hf_names)
            seconds = time.perf_counter() - start
        out.update(seconds=seconds, private_mib=mem.private_mib, resident_mib=mem.resident_mib, read_mib=stats["bytes_read"] / 2 ** 20,
                   shards_mib=sum((p.to_local() if isinstance(p, DTensor) else p).numel() * 4
                                  for p in model.parameters()) / 2 ** 20,
                   checksum=sum(float((p.full_tensor() if isinstance(p, DTensor) else p).detach().double().sum())
                                for _, p in sorted(model.named_parameters(), key=lambda kv: canonical_name(kv[0]))))
        return stats

    hf_import.load_pretrained = measured
    launch_train.run(load_config(config, overrides))
    return out


def save_random_llama(path: str, dim: int, layers: int, *, heads: int, kv_heads: int, vocab: int, max_positions: int,
                      bf16: bool = False, shard_mb: int | None = None) -> int:
    """A random Llama saved by transformers as a Hugging Face directory, with loomtrain's byte tokenizer (eos 256; so
    ``vocab`` > 256); the parameter count. The benchmarks' stand-in for a downloaded model."""
    import torch
    import transformers

    from loomtrain.trainer.hf_export import byte_tokenizer_json

    cfg = transformers.LlamaConfig(hidden_size=dim, intermediate_size=dim * 8 // 3 // 64 * 64, num_hidden_layers=layers,
                                   num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                                   max_position_embeddings=max_positions, tie_word_embeddings=False, eos_token_id=256)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    if bf16:
        model = model.to(torch.bfloat16)
    model.save_pretrained(path, **({"max_shard_size": f"{shard_mb}MB"} if shard_mb else {}))
    with open(os.path.join(path, "tokenizer.json"), "w") as f:
        f.write(byte_tokenizer_json(256))
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--shard-mb", type=int, default=100)
    args = ap.parse_args()

    from loomtrain.data.prepare import prepare
    from loomtrain.launch.forked import run_ranks
    from loomtrain.trainer.config import DataConfig

    work = tempfile.mkdtemp(prefix="bench_import_")
    hf_dir = os.path.join(work, "hf")
    params = save_random_llama(hf_dir, args.dim, args.layers, heads=args.dim // 64, kv_heads=max(2, args.dim // 256),
                               vocab=32000, max_positions=4096, bf16=True, shard_mb=args.shard_mb)
    files = sorted(f for f in os.listdir(hf_dir) if f.endswith(".safetensors"))
    print(f"model: {params / 1e6:.0f}M parameters, {len(files)} bf16 safetensors files in {hf_dir}", flush=True)
    corpus = os.path.join(work, "corpus")
    prepare(DataConfig(corpus="stdlib", max_documents=200, valid_fraction=0.05), out_prefix=corpus)
    config = os.path.join(work, "run.yaml")
    with open(config, "w") as f:
        f.write(f"model:\n  init_from: {hf_dir}\n  dtype: float32\ndata:\n  prepared: {corpus}\n  seq_len: 64\n"
                "train:\n  steps: 1\n  global_batch_size: 4\n  progress: false\n  eval_every: 0\n  threads: 1\n")
    rows = {}
    for mode in ("whole", "sharded"):
        if os.geteuid() == 0:  # each way starts with the files out of the page cache (a cluster's storage is cold)
            os.sync()
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("1\n")
        results = run_ranks(_rank, 4, config, LAYOUT + [f"train.output_dir={os.path.join(work, mode)}"], mode,
                            timeout=1800)
        rows[mode] = results
        print(f"{mode}: done", flush=True)
    if [r["checksum"] for r in rows["whole"]] != [r["checksum"] for r in rows["sharded"]]:
        sys.exit("the two imports differ")
    print("\nper rank (tp 2 x FSDP 2, 4 ranks; shards = the rank's fp32 parameters)\n")
    print("| load | rank | seconds | read MiB | shards MiB | peak growth: private MiB | resident (with mapped "
          "files) MiB |")
    print("|---|---|---|---|---|---|---|")
    for mode, label in (("whole", "whole state dict on every rank"), ("sharded", "loomtrain, sharded")):
        for rank, r in enumerate(rows[mode]):
            print(f"| {label} | {rank} | {r['seconds']:.2f} | {r['read_mib']:.0f} | {r['shards_mib']:.0f} | "
                  f"{r['private_mib']:.0f} | {r['resident_mib']:.0f} |")

    def worst(mode, key):
        return max(r[key] for r in rows[mode])

    for key, what in (("seconds", "seconds"), ("private_mib", "private MiB"), ("resident_mib", "resident MiB")):
        print(f"max over ranks, {what}: whole {worst('whole', key):.2f} vs sharded {worst('sharded', key):.2f} "
              f"({worst('whole', key) / max(worst('sharded', key), 1e-9):.2f}x)")


if __name__ == "__main__":
    main()
