"""The adaptive sequence-parallel planner: valid, deterministic plans close to the optimum."""

import random

from conftest import run_ranks

import pytest

from loomtrain.errors import ConfigError
from loomtrain.parallel.adaptive_sp import exact_makespan, plan_groups, static_makespan


def cost(L, d):
    """Quadratic attention + linear work split over d ranks, plus a per-group communication term."""
    return (1e-9 * L * L + 1e-6 * L) / d + (0.0 if d == 1 else 2e-4 + 4e-8 * L * (d - 1) / d)


def check_valid(plan, lengths, world, capacity, T=cost):
    seen = sorted(i for _, seqs in plan.groups for i in seqs)
    assert seen == list(range(len(lengths)))  # every sequence exactly once
    ranks = [r for rs, _ in plan.groups for r in rs]
    assert len(ranks) == len(set(ranks)) and all(0 <= r < world for r in ranks)  # disjoint groups in the pool
    for rs, seqs in plan.groups:
        assert list(rs) == list(range(rs[0], rs[0] + len(rs)))  # contiguous
        for i in seqs:
            assert -(-lengths[i] // len(rs)) <= capacity
    busiest = max(sum(T(lengths[i], len(rs)) for i in seqs) for rs, seqs in plan.groups)
    assert plan.makespan == pytest.approx(busiest, rel=1e-12)


def _instance(rng, max_world=8, max_seqs=8):
    world, n = rng.randint(1, max_world), rng.randint(1, max_seqs)
    cap = 2048
    return [min(int(rng.paretovariate(1.1) * 150), cap * world) for _ in range(n)], world, cap


def test_small_instances_match_the_enumerated_optimum():
    rng = random.Random(0)
    for _ in range(60):
        lengths, world, cap = _instance(rng)
        plan = plan_groups(lengths, world, cap, cost)
        check_valid(plan, lengths, world, cap)
        assert plan.makespan <= exact_makespan(lengths, world, cap, cost) * 1.01


def test_groups_of_any_size_and_idle_ranks():
    # one long sequence and many short ones on 7 ranks: a group of 1 (no CP traffic) is part of the best plan,
    # and so is a non-power-of-two group
    lengths = [6000, 300, 280, 260, 250, 240, 230, 200]
    plan = plan_groups(lengths, 7, 1600, cost)
    check_valid(plan, lengths, 7, 1600)
    sizes = sorted(len(r) for r, _ in plan.groups)
    assert 1 in sizes and any(s & (s - 1) for s in sizes), sizes
    only_pow2 = plan_groups(lengths, 7, 1600, cost, degrees=[1, 2, 4])
    assert plan.makespan < only_pow2.makespan


def test_deterministic_and_independent_of_call_order():
    rng = random.Random(3)
    lengths = [min(int(rng.paretovariate(1.2) * 800), 1 << 18) for _ in range(300)]
    a = plan_groups(lengths, 64, 8192, cost, ranks_per_node=8)
    plan_groups([5, 6, 7], 4, 10, cost)  # other work in between: no state carried over
    b = plan_groups(list(lengths), 64, 8192, cost, ranks_per_node=8)
    assert a.groups == b.groups and a.makespan == b.makespan
    check_valid(a, lengths, 64, 8192)


def test_node_boundaries_are_respected():
    rng = random.Random(5)
    lengths = [min(int(rng.paretovariate(1.1) * 2000), 1 << 17) for _ in range(120)]
    plan = plan_groups(lengths, 32, 8192, cost, ranks_per_node=8)
    check_valid(plan, lengths, 32, 8192)
    assert not plan.crosses_nodes
    for ranks, _ in plan.groups:
        if len(ranks) <= 8:
            assert ranks[0] // 8 == ranks[-1] // 8, ranks
        else:
            assert len(ranks) % 8 == 0 and ranks[0] % 8 == 0, ranks


def hop_cost(L, d):
    """Communication that grows with the group: d - 1 exposed hops of latency + bytes (short sequences
    cannot hide it behind their little compute)."""
    return (1e-9 * L * L + 1e-6 * L) / d + (d - 1) * (1e-3 + 2e-7 * L / d)


def test_beats_the_best_static_degree_on_a_long_tail():
    rng = random.Random(11)
    lengths = [min(int(rng.paretovariate(1.1) * 300), 1 << 16) for _ in range(256)]
    world, cap = 32, 8192
    plan = plan_groups(lengths, world, cap, hop_cost)
    check_valid(plan, lengths, world, cap, hop_cost)

    best_static = min(static_makespan(lengths, world, cap, hop_cost, d) for d in (1, 2, 4, 8, 16, 32))
    assert plan.makespan * 1.3 <= best_static, (plan.makespan, best_static)


def test_a_sequence_too_long_for_the_pool_is_one_line():
    with pytest.raises(ConfigError, match=r"sequence 1 has 9000 tokens; the largest group \(4 ranks x 2000 tokens\)"):
        plan_groups([10, 9000], 4, 2000, cost)


# ----------------------------------------------------------------------------- training
def _adaptive_run(rank, overrides, record):
    from loomtrain.parallel import hybrid_dp
    from loomtrain.trainer.config import load_config
    from loomtrain.trainer.train import run

    plans, created, rank_sets = [], [], set()
    if record:
        original, ensure = hybrid_dp.AdaptiveBatches.plan, hybrid_dp.SequenceGroups.ensure

        def plan(self, position=None):
            out = original(self, position)
            plans.append([(len(r), len(s)) for r, s in out[0].groups])
            rank_sets.update(r for r, _ in out[0].groups if len(r) > 1)
            return out

        def ensure_and_count(self, sets):
            ensure(self, sets)
            created.append(self.created)

        hybrid_dp.AdaptiveBatches.plan = plan
        hybrid_dp.SequenceGroups.ensure = ensure_and_count
    result = run(load_config("tiny", overrides))
    return result.losses, result.grad_norms, result.checkpoint, (plans, created, len(rank_sets))


ADAPTIVE = ["data.batching=documents", "train.global_batch_tokens=900", "train.steps=5", "checkpoint.at_end=true",
            "parallel.sp_alpha1=1e-8", "parallel.sp_alpha2=2e-5", "parallel.sp_degrees=1,2,3"]


@pytest.fixture(scope="module")
def paragraphs(tmp_path_factory):
    """Real documents of very different lengths: the paragraphs (blank-line separated) of 60 stdlib modules."""
    import json

    from loomtrain.data.corpus import read_documents
    from loomtrain.data.prepare import prepare
    from loomtrain.trainer.config import DataConfig

    out = tmp_path_factory.mktemp("paragraphs")
    with open(out / "p.jsonl", "w") as f:
        for _, text in read_documents("stdlib", max_documents=60):
            for para in text.split("\n\n"):
                if para.strip():
                    f.write(json.dumps({"text": para}) + "\n")
    prepare(DataConfig(corpus=str(out / "p.jsonl"), valid_fraction=0.05), out_prefix=str(out / "tokens"), workers=1)
    return str(out / "tokens")


@pytest.mark.parametrize("impl, max_doc, sizes", [("ring", 180, {1, 3}), ("tokenring", 128, {2})])
def test_adaptive_training_matches_one_process(impl, max_doc, sizes, paragraphs, tmp_path):
    """4 ranks, one pool, groups chosen per step from real documents of very different lengths (64 tokens
    per rank: pieces of 180 need groups of 3 beside groups of 1; pieces of 128 pairs of 2-groups; groups run
    different numbers of sequences): loss, grad norm and parameters equal one process (1e-5)."""
    from conftest import TEST_OVERRIDES
    from test_parallel_parity import full_params

    base = TEST_OVERRIDES + [f"data.prepared={paragraphs}", f"data.max_doc_tokens={max_doc}"] + ADAPTIVE
    one = base + ["data.seq_len=192", f"train.output_dir={tmp_path / 'one'}"]  # rows hold the longest piece
    [(ref_losses, ref_norms, ref_ckpt, _)] = run_ranks(_adaptive_run, 0, one, False)
    many = base + ["parallel.sp_mode=adaptive", f"parallel.cp_impl={impl}", f"train.output_dir={tmp_path / 'many'}"]
    results = run_ranks(_adaptive_run, 4, many, True)
    for losses, norms, _, _ in results:
        for step in ref_losses:
            assert losses[step] == pytest.approx(ref_losses[step], rel=1e-5), step
            assert norms[step] == pytest.approx(ref_norms[step], rel=1e-5), step
    plans, created, distinct = results[0][3]
    assert all(r[3][0] == plans for r in results)  # every rank planned the same
    # groups are created once per rank set and reused: no step creates one its plan's sets already had
    # (the plans also cover the prefetched steps, hence <=)
    assert created[-1] <= distinct and created == sorted(created), (created, distinct)
    assert {d for plan in plans for d, _ in plan} == sizes, plans
    assert any(len({n for _, n in plan}) > 1 for plan in plans), plans  # uneven sequence counts per group
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    ref_params, params = full_params(ref_ckpt, tmp_path / "a"), full_params(results[0][2], tmp_path / "b")
    for name, ref in ref_params.items():
        diff = (params[name].float() - ref.float()).abs().max().item()
        assert diff <= 1e-5 * max(1.0, ref.abs().max().item()), (name, diff)


def test_cost_model_is_fitted_and_cached(tmp_path):
    import torch

    from loomtrain.parallel.sp_cost import calibrate, fit
    from loomtrain.trainer.model import ModelArgs

    a1, a2 = fit([100, 200, 400, 800], [3e-9 * L * L + 2e-6 * L for L in (100, 200, 400, 800)])
    assert a1 == pytest.approx(3e-9, rel=1e-6) and a2 == pytest.approx(2e-6, rel=1e-6)
    args = ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=64, ffn_hidden=64, max_seq_len=256)
    first = calibrate(args, torch.device("cpu"), str(tmp_path), lengths=(32, 64, 128))
    assert first.alpha1 >= 0 and first.alpha2 > 0 and len(list(tmp_path.glob("sp_cost-*.json"))) == 1
    again = calibrate(args, torch.device("cpu"), str(tmp_path), lengths=(32, 64, 128))
    assert (again.alpha1, again.alpha2) == (first.alpha1, first.alpha2)  # read back, not measured again
    assert first.strategy(100, 1) == "none" and first(100, 1) == pytest.approx(first.alpha1 * 1e4 + first.alpha2 * 100)
    assert first.strategy(4096, 2) in ("tokenring", "ring", "ulysses")


