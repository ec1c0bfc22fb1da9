"""Throughput of ``loomtrain eval``'s loss by position: tokens per second of the forward over one long sequence, on one
process and on 2 ranks splitting the sequence with context parallelism (cp=2, forked, gloo), at several lengths.

The model is a random Llama saved by transformers as a Hugging Face directory (``--dim``, ``--layers``; byte
tokens), read by eval as it reads any such directory; the text is the standard library's modules, concatenated.
Timed: ``Evaluator.loss_sums`` alone (the forward, the per-position sums and their all-reduce), the best of
``--repeats``; model building and loading are not counted.

    python scripts/bench_eval.py --lengths 2048 8192
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time


def _rank(rank, source, text, seq_len, cp, repeats):
    from loomtrain.launch import eval as launch_eval
    from loomtrain.trainer import evaluate as ev_mod
    from loomtrain.trainer.evaluate import EvalRequest

    timings, original = [], ev_mod.Evaluator.loss_sums

    def timed(self, tokens):
        for _ in range(repeats):
            start = time.perf_counter()
            out = original(self, tokens)
            timings.append(time.perf_counter() - start)
        return out

    ev_mod.Evaluator.loss_sums = timed
    result = launch_eval.run(EvalRequest(source=source, text=text, seq_len=seq_len, cp=cp))
    return min(timings), result["loss"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from bench_import import save_random_llama  # scripts/ is on the path of a script run from it

    from loomtrain.data.corpus import corpus_files
    from loomtrain.launch.forked import run_ranks

    work = tempfile.mkdtemp(prefix="bench_eval_")
    source = os.path.join(work, "hf")
    save_random_llama(source, args.dim, args.layers, heads=args.dim // 32, kv_heads=args.dim // 64, vocab=320,
                      max_positions=max(args.lengths))
    text = os.path.join(work, "text.txt")
    with open(text, "w") as out:
        for path in corpus_files("stdlib", "*.py")[:200]:
            with open(path, encoding="utf-8", errors="replace") as f:
                out.write(f.read())
    print(f"model: dim {args.dim}, {args.layers} layers, random; text: {text}\n")
    print("| tokens | 1 process: s | tokens/s | cp=2 (2 ranks): s | tokens/s | loss (1 process, cp=2) |")
    print("|---|---|---|---|---|---|")
    for n in args.lengths:
        [(one, loss_one)] = run_ranks(_rank, 0, source, text, n, 1, args.repeats, timeout=1800)
        two = run_ranks(_rank, 2, source, text, n, 2, args.repeats, timeout=1800)
        t2, loss_two = max(t for t, _ in two), two[0][1]
        print(f"| {n:,} | {one:.2f} | {n / one:,.0f} | {t2:.2f} | {n / t2:,.0f} | {loss_one:.4f}, {loss_two:.4f} |",
              flush=True)


if __name__ == "__main__":
    main()
