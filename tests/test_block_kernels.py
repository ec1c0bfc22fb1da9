"""Block kernels of context parallelism: numerics against float64 attention, per-block choice, the CUDA
kernels' calls on meta tensors, and the document decomposition into unmasked rectangles.

One query block against a diagonal key block and an earlier one, merged by log-sum-exp and differentiated
from the merged out/lse, as ring and TokenRing use the kernels: out, lse and dq/dk/dv against float64
attention. ``cpu_flash`` and ``math`` run here on CPU; ``sdpa_flash`` / ``fa3`` / ``cudnn`` /
``sdpa_efficient`` have no CPU implementation: the same comparison runs on CUDA (marked ``gpu``), and on CPU
their exact aten calls run on meta tensors (argument order, output shapes and dtypes, K/V heads, the
efficient kernel's lse padding) and their helpers run on real tensors. ``flash_attn`` runs on CPU through
a stand-in package that enforces flash-attn's contract (tests/test_attention_backends.py).
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from loomtrain.parallel.cp import block_kernels as kernels
from loomtrain.parallel.cp import attention as cp

Machine = kernels.Machine
H100 = Machine("cuda", (9, 0), (2, 13), 91000, flash_attn=False, fa3=False)
H100_FA2 = Machine("cuda", (9, 0), (2, 13), 91000, flash_attn=True, fa3=False)
H100_OLD_TORCH = Machine("cuda", (9, 0), (2, 9), 91000, flash_attn=True, fa3=False)
A100_FA2 = Machine("cuda", (8, 0), (2, 13), 91000, flash_attn=True, fa3=False)
A100 = Machine("cuda", (8, 0), (2, 13), None, flash_attn=False, fa3=False)
CPU = Machine("cpu", torch_version=(2, 13))


@pytest.mark.parametrize("device, dtype, head_dim, masked, machine, expected", [
    ("cpu", torch.float32, 64, False, CPU, "cpu_flash"),
    ("cpu", torch.bfloat16, 64, True, CPU, "cpu_flash"),
    ("cuda", torch.bfloat16, 128, False, H100, "cudnn"),  # Hopper, torch >= 2.10: cuDNN
    ("cuda", torch.bfloat16, 128, False, H100_FA2, "cudnn"),  # ... even with flash-attn installed
    ("cuda", torch.bfloat16, 256, False, H100_FA2, "flash_attn"),  # above cuDNN's 128
    ("cuda", torch.bfloat16, 256, False, H100, "sdpa_flash"),  # the largest head_dim the flash kernels take
    ("cuda", torch.bfloat16, 128, False, H100_OLD_TORCH, "flash_attn"),
    ("cuda", torch.bfloat16, 128, False, A100_FA2, "flash_attn"),
    ("cuda", torch.float16, 128, False, A100, "sdpa_flash"),
    ("cuda", torch.float16, 8, False, A100, "sdpa_flash"),
    ("cuda", torch.bfloat16, 128, True, H100_FA2, "sdpa_efficient"),  # masked
    ("cuda", torch.float32, 128, False, H100_FA2, "sdpa_efficient"),  # fp32: no flash kernel takes it
    ("cuda", torch.float32, 64, True, A100, "sdpa_efficient"),
    ("cuda", torch.bfloat16, 12, False, H100_FA2, "sdpa_efficient"),
    ("cuda", torch.bfloat16, 512, False, H100_FA2, "sdpa_efficient"),
    ("cuda", torch.float16, 264, False, A100, "sdpa_efficient"),
    ("cuda", torch.float16, 20, False, A100, "sdpa_efficient"),  # not a multiple of 8
    ("xpu", torch.bfloat16, 128, False, Machine("xpu"), "math"),
])
def test_choice(device, dtype, head_dim, masked, machine, expected):
    """Per-block choice on modelled machines: run_backend's rule, and a maskable kernel for masked blocks."""
    assert kernels.choose_for(device, dtype, head_dim, masked, probe=machine) == expected
    if not masked:
        assert kernels.run_backend(device, dtype, head_dim, probe=machine, deterministic=False) == expected


