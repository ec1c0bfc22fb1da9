"""The cost model's compute term by kernel-call shape (``parallel/cp/cost.py``).

One kernel call does not run equally fast at every size, and the strategies make calls of different sizes:
ring and TokenRing 2W+1 chunk pairs of S/(2W) tokens per rank per pass, Ulysses one whole-sequence call on H/W
heads, a two-dimensional split its outer ring's larger pairs on H/U heads. ``flops`` may therefore be a function
of a call's shape (``cost.Rate``). Checked here: ``cost.block_shape`` is the shape of every call the real code
makes (counted on forked ranks), the model takes each strategy's compute at its own shape, a constant function
is the one-number model, and ``block_rates`` looks measured rates up.
"""
import pytest
import torch

from conftest import run_ranks
from loomtrain.parallel.cp import cost

B, S, H, HKV, D, W = 2, 64, 8, 4, 8, 4


def _call_shapes(rank):
    """{strategy: set of (query tokens, key tokens, batch x heads) of every forward and backward kernel call}."""
    import torch.distributed as dist

    from loomtrain.parallel.cp import attention as cp
    from loomtrain.parallel.cp import block_kernels as kernels
    from loomtrain.parallel.cp import strategy, two_dimensional

    dist.init_process_group("gloo")
    seen, real = set(), (kernels.forward, kernels.backward)

    def record(q, k):
        seen.add((q.shape[1], k.shape[1], q.shape[0] * q.shape[2]))

    kernels.forward = lambda q, k, *a, **kw: record(q, k) or real[0](q, k, *a, **kw)
    kernels.backward = lambda do, q, k, *a, **kw: record(q, k) or real[1](do, q, k, *a, **kw)
    try:
        reverse = dist.new_group(list(range(W)))
        g = torch.Generator().manual_seed(0)
        q, dout = (torch.randn(B, S, H, D, generator=g) for _ in range(2))
        k, v = (torch.randn(B, S, HKV, D, generator=g) for _ in range(2))
        shapes = {}
        for name in ("ring", "tokenring", "ulysses", "ulysses_ring", "ulysses_tokenring"):
            s = strategy(name)
            s = s.with_ulysses(2) if two_dimensional(s) else s
            attn = s.make(None, reverse_group=reverse) if s.needs_reverse_group else s.make(None)
            ql, kl, vl = (cp.shard_sequence(t).requires_grad_() for t in (q, k, v))
            seen.clear()
            attn(ql, kl, vl).backward(cp.shard_sequence(dout))
            shapes[name] = set(seen)
        return shapes
    finally:
        kernels.forward, kernels.backward = real
        dist.destroy_process_group()


def test_block_shape_is_every_kernel_call_each_strategy_makes():
    shape = cost.Shape(B, S, H, HKV, D, W)
    _, outer = cost.two_dim_shapes(shape, 2)
    expected = {"ring": cost.block_shape(shape, "ring"), "tokenring": cost.block_shape(shape, "tokenring"),
                "ulysses": cost.block_shape(shape, "ulysses"), "ulysses_ring": cost.block_shape(outer, "ring"),
                "ulysses_tokenring": cost.block_shape(outer, "tokenring")}
    assert expected == {"ring": (8, 8, 16), "tokenring": (8, 8, 16), "ulysses": (64, 64, 4),
                        "ulysses_ring": (16, 16, 8), "ulysses_tokenring": (16, 16, 8)}
    for per_rank in run_ranks(_call_shapes, W):
        assert per_rank == {name: {b} for name, b in expected.items()}


def _small_calls_half_speed(q, k, heads):
    """A rate that halves below a 2048-token square call on 8 heads (per-call overhead, small matmuls)."""
    return 40e9 if q * k * heads >= 2048 * 2048 * 8 else 20e9


def test_each_strategy_computes_at_the_rate_of_its_own_calls():
    shape = cost.Shape(1, 8192, 32, 8, 128, 8)  # ring: 512-token pairs on 32 heads; Ulysses: 8192 on 4
    fast = 1e15  # links that cost nothing: compute decides
    one = cost.predict_seconds(shape, fast, 0.0, 40e9)
    assert max(one.values()) / min(one.values()) < 1.01  # one rate: every strategy the same compute
    by_shape = cost.predict_seconds(shape, fast, 0.0, _small_calls_half_speed)
    assert by_shape["ulysses"] == pytest.approx(one["ulysses"], rel=1e-6)  # its one call is large: full rate
    assert by_shape["ring"] == pytest.approx(2 * one["ring"], rel=1e-6)  # chunk pairs: half the rate
    assert by_shape["tokenring"] == pytest.approx(2 * one["tokenring"], rel=1e-6)
    # the split's outer ring attends 2048-token pairs on 32/4 heads: full rate again
    split = cost.two_dim_seconds(shape, 4, "ring", fast, fast, 0.0, _small_calls_half_speed)
    assert split == pytest.approx(cost.attention_flops(shape) / shape.world / 40e9, rel=1e-3)
    from loomtrain.parallel.cp import choose

    assert choose(shape, 900e9, 1e-6, _small_calls_half_speed) == "ulysses"
    assert choose(shape, 900e9, 1e-6, 40e9) != "ulysses"  # one rate: ring's hidden hops win


@pytest.mark.parametrize("world", [1, 2, 8])
def test_a_constant_rate_function_is_the_one_number_model(world):
    shape = cost.Shape(2, 4096, 16, 4, 64, world, elem_bytes=2)
    for bandwidth in (1e15, 50e9, 1e8):
        assert cost.predict_seconds(shape, bandwidth, 1e-5, lambda q, k, h: 300e12) == pytest.approx(
            cost.predict_seconds(shape, bandwidth, 1e-5, 300e12), rel=1e-12)
        if world == 8:
            assert cost.two_dim_seconds(shape, 2, "tokenring", bandwidth, 1e12, 1e-5, lambda q, k, h: 300e12) == \
                pytest.approx(cost.two_dim_seconds(shape, 2, "tokenring", bandwidth, 1e12, 1e-5, 300e12), rel=1e-12)


def test_block_rates_looks_up_the_measured_shape_or_the_nearest_in_work():
    rate = cost.block_rates({(512, 512, 8): 30e9, (4096, 4096, 2): 40e9})
    assert rate(512, 512, 8) == 30e9 and rate(4096, 4096, 2) == 40e9
    assert rate(256, 256, 8) == 30e9  # smaller than both: the small one's
    assert rate(2048, 2048, 4) == 40e9  # 16.8M, nearer 33.5M than 2.1M (log)
    assert rate(8192, 8192, 1) == 40e9
    with pytest.raises(ValueError, match="block_rates"):
        cost.block_rates({})
    with pytest.raises(ValueError, match="block_rates"):
        cost.block_rates({(1, 1, 1): 0.0})
