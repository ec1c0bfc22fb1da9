"""Sequence-parallel modes (``parallel.sp_mode``): how the sequences of a step meet the ranks.

Built-ins (:data:`SP_MODES`, ``modes.py``): ``static`` (the mesh's cp group splits every sequence),
``adaptive`` (FlexSP/ByteScale: every step, groups sized to its sequences by ``planner.py`` with the
cost model of ``cost.py``) and ``adaptive_sharded`` (the same groups run in waves of one row per rank, so
FSDP reshards between passes).
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

from loomtrain.registry import Registry


@runtime_checkable
class SequenceParallelMode(Protocol):
    """The contract of a sequence-parallel mode.

    On the class: ``uneven`` (True: ranks may run different numbers of micro-batches in a step, so FSDP
    keeps parameters gathered over the step and reduces gradients once, after the last), ``adaptive``
    (True: groups are planned per step from its documents), ``sharded_accumulation`` (True: gradients are
    reduce-scattered after every micro-batch, so only a shard of them is accumulated), ``waves`` (True: every
    rank runs the same number of rows, the groups' rows in waves; ``plan`` shows the waves' time),
    ``check(exp, dims)`` (ConfigError for what it cannot run on ``dims``, a ``ParallelDims``),
    ``longest_sequence(exp, world)`` (the longest row a model sees: its RoPE table) and
    ``build(exp, model_args, dims, mesh, train_data, dp_rank, device, ranks_per_node, copy, cp_impl=None)`` ->
    ``(mode, batch plan)`` (``copy``: a ``modes.ModelCopy`` for calibrations; ``cp_impl``: the run's cp strategy,
    None without cp).

    On the instance: ``host_layout(batch) -> batch`` (the host work on a whole micro-batch that needs no process
    group, e.g. reordering its rows; the trainer runs it where batches are built, on the prefetch thread, off the
    step), ``begin_step(micro)`` (before the step's first micro-batch, on every rank: e.g. make the process groups
    its plan needs) and ``prepare(model, batch) -> batch`` (this rank's part of a ``host_layout``-ed batch's
    tokens; sets the attention the model uses for it).
    """

    uneven: bool
    adaptive: bool
    sharded_accumulation: bool
    waves: bool

    @classmethod
    def check(cls, exp, dims) -> None: ...

    @classmethod
    def longest_sequence(cls, exp, world: int) -> int: ...

    @classmethod
    def build(cls, exp, model_args, dims, mesh, train_data, dp_rank, device, ranks_per_node, copy,
              cp_impl=None): ...

    def host_layout(self, batch: dict) -> dict: ...

    def begin_step(self, micro) -> None: ...

    def prepare(self, model, batch: dict) -> dict: ...


SP_MODES = Registry("parallel.sp_mode", "sequence-parallel mode")
SP_MODES.add("static", "loomtrain.parallel.sp.modes:StaticSP")
SP_MODES.add("adaptive", "loomtrain.parallel.sp.modes:AdaptiveSP")
SP_MODES.add("adaptive_sharded", "loomtrain.parallel.sp.modes:AdaptiveShardedSP")
