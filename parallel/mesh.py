"""ParallelDims: one object owns the parallel degrees, validates them and builds the DeviceMesh.

Dimensions are pp, dp_replicate, dp_shard, cp, tp; their product is the world size.
The mesh is laid out in ``order`` (outermost first, tp innermost by default so tensor
parallel peers are adjacent ranks, i.e. on the same node). Flattened views are added:
``dp`` (dp_replicate x dp_shard: the batch is split over it), ``dp_shard_cp`` (what
FSDP shards over) and ``loss`` (dp x cp: ranks whose losses make up the global mean).

Every group of every dimension and view lists its ranks ascending, whatever the order (a placement
that would break this renumbers the ranks: launch/placement.py): torch's
``new_group`` sorts a group's ranks, so a rank's place in the DeviceMesh (``get_coordinate()``, where
``distribute_tensor`` and DCP put its shard) is its rank in the process group (``get_local_rank()``,
whose place FSDP's all-gather gives its shard) only then. A flattened view therefore varies its
dimensions in ``order`` (e.g. cp outside dp_shard: ``dp_shard_cp`` is cp-major).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from loomtrain.errors import ConfigError

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")  # canonical order (also the default mesh_order)
DEFAULT_ORDER = MESH_DIMS


@dataclass
class ParallelDims:
    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = -1
    cp: int = 1
    tp: int = 1
    world_size: int = 1
    order: tuple[str, ...] = field(default=DEFAULT_ORDER)
    # dp_replicate replicas are workers that take local steps and sync by an outer step (parallel.dp_sync
    # diloco | co2): gradients are averaged, and FSDP shards, inside a worker only.
    local_updates: bool = False
    # Which rank fills each place of the mesh, places in canonical order (launch/placement.py); None = rank order.
    placement: tuple[int, ...] | None = None

    def __post_init__(self):
        self.order = tuple(self.order)
        if self.world_size < 1:
            raise ConfigError(f"world size: must be >= 1, got {self.world_size}")
        if sorted(self.order) != sorted(MESH_DIMS):
            raise ConfigError(f"parallel.mesh_order: must be a permutation of {','.join(MESH_DIMS)}, got {','.join(self.order)}")
        for name in MESH_DIMS:
            v = getattr(self, name)
            if v < 1 and not (name == "dp_shard" and v == -1):
                raise ConfigError(f"parallel.{name}: must be >= 1, got {v}")
        fixed = self.pp * self.dp_replicate * self.cp * self.tp
        if self.dp_shard == -1:
            if self.world_size % fixed:
                raise ConfigError(
                    f"parallel: pp*dp_replicate*cp*tp = {fixed} does not divide the world size {self.world_size}")
            self.dp_shard = self.world_size // fixed
        if fixed * self.dp_shard != self.world_size:
            raise ConfigError(
                f"parallel: pp*dp_replicate*dp_shard*cp*tp = {fixed * self.dp_shard} must equal the world size "
                f"{self.world_size} (got pp={self.pp} dp_replicate={self.dp_replicate} dp_shard={self.dp_shard} "
                f"cp={self.cp} tp={self.tp})")

    @classmethod
    def from_config(cls, par, world_size: int) -> "ParallelDims":
        from loomtrain.parallel.dp_sync import local_updates  # the sync method owns which ranks average together

        order = tuple(s.strip() for s in par.mesh_order.split(","))
        return cls(par.pp, par.dp_replicate, par.dp_shard, par.cp, par.tp, world_size, order,
                   local_updates=local_updates(par.dp_sync))

    @property
    def degrees(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.order}

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def fsdp_enabled(self) -> bool:
        return self.dp_shard * self.cp > 1 or (self.dp_replicate > 1 and not self.local_updates)

    @property
    def grad_averaging_ranks(self) -> int:
        """Ranks whose gradients are averaged every step: all dp x cp ranks, or one worker's."""
        return (self.dp_shard if self.local_updates else self.dp) * self.cp

    def rank_grid(self) -> np.ndarray:
        """Ranks arranged as an array with one axis per dimension, in ``order``."""
        ranks = np.arange(self.world_size) if self.placement is None else np.asarray(self.placement)
        return ranks.reshape([getattr(self, n) for n in self.order])

    def parts(self, name: str) -> tuple[str, ...]:
        """The dimensions a dimension or flattened view is made of, in ``order`` (outermost first)."""
        return tuple(sorted(self.FLATTENED.get(name, (name,)), key=self.order.index))

    def groups(self, name: str) -> list[list[int]]:
        """All rank groups of dimension ``name`` (or of a flattened one, e.g. ``dp_shard_cp``): ranks that
        differ only in those coordinates, each in its mesh's coordinate order (ascending, without placement)."""
        grid = self.rank_grid()
        axes = [self.order.index(part) for part in self.parts(name)]
        moved = np.moveaxis(grid, axes, list(range(grid.ndim - len(axes), grid.ndim)))
        size = int(np.prod([grid.shape[a] for a in axes]))
        return [list(map(int, g)) for g in moved.reshape(-1, size)]

    def workers(self) -> list[list[int]]:
        """Each dp_replicate replica's ranks (a worker, when replicas take local updates), by replica."""
        grid = np.moveaxis(self.rank_grid(), self.order.index("dp_replicate"), 0)
        return [sorted(map(int, g.flatten())) for g in grid]

    # Which dimensions each flattened view is made of; it varies them in ``order`` (``parts``).
    FLATTENED = {"dp": ("dp_replicate", "dp_shard"), "dp_shard_cp": ("dp_shard", "cp"),
                 "loss": ("dp_replicate", "dp_shard", "cp")}

    def build_mesh(self, device_type: str, backend_override: dict | None = None) -> "Meshes":
        """Build the named DeviceMesh (all five dims, size-1 ones included) plus flattened views.

        The DeviceMesh has its dimensions in ``order`` (its rank tensor is the rank grid) and each
        flattened view flattens its dimensions in that order, so every group's ranks ascend along its
        mesh coordinate, as in its process group. Several at once (HSDP's ``("dp_replicate",
        "dp_shard_cp")``) come from ``Meshes.__getitem__`` in the order asked, whichever ``order`` puts
        outside.

        ``backend_override``: {dimension or flattened name: (backend, options)}, e.g. gloo bound to the
        interface of the fabric that dimension's groups run on (``launch/placement.py``).
        """
        import torch
        from torch.distributed.device_mesh import DeviceMesh

        override = backend_override or {}
        root = DeviceMesh(device_type, torch.from_numpy(np.ascontiguousarray(self.rank_grid())),
                          mesh_dim_names=self.order,
                          backend_override=tuple(override.get(n, (None, None)) for n in self.order))
        flat = {name: root[self.parts(name)]._flatten(name, backend_override=override.get(name))
                for name in self.FLATTENED}
        return Meshes(root, flat)

    def describe(self) -> str:
        dims = " x ".join(f"{n}={getattr(self, n)}" for n in self.order)
        return f"world {self.world_size}: {dims}"


