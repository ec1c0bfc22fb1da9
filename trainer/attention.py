"""The model's attention, on the backend one place chooses for the run.

``parallel/cp/block_kernels.py::run_backend`` picks the backend from the device, dtype and head size
(cuDNN, FlashAttention-3, flash-attn 2, torch flash, memory-efficient, CPU flash, math); the same name runs
here and in every context-parallel block. Without packed documents a row is one causal call: torch SDPA
pinned to that backend (grouped-query attention native, no K/V repeat), or flash-attn's function. Packed
documents go through ``DocumentAttention`` (the block kernels; flash-attn: its varlen function), compiled CUDA
blocks through FlexAttention's document block mask, and short CPU rows through one masked SDPA call.

Inputs are ``(batch, seq, heads, head_dim)`` with ``kv_heads`` dividing ``heads``
(grouped-query attention). ``doc_ids`` (batch, seq), when given, marks which packed
document each token belongs to; attention stays inside a document.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask

from loomtrain.parallel.cp import block_kernels as kernels
from loomtrain.parallel.cp.attention import DocumentAttention


def resolve_backend(requested: str, device_type: str, dtype: torch.dtype, head_dim: int) -> str:
    """``model.attention`` for this run: ``auto`` -> the chooser's pick; a named backend is checked against
    what this machine, dtype and head size allow (a ValueError naming the valid ones). Activates it
    (FlashAttention-3 switches torch's flash op once per process)."""
    return kernels.activate(kernels.run_backend(device_type, dtype, head_dim, requested))


def document_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """Boolean (B, 1, S, S) mask: query i sees key j iff j <= i and both are in the same document."""
    seqlen = doc_ids.shape[1]
    causal = torch.ones(seqlen, seqlen, dtype=torch.bool, device=doc_ids.device).tril()
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
    return (same_doc & causal).unsqueeze(1)


# Below this length one batched masked SDPA call beats a kernel call per document (measured on
# CPU, 2 threads: 16x256 tokens 2 docs/row 0.050 s dense vs 0.055 s blocks; 8x512 0.093 vs 0.067;
# 1x4096 with 8 docs 0.75 vs 0.11).
PER_DOCUMENT_MIN_SEQ = 512


def document_block_mask(doc_ids: torch.Tensor):
    """FlexAttention's block mask for causal attention inside packed documents: blocks that cross documents are
    skipped, not computed and masked, and no (B, 1, S, S) mask exists (4 GiB per row at 64K). Built once per
    forward, outside the compiled blocks (on CUDA by a compiled builder, which never materializes S x S)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def same_document_causal(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])

    bsz, seqlen = doc_ids.shape
    return create_block_mask(same_document_causal, bsz, None, seqlen, seqlen, device=doc_ids.device,
                             _compile=doc_ids.is_cuda)


def _flex(q, k, v, block_mask):
    from torch.nn.attention.flex_attention import flex_attention

    out = flex_attention(*(t.transpose(1, 2) for t in (q, k, v)), block_mask=block_mask,
                         enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


def _sdpa(q, k, v, doc_ids, documents, backend):
    if doc_ids is not None and (q.is_cuda or q.shape[1] >= PER_DOCUMENT_MIN_SEQ) \
            and not torch.compiler.is_compiling():
        # One variable-length call over the documents (exact; skips all cross-document work, which a
        # dense mask still computes). Compiled CPU blocks keep the dense mask (it traces cleanly; CUDA ones
        # get FlexAttention's block mask instead, ``document_block_mask``).
        return (documents or DocumentAttention(backend))(q, k, v, causal=True, doc_ids=doc_ids)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    gqa = q.shape[1] != k.shape[1]
    if gqa and doc_ids is None and backend == "sdpa_efficient":
        # torch's memory-efficient kernel takes no grouped-query attention on CUDA ("No available kernel" with
        # enable_gqa, torch 2.11 on an H200): K/V repeated to the query heads, as the block kernels do
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
        gqa = False
    if doc_ids is not None:  # short CPU rows: one masked call (masks need a maskable kernel, not flash)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=document_causal_mask(doc_ids), enable_gqa=gqa)
    else:
        with sdpa_kernel(getattr(SDPBackend, kernels.SDPA_BACKEND[backend])):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    return out.transpose(1, 2)


def flash_varlen_metadata(doc_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(cu_seqlens, max document length) over the flattened (B*S) token stream; a row boundary is a
    document boundary too. One host sync (the max length); built once per forward, not per layer."""
    bsz, seqlen = doc_ids.shape
    flat = doc_ids + torch.arange(bsz, device=doc_ids.device)[:, None] * (doc_ids.max() + 1)
    starts = torch.ones_like(flat, dtype=torch.bool).flatten()
    starts[1:] = flat.flatten()[1:] != flat.flatten()[:-1]
    idx = starts.nonzero().flatten()
    cu = torch.cat([idx, torch.tensor([bsz * seqlen], device=idx.device)]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def _flash_attn(q, k, v, doc_ids, varlen):  # pragma: no cover - needs CUDA + flash-attn
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    if doc_ids is None:
        return flash_attn_func(q, k, v, causal=True)
    cu, max_len = varlen if varlen is not None else flash_varlen_metadata(doc_ids)
    out = flash_attn_varlen_func(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, cu, max_len, max_len,
                                 causal=True)
    return out.view_as(q)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: torch.Tensor | None,
           backend: str = "cpu_flash", context_parallel=None, varlen=None, documents=None) -> torch.Tensor:
    """``context_parallel``: the model's ``ContextParallelAttention`` (q/k/v are then this rank's zigzag
    shard); ``varlen``: flash-attn document metadata and ``documents``: a ``DocumentAttention`` holding
    the per-document plan (or, for compiled blocks, FlexAttention's ``BlockMask``), both made once per forward
    rather than per layer."""
    if context_parallel is not None:
        return context_parallel(q, k, v, causal=True, doc_ids=doc_ids)
    if isinstance(documents, BlockMask):  # compiled blocks: FlexAttention over the document block mask
        return _flex(q, k, v, documents)
    if backend == "flash_attn":
        return _flash_attn(q, k, v, doc_ids, varlen)
    return _sdpa(q, k, v, doc_ids, documents, backend)