def test_forced_kernel_serves_only_what_it_can():
    """A forced kernel serves every block it can; a masked block falls back to the device's masked kernel,
    a block a half-precision kernel cannot take (fp32, head_dim) to the rule."""
    assert kernels.choose_for("cpu", torch.bfloat16, 64, False, "sdpa_flash") == "sdpa_flash"
    assert kernels.choose_for("cpu", torch.bfloat16, 64, True, "sdpa_flash") == "cpu_flash"  # no masks: falls back
    for forced in kernels.HALF_ONLY:
        assert kernels.choose_for("cuda", torch.bfloat16, 128, True, forced, H100_FA2) == "sdpa_efficient"
        assert kernels.choose_for("cuda", torch.float32, 128, False, forced, H100_FA2) == "sdpa_efficient"
        assert kernels.choose_for("cpu", torch.float32, 64, False, forced) == "cpu_flash"
    assert kernels.choose_for("cuda", torch.bfloat16, 192, False, "cudnn", H100_FA2) == "flash_attn"  # > 128
    for forced in kernels.MASKABLE:
        assert kernels.choose_for("cuda", torch.bfloat16, 128, True, forced) == forced
    with pytest.raises(ValueError, match="kernel: must be one of"):
        cp.ContextParallelAttention("ring", kernel="triton")


def _meta(*shape, dtype):
    return torch.empty(*shape, device="meta", dtype=dtype)


@pytest.mark.parametrize("kernel, dtype", [("sdpa_flash", torch.bfloat16), ("cudnn", torch.bfloat16),
                                           ("cudnn", torch.float16), ("sdpa_efficient", torch.float32),
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


class _AtenCalls(TorchDispatchMode):
    """Records the aten calls made under it (name, positional arguments) and runs them."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((func.overloadpacket.__name__, args))
        return func(*args, **(kwargs or {}))

    def heads(self, name, *positions):
        """The head count (dim 1, BHSD) of the arguments at ``positions`` of every call of ``name``."""
        return [tuple(args[i].shape[1] for i in positions) for op, args in self.calls if op == name]


# kernel -> (its forward aten op: q, k, v at 0-2; its backward aten op: q, k, v at 1-3)
ATEN_CALLS = {
    "sdpa_flash": ("_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward"),
    "fa3": ("_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward"),
    "cudnn": ("_scaled_dot_product_cudnn_attention", "_scaled_dot_product_cudnn_attention_backward"),
    "sdpa_efficient": ("_scaled_dot_product_efficient_attention",
                       "_scaled_dot_product_efficient_attention_backward"),
}


@pytest.mark.parametrize("kernel, kv_heads", [("sdpa_flash", 2), ("fa3", 2), ("cudnn", 2), ("sdpa_efficient", 8)])
def test_grouped_query_kernels_get_kv_heads_unrepeated(monkeypatch, kernel, kv_heads):
    """GQA 8/2: torch's flash op (FA2 or FA3) and cuDNN take K/V with their own 2 heads (4x less K/V
    traffic at this ratio than repeating them); the memory-efficient op checks q/k/v heads are equal, so
    it gets them repeated. dk/dv come back with k's heads either way."""
    monkeypatch.setattr(kernels, "_FA3_ACTIVE", True)  # no FA3 here: its activation is tested apart
    b, s, h, hkv, d = 2, 24, 8, 2, 16
    dtype = torch.float32 if kernel == "sdpa_efficient" else torch.bfloat16
    q, dout = _meta(b, s, h, d, dtype=dtype), _meta(b, s, h, d, dtype=dtype)
    k, v = _meta(b, s, hkv, d, dtype=dtype), _meta(b, s, hkv, d, dtype=dtype)
    fwd, bwd = ATEN_CALLS[kernel]
    with _AtenCalls() as calls:
        out, lse = kernels.forward(q, k, v, True, None, kernel)
        dq, dk, dv = kernels.backward(dout, q, k, v, out, lse, True, None, kernel)
    assert calls.heads(fwd, 0, 1, 2) == [(h, kv_heads, kv_heads)]
    assert calls.heads(bwd, 1, 2, 3) == [(h, kv_heads, kv_heads)]
    assert [t.shape for t in (dq, dk, dv)] == [q.shape, k.shape, k.shape]


def test_cpu_flash_gets_kv_heads_unrepeated():
    """torch 2.13's CPU flash op takes fewer K/V heads (probed once): K/V reach it with their own heads,
    and the block's numerics still match float64 attention (the numerics tests below, GQA 4/2)."""
    assert kernels._cpu_flash_gqa()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 8, heads, 8, generator=g) for heads in (4, 2, 2))
    with _AtenCalls() as calls:
        out, lse = kernels.forward(q, k, v, True, None, "cpu_flash")
        kernels.backward(torch.ones_like(q), q, k, v, out, lse, True, None, "cpu_flash")
    assert calls.heads("_scaled_dot_product_flash_attention_for_cpu", 0, 1, 2) == [(4, 2, 2)]
    assert calls.heads("_scaled_dot_product_flash_attention_for_cpu_backward", 1, 2, 3) == [(4, 2, 2)]


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


