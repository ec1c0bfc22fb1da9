"""The run's attention backend (``block_kernels.run_backend``) on modelled machines, and flash-attn's contract
modelled on CPU (issue 23, items 2, 8, 11, 12).

No GPU here: machines are ``block_kernels.Machine`` values (an H100 with and without flash-attn, FA3 and
cuDNN; an A100; a B200; a T4), and flash-attn is a stand-in package (``fake_flash_attn``) with flash-attn
2.8.3's ``_flash_attn_forward`` / ``_flash_attn_backward`` signatures (flash_attn/flash_attn_interface.py)
that enforces what its C++ (csrc/flash_attn/flash_api.cpp, ``mha_fwd`` / ``mha_bwd``) checks: fp16/bf16
only, q/k/v (and out, dout) of one dtype, the last dimension contiguous, head_dim a multiple of 8 and at
most 256, K/V heads dividing query heads, dq/dk/dv shaped like q/k/v; then computes with torch on CPU
(the backward from the given out and softmax_lse, as the kernel does).
"""
import inspect
import sys
import types

import pytest
import torch

from loomtrain.parallel.cp import block_kernels as kernels
from test_block_kernels import CASES, TOLERANCE, _relative_errors

Machine = kernels.Machine
H100 = Machine("cuda", (9, 0), (2, 13), 91000)
H100_FA2 = Machine("cuda", (9, 0), (2, 13), 91000, flash_attn=True)
H100_FA3 = Machine("cuda", (9, 0), (2, 13), 91000, flash_attn=True, fa3=True)
H100_NO_CUDNN = Machine("cuda", (9, 0), (2, 13), None, flash_attn=True)
H100_TORCH_2_9 = Machine("cuda", (9, 0), (2, 9), 91000)
A100_FA2 = Machine("cuda", (8, 0), (2, 13), 91000, flash_attn=True)
B200_FA2 = Machine("cuda", (10, 0), (2, 13), 91000, flash_attn=True, fa3=True)  # flash-attn 2 / FA3: no sm100
T4 = Machine("cuda", (7, 5), (2, 13), 91000, flash_attn=True)
MACHINES = [H100, H100_FA2, H100_FA3, H100_NO_CUDNN, H100_TORCH_2_9, A100_FA2, B200_FA2, T4]
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


@pytest.mark.parametrize("machine, dtype, head_dim, expected", [
    (H100_FA3, BF16, 128, "fa3"),
    (H100_FA3, FP16, 256, "fa3"),
    (H100, BF16, 128, "cudnn"),
    (H100_FA2, BF16, 64, "cudnn"),
    (H100_FA2, BF16, 256, "flash_attn"),  # cuDNN stops at 128 here
    (H100, BF16, 256, "sdpa_flash"),
    (H100_NO_CUDNN, BF16, 128, "flash_attn"),
    (H100_TORCH_2_9, BF16, 128, "sdpa_flash"),  # cuDNN preferred from torch 2.10
    (A100_FA2, BF16, 128, "flash_attn"),  # cuDNN preferred on Hopper and later only
    (B200_FA2, BF16, 128, "cudnn"),
    (B200_FA2, BF16, 256, "sdpa_flash"),
    (T4, FP16, 64, "sdpa_efficient"),  # no flash kernel before sm80
    (H100_FA3, FP32, 128, "sdpa_efficient"),
    (H100_FA3, BF16, 20, "sdpa_efficient"),
    (H100_FA3, BF16, 320, "sdpa_efficient"),
])
def test_run_backend_on_modelled_machines(machine, dtype, head_dim, expected):
    """FA3 on Hopper when installed, else cuDNN on sm90+ with torch >= 2.10 (head_dim <= 128), else
    flash-attn 2 where its kernels run (sm8x/sm90), else torch's flash op, else the memory-efficient op."""
    assert kernels.run_backend("cuda", dtype, head_dim, probe=machine, deterministic=False) == expected


def test_cpu_runs_cpu_flash_and_other_devices_math():
    assert kernels.run_backend("cpu", FP32, 64, probe=Machine("cpu")) == "cpu_flash"
    assert kernels.run_backend("cpu", BF16, 12, probe=Machine("cpu")) == "cpu_flash"
    assert kernels.run_backend("xpu", BF16, 64, probe=Machine("xpu")) == "math"
    assert kernels.available_backends("cpu", Machine("cpu")) == ("cpu_flash", "math")


