"""Context-parallel attention (TokenRing, ring, Ulysses) against single-device attention on the full sequence.

Outputs, lse and dq/dk/dv within 1e-5 (fp32) on 2 and 4 gloo ranks; causal and not, zigzag and
contiguous, GQA, odd sizes, packed documents (sorted ids: one variable-length call per chunk pair)
and unsorted document ids (dense masks, rows that see nothing in a block); P2P message counts per
strategy. Kernel calls per block: tests/test_cp_kernel_calls.py.
"""

import re

import pytest
import torch

from conftest import run_ranks

STRATEGIES = ("token_ring", "ring", "ulysses")


def reference(q, k, v, causal, doc_ids):
    """Plain softmax attention in float64 on the whole sequence: (out, lse (B,H,S))."""
    rep = q.shape[2] // k.shape[2]
    q64, k64, v64 = q.double(), k.repeat_interleave(rep, 2).double(), v.repeat_interleave(rep, 2).double()
    scores = torch.einsum("bqhd,bkhd->bhqk", q64, k64) / q.shape[-1] ** 0.5
    s = q.shape[1]
    allowed = torch.ones(s, s, dtype=torch.bool)
    if causal:
        allowed = allowed.tril()
    allowed = allowed.expand(q.shape[0], 1, s, s)
    if doc_ids is not None:
        allowed = allowed & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    out = torch.einsum("bhqk,bkhd->bqhd", torch.exp(scores - lse[..., None]), v64)
    return out, lse


def make_inputs(seed, b, s, h, hkv, d, docs):
    g = torch.Generator().manual_seed(seed)
    q, k, v, dout = (torch.randn(b, s, n, d, generator=g) for n in (h, hkv, hkv, h))
    doc_ids = None
    if docs == "random":  # unsorted ids: every token in one of 3 documents (dense-mask path)
        doc_ids = torch.randint(0, 3, (b, s), generator=g)
    elif docs:  # packed documents of uneven lengths, different per row (unmasked-rectangle path)
        cuts = torch.sort(torch.randint(1, s, (b, docs - 1), generator=g), dim=1).values
        doc_ids = torch.stack([torch.bucketize(torch.arange(s), c, right=True) for c in cuts])
    return q, k, v, dout, doc_ids


def _check_strategy(rank, strategy, case, kernel="auto"):
    import torch.distributed as dist

    from loomtrain.parallel.cp import attention as cp

    impl = {"token_ring": "tokenring"}.get(strategy, strategy)
    dist.init_process_group("gloo")
    try:
        return against_reference(case, lambda layout: cp.ContextParallelAttention(
            impl, layout=layout, kernel=kernel, reverse_group=dist.new_group(list(range(dist.get_world_size())))))
    finally:
        dist.destroy_process_group()


