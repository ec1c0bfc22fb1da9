"""``parallel.cp_impl: auto`` on a cluster description (``launch/cp_links.py``): the link across is the slowest tier
any real cp group spans, the two-dimensional splits are weighed only for Ulysses group sizes whose groups sit on a
faster tier, the pick is the cost model's fastest (recomputed here from the file's links), link numbers the user set
win over the file, and ``plan --cluster`` prints what train (``checks.cp_attention``) runs."""

import yaml

from loomtrain.launch.cp_links import cluster_links

CONFIG = "llama8b_64k_cluster"
# tp=1, cp=8; 4 KV heads so that Ulysses over all 8 ranks cannot split them: the splits U = 2, 4 compete with ring
BASE = ["parallel.tp=1", "parallel.cp=8", "parallel.cp_impl=auto", "model.n_kv_heads=4", "train.global_batch_size=8"]
HOST_GBPS = 3600.0


def _cluster(tmp_path, hosts: int, devices: int, between_gbps: float) -> str:
    path = tmp_path / f"cluster_{hosts}x{devices}_{between_gbps:g}.yaml"
    path.write_text(yaml.safe_dump({
        "fabrics": {"net": {"kind": "ib", "gbps": between_gbps}}, "intra_host_gbps": HOST_GBPS,
        "hosts": [{"name": f"h{i}", "fabric": "net", "devices": devices} for i in range(hosts)]}))
    return str(path)


def _run(path: str, *extra: str):
    """(experiment, model args, dims) of the run train would start on ``path``'s hosts."""
    from loomtrain.launch.plan import planned_model_args
    from loomtrain.trainer.checks import check_experiment
    from loomtrain.trainer.config import load_config

    exp = load_config(CONFIG, BASE + ["parallel.placement=fabric", f"parallel.cluster={path}", *extra])
    dims = check_experiment(exp, 8, 4, "cuda")
    return exp, planned_model_args(exp)[0], dims


def _modelled(exp, args, dims, across_gbps: float, inner: dict[int, float]) -> dict:
    """Every candidate's modelled seconds, from the links alone (the 1-D strategies on the link across; the splits
    of each U in ``inner`` with their all-to-all on its Gbit/s)."""
    from loomtrain.parallel.cp import strategy, usable
    from loomtrain.parallel.cp.cost import Shape
    from loomtrain.trainer.checks import REFERENCE_TFLOPS, micro_layout

    shape = Shape(micro_layout(exp, dims)[0], exp.data.seq_len, args.n_heads, args.n_kv_heads, args.head_dim, 8, 2)
    bw, lat, flops = across_gbps * 1e9 / 8, 1e-5, REFERENCE_TFLOPS["bfloat16"] * 1e12
    t = {n: strategy(n).seconds(shape, bw, lat, flops) for n in usable(shape.heads, shape.kv_heads, 8)}
    for name in ("ulysses_ring", "ulysses_tokenring"):
        for u, gbps in inner.items():
            t[(name, u)] = strategy(name).with_ulysses(u, gbps * 1e9 / 8).seconds(shape, bw, lat, flops)
    return t


def _key(impl):
    return impl if isinstance(impl, str) else (impl.name, impl.ulysses)


def test_slow_link_between_hosts_picks_the_cost_models_split_inside_a_host(tmp_path):
    from loomtrain.trainer.checks import cp_attention

    exp, args, dims = _run(_cluster(tmp_path, 2, 4, 25))
    links = cluster_links(exp, dims)
    assert links.across == ("net", 25.0) and links.inner == {2: ("host", HOST_GBPS), 4: ("host", HOST_GBPS)}
    t = _modelled(exp, args, dims, 25, {2: HOST_GBPS, 4: HOST_GBPS})
    pick = cp_attention(exp, args, dims, cluster_links(exp, dims))
    assert _key(pick) == min(t, key=t.get)
    assert not isinstance(pick, str) and 1 < pick.ulysses <= 4  # a split, never wider than a host


