"""One place validates an experiment against a world size: train, plan and the CLI preflight refuse alike.

Also: every accepted ``parallel.mesh_order`` builds every mesh the trainer slices (HSDP's
``dp_replicate x dp_shard_cp`` included) with the groups the order asks for, on torch's fake
process group: against the layout's formula for every order, and against rank groups written
out by hand (Megatron's order) for a few layouts. Every group lists its ranks ascending, so that
a rank's mesh coordinate is its rank in the group's process group (which torch always sorts).
"""
import itertools

import pytest

from loomtrain.errors import ConfigError
from loomtrain.launch.cli import main
from loomtrain.parallel.mesh import MESH_DIMS, ParallelDims
from loomtrain.trainer.checks import check_experiment
from loomtrain.trainer.config import load_config

REFUSED = [  # (overrides, world size, the line's start)
    (["parallel.tp=2", "data.seq_len=68", "parallel.cp=4"], 8, "data.seq_len: must be divisible by 8"),
    (["parallel.tp=4", "data.seq_len=66", "model.n_kv_heads=4"], 4, "data.seq_len: must be divisible by 4"),
    (["parallel.tp=3"], 3, "parallel.tp: must divide model.n_heads"),
    (["parallel.dp_shard=3"], 4, "parallel: pp*dp_replicate*dp_shard*cp*tp = 3 must equal the world size 4"),
    (["train.global_batch_size=6"], 4, "train.global_batch_size: 6 must be divisible by the data-parallel size 4"),
    (["train.micro_batch_size=2", "train.global_batch_size=12"], 4, "train.micro_batch_size: 2 must divide"),
    (["parallel.pp=2", "parallel.dp_shard=1", "train.microbatches=3", "model.n_layers=4",
      "parallel.pp_schedule=gpipe"], 2, "train.microbatches: 3 must divide the per-rank batch 16"),
    (["parallel.mesh_order=pp,dp_shard,cp,tp"], 4, "parallel.mesh_order: must be a permutation"),
    (["faulttol.ranks_per_node=3"], 4, "faulttol.ranks_per_node: must divide the world size 4"),
]


def test_compile_with_tp_is_refused_on_cpu_only(capsys):
    exp = load_config("tiny", ["parallel.tp=2", "parallel.compile=true"])
    with pytest.raises(ConfigError, match="parallel.compile: not with parallel.tp > 1 on CPU"):
        check_experiment(exp, 2, device_type="cpu")
    check_experiment(exp, 2, device_type="cuda")  # not measured there: allowed, and plan (for GPUs) shows it
    assert main(["train", "tiny", "--nproc", "2", "--set", "parallel.tp=2", "--set", "parallel.compile=true"]) == 2


@pytest.mark.parametrize("overrides, world, message", REFUSED)
def test_train_plan_and_preflight_refuse_alike(overrides, world, message, capsys):
    sets = [a for o in overrides for a in ("--set", o)]
    with pytest.raises(ConfigError) as e:
        check_experiment(load_config("tiny", overrides), world)  # what run() calls before any group starts
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
    capsys.readouterr()
    assert main(["plan", "tiny", "--world-size", str(world)] + sets) == 2
    assert message in capsys.readouterr().err
    if world > 1:  # the training CLI refuses before it starts any worker
        assert main(["train", "tiny", "--nproc", str(world)] + sets) == 2
        assert message in capsys.readouterr().err


@pytest.fixture(scope="module")
def fake_world():
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=5, world_size=32)
    yield 5
    dist.destroy_process_group()


# What a flattened view is made of (parallel/mesh.py's docstring), written out here.
FLATTENED = {"dp": ("dp_replicate", "dp_shard"), "dp_shard_cp": ("dp_shard", "cp"),
             "loss": ("dp_replicate", "dp_shard", "cp")}


def _spec_group(dims: ParallelDims, names, rank: int) -> list[int]:
    """The documented layout as a formula: a rank is the mixed-radix number whose digits are its coordinates
    in ``dims.order`` (outermost most significant). Its group over ``names``: the ranks that vary those
    digits, ascending (the order of a process group, and so the one its mesh coordinates must follow)."""
    degree = {n: getattr(dims, n) for n in MESH_DIMS}
    coord, rest = {}, rank
    for n in reversed(dims.order):
        coord[n], rest = rest % degree[n], rest // degree[n]
    group = []
    for values in itertools.product(*(range(degree[n]) for n in names)):
        c = coord | dict(zip(names, values))
        r = 0
        for n in dims.order:
            r = r * degree[n] + c[n]
        group.append(r)
    return sorted(group)