class Meshes:
    """The root mesh plus its flattened views; ``meshes["tp"]``, ``meshes["dp"]``, ``meshes["tp", "cp"]``."""

    # What each dimension's traffic is for (comms/traffic.py); the flattened token/loss groups are "other".
    PURPOSES = {"dp_shard": "fsdp", "dp_shard_cp": "fsdp", "dp_replicate": "dp_sync", "cp": "cp", "tp": "tp",
                "pp": "pp"}

    def __init__(self, root, flattened: dict):
        self.root = root
        self.flattened = flattened

    def label_traffic(self) -> None:
        """Count every mesh group's bytes under its purpose (HSDP's replica all-reduce is dp_sync traffic)."""
        from loomtrain.comms import traffic

        for name, purpose in self.PURPOSES.items():
            traffic.label(self[name], purpose)

    def __getitem__(self, key):
        """A dimension or flattened view (1-D), or several as one mesh, in the order given."""
        if isinstance(key, str):
            return self.flattened[key] if key in self.flattened else self.root[key]
        try:
            return self.root[key]
        except KeyError:  # torch slices only dimensions the root holds in that order (not e.g. HSDP's
            # ("dp_replicate", "dp_shard_cp") with dp_replicate inside dp_shard): joined as FSDP2 joins its own
            from torch.distributed.device_mesh import DeviceMesh

            return DeviceMesh._concatenate([self[name] for name in key])