def test_efficient_kernel_bias_rows_are_16_aligned():
    """The memory-efficient kernel reads its bias in rows of 16 elements: the expanded bias keeps the mask's
    values and shape, per head, over storage whose rows are padded to a multiple of 16."""
    b, h, sq = 2, 4, 5
    for sk in (12, 16, 20):
        mask = torch.randn(b, 1, sq, sk)
        bias = kernels._aligned_bias(mask, h)
        assert bias.shape == (b, h, sq, sk) and bias.stride(-2) % 16 == 0 and bias.stride(-1) == 1, sk
        assert torch.equal(bias, mask.expand(b, h, sq, sk)), sk
    assert kernels._aligned_bias(None, h) is None


# ----------------------------------------------------------------------------- numerics
def _case(name, seed=0, b=2, sq=40, sk=20, h=4, hkv=2, d=16):
    """Queries (B, sq), and two key blocks: the diagonal (the queries' own positions, causal) and ``sk``
    earlier keys. ``masked``: unsorted document ids on both (dense additive masks); the earlier block then
    has rows that see nothing. sq is not a multiple of 32 nor sk of 16 (the efficient kernel pads both)."""
    g = torch.Generator().manual_seed(seed)
    q, dout = torch.randn(b, sq, h, d, generator=g), torch.randn(b, sq, h, d, generator=g)
    k, v = torch.randn(b, sq + sk, hkv, d, generator=g), torch.randn(b, sq + sk, hkv, d, generator=g)
    diagonal = torch.ones(sq, sq, dtype=torch.bool).tril().expand(b, sq, sq)
    earlier = torch.ones(b, sq, sk, dtype=torch.bool)
    if name == "masked":
        q_doc, k_doc = torch.randint(0, 3, (b, sq), generator=g), torch.randint(1, 3, (b, sk), generator=g)
        diagonal = diagonal & (q_doc[:, :, None] == q_doc[:, None, :])
        earlier = q_doc[:, :, None] == k_doc[:, None, :]
        assert not earlier.any(-1).all()  # document 0 is not among the earlier keys
    blocks = [(slice(0, sq), True, diagonal)]  # (key rows, causal, allowed (B, sq, keys))
    if name != "diagonal":
        blocks.append((slice(sq, sq + sk), False, earlier))
    return q, k, v, dout, blocks, name == "masked"


def _reference(q, k, v, dout, allowed):
    """Float64 attention where ``allowed`` (B, Sq, Sk): (out, lse (B, H, Sq), dq, dk, dv)."""
    assert allowed.any(-1).all()  # every query sees a key (its own, causally)
    rep = q.shape[2] // k.shape[2]
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    scores = torch.einsum("bqhd,bkhd->bhqk", q64, k64.repeat_interleave(rep, 2)) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    lse = torch.logsumexp(scores, -1)
    out = torch.einsum("bhqk,bkhd->bqhd", torch.exp(scores - lse[..., None]), v64.repeat_interleave(rep, 2))
    out.backward(dout.double())
    return out.detach(), lse.detach(), q64.grad, k64.grad, v64.grad