@pytest.mark.parametrize("override, message", [
    (["parallel.sp_mode=adaptive"], "parallel.sp_mode: adaptive plans whole documents; set data.batching=documents"),
    (["parallel.sp_mode=adaptive", "data.batching=documents", "train.global_batch_tokens=512", "parallel.tp=2"],
     "parallel.sp_mode: adaptive makes every rank one data x context pool"),
    (["parallel.sp_mode=adaptive", "data.batching=documents", "train.global_batch_tokens=4096",
      "data.max_doc_tokens=4096", "parallel.sp_degrees=1,2"], "data.max_doc_tokens: 4096 does not fit the largest "
     "group (2 ranks x data.seq_len 64 tokens per rank)"),
    (["parallel.sp_mode=adaptive", "data.batching=documents", "train.global_batch_tokens=512",
      "parallel.sp_degrees=1,x"], "parallel.sp_degrees: expected group sizes like '1,2,4'"),
])
def test_adaptive_config_errors(override, message):
    from conftest import TEST_OVERRIDES
    from loomtrain.trainer.checks import check_experiment
    from loomtrain.trainer.config import load_config

    with pytest.raises(ConfigError) as e:
        check_experiment(load_config("tiny", TEST_OVERRIDES + override), 4, 4)
    assert message in str(e.value)


