"""Topology discovery from fixture sysfs trees, cluster descriptions, and NIC-aware placement against
Megatron's default rank order (``plan --cluster``)."""
import json
import os

import pytest

from loomtrain.errors import ConfigError
from loomtrain.launch.cli import main
from loomtrain.launch.placement import compare, fabric_order, groups, naive_order
from loomtrain.launch.topology import best_nic, cluster_from_dict, cluster_from_nics, discover_nics, load_cluster
from loomtrain.parallel.mesh import ParallelDims


def _write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text + "\n")


def _rdma(root, dev, *, rate, state="4: ACTIVE", layer="InfiniBand", netdev=None, port=1):
    base = os.path.join(root, "class", "infiniband", dev)
    _write(os.path.join(base, "ports", str(port), "rate"), rate)
    _write(os.path.join(base, "ports", str(port), "state"), state)
    _write(os.path.join(base, "ports", str(port), "link_layer"), layer)
    if netdev:
        os.makedirs(os.path.join(base, "device", "net", netdev), exist_ok=True)


def _netdev(root, name, *, speed, state="up", kind=1, physical=True):
    base = os.path.join(root, "class", "net", name)
    _write(os.path.join(base, "speed"), str(speed))
    _write(os.path.join(base, "operstate"), state)
    _write(os.path.join(base, "type"), str(kind))
    if physical:
        os.makedirs(os.path.join(base, "device"), exist_ok=True)


def test_infiniband_host(tmp_path):
    root = str(tmp_path)
    _rdma(root, "mlx5_0", rate="400 Gb/sec (4X NDR)", netdev="ib0")
    _rdma(root, "mlx5_1", rate="400 Gb/sec (4X NDR)", netdev="ib1")
    _netdev(root, "ib0", speed=400000, kind=32)  # IPoIB: the port's netdev, not a second NIC
    _netdev(root, "ib1", speed=400000, kind=32)
    _netdev(root, "eth0", speed=25000)
    _netdev(root, "lo", speed=-1, kind=772, physical=False)
    nics = discover_nics(root)
    assert [(n.name, n.kind, n.gbps, n.up, n.netdev) for n in nics] == [
        ("mlx5_0/1", "ib", 400.0, True, "ib0"), ("mlx5_1/1", "ib", 400.0, True, "ib1"),
        ("eth0", "ethernet", 25.0, True, "eth0")]
    assert best_nic(nics).netdev == "ib0"


def test_roce_host(tmp_path):
    root = str(tmp_path)
    _rdma(root, "mlx5_0", rate="200 Gb/sec (4X HDR)", layer="Ethernet", netdev="ens1f0")
    _netdev(root, "ens1f0", speed=200000)  # the RoCE port's Ethernet netdev: counted once, as roce
    _netdev(root, "eno1", speed=1000)
    nics = discover_nics(root)
    assert [(n.name, n.kind, n.gbps) for n in nics] == [("mlx5_0/1", "roce", 200.0), ("eno1", "ethernet", 1.0)]
    assert best_nic(nics).netdev == "ens1f0"


def test_ethernet_only_host_skips_virtual_interfaces(tmp_path):
    root = str(tmp_path)
    _netdev(root, "eth0", speed=100000)
    _netdev(root, "eth1", speed=-1, state="down")  # no link
    _netdev(root, "veth0", speed=10000, physical=False)
    _netdev(root, "docker0", speed=-1, physical=False)
    nics = discover_nics(root)
    assert [(n.name, n.up) for n in nics] == [("eth0", True), ("eth1", False)]
    assert best_nic(nics).name == "eth0"


