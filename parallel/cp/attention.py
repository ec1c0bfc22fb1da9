"""Context (sequence) parallel attention: TokenRing, ring attention and Ulysses, all trainable.

A sequence of S tokens is split over a group of W ranks. ``layout="zigzag"`` cuts it into
2W chunks and gives rank r chunks r and 2W-1-r (balances causal work);
``"contiguous"`` gives rank r chunk r of W. Inputs are the local shards
``q: (B, S_local, H, D)``, ``k, v: (B, S_local, H_kv, D)`` with ``H % H_kv == 0``.

- ``ring_attention``: Q stays, K/V travel one hop per step; backward carries dK/dV
  around a second ring.
- ``token_ring_attention``: K/V stay, Q travels one way (rank r sends to r-1), partial
  results (out, lse) go straight back to Q's owner on a second process group (the other
  link direction). With zigzag + causal, once Q has wrapped around the ring only its
  second chunk is needed, so only that half is sent and computed. Backward sends
  (Q, dO, O, lse) the same way, computes dQ/dK/dV against the resident K/V (dK/dV never
  move) and returns dQ to the owner.
- ``ulysses_attention``: all-to-all to head-sharded full sequences, local attention,
  all-to-all back. Needs H and H_kv divisible by W. The all-to-all leaves the 2W chunks in rank
  order; they are put in natural order once so the whole sequence is one causal call (not
  W(2W+1) chunk pairs), and back after.

Blocks are computed by pairs of chunks: a key chunk before the query chunk is attended
in full, the same chunk causally, a later chunk is skipped. Partial results merge by
log-sum-exp in fp32; a block whose rows see no key contributes lse = -inf. Backward
re-runs each block's kernel backward with the *final* out and lse, which gives exact
partial gradients. ``doc_ids`` (local shard of per-token document ids, laid out like q)
restricts attention to the same document: with sorted ids (packed documents) each chunk
pair is one variable-length call (``varlen.py``: every shared document of every batch row a
segment, unmasked, one merge), so the calls do not grow with the number of documents;
unsorted ids use a dense additive mask.

Kernels are picked per block at run time (``block_kernels.py``): torch's CPU flash op on
CPU; flash-attn or torch's CUDA flash / memory-efficient ops on CUDA; an explicit fp32
softmax twin elsewhere (``kernel=`` forces one, as the tests do).

A model holds one :class:`ContextParallelAttention` per cp group: it owns the groups, the
transfer channel, the kernel choice and the step's document plan (no module-global state).
The functions ``token_ring_attention`` / ``ring_attention`` / ``ulysses_attention`` are one
call of such an instance.
"""
from __future__ import annotations

import math

import weakref

import torch
import torch.distributed as dist

from loomtrain.comms.p2p import P2P
from loomtrain.parallel.cp import block_kernels as kernels
from loomtrain.parallel.cp import varlen

# ----------------------------------------------------------------------------- layout
def _chunk_ids(rank: int, world: int, layout: str) -> tuple[int, ...]:
    if layout == "zigzag":
        return (rank, 2 * world - 1 - rank)
    if layout == "contiguous":
        return (rank,)
    raise ValueError(f"layout: must be 'zigzag' or 'contiguous', got {layout!r}")


def _num_chunks(world: int, layout: str) -> int:
    return 2 * world if layout == "zigzag" else world


def _group_info(group):
    group = group or dist.group.WORLD
    return group, dist.get_world_size(group), dist.get_rank(group)


def shard_sequence(x: torch.Tensor, *, dim: int = 1, group=None, layout: str = "zigzag") -> torch.Tensor:
    """This rank's part of the full tensor ``x`` along ``dim``."""
    _, world, rank = _group_info(group)
    return shard_for(x, rank, world, dim=dim, layout=layout)


def shard_for(x: torch.Tensor, rank: int, world: int, *, dim: int = 1, layout: str = "zigzag") -> torch.Tensor:
    """Group rank ``rank``'s part of ``x`` along ``dim`` on a group of ``world`` (no process group needed:
    a data loader cuts each rank's part before the step)."""
    n = _num_chunks(world, layout)
    if x.shape[dim] % n:
        raise ValueError(f"sequence length {x.shape[dim]} must be divisible by {n} for layout {layout!r} "
                         f"on {world} ranks")
    parts = x.chunk(n, dim)
    return torch.cat([parts[c] for c in _chunk_ids(rank, world, layout)], dim)


def zigzag_multiple(world: int, tp: int = 1) -> int:
    """Sequence lengths a group of ``world`` ranks can split (zigzag: 2 chunks per rank), each rank's part then
    split again over ``tp`` (tensor parallelism's sequence split)."""
    return math.lcm(2 * world if world > 1 else 1, world * tp)


def unshard_sequence(x_local: torch.Tensor, *, dim: int = 1, group=None, layout: str = "zigzag") -> torch.Tensor:
    """Gather every rank's part back into the full tensor (inverse of :func:`shard_sequence`)."""
    group, world, _ = _group_info(group)
    gathered = [torch.empty_like(x_local) for _ in range(world)]
    dist.all_gather(gathered, x_local.contiguous(), group=group)
    chunks = {}
    for r, part in enumerate(gathered):
        ids = _chunk_ids(r, world, layout)
        for cid, piece in zip(ids, part.chunk(len(ids), dim)):
            chunks[cid] = piece
    return torch.cat([chunks[c] for c in range(_num_chunks(world, layout))], dim)


