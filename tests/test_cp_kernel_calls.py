"""Attention kernel calls per block, and the variable-length call that keeps them from growing with documents.

Packed documents: one variable-length call (``parallel/cp/varlen.py``) per chunk pair covers every document
and batch row of the pair, so the calls of a context-parallel block or a ``DocumentAttention`` do not grow with
the number of documents; Ulysses puts its 2W chunks in natural order and makes one causal call per layer.
The calls are counted by wrapping the entry points (a block-kernel call made inside a variable-length call is
that call's CPU implementation, not a call of the caller).

The variable-length call has two implementations with one contract: per-segment block kernels (CPU and
anything without torch's varlen flash op), checked against float64 here, and torch's
``aten._flash_attention_forward/_backward`` with ``cum_seq_q/k`` (CUDA), checked here through a stand-in CPU
kernel registered for those aten ops that enforces ``flash_api.cpp``'s ``mha_varlen_fwd/bwd`` contract (dtype,
int32 contiguous cumulative lengths on the device, shapes and heads, lse (H, total_q) fp32, max_q >= 2 with
GQA unless every segment has one query, +inf lse and zero out for segments without keys, rows no segment
covers left as garbage) and on meta tensors (the real schema and meta kernels).
"""
import contextlib

import pytest
import torch

from conftest import run_ranks
from loomtrain.parallel.cp import attention as cp
from loomtrain.parallel.cp import block_kernels as kernels
from loomtrain.parallel.cp import varlen


# ----------------------------------------------------------------------------- counting calls
@contextlib.contextmanager
def counted_calls():
    """{'forward': n, 'backward': n}: variable-length calls plus block-kernel calls made outside them."""
    counts = {"forward": 0, "backward": 0}
    depth = [0]
    originals = {(varlen, "varlen_forward"): varlen.varlen_forward, (varlen, "varlen_backward"): varlen.varlen_backward,
                 (kernels, "forward"): kernels.forward, (kernels, "backward"): kernels.backward}

    def wrap(fn, kind):
        def call(*args, **kwargs):
            if depth[0] == 0:
                counts[kind] += 1
            depth[0] += 1
            try:
                return fn(*args, **kwargs)
            finally:
                depth[0] -= 1
        return call

    for (module, name), fn in originals.items():
        setattr(module, name, wrap(fn, "backward" if "backward" in name else "forward"))
    try:
        yield counts
    finally:
        for (module, name), fn in originals.items():
            setattr(module, name, fn)