def test_dual_port_hca_maps_each_port_to_its_own_netdev(tmp_path):
    root = str(tmp_path)
    _rdma(root, "mlx4_0", rate="56 Gb/sec (4X FDR)", netdev="ib0", port=1)
    _rdma(root, "mlx4_0", rate="56 Gb/sec (4X FDR)", state="5: ACTIVE_DEFER", netdev="ib1", port=2)
    _netdev(root, "ib0", speed=56000, kind=32)
    _netdev(root, "ib1", speed=56000, kind=32)
    _write(os.path.join(root, "class", "net", "ib0", "dev_port"), "0")
    _write(os.path.join(root, "class", "net", "ib1", "dev_port"), "1")
    _netdev(root, "eth0", speed=-1)  # up, speed unknown (virtio): still usable
    nics = discover_nics(root)
    assert [(n.name, n.netdev, n.up) for n in nics] == [("mlx4_0/1", "ib0", True), ("mlx4_0/2", "ib1", True),
                                                        ("eth0", "eth0", True)]


def test_mixed_host_with_a_port_down_uses_the_fastest_active_one(tmp_path):
    root = str(tmp_path)
    _rdma(root, "mlx5_0", rate="400 Gb/sec (4X NDR)", state="1: DOWN", netdev="ib0")
    _rdma(root, "mlx5_1", rate="100 Gb/sec (4X EDR)", layer="Ethernet", netdev="ens2")
    _netdev(root, "ens2", speed=100000)
    _netdev(root, "eth0", speed=25000)
    nics = discover_nics(root)
    assert [(n.name, n.up) for n in nics] == [("mlx5_1/1", True), ("eth0", True), ("mlx5_0/1", False)]
    assert best_nic(nics).kind == "roce"
    assert discover_nics(str(tmp_path / "nothing")) == [] and best_nic([]) is None


def test_hosts_discovered_alike_share_a_fabric(tmp_path):
    ib, eth = str(tmp_path / "ib"), str(tmp_path / "eth")
    _rdma(ib, "mlx5_0", rate="400 Gb/sec (4X NDR)", netdev="ib0")
    _netdev(eth, "eth0", speed=25000)
    c = cluster_from_nics([("a", 8, discover_nics(ib)), ("b", 8, discover_nics(ib)), ("c", 8, discover_nics(eth))])
    assert [h.fabric for h in c.hosts] == ["ib-400g", "ib-400g", "ethernet-25g"] and c.between == "ethernet-25g"
    assert c.link([0, 8]) == ("ib-400g", 400.0) and c.link([0, 16])[0] == "ethernet-25g"
    assert c.link([0, 7]) == ("host", c.intra_host_gbps)


TWO_PODS = {"fabrics": {"pod-a": {"kind": "ib", "gbps": 400}, "pod-b": {"kind": "ib", "gbps": 400},
                        "dc": {"kind": "ethernet", "gbps": 10}},
            "between": "dc",
            "hosts": [{"name": "a1", "fabric": "pod-a", "devices": 1}, {"name": "b1", "fabric": "pod-b", "devices": 1},
                      {"name": "a2", "fabric": "pod-a", "devices": 1}, {"name": "b2", "fabric": "pod-b", "devices": 1}]}


def test_placement_keeps_data_parallel_inside_a_pod_and_pipeline_across():
    c = cluster_from_dict(TWO_PODS)
    dims = ParallelDims(pp=2, dp_shard=2, world_size=4)
    placed = groups(c, dims, fabric_order(c))
    assert fabric_order(c) == [0, 2, 1, 3]  # a1, a2, b1, b2
    assert [(g.hosts, g.link) for g in placed["dp_shard"]] == [(["a1", "a2"], "pod-a"), (["b1", "b2"], "pod-b")]
    assert {g.link for g in placed["pp"]} == {"dc"}
    naive = groups(c, dims, naive_order(c))
    assert {g.link for g in naive["dp_shard"]} == {"dc"}  # node-rank order interleaves the pods