def _check_mesh(dims: ParallelDims, rank: int) -> None:
    """This rank's group of every dimension and flattened view, in the mesh, its process group and
    ``groups()``, against :func:`_spec_group`; its mesh coordinate is its process-group rank (in each
    dimension of the HSDP slice too), else ``distribute_tensor`` and DCP place a shard where FSDP's
    all-gather does not."""
    import torch.distributed as dist

    meshes = dims.build_mesh("cpu")
    for name in MESH_DIMS + tuple(FLATTENED):
        want, mesh = _spec_group(dims, FLATTENED.get(name, (name,)), rank), meshes[name]
        assert mesh.mesh.tolist() == want, (dims.order, name)  # members, in mesh-coordinate order
        assert dist.get_process_group_ranks(mesh.get_group()) == want, (dims.order, name)
        assert mesh.get_coordinate() == (mesh.get_local_rank(),) == (want.index(rank),), (dims.order, name)
        assert next(g for g in dims.groups(name) if rank in g) == want, (dims.order, name)
    hsdp = meshes["dp_replicate", "dp_shard_cp"]  # what FSDP2 gets under HSDP: the slice that used to crash
    assert hsdp.mesh_dim_names == ("dp_replicate", "dp_shard_cp")
    assert hsdp.size() == dims.dp_replicate * dims.dp_shard * dims.cp
    for i, name in enumerate(hsdp.mesh_dim_names):
        want = _spec_group(dims, FLATTENED.get(name, (name,)), rank)
        assert dist.get_process_group_ranks(hsdp.get_group(name)) == want, (dims.order, name)
        assert hsdp.get_coordinate()[i] == hsdp.get_local_rank(name) == want.index(rank), (dims.order, name)


@pytest.mark.parametrize("order", list(itertools.permutations(MESH_DIMS)), ids=",".join)
def test_every_mesh_order_builds_every_mesh(order, fake_world):
    """pp x HSDP (replicate x shard) x cp x tp, all of degree 2, in every order: rank 5's groups are the
    documented layout's."""
    _check_mesh(ParallelDims(2, 2, 2, 2, 2, 32, order), fake_world)


@pytest.mark.parametrize("subset", [s for n in range(5) for s in itertools.combinations(("hsdp", "tp", "cp", "pp"), n)],
                         ids=lambda s: "+".join(s) or "fsdp")
def test_each_combination_in_reversed_order(subset, fake_world):
    """Degrees 1 or 2 (dp_shard takes the rest of 32), canonical and reversed order: rank 5's groups are the
    documented layout's."""
    deg = {"pp": 2 if "pp" in subset else 1, "dp_replicate": 2 if "hsdp" in subset else 1,
           "cp": 2 if "cp" in subset else 1, "tp": 2 if "tp" in subset else 1}
    for order in (MESH_DIMS, tuple(reversed(MESH_DIMS))):
        shard = 32 // (deg["pp"] * deg["dp_replicate"] * deg["cp"] * deg["tp"])
        _check_mesh(ParallelDims(deg["pp"], deg["dp_replicate"], shard, deg["cp"], deg["tp"], 32, order), fake_world)


def _singletons(world: int) -> list[list[int]]:
    return [[r] for r in range(world)]


