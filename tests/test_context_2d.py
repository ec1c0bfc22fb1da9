"""Two-dimensional context parallelism (Ulysses inside groups of U cp ranks, ring or TokenRing across) against
float64 single-device attention: out, lse and dq/dk/dv within 1e-5 (fp32) for cp 4 and 8 with U 2 and 4, GQA,
zigzag and contiguous layouts, packed documents (sorted ids) and unsorted ids, on forked gloo ranks; the bytes
it sends equal the cost model's; the cost model of the split. Training parity through the trainer:
tests/test_parallel_parity.py (cp4_ulysses2_*)."""

import pytest

from conftest import run_ranks
from test_context import against_reference, make_inputs

# (batch, seq, heads, kv_heads, head_dim, causal, layout, documents)
CASES = {
    "gqa_packed_documents": (2, 32, 8, 4, 8, True, "zigzag", 3),
    "gqa_causal": (1, 32, 8, 4, 8, True, "zigzag", 0),
    "gqa_4_to_1_random_documents": (1, 32, 8, 2, 8, True, "zigzag", "random"),
    "contiguous_noncausal_documents": (1, 32, 4, 4, 8, False, "contiguous", 3),
}


def _check(rank, outer, ulysses, case):
    import torch.distributed as dist

    from loomtrain.parallel.cp import strategy

    dist.init_process_group("gloo")
    try:
        bound = strategy(f"ulysses_{outer}").with_ulysses(ulysses)
        return against_reference(case, lambda layout: bound.make(None, layout=layout), seed=11)[0]
    finally:
        dist.destroy_process_group()


def _assert_exact(results):
    for errors in results:
        for name, err in errors.items():
            assert err <= 1e-5, (name, err)


@pytest.mark.parametrize("outer", ["ring", "tokenring"])
@pytest.mark.parametrize("case", list(CASES))
def test_cp4_ulysses2_matches_full_attention(outer, case):
    _assert_exact(run_ranks(_check, 4, outer, 2, CASES[case]))


@pytest.mark.parametrize("outer, ulysses", [("ring", 2), ("tokenring", 2), ("ring", 4), ("tokenring", 4)])
def test_cp8_matches_full_attention(outer, ulysses):
    """8 ranks, U 2 (4 groups across) and 4 (2 across): GQA and packed documents."""
    _assert_exact(run_ranks(_check, 8, outer, ulysses, CASES["gqa_packed_documents"]))


def _bytes(rank, outer):
    import torch.distributed as dist

    from loomtrain.parallel.cp import attention as cp
    from loomtrain.parallel.cp import strategy

    dist.init_process_group("gloo")
    try:
        q, k, v, dout, _ = make_inputs(5, 2, 32, 8, 4, 8, 0)
        attn = strategy(f"ulysses_{outer}").with_ulysses(2).make(None)
        ql, kl, vl = (cp.shard_sequence(t).requires_grad_() for t in (q, k, v))
        out = attn(ql, kl, vl)
        fwd = attn.comm.stats.bytes
        out.backward(cp.shard_sequence(dout))
        return fwd, attn.comm.stats.bytes - fwd
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("outer", ["ring", "tokenring"])
def test_cost_model_byte_counts_match_what_is_sent(outer):
    """The inner all-to-alls plus the outer ring's transfers, counted by the channel, equal ``cost.two_dim_bytes``."""
    from loomtrain.parallel.cp import strategy
    from loomtrain.parallel.cp.cost import Shape

    per_rank = run_ranks(_bytes, 4, outer)
    fwd, bwd = strategy(f"ulysses_{outer}").with_ulysses(2).bytes_per_rank(Shape(2, 32, 8, 4, 8, 4))
    assert sum(f for f, _ in per_rank) == pytest.approx(4 * fwd, rel=1e-9)
    assert sum(b for _, b in per_rank) == pytest.approx(4 * bwd, rel=1e-9)


def test_cost_model_of_the_split():
    """Ulysses inside a node and the ring across beats ring over the slow link and Ulysses (which cannot
    split 8 KV heads over 16 ranks at all); the split's compute is the 1-D strategies' (fast links: equal)."""
    from loomtrain.parallel.cp import predict, strategy
    from loomtrain.parallel.cp.cost import Shape

    shape = Shape(batch=1, seq=131072, heads=64, kv_heads=8, head_dim=128, world=16, elem_bytes=2)
    inter, intra, flops = 50e9 / 8, 3600e9 / 8, 989e12  # 50 Gbit/s between nodes, NVLink inside
    one_d = predict(shape, inter, 1e-5, flops)
    assert set(one_d) == {"ring", "tokenring"}  # Ulysses cannot split 8 KV heads over 16; the 2-D ones are unbound
    split = strategy("ulysses_ring").with_ulysses(8, inner_bandwidth=intra)
    assert split.seconds(shape, inter, 1e-5, flops) < 0.8 * min(one_d.values())
    # the same split with the all-to-all on the slow link too is slower than with it on the fast one
    assert strategy("ulysses_ring").with_ulysses(8).seconds(shape, inter, 1e-5, flops) > split.seconds(
        shape, inter, 1e-5, flops)
    fast = [strategy(n).seconds(shape, 1e15, 0.0, flops) for n in ("ring", "tokenring")]
    fast += [strategy(n).with_ulysses(u).seconds(shape, 1e15, 0.0, flops)
             for n in ("ulysses_ring", "ulysses_tokenring") for u in (2, 4, 8)]
    assert max(fast) / min(fast) < 1.01


