"""The adaptive sequence-parallel planner: valid, deterministic plans close to the optimum."""

import random

from conftest import run_ranks

import pytest

from loomtrain.errors import ConfigError
from loomtrain.parallel.sp.planner import exact_makespan, plan_groups, static_makespan


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
    from loomtrain.parallel.sp import modes as hybrid_dp
    from loomtrain.trainer.config import load_config
    from loomtrain.launch.train import run

    plans, created, rank_sets, packed, passes = [], [], set(), [0], []
    if record:
        from loomtrain.parallel.engines.fsdp import FSDPEngine

        engine_backward = FSDPEngine.backward

        def backward_and_look(self, loss):  # sharded gradients after each pass (none until FSDP reduces them)
            from torch.distributed.tensor import DTensor

            engine_backward(self, loss)
            passes.append(("grads", sum(isinstance(p.grad, DTensor) and bool(set(p.grad.device_mesh.mesh_dim_names or ())
                                                                                 - {"tp"})  # tp alone: not FSDP's
                                        for p in self.model.parameters())))

        FSDPEngine.backward = backward_and_look
        original, ensure = hybrid_dp.AdaptiveBatches.plan, hybrid_dp.SequenceGroups.ensure
        rows, build = hybrid_dp.AdaptiveBatches.rows, hybrid_dp.AdaptiveBatches.build

        def build_and_count(self, position):
            micro, nxt = build(self, position)
            passes.append(("rows", len(micro)))
            return micro, nxt

        hybrid_dp.AdaptiveBatches.build = build_and_count

        def rows_and_count(self, seqs, pieces, d):
            out = rows(self, seqs, pieces, d)
            packed[0] = max([packed[0]] + [len(r) for r in out])
            return out

        hybrid_dp.AdaptiveBatches.rows = rows_and_count

        def plan(self, position=None):
            out = original(self, position)
            plans.append([(len(r), len(s)) for r, s in out[0].groups])
            if hasattr(out[0], "waves"):  # adaptive_sharded: groups are one row each, packed by plan_waves
                packed[0] = max([packed[0]] + [len(s) for _, s in out[0].groups])
            rank_sets.update(tuple(r) for r, _ in out[0].groups if len(r) > 1)
            return out

        def ensure_and_count(self, sets):
            ensure(self, sets)
            created.append((self.created, set(self.groups)))

        hybrid_dp.AdaptiveBatches.plan = plan
        hybrid_dp.SequenceGroups.ensure = ensure_and_count
    result = run(load_config("tiny", overrides))
    return result.losses, result.grad_norms, result.checkpoint, (plans, created, rank_sets, packed[0], passes)


ADAPTIVE = ["data.batching=documents", "train.global_batch_tokens=900", "train.steps=5", "checkpoint.at_end=true",
            "parallel.sp_alpha1=1e-8", "parallel.sp_alpha2=2e-5", "parallel.sp_degrees=1,2,3"]


@pytest.mark.parametrize("impl, max_doc, sizes, mesh", [("ring", 180, {1, 3}, []), ("tokenring", 128, {2}, []),
                                                         ("auto", 180, None, []),
                                                         ("ring", 180, {1, 3}, ["parallel.dp_replicate=2"]),
                                                         ("auto", 128, None, ["parallel.tp=2",
                                                                              "parallel.sp_degrees=1,2"]),
                                                         ("ring", 64, {1}, ["parallel.tp=2", "parallel.sp_degrees=1,2"]),
                                                         ("ring", 180, {1, 2, 3}, ["parallel.sp_mode=adaptive_sharded"]),
                                                         ("ring", 180, {1, 2, 3}, ["parallel.sp_mode=adaptive_sharded",
                                                                                   "parallel.dp_replicate=2"]),
                                                         ("ring", 128, {1, 2}, ["parallel.sp_mode=adaptive_sharded",
                                                                                "parallel.tp=2",
                                                                                "parallel.sp_degrees=1,2"])],
                         ids=["ring", "tokenring", "calibrated", "hsdp", "tp2", "tp2-singles", "sharded", "sharded-hsdp",
                              "sharded-tp2"])