@pytest.mark.parametrize("machine", MACHINES, ids=str)
def test_no_flash_kernel_ever_gets_fp32(machine):
    """Flash kernels take fp16/bf16 only (flash_api.cpp: "FlashAttention only support fp16 and bf16 data
    type"; torch's flash op, FA3 and cuDNN likewise): an fp32 run gets the memory-efficient op, a forced
    flash kernel in fp32 is an error naming what is valid, and a block forced onto one falls back."""
    for head_dim in (64, 128, 256):
        assert kernels.run_backend("cuda", FP32, head_dim, probe=machine) == "sdpa_efficient"
        for forced in kernels.HALF_ONLY:
            assert kernels.choose_for("cuda", FP32, head_dim, False, forced, machine) == "sdpa_efficient"
            with pytest.raises(ValueError, match="valid: auto, sdpa_efficient, math"):
                kernels.run_backend("cuda", FP32, head_dim, forced, probe=machine)


def test_requested_backend_is_checked():
    """A forced backend must exist, be on this machine, and take the run's dtype and head size."""
    assert kernels.run_backend("cuda", BF16, 128, "flash_attn", probe=H100_FA2) == "flash_attn"
    assert kernels.run_backend("cuda", FP32, 128, "math", probe=H100) == "math"
    with pytest.raises(ValueError, match="must be auto or one of cudnn, fa3, flash_attn"):
        kernels.run_backend("cuda", BF16, 128, "flash", probe=H100_FA2)
    with pytest.raises(ValueError, match=r"'fa3' cannot run here .* valid: auto, cudnn, flash_attn, sdpa_flash,"):
        kernels.run_backend("cuda", BF16, 128, "fa3", probe=H100_FA2)
    with pytest.raises(ValueError, match="'flash_attn' cannot run here"):
        kernels.run_backend("cuda", BF16, 128, "flash_attn", probe=B200_FA2)  # installed, but no sm100 kernels
    with pytest.raises(ValueError, match=r"'cudnn' cannot run here .*head_dim 256"):
        kernels.run_backend("cuda", BF16, 256, "cudnn", probe=H100)
    with pytest.raises(ValueError, match="'cudnn' cannot run here"):
        kernels.run_backend("cpu", BF16, 128, "cudnn", probe=Machine("cpu"))


def test_deterministic_runs_avoid_cudnn():
    """cuDNN's attention backward is not deterministic (torch's SDPA drops it under
    ``use_deterministic_algorithms(True)``): a deterministic run takes the next flash kernel, and the
    default reads torch's flag."""
    assert kernels.run_backend("cuda", BF16, 128, probe=H100_FA2, deterministic=True) == "flash_attn"
    assert kernels.run_backend("cuda", BF16, 128, probe=H100, deterministic=True) == "sdpa_flash"
    with pytest.raises(ValueError, match="deterministic"):
        kernels.run_backend("cuda", BF16, 128, "cudnn", probe=H100, deterministic=True)
    torch.use_deterministic_algorithms(True)
    try:
        assert kernels.run_backend("cuda", BF16, 128, probe=H100) == "sdpa_flash"
    finally:
        torch.use_deterministic_algorithms(False)
    assert kernels.run_backend("cuda", BF16, 128, probe=H100) == "cudnn"


def test_every_backend_has_kernels_and_a_description():
    """Each backend the chooser can name has a block forward and backward and a start-line description."""
    for name in kernels.BACKENDS:
        assert name in kernels.KERNELS and name in kernels._FORWARD and name in kernels._BACKWARD
        assert kernels.describe(name).startswith(f"{name} (")


def test_fa3_is_activated_once_in_torch(monkeypatch):
    """Choosing FA3 routes torch's flash op to it through torch.nn.attention, once per process; the fa3
    block kernels activate it themselves, and no other backend activates anything."""
    import torch.nn.attention as attention

    activated = []
    monkeypatch.setattr(attention, "activate_flash_attention_impl", activated.append)
    monkeypatch.setattr(kernels, "_FA3_ACTIVE", False)
    assert kernels.activate("cudnn") == "cudnn" and activated == []
    q, k, v = (torch.empty(1, 16, h, 64, device="meta", dtype=BF16) for h in (4, 2, 2))
    out, lse = kernels.forward(q, k, v, True, None, "fa3")
    kernels.backward(q, q, k, v, out, lse, True, None, "fa3")
    assert kernels.activate("fa3") == "fa3"
    assert activated == ["FA3"]