def against_reference(case, make_attention, seed=7, pieces=0):
    """In a rank of the (world) group: the attention ``make_attention(layout)`` returns, on this rank's shards of
    random q/k/v (and document ids), against float64 attention on the whole sequence: (max errors of out, lse,
    dq, dk, dv; P2P messages forward; backward; whether sharding round-trips). ``pieces``: each row first put
    in per-document zigzag order with that many pieces per document (``parallel/cp/doc_layout.py``)."""
    from loomtrain.parallel.cp import attention as cp
    from loomtrain.parallel.cp.doc_layout import along, inverse, row_orders

    b, s, h, hkv, d, causal, layout, docs = case
    q, k, v, dout, doc_ids = make_inputs(seed, b, s, h, hkv, d, docs)
    ref_in = [t.clone().double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = reference(*ref_in, causal, doc_ids)
    (ref_out * dout.double()).sum().backward()
    order = row_orders(doc_ids, pieces) if pieces else None
    shard = lambda t, dim=1: cp.shard_sequence(t if order is None else along(t, order, dim), dim=dim,  # noqa: E731
                                               layout=layout)
    ql, kl, vl = (shard(t).clone().requires_grad_() for t in (q, k, v))
    attn = make_attention(layout)
    out, lse = attn(ql, kl, vl, causal=causal, return_lse=True,
                    doc_ids=shard(doc_ids) if doc_ids is not None else None)
    fwd_msgs = attn.comm.stats.messages
    out.backward(shard(dout))
    bwd_msgs = attn.comm.stats.messages - fwd_msgs
    errors = {
        "out": (out.double() - shard(ref_out)).abs().max().item(),
        "lse": (lse.double() - shard(ref_lse, 2)).abs().max().item(),
        "dq": (ql.grad.double() - shard(ref_in[0].grad)).abs().max().item(),
        "dk": (kl.grad.double() - shard(ref_in[1].grad)).abs().max().item(),
        "dv": (vl.grad.double() - shard(ref_in[2].grad)).abs().max().item(),
    }
    whole = cp.unshard_sequence(shard(q), layout=layout)
    roundtrip = torch.equal(whole if order is None else along(whole, inverse(order)), q)
    return errors, fwd_msgs, bwd_msgs, roundtrip


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("case", ["causal_zigzag_gqa", "packed_documents", "noncausal_zigzag", "random_documents"])
def test_device_generic_kernel_matches_full_attention(strategy, case):
    """The explicit-softmax ``math`` kernel, forced on CPU: what ``choose_for`` picks on devices other than
    CPU and CUDA (CUDA gets sdpa_flash / sdpa_efficient / flash_attn), and what a forced choice runs anywhere."""
    for errors, _, _, _ in run_ranks(_check_strategy, 2, strategy, CASES[case], "math"):
        for name, err in errors.items():
            assert err <= 1e-5, (name, err)


def expected_messages(strategy, world, docs):
    """Tensors each rank sends, forward and backward (the doc-id all-gather is not P2P)."""
    if strategy == "ring":  # fwd: K/V stacked, one per hop; bwd: (K/V, dK/dV) per hop + dK/dV home
        return world - 1, 2 * (world - 1) + 1
    if strategy == "token_ring":  # fwd: Q + (out, lse) per step; bwd: (Q, dO, O, lse) + dQ per step
        return 3 * (world - 1), 5 * (world - 1)
    # Ulysses, counted as W-1 messages per all-to-all: fwd q, k, v, out, lse; bwd dout, dq, dk, dv
    return 5 * (world - 1), 4 * (world - 1)


# (batch, seq, heads, kv_heads, head_dim, causal, layout, documents)
CASES = {
    "causal_zigzag_gqa": (2, 48, 8, 2, 16, True, "zigzag", 0),
    "causal_contiguous": (1, 40, 4, 4, 8, True, "contiguous", 0),
    "noncausal_zigzag": (2, 24, 4, 2, 8, False, "zigzag", 0),
    "odd_sizes_5_heads": (1, 120, 5, 5, 12, True, "zigzag", 0),
    "packed_documents": (2, 48, 4, 2, 8, True, "zigzag", 4),
    "packed_documents_noncausal_contiguous": (1, 32, 4, 4, 8, False, "contiguous", 3),
    "random_documents": (2, 48, 4, 2, 8, True, "zigzag", "random"),
    # heads that split over 4 ranks: Ulysses' natural-order reordering of 8 zigzag chunks, with documents
    "packed_documents_8_heads": (1, 64, 8, 4, 8, True, "zigzag", 5),
}


def _ulysses_cannot_split(case, world):
    _, _, h, hkv, *_ = CASES[case]
    return bool(h % world or hkv % world)


# Every (case, strategy, world) but Ulysses where the heads do not split over the ranks (it refuses those).
COMPARED = [pytest.param(world, strategy, case, id=f"{case}-{strategy}-{world}")
            for case in CASES for strategy in STRATEGIES for world in (2, 4)
            if not (strategy == "ulysses" and _ulysses_cannot_split(case, world))]
REFUSED = [pytest.param(world, case, id=f"{case}-{world}") for case in CASES for world in (2, 4)
           if _ulysses_cannot_split(case, world)]


@pytest.mark.parametrize("world, strategy, case", COMPARED)
def test_matches_full_attention(world, strategy, case):
    """Out, lse and dq/dk/dv within 1e-5 of float64 attention; sharding round-trips; P2P message counts."""
    b, s, h, hkv, d, causal, layout, docs = CASES[case]
    if s % (2 * world if layout == "zigzag" else world):
        pytest.fail("test case sequence length must fit the layout")
    for errors, fwd, bwd, roundtrip in run_ranks(_check_strategy, world, strategy, CASES[case]):
        assert roundtrip
        for name, err in errors.items():
            assert err <= 1e-5, (name, err)
        assert (fwd, bwd) == expected_messages(strategy, world, docs)


@pytest.mark.parametrize("world, case", REFUSED)
def test_ulysses_refuses_heads_that_do_not_split_over_the_group(world, case):
    """Ulysses gives each rank whole heads: query or kv heads not divisible by the group size are an error
    naming both counts, not a wrong result."""
    _, _, h, hkv, *_ = CASES[case]
    message = f"heads ({h}) and kv_heads ({hkv}) must be divisible by the group size {world}"
    with pytest.raises(AssertionError, match=re.escape(message)):
        run_ranks(_check_strategy, world, "ulysses", CASES[case])


def _forward_bytes(rank, causal):
    import torch.distributed as dist

    from loomtrain.comms.p2p import P2P
    from loomtrain.parallel.cp import attention as cp

    dist.init_process_group("gloo")
    try:
        q, k, v, _, _ = make_inputs(3, 1, 32, 4, 4, 8, 0)
        ql, kl, vl = (cp.shard_sequence(t) for t in (q, k, v))
        comm = P2P()
        cp.token_ring_attention(ql, kl, vl, causal=causal, comm=comm)
        return comm.stats.bytes
    finally:
        dist.destroy_process_group()


def test_token_ring_sends_half_of_wrapped_queries():
    """Zigzag + causal: after wrapping only Q's second chunk travels (and its results return):
    half the bytes on W(W-1)/2 of the W(W-1) hops, i.e. exactly 3/4 of the non-causal traffic."""
    causal = sum(run_ranks(_forward_bytes, 4, True))
    full = sum(run_ranks(_forward_bytes, 4, False))
    assert causal * 4 == full * 3, (causal, full)


def _bytes_by_strategy(rank):
    import torch.distributed as dist

    from loomtrain.parallel.cp import attention as cp

    dist.init_process_group("gloo")
    try:
        q, k, v, dout, _ = make_inputs(5, 2, 64, 8, 4, 16, 0)
        res = {}
        for name in cp.IMPLS:
            attn = cp.ContextParallelAttention(name)
            ql, kl, vl = (cp.shard_sequence(t).requires_grad_() for t in (q, k, v))
            out = attn(ql, kl, vl)
            fwd = attn.comm.stats.bytes
            out.backward(cp.shard_sequence(dout))
            res[name] = (fwd, attn.comm.stats.bytes - fwd)
        return res
    finally:
        dist.destroy_process_group()


def test_cost_model_byte_counts_match_what_is_sent():
    from loomtrain.parallel.cp.cost import Shape, bytes_per_rank

    world = 4
    per_rank = run_ranks(_bytes_by_strategy, world)
    model = bytes_per_rank(Shape(batch=2, seq=64, heads=8, kv_heads=4, head_dim=16, world=world))
    for name, (fwd, bwd) in model.items():
        assert sum(r[name][0] for r in per_rank) == pytest.approx(world * fwd, rel=1e-9), name
        assert sum(r[name][1] for r in per_rank) == pytest.approx(world * bwd, rel=1e-9), name


def test_cost_model_choices():
    from loomtrain.parallel.cp import choose
    from loomtrain.parallel.cp.cost import Shape, predict_seconds

    gqa = Shape(batch=1, seq=65536, heads=32, kv_heads=8, head_dim=128, world=8, elem_bytes=2)
    slow = 1e9 / 8  # 1 Gbit/s: the strategy sending the fewest bytes wins
    assert choose(gqa, slow, 1e-5, 300e12) == "ulysses"
    odd = Shape(batch=1, seq=65536, heads=30, kv_heads=6, head_dim=128, world=8, elem_bytes=2)
    assert choose(odd, slow, 1e-5, 300e12) != "ulysses"  # heads not divisible by W: Ulysses cannot run
    # With GQA (4 query heads per KV head) ring moves fewer bytes than TokenRing; a ring topology
    # (results cross W/2 hops) makes TokenRing strictly slower than on a full mesh.
    t_mesh = predict_seconds(gqa, 50e9, 1e-5, 300e12, "full_mesh")["tokenring"]
    t_ring = predict_seconds(gqa, 50e9, 1e-5, 300e12, "ring")["tokenring"]
    assert t_ring > t_mesh
    fast = predict_seconds(gqa, 1e15, 0.0, 300e12)
    assert max(fast.values()) / min(fast.values()) < 1.01  # infinitely fast links: compute decides, all equal


def _count_doc_gathers(rank):
    import torch.distributed as dist

    from loomtrain.parallel.cp import attention as cp

    dist.init_process_group("gloo")
    gathers = []
    real = cp.unshard_sequence
    cp.unshard_sequence = lambda *a, **kw: gathers.append(1) or real(*a, **kw)
    try:
        q, k, v, _, doc_ids = make_inputs(5, 1, 32, 4, 2, 8, 3)
        ql, kl, vl, dl = (cp.shard_sequence(t) for t in (q, k, v, doc_ids))
        ring, tokenring = cp.ContextParallelAttention("ring"), cp.ContextParallelAttention("tokenring")
        first = ring(ql, kl, vl, doc_ids=dl)
        counts = []
        for _ in range(3):  # the layers of one step: same ids tensor
            torch.testing.assert_close(ring(ql, kl, vl, doc_ids=dl), first)
        counts.append(len(gathers))
        torch.testing.assert_close(tokenring(ql, kl, vl, doc_ids=dl), first)  # another module: its own plan
        counts.append(len(gathers))
        ring(ql, kl, vl, doc_ids=dl.clone())  # next step: a new tensor
        counts.append(len(gathers))
        dl.add_(0)  # modified in place: the plan is made again
        ring(ql, kl, vl, doc_ids=dl)
        counts.append(len(gathers))
        return counts
    finally:
        cp.unshard_sequence = real
        dist.destroy_process_group()


def test_document_plan_is_made_once_per_ids_tensor():
    """One all-gather (and host copy, and rectangle plan) of the document ids per step and module, not
    per layer; each attention module keeps its own plan."""
    for counts in run_ranks(_count_doc_gathers, 2):
        assert counts == [1, 2, 3, 4]


def _two_modules(rank):
    import time

    import torch.distributed as dist

    from loomtrain.comms.link_sim import SimulatedLink
    from loomtrain.parallel.cp import attention as cp

    dist.init_process_group("gloo")
    try:
        q, k, v, _, _ = make_inputs(2, 1, 32, 4, 2, 8, 0)
        ql, kl, vl = (cp.shard_sequence(t) for t in (q, k, v))
        fast = cp.ContextParallelAttention("ring")
        slow = cp.ContextParallelAttention("ring", comm=SimulatedLink(latency_s=0.05))
        timings = []
        for attn in (fast, slow, fast):
            dist.barrier()
            start = time.perf_counter()
            attn(ql, kl, vl)
            timings.append(time.perf_counter() - start)
        return fast.comm.stats.messages, slow.comm.stats.messages, timings
    finally:
        dist.destroy_process_group()


def test_modules_own_their_channel_and_link():
    """Two attention modules in one process: each counts only its own transfers, and the simulated link
    of one (50 ms per batch of transfers) does not slow the other, even after it ran."""
    for fast_msgs, slow_msgs, (fast1, slow, fast2) in run_ranks(_two_modules, 2):
        assert (fast_msgs, slow_msgs) == (2, 1)  # ring on 2 ranks: one K/V hop per forward
        assert slow >= 0.05
        assert fast2 < 0.05, fast2
