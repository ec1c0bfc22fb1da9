"""Attention work per context-parallel rank on packed rows of real documents: today's zigzag of each row as a whole vs
a zigzag of each document (issue 26's per-document balance, not implemented yet: this measures what it would gain).

Rows are the training windows of the standard library's modules (byte tokens; each window packs the documents it
crosses, attention never crosses a document). The causal work of a query token is the number of keys it attends to:
its index in its document's part of the row + 1 (a document continued from the previous row attends only to what
this row holds of it). A rank's work is the sum over the tokens it holds:

- row zigzag (today, ``parallel/cp/attention.py``): the row's 2W chunks, rank r holding chunks r and 2W-1-r;
- document zigzag (Megatron's THD layout, ring-flash-attn's varlen zigzag): each document cut into 2W chunks (its
  length rounded up to a multiple of 2W with padding that does no work), rank r holding chunks r and 2W-1-r of every
  document.

Reported: the mean over rows of (busiest rank's work / mean rank work): 1.0 is perfect balance, and a step waits
for the busiest rank.

    python scripts/bench_doc_balance.py --seq-lens 4096 16384 --cp 2 4 8
"""
from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np


def segment_index(doc_ids: np.ndarray) -> np.ndarray:
    """Each token's index within its document's run of the row (0 at every document start)."""
    starts = np.r_[True, doc_ids[1:] != doc_ids[:-1]]
    first = np.maximum.accumulate(np.where(starts, np.arange(len(doc_ids)), 0))
    return np.arange(len(doc_ids)) - first


def row_zigzag_work(positions: np.ndarray, world: int) -> np.ndarray:
    """Work per rank with the whole row cut into 2W chunks (``positions``: :func:`segment_index`)."""
    chunks = np.array_split(positions + 1, 2 * world)
    return np.array([chunks[r].sum() + chunks[2 * world - 1 - r].sum() for r in range(world)], dtype=np.float64)


def document_zigzag_work(positions: np.ndarray, world: int) -> np.ndarray:
    """Work per rank with every document of the row cut into 2W chunks (padded to a multiple of 2W)."""
    work = np.zeros(world, dtype=np.float64)
    bounds = list(np.flatnonzero(positions == 0)) + [len(positions)]
    for a, b in zip(bounds[:-1], bounds[1:]):
        doc = positions[a:b] + 1
        padded = np.concatenate([doc, np.zeros(-len(doc) % (2 * world))])
        chunks = padded.reshape(2 * world, -1).sum(axis=1)
        work += chunks[:world] + chunks[::-1][:world]
    return work


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--cp", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--rows", type=int, default=400, help="windows sampled per length (evenly over the corpus)")
    args = ap.parse_args()

    from loomtrain.data.loader import PackedDataset
    from loomtrain.data.prepare import prepare
    from loomtrain.trainer.config import DataConfig

    prefix = os.path.join(tempfile.mkdtemp(prefix="bench_doc_balance_"), "stdlib")
    prepare(DataConfig(corpus="stdlib", valid_fraction=0.0), out_prefix=prefix)
    print("| seq_len | cp | documents per row (mean) | busiest / mean rank, row zigzag | document zigzag |")
    print("|---|---|---|---|---|")
    for seq_len in args.seq_lens:
        ds = PackedDataset(prefix + "_train", seq_len)
        picks = np.linspace(0, len(ds) - 1, min(args.rows, len(ds))).astype(int)
        rows = [segment_index(np.asarray(ds.window(int(i))["doc_ids"])) for i in picks]
        docs = np.mean([int((p == 0).sum()) for p in rows])
        for world in args.cp:
            row = np.mean([w.max() / w.mean() for w in (row_zigzag_work(p, world) for p in rows)])
            doc = np.mean([w.max() / w.mean() for w in (document_zigzag_work(p, world) for p in rows)])
            print(f"| {seq_len:,} | {world} | {docs:.1f} | {row:.3f} | {doc:.3f} |", flush=True)


if __name__ == "__main__":
    main()
