"""The Llama-style model: document masking, GQA attention, parameter and FLOP accounting."""
import math

import pytest
import torch

from loomtrain.parallel.cp.attention import DocumentAttention
from loomtrain.trainer.attention import attend, document_causal_mask, resolve_backend
from loomtrain.trainer.models.llama.model import ModelArgs, Transformer


def small_model(seed=0):
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, ffn_hidden=96, max_seq_len=64)
    m = Transformer(args)
    m.init_weights(seed)
    return m


def test_packed_documents_do_not_see_each_other():
    torch.manual_seed(0)
    m = small_model()
    a, b = torch.randint(0, 128, (1, 10)), torch.randint(0, 128, (1, 14))
    packed = torch.cat([a, b], dim=1)
    pos = torch.cat([torch.arange(10), torch.arange(14)])[None]
    doc = torch.cat([torch.zeros(10, dtype=torch.long), torch.ones(14, dtype=torch.long)])[None]
    with torch.no_grad():
        out = m(packed, pos, doc)
        alone_a, alone_b = m(a), m(b)
        unmasked = m(packed)
    torch.testing.assert_close(out[:, :10], alone_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:, 10:], alone_b, rtol=1e-5, atol=1e-5)
    assert (unmasked[:, 10:] - alone_b).abs().max() > 1e-3  # without the mask document b would see a


@pytest.mark.parametrize("doc", [
    [[0] * 4 + [1] * 5, [0] * 9],  # sorted (packed): one unmasked block per document
    [[0, 1, 0, 1, 1, 2, 0, 2, 2], [0, 0, 0, 1, 1, 1, 1, 2, 3]],  # unsorted in row 0: dense-mask path
])
@pytest.mark.parametrize("per_document", [True, False])
def test_gqa_attention_matches_explicit_softmax(monkeypatch, doc, per_document):
    """Values and gradients of attention over packed documents against an explicit masked softmax,
    through the per-document blocks and through SDPA with a dense mask."""
    from loomtrain.trainer import attention

    calls = []
    monkeypatch.setattr(attention, "PER_DOCUMENT_MIN_SEQ", 0 if per_document else 10**9)
    real = DocumentAttention.__call__
    monkeypatch.setattr(DocumentAttention, "__call__", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    torch.manual_seed(1)
    doc = torch.tensor(doc)
    q, k, v = (torch.randn(2, 9, h, 8, requires_grad=True) for h in (4, 2, 2))
    dout = torch.randn(2, 9, 4, 8)
    out = attend(q, k, v, doc)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    kr, vr = k.repeat_interleave(2, 2), v.repeat_interleave(2, 2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, kr) / math.sqrt(8)
    scores = scores.masked_fill(~document_causal_mask(doc), float("-inf"))
    ref = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), vr)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, torch.autograd.grad(ref, (q, k, v), dout)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert len(calls) == per_document


def test_parameter_count_and_flops():
    m = small_model()
    assert m.args.num_params() == sum(p.numel() for p in m.parameters())
    per_token = m.args.flops_per_token(64)
    non_embedding = m.args.num_params() - 128 * 64
    assert per_token == 6 * non_embedding + 6 * 2 * 64 * 64


def test_backend_selection_on_cpu():
    """CPU runs choose torch's CPU flash kernel; a backend this machine cannot run is refused, naming the valid
    ones; a possible forced one is kept."""
    assert resolve_backend("auto", "cpu", torch.float32, 16) == "cpu_flash"
    assert resolve_backend("math", "cpu", torch.float32, 16) == "math"
    with pytest.raises(ValueError, match="valid: auto, cpu_flash, math"):
        resolve_backend("flash_attn", "cpu", torch.bfloat16, 16)


def test_a_backend_the_machine_lacks_is_a_config_error():
    """``model.attention`` is checked with the rest of the experiment, before any work starts."""
    from loomtrain.trainer.checks import check_experiment
    from loomtrain.trainer.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="model.attention: .*cudnn"):
        check_experiment(load_config("tiny", ["model.attention=cudnn"]), 1, 1)


def test_init_is_deterministic_by_seed():
    a, b, c = small_model(3), small_model(3), small_model(4)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    assert not torch.equal(a.output.weight, c.output.weight)


def test_flash_varlen_metadata_marks_documents_and_rows():
    """cu_seqlens for flash-attn's varlen kernel (built once per forward): row and document starts."""
    import torch

    from loomtrain.trainer.attention import flash_varlen_metadata

    doc = torch.tensor([[0, 0, 0, 1, 1, 2], [0, 0, 0, 0, 0, 0]])
    cu, max_len = flash_varlen_metadata(doc)
    assert cu.tolist() == [0, 3, 5, 6, 12] and cu.dtype == torch.int32 and max_len == 6