def _relative_errors(kernel, device, dtype, case):
    """Max error of out, lse, dq, dk, dv of ``kernel`` over the blocks of ``case`` (run as ring attention runs
    them: each block's forward merged into (out, lse), each block's backward from the merged result),
    relative to the largest float64 value (or 1). Inputs are rounded to ``dtype`` first, the reference
    computed from the rounded values: the errors are the kernel's own."""
    q, k, v, dout, blocks, masked = _case(case)
    q, k, v, dout = (t.to(dtype) for t in (q, k, v, dout))
    allowed = torch.cat([a for _, _, a in blocks], -1)
    ref = _reference(q, k[:, :allowed.shape[-1]], v[:, :allowed.shape[-1]], dout.float(), allowed)
    q, k, v, dout = (t.to(device) for t in (q, k, v, dout))
    b, sq, h, d = q.shape
    out = torch.zeros(b, sq, h, d, device=device)
    lse = torch.full((b, h, sq), float("-inf"), device=device)
    masks = []
    for keys, causal, a in blocks:
        mask = None
        if masked:
            mask = torch.zeros(a.shape, dtype=dtype).masked_fill_(~a, float("-inf")).unsqueeze(1).to(device)
        assert kernels.choose(q, mask is not None, kernel) == kernel  # the kernel under test serves the block
        block_out, block_lse = kernels.forward(q, k[:, keys], v[:, keys], causal, mask, kernel)
        assert (block_out.dtype, block_lse.dtype, block_lse.shape) == (torch.float32, torch.float32, (b, h, sq))
        cp.merge_(out, lse, block_out, block_lse)
        masks.append(mask)
    dq = torch.zeros(q.shape, device=device)
    dk, dv = [], []
    for (keys, causal, _), mask in zip(blocks, masks):
        a, b_, c = kernels.backward(dout, q, k[:, keys], v[:, keys], out, lse, causal, mask, kernel)
        assert {t.dtype for t in (a, b_, c)} == {torch.float32}
        dq += a
        dk.append(b_)
        dv.append(c)
    got = (out, lse, dq, torch.cat(dk, 1), torch.cat(dv, 1))
    return {name: ((x.double().cpu() - r).abs().max() / r.abs().max().clamp(min=1)).item()
            for name, x, r in zip(("out", "lse", "dq", "dk", "dv"), got, ref)}


CASES = ("diagonal", "diagonal_and_earlier", "masked")
# Half precision: the rounding of the outputs and of a flash kernel's intermediates (probabilities and their
# gradients go through the input dtype): 8 units of 2^-8 (bfloat16), 16 of 2^-11 (float16). cpu_flash stays
# within 5.5e-3 and 6.5e-4 here; a wrong scale, lse base, GQA reduction or dead row is off by 1e-1 or more.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 8 * 2 ** -8, torch.float16: 16 * 2 ** -11}


@pytest.mark.parametrize("kernel", ["cpu_flash", "math"])
@pytest.mark.parametrize("case", CASES)
def test_cpu_kernels_match_float64_attention(kernel, case):
    for name, err in _relative_errors(kernel, "cpu", torch.float32, case).items():
        assert err <= TOLERANCE[torch.float32], (name, err)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES)
def test_cpu_flash_in_half_precision_matches_float64_attention(dtype, case):
    """The half-precision tolerances the CUDA kernels are held to, met by the CPU flash kernel."""
    for name, err in _relative_errors("cpu_flash", "cpu", dtype, case).items():
        assert err <= TOLERANCE[dtype], (name, err)


# The CUDA kernels in the dtypes ``choose`` gives them (sdpa_flash: half precision, no masks; sdpa_efficient:
# float32 and every masked block), held to the tolerances of the CPU kernels in the same dtypes.
CUDA_RUNS = [(kernel, dtype, case) for kernel, dtypes, cases in [
    ("sdpa_flash", (torch.bfloat16, torch.float16), ("diagonal", "diagonal_and_earlier")),
    ("cudnn", (torch.bfloat16, torch.float16), ("diagonal", "diagonal_and_earlier")),
    ("fa3", (torch.bfloat16, torch.float16), ("diagonal", "diagonal_and_earlier")),
    ("flash_attn", (torch.bfloat16, torch.float16), ("diagonal", "diagonal_and_earlier")),
    ("sdpa_efficient", (torch.float32, torch.bfloat16, torch.float16), CASES)]
    for dtype in dtypes for case in cases]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kernel, dtype, case", CUDA_RUNS, ids=str)
def test_cuda_kernels_match_float64_attention(kernel, dtype, case):
    """Out, lse (natural log, rows cut back from the efficient kernel's padding, cuDNN's trailing 1
    dropped), dq and dk/dv (with the kv heads) of each CUDA kernel this GPU offers (torch's flash op, FA3
    through it, cuDNN, flash-attn, memory-efficient), merged and differentiated as ring attention does."""
    # fp32 on CUDA: the kernels' matmuls may run in TF32-based arithmetic; 1e-4 still fails a wrong scale,
    # lse base, GQA reduction or dead-row handling by orders of magnitude.
    tolerance = {torch.float32: 1e-4}.get(dtype, TOLERANCE[dtype])
    if kernel not in kernels.available_backends("cuda"):
        pytest.skip(f"{kernel} is not available on this GPU: {kernels.machine('cuda')}")
    for name, err in _relative_errors(kernel, "cuda", dtype, case).items():
        assert err <= tolerance, (name, err)


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
