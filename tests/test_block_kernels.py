"""Block kernels of context parallelism: run-time choice, the CUDA kernels' calls on meta tensors,
and the document decomposition into unmasked rectangles.

The numerics of ``cpu_flash`` and ``math`` are tested against full attention in test_context.py.
``sdpa_flash`` / ``sdpa_efficient`` have no CPU implementation: here their exact aten calls run on
meta tensors (argument order, output shapes, the efficient kernel's lse padding), which is what
can be checked without a GPU. ``flash_attn`` is not exercised at all (not installable here).
"""

import pytest
import torch

from loomtrain.parallel.cp import block_kernels as kernels
from loomtrain.parallel.cp import attention as cp


@pytest.mark.parametrize("device, dtype, head_dim, masked, flash_attn, expected", [
    ("cpu", torch.float32, 64, False, False, "cpu_flash"),
    ("cpu", torch.bfloat16, 64, True, True, "cpu_flash"),
    ("cuda", torch.bfloat16, 128, False, True, "flash_attn"),
    ("cuda", torch.float16, 128, False, False, "sdpa_flash"),
    ("cuda", torch.bfloat16, 128, True, True, "sdpa_efficient"),
    ("cuda", torch.float32, 128, False, True, "sdpa_efficient"),
    ("cuda", torch.bfloat16, 12, False, True, "sdpa_efficient"),
    ("cuda", torch.bfloat16, 512, False, True, "sdpa_efficient"),
    ("xpu", torch.bfloat16, 128, False, True, "math"),
])
def test_choice(monkeypatch, device, dtype, head_dim, masked, flash_attn, expected):
    monkeypatch.setattr(kernels, "flash_attn_installed", lambda: flash_attn)
    assert kernels.choose_for(device, dtype, head_dim, masked) == expected


def test_forced_kernel_serves_only_what_it_can():
    assert kernels.choose_for("cpu", torch.bfloat16, 64, False, "sdpa_flash") == "sdpa_flash"
    assert kernels.choose_for("cpu", torch.bfloat16, 64, True, "sdpa_flash") == "cpu_flash"  # no masks: falls back
    with pytest.raises(ValueError, match="kernel: must be one of"):
        cp.ContextParallelAttention("ring", kernel="triton")


def _meta(*shape, dtype):
    return torch.empty(*shape, device="meta", dtype=dtype)


@pytest.mark.parametrize("kernel, dtype", [("sdpa_flash", torch.bfloat16), ("sdpa_efficient", torch.float32),
                                           ("sdpa_efficient", torch.bfloat16)])
@pytest.mark.parametrize("k_chunks", [(0, 3), (1, 2)])
def test_cuda_kernel_calls_on_meta(kernel, dtype, k_chunks):
    """A zigzag rank's block (chunks 0 and 3 of 4) against a diagonal and a full key block, GQA 8/2."""
    b, s, h, hkv, d = 2, 24, 8, 2, 16
    q, dout = _meta(b, s, h, d, dtype=dtype), _meta(b, s, h, d, dtype=dtype)
    k, v = _meta(b, s, hkv, d, dtype=dtype), _meta(b, s, hkv, d, dtype=dtype)
    out, lse = cp.block_forward(q, k, v, (0, 3), k_chunks, True, None, kernel)
    assert (out.shape, out.dtype, lse.shape, lse.dtype) == ((b, s, h, d), torch.float32, (b, h, s), torch.float32)
    dq, dk, dv = cp.block_backward(dout, q, k, v, out, lse, (0, 3), k_chunks, True, None, kernel)
    assert [t.shape for t in (dq, dk, dv)] == [q.shape, k.shape, k.shape]
    assert {t.dtype for t in (dq, dk, dv)} == {torch.float32}


def test_efficient_kernel_with_unaligned_mask_on_meta():
    """A masked block whose key length (12) is not a multiple of 16 nor its query length of 32."""
    b, sq, sk, h, d = 1, 20, 12, 4, 8
    q, dout = _meta(b, sq, h, d, dtype=torch.float32), _meta(b, sq, h, d, dtype=torch.float32)
    k, v = _meta(b, sk, 2, d, dtype=torch.float32), _meta(b, sk, 2, d, dtype=torch.float32)
    mask = _meta(b, 1, sq, sk, dtype=torch.float32)
    out, lse = kernels.forward(q, k, v, False, mask, "sdpa_efficient")
    assert (out.shape, lse.shape) == ((b, sq, h, d), (b, h, sq))
    dq, dk, dv = kernels.backward(dout, q, k, v, out, lse, False, mask, "sdpa_efficient")
    assert [t.shape for t in (dq, dk, dv)] == [q.shape, k.shape, k.shape]


def _allowed_by_pieces(pieces, b, sq, sk):
    allowed = torch.zeros(b, sq, sk, dtype=torch.int64)
    for rows, qr, kr, causal, mask in pieces:
        assert mask is None
        block = torch.ones(allowed[rows, qr, kr].shape[1:], dtype=torch.int64)
        allowed[rows, qr, kr] += block.tril() if causal else block
    return allowed


@pytest.mark.parametrize("seed", range(20))
def test_sorted_documents_become_exact_unmasked_rectangles(seed):
    """Ids sorted within each chunk (packed documents are; across chunks they need not be, as here):
    the rectangles cover exactly the same-document (and causal) entries, each once."""
    g = torch.Generator().manual_seed(seed)
    b, chunk, n = 3, 16, 4
    docs = cp._Docs({c: torch.sort(torch.randint(0, 5, (b, chunk), generator=g), dim=1).values for c in range(n)})
    assert docs.sorted
    for qc in range(n):
        for kc in range(qc + 1):
            causal = qc == kc
            got = _allowed_by_pieces(docs.pieces(qc, kc, causal, torch.float32), b, chunk, chunk)
            q_doc, k_doc = docs.chunks[qc], docs.chunks[kc]
            want = q_doc[:, :, None] == k_doc[:, None, :]
            if causal:
                want &= torch.ones(chunk, chunk, dtype=torch.bool).tril()
            assert torch.equal(got, want.long()), (qc, kc)


def test_unsorted_documents_use_a_dense_mask():
    full = torch.tensor([[0, 1, 1, 0, 0, 0, 2, 2]])
    docs = cp._Docs(dict(enumerate(full.chunk(2, 1))))
    assert not docs.sorted
    [(rows, qr, kr, causal, mask)] = docs.pieces(1, 0, False, torch.float32)
    assert mask.shape == (1, 1, 4, 4)
    assert torch.equal(torch.isfinite(mask[0, 0]),
                       torch.tensor([[True, False, False, True]] * 2 + [[False] * 4] * 2))