def test_auto_weighs_the_splits_only_when_the_link_inside_groups_is_known(capsys):
    """``choose`` with ``inner_bandwidth`` returns the best bound split (U 8 of 16: 8 KV heads); without it a 1-D
    name. Through the config: ``cp_impl: auto`` with ``cp_inner_link_gbps`` runs (and ``plan`` prints) the split."""
    from loomtrain.launch.cli import main
    from loomtrain.parallel.cp import choose
    from loomtrain.parallel.cp.cost import Shape

    shape = Shape(batch=1, seq=131072, heads=64, kv_heads=8, head_dim=128, world=16, elem_bytes=2)
    assert choose(shape, 50e9 / 8, 1e-5, 989e12) == "ring"
    pick = choose(shape, 50e9 / 8, 1e-5, 989e12, inner_bandwidth=3600e9 / 8)
    assert (pick.name, pick.ulysses) == ("ulysses_ring", 8)
    argv = ["plan", "llama8b_64k_cluster", "--world-size", "256", "--set", "parallel.tp=4", "--set", "parallel.cp=8",
            "--set", "parallel.cp_impl=auto", "--set", "parallel.cp_link_gbps=50"]
    assert main(argv) == 0
    assert "context-parallel" in (out := capsys.readouterr().out) and "cp_ulysses" not in out
    assert main(argv + ["--set", "parallel.cp_inner_link_gbps=3600"]) == 0
    assert "(ulysses_ring (cp_ulysses 2))" in capsys.readouterr().out  # 2 KV heads per tp rank: U = 2


TWO_D = ["parallel.cp_impl=ulysses_ring"]


@pytest.mark.parametrize("override, message", [
    (["parallel.cp=8", *TWO_D, "parallel.cp_ulysses=3"], "parallel.cp_ulysses: cp_ulysses 3 must divide cp (8)"),
    (["parallel.cp=2", *TWO_D, "parallel.cp_ulysses=2"], "parallel.cp_ulysses: cp_ulysses = cp (2) leaves no ring"),
    (["parallel.cp=8", "parallel.tp=2", *TWO_D, "parallel.cp_ulysses=4"],
     "parallel.cp_ulysses: ulysses_ring splits heads over cp_ulysses 4 ranks: needs heads (4) and kv heads (2) "
     "divisible by 4 (cp_ulysses x tp must divide model.n_kv_heads)"),
    (["parallel.cp=4", *TWO_D, "parallel.cp_ulysses=1"],
     "parallel.cp_ulysses: cp_ulysses 1 leaves no Ulysses dimension: use parallel.cp_impl=ring"),
    (["parallel.cp=4", "parallel.cp_impl=ulysses_tokenring", "parallel.cp_ulysses=4"],
     "parallel.cp_ulysses: cp_ulysses = cp (4) leaves no tokenring dimension: use parallel.cp_impl=ulysses"),
    (["parallel.cp=4", "parallel.cp_impl=ring", "parallel.cp_ulysses=2"],
     "parallel.cp_ulysses: only used with parallel.cp_impl=ulysses_ring | ulysses_tokenring, got cp_impl=ring"),
    (["parallel.cp=4", "parallel.cp_ulysses=2"], "got cp_impl=auto"),
    (["parallel.cp=4", *TWO_D], "parallel.cp_ulysses: ulysses_ring needs parallel.cp_ulysses"),
])
def test_bad_splits_are_one_line_errors(override, message):
    from loomtrain.trainer.config import ConfigError, load_config

    with pytest.raises(ConfigError) as e:
        load_config("tiny", override)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_cli_refuses_a_bad_split_with_exit_2_before_any_work(capsys, tmp_path):
    from loomtrain.launch.cli import main

    argv = ["train", "--nproc", "4", "--set", "parallel.cp=4", "--set", "parallel.cp_impl=ulysses_ring",
            "--set", "parallel.cp_ulysses=3", "--set", f"train.output_dir={tmp_path}"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: parallel.cp_ulysses: cp_ulysses 3 must divide cp (4)") and "\n" not in err
    assert not any(tmp_path.iterdir())