# ----------------------------------------------------------------------------- documents
_ALL = slice(None)


def _mask(q_doc, k_doc, diagonal: bool, dtype) -> torch.Tensor:
    """Additive (B, 1, Sq, Sk) mask allowing same-document keys (and only earlier ones on the diagonal)."""
    allowed = q_doc[:, :, None] == k_doc[:, None, :]
    if diagonal:
        allowed = allowed & torch.ones(allowed.shape[1:], dtype=torch.bool, device=allowed.device).tril()
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, float("-inf")).unsqueeze(1)


class _Docs:
    """Every chunk's document ids, and how same-document attention of a chunk pair decomposes.

    When each chunk's ids are sorted (packed documents are), a document occupies one run of rows
    in every chunk, so a chunk pair's attention is a few unmasked rectangles (per batch row:
    the documents both chunks hold), run as the segments of one variable-length call
    (:meth:`segments`). That skips the masked-out work and serves flash kernels. Unsorted ids
    fall back to one dense additive mask per pair.
    """

    def __init__(self, chunks: dict, host: dict | None = None):
        self.chunks = chunks
        # one device-to-host copy per plan (step)
        self.host = host if host is not None else {c: t.cpu() for c, t in chunks.items()}
        self.sorted = all(bool((t[:, 1:] >= t[:, :-1]).all()) for t in self.host.values())
        self._rects: dict = {}
        self._segments: dict = {}
        self._whole = None

    def pieces(self, qc: int, kc: int, causal: bool, dtype):
        """[(batch rows, query rows, key rows, causal, mask or None)] covering the pair (qc, kc)."""
        if not self.sorted:
            return [(_ALL, _ALL, _ALL, causal, _mask(self.chunks[qc], self.chunks[kc], causal, dtype))]
        key = (qc, kc, causal)
        if key not in self._rects:
            self._rects[key] = self._rectangles(self.host[qc], self.host[kc], causal)
        return self._rects[key]

    @staticmethod
    def _rectangles(q_doc, k_doc, causal):
        rects = []
        for b in range(q_doc.shape[0]):
            ids, counts = torch.unique_consecutive(q_doc[b], return_counts=True)
            starts = (counts.cumsum(0) - counts).tolist()
            lo = torch.searchsorted(k_doc[b], ids).tolist()
            hi = torch.searchsorted(k_doc[b], ids, right=True).tolist()
            for start, n, k_lo, k_hi in zip(starts, counts.tolist(), lo, hi):
                if k_hi > k_lo:  # on the diagonal the key rows are the query rows: causal stays exact
                    rects.append((slice(b, b + 1), slice(start, start + n), slice(k_lo, k_hi), causal, None))
        return rects

    def segments(self, qc: int, kc: int, causal: bool):
        """The pair (qc, kc) as one variable-length call (sorted ids only): a :class:`_Segments` over the
        pair's rows of every batch row flattened, or None when no query shares a document with a key."""
        key = (qc, kc, causal)
        if key not in self._segments:
            b, cq = self.host[qc].shape
            ck = self.host[kc].shape[1]
            rects = self.pieces(qc, kc, causal, None)
            self._segments[key] = _Segments.of(rects, b, cq, ck) if rects else None
        return self._segments[key]

    def whole(self):
        """The plan of the whole sequence as one chunk (0): the chunks in the order of their index."""
        if len(self.chunks) == 1:
            return self
        if self._whole is None:
            order = sorted(self.chunks)
            self._whole = _Docs({0: torch.cat([self.chunks[c] for c in order], 1)},
                                {0: torch.cat([self.host[c] for c in order], 1)})
        return self._whole


class _Segments:
    """A chunk pair of packed documents as the segments of one variable-length call (``varlen.py``).

    Query rows ``b * Cq + r`` and key rows ``b * Ck + r`` (batch row b, row r of the chunk) are packed
    back to back; each same-document rectangle is a segment, and the rows between rectangles become
    segments without keys (queries whose document the key chunk lacks: out 0, lse -inf) or without
    queries (keys no query of the chunk attends: zero gradients).
    """

    def __init__(self, lengths, max_q, max_k):
        q_lens, k_lens = zip(*lengths)
        self.host = tuple(torch.tensor([0, *lens], dtype=torch.int32).cumsum(0, dtype=torch.int32)
                          for lens in (q_lens, k_lens))
        self.max_q, self.max_k = max_q, max_k
        self._on: dict = {}

    @classmethod
    def of(cls, rects, batch: int, cq: int, ck: int):
        lengths = []

        def add(nq, nk):
            if not (nq or nk):
                return
            if lengths and ((nk == 0 and lengths[-1][1] == 0) or (nq == 0 and lengths[-1][0] == 0)):
                lengths[-1] = (lengths[-1][0] + nq, lengths[-1][1] + nk)  # gaps of one kind merge
            else:
                lengths.append((nq, nk))

        at_q = at_k = 0
        for rows, qr, kr, _, _ in rects:
            b = rows.start
            q0, q1, k0, k1 = b * cq + qr.start, b * cq + qr.stop, b * ck + kr.start, b * ck + kr.stop
            assert q0 >= at_q and k0 >= at_k, "rectangles of sorted ids come in row order"
            add(q0 - at_q, 0)
            add(0, k0 - at_k)
            lengths.append((q1 - q0, k1 - k0))
            at_q, at_k = q1, k1
        add(batch * cq - at_q, 0)
        add(0, batch * ck - at_k)
        return cls(lengths, max(n for n, _ in lengths), max(n for _, n in lengths))

    def args(self, device):
        """(cu_q, cu_k, max_q, max_k) with the cumulative lengths on ``device`` (copied there once)."""
        if device.type == "cpu":
            cu = self.host
        else:
            if device not in self._on:
                self._on[device] = tuple(t.to(device) for t in self.host)
            cu = self._on[device]
        return (*cu, self.max_q, self.max_k)


