"""One place validates an experiment against a world size: train, plan and the CLI preflight refuse alike.

Also: every accepted ``parallel.mesh_order`` builds every mesh the trainer slices (HSDP's
``dp_replicate x dp_shard_cp`` included) with the groups the order asks for, on torch's fake
process group.
"""
import itertools

import pytest

from loomtrain.errors import ConfigError
from loomtrain.launch.cli import main
from loomtrain.parallel.mesh import MESH_DIMS, ParallelDims
from loomtrain.trainer.checks import check_experiment
from loomtrain.trainer.config import load_config

REFUSED = [  # (overrides, world size, the line's start)
    (["parallel.pp=2", "parallel.cp=2"], 4, "parallel.cp: context parallelism inside pipeline stages"),
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


def _check_mesh(dims: ParallelDims, rank: int) -> None:
    import torch.distributed as dist

    meshes = dims.build_mesh("cpu")
    for name in MESH_DIMS:
        want = next(g for g in dims.groups(name) if rank in g)
        assert dist.get_process_group_ranks(meshes[name].get_group()) == want, (dims.order, name)
    for name, parts in dims.FLATTENED.items():
        size = 1
        for p in parts:
            size *= getattr(dims, p)
        assert meshes[name].size() == size
    hsdp = meshes["dp_replicate", "dp_shard_cp"]  # what FSDP2 gets under HSDP: the slice that used to crash
    assert hsdp.size() == dims.dp_replicate * dims.dp_shard * dims.cp
    assert rank in dist.get_process_group_ranks(hsdp.get_group("dp_shard_cp"))


@pytest.mark.parametrize("order", list(itertools.permutations(MESH_DIMS)), ids=",".join)
def test_every_mesh_order_builds_every_mesh(order, fake_world):
    """pp x HSDP (replicate x shard) x cp x tp, all of degree 2, in every order."""
    _check_mesh(ParallelDims(2, 2, 2, 2, 2, 32, order), fake_world)


@pytest.mark.parametrize("subset", [s for n in range(5) for s in itertools.combinations(("hsdp", "tp", "cp", "pp"), n)],
                         ids=lambda s: "+".join(s) or "fsdp")
def test_each_combination_in_reversed_order(subset, fake_world):
    deg = {"pp": 2 if "pp" in subset else 1, "dp_replicate": 2 if "hsdp" in subset else 1,
           "cp": 2 if "cp" in subset else 1, "tp": 2 if "tp" in subset else 1}
    for order in (MESH_DIMS, tuple(reversed(MESH_DIMS))):
        shard = 32 // (deg["pp"] * deg["dp_replicate"] * deg["cp"] * deg["tp"])
        _check_mesh(ParallelDims(deg["pp"], deg["dp_replicate"], shard, deg["cp"], deg["tp"], 32, order), fake_world)