# Every group of every dimension, written out by hand (not computed by parallel/mesh.py). The default order
# (pp, dp_replicate, dp_shard, cp, tp; tp innermost) is Megatron-LM's RankGenerator order "tp-cp-ep-dp-pp"
# (first listed varies fastest) with ep=1 and Megatron's dp = dp_replicate x dp_shard (shard inner): the first
# five layouts' tp, cp, dp, pp and dp-cp groups are exactly megatron.core.parallel_state.RankGenerator's
# (checked against megatron-core; not imported here, its import alone takes ~15 s). Within a group, ranks are
# in mesh-coordinate order, which must be ascending (a process group lists them so).
HAND_LAYOUTS = {  # name: (ParallelDims, {dimension or flattened view: groups})
    # rank = 4*dp_shard + 2*cp + tp
    "dp_shard2_cp2_tp2": (ParallelDims(pp=1, dp_replicate=1, dp_shard=2, cp=2, tp=2, world_size=8), {
        "tp": [[0, 1], [2, 3], [4, 5], [6, 7]],
        "cp": [[0, 2], [1, 3], [4, 6], [5, 7]],
        "dp_shard": [[0, 4], [1, 5], [2, 6], [3, 7]],
        "dp_replicate": _singletons(8), "pp": _singletons(8),
        "dp": [[0, 4], [1, 5], [2, 6], [3, 7]],
        "dp_shard_cp": [[0, 2, 4, 6], [1, 3, 5, 7]],
        "loss": [[0, 2, 4, 6], [1, 3, 5, 7]],
    }),
    # rank = 4*pp + 2*dp_shard + tp
    "pp2_dp_shard2_tp2": (ParallelDims(pp=2, dp_replicate=1, dp_shard=2, cp=1, tp=2, world_size=8), {
        "tp": [[0, 1], [2, 3], [4, 5], [6, 7]],
        "dp_shard": [[0, 2], [1, 3], [4, 6], [5, 7]],
        "pp": [[0, 4], [1, 5], [2, 6], [3, 7]],
        "cp": _singletons(8), "dp_replicate": _singletons(8),
        "dp": [[0, 2], [1, 3], [4, 6], [5, 7]],
        "dp_shard_cp": [[0, 2], [1, 3], [4, 6], [5, 7]],
        "loss": [[0, 2], [1, 3], [4, 6], [5, 7]],
    }),
    # rank = 8*pp + 4*dp_shard + 2*cp + tp (ParallelDims allows cp with pp; check_experiment refuses it today)
    "pp2_dp_shard2_cp2_tp2": (ParallelDims(pp=2, dp_replicate=1, dp_shard=2, cp=2, tp=2, world_size=16), {
        "tp": [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11], [12, 13], [14, 15]],
        "cp": [[0, 2], [1, 3], [4, 6], [5, 7], [8, 10], [9, 11], [12, 14], [13, 15]],
        "dp_shard": [[0, 4], [1, 5], [2, 6], [3, 7], [8, 12], [9, 13], [10, 14], [11, 15]],
        "pp": [[0, 8], [1, 9], [2, 10], [3, 11], [4, 12], [5, 13], [6, 14], [7, 15]],
        "dp_replicate": _singletons(16),
        "dp": [[0, 4], [1, 5], [2, 6], [3, 7], [8, 12], [9, 13], [10, 14], [11, 15]],
        "dp_shard_cp": [[0, 2, 4, 6], [1, 3, 5, 7], [8, 10, 12, 14], [9, 11, 13, 15]],
        "loss": [[0, 2, 4, 6], [1, 3, 5, 7], [8, 10, 12, 14], [9, 11, 13, 15]],
    }),
    # HSDP under pp and tp. rank = 8*pp + 4*dp_replicate + 2*dp_shard + tp
    "pp2_dp_replicate2_dp_shard2_tp2": (ParallelDims(pp=2, dp_replicate=2, dp_shard=2, cp=1, tp=2, world_size=16), {
        "tp": [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11], [12, 13], [14, 15]],
        "dp_shard": [[0, 2], [1, 3], [4, 6], [5, 7], [8, 10], [9, 11], [12, 14], [13, 15]],
        "dp_replicate": [[0, 4], [1, 5], [2, 6], [3, 7], [8, 12], [9, 13], [10, 14], [11, 15]],
        "pp": [[0, 8], [1, 9], [2, 10], [3, 11], [4, 12], [5, 13], [6, 14], [7, 15]],
        "cp": _singletons(16),
        "dp": [[0, 2, 4, 6], [1, 3, 5, 7], [8, 10, 12, 14], [9, 11, 13, 15]],
        "dp_shard_cp": [[0, 2], [1, 3], [4, 6], [5, 7], [8, 10], [9, 11], [12, 14], [13, 15]],
        "loss": [[0, 2, 4, 6], [1, 3, 5, 7], [8, 10, 12, 14], [9, 11, 13, 15]],
    }),
    # Unequal degrees. rank = 8*pp + 4*dp_shard + tp
    "pp2_dp_shard2_tp4": (ParallelDims(pp=2, dp_replicate=1, dp_shard=2, cp=1, tp=4, world_size=16), {
        "tp": [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]],
        "dp_shard": [[0, 4], [1, 5], [2, 6], [3, 7], [8, 12], [9, 13], [10, 14], [11, 15]],
        "pp": [[0, 8], [1, 9], [2, 10], [3, 11], [4, 12], [5, 13], [6, 14], [7, 15]],
        "cp": _singletons(16), "dp_replicate": _singletons(16),
        "dp": [[0, 4], [1, 5], [2, 6], [3, 7], [8, 12], [9, 13], [10, 14], [11, 15]],
        "dp_shard_cp": [[0, 4], [1, 5], [2, 6], [3, 7], [8, 12], [9, 13], [10, 14], [11, 15]],
        "loss": [[0, 4], [1, 5], [2, 6], [3, 7], [8, 12], [9, 13], [10, 14], [11, 15]],
    }),
    # mesh_order with dp_shard outside dp_replicate (no Megatron equivalent). rank = 4*dp_shard + 2*dp_replicate + tp;
    # dp and loss vary dp_shard outermost, as the order does (replicate outermost would list 0, 4, 2, 6).
    "order_shard_outside_replicate": (ParallelDims(pp=1, dp_replicate=2, dp_shard=2, cp=1, tp=2, world_size=8,
                                                   order=("pp", "dp_shard", "dp_replicate", "cp", "tp")), {
        "tp": [[0, 1], [2, 3], [4, 5], [6, 7]],
        "dp_replicate": [[0, 2], [1, 3], [4, 6], [5, 7]],
        "dp_shard": [[0, 4], [1, 5], [2, 6], [3, 7]],
        "cp": _singletons(8), "pp": _singletons(8),
        "dp": [[0, 2, 4, 6], [1, 3, 5, 7]],
        "dp_shard_cp": [[0, 4], [1, 5], [2, 6], [3, 7]],
        "loss": [[0, 2, 4, 6], [1, 3, 5, 7]],
    }),
    # tp outermost, cp innermost. rank = 4*tp + 2*dp_shard + cp
    "order_tp_outer_cp_inner": (ParallelDims(pp=1, dp_replicate=1, dp_shard=2, cp=2, tp=2, world_size=8,
                                             order=("tp", "pp", "dp_replicate", "dp_shard", "cp")), {
        "tp": [[0, 4], [1, 5], [2, 6], [3, 7]],
        "cp": [[0, 1], [2, 3], [4, 5], [6, 7]],
        "dp_shard": [[0, 2], [1, 3], [4, 6], [5, 7]],
        "dp_replicate": _singletons(8), "pp": _singletons(8),
        "dp": [[0, 2], [1, 3], [4, 6], [5, 7]],
        "dp_shard_cp": [[0, 1, 2, 3], [4, 5, 6, 7]],
        "loss": [[0, 1, 2, 3], [4, 5, 6, 7]],
    }),
}


