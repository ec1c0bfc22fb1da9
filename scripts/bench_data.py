"""Data pipeline figures: preparation throughput and peak memory, and whole-document length statistics.

``prepare``: generates a JSONL corpus of ``--corpus-mb`` MB from the standard library's source (real
text, repeated with a per-copy header so documents differ), then runs ``loomtrain``'s preparation on
it with each ``--workers`` count in a fresh process, reporting MB/s and the peak resident memory
(VmHWM: the preparing process plus its tokenizer workers, each measured) against the corpus size.
Flat memory shows as the same peak for a 10x larger corpus.

``lengths``: the sequence lengths ``data.batching: documents`` gives on the standard-library corpus
(pieces of at most ``--max-doc-tokens``), over ``--steps`` steps of ``--budget`` tokens.

    python scripts/bench_data.py prepare --corpus-mb 200 2000 --workers 1 2
    python scripts/bench_data.py prepare --corpus-mb 50 --workers 1 2 --tokenizer bpe
    python scripts/bench_data.py lengths --max-doc-tokens 65536 --budget 1048576 --steps 50
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time

import numpy as np


def make_corpus(path: str, megabytes: int) -> int:
    """A JSONL corpus of about ``megabytes`` MB from the stdlib sources (each copy tagged so it is new text)."""
    from loomtrain.data.corpus import read_documents

    sources = [text for _, text in read_documents("stdlib", "*.py")]
    target, written, copy = megabytes * 10 ** 6, 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            for i, text in enumerate(sources):
                line = json.dumps({"text": f"# copy {copy} of document {i}\n{text}"}) + "\n"
                f.write(line)
                written += len(line)
                if written >= target:
                    break
            copy += 1
    return os.path.getsize(path)


def _peak_kib(pid_self=True) -> int:
    usage = resource.getrusage(resource.RUSAGE_SELF if pid_self else resource.RUSAGE_CHILDREN)
    return usage.ru_maxrss  # KiB on Linux


def train_bpe(path: str, vocab: int = 8192) -> str:
    """A byte-level BPE ``tokenizer.json`` trained on the standard library (a realistic tokenizer cost)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from loomtrain.data.corpus import read_documents

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((t for _, t in read_documents("stdlib", "*.py")), trainer=trainer)
    tok.save(path)
    return path


def _prepare_child(corpus: str, out: str, workers: int, tokenizer: str, q) -> None:
    from loomtrain.data.prepare import prepare
    from loomtrain.trainer.config import DataConfig

    start = time.perf_counter()
    p = prepare(DataConfig(corpus=corpus, valid_fraction=0.01, tokenizer=tokenizer), out_prefix=out,
                workers=workers, progress=True)
    seconds = time.perf_counter() - start
    q.put({"seconds": seconds, "tokens": p.meta["train_tokens"] + p.meta["valid_tokens"],
           "main_peak_mib": _peak_kib(True) / 1024, "worker_peak_mib": _peak_kib(False) / 1024})


def bench_prepare(args) -> None:
    rows = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        tokenizer = train_bpe(os.path.join(tmp, "bpe.json")) if args.tokenizer == "bpe" else "byte"
        for mb in args.corpus_mb:
            corpus = os.path.join(tmp, f"corpus{mb}.jsonl")
            size = make_corpus(corpus, mb)
            for workers in args.workers:
                out = os.path.join(tmp, f"out{mb}_{workers}", "tokens")
                ctx = mp.get_context("fork")
                q = ctx.Queue()
                proc = ctx.Process(target=_prepare_child, args=(corpus, out, workers, tokenizer, q))
                proc.start()
                res = q.get()
                proc.join()
                rows.append((size / 1e6, workers, res))
                for name in os.listdir(os.path.dirname(out)):
                    os.unlink(os.path.join(os.path.dirname(out), name))
            os.unlink(corpus)
    print(f"\n{os.cpu_count()} cores; JSONL corpus from the Python {sys.version_info.major}."
          f"{sys.version_info.minor} standard library; "
          f"{'byte-level BPE (8192, trained on the stdlib)' if args.tokenizer == 'bpe' else 'byte'} tokenizer\n")
    print("| corpus (MB) | workers | seconds | MB/s | tokens | peak RSS main (MiB) | peak RSS per worker (MiB) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for mb, workers, r in rows:
        print(f"| {mb:,.0f} | {workers} | {r['seconds']:.1f} | {mb / r['seconds']:.1f} | {r['tokens']:,} | "
              f"{r['main_peak_mib']:.0f} | {r['worker_peak_mib'] if workers > 1 else float('nan'):.0f} |")


def bench_lengths(args) -> None:
    from loomtrain.data.indexed import IndexedTokens
    from loomtrain.data.loader import DocumentStream
    from loomtrain.data.prepare import prepare
    from loomtrain.trainer.config import DataConfig

    p = prepare(DataConfig(corpus=args.corpus), progress=True)
    data = IndexedTokens(p.train_prefix)
    stream = DocumentStream(data, seed=1, max_tokens=args.max_doc_tokens)
    position, lengths, per_step = (0, 0), [], []
    for _ in range(args.steps):
        pieces, position = stream.pieces(position, args.budget)
        lengths += [n for _, n in pieces]
        per_step.append(len(pieces))
    a = np.asarray(lengths)
    print(f"\n{args.corpus} corpus (train split: {data.num_documents:,} documents, {len(data.tokens):,} byte tokens); "
          f"max_doc_tokens {args.max_doc_tokens}, {args.steps} steps of <= {args.budget:,} tokens\n")
    print("| sequences | median | p90 | p99 | max | mean | sequences/step (min-max) |")
    print("|---:|---:|---:|---:|---:|---:|---|")
    print(f"| {len(a):,} | {np.median(a):,.0f} | {np.percentile(a, 90):,.0f} | {np.percentile(a, 99):,.0f} | "
          f"{a.max():,} | {a.mean():,.0f} | {min(per_step)}-{max(per_step)} |")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    a = sub.add_parser("prepare")
    a.add_argument("--corpus-mb", type=int, nargs="+", default=[200, 2000])
    a.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    a.add_argument("--tokenizer", choices=("byte", "bpe"), default="byte")
    a.add_argument("--tmp", default=None, help="where the generated corpus goes (default: the system temp dir)")
    b = sub.add_parser("lengths")
    b.add_argument("--corpus", default="stdlib")
    b.add_argument("--max-doc-tokens", type=int, default=65536)
    b.add_argument("--budget", type=int, default=1 << 20)
    b.add_argument("--steps", type=int, default=50)
    args = p.parse_args()
    bench_prepare(args) if args.what == "prepare" else bench_lengths(args)


if __name__ == "__main__":
    main()