def packed_ids(b, s, docs, seed=0):
    """(b, s) sorted document ids: row 0 one document over the whole sequence (every chunk pair shares it),
    the other rows ``docs`` documents of random lengths."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.zeros(s, dtype=torch.int64)]
    for _ in range(b - 1):
        cuts = torch.randperm(s - 1, generator=g)[:docs - 1].add(1).sort().values
        rows.append(torch.bucketize(torch.arange(s), cuts, right=True))
    ids = torch.stack(rows)
    assert all(len(r.unique()) == n for r, n in zip(ids, [1] + [docs] * (b - 1)))
    return ids


def _block_calls(docs):
    b, s, h, hkv, d = 2, 64, 4, 2, 8
    ids = packed_ids(b, s, docs)
    plan = cp._Docs(dict(enumerate(ids.chunk(4, 1))))
    g = torch.Generator().manual_seed(1)
    q, dout = torch.randn(b, s // 2, h, d, generator=g), torch.randn(b, s // 2, h, d, generator=g)
    k, v = torch.randn(b, s // 2, hkv, d, generator=g), torch.randn(b, s // 2, hkv, d, generator=g)
    counts = {}
    for k_chunks in ((0, 3), (1, 2)):  # rank 0 of 2 (zigzag): its own keys, then rank 1's
        with counted_calls() as n:
            out, lse = cp.block_forward(q, k, v, (0, 3), k_chunks, True, plan)
            cp.block_backward(dout, q, k, v, out, lse, (0, 3), k_chunks, True, plan)
        counts[k_chunks] = (n["forward"], n["backward"])
    return counts


def test_context_parallel_block_calls_do_not_grow_with_documents():
    """A zigzag rank's block (query chunks 0 and 3 of 4) with 2 or 16 documents per row: one call per chunk
    pair with work, forward and backward: 3 against its own chunks (two diagonal, one full), 2 against
    chunks 1 and 2 (chunk 0 precedes them)."""
    for docs in (2, 16):
        assert _block_calls(docs) == {(0, 3): (3, 3), (1, 2): (2, 2)}, docs


@pytest.mark.parametrize("batch", [1, 2])
def test_document_attention_makes_one_call_per_direction(batch):
    """DocumentAttention over 2 or 16 packed documents per row: one forward and one backward call."""
    g = torch.Generator().manual_seed(0)
    s, h, d = 64, 4, 8
    for docs in (2, 16):
        q, k, v, dout = (torch.randn(batch, s, h, d, generator=g) for _ in range(4))
        q.requires_grad_()
        ids = packed_ids(batch + 1, s, docs)[1:]  # every row: `docs` documents
        with counted_calls() as n:
            cp.DocumentAttention()(q, k, v, doc_ids=ids).backward(dout)
        assert (n["forward"], n["backward"]) == (1, 1), (docs, n)


def _ulysses_calls(rank, layout):
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        world = dist.get_world_size()
        b, s, h, d = 1, 16 * world, 8, 8
        g = torch.Generator().manual_seed(2)
        q, k, v, dout = (torch.randn(b, s, n, d, generator=g) for n in (h, 4, 4, h))
        ids = packed_ids(2, s, 5)[1:]
        attn = cp.ContextParallelAttention("ulysses", layout=layout)
        counts = []
        for doc_ids in (None, ids):
            ql, kl, vl = (cp.shard_sequence(t, layout=layout).requires_grad_() for t in (q, k, v))
            with counted_calls() as n:
                out = attn(ql, kl, vl, doc_ids=None if doc_ids is None else cp.shard_sequence(doc_ids, layout=layout))
                out.backward(cp.shard_sequence(dout, layout=layout))
            counts.append((n["forward"], n["backward"]))
        return counts
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_ulysses_makes_one_causal_call_per_layer(world, layout):
    """After its all-to-all each rank holds the whole sequence (in rank order of chunks): one forward and one
    backward call per layer, without documents and with packed ones (zigzag: W(2W+1) block calls before)."""
    for counts in run_ranks(_ulysses_calls, world, layout):
        assert counts == [(1, 1), (1, 1)]


@pytest.mark.parametrize("seed", range(10))
def test_segments_of_a_chunk_pair_are_exactly_its_same_document_attention(seed):
    """Ids sorted within each chunk: the segments of every chunk pair (batch rows flattened) allow exactly the
    same-document (and, on the diagonal, causal) query/key pairs and cover every query and key row."""
    g = torch.Generator().manual_seed(seed)
    b, chunk, n = 3, 16, 4
    docs = cp._Docs({c: torch.sort(torch.randint(0, 6, (b, chunk), generator=g), dim=1).values for c in range(n)})
    for qc in range(n):
        for kc in range(qc + 1):
            causal = qc == kc
            q_doc, k_doc = docs.chunks[qc].reshape(-1), docs.chunks[kc].reshape(-1)
            row = torch.arange(b).repeat_interleave(chunk)
            want = (q_doc[:, None] == k_doc[None, :]) & (row[:, None] == row[None, :])
            if causal:
                want &= torch.ones(b * chunk, b * chunk, dtype=torch.bool).tril()
            seg = docs.segments(qc, kc, causal)
            if seg is None:
                assert not want.any(), (qc, kc)
                continue
            cu_q, cu_k, max_q, max_k = seg.args(torch.device("cpu"))
            assert (cu_q[-1].item(), cu_k[-1].item()) == (b * chunk, b * chunk)
            assert (max_q, max_k) == (int(cu_q.diff().max()), int(cu_k.diff().max()))
            assert torch.equal(_allowed(cu_q, cu_k, causal), want), (qc, kc)


# ----------------------------------------------------------------------------- varlen numerics
# Segments (queries, keys): empty-key queries, key-only segments, GQA 4/2, segment lengths not multiples of 8.
SEGMENTS = {
    False: [(5, 7), (0, 6), (3, 0), (4, 4), (2, 3), (2, 1)],
    True: [(5, 5), (0, 6), (3, 0), (4, 4), (1, 1)],
}


def _cu(lens):
    return torch.tensor([0, *lens]).cumsum(0).to(torch.int32)


def _inputs(segs, seed=0, h=4, hkv=2, d=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    tq, tk = sum(n for n, _ in segs), sum(n for _, n in segs)
    q, dout = (torch.randn(tq, h, d, generator=g).to(dtype) for _ in range(2))
    k, v = (torch.randn(tk, hkv, d, generator=g).to(dtype) for _ in range(2))
    return q, k, v, dout, _cu([n for n, _ in segs]), _cu([n for _, n in segs])


def _allowed(cu_q, cu_k, causal):
    """(Tq, Tk) bool: same segment (and, causal, key position <= query position, bottom-right aligned)."""
    cq, ck = cu_q.tolist(), cu_k.tolist()
    allowed = torch.zeros(cq[-1], ck[-1], dtype=torch.bool)
    for qs, qe, ks, ke in zip(cq, cq[1:], ck, ck[1:]):
        block = torch.ones(qe - qs, ke - ks, dtype=torch.bool)
        allowed[qs:qe, ks:ke] = block.tril(ke - ks - (qe - qs)) if causal else block
    return allowed


def reference(q, k, v, dout, cu_q, cu_k, causal):
    """Float64 attention within segments: (out, lse (H, Tq), dq, dk, dv); rows without keys: out 0, lse -inf."""
    rep = q.shape[1] // k.shape[1]
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    allowed = _allowed(cu_q, cu_k, causal)
    scores = torch.einsum("qhd,khd->hqk", q64, k64.repeat_interleave(rep, 1)) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    seen = allowed.any(-1)
    probs = torch.exp(scores - torch.where(seen, lse, 0.0)[..., None])
    out = torch.einsum("hqk,khd->qhd", probs, v64.repeat_interleave(rep, 1))
    out.backward(dout.double())
    return out.detach(), lse.detach(), q64.grad, k64.grad, v64.grad


def _errors(got, ref):
    """Max error of each of out, lse, dq, dk, dv relative to the largest float64 value (or 1); lse -inf
    exactly where the reference's is."""
    names = ("out", "lse", "dq", "dk", "dv")
    assert torch.equal(torch.isneginf(got[1]), torch.isneginf(ref[1]))
    errors = {}
    for name, x, r in zip(names, got, ref):
        x, r = x.double(), r.masked_fill(torch.isneginf(r), 0.0)
        errors[name] = ((x.masked_fill(torch.isneginf(x), 0.0) - r).abs().max() / r.abs().max().clamp(min=1)).item()
    return errors


