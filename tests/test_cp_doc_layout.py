"""Per-document zigzag (``parallel.cp_layout: zigzag_documents``, ``parallel/cp/doc_layout.py``).

The order itself: Megatron #5243's positions, uneven documents cut without padding into pieces whose parts all
have one length, every document's tokens kept in order, ids sorted inside every chunk (one variable-length call
per chunk pair). Exactness: ring, TokenRing, Ulysses and the two-dimensional Ulysses x ring / TokenRing on rows
of packed uneven documents (GQA; documents shorter than 2W; unsorted ids) put in that order and zigzagged over
2 and 4 forked gloo ranks, against float64 attention on the whole row: out, lse and dq/dk/dv within 1e-5 (fp32).
Training with the layout equals one process: tests/test_token_loss.py. The config: one-line errors.
"""
import numpy as np
import pytest
import torch

from conftest import run_ranks
from test_context import against_reference


def test_megatron_5243_positions():
    """cu_seqlens [0, 4, 8] at cp=2: rank 0 holds tokens 0, 3 (document 0) and 4, 7 (document 1), with their
    positions in their documents (0 and 3)."""
    from loomtrain.parallel.cp.attention import shard_for
    from loomtrain.parallel.cp.doc_layout import reorder_batch

    batch = {"input_ids": torch.arange(8)[None], "position_ids": torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]]),
             "doc_ids": torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1]])}
    rows = reorder_batch(batch, 4)
    rank0 = {k: shard_for(v, 0, 2).tolist()[0] for k, v in rows.items()}
    assert sorted(rank0["input_ids"]) == [0, 3, 4, 7]
    assert rank0 == {"input_ids": [0, 4, 3, 7], "position_ids": [0, 0, 3, 3], "doc_ids": [0, 1, 0, 1]}
    assert sorted(shard_for(rows["input_ids"], 1, 2).tolist()[0]) == [1, 2, 5, 6]


def _prepared(rank, pieces):
    """This rank's part of a packed row (documents of 5, 9, 1 and 9 tokens) as static sp prepares it."""
    import torch.distributed as dist

    from loomtrain.parallel.sp.modes import StaticSP

    dist.init_process_group("gloo")
    try:
        ids = torch.repeat_interleave(torch.arange(4), torch.tensor([5, 9, 1, 9]))[None]
        pos = torch.cat([torch.arange(n) for n in (5, 9, 1, 9)])[None]
        row = {"input_ids": torch.arange(24)[None], "labels": 100 + torch.arange(24)[None], "position_ids": pos,
               "doc_ids": ids}
        sp = StaticSP(dist.group.WORLD, pieces)
        return {k: v.tolist()[0] for k, v in sp.prepare(None, sp.host_layout(row)).items()}, ids, pos
    finally:
        dist.destroy_process_group()


def test_static_sp_hands_each_rank_its_pieces_with_their_positions():
    """``StaticSP.host_layout`` then ``prepare``, with pieces: every token once over the ranks, with its own label, position and id;
    each rank holds pieces r and 2W-1-r of every document (here 2 ranks: every document split over both)."""
    from loomtrain.parallel.cp.doc_layout import piece_sizes

    parts = run_ranks(_prepared, 2, 4)
    ids, pos = parts[0][1][0], parts[0][2][0]
    assert sorted(t for p, _, _ in parts for t in p["input_ids"]) == list(range(24))
    sizes = piece_sizes([5, 9, 1, 9], 4)
    for rank, (p, _, _) in enumerate(parts):
        tok = p["input_ids"]
        assert p["labels"] == [100 + t for t in tok]
        assert p["position_ids"] == pos[tok].tolist() and p["doc_ids"] == ids[tok].tolist()
        held = [int((ids[tok] == d).sum()) for d in range(4)]
        assert held == (sizes[:, rank] + sizes[:, 3 - rank]).tolist()