# ----------------------------------------------------------------------------- flash-attn 2.8.3 stand-in
class FlashAttnContractError(RuntimeError):
    pass


def _check(ok, message):
    if not ok:
        raise FlashAttnContractError(message)


def _check_inputs(q, k, v, where):
    """mha_fwd / mha_bwd's checks on q, k, v (flash_api.cpp)."""
    _check(q.dtype in (torch.float16, torch.bfloat16), "FlashAttention only support fp16 and bf16 data type")
    _check(k.dtype == q.dtype, "query and key must have the same dtype")
    _check(v.dtype == q.dtype, "query and value must have the same dtype")
    for t in (q, k, v):
        _check(t.stride(-1) == 1, "Input tensor must have contiguous last dimension")
    b, _, heads, head_size = q.shape
    _check(b > 0, "batch size must be positive")
    _check(head_size <= 256, f"FlashAttention {where} only supports head dimension at most 256")
    _check(head_size % 8 == 0, "query, key, value, and out_ must have a head_size that is a multiple of 8")
    _check(heads % k.shape[2] == 0, "Number of heads in key/value must divide number of heads in query")
    _check(k.shape == v.shape and k.shape[0] == b and k.shape[3] == head_size, "key/value: wrong shape")


def _scores(q, k, softmax_scale, causal):
    """fp32 (B, H, Sq, Sk) scores, K heads grouped as flash-attn groups them; causal bottom-right aligned."""
    rep = q.shape[2] // k.shape[2]
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float().repeat_interleave(rep, 2)) * softmax_scale
    if causal:
        sq, sk = scores.shape[-2:]
        keep = torch.ones(sq, sk, dtype=torch.bool).tril(sk - sq)
        scores = scores.masked_fill(~keep, float("-inf"))
    return scores


