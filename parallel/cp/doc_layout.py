"""Per-document zigzag (``parallel.cp_layout: zigzag_documents``): every packed document split over the cp ranks.

The zigzag layout cuts a row into 2W chunks and gives rank r chunks r and 2W-1-r. That balances causal work
when the row is one document; a row of packed documents of different lengths is not balanced (a rank holding
the tail of a long document does far more work than one holding short ones: ``scripts/bench_doc_balance.py``).
Megatron's THD layout and ring-flash-attn's varlen zigzag instead cut *each document* into 2W pieces.

Here that is a reordering of the row's tokens before the ordinary zigzag cut, so no attention code changes:
the row becomes [piece 0 of every document][piece 1 of every document]...[piece P-1 of every document]
(documents in id order inside each part; part c is exactly the zigzag's chunk c when P = 2W). Attention
restricted to a document and causal inside it depends only on the order of each document's own tokens, which
the reordering keeps, so every strategy computes the same values; chunk-pair causality holds per document (a
document's piece in an earlier chunk is all before its piece in a later one; the same chunk is the same piece,
a causal square). Inside every chunk the ids stay sorted, so each chunk pair is still one variable-length call.
Positions (``position_ids``), labels and ids travel with their tokens, so RoPE and the loss see the real ones:
Megatron #5243's case, documents [0, 4) and [4, 8) at cp=2, gives rank 0 the tokens 0, 4, 3, 7.

**Documents whose length is not a multiple of P** are cut into pieces of uneven size, no padding (the data is
unchanged): each piece has ``L // P`` tokens, and the ``L % P`` left over go one each to distinct pieces,
dealt from one cursor that runs over the pieces in zigzag order (0, P-1, 1, P-2, ...) across the row's
documents. The row's length is a multiple of P, so the cursor deals every piece the same number of extras:
all P parts have the same length (what the ring's equal-size transfers need). A document shorter than P has
empty pieces. Diagonal pairs stay square (a piece against itself).

P is the number of chunks the strategy's ring sees (:func:`pieces_for`): 2W for ring and TokenRing, 2W/U for
the two-dimensional ones (their outer ring runs over W/U groups; Ulysses inside a group needs no balance), 1
for Ulysses (every rank attends over the whole sequence for its heads: already balanced; P = 1 leaves sorted
rows as they are).
"""
from __future__ import annotations

import numpy as np
import torch

LAYOUTS = ("zigzag", "zigzag_documents")


def pieces_for(strategy, world: int) -> int:
    """Pieces per document for ``strategy`` (a name or strategy object) on a cp group of ``world``: its
    ``document_pieces(world)`` when it has one, else 2W (the zigzag's chunks)."""
    from loomtrain.parallel.cp import strategy as cp_strategy

    s = cp_strategy(strategy)
    return s.document_pieces(world) if hasattr(s, "document_pieces") else 2 * world


def zigzag_order(pieces: int) -> np.ndarray:
    """0, P-1, 1, P-2, ...: the pieces in the order the cursor deals left-over tokens (a rank's two at a time)."""
    half = np.arange((pieces + 1) // 2)
    return np.stack([half, pieces - 1 - half], 1).ravel()[:pieces]


def piece_sizes(lengths, pieces: int) -> np.ndarray:
    """(documents, P) sizes of each document's consecutive pieces (module docstring). Every column sums to the
    same total when ``sum(lengths)`` is a multiple of P."""
    lengths = np.asarray(lengths, dtype=np.int64)
    sizes = np.repeat((lengths // pieces)[:, None], pieces, 1)
    deal, cursor = zigzag_order(pieces), 0
    for d, extra in enumerate((lengths % pieces).tolist()):
        sizes[d, deal[(cursor + np.arange(extra)) % pieces]] += 1
        cursor = (cursor + extra) % pieces
    return sizes


def document_order(doc_ids, pieces: int) -> np.ndarray:
    """The row's token indices in per-document zigzag order: piece 0 of every document (ids ascending), then
    piece 1, ... (``doc_ids``: one row's ids, any order; a document is every token of one id, in row order)."""
    ids = np.asarray(doc_ids)
    if ids.shape[0] % pieces:
        raise ValueError(f"row length {ids.shape[0]} must be divisible by {pieces} document pieces")
    if (ids[1:] >= ids[:-1]).all():  # packed rows: already document by document (no sort)
        grouped = np.arange(ids.shape[0])
        counts = np.diff(np.flatnonzero(np.r_[True, ids[1:] != ids[:-1], True]))
    else:  # document by document, each one's tokens in row order
        grouped = np.argsort(ids, kind="stable")
        counts = np.unique(ids, return_counts=True)[1]
    sizes = piece_sizes(counts, pieces)
    piece_of = np.repeat(np.tile(np.arange(pieces, dtype=np.int16), len(counts)), sizes.ravel())
    return grouped[np.argsort(piece_of, kind="stable")]  # 16-bit keys: numpy's stable sort is a radix sort


def row_orders(doc_ids: torch.Tensor, pieces: int) -> torch.Tensor:
    """(B, S) int64: :func:`document_order` of every row of host ``doc_ids``."""
    return torch.from_numpy(np.stack([document_order(row, pieces) for row in doc_ids.numpy()]))


def along(t: torch.Tensor, order: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """``t`` with its ``dim`` axis reordered per row by ``order`` (B, S): element i of row b is t[b, order[b, i]]."""
    shape = [1] * t.dim()
    shape[0], shape[dim] = order.shape
    return torch.take_along_dim(t, order.view(shape), dim)


def inverse(order: torch.Tensor) -> torch.Tensor:
    """The order that undoes ``order`` (B, S)."""
    return torch.argsort(order, dim=1)


def reorder_batch(batch: dict, pieces: int) -> dict:
    """Every (B, S, ...) tensor of a host ``batch`` in per-document zigzag order of its ``doc_ids`` (the batch
    as it is without ids: every row one document, which the row zigzag already splits per document)."""
    if pieces <= 1 or "doc_ids" not in batch:
        return batch
    order = row_orders(batch["doc_ids"], pieces)
    return {k: _along_host(v, order) for k, v in batch.items()}


def _along_host(t: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """:func:`along` for a batch's host tensors (numpy's gather: several times torch's on a 128K-token row)."""
    if t.device.type != "cpu" or t.dim() != 2 or t.requires_grad:
        return along(t, order)
    return torch.from_numpy(np.take_along_axis(t.numpy(), order.numpy(), 1))