def _pairs(q_chunks, k_chunks, causal: bool):
    """(i, j, diagonal) for every query chunk i / key chunk j pair that has work."""
    for i, qc in enumerate(q_chunks):
        for j, kc in enumerate(k_chunks):
            if not causal or kc < qc:
                yield i, j, False
            elif kc == qc:
                yield i, j, True


def _split(t, n, dim):
    return t.chunk(n, dim) if n > 1 else (t,)


def merge_(out, lse, blk_out, blk_lse):
    """In place: fold a partial result into (out, lse) by log-sum-exp (fp32)."""
    new_lse = torch.logaddexp(lse, blk_lse)
    # exp(-inf - (-inf)) is nan: rows still empty on both sides stay 0.
    w_old = torch.nan_to_num(torch.exp(lse - new_lse)).transpose(1, 2).unsqueeze(-1)
    w_new = torch.nan_to_num(torch.exp(blk_lse - new_lse)).transpose(1, 2).unsqueeze(-1)
    out.mul_(w_old).add_(blk_out * w_new)
    lse.copy_(new_lse)


def _work(q_chunks, k_chunks, causal, docs, dtype):
    """(i, j, causal, segments, pieces) for every query chunk i / key chunk j pair with work: ``segments`` (a
    :class:`_Segments`, sorted document ids: one variable-length call) or ``pieces`` (one kernel call each:
    no documents, or unsorted ids with a dense mask)."""
    for i, j, diag in _pairs(q_chunks, k_chunks, causal):
        c = diag and causal
        if docs is None:
            yield i, j, c, None, [(_ALL, _ALL, _ALL, c, None)]
        elif docs.sorted:
            seg = docs.segments(q_chunks[i], k_chunks[j], c)
            if seg is not None:  # else no query of chunk i shares a document with a key of chunk j
                yield i, j, c, seg, None
        else:
            yield i, j, c, None, docs.pieces(q_chunks[i], k_chunks[j], c, dtype)


def _flat(t):
    """(B, C, H, D) -> (B*C, H, D): the rows of every batch row back to back (a view when B == 1)."""
    return t.reshape(-1, *t.shape[2:])


def _flat_lse(lse):
    """(B, H, C) -> (H, B*C), the varlen lse layout."""
    return lse.transpose(0, 1).reshape(lse.shape[1], -1)


def block_forward(q, k, v, q_chunks, k_chunks, causal, docs, kernel="auto"):
    """Attention of the query chunks in ``q`` over the key chunks in ``k``/``v``: (out fp32, lse).

    One kernel call per chunk pair: packed documents (sorted ids) go to one variable-length call
    (``varlen.py``) covering every document and batch row of the pair. A query chunk's first result
    is copied in (what merging it into an empty result gives, bit for bit; a block of one query chunk
    keeps a variable-length call's result as it is), later ones merged."""
    b, s, h, d = q.shape
    acc = _Result(torch.Size((b, s, h, d)), torch.Size((b, h, s)), len(q_chunks), q.device)
    qs, ks, vs = _split(q, len(q_chunks), 1), _split(k, len(k_chunks), 1), _split(v, len(k_chunks), 1)
    for i, j, c, seg, pieces in _work(q_chunks, k_chunks, causal, docs, q.dtype):
        if seg is not None:
            qi = _flat(qs[i])
            o, l = varlen.varlen_forward(qi, _flat(ks[j]), _flat(vs[j]), *seg.args(varlen.cu_device(qi, kernel)),
                                         c, kernel)
            acc.fold(i, _ALL, _ALL, o.view(b, -1, h, d), l.view(h, b, -1).transpose(0, 1), owned=True)
            continue
        for rows, qr, kr, c, mask in pieces:
            o, l = kernels.forward(qs[i][rows, qr], ks[j][rows, kr], vs[j][rows, kr], c, mask, kernel)
            acc.fold(i, rows, qr, o, l)
    return acc.finish()