def test_compare_names_crossings_and_counts_bytes_per_fabric(small_exp):
    c = cluster_from_dict(TWO_PODS)
    exp, args = small_exp(["parallel.pp=2", "parallel.dp_shard=2"])
    r = compare(exp, args, ParallelDims(pp=2, dp_shard=2, world_size=4), c, 1e15)  # fast compute: comm shows
    placed, naive = r["placed"], r["megatron_default"]
    assert placed["crossings"] == [] and "dc" in placed["bytes_per_fabric"]
    assert any(line.startswith("dp_shard_cp: 2 of 2 groups cross dc") for line in naive["crossings"])
    # placed: only pipeline sends use dc; the default order puts FSDP's traffic there (and the pipeline in pods)
    from loomtrain.launch.plan import traffic_per_step

    sent = traffic_per_step(exp, args, ParallelDims(pp=2, dp_shard=2, world_size=4))
    assert placed["bytes_per_fabric"]["dc"] == pytest.approx(4 * sent["pp"])
    assert naive["bytes_per_fabric"]["dc"] == pytest.approx(4 * sent["dp_shard_cp"])
    assert r["speedup"] > 1.0
    # pp=1: data parallelism must span both pods; the placement says so and what it costs
    r1 = compare(exp, args, ParallelDims(dp_shard=4, world_size=4), c, 1e12)
    assert r1["placed"]["crossings"] and "cross dc (10 Gbit/s)" in r1["placed"]["crossings"][0]


def test_auto_split_gives_the_stage_on_the_slower_fabric_fewer_layers(small_exp):
    from loomtrain.launch.placement import stage_split

    c = cluster_from_dict({"fabrics": {"ib": {"kind": "ib", "gbps": 400}, "eth": {"kind": "ethernet", "gbps": 1}},
                           "between": "eth",
                           "hosts": [{"name": "a1", "fabric": "ib", "devices": 2},
                                     {"name": "e1", "fabric": "eth", "devices": 1},
                                     {"name": "e2", "fabric": "eth", "devices": 1}]})
    exp, args = small_exp(["parallel.pp=2", "parallel.dp_shard=2", "model.n_layers=8"])
    dims = ParallelDims(pp=2, dp_shard=2, world_size=4)
    split = stage_split(exp, args, dims, c, fabric_order(c), 1e15)  # stage 0 on a1 (one host), stage 1 on e1+e2
    assert sum(split) == 8 and split[0] > split[1] >= 1
    even = cluster_from_dict(dict(TWO_PODS, fabrics={**TWO_PODS["fabrics"], "dc": {"kind": "ethernet", "gbps": 10}}))
    assert stage_split(exp, args, dims, even, fabric_order(even), 1e15) == [4, 4]  # equal pods: balanced


def test_a_rank_order_that_needs_renumbering_is_recognised():
    """Hosts a1, b1, b2, a2: grouping by fabric puts ranks 3 before 2 in a pipeline group; torch orders a
    group's ranks, so the group's rank numbering would disagree with the mesh: the ranks are renumbered."""
    from loomtrain.launch.placement import unsorted_groups

    hosts = [TWO_PODS["hosts"][i] for i in (0, 1, 3, 2)]
    c = cluster_from_dict(dict(TWO_PODS, hosts=hosts))
    assert unsorted_groups(ParallelDims(pp=2, dp_shard=2, world_size=4), fabric_order(c)) == [[3, 2]]
    assert unsorted_groups(ParallelDims(pp=2, dp_shard=2, world_size=4), fabric_order(cluster_from_dict(TWO_PODS))) == []


def test_auto_split_never_leaves_a_stage_empty(small_exp):
    from loomtrain.launch.placement import stage_split

    c = cluster_from_dict({"fabrics": {"ib": {"kind": "ib", "gbps": 400}, "eth": {"kind": "ethernet", "gbps": 0.01}},
                           "between": "eth",
                           "hosts": [{"name": f"i{i}", "fabric": "ib", "devices": 1} for i in range(4)]
                           + [{"name": f"e{i}", "fabric": "eth", "devices": 1} for i in range(4)]})
    exp, args = small_exp(["parallel.pp=4", "parallel.dp_shard=2", "model.n_layers=5"])
    split = stage_split(exp, args, ParallelDims(pp=4, dp_shard=2, world_size=8), c, fabric_order(c), 1e15)
    assert sum(split) == 5 and min(split) >= 1


def test_tensor_parallel_stays_inside_a_host():
    c = cluster_from_dict({"fabrics": {"ib": {"kind": "ib", "gbps": 400}},
                           "hosts": [{"name": f"h{i}", "fabric": "ib", "devices": 4} for i in range(2)]})
    placed = groups(c, ParallelDims(tp=4, dp_shard=2, world_size=8), fabric_order(c))
    assert [g.link for g in placed["tp"]] == ["host", "host"] and placed["dp_shard"][0].link == "ib"