class FakeFlashAttn:
    """flash_attn.flash_attn_interface's private kernels with 2.8.3's signatures; records each call."""

    def __init__(self):
        self.calls = []

    def _flash_attn_forward(self, q, k, v, dropout_p: float, softmax_scale: float, causal: bool,
                            window_size_left: int, window_size_right: int, softcap: float, alibi_slopes,
                            return_softmax: bool):
        self.calls.append(("forward", dict(dropout_p=dropout_p, causal=causal, window=(window_size_left,
                                                                                      window_size_right))))
        _check_inputs(q, k, v, "forward")
        _check((dropout_p, window_size_left, window_size_right, softcap, alibi_slopes) == (0.0, -1, -1, 0.0, None),
               "the stand-in models dense, dropout-free attention only")
        scores = _scores(q, k, softmax_scale, causal)
        lse = torch.logsumexp(scores, -1)  # (B, H, Sq) fp32
        rep = q.shape[2] // k.shape[2]
        out = torch.einsum("bhqk,bkhd->bqhd", torch.exp(scores - lse[..., None]),
                           v.float().repeat_interleave(rep, 2)).to(q.dtype)
        return out, lse, torch.empty(0, dtype=q.dtype), torch.empty(2, dtype=torch.int64)

    def _flash_attn_backward(self, dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p: float,
                             softmax_scale: float, causal: bool, window_size_left: int, window_size_right: int,
                             softcap: float, alibi_slopes, deterministic: bool, rng_state=None):
        self.calls.append(("backward", dict(deterministic=deterministic, causal=causal)))
        _check_inputs(q, k, v, "backward")
        _check(out.dtype == q.dtype, "query and out must have the same dtype")
        _check(dout.dtype == q.dtype, "query and dout must have the same dtype")
        _check(out.stride(-1) == 1, "out tensor must have contiguous last dimension")
        _check(dout.stride(-1) == 1, "dout tensor must have contiguous last dimension")
        _check(softmax_lse.dtype == torch.float32 and softmax_lse.shape == (q.shape[0], q.shape[2], q.shape[1]),
               "softmax_lse must be fp32 (batch, heads, seqlen_q)")
        for grad, like, name in ((dq, q, "dq"), (dk, k, "dk"), (dv, v, "dv")):
            _check(grad.dtype == q.dtype, f"{name} must have the same dtype as q")
            _check(grad.stride(-1) == 1, f"{name} must have contiguous last dimension")
            _check(grad.shape == like.shape, f"{name}: wrong shape")
        rep = q.shape[2] // k.shape[2]
        do, o = dout.float().transpose(1, 2), out.float().transpose(1, 2)
        probs = torch.exp(_scores(q, k, softmax_scale, causal) - softmax_lse[..., None])  # from the given lse
        vt, kt, qt = (t.float().repeat_interleave(r, 2).transpose(1, 2) for t, r in ((v, rep), (k, rep), (q, 1)))
        d_scores = probs * (do @ vt.transpose(-1, -2) - (do * o).sum(-1, keepdim=True)) * softmax_scale
        b, sk, hkv, d = k.shape
        dq.copy_((d_scores @ kt).transpose(1, 2))
        dk.copy_((d_scores.transpose(-1, -2) @ qt).transpose(1, 2).reshape(b, sk, hkv, rep, d).sum(3))
        dv.copy_((probs.transpose(-1, -2) @ do).transpose(1, 2).reshape(b, sk, hkv, rep, d).sum(3))
        return torch.empty(q.shape[0], q.shape[2], -(-q.shape[1] // 128) * 128)  # softmax_d


# flash-attn 2.8.3's parameters (flash_attn/flash_attn_interface.py), which the stand-in must keep
FORWARD_2_8 = ["q", "k", "v", "dropout_p", "softmax_scale", "causal", "window_size_left", "window_size_right",
               "softcap", "alibi_slopes", "return_softmax"]
BACKWARD_2_8 = ["dout", "q", "k", "v", "out", "softmax_lse", "dq", "dk", "dv", "dropout_p", "softmax_scale",
                "causal", "window_size_left", "window_size_right", "softcap", "alibi_slopes", "deterministic",
                "rng_state"]


@pytest.fixture
def fake_flash_attn(monkeypatch):
    """``flash_attn`` and ``flash_attn.flash_attn_interface`` in sys.modules as the stand-in; the kernels'
    cached look-ups of the package are cleared before and after."""
    fake = FakeFlashAttn()
    package, interface = types.ModuleType("flash_attn"), types.ModuleType("flash_attn.flash_attn_interface")
    interface._flash_attn_forward, interface._flash_attn_backward = fake._flash_attn_forward, fake._flash_attn_backward
    package.flash_attn_interface = interface
    monkeypatch.setitem(sys.modules, "flash_attn", package)
    monkeypatch.setitem(sys.modules, "flash_attn.flash_attn_interface", interface)
    for cached in (kernels._flash_attn_calls, kernels.flash_attn_installed, kernels.machine):
        cached.cache_clear()
    yield fake
    for cached in (kernels._flash_attn_calls, kernels.flash_attn_installed, kernels.machine):
        cached.cache_clear()


def test_stand_in_keeps_flash_attn_2_8_signatures_and_contract(fake_flash_attn):
    """The stand-in's signatures are 2.8.3's, and it refuses what flash_api.cpp refuses."""
    assert list(inspect.signature(fake_flash_attn._flash_attn_forward).parameters) == FORWARD_2_8
    assert list(inspect.signature(fake_flash_attn._flash_attn_backward).parameters) == BACKWARD_2_8
    fwd = fake_flash_attn._flash_attn_forward
    ok = dict(dropout_p=0.0, softmax_scale=0.125, causal=True, window_size_left=-1, window_size_right=-1,
              softcap=0.0, alibi_slopes=None, return_softmax=False)
    q, k = torch.zeros(1, 4, 4, 64, dtype=BF16), torch.zeros(1, 4, 2, 64, dtype=BF16)
    assert fwd(q, k, k, **ok)[0].shape == q.shape
    for bad, message in [((q.float(), k.float(), k.float()), "only support fp16 and bf16"),
                         ((q, k.half(), k.half()), "query and key must have the same dtype"),
                         ((q.transpose(1, 3).contiguous().transpose(1, 3), k, k), "contiguous last dimension"),
                         ((q[..., :60], k[..., :60], k[..., :60]), "multiple of 8"),
                         ((q[:, :, :3], k, k), "must divide number of heads")]:
        with pytest.raises(FlashAttnContractError, match=message):
            fwd(*bad, **ok)


def test_forced_flash_attn_never_receives_fp32(fake_flash_attn):
    """kernel="flash_attn" on an fp32 block (the default model dtype) falls back instead of sending fp32 to
    flash-attn, which refuses it; bf16 blocks do reach it."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 16, h, 64, generator=g) for h in (4, 2, 2))
    out, lse = kernels.forward(q, k, v, True, None, "flash_attn")
    kernels.backward(torch.ones_like(q), q, k, v, out, lse, True, None, "flash_attn")
    assert fake_flash_attn.calls == []
    kernels.forward(q.to(BF16), k.to(BF16), v.to(BF16), True, None, "flash_attn")
    assert [name for name, _ in fake_flash_attn.calls] == ["forward"]


@pytest.mark.parametrize("case", [c for c in CASES if c != "masked"])  # flash-attn takes no masks
def test_flash_attn_kernel_in_bf16_matches_float64_attention(fake_flash_attn, case):
    """The ``flash_attn`` kernel through the contract-enforcing stand-in, GQA 4/2, merged and differentiated
    as ring attention does: within the bf16 tolerance the CPU flash kernel meets (8 units of 2^-8)."""
    assert kernels.flash_attn_installed()  # the stand-in, as the kernels see it
    for name, err in _relative_errors("flash_attn", "cpu", BF16, case).items():
        assert err <= TOLERANCE[BF16], (name, err)
    assert {name for name, _ in fake_flash_attn.calls} == {"forward", "backward"}


def test_flash_attn_backward_is_deterministic_when_torch_is(fake_flash_attn):
    """flash-attn's backward accumulates dq with atomic adds unless told ``deterministic``: the kernel passes
    torch.are_deterministic_algorithms_enabled()."""
    q, k, v = (torch.ones(1, 16, h, 64, dtype=BF16) for h in (4, 2, 2))
    out, lse = kernels.forward(q, k, v, True, None, "flash_attn")
    for flag in (True, False):
        torch.use_deterministic_algorithms(flag)
        try:
            kernels.backward(torch.ones_like(q), q, k, v, out, lse, True, None, "flash_attn")
        finally:
            torch.use_deterministic_algorithms(False)
        assert fake_flash_attn.calls[-1] == ("backward", {"deterministic": flag, "causal": True})


def test_memory_efficient_kernel_gets_kv_repeated_in_the_model(monkeypatch):
    """torch's memory-efficient kernel takes no grouped-query attention on CUDA: torch 2.11 on an H200 answered
    'No available kernel' to enable_gqa, and the device check found the model's own attention (no cp, fp32 on
    CUDA, where the chooser picks that kernel) sending it fewer K/V heads. Modelled here by a stand-in SDPA that
    enforces the contract whenever only the efficient kernel is enabled, then computes with the math kernel."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from loomtrain.trainer import attention as attn

    real, seen = F.scaled_dot_product_attention, []

    def contract(q, k, v, *args, enable_gqa=False, **kwargs):
        b = torch.backends.cuda
        only_efficient = b.mem_efficient_sdp_enabled() and not (
            b.flash_sdp_enabled() or b.math_sdp_enabled() or b.cudnn_sdp_enabled())
        if only_efficient and (enable_gqa or q.shape[1] != k.shape[1]):
            raise RuntimeError("No available kernel. Aborting execution.")
        seen.append(only_efficient)
        with sdpa_kernel(SDPBackend.MATH):
            return real(q, k, v, *args, enable_gqa=enable_gqa, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", contract)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 16, h, 8, generator=gen) for h in (4, 2, 2))
    out = attn._sdpa(q, k, v, None, None, "sdpa_efficient")
    assert seen == [True]
    expected = real(q.transpose(1, 2), *(t.transpose(1, 2).repeat_interleave(2, dim=1) for t in (k, v)),
                    is_causal=True).transpose(1, 2)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