class _Result:
    """A block's (out, lse), per query chunk: the first result of a chunk is copied in, later ones merged
    (:func:`merge_`); chunks without any result end as out 0, lse -inf. A block of one chunk adopts an
    ``owned`` first result (a fresh contiguous tensor) instead of copying it."""

    def __init__(self, out_shape, lse_shape, chunks: int, device):
        self.shapes, self.chunks, self.device = (out_shape, lse_shape), chunks, device
        self.out = self.lse = None
        self.written = [False] * chunks

    def _parts(self):
        if self.out is None:
            self.out, self.lse = (torch.empty(shape, dtype=torch.float32, device=self.device) for shape in self.shapes)
        return _split(self.out, self.chunks, 1), _split(self.lse, self.chunks, 2)

    def fold(self, i, rows, qr, o, l, owned=False):
        whole = rows is _ALL and qr is _ALL
        if whole and owned and self.out is None and self.chunks == 1:
            self.out, self.lse, self.written[0] = o, l.contiguous(), True
            return
        outs, lses = self._parts()
        if not self.written[i]:
            self.written[i] = True
            if whole:
                outs[i].copy_(o)
                lses[i].copy_(l)
                return
            outs[i].zero_()
            lses[i].fill_(float("-inf"))
        merge_(outs[i][rows, qr], lses[i][rows, :, qr], o, l)

    def finish(self):
        outs, lses = self._parts()
        for i, done in enumerate(self.written):
            if not done:  # no key for these queries
                outs[i].zero_()
                lses[i].fill_(float("-inf"))
        return self.out, self.lse


class _Grad:
    """A block's gradient of q (or k, or v), per chunk: the first part of a chunk is copied in, later ones
    added; chunks no work touched end as 0. A block of one chunk adopts an ``owned`` first part."""

    def __init__(self, like, chunks: int):
        self.like, self.chunks, self.grad = like, chunks, None
        self.written = [False] * chunks

    def add(self, idx, rows, r, part, owned=False):
        whole = rows is _ALL and r is _ALL
        if whole and owned and self.grad is None and self.chunks == 1:
            self.grad, self.written[0] = part, True
            return
        if self.grad is None:
            self.grad = torch.empty(self.like.shape, dtype=torch.float32, device=self.like.device)
        dst = _split(self.grad, self.chunks, 1)[idx]
        if not self.written[idx]:
            self.written[idx] = True
            if whole:
                dst.copy_(part)
                return
            dst.zero_()
        dst[rows, r].add_(part)

    def finish(self):
        if self.grad is None:
            self.grad = torch.empty(self.like.shape, dtype=torch.float32, device=self.like.device)
        for t, done in zip(_split(self.grad, self.chunks, 1), self.written):
            if not done:
                t.zero_()
        return self.grad


def block_backward(dout, q, k, v, out, lse, q_chunks, k_chunks, causal, docs, kernel="auto"):
    """Partial (dq, dk, dv) of one block, given the final ``out``/``lse`` of the query rows."""
    nq, nk = len(q_chunks), len(k_chunks)
    dq, dk, dv = _Grad(q, nq), _Grad(k, nk), _Grad(v, nk)
    qs, dos, os_, ls = _split(q, nq, 1), _split(dout, nq, 1), _split(out, nq, 1), _split(lse, nq, 2)
    ks, vs = _split(k, nk, 1), _split(v, nk, 1)
    for i, j, c, seg, pieces in _work(q_chunks, k_chunks, causal, docs, q.dtype):
        if seg is not None:
            qi = _flat(qs[i])
            a, b_, c_ = varlen.varlen_backward(_flat(dos[i]), qi, _flat(ks[j]), _flat(vs[j]), _flat(os_[i]),
                                               _flat_lse(ls[i]), *seg.args(varlen.cu_device(qi, kernel)), c,
                                               kernel)
            dq.add(i, _ALL, _ALL, a.view(qs[i].shape), owned=True)
            dk.add(j, _ALL, _ALL, b_.view(ks[j].shape), owned=True)
            dv.add(j, _ALL, _ALL, c_.view(vs[j].shape), owned=True)
            continue
        for rows, qr, kr, c, mask in pieces:
            a, b_, c_ = kernels.backward(dos[i][rows, qr], qs[i][rows, qr], ks[j][rows, kr], vs[j][rows, kr],
                                         os_[i][rows, qr], ls[i][rows, :, qr], c, mask, kernel)
            dq.add(i, rows, qr, a)
            dk.add(j, rows, kr, b_)
            dv.add(j, rows, kr, c_)
    return dq.finish(), dk.finish(), dv.finish()


class _PlanCache:
    """The document plan of the last ``doc_ids`` tensor, kept while it is alive and unmodified.

    Every layer of a step passes the same ``doc_ids`` tensor: the gather, host copy and rectangle
    plan are made once per step, not per layer. All ranks of a group hit or miss together (same
    model, same calls), so a gather inside ``build`` stays collective. One cache per attention
    module: nothing is shared between modules or processes.
    """

    def __init__(self):
        self._last = None  # (weakref to doc_ids, its version, plan)

    def get(self, doc_ids, build):
        if self._last is not None:
            ref, version, plan = self._last
            if ref() is doc_ids and version == doc_ids._version:
                return plan
        plan = build()
        self._last = (weakref.ref(doc_ids), doc_ids._version, plan)
        return plan


def _save(ctx, tensors, attn, causal, docs):
    ctx.save_for_backward(*tensors)
    ctx.meta = (attn, causal, docs)


def _restore(ctx):
    """(q, k, v, out, lse, attn, causal, docs) saved by forward."""
    attn, causal, docs = ctx.meta
    return (*ctx.saved_tensors, attn, causal, docs)