@pytest.mark.parametrize("raw, message", [
    ({"fabrics": {"x": {"kind": "myrinet", "gbps": 1}}, "hosts": [{"name": "a", "fabric": "x"}]},
     "fabrics.x.kind: must be one of ib, roce, ethernet"),
    ({"fabrics": {"x": {"kind": "ib", "gbps": 0}}, "hosts": [{"name": "a", "fabric": "x"}]},
     "fabrics.x.gbps: must be a number > 0"),
    ({"fabrics": {"x": {"kind": "ib", "gbps": 1}}, "hosts": [{"name": "a", "fabric": "y"}]},
     "hosts[0].fabric: must be one of x, got 'y'"),
    ({"fabrics": {"x": {"kind": "ib", "gbps": 1}}, "hosts": [{"name": "a", "fabric": "x", "devices": 0}]},
     "hosts[0].devices: must be an integer > 0"),
    ({"fabrics": {"x": {"kind": "ib", "gbps": 1}}, "hosts": []}, "hosts: needs at least one host"),
    ({"fabrics": {"x": {"kind": "ib", "gbps": 1}}, "hosts": [{"name": "a", "fabric": "x"}], "between": "z"},
     "between: must be one of x"),
    ({"fabric": {}}, "unknown key 'fabric'"),
])
def test_bad_cluster_descriptions_name_the_field(raw, message):
    with pytest.raises(ConfigError, match=message.replace("[", "\\[").replace("]", "\\]")):
        cluster_from_dict(raw)


def test_plan_cluster_prints_groups_bytes_and_the_comparison(tmp_path, capsys):
    import yaml

    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(TWO_PODS))
    ov = ["--set", "parallel.pp=2", "--set", "parallel.dp_shard=2", "--set", "train.microbatches=4"]
    assert main(["plan", "tiny", "--cluster", str(path), *ov]) == 0
    out = capsys.readouterr().out
    assert "placement (hosts grouped by fabric)" in out and "megatron default order" in out
    assert "dp_shard     ranks 0,2 on a1,a2 via pod-a" in out and "placement vs megatron default" in out
    assert main(["plan", "tiny", "--cluster", str(path), "--json", *ov]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["placed"]["order"] == [0, 2, 1, 3] and data["speedup"] > 1
    assert main(["plan", "tiny", "--cluster", str(path), "--world-size", "8", *ov]) == 2
    assert main(["plan", "tiny", "--json", "--world-size", "4"]) == 2
    assert main(["plan", "tiny", "--cluster", str(tmp_path / "missing.yaml")]) == 2
    with pytest.raises(ConfigError, match="cannot read"):
        load_cluster(str(tmp_path / "missing.yaml"))


@pytest.fixture
def small_exp():
    from loomtrain.trainer.config import load_config
    from loomtrain.trainer.models.llama.model import ModelArgs

    def make(overrides):
        exp = load_config("tiny", overrides + ["train.microbatches=4"])
        return exp, ModelArgs.from_config(exp.model, 320, exp.data.seq_len)
    return make


def _placed_training(rank, overrides, hosts=(0, 1, 2, 3)):
    from conftest import train_capturing
    from loomtrain.trainer import train as train_mod

    os.environ["LOOMTRAIN_HOST_ID"] = TWO_PODS["hosts"][hosts[rank]]["name"]  # a1, b1, a2, b2: pods interleaved
    seen = {}
    original = train_mod.Trainer.fit

    def fit(self):
        seen["placement"] = self.dims.placement
        seen["rank"], seen["launch_rank"] = self.env.rank, rank
        import torch.distributed as dist

        seen["pp_peers"] = dist.get_process_group_ranks(self.mesh["pp"].get_group())
        seen["dp_group"] = sorted(self.dims.groups("dp_shard")[0])
        import torch.distributed as dist

        seen["backend"] = dist.get_backend(self.mesh["dp_shard_cp"].get_group())
        return original(self)

    train_mod.Trainer.fit = fit
    losses, norms, captured = train_capturing(rank, overrides)
    return losses, seen, norms, captured


def test_training_with_fabric_placement_binds_groups_and_matches_rank_order(overrides, tmp_path):
    """4 ranks on hosts a1, b1, a2, b2: the mesh takes a1, a2, b1, b2; data-parallel groups bind gloo to the
    pod's interface (here: loopback) through their own backend; losses, grad norms and final parameters equal
    the rank-order run's."""
    import yaml

    from conftest import run_ranks

    cluster = dict(TWO_PODS, hosts=[dict(h, interface="lo", between_interface="lo") for h in TWO_PODS["hosts"]])
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(cluster))
    base = overrides + ["parallel.pp=2", "parallel.dp_shard=2", "train.microbatches=2", "train.steps=3"]
    plain = run_ranks(_placed_training, 4, base + [f"train.output_dir={tmp_path / 'plain'}"])
    placed = run_ranks(_placed_training, 4, base + ["parallel.placement=fabric", f"parallel.cluster={path}"])
    assert placed[0][1]["placement"] == (0, 2, 1, 3) and plain[0][1]["placement"] is None
    assert placed[0][1]["dp_group"] == [0, 2] and plain[0][1]["dp_group"] == [0, 1]
    assert placed[0][1]["backend"] == "loomtrain_gloo"
    _assert_same_training(placed, plain)