def test_adaptive_training_matches_one_process(impl, max_doc, sizes, mesh, paragraphs, tmp_path):
    """4 ranks, one pool, groups chosen per step from real documents of very different lengths (64 tokens
    per rank: pieces of 180 need groups of 3 beside groups of 1; pieces of 128 pairs of 2-groups; groups run
    different numbers of sequences): loss, grad norm and parameters equal one process (1e-5). "calibrated"
    plans with the cost model the pool measures at start-up (its plans depend on this machine's timings);
    "hsdp" makes the pool of 2 FSDP replicas of 2 shards (gradients reduce-scattered, then all-reduced); "tp2"
    makes it 2 members of 2 tensor-parallel ranks each (context parallelism among the ranks of one tensor-parallel
    coordinate), calibrated; "tp2-singles" runs them as groups of one member with different sequence counts;
    "sharded" runs the groups in waves (``adaptive_sharded``): every rank the same number of passes, FSDP
    resharding between them and reducing gradients after each; also as 2 HSDP replicas and with tp=2."""
    from conftest import TEST_OVERRIDES
    from test_parallel_parity import full_params

    adaptive = ADAPTIVE if sizes else [o for o in ADAPTIVE if not o.startswith("parallel.sp_alpha")] + [
        f"data.cache_dir={tmp_path / 'cache'}"]
    adaptive = [o for o in adaptive if not (o.startswith("parallel.sp_degrees") and any(
        m.startswith("parallel.sp_degrees") for m in mesh))]
    base = TEST_OVERRIDES + [f"data.prepared={paragraphs}", f"data.max_doc_tokens={max_doc}"] + adaptive
    one = base + ["data.seq_len=192", f"train.output_dir={tmp_path / 'one'}"]  # rows hold the longest piece
    [(ref_losses, ref_norms, ref_ckpt, _)] = run_ranks(_adaptive_run, 0, one, False)
    many = base + ["parallel.sp_mode=adaptive"] + mesh + [f"parallel.cp_impl={impl}",
                                                          f"train.output_dir={tmp_path / 'many'}"]
    results = run_ranks(_adaptive_run, 4, many, True)
    for losses, norms, _, _ in results:
        for step in ref_losses:
            assert losses[step] == pytest.approx(ref_losses[step], rel=1e-5), step
            assert norms[step] == pytest.approx(ref_norms[step], rel=1e-5), step
    plans, created, distinct, _, _ = results[0][3]
    passes = [[n for kind, n in r[3][4] if kind == "rows"] for r in results]
    held = [n for r in results for kind, n in r[3][4] if kind == "grads"]
    if "parallel.sp_mode=adaptive_sharded" in mesh:  # waves: the same number of passes on every rank, every step
        assert all(p == passes[0] for p in passes) and max(passes[0]) > 1, passes
        assert min(held) > 0, held  # every pass reduce-scattered its gradients into the shards
    elif max(max(p) for p in passes) > 1:  # a rank ran several rows: unsharded (plain tensors) until its last
        assert min(held) == 0, held
    assert max(r[3][3] for r in results) > 1  # some forward ran several of its group's documents packed
    assert all(r[3][0] == plans for r in results)  # every rank planned the same
    # every set a plan can place (sp_degrees 1,2,3 on 4 ranks: 5) is created once, before the first step; the
    # calibration's tiles are among them; no step creates a group
    from loomtrain.parallel.sp.planner import PoolRanks, placeable_rank_sets

    tp = 2 if "parallel.tp=2" in mesh else 1
    pool = PoolRanks([list(range(t, 4, tp)) for t in range(tp)], 0)
    placeable = set(pool.every(placeable_rank_sets(4 // tp, [1, 2] if tp > 1 else [1, 2, 3])))
    assert all(n == len(sets) for n, sets in created), created
    assert len({n for n, _ in created}) == 1, created
    assert created[-1][1] == placeable and {pool.ranks(r) for r in distinct} <= placeable, (created[-1], distinct)
    if sizes is None:
        assert len(list((tmp_path / "cache").glob("sp_cost-*.json"))) == 1
        assert max(d for plan in plans for d, _ in plan) > 1, plans  # some groups ran context parallelism
    else:
        assert {d for plan in plans for d, _ in plan} == sizes, plans
        if "parallel.sp_mode=adaptive_sharded" not in mesh:  # (waves: one row per group)
            assert any(len({n for _, n in plan}) > 1 for plan in plans), plans  # uneven sequence counts per group
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    ref_params, params = full_params(ref_ckpt, tmp_path / "a"), full_params(results[0][2], tmp_path / "b")
    for name, ref in ref_params.items():
        diff = (params[name].float() - ref.float()).abs().max().item()
        assert diff <= 1e-5 * max(1.0, ref.abs().max().item()), (name, diff)


def test_a_deep_model_is_calibrated_on_one_and_two_layers_and_extrapolated(tmp_path):
    """No full-depth copy of the model is built (a large one would not fit a device): 1- and 2-layer copies
    are measured (with activation checkpointing as training runs) and the per-layer difference scales."""
    import json

    from loomtrain.parallel.sp.cost import calibration_depths, fit, to_depth

    assert calibration_depths(2) == (2,) and calibration_depths(32) == (1, 2)
    assert to_depth({1: [1.0, 2.0, 3.0], 2: [2.0, 3.0, 5.0]}, 4) == [4.0, 5.0, 9.0]
    assert to_depth({1: [1.0, 2.0, 3.0], 2: [0.5, 3.0, 3.0]}, 4) == [1.0, 5.0, 3.0]  # a layer never costs < 0
    fitted = [cost.fitted for cost, _ in run_ranks(_calibrate, 2, str(tmp_path), True, 2, (1, 2), 6, True)]
    assert fitted[0] == fitted[1]
    [cache] = tmp_path.glob("sp_cost-*.json")
    measured = json.loads(cache.read_text())
    for d in ("1", "2"):
        entry = measured["sizes"][d]
        assert sorted(entry["seconds"]) == ["1", "2"]  # the two depths, nothing at 6
        coef = fit(entry["lengths"], to_depth({int(k): v for k, v in entry["seconds"].items()}, 6))
        assert tuple(entry["coef"]) == pytest.approx(coef) and fitted[0][int(d)] == pytest.approx(coef)
    assert len(measured["sizes"]["2"]["impls"]) == len(measured["sizes"]["2"]["lengths"])  # one per length


def _calibrate(rank, cache, measure_allowed, world=3, degrees=(2, 3), layers=1, ac=False):
    """calibrate_pool on ``world`` forked ranks of a tiny model: (the fitted model, process groups created)."""
    import torch
    import torch.distributed as dist

    from loomtrain.parallel.sp import cost as sp_cost
    from loomtrain.parallel.sp.planner import PoolRanks
    from loomtrain.parallel.sp.modes import SequenceGroups
    from loomtrain.trainer.loss import token_loss_sum
    from loomtrain.trainer.models.llama.model import ModelArgs, Transformer

    if not measure_allowed:
        def refuse(*a, **k):
            raise AssertionError("measured again instead of reading the cache")
        sp_cost.measure_pool = refuse
    args = ModelArgs(dim=32, n_layers=layers, n_heads=2, n_kv_heads=1, vocab_size=64, ffn_hidden=64,
                     max_seq_len=256)
    dist.init_process_group("gloo")
    groups = SequenceGroups()
    cost = sp_cost.calibrate_pool(args, torch.device("cpu"), cache, pool=PoolRanks.of(world, rank),
                                  degrees=list(degrees), capacity=32, groups=groups, ranks_per_node=world, repeats=1,
                                  activation_checkpoint=ac, build_model=Transformer, loss_sum=token_loss_sum)
    return cost, groups.created


def test_the_cost_model_is_measured_by_the_whole_pool_per_group_size_and_cached(tmp_path):
    """Three ranks calibrate together: groups of 1, 2 and 3 run real sequences with real cp attention, each size
    gets its own fitted coefficients and measured link; the result is the same on every rank, cached, and read
    back (not measured) the next time. Size 1 is measured even when the plans may not use it (sp_degrees=2,3):
    its fit picks the others' strategies."""
    from loomtrain.parallel.sp.cost import fit

    c0, c1, c2 = fit([100, 200, 400, 800], [1e-3 + 3e-9 * L * L + 2e-6 * L for L in (100, 200, 400, 800)])
    assert (c0, c1, c2) == pytest.approx((1e-3, 3e-9, 2e-6), rel=1e-6)
    first = run_ranks(_calibrate, 3, str(tmp_path), True)
    costs = [c for c, _ in first]
    assert all(c.fitted == costs[0].fitted and c.links == costs[0].links for c in costs)
    cost = costs[0]
    assert sorted(cost.fitted) == [1, 2, 3] and sorted(cost.links) == [2, 3]
    assert all(min(coef) >= 0 and sum(coef) > 0 for coef in cost.fitted.values())
    assert all(lat > 0 and bw > 0 for lat, bw in cost.links.values())
    assert [created for _, created in first] == [2, 2, 2]  # the tiles (0, 1) and (0, 1, 2), made by every rank
    c0, c1, c2 = cost.fitted[2]
    assert cost(64, 2) == pytest.approx(c0 + c1 * 64 * 64 + c2 * 64)
    assert cost.strategy(64, 1) == "none"
    # Size 2's strategy: the cp cost model's fastest on the ring exchange measured for groups of 2, at the FLOP/s
    # that makes one rank's attention take the measured c1 * L^2 (2 heads of dim 16, 1 kv head: no ulysses).
    from loomtrain.parallel.cp.cost import Shape, attention_flops, predict_seconds

    latency, bandwidth = cost.links[2]
    c1 = cost.fitted[1][1]  # 0 when the fit finds no quadratic term at these lengths: attention is free
    flops = attention_flops(Shape(1, 64, 2, 1, 16, 1)) / (c1 * 64 * 64) if c1 > 0 else float("inf")  # 1 layer
    modelled = predict_seconds(Shape(1, 64, 2, 1, 16, 2), bandwidth, latency, flops)
    assert cost.strategy(64, 2) == min(("tokenring", "ring"), key=modelled.get), modelled
    assert len(list(tmp_path.glob("sp_cost-*.json"))) == 1
    again = run_ranks(_calibrate, 3, str(tmp_path), False)
    assert all(c.fitted == cost.fitted and c.links == cost.links for c, _ in again)


def test_a_tensor_parallel_pool_plans_with_one_tp_ranks_heads():
    """Under tp each rank holds n_heads/tp heads: strategies are chosen (and timed in the calibration) for
    those, so ulysses is never picked for a group whose local kv heads it cannot split."""
    from loomtrain.parallel.sp.cost import SequenceCost
    from loomtrain.trainer.models.llama.model import ModelArgs

    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, ffn_hidden=64, max_seq_len=4096)
    measured = {"sizes": {"1": {"coef": [0.0, 1e-9, 1e-6]}, "2": {"coef": [0.0, 5e-10, 5e-7]}},
                "links": {"2": [1e-6, 1e12]}}
    whole, split = (SequenceCost.from_calibration(measured, args, tp, ranks_per_node=8, impls=("ulysses",))
                    for tp in (1, 2))
    assert (whole.heads, whole.kv_heads, split.heads, split.kv_heads) == (4, 2, 2, 1)
    assert all(whole.strategy(L, 2) == "ulysses" for L in (64, 512, 4096))  # 2 kv heads split over 2 ranks
    assert all(split.strategy(L, 2) != "ulysses" for L in (64, 512, 4096))  # 1 local kv head does not


def test_group_sizes_between_calibrated_ones_are_interpolated():
    from loomtrain.parallel.sp.cost import SequenceCost, calibration_lengths, calibration_sizes

    cost = SequenceCost(1e-9, 1e-6, 8, 8, 64, 2, fitted={1: (0.0, 0.0, 4e-6), 2: (0.0, 0.0, 2e-6),
                                                         8: (0.0, 0.0, 0.5e-6)}, ranks_per_node=8)
    assert cost(1000, 4) == pytest.approx(1e-3)  # geometric between 2 (2 ms) and 8 (0.5 ms)
    assert cost(1000, 2) > cost(1000, 3) > cost(1000, 4) > cost(1000, 8)
    assert calibration_sizes(range(1, 65), 8) == [1, 2, 3, 4, 5, 6, 7, 8, 16, 32, 64]
    assert calibration_sizes([1, 2, 24, 48], 8) == [1, 2, 48]  # 24 is 3 nodes: interpolated
    assert calibration_lengths(3, 100, 10_000) == [36, 72, 150, 300]  # multiples of 6, up to 3 x 100
    assert calibration_lengths(4, 100, 256) == [32, 64, 128, 256]  # never past the RoPE table


def test_every_placed_group_is_one_of_the_placeable_rank_sets():
    """What a trainer creates up front covers every plan (groups inside nodes or of whole nodes)."""
    import random

    from loomtrain.parallel.sp.planner import placeable_rank_sets

    assert placeable_rank_sets(4, [1, 2, 3]) == [(0, 1), (1, 2), (2, 3), (0, 1, 2), (1, 2, 3)]
    assert len(placeable_rank_sets(16, None, 8)) == 2 * 28 + 1
    rng = random.Random(0)
    for world, rpn in ((4, None), (6, None), (16, 8), (32, 8)):
        every = set(placeable_rank_sets(world, None, rpn))
        for _ in range(30):
            lengths = [rng.choice([50, 300, 900, 2500, 3900]) for _ in range(rng.randint(1, 12))]
            plan = plan_groups(lengths, world, 1000, cost, ranks_per_node=rpn)
            if not plan.crosses_nodes:
                assert {r for r, _ in plan.groups if len(r) > 1} <= every, plan.groups


def test_calibration_tiles_stay_bounded_on_large_pools():
    """The groups a calibration runs (and so creates) are the first node's tiles, or one tile of whole nodes:
    28 sets for a node of 8 whatever the pool, not thousands."""
    from loomtrain.parallel.sp.cost import calibration_sizes, tiles

    assert tiles(2, 1024, 8) == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert tiles(3, 1024, 8) == [(0, 1, 2), (3, 4, 5)]
    assert tiles(16, 1024, 8) == [tuple(range(16))]
    assert tiles(2, 4, 4) == [(0, 1), (2, 3)] and tiles(3, 4, 4) == [(0, 1, 2)]  # one node: the whole pool
    assert sum(len(tiles(d, 1024, 8)) for d in calibration_sizes(range(1, 1025), 8) if d > 1) <= 20


@pytest.mark.parametrize("override, message", [
    (["parallel.sp_mode=adaptive"], "parallel.sp_mode: adaptive plans whole documents; set data.batching=documents"),
    (["parallel.sp_mode=adaptive_sharded"], "parallel.sp_mode: adaptive_sharded plans whole documents; set "
                                            "data.batching=documents"),
    (["parallel.sp_mode=adaptive_sharded", "data.batching=documents", "train.global_batch_tokens=512",
      "parallel.dp_engine=deepspeed"], "parallel.sp_mode: adaptive_sharded needs parallel.dp_engine=fsdp"),
    (["parallel.sp_mode=sharded"], "parallel.sp_mode"),
    (["parallel.sp_mode=adaptive", "data.batching=documents", "train.global_batch_tokens=512", "parallel.cp=2"],
     "parallel.sp_mode: adaptive makes every data-parallel rank (a tensor-parallel group) one data x context pool"),
    (["parallel.sp_mode=adaptive", "data.batching=documents", "train.global_batch_tokens=512", "parallel.tp=2",
      "parallel.mesh_order=tp,pp,dp_replicate,dp_shard,cp"], "adaptive sp with tp > 1 needs tp innermost"),
    (["parallel.sp_mode=adaptive", "data.batching=documents", "train.global_batch_tokens=512",
      "parallel.dp_replicate=2", "parallel.dp_sync=diloco"],
     "parallel.dp_sync: diloco is not supported with parallel.sp_mode=adaptive"),
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
    assert main(["plan", "llama8b_512k_adaptive_cluster", "--world-size", "512", "--set", "parallel.tp=2"]) == 0
    assert "32,768 tokens per tp group of 2" in capsys.readouterr().out  # the pool's members are tp groups


def test_the_memory_estimate_keeps_the_whole_model_gathered_in_adaptive_mode():
    """Adaptive ranks run different numbers of rows, so FSDP keeps every unit gathered over the step and
    syncs gradients once: the estimate holds the whole model unsharded (bf16) and its unsharded gradients,
    not three blocks' worth (the old estimate said 2.2 GiB of gathered parameters for the 8B config)."""
    from loomtrain.launch.plan import memory_estimate
    from loomtrain.trainer.checks import check_experiment
    from loomtrain.trainer.config import load_config
    from loomtrain.trainer.models.llama.model import ModelArgs

    exp = load_config("llama8b_512k_adaptive_cluster")
    dims = check_experiment(exp, 512, 8, "cuda")
    args = ModelArgs.from_config(exp.model, exp.model.vocab_size, exp.data.seq_len)
    mem = memory_estimate(exp, args, dims, args.vocab_size)
    n = args.num_params()
    assert mem["FSDP gathered parameters"] == pytest.approx(2 * n, rel=0.02)
    assert mem["accumulation gradients (unsharded fp32)"] == pytest.approx(4 * n)
    # pure replication (HSDP with shards of 1) keeps the same; activations are one row's at any pool size
    replicated = load_config("llama8b_512k_adaptive_cluster", ["parallel.dp_replicate=64", "parallel.dp_shard=1"])
    mem64 = memory_estimate(replicated, args, check_experiment(replicated, 64, 8, "cuda"), args.vocab_size)
    assert mem64["FSDP gathered parameters"] == mem["FSDP gathered parameters"]
    assert mem64["activations (full)"] == mem["activations (full)"]


def test_the_memory_estimate_of_sharded_adaptive_pools_keeps_a_shard():
    """``adaptive_sharded`` runs waves of one row per rank: FSDP reshards between passes (three blocks and the
    output unit gathered, as in a static layout) and reduce-scatters every pass (no unsharded gradients), so the
    8B/512K plan drops from the whole model gathered to a few blocks; activations stay one row's."""
    from loomtrain.launch.plan import memory_estimate
    from loomtrain.trainer.checks import check_experiment
    from loomtrain.trainer.config import load_config
    from loomtrain.trainer.models.llama.model import ModelArgs

    mems = {}
    for mode in ("adaptive", "adaptive_sharded"):
        exp = load_config("llama8b_512k_adaptive_cluster", [f"parallel.sp_mode={mode}"])
        args = ModelArgs.from_config(exp.model, exp.model.vocab_size, exp.data.seq_len)
        mems[mode] = memory_estimate(exp, args, check_experiment(exp, 512, 8, "cuda"), args.vocab_size)
    whole, sharded = mems["adaptive"], mems["adaptive_sharded"]
    block = (args.num_params() - 2 * args.vocab_size * args.dim) / args.n_layers
    assert sharded["FSDP gathered parameters"] == pytest.approx(2 * (3 * block + args.vocab_size * args.dim),
                                                                rel=0.01)
    assert "accumulation gradients (unsharded fp32)" not in sharded
    assert sharded["activations (full)"] == whole["activations (full)"]
    assert sum(sharded.values()) < 0.4 * sum(whole.values())


def test_sharded_waves_give_every_rank_the_same_number_of_rows(tmp_path):
    """One row per rank per wave: the group's, or (no group in that wave, or idle) an unlabelled two-token row, so
    every rank makes the same number of passes."""
    import numpy as np

    from loomtrain.data.indexed import IndexedTokens, write_indexed
    from loomtrain.parallel.sp.cost import SequenceCost
    from loomtrain.parallel.sp.modes import AdaptiveBatches
    from loomtrain.parallel.sp.waves import Waves

    write_indexed(str(tmp_path / "d"), [np.arange(1, 61)], np.uint16)
    data, model = IndexedTokens(str(tmp_path / "d")), SequenceCost(1e-9, 1e-6, 6, 3, 16, 1)
    pieces = [(0, 5), (5, 8), (13, 3), (16, 14)]
    waves = Waves([[((0,), [1]), ((1, 2), [3])], [((0,), [0])], [((0, 1), [2])]], 0.0, "test")  # rank 3 idle
    out = []
    for rank in range(4):
        b = AdaptiveBatches(data, 0, 100, 14, 8, rank, 4, model, waves=True)
        b.plan = lambda position=None: (waves, pieces, 0)
        out.append(b.build(0)[0])
    assert [len(rows) for rows in out] == [3, 3, 3, 3]
    assert [(r["labels"] != -100).sum().item() for r in out[0][:2]] == [8, 5]
    assert sum((out[r][2]["labels"] != -100).sum().item() for r in (0, 1)) == 3  # a group of 2: split over them
    assert [r["sp_group"].tolist() for r in out[1]] == [[1, 2], [1, 1], [0, 2]]
    for rank, idle in ((1, [1]), (2, [1, 2]), (3, [0, 1, 2])):
        for k in idle:
            r = out[rank][k]
            assert r["input_ids"].shape[1] == 2 and (r["labels"] == -100).all() and r["sp_group"].tolist() == [rank, 1]
    assert out[0][0]["sp_plan"].tolist() == [[0, 1], [1, 2], [0, 2]]  # every rank set of the step, once


def test_waves_hold_every_sequence_once_in_one_row_per_group():
    """``plan_waves``: each wave's groups are disjoint and each runs one row it holds; every sequence runs once;
    the time is the sum of each wave's slowest row, no worse than the step's plan cut into waves as it is."""
    from loomtrain.parallel.sp.waves import _one_plan, padded_length, plan_waves

    rng = random.Random(7)
    for world, cap in ((4, 2048), (8, 1024), (16, 4096)):
        lengths = [min(int(rng.paretovariate(1.1) * 200), cap * world) for _ in range(40)]
        w = plan_waves(lengths, world, cap, cost, ranks_per_node=4 if world > 4 else None)
        assert sorted(i for _, row in w.groups for i in row) == list(range(len(lengths)))
        total = 0.0
        for wave in w.waves:
            ranks = [r for rs, _ in wave for r in rs]
            assert len(ranks) == len(set(ranks)) and all(0 <= r < world for r in ranks)
            for rs, row in wave:
                n = sum(lengths[i] for i in row)
                assert len(row) == 1 or padded_length(n, len(rs)) <= len(rs) * cap
            total += max(sum(cost(lengths[i], len(rs)) for i in row) for rs, row in wave)
        assert w.time == pytest.approx(total, rel=1e-12)
        assert w.time <= _one_plan(lengths, world, cap, cost, 1, degrees=None,
                                   ranks_per_node=4 if world > 4 else None).time + 1e-12


def test_padding_positions_stay_inside_the_rope_table(tmp_path):
    """A piece padded for its group (here 7 tokens on 3 ranks: 12) gets small positions on the padding, so
    the longest position is the longest piece's, whatever the group size."""
    import numpy as np
    import torch

    from loomtrain.data.indexed import IndexedTokens, write_indexed
    from loomtrain.parallel.sp.modes import AdaptiveBatches
    from loomtrain.parallel.sp.cost import SequenceCost

    write_indexed(str(tmp_path / "d"), [np.arange(1, 9)], np.uint16)
    data = IndexedTokens(str(tmp_path / "d"))
    model = SequenceCost(1e-9, 1e-6, 6, 3, 16, 1)
    parts = [AdaptiveBatches(data, 0, 100, 7, 4, r, 3, model)._row([(0, 7)], (0, 1, 2), torch.zeros(1, 2))
             for r in range(3)]
    assert sum(p["position_ids"].shape[1] for p in parts) == 12
    assert max(p["position_ids"].max().item() for p in parts) == 6  # the old padding reached 11
    assert all("doc_ids" not in p for p in parts)  # one document: plain causal attention


def test_a_groups_short_sequences_are_packed_into_rows_it_holds(tmp_path):
    """Sequences of one group share a forward while their sum fits the group (d x capacity, padded to 2d):
    each is its own document (positions restart, labels stay inside it, padding unlabelled)."""
    import numpy as np

    from loomtrain.data.indexed import IndexedTokens, write_indexed
    from loomtrain.parallel.sp.modes import AdaptiveBatches
    from loomtrain.parallel.sp.cost import SequenceCost

    write_indexed(str(tmp_path / "d"), [np.arange(1, 41)], np.uint16)
    model = SequenceCost(1e-9, 1e-6, 6, 3, 16, 1)
    batches = AdaptiveBatches(IndexedTokens(str(tmp_path / "d")), 0, 100, 16, 8, 0, 2, model)
    pieces = [(0, 5), (5, 6), (11, 16), (27, 3)]
    assert batches.rows([0, 1, 2, 3], pieces, 2) == [[(0, 5), (5, 6)], [(11, 16)], [(27, 3)]]
    assert batches.rows([0, 1, 3], pieces, 1) == [[(0, 5)], [(5, 6)], [(27, 3)]]  # 8 tokens: 5 + 3 do not
    halves = [AdaptiveBatches(batches.data, 0, 100, 16, 8, r, 2, model)._row([(0, 5), (5, 6)], (0, 1), None)
              for r in range(2)]  # a group of 2: 11 tokens padded to 12, 3 per zigzag chunk
    assert [h["doc_ids"][0].tolist() for h in halves] == [[0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 1, 1]]
    row = batches._row([(0, 5), (5, 6)], (0,), None)
    assert row["input_ids"].shape == (1, 11)
    assert row["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5]
    assert row["doc_ids"][0].tolist() == [0] * 5 + [1] * 6
    assert row["labels"][0].tolist() == [2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