# ----------------------------------------------------------------------------- ring attention
class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, attn, causal, docs):
        world, rank, layout, mine = attn.world, attn.rank, attn.layout, attn.mine
        kv = torch.stack([k, v]).contiguous()
        out = lse = None
        for step in range(world):
            if step < world - 1:  # the next hop travels while this block computes
                nxt = torch.empty_like(kv)
                pending = attn.comm.exchange([(kv, (rank + 1) % world)], [(nxt, (rank - 1) % world)], attn.group)
            o, l = block_forward(q, kv[0], kv[1], mine, _chunk_ids((rank - step) % world, world, layout), causal, docs,
                                 attn.kernel)
            if out is None:
                out, lse = o, l
            else:
                merge_(out, lse, o, l)
            if step < world - 1:
                pending.wait()
                kv = nxt
        _save(ctx, (q, k, v, out, lse), attn, causal, docs)
        return out.to(q.dtype), lse

    @staticmethod
    def backward(ctx, dout, dlse):
        """K/V travel one way as in forward; each K/V owner's dK/dV accumulator travels one hop behind.

        Both transfers overlap compute: the next K/V hop is in flight while this block computes, and
        the accumulator this rank just added to is sent on while the next block computes (it is
        received, added to and sent again; after ``world`` hops it is home). Only the last hop home
        is exposed, which is what ``cp_cost.predict_seconds`` models.
        """
        q, k, v, out, lse, attn, causal, docs = _restore(ctx)
        world, rank, layout, mine = attn.world, attn.rank, attn.layout, attn.mine
        exchange, group = attn.comm.exchange, attn.group
        nxt, prv = (rank + 1) % world, (rank - 1) % world
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        kv = torch.stack([k, v]).contiguous()
        incoming = None  # (pending transfer, buffer) of the accumulator arriving for this step's K/V owner
        for step in range(world):
            if step < world - 1:  # the next K/V hop travels while this block computes
                next_kv = torch.empty_like(kv)
                kv_pending = exchange([(kv, nxt)], [(next_kv, prv)], group)
            owner = (rank - step) % world
            a, b, c = block_backward(dout, q, kv[0], kv[1], out, lse, mine, _chunk_ids(owner, world, layout),
                                     causal, docs, attn.kernel)
            dq += a
            if incoming is None:
                acc = torch.stack([b, c]).float()
            else:
                incoming[0].wait()
                acc = incoming[1]
                acc[0] += b
                acc[1] += c
            if world > 1:  # on to the next holder of this K/V (after the last step: its owner)
                buf = torch.empty_like(acc)
                incoming = (exchange([(acc, nxt)], [(buf, prv)], group), buf)
            if step < world - 1:
                kv_pending.wait()
                kv = next_kv
        if world > 1:
            incoming[0].wait()
            acc = incoming[1]
        return dq.to(q.dtype), acc[0].to(k.dtype), acc[1].to(v.dtype), None, None, None


# ----------------------------------------------------------------------------- TokenRing
def _q_chunks_needed(owner: int, holder: int, world: int, causal: bool, layout: str) -> tuple[int, ...]:
    """Query chunks of ``owner`` that have work against ``holder``'s keys (zigzag+causal: wrapped -> 2nd half)."""
    chunks = _chunk_ids(owner, world, layout)
    if causal and layout == "zigzag" and owner < holder:
        return chunks[1:]
    return chunks


def _rows(t, chunks_all, chunks_sub, dim):
    """The rows of ``t`` (laid out as ``chunks_all``) that belong to ``chunks_sub``."""
    if len(chunks_sub) == len(chunks_all):
        return t
    parts = t.chunk(len(chunks_all), dim)
    return torch.cat([parts[chunks_all.index(c)] for c in chunks_sub], dim)


def _recv_buffers(packs, have: int, want: int) -> list[torch.Tensor]:
    """Empty buffers like ``packs`` ((tensor, seq_dim) laid out as ``have`` chunks) holding ``want`` chunks."""
    bufs = []
    for t, dim in packs:
        shape = list(t.shape)
        shape[dim] = shape[dim] // have * want
        bufs.append(torch.empty(shape, dtype=t.dtype, device=t.device))
    return bufs


def _travel(packs, attn, step, causal):
    """Post: send the package held at ``step`` to rank-1, receive the one for ``step + 1`` from rank+1.

    ``packs`` are (tensor, seq_dim) pairs laid out as the owner's needed chunks at this step.
    Returns (pending, buffers). Only the chunks the receiver needs are sent.
    """
    rank, world, layout = attn.rank, attn.world, attn.layout
    owner_now = (rank + step) % world
    have = _q_chunks_needed(owner_now, rank, world, causal, layout)
    send_to = (rank - 1) % world
    send_chunks = _q_chunks_needed(owner_now, send_to, world, causal, layout)
    owner_next = (rank + step + 1) % world
    recv_chunks = _q_chunks_needed(owner_next, rank, world, causal, layout)
    sends = [(_rows(t, have, send_chunks, dim), send_to) for t, dim in packs]
    bufs = _recv_buffers(packs, len(have), len(recv_chunks))
    return attn.comm.exchange(sends, [(b, (rank + 1) % world) for b in bufs], attn.group), bufs