@pytest.mark.parametrize("kernel", ["cpu_flash", "math"])
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_cpu_matches_float64_attention(kernel, causal):
    """Out, lse (H, Tq), dq and dk/dv (with k's heads) of the per-segment implementation within 1e-5 of float64,
    segments without keys (out 0, lse -inf) and without queries (dk, dv 0) included."""
    q, k, v, dout, cu_q, cu_k = _inputs(SEGMENTS[causal])
    ref = reference(q, k, v, dout, cu_q, cu_k, causal)
    max_q, max_k = (int(c.diff().max()) for c in (cu_q, cu_k))
    out, lse = varlen.varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, kernel)
    assert (out.dtype, lse.dtype, lse.shape) == (torch.float32, torch.float32, (q.shape[1], q.shape[0]))
    grads = varlen.varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, kernel)
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]
    for name, err in _errors((out, lse, *grads), ref).items():
        assert err <= 1e-5, (name, err)


def _split_keys(segs):
    """Each segment's keys in two parts (first half, rest): the lengths of two varlen calls over the same queries."""
    first = [(n, m // 2) for n, m in segs]
    return first, [(n, m - m // 2) for n, m in segs]


def _key_parts(segs, part):
    """The key rows of part 0 or 1 of ``_split_keys`` (indices into the keys of ``segs``)."""
    starts = torch.tensor([0, *[m for _, m in segs]]).cumsum(0).tolist()
    rows = [range(s, s + m // 2) if part == 0 else range(s + m // 2, s + m) for s, (_, m) in zip(starts, segs)]
    return torch.tensor([i for r in rows for i in r], dtype=torch.long)


def _merged_run(q, k, v, dout, segs, kernel):
    """Two varlen calls over the two halves of every segment's keys, merged by log-sum-exp; each call's backward
    from the merged out/lse (as ring attention runs blocks); dk/dv scattered back to the keys' rows."""
    parts = _split_keys(segs)
    cu_q = _cu([n for n, _ in segs])
    index = [_key_parts(segs, p).to(q.device) for p in (0, 1)]
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)[None]
    lse = torch.full((1, q.shape[1], q.shape[0]), float("-inf"), device=q.device)
    calls = []
    for lens, idx in zip(parts, index):
        cu_k = _cu([m for _, m in lens])
        mk = max(m for _, m in lens)
        o, l = varlen.varlen_forward(q, k[idx], v[idx], cu_q, cu_k, int(cu_q.diff().max()), mk, False, kernel)
        cp.merge_(out, lse, o[None], l[None])
        calls.append((idx, cu_k, mk))
    dq, dk, dv = (torch.zeros(t.shape, device=q.device) for t in (q, k, v))
    for idx, cu_k, mk in calls:
        a, b, c = varlen.varlen_backward(dout, q, k[idx], v[idx], out[0], lse[0], cu_q, cu_k,
                                         int(cu_q.diff().max()), mk, False, kernel)
        dq += a
        dk[idx] += b
        dv[idx] += c
    return out[0], lse[0], dq, dk, dv


@pytest.mark.parametrize("kernel", ["cpu_flash", "math"])
def test_varlen_backward_is_exact_given_the_merged_result(kernel):
    """Keys of every segment split over two calls (one segment's queries see keys only in the second): merged
    out/lse, and the two backward passes from the merged result, add up to float64 attention over all keys."""
    segs = SEGMENTS[False]
    q, k, v, dout, cu_q, cu_k = _inputs(segs, seed=3)
    got = _merged_run(q, k, v, dout, segs, kernel)
    for name, err in _errors(got, reference(q, k, v, dout, cu_q, cu_k, False)).items():
        assert err <= 1e-5, (name, err)


# ----------------------------------------------------------------------------- the CUDA op's contract, modelled
def _check_varlen_inputs(query, key, value, cu_q, cu_k, max_q, max_k, tensors=()):
    """What ``mha_varlen_fwd/bwd`` (torch's flash_api.cpp) check, or the kernel relies on."""
    assert query.dtype in (torch.float16, torch.bfloat16), "FlashAttention only support fp16 and bf16 data type"
    for t in (key, value, *tensors):
        assert t.dtype == query.dtype, "all inputs must have the query's dtype"
    for t in (query, key, value, *tensors):
        assert t.stride(-1) == 1, "Input tensor must have contiguous last dimension"
        assert t.device == query.device
    for cu in (cu_q, cu_k):
        assert cu.dtype == torch.int32 and cu.is_contiguous() and cu.device == query.device, "cu_seqlens: int32"
    assert cu_q.shape == cu_k.shape and cu_q.numel() >= 2, "CHECK_SHAPE(cu_seqlens_k, batch_size + 1)"
    assert query.dim() == 3 and key.dim() == 3 and value.shape == key.shape
    h, d = query.shape[1:]
    assert key.shape[2] == d and d % 8 == 0 and d <= 256, "head_size a multiple of 8, at most 256"
    assert h % key.shape[1] == 0, "Number of heads in key/value must divide number of heads in query"
    cq, ck = cu_q.tolist(), cu_k.tolist()
    assert cq[0] == 0 and ck[0] == 0 and cq[-1] <= query.shape[0] and ck[-1] <= key.shape[0]
    lq, lk = [b - a for a, b in zip(cq, cq[1:])], [b - a for a, b in zip(ck, ck[1:])]
    assert min(lq) >= 0 and min(lk) >= 0
    assert max(lq) <= max_q and max(lk) <= max_k, "max_seqlen bounds the kernel's grid"
    if max_q == 1 and h > key.shape[1]:  # seqlenq_ngroups_swapped: q reshaped to (batch, H_kv, groups, D)
        assert query.shape[0] == len(lq), "max_seqlen_q == 1 with GQA needs one query per segment"
    return list(zip(cq, cq[1:], ck, ck[1:]))


def _garbage(like):
    """``at::empty``: rows the kernel does not write."""
    return torch.full(like.shape, float("nan"), dtype=torch.float64)


def _fake_flash_forward(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal,
                        return_debug_mask, *, scale=None, window_size_left=None, window_size_right=None,
                        seqused_k=None, alibi_slopes=None, block_table=None, num_splits=None):
    assert dropout_p == 0.0 and not return_debug_mask and seqused_k is None and block_table is None
    assert window_size_left in (None, -1) and window_size_right in (None, -1)
    segs = _check_varlen_inputs(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k)
    h, d = query.shape[1:]
    rep = h // key.shape[1]
    scale = d ** -0.5 if scale is None else scale
    out, lse = _garbage(query), torch.full((h, query.shape[0]), float("nan"), dtype=torch.float64)
    for qs, qe, ks, ke in segs:
        if ke == ks:  # flash_fwd_kernel.h: "actual_seqlen_k == 0": write 0 to O and INFINITY to LSE
            out[qs:qe], lse[:, qs:qe] = 0.0, float("inf")
            continue
        kk, vv = (t[ks:ke].double().repeat_interleave(rep, 1) for t in (key, value))
        s = torch.einsum("qhd,khd->hqk", query[qs:qe].double(), kk) * scale
        if is_causal:  # bottom-right aligned
            s = s.masked_fill(~torch.ones(qe - qs, ke - ks, dtype=torch.bool).tril(ke - ks - (qe - qs)), float("-inf"))
        lse[:, qs:qe] = torch.logsumexp(s, -1)
        out[qs:qe] = torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), vv)
    unused = torch.empty((), dtype=torch.uint64)
    return (out.to(query.dtype), lse.float(), torch.empty(2, dtype=torch.uint64), unused,
            torch.empty(0, dtype=query.dtype))


def _fake_flash_backward(grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k,
                         dropout_p, is_causal, rng_state, unused, *, scale=None, window_size_left=None,
                         window_size_right=None):
    assert dropout_p == 0.0
    segs = _check_varlen_inputs(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, (out, grad_out))
    h, d = query.shape[1:]
    assert logsumexp.dtype == torch.float32 and logsumexp.shape == (h, query.shape[0]) \
        and logsumexp.is_contiguous(), "unpadded lse (num_heads, total_q), as the forward returns it"
    rep = h // key.shape[1]
    scale = d ** -0.5 if scale is None else scale
    dq, dk, dv = _garbage(query), _garbage(key), _garbage(value)
    for qs, qe, ks, ke in segs:
        dq[qs:qe], dk[ks:ke], dv[ks:ke] = 0.0, 0.0, 0.0  # dq_accum cleared; "seqlen_q == 0": dK, dV written 0
        if qe == qs or ke == ks:
            continue
        q64, do, o = (t[qs:qe].double() for t in (query, grad_out, out))
        kk, vv = (t[ks:ke].double().repeat_interleave(rep, 1) for t in (key, value))
        s = torch.einsum("qhd,khd->hqk", q64, kk) * scale
        if is_causal:
            s = s.masked_fill(~torch.ones(qe - qs, ke - ks, dtype=torch.bool).tril(ke - ks - (qe - qs)), float("-inf"))
        p = torch.exp(s - logsumexp[:, qs:qe].double()[..., None])  # from the lse given, not recomputed
        dp = torch.einsum("qhd,khd->hqk", do, vv)
        ds = p * (dp - (do * o).sum(-1).t()[..., None]) * scale
        dq[qs:qe] = torch.einsum("hqk,khd->qhd", ds, kk)
        dk_h, dv_h = torch.einsum("hqk,qhd->khd", ds, q64), torch.einsum("hqk,qhd->khd", p, do)
        dk[ks:ke] = dk_h.view(ke - ks, -1, rep, d).sum(2)  # GQA: summed over each kv head's query heads
        dv[ks:ke] = dv_h.view(ke - ks, -1, rep, d).sum(2)
    return dq.to(query.dtype), dk.to(query.dtype), dv.to(query.dtype)


@contextlib.contextmanager
def flash_op_on_cpu():
    """torch's varlen flash ops given a CPU kernel that enforces the CUDA kernel's contract (removed after);
    tests/test_activation_memory.py runs a model's packed documents through it."""
    lib = torch.library.Library("aten", "IMPL")
    lib.impl("_flash_attention_forward", _fake_flash_forward, "CPU")
    lib.impl("_flash_attention_backward", _fake_flash_backward, "CPU")
    try:
        yield
    finally:
        lib._destroy()


@pytest.fixture
def cuda_flash_model():
    with flash_op_on_cpu():
        yield


# bf16: outputs rounded to bf16 by the op; the tolerance of tests/test_block_kernels.py (8 units of 2^-8).
BF16 = 8 * 2 ** -8


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_flash_route_meets_the_cuda_kernels_contract(cuda_flash_model, causal):
    """bf16 on the flash route (``sdpa_flash`` forced): the aten calls pass the modelled kernel's checks, and
    out/lse/dq/dk/dv match float64 attention (rows without keys: lse -inf although the kernel writes +inf)."""
    q, k, v, dout, cu_q, cu_k = _inputs(SEGMENTS[causal], dtype=torch.bfloat16)
    assert varlen.flash_route(q, "sdpa_flash") and not varlen.flash_route(q.float(), "sdpa_flash")
    max_q, max_k = (int(c.diff().max()) for c in (cu_q, cu_k))
    out, lse = varlen.varlen_forward(q, k, v, cu_q.long(), cu_k.long(), max_q, max_k, causal, "sdpa_flash")
    grads = varlen.varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, "sdpa_flash")
    for name, err in _errors((out, lse, *grads), reference(q, k, v, dout, cu_q, cu_k, causal)).items():
        assert err <= BF16, (name, err)


def test_varlen_flash_route_with_one_query_per_segment(cuda_flash_model):
    """Segments of at most one query (and one without), GQA: max_q 1 would send the kernel down its
    one-query-per-segment path (``seqlenq_ngroups_swapped``); the call still matches float64."""
    segs = [(1, 3), (0, 2), (1, 1), (1, 0)]
    q, k, v, dout, cu_q, cu_k = _inputs(segs, seed=4, dtype=torch.bfloat16)
    out, lse = varlen.varlen_forward(q, k, v, cu_q, cu_k, 1, 3, False, "sdpa_flash")
    grads = varlen.varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, 1, 3, False, "sdpa_flash")
    for name, err in _errors((out, lse, *grads), reference(q, k, v, dout, cu_q, cu_k, False)).items():
        assert err <= BF16, (name, err)


def test_varlen_flash_route_backward_is_exact_given_the_merged_result(cuda_flash_model):
    segs = SEGMENTS[False]
    q, k, v, dout, cu_q, cu_k = _inputs(segs, seed=5, dtype=torch.bfloat16)
    got = _merged_run(q, k, v, dout, segs, "sdpa_flash")
    for name, err in _errors(got, reference(q, k, v, dout, cu_q, cu_k, False)).items():
        assert err <= BF16, (name, err)


def _block_reference(q, k, v, dout, ids, q_chunks, k_chunks, n_chunks):
    """Float64 attention of the query chunks over the key chunks (same document, causal by global position)."""
    b, sq, h, d = q.shape
    pos = torch.arange(ids.shape[1]).chunk(n_chunks)
    qpos, kpos = torch.cat([pos[c] for c in q_chunks]), torch.cat([pos[c] for c in k_chunks])
    qdoc, kdoc = ids[:, qpos], ids[:, kpos]
    allowed = (qdoc[:, :, None] == kdoc[:, None, :]) & (kpos[None, None, :] <= qpos[None, :, None])
    rep = h // k.shape[2]
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    scores = torch.einsum("bqhd,bkhd->bhqk", q64, k64.repeat_interleave(rep, 2)) * d ** -0.5
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    lse = torch.logsumexp(scores, -1)
    seen = allowed.any(-1)[:, None]
    probs = torch.exp(scores - torch.where(seen, lse, 0.0)[..., None])
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v64.repeat_interleave(rep, 2))
    out.backward(dout.double())
    return out.detach(), lse.detach(), q64.grad, k64.grad, v64.grad