@pytest.mark.parametrize("pieces", [2, 4, 8, 16])
def test_uneven_documents_cut_into_parts_of_one_length(pieces):
    """Random rows of documents of any length (shorter than P included): every part has S/P tokens, each
    document's pieces differ by at most one token, its tokens stay in row order, ids sorted inside each part."""
    from loomtrain.parallel.cp.doc_layout import document_order, piece_sizes

    rng = np.random.default_rng(pieces)
    for _ in range(50):
        s = pieces * int(rng.integers(1, 12))
        cuts = np.sort(rng.integers(0, s + 1, int(rng.integers(0, 9))))
        ids = np.searchsorted(cuts, np.arange(s), side="right")
        lengths = np.unique(ids, return_counts=True)[1]
        sizes = piece_sizes(lengths, pieces)
        assert (sizes.sum(0) == s // pieces).all() and (sizes.sum(1) == lengths).all()
        assert (sizes.max(1) - sizes.min(1) <= 1).all()
        order = document_order(ids, pieces)
        assert sorted(order.tolist()) == list(range(s))
        for doc in np.unique(ids):  # each document's tokens in row order
            mine = order[ids[order] == doc]
            assert (np.diff(mine) > 0).all()
        for part in ids[order].reshape(pieces, -1):
            assert (np.diff(part) >= 0).all()


def test_unsorted_ids_and_one_piece():
    """A document is every token of one id (unsorted ids too, its tokens kept in order); one piece per document
    (Ulysses) leaves a sorted row as it is; a batch without ids is left alone."""
    from loomtrain.parallel.cp.doc_layout import document_order, reorder_batch

    ids = np.array([1, 0, 1, 1, 0, 2, 2, 0])
    order = document_order(ids, 2)
    assert order.tolist() == [1, 4, 0, 5, 7, 2, 3, 6]
    assert document_order(np.array([0, 0, 1, 1, 1, 2]), 1).tolist() == list(range(6))
    batch = {"input_ids": torch.arange(8)[None]}
    assert reorder_batch(batch, 4) is batch
    with pytest.raises(ValueError, match="row length 6 must be divisible by 4"):
        document_order(np.zeros(6, dtype=int), 4)


def test_pieces_per_strategy():
    """2W for ring and TokenRing, 2W/U for the two-dimensional ones (their outer ring), 1 for Ulysses."""
    from loomtrain.parallel.cp import strategy
    from loomtrain.parallel.cp.doc_layout import pieces_for

    assert [pieces_for(n, 4) for n in ("ring", "tokenring", "ulysses")] == [8, 8, 1]
    assert pieces_for(strategy("ulysses_ring").with_ulysses(2), 8) == 8
    assert pieces_for(strategy("ulysses_tokenring").with_ulysses(4), 8) == 4


def _check(rank, impl, case, pieces):
    """This rank's errors for strategy ``impl`` ("name" or "name/U") with rows in per-document order of ``pieces``
    pieces per document ("natural": the strategy's own)."""
    import torch.distributed as dist

    from loomtrain.parallel.cp import build, strategy
    from loomtrain.parallel.cp.doc_layout import pieces_for

    dist.init_process_group("gloo")
    try:
        world = dist.get_world_size()
        name, _, u = impl.partition("/")
        s = strategy(name).with_ulysses(int(u)) if u else name
        attn = build(s, None, [list(range(world))], kernel="auto")
        n = pieces_for(s, world) if pieces == "natural" else pieces * world
        return against_reference(case, lambda layout: attn, seed=13, pieces=n)
    finally:
        dist.destroy_process_group()


# (batch, seq, heads, kv_heads, head_dim, causal, layout, documents)
CASES = {
    "gqa_uneven": (2, 64, 8, 4, 8, True, "zigzag", 6),  # documents differ per row and in length
    "short_documents": (2, 48, 4, 2, 8, True, "zigzag", 14),  # many shorter than 2W: empty pieces
    "unsorted_ids": (2, 32, 4, 2, 8, True, "zigzag", "random"),
}
RUNS = [(impl, world, "gqa_uneven", 2) for impl in ("ring", "tokenring", "ulysses") for world in (2, 4)]
RUNS += [(impl, 4, "gqa_uneven", p) for impl in ("ulysses_ring/2", "ulysses_tokenring/2") for p in ("natural", 2)]
RUNS += [("ring", 4, "short_documents", 2), ("tokenring", 4, "short_documents", 2),
         ("ulysses", 2, "short_documents", 2), ("ring", 2, "unsorted_ids", 2)]


@pytest.mark.parametrize("impl, world, case, pieces", [pytest.param(*r, id="-".join(map(str, r))) for r in RUNS])
def test_matches_full_attention(impl, world, case, pieces):
    """Values and gradients within 1e-5 of float64 attention over the row as it was (pieces: per rank, so 2 is
    2W; Ulysses is forced to 2W, its own choice being 1, the row as it is)."""
    for errors, _, _, roundtrip in run_ranks(_check, world, impl, CASES[case], pieces):
        assert roundtrip
        for name, err in errors.items():
            assert err <= 1e-5, (name, err)


def test_row_zigzag_differs_on_these_rows():
    """The test rows are really reordered (so the exactness above is not the row zigzag's, already tested)."""
    from loomtrain.parallel.cp.doc_layout import row_orders
    from test_context import make_inputs

    *_, doc_ids = make_inputs(13, *CASES["gqa_uneven"][:5], CASES["gqa_uneven"][7])
    for world in (2, 4):
        order = row_orders(doc_ids, 2 * world)
        assert not torch.equal(order, torch.arange(doc_ids.shape[1]).expand_as(order))


@pytest.mark.parametrize("override, message", [
    (["parallel.cp_layout=rows"], "parallel.cp_layout: must be one of zigzag, zigzag_documents, got 'rows'"),
    (["parallel.cp_layout=zigzag_documents", "parallel.sp_mode=adaptive", "data.batching=documents",
      "train.global_batch_tokens=512"], "parallel.cp_layout: zigzag_documents cuts the rows of static cp"),
    (["parallel.cp_layout=zigzag_documents"], "parallel.cp_layout: zigzag_documents splits documents over cp ranks; "
                                              "it needs parallel.cp > 1"),
])
def test_bad_layout_is_a_one_line_error(override, message):
    from loomtrain.trainer.config import ConfigError, load_config

    with pytest.raises(ConfigError) as e:
        load_config("tiny", override)
    assert message in str(e.value) and "\n" not in str(e.value)