def _return_results(results, attn, step, causal, like):
    """Send ``results`` (computed at ``step`` for owner rank+step) home on the return group; receive
    mine from rank-step."""
    rank, world, layout = attn.rank, attn.world, attn.layout
    owner = (rank + step) % world
    source = (rank - step) % world
    recv_chunks = _q_chunks_needed(rank, source, world, causal, layout)
    bufs = _recv_buffers(like, len(attn.mine), len(recv_chunks))
    pending = attn.comm.exchange([(r, owner) for r in results], [(b, source) for b in bufs], attn.reverse_group)
    return pending, bufs, recv_chunks


class _TokenRing(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, attn, causal, docs):
        world, rank, layout, mine = attn.world, attn.rank, attn.layout, attn.mine
        q_next = _travel([(q, 1)], attn, 0, causal) if world > 1 else None
        out, lse = block_forward(q, k, v, mine, mine, causal, docs, attn.kernel)  # step 0 overlaps Q's first hop
        returning = None
        for step in range(1, world):
            pending, [q_cur] = q_next
            pending.wait()
            if step < world - 1:  # prefetch the next Q while this block computes
                q_next = _travel([(q_cur, 1)], attn, step, causal)
            owner = (rank + step) % world
            q_chunks = _q_chunks_needed(owner, rank, world, causal, layout)
            o, l = block_forward(q_cur, k, v, q_chunks, mine, causal, docs, attn.kernel)
            if returning is not None:  # results of the previous step, sent one step late
                _merge_returned(out, lse, returning, mine)
            returning = _return_results([o, l], attn, step, causal, [(out, 1), (lse, 2)])
        if returning is not None:
            _merge_returned(out, lse, returning, mine)
        _save(ctx, (q, k, v, out, lse), attn, causal, docs)
        return out.to(q.dtype), lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, attn, causal, docs = _restore(ctx)
        world, rank, layout, mine = attn.world, attn.rank, attn.layout, attn.mine
        dout = dout.contiguous()
        packs = [(q, 1), (dout.to(q.dtype), 1), (out.to(q.dtype), 1), (lse, 2)]
        nxt = _travel(packs, attn, 0, causal) if world > 1 else None
        dq, dk, dv = block_backward(dout, q, k, v, out, lse, mine, mine, causal, docs, attn.kernel)
        returning = None
        for step in range(1, world):
            pending, cur = nxt
            pending.wait()
            if step < world - 1:
                nxt = _travel([(t, d) for t, (_, d) in zip(cur, packs)], attn, step, causal)
            owner = (rank + step) % world
            q_chunks = _q_chunks_needed(owner, rank, world, causal, layout)
            a, b, c = block_backward(cur[1], cur[0], k, v, cur[2], cur[3], q_chunks, mine, causal, docs, attn.kernel)
            dk += b
            dv += c
            if returning is not None:
                _add_returned(dq, returning, mine)
            returning = _return_results([a], attn, step, causal, [(dq, 1)])
        if returning is not None:
            _add_returned(dq, returning, mine)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def _merge_returned(out, lse, returning, mine):
    pending, (o, l), chunks = returning
    pending.wait()
    if len(chunks) == len(mine):
        merge_(out, lse, o, l)
    else:
        i = mine.index(chunks[0])
        merge_(out.chunk(len(mine), 1)[i], lse.chunk(len(mine), 2)[i], o, l)


def _add_returned(dq, returning, mine):
    pending, (d,), chunks = returning
    pending.wait()
    if len(chunks) == len(mine):
        dq += d
    else:
        dq.chunk(len(mine), 1)[mine.index(chunks[0])].add_(d)


# ----------------------------------------------------------------------------- Ulysses
class _AllToAll(torch.autograd.Function):
    """(B, S_l, H, D) sequence-sharded <-> (B, W*S_l, H/W, D) head-sharded; backward is the reverse."""

    @staticmethod
    def forward(ctx, x, attn, to_heads: bool):
        ctx.meta = (attn, to_heads)
        return _all_to_all(x, attn, to_heads)

    @staticmethod
    def backward(ctx, grad):
        attn, to_heads = ctx.meta
        return _all_to_all(grad.contiguous(), attn, not to_heads), None, None


def _all_to_all(x, attn, to_heads: bool):
    world = attn.world
    b = x.shape[0]
    if to_heads:
        s, h, d = x.shape[1], x.shape[2], x.shape[3]
        send = x.reshape(b, s, world, h // world, d).permute(2, 0, 1, 3, 4).contiguous()
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=attn.group)  # recv[w] = rank w's sequence part, my heads
        _count_all_to_all(attn, send)
        return recv.permute(1, 0, 2, 3, 4).reshape(b, world * s, h // world, d)
    s, h, d = x.shape[1] // world, x.shape[2], x.shape[3]
    send = x.reshape(b, world, s, h, d).permute(1, 0, 2, 3, 4).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=attn.group)  # recv[w] = my sequence part, rank w's heads
    _count_all_to_all(attn, send)
    return recv.permute(1, 2, 0, 3, 4).reshape(b, s, world * h, d)