@pytest.mark.parametrize("k_chunks", [(0, 3), (1, 2)])
def test_context_parallel_block_on_the_flash_route(cuda_flash_model, k_chunks):
    """A zigzag rank's block of packed documents (2 rows, 5 documents each, GQA 4/2) in bf16 through the
    modelled CUDA op: chunk pairs with queries whose document the key chunk lacks, and keys no query sees."""
    b, s, h, hkv, d = 2, 64, 4, 2, 8
    g = torch.Generator().manual_seed(6)
    ids = packed_ids(3, s, 5, seed=6)[1:]
    plan = cp._Docs(dict(enumerate(ids.chunk(4, 1))))
    q, dout = (torch.randn(b, s // 2, h, d, generator=g).bfloat16() for _ in range(2))
    k, v = (torch.randn(b, s // 2, hkv, d, generator=g).bfloat16() for _ in range(2))
    out, lse = cp.block_forward(q, k, v, (0, 3), k_chunks, True, plan, "sdpa_flash")
    grads = cp.block_backward(dout, q, k, v, out, lse, (0, 3), k_chunks, True, plan, "sdpa_flash")
    ref = _block_reference(q, k, v, dout, ids, (0, 3), k_chunks, 4)
    for name, err in _errors((out, lse, *grads), ref).items():
        assert err <= BF16, (name, err)


def test_document_attention_on_the_flash_route(cuda_flash_model):
    """DocumentAttention over packed documents in bf16 through the modelled CUDA op, with autograd."""
    b, s, h, hkv, d = 2, 48, 4, 2, 16
    g = torch.Generator().manual_seed(7)
    ids = packed_ids(3, s, 6, seed=7)[1:]
    q = torch.randn(b, s, h, d, generator=g).bfloat16().requires_grad_()
    k, v = (torch.randn(b, s, hkv, d, generator=g).bfloat16().requires_grad_() for _ in range(2))
    dout = torch.randn(b, s, h, d, generator=g).bfloat16()
    out, lse = cp.DocumentAttention("sdpa_flash")(q, k, v, doc_ids=ids, return_lse=True)
    out.backward(dout)
    ref = _block_reference(q.detach(), k.detach(), v.detach(), dout, ids, (0,), (0,), 1)
    for name, err in _errors((out, lse, q.grad, k.grad, v.grad), ref).items():
        assert err <= BF16, (name, err)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kernel", ["sdpa_flash", "auto"])
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_on_cuda_matches_float64_attention(kernel, causal):
    """The real op (``auto``: the run's backend, e.g. FA3 through torch's flash op on Hopper), including its
    empty segments, and the merged two-call backward, against float64."""
    segs = SEGMENTS[causal]
    q, k, v, dout, cu_q, cu_k = _inputs(segs, dtype=torch.bfloat16)
    ref = reference(q, k, v, dout, cu_q, cu_k, causal)
    cuda = [t.cuda() for t in (q, k, v, dout)]
    assert varlen.flash_route(cuda[0], kernel)
    max_q, max_k = (int(c.diff().max()) for c in (cu_q, cu_k))
    out, lse = varlen.varlen_forward(*cuda[:3], cu_q.cuda(), cu_k.cuda(), max_q, max_k, causal, kernel)
    grads = varlen.varlen_backward(cuda[3], *cuda[:3], out, lse, cu_q.cuda(), cu_k.cuda(), max_q, max_k, causal,
                                   kernel)
    for name, err in _errors([t.cpu() for t in (out, lse, *grads)], ref).items():
        assert err <= BF16, (name, err)
    if not causal:
        merged = [t.cpu() for t in _merged_run(*cuda, segs, kernel)]
        for name, err in _errors(merged, ref).items():
            assert err <= BF16, ("merged", name, err)


# ----------------------------------------------------------------------------- the aten calls on meta tensors
def _meta(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, device="meta", dtype=dtype)


def test_varlen_flash_calls_on_meta():
    """torch's own schema and meta kernels accept the calls: out (Tq, H, D) fp32, lse (H, Tq) fp32, dk/dv with
    k's heads (GQA 8/2), cumulative lengths on the device."""
    tq, tk, h, hkv, d = 20, 13, 8, 2, 64
    q, dout, k, v = _meta(tq, h, d), _meta(tq, h, d), _meta(tk, hkv, d), _meta(tk, hkv, d)
    cu_q, cu_k = (torch.tensor(c, dtype=torch.int32, device="meta") for c in ([0, 8, 20, 20], [0, 8, 8, 13]))
    out, lse = varlen.varlen_forward(q, k, v, cu_q, cu_k, 12, 8, False, "sdpa_flash")
    assert (out.shape, out.dtype, lse.shape, lse.dtype) == ((tq, h, d), torch.float32, (h, tq), torch.float32)
    grads = varlen.varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, 12, 8, False, "sdpa_flash")
    assert [(t.shape, t.dtype) for t in grads] == [(q.shape, torch.float32), (k.shape, torch.float32),
                                                   (k.shape, torch.float32)]


def test_context_parallel_block_calls_on_meta():
    """A block of packed documents on meta tensors (the plan on the host): the flash route's calls, cumulative
    lengths copied to the block's device."""
    b, s, h, hkv, d = 2, 32, 8, 2, 16
    plan = cp._Docs(dict(enumerate(packed_ids(b, 2 * s, 4).chunk(4, 1))))
    q, dout, k, v = _meta(b, s, h, d), _meta(b, s, h, d), _meta(b, s, hkv, d), _meta(b, s, hkv, d)
    out, lse = cp.block_forward(q, k, v, (0, 3), (0, 3), True, plan, "sdpa_flash")
    assert (out.shape, lse.shape) == ((b, s, h, d), (b, h, s))
    grads = cp.block_backward(dout, q, k, v, out, lse, (0, 3), (0, 3), True, plan, "sdpa_flash")
    assert [t.shape for t in grads] == [q.shape, k.shape, k.shape]
