"""Attention work per context-parallel rank on packed rows of real documents: the row zigzag (``parallel.cp_layout:
zigzag``) vs the per-document zigzag (``zigzag_documents``, ``parallel/cp/doc_layout.py``).

Rows are the training windows of the standard library's modules (byte tokens; each window packs the documents it
crosses, attention never crosses a document). A rank's work is counted from the attention's own plan: the
same-document rectangles (``parallel/cp/attention.py::_Docs``) of every (query chunk it holds, key chunk) pair that
ring / TokenRing compute, a full rectangle nq*nk, a diagonal one n(n+1)/2 (the keys each query attends to, summed).
It is cross-checked against the token model (a token attends to its index in its document's part of the row + 1):

- row zigzag: the row's 2W chunks, rank r holding chunks r and 2W-1-r;
- document zigzag, implemented: each document cut into 2W consecutive pieces of uneven size (no padding), the row
  reordered so that chunk c is piece c of every document, then the row zigzag;
- document zigzag, padded (Megatron's THD layout, for comparison): each document's length rounded up to a multiple
  of 2W with padding that does no work.

Reported: the mean over rows of (busiest rank's work / mean rank work): 1.0 is perfect balance, and a step waits
for the busiest rank.

    python scripts/bench_doc_balance.py --seq-lens 4096 16384 --cp 2 4 8
    python scripts/bench_doc_balance.py --seq-lens 16384 --cp 4 8 --max-doc-tokens 1000
"""
from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np
import torch


def segment_index(doc_ids: np.ndarray) -> np.ndarray:
    """Each token's index within its document's run of the row (0 at every document start)."""
    starts = np.r_[True, doc_ids[1:] != doc_ids[:-1]]
    first = np.maximum.accumulate(np.where(starts, np.arange(len(doc_ids)), 0))
    return np.arange(len(doc_ids)) - first


def token_work(positions: np.ndarray, world: int, order=None) -> np.ndarray:
    """Work per rank by the token model (``positions``: :func:`segment_index`), the row cut into 2W chunks after
    ``order`` (the per-document reordering; None: the row as it is)."""
    keys = (positions + 1) if order is None else (positions + 1)[order]
    chunks = np.array_split(keys, 2 * world)
    return np.array([chunks[r].sum() + chunks[2 * world - 1 - r].sum() for r in range(world)], dtype=np.float64)


def padded_document_work(positions: np.ndarray, world: int) -> np.ndarray:
    """Work per rank with every document of the row cut into 2W chunks, padded to a multiple of 2W."""
    work = np.zeros(world, dtype=np.float64)
    bounds = list(np.flatnonzero(positions == 0)) + [len(positions)]
    for a, b in zip(bounds[:-1], bounds[1:]):
        doc = positions[a:b] + 1
        padded = np.concatenate([doc, np.zeros(-len(doc) % (2 * world))])
        chunks = padded.reshape(2 * world, -1).sum(axis=1)
        work += chunks[:world] + chunks[::-1][:world]
    return work


def plan_work(doc_ids: torch.Tensor, world: int) -> np.ndarray:
    """(rows, W) work per rank from the attention's plan of ``doc_ids`` (B, S), already in the layout's order."""
    from loomtrain.parallel.cp.attention import _chunk_ids, _Docs, _pairs

    docs = _Docs(dict(enumerate(doc_ids.chunk(2 * world, 1))))
    work = np.zeros((doc_ids.shape[0], world))
    for r in range(world):
        mine = _chunk_ids(r, world, "zigzag")
        for i, j, diagonal in _pairs(mine, range(2 * world), True):
            for rows, qr, kr, causal, _ in docs.pieces(mine[i], j, diagonal, None):
                nq, nk = qr.stop - qr.start, kr.stop - kr.start
                work[rows.start, r] += nq * (nq + 1) / 2 if causal else nq * nk
    return work


def imbalance(work: np.ndarray) -> float:
    """Mean over rows of busiest / mean rank."""
    return float(np.mean(work.max(1) / work.mean(1)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--cp", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--rows", type=int, default=400, help="windows sampled per length (evenly over the corpus)")
    ap.add_argument("--max-doc-tokens", type=int, default=0,
                    help="cut documents into pieces of at most this many tokens (as data.max_doc_tokens does): rows "
                         "of many short documents; 0: the modules whole")
    args = ap.parse_args()

    from loomtrain.data.loader import PackedDataset
    from loomtrain.data.prepare import prepare
    from loomtrain.trainer.config import DataConfig

    from loomtrain.parallel.cp.doc_layout import along, row_orders

    prefix = os.path.join(tempfile.mkdtemp(prefix="bench_doc_balance_"), "stdlib")
    prepare(DataConfig(corpus="stdlib", valid_fraction=0.0), out_prefix=prefix)
    print("| seq_len | cp | documents per row (mean) | busiest / mean rank, row zigzag | zigzag_documents (implemented) "
          "| document zigzag, padded |")
    print("|---|---|---|---|---|---|")
    for seq_len in args.seq_lens:
        ds = PackedDataset(prefix + "_train", seq_len)
        picks = np.linspace(0, len(ds) - 1, min(args.rows, len(ds))).astype(int)
        ids = np.stack([ds.window(int(i))["doc_ids"] for i in picks])
        if args.max_doc_tokens:  # each piece of at most max_doc_tokens its own document
            ids = ids * seq_len + np.stack([segment_index(row) // args.max_doc_tokens for row in ids])
        ids = torch.from_numpy(ids)
        positions = [segment_index(row) for row in ids.numpy()]
        docs = np.mean([int((p == 0).sum()) for p in positions])
        for world in args.cp:
            order = row_orders(ids, 2 * world)
            row, doc = plan_work(ids, world), plan_work(along(ids, order), world)
            # the plan does the work the token model says, in both layouts
            assert np.allclose(row, [token_work(p, world) for p in positions])
            assert np.allclose(doc, [token_work(p, world, o) for p, o in zip(positions, order.numpy())])
            padded = imbalance(np.stack([padded_document_work(p, world) for p in positions]))
            print(f"| {seq_len:,} | {world} | {docs:.1f} | {imbalance(row):.3f} | {imbalance(doc):.3f} | "
                  f"{padded:.3f} |", flush=True)


if __name__ == "__main__":
    main()