def _count_all_to_all(attn, send):
    attn.comm.collective(send.numel() * send.element_size() * (attn.world - 1) // attn.world, attn.world - 1)


class _LocalAttention(torch.autograd.Function):
    """Full-sequence attention through the same block kernels (returns lse as well).

    ``chunks``: the global chunk ids of the sequence's parts in the order they are laid out (Ulysses:
    rank order after the all-to-all). Without documents or with sorted document ids over the whole
    sequence, the parts are put in their natural order once, attended as ONE chunk (one causal call; with
    packed documents one variable-length call) and put back; unsorted ids keep the chunk pairs (a dense
    mask per pair, never one over the whole sequence).
    """

    @staticmethod
    def forward(ctx, q, k, v, chunks, causal, docs, kernel="auto"):
        order = _natural_order(chunks, docs)
        if order is None:
            out, lse = block_forward(q, k, v, chunks, chunks, causal, docs, kernel)
        else:
            q, k, v = (_reorder(t, order, 1) for t in (q, k, v))
            docs = docs.whole() if docs is not None else None
            out, lse = block_forward(q, k, v, (0,), (0,), causal, docs, kernel)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.meta = (chunks, causal, docs, kernel, order)
        if order is None:
            return out.to(q.dtype), lse
        inverse = _inverse(order)
        return _reorder(out.to(q.dtype), inverse, 1), _reorder(lse, inverse, 2)

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        chunks, causal, docs, kernel, order = ctx.meta
        if order is None:
            dq, dk, dv = block_backward(dout.contiguous(), q, k, v, out, lse, chunks, chunks, causal, docs, kernel)
            return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None
        dq, dk, dv = block_backward(_reorder(dout, order, 1), q, k, v, out, lse, (0,), (0,), causal, docs, kernel)
        inverse = _inverse(order)
        return (*(_reorder(g.to(t.dtype), inverse, 1) for g, t in ((dq, q), (dk, k), (dv, v))),
                None, None, None, None)


def _natural_order(chunks, docs):
    """For parts laid out as ``chunks`` (a permutation of 0..n-1): the position of each chunk in natural
    order, or None where the pairs stay (one part already; unsorted document ids over the whole sequence)."""
    if len(chunks) == 1 or (docs is not None and not docs.whole().sorted):
        return None
    return tuple(chunks.index(c) for c in range(len(chunks)))


def _inverse(order):
    return tuple(order.index(p) for p in range(len(order)))


def _reorder(t, order, dim):
    """The parts of ``t`` along ``dim`` (``len(order)`` equal ones) in the order ``order`` (a copy; none
    for the identity)."""
    if order == tuple(range(len(order))):
        return t.contiguous()
    parts = t.chunk(len(order), dim)
    return torch.cat([parts[p] for p in order], dim)


def heads_exchange(q, k, v, attn, held, attend, want_lse=True):
    """Ulysses' frame: an all-to-all over ``attn``'s group (its ``group``, ``world``, ``comm``) turns every rank's
    sequence part of all heads into the group's parts of 1/world of the heads, laid out in group rank order
    (``held``: the chunk ids that order holds); ``attend(qh, kh, vh, held) -> (out, lse)`` runs on them and the
    output goes back by the reverse all-to-all (lse too with ``want_lse``). Ulysses attends locally; the
    two-dimensional strategies (``two_dim.py``) run ring or TokenRing across groups in its place."""
    world = attn.world
    if q.shape[2] % world or k.shape[2] % world:
        raise ValueError(f"ulysses_attention: heads ({q.shape[2]}) and kv_heads ({k.shape[2]}) must be divisible "
                         f"by the group size {world}")
    qh, kh, vh = (_AllToAll.apply(t, attn, True) for t in (q, k, v))
    out, lse = attend(qh, kh, vh, held)
    out = _AllToAll.apply(out, attn, False)
    if not want_lse:
        return out, None
    lse_seq = _all_to_all(lse.transpose(1, 2).unsqueeze(-1).contiguous(), attn, False)
    return out, lse_seq.squeeze(-1).transpose(1, 2)


def _ulysses(q, k, v, attn, causal, docs, want_lse=True):
    # After the all-to-all the sequence is in rank order of chunks: (chunks of rank 0, of rank 1, ...);
    # _LocalAttention puts it in natural order for one causal call.
    held = tuple(c for r in range(attn.world) for c in _chunk_ids(r, attn.world, attn.layout))

    def attend(qh, kh, vh, chunks):
        return _LocalAttention.apply(qh, kh, vh, chunks, causal, docs, attn.kernel)

    return heads_exchange(q, k, v, attn, held, attend, want_lse)


# ----------------------------------------------------------------------------- public API
def _check(q, k, v, layout, world):
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"expected q (B, S, H, D) and k, v (B, S, H_kv, D); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"heads ({q.shape[2]}) must be a multiple of kv_heads ({k.shape[2]})")
    n = len(_chunk_ids(0, world, layout))
    if q.shape[1] % n:
        raise ValueError(f"local sequence length {q.shape[1]} must be divisible by {n} for layout {layout!r}")


IMPLS = ("tokenring", "ring", "ulysses")


class ContextParallelAttention:
    """Attention over the shards a context-parallel group holds of each sequence.

    One instance per model (per cp group) owns everything the hot path needs, so nothing is
    module-global: the group, TokenRing's return group, the channel that posts and counts
    transfers (``comm``; a ``comms.link_sim.SimulatedLink`` in benchmarks), the block kernel
    (``auto``: chosen per block) and the cache of the current step's document plan.

    ``reverse_group`` (same ranks as ``group``) carries TokenRing's results so the two directions
    do not queue behind each other (on NCCL: separate communicators, separate streams); without
    it both directions share ``group``.
    """

    def __init__(self, impl: str, group=None, *, reverse_group=None, layout: str = "zigzag", comm: P2P | None = None,
                 kernel: str = "auto"):
        if impl not in IMPLS:
            raise ValueError(f"cp_impl: must be one of {', '.join(IMPLS)}, got {impl!r}")
        _chunk_ids(0, 1, layout)
        self.kernel = kernels.check_kernel(kernel)
        self.impl = impl
        self.group, self.world, self.rank = _group_info(group)
        self.reverse_group = reverse_group if reverse_group is not None else self.group
        self.layout = layout
        self.mine = _chunk_ids(self.rank, self.world, layout)
        self.comm = comm if comm is not None else P2P()
        self._plans = _PlanCache()

    def __call__(self, q, k, v, *, causal: bool = True, doc_ids=None, return_lse: bool = False):
        """This rank's (B, S/W, H, D) output (and lse (B, H, S/W) with ``return_lse``)."""
        _check(q, k, v, self.layout, self.world)
        out, lse = self.run(q, k, v, causal, self.document_plan(doc_ids), return_lse)
        return (out, lse) if return_lse else out

    def run(self, q, k, v, causal, docs, want_lse=True):
        """(out, lse or None) of checked shards given the step's document plan ``docs`` (a :class:`_Docs` by this
        group's chunk ids, or None): what a caller that plans documents itself (``two_dim.py``) calls."""
        if self.impl == "ulysses":
            return _ulysses(q, k, v, self, causal, docs, want_lse)
        return {"tokenring": _TokenRing, "ring": _RingAttention}[self.impl].apply(q, k, v, self, causal, docs)

    def document_plan(self, doc_ids):
        """Every chunk's document ids, by global chunk index (one all-gather of a small int tensor per step)."""
        return gathered_documents(self._plans, doc_ids, self.group, self.layout, _num_chunks(self.world, self.layout))


def gathered_documents(plans: "_PlanCache", doc_ids, group, layout: str, chunks: int):
    """The document plan of ``doc_ids`` (this rank's shard over ``group`` in ``layout``) with the whole sequence
    cut into ``chunks`` chunks, by index: one all-gather per step (cached in ``plans``); None without ids. A
    two-dimensional strategy gathers over the whole cp group and cuts the sequence for its outer ring."""
    if doc_ids is None:
        return None

    def build():
        full = unshard_sequence(doc_ids, dim=1, group=group, layout=layout)
        return _Docs(dict(enumerate(full.chunk(chunks, 1))))

    return plans.get(doc_ids, build)


class DocumentAttention:
    """Attention over whole (unsharded) sequences on one device through the block kernels.

    With packed documents this is the fast path: one variable-length call (each document of each
    row a segment) instead of a dense (S, S) mask whose cross-document work a masked kernel still
    pays for. Like :class:`ContextParallelAttention` it keeps the current step's document plan (one
    per instance).
    """

    def __init__(self, kernel: str = "auto"):
        self.kernel = kernels.check_kernel(kernel)
        self._plans = _PlanCache()

    def __call__(self, q, k, v, *, causal: bool = True, doc_ids=None, return_lse: bool = False):
        _check(q, k, v, "contiguous", 1)
        docs = self._plans.get(doc_ids, lambda: _Docs({0: doc_ids})) if doc_ids is not None else None
        out, lse = _LocalAttention.apply(q, k, v, (0,), causal, docs, self.kernel)
        return (out, lse) if return_lse else out


def local_attention(q, k, v, *, causal=True, doc_ids=None, return_lse=False, kernel="auto"):
    """One call of :class:`DocumentAttention` (no plan kept between calls)."""
    return DocumentAttention(kernel)(q, k, v, causal=causal, doc_ids=doc_ids, return_lse=return_lse)


def _one_call(impl):
    def attention(q, k, v, *, group=None, causal=True, layout="zigzag", doc_ids=None, return_lse=False,
                  reverse_group=None, comm=None, kernel="auto"):
        attn = ContextParallelAttention(impl, group, reverse_group=reverse_group, layout=layout, comm=comm,
                                        kernel=kernel)
        return attn(q, k, v, causal=causal, doc_ids=doc_ids, return_lse=return_lse)

    attention.__name__ = f"{impl}_attention"
    attention.__doc__ = (f"One call of ``ContextParallelAttention({impl!r}, ...)`` (a model keeps one instance "
                         f"instead, so the document plan is made once per step).")
    return attention


token_ring_attention = _one_call("tokenring")  # TokenRing: Q travels, K/V stay, partial results return to the owner
ring_attention = _one_call("ring")  # ring attention: Q stays, K/V travel one hop per step
ulysses_attention = _one_call("ulysses")  # Ulysses: all-to-all to head-sharded full sequences and back
