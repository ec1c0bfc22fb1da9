"""Reed-Solomon over GF(2^8): field arithmetic, MDS property over random erasures, errors."""
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loomtrain.faulttol import erasure
from loomtrain.faulttol.erasure import EXP, ReedSolomon, _combine, gf_invert_matrix, gf_mul


@pytest.fixture(scope="module", params=["torch", "isa-l"])
def kernel(request):
    """Runs a test on both kernels: the torch code (GPU tensors, and the fallback) and ISA-L's on CPU.
    ISA-L is optional (the ``ec`` extra, pyeclib's wheel, or the system's libisal): without it, the torch
    code serves every shard and the ISA-L pass is skipped."""
    erasure._isal_lib = False if request.param == "torch" else None
    if request.param == "isa-l" and erasure.isal() is None:
        pytest.skip("ISA-L not found (pip install pyeclib, or apt install libisal2)")
    yield request.param
    erasure._isal_lib = None


both_kernels = pytest.mark.usefixtures("kernel")


def test_isal_and_torch_compute_the_same_parity(monkeypatch):
    """Snapshots encoded on one machine decode on another whichever kernel each has. Not run per kernel: it
    switches between the two itself."""
    monkeypatch.setattr(erasure, "_isal_lib", None)  # found again (a kernel pass may have turned it off)
    if erasure.isal() is None:
        pytest.skip("ISA-L not found (pip install pyeclib, or apt install libisal2)")
    lib = erasure._isal_lib
    for k, m, n in [(1, 1, 1), (3, 2, 7), (4, 3, 1000), (8, 2, 4097), (32, 8, 65), (5, 1, 8)]:
        data = [torch.randint(0, 256, (n,), dtype=torch.uint8) for _ in range(k)]
        rs = ReedSolomon(k, m)
        fast = rs.encode(data)
        erasure._isal_lib = False
        slow = rs.encode(data)
        survivors = {i: s for i, s in enumerate(data + slow) if i >= min(m, k)}
        slow_decoded = rs.decode(survivors)
        erasure._isal_lib = lib
        assert all(torch.equal(a, b) for a, b in zip(fast, slow)), (k, m, n)
        assert all(torch.equal(a, b) for a, b in zip(rs.decode(survivors), slow_decoded)), (k, m, n)


def test_word_arithmetic_matches_scalar_field_for_every_constant():
    x = torch.arange(256, dtype=torch.uint8).repeat(2)  # 512 bytes = 64 words
    for c in range(256):
        got = _combine([c], [x.view(torch.int64)]).view(torch.uint8)
        assert got.tolist() == [gf_mul(c, int(v)) for v in x], c


def test_field_axioms_sample():
    for a in range(1, 256, 7):
        for b in range(1, 256, 11):
            assert gf_mul(a, b) == gf_mul(b, a)
            assert gf_mul(gf_mul(a, b), gf_invert_matrix([[b]])[0][0]) == a


@both_kernels
def test_parity_rows_are_xor_and_raid6():
    rs = ReedSolomon(5, 2)
    data = [torch.randint(0, 256, (33,), dtype=torch.uint8) for _ in range(5)]
    p, q = rs.encode(data)
    xor = data[0].clone()
    for d in data[1:]:
        xor ^= d
    assert torch.equal(p, xor)
    expect_q = [0] * 33
    for j, d in enumerate(data):
        expect_q = [e ^ gf_mul(EXP[j], int(v)) for e, v in zip(expect_q, d)]
    assert q.tolist() == expect_q


DTYPES = [torch.float32, torch.bfloat16, torch.int64, torch.float16, torch.uint8, torch.int32]


@both_kernels
@settings(max_examples=60, deadline=None)
@given(k=st.integers(1, 32), m=st.integers(1, 8), length=st.integers(1, 300), seed=st.integers(0, 2 ** 31),
       dtype=st.sampled_from(DTYPES))
def test_any_k_shards_recover_the_data(k, m, length, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    raw = [torch.randn(length, generator=g).to(dtype) if dtype.is_floating_point
           else torch.randint(0, 100, (length,), generator=g).to(dtype) for _ in range(k)]
    data = [t.view(torch.uint8) for t in raw]  # any dtype, reinterpreted as bytes (odd lengths too)
    rs = ReedSolomon(k, m)
    parity = rs.encode(data)
    assert len(parity) == m and all(p.numel() == data[0].numel() for p in parity)
    everything = data + parity
    lost = rng.sample(range(k + m), rng.randint(0, m))  # any pattern of up to m erasures
    survivors = {i: everything[i] for i in range(k + m) if i not in lost}
    rebuilt = rs.decode(survivors)
    for r, original in zip(rebuilt, raw):
        assert torch.equal(r.view(dtype), original)


@both_kernels
def test_clear_errors():
    rs = ReedSolomon(4, 2)
    data = [torch.zeros(8, dtype=torch.uint8)] * 4
    shards = dict(enumerate(data + rs.encode(data)))
    with pytest.raises(ValueError, match=r"decode: 1 shard\(s\) short: need any 4 of 6, have 3 \(missing indices \[0, 1, 2\]\)"):
        rs.decode({i: shards[i] for i in (3, 4, 5)})
    with pytest.raises(ValueError, match="1-D torch.uint8"):
        rs.encode([torch.zeros(8)] * 4)
    with pytest.raises(ValueError, match="equal lengths"):
        rs.encode([torch.zeros(8, dtype=torch.uint8)] * 3 + [torch.zeros(9, dtype=torch.uint8)])
    with pytest.raises(ValueError, match="k: data shards must be 1..32"):
        ReedSolomon(33, 1)
    with pytest.raises(ValueError, match="m: parity shards must be 1..8"):
        ReedSolomon(4, 9)


@both_kernels
def test_blocks_are_stitched_correctly(monkeypatch):
    monkeypatch.setattr(erasure, "BLOCK_WORDS", 3)  # many blocks and a ragged last one
    monkeypatch.setattr(erasure, "ISAL_BLOCK", 24)
    rs = ReedSolomon(3, 3)
    data = [torch.randint(0, 256, (203,), dtype=torch.uint8) for _ in range(3)]
    monkeypatch.setattr(erasure, "BLOCK_WORDS", 1 << 17)
    monkeypatch.setattr(erasure, "ISAL_BLOCK", 1 << 26)
    reference = rs.encode(data)
    monkeypatch.setattr(erasure, "BLOCK_WORDS", 3)
    monkeypatch.setattr(erasure, "ISAL_BLOCK", 24)
    assert all(torch.equal(a, b) for a, b in zip(rs.encode(data), reference))
    rebuilt = rs.decode({1: data[1], 3: reference[0], 5: reference[2]})
    assert all(torch.equal(a, b) for a, b in zip(rebuilt, data))