@pytest.mark.parametrize("layout", HAND_LAYOUTS)
def test_mesh_matches_hand_written_layout(layout, fake_world):
    """Every group of every dimension and flattened view from ``groups()``, every group of the DeviceMesh's
    dimensions (the lines of its rank tensor), and rank 5's mesh of each dimension and view (and its process
    group's members, and its coordinate there), against the layouts above."""
    import numpy as np
    import torch.distributed as dist

    dims, want = HAND_LAYOUTS[layout]
    assert set(want) == set(MESH_DIMS) | set(FLATTENED)
    for name, groups in want.items():
        assert sorted(dims.groups(name)) == groups, (layout, name)
    meshes = dims.build_mesh("cpu")
    grid = meshes.root.mesh.numpy()  # the DeviceMesh's ranks, one axis per dimension in its names' order
    assert meshes.root.mesh_dim_names == dims.order
    for axis, name in enumerate(dims.order):
        lines = np.moveaxis(grid, axis, -1).reshape(-1, grid.shape[axis]).tolist()
        assert sorted(lines) == want[name], (layout, name)
    for name, groups in want.items():
        mine = next(g for g in groups if fake_world in g)
        assert meshes[name].mesh.tolist() == mine, (layout, name)
        assert dist.get_process_group_ranks(meshes[name].get_group()) == sorted(mine), (layout, name)
        assert meshes[name].get_coordinate() == (meshes[name].get_local_rank(),) == (mine.index(fake_world),), (
            layout, name)