def test_fast_link_between_hosts_picks_what_the_1d_model_says(tmp_path):
    """One tier (the link between hosts as fast as inside): no Ulysses group size sits on a faster link, so no
    split is weighed, and the pick is the 1-D model's on that link."""
    from loomtrain.parallel.cp import choose
    from loomtrain.parallel.cp.cost import Shape
    from loomtrain.trainer.checks import cp_attention

    exp, args, dims = _run(_cluster(tmp_path, 2, 4, HOST_GBPS))
    assert cluster_links(exp, dims).inner == {}
    t = _modelled(exp, args, dims, HOST_GBPS, {})
    pick = cp_attention(exp, args, dims, cluster_links(exp, dims))
    assert isinstance(pick, str) and pick == min(t, key=t.get)
    shape = Shape(1, exp.data.seq_len, args.n_heads, args.n_kv_heads, args.head_dim, 8, 2)
    assert pick == choose(shape, HOST_GBPS * 1e9 / 8, 1e-5, 989e12)
    # 400 Gbit/s between hosts: the splits inside a host are weighed, and the 1-D ring still wins by the model
    exp, args, dims = _run(_cluster(tmp_path, 2, 4, 400))
    assert set(cluster_links(exp, dims).inner) == {2, 4}
    t = _modelled(exp, args, dims, 400, {2: HOST_GBPS, 4: HOST_GBPS})
    pick = cp_attention(exp, args, dims, cluster_links(exp, dims))
    assert pick == min(t, key=t.get) == choose(shape, 400e9 / 8, 1e-5, 989e12)


def test_hosts_of_two_devices_never_get_ulysses_groups_of_four(tmp_path):
    from loomtrain.trainer.checks import cp_attention

    for between in (1, 25, 100):
        exp, args, dims = _run(_cluster(tmp_path, 4, 2, between))
        assert cluster_links(exp, dims).inner == {2: ("host", HOST_GBPS)}
        pick = cp_attention(exp, args, dims, cluster_links(exp, dims))
        t = _modelled(exp, args, dims, between, {2: HOST_GBPS})
        assert _key(pick) == min(t, key=t.get) and getattr(pick, "ulysses", 2) == 2


def test_groups_of_consecutive_cp_ranks_follow_tp_and_placement():
    """With tp=2 a block of U cp ranks spans 2U devices; under fabric placement the groups are the placed ones."""
    from loomtrain.launch.cp_links import from_cluster
    from loomtrain.launch.placement import fabric_order
    from loomtrain.launch.topology import cluster_from_dict
    from loomtrain.parallel.mesh import ParallelDims

    four_by_four = cluster_from_dict({"fabrics": {"net": {"kind": "ib", "gbps": 25}},
                                      "hosts": [{"name": f"h{i}", "fabric": "net", "devices": 4} for i in range(4)]})
    links = from_cluster(four_by_four, ParallelDims(cp=8, tp=2, world_size=16))
    assert links.across == ("net", 25.0) and set(links.inner) == {2}
    # two pods joined by a slow link, hosts numbered alternately: rank order puts cp pairs across pods
    pods = cluster_from_dict({"fabrics": {"a": {"kind": "ib", "gbps": 400}, "b": {"kind": "ib", "gbps": 400},
                                          "dc": {"kind": "ethernet", "gbps": 25}}, "between": "dc",
                              "hosts": [{"name": f"{p}{i}", "fabric": p, "devices": 2} for i in range(2) for p in "ab"]})
    dims = ParallelDims(cp=4, dp_shard=2, world_size=8)
    assert from_cluster(pods, dims).across == ("dc", 25.0)
    placed = from_cluster(pods, dims, fabric_order(pods))
    assert placed.across == ("a", 400.0) and placed.inner == {2: ("host", 3600.0)}


def test_link_numbers_the_user_set_win_over_the_cluster(tmp_path):
    from loomtrain.parallel.cp import choose
    from loomtrain.parallel.cp.cost import Shape
    from loomtrain.trainer.checks import cp_attention

    path = _cluster(tmp_path, 4, 2, 25)
    exp, args, dims = _run(path, "parallel.cp_link_gbps=50", "parallel.cp_inner_link_gbps=3600")
    assert cluster_links(exp, dims) is None
    shape = Shape(1, exp.data.seq_len, args.n_heads, args.n_kv_heads, args.head_dim, 8, 2)
    declared = choose(shape, 50e9 / 8, 1e-5, 989e12, inner_bandwidth=3600e9 / 8)  # every U, as without a cluster
    assert _key(cp_attention(exp, args, dims, cluster_links(exp, dims))) == _key(declared)


