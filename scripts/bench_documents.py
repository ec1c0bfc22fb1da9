"""Attention over packed documents on CPU: per-document segments vs a dense document mask.

Context-parallel blocks with sorted document ids make one variable-length call per chunk pair over
the shared documents' segments (``parallel/cp/attention.py::_Docs``, ``parallel/cp/varlen.py``; on CPU
the call runs one kernel per segment); unsorted ids fall back to a dense additive mask. This measures forward+backward of causal attention over one packed sequence with
documents of a given mean length, three ways, in the same run:

- ``dense SDPA``: what the trainer does without cp (``trainer/attention.py``, boolean mask),
- ``blocks, mask``: the block kernels with the dense-mask path forced,
- ``blocks, rectangles``: the block kernels with the segment (varlen) path (the default).

    python scripts/bench_documents.py --seq 8192 --doc-lens 256 1024 4096 --repeats 3
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from loomtrain.parallel.cp import attention as cp
from loomtrain.trainer import attention


def _doc_ids(seq: int, mean_len: int, seed: int) -> torch.Tensor:
    """Sorted per-token document ids, lengths drawn uniformly from [1, 2 * mean_len)."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, 2 * mean_len, (seq // max(mean_len // 2, 1) + 1,), generator=g)
    ids = torch.repeat_interleave(torch.arange(len(lens)), lens)[:seq]
    return ids[None]


def _time(fn, q, k, v, dout, repeats):
    times = []
    for i in range(repeats + 1):
        for t in (q, k, v):
            t.grad = None
        start = time.perf_counter()
        fn(q, k, v).backward(dout)
        if i:  # the first run warms up
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _dense_sdpa(doc_ids):
    def run(q, k, v):
        attention.PER_DOCUMENT_MIN_SEQ = 1 << 62  # the trainer's SDPA call with a dense mask
        try:
            return attention.attend(q, k, v, doc_ids)
        finally:
            attention.PER_DOCUMENT_MIN_SEQ = default
    default = attention.PER_DOCUMENT_MIN_SEQ
    return run


def _blocks(doc_ids, sorted_path: bool):
    def run(q, k, v):
        docs = cp._Docs({0: doc_ids})
        docs.sorted = docs.sorted and sorted_path
        out, _ = cp._LocalAttention.apply(q, k, v, (0,), True, docs)
        return out
    return run


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--doc-lens", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, a.seq, a.heads, a.head_dim, generator=g).requires_grad_()
    k, v = (torch.randn(1, a.seq, a.kv_heads, a.head_dim, generator=g).requires_grad_() for _ in range(2))
    dout = torch.randn(1, a.seq, a.heads, a.head_dim, generator=g)
    print(f"seq {a.seq}, heads {a.heads}/{a.kv_heads}, head_dim {a.head_dim}, {a.threads} thread(s), "
          f"median of {a.repeats}, forward+backward seconds\n")
    print("| mean doc len | docs | dense SDPA | blocks, mask | blocks, rectangles | rectangles vs dense SDPA |")
    print("|---:|---:|---:|---:|---:|---:|")
    for mean_len in a.doc_lens:
        doc_ids = _doc_ids(a.seq, mean_len, seed=mean_len)
        dense = _time(_dense_sdpa(doc_ids), q, k, v, dout, a.repeats)
        masked = _time(_blocks(doc_ids, False), q, k, v, dout, a.repeats)
        rects = _time(_blocks(doc_ids, True), q, k, v, dout, a.repeats)
        n_docs = int(doc_ids.max()) + 1
        print(f"| {mean_len} | {n_docs} | {dense:.3f} | {masked:.3f} | {rects:.3f} | {dense / rects:.2f}x |",
              flush=True)


if __name__ == "__main__":
    main()
