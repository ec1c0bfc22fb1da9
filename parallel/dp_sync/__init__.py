"""Data-parallel sync methods: what keeps the ``dp_replicate`` replicas' parameters in step.

``parallel.dp_sync`` names one of :data:`DP_SYNC`: ``every_step`` (``every_step.py``: the engine
averages gradients over every data-parallel rank in each step), ``diloco`` and ``co2``
(``methods.py``: each replica is a worker taking local steps; workers meet in outer steps). A method is
the one owner of "which ranks average together" (:attr:`DataParallelSync.local_updates`); the mesh,
the engine, checkpoints and ``plan`` ask it. A plugin adds one with ``@DP_SYNC.register("name")``,
usually subclassing ``every_step.StatelessSync`` for the defaults.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

from loomtrain.registry import Registry


@runtime_checkable
class DataParallelSync(Protocol):
    """The contract of a data-parallel sync method.

    On the class (config checks, the mesh and ``plan`` use them before anything is built):

    - ``local_updates``: True when each ``dp_replicate`` replica is a *worker* taking its own optimizer
      steps: the engine then averages gradients (and FSDP shards) inside a worker only, token counts and
      checkpoints are per worker, and this method alone brings the workers together;
    - ``check(exp)``: raise ``ConfigError`` (one line naming the field) for settings it cannot run;
    - ``replica_bytes_per_step(exp, shard_params, replicas)``: bytes a rank sends per step to its
      ``dp_replicate`` peers for ``shard_params`` parameters it holds (``plan``);
    - ``state_copies(exp)``: fp32 copies of the rank's parameter shard it keeps (``plan``'s memory);
    - ``build(exp, engine, *, blocks, params, names, group, worker_group)``: the instance for this rank:
      ``blocks`` the model's repeated layers, ``params`` every parameter this rank holds, ``names`` their
      stable names, ``group`` the rank's ``dp_replicate`` group, ``worker_group`` its worker's ranks.

    On the instance (the trainer, checkpoints and snapshots call them):

    - ``step()``: after the step's backward: apply the update (through ``engine.step()``) and return the
      gradient norm before clipping;
    - ``state_tensors()`` (live buffers a memory restore copies into), ``checkpoint_tensors()`` /
      ``load_checkpoint_tensors(t)`` (the same laid out like the parameters, for DCP), ``host_state()`` /
      ``load_host_state(s)`` (counters; None or a foreign ``signature()`` restarts the method's schedule),
      ``settle()`` (wait for averages in flight before a save), ``outer_model()`` (a context in which the
      parameters are the ones the workers share, for evaluation), ``close()``.
    """

    local_updates: bool

    @classmethod
    def check(cls, exp) -> None: ...

    @classmethod
    def replica_bytes_per_step(cls, exp, shard_params: float, replicas: int) -> float: ...

    @classmethod
    def state_copies(cls, exp) -> int: ...

    @classmethod
    def build(cls, exp, engine, *, blocks, params, names, group, worker_group=None) -> "DataParallelSync": ...

    def step(self): ...

    def state_tensors(self) -> dict: ...

    def checkpoint_tensors(self) -> dict: ...

    def load_checkpoint_tensors(self, loaded: dict) -> None: ...

    def host_state(self) -> dict: ...

    def load_host_state(self, state: dict | None) -> None: ...

    def signature(self) -> dict: ...

    def settle(self) -> None: ...

    def outer_model(self): ...

    def close(self) -> None: ...


DP_SYNC = Registry("parallel.dp_sync", "data-parallel sync method")
DP_SYNC.add("every_step", "loomtrain.parallel.dp_sync.every_step:EveryStep")
DP_SYNC.add("diloco", "loomtrain.parallel.dp_sync.methods:DiLoCo")
DP_SYNC.add("co2", "loomtrain.parallel.dp_sync.methods:CO2")


def build_sync(exp, engine, **parts) -> DataParallelSync:
    """The method ``parallel.dp_sync`` names, built for this rank (``parts``: see ``DataParallelSync.build``)."""
    return DP_SYNC.get(exp.parallel.dp_sync).build(exp, engine, **parts)


def local_updates(method: str) -> bool:
    """Whether the replicas of ``method`` take local steps (the mesh and the engine ask)."""
    return DP_SYNC.get(method).local_updates