def test_a_cluster_that_does_not_match_the_run_leaves_auto_on_the_declared_links(tmp_path, capsys):
    from loomtrain.trainer.checks import check_experiment
    from loomtrain.trainer.config import load_config

    exp = load_config(CONFIG, BASE + ["parallel.placement=fabric",
                                      f"parallel.cluster={_cluster(tmp_path, 4, 4, 25)}"])
    dims = check_experiment(exp, 8, 4, "cuda")  # placement picks the job's hosts out of a larger file
    assert cluster_links(exp, dims) is None  # which ones is known only after the rendezvous: the declared links
    assert "parallel.cluster lists 16 devices, the run has 8" in capsys.readouterr().err
    exp = load_config(CONFIG, BASE + ["parallel.placement=fabric", "parallel.cp_link_gbps=50",
                                      f"parallel.cluster={_cluster(tmp_path, 4, 4, 25)}"])
    assert cluster_links(exp, check_experiment(exp, 8, 4, "cuda")) is None  # the declared link: the file is not read


def test_plan_prints_what_train_runs(tmp_path, capsys):
    """``plan --cluster FILE`` (placed row) and ``plan`` of a config naming the file print the strategy that
    ``checks.cp_attention`` (what ``train`` calls) returns for the run with ``parallel.cluster: FILE``."""
    from loomtrain.launch.cli import main
    from loomtrain.trainer.checks import cp_attention

    for hosts, devices in ((2, 4), (4, 2)):
        path = _cluster(tmp_path, hosts, devices, 25)
        exp, args, dims = _run(path)
        trained = str(cp_attention(exp, args, dims, cluster_links(exp, dims)))
        sets = [a for o in BASE for a in ("--set", o)]
        assert main(["plan", CONFIG, "--cluster", path, *sets]) == 0
        out = capsys.readouterr().out
        placed = out.split("placement (hosts grouped by fabric)")[1].split("megatron default order")[0]
        assert f"  cp_impl      {trained} (cp links from the cluster: across net (25 Gbit/s); U=2 inside host" in placed
        assert main(["plan", CONFIG, "--world-size", "8", "--gpus-per-node", str(devices), *sets, "--set",
                     "parallel.placement=fabric", "--set", f"parallel.cluster={path}"]) == 0
        assert "context-parallel" in (out := capsys.readouterr().out) and f"({trained})" in out
    assert main(["plan", CONFIG, "--cluster", _cluster(tmp_path, 2, 4, 25), *sets, "--set",
                 "parallel.placement=fabric", "--set", f"parallel.cluster={path}"]) == 2
    assert "--cluster: " in capsys.readouterr().err


def _trained_cp_impl(rank, overrides):
    import os

    from conftest import train_capturing
    from loomtrain.trainer import train as train_mod

    os.environ["LOOMTRAIN_HOST_ID"] = f"x{rank // 2 + 1}"  # 2 hosts x 2 ranks
    seen, original = {}, train_mod.Trainer.fit

    def fit(self):
        seen["cp_impl"] = str(self.cp_impl)
        return original(self)

    train_mod.Trainer.fit = fit
    losses, _, _ = train_capturing(rank, overrides)
    return seen["cp_impl"], losses


def test_train_runs_what_plan_prints(overrides, tmp_path, capsys):
    """4 forked ranks on 2 "hosts" of 2 (LOOMTRAIN_HOST_ID) joined by 1 Gbit/s: train's strategy (a split of U=2,
    Ulysses inside a host: 2 KV heads rule out Ulysses over 4) is the one ``plan --cluster`` prints, and it trains."""
    from conftest import run_ranks
    from loomtrain.launch.cli import main

    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump({"fabrics": {"net": {"kind": "ethernet", "gbps": 1}},
                                    "hosts": [{"name": f"x{i}", "fabric": "net", "devices": 2} for i in (1, 2)]}))
    run = ["parallel.cp=4", "parallel.dp_shard=1", "parallel.cp_impl=auto", "train.steps=2"]
    plan_sets = [a for o in [*overrides, *run, "parallel.device=cpu"] for a in ("--set", o)]
    assert main(["plan", "tiny", "--cluster", str(path), *plan_sets]) == 0
    planned = capsys.readouterr().out.split("placement (hosts grouped by fabric)")[1].split("  cp_impl      ")[1]
    results = run_ranks(_trained_cp_impl, 4, overrides + run + ["parallel.placement=fabric",
                                                               f"parallel.cluster={path}"])
    assert {r[0] for r in results} == {"ulysses_ring (cp_ulysses 2)"}
    assert planned.startswith("ulysses_ring (cp_ulysses 2) (cp links from the cluster: across net (1 Gbit/s)")
    assert all(len(r[1]) == 2 for r in results)