def test_placement_settings_are_checked_before_start(tmp_path):
    from loomtrain.trainer.config import load_config

    with pytest.raises(ConfigError, match="parallel.mesh_order: placement=fabric decides"):
        load_config("tiny", ["parallel.placement=fabric", "parallel.mesh_order=pp,dp_shard,dp_replicate,cp,tp"])
    with pytest.raises(ConfigError, match="parallel.cluster: only used with parallel.placement=fabric"):
        load_config("tiny", [f"parallel.cluster={tmp_path}"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("tiny", ["parallel.placement=fabric", f"parallel.cluster={tmp_path / 'none.yaml'}"])


def test_hosts_the_launcher_numbered_out_of_fabric_order_are_renumbered(overrides, tmp_path):
    """Hosts a1, b1, b2, a2 by rank (previously refused): the ranks are renumbered so that the mesh fills pod by
    pod (a1, a2, b1, b2); training then matches the rank-order run's losses, grad norms and final parameters."""
    import yaml

    from conftest import run_ranks

    cluster = dict(TWO_PODS, hosts=[dict(h, interface="lo", between_interface="lo") for h in TWO_PODS["hosts"]])
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(cluster))
    base = overrides + ["parallel.pp=2", "parallel.dp_shard=2", "train.microbatches=2", "train.steps=3"]
    plain = run_ranks(_placed_training, 4, base + [f"train.output_dir={tmp_path / 'plain'}"])
    placed = run_ranks(_placed_training, 4, base + ["parallel.placement=fabric", f"parallel.cluster={path}"],
                       (0, 1, 3, 2))
    by_launch = {seen["launch_rank"]: seen for _, seen, *_ in placed}
    assert [by_launch[r]["rank"] for r in range(4)] == [0, 2, 3, 1]  # a1 a2 b1 b2 take 0 1 2 3 ... by host
    assert all(seen["placement"] == (0, 1, 2, 3) for _, seen, *_ in placed)
    # Pipeline groups pair a pod-a host with a pod-b host: a1-b1, a2-b2 in the new numbering.
    assert sorted(tuple(seen["pp_peers"]) for _, seen, *_ in placed) == [(0, 2), (0, 2), (1, 3), (1, 3)]
    _assert_same_training(placed, plain)


def _assert_same_training(placed, plain):
    """Placed and rank-order runs: losses and grad norms within 1e-5, final parameters within 1e-6."""
    from conftest import assert_same_training

    def as_captured(runs):
        return [(losses, norms, captured) for losses, _, norms, captured in runs]

    assert_same_training(as_captured(placed), as_captured(plain), rtol=1e-5, atol_params=1e-6)