def test_plan_shows_a_sample_adaptive_step(capsys):
    from loomtrain.launch.cli import main

    assert main(["plan", "llama8b_512k_adaptive_cluster", "--world-size", "512"]) == 0
    out = capsys.readouterr().out
    assert "adaptive sp, sample step" in out and "group(s) of" in out and "predicted makespan" in out


def test_padding_positions_stay_inside_the_rope_table(tmp_path):
    """A piece padded for its group (here 7 tokens on 3 ranks: 12) gets small positions on the padding, so
    the longest position is the longest piece's, whatever the group size."""
    import numpy as np
    import torch

    from loomtrain.data.indexed import IndexedTokens, write_indexed
    from loomtrain.parallel.hybrid_dp import AdaptiveBatches

    write_indexed(str(tmp_path / "d"), [np.arange(1, 9)], np.uint16)
    batches = AdaptiveBatches(IndexedTokens(str(tmp_path / "d")), 0, 100, 7, 4, 0, 3, cost)
    parts = [AdaptiveBatches(batches.data, 0, 100, 7, 4, r, 3, cost)._sequence(0, 7, (0, 1, 2), "ring",
                                                                                 torch.zeros(1, 2))
             for r in range(3)]
    assert sum(p["position_ids"].shape[1] for p in parts) == 12
    assert max(p["position_ids"].max().item() for p in parts) == 6  # the old padding reached 11
