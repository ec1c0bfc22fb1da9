"""Data-parallel engines: how gradients are reduced and the update applied (``parallel.dp_engine``).

Built-ins (:data:`ENGINES`): ``fsdp`` (``fsdp.py``: FSDP2 over the mesh, or no data parallelism) and
``deepspeed`` (``deepspeed.py``: ZeRO 1-3, data parallelism only). The trainer builds the model, the
optimizer and the schedule, then the engine from them, and from then on uses the engine's
``model``/``optimizer``/``scheduler`` (DeepSpeed wraps them) and its ``checkpointer``.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

from loomtrain.registry import Registry


@runtime_checkable
class DataParallelEngine(Protocol):
    """The contract of a data-parallel engine.

    On the class (config checks and ``plan``):

    - ``applies_fsdp``: the model is sharded with FSDP2 over the mesh before the engine is built;
    - ``averages_within_workers``: it can average gradients inside one ``dp_replicate`` worker only (what
      dp_sync methods with local updates need);
    - ``varying_micro_batches``: the number of micro-batches may change from step to step, and differ
      between ranks (whole-document batches, adaptive sequence parallelism);
    - ``check(exp)``: ConfigError (one line naming the field) for what it cannot run;
    - ``build(exp, model, optimizer, scheduler, *, dims, device, pp_group, uneven, micro_batch,
      accumulation, sharded_accumulation)``: the engine over this rank's model (``sharded_accumulation``: reduce
      gradients after every micro-batch, so only a shard of them is accumulated).

    On the instance: ``model``, ``optimizer``, ``scheduler`` (what the trainer steps and saves),
    ``averaging_ranks`` (how many ranks its gradient reduction averages over: the loss is scaled by it),
    ``precision()`` (a context for forward and backward), ``accumulate(last)`` (a context for one
    micro-batch's backward; gradients are reduced on the last), ``backward(loss)``, ``step()`` (clip by the
    global norm, update, schedule, clear gradients; the norm before clipping), and ``native_checkpoint``
    (True: its own checkpoint files, ``trainer/checkpoint.py::checkpointer_for``).
    """

    applies_fsdp: bool
    averages_within_workers: bool
    varying_micro_batches: bool
    native_checkpoint: bool

    @classmethod
    def check(cls, exp) -> None: ...

    @classmethod
    def build(cls, exp, model, optimizer, scheduler, *, dims, device, pp_group, uneven, micro_batch,
              accumulation, sharded_accumulation=False) -> "DataParallelEngine": ...

    def precision(self): ...

    def accumulate(self, last: bool): ...

    def backward(self, loss) -> None: ...

    def step(self): ...


ENGINES = Registry("parallel.dp_engine", "data-parallel engine")
ENGINES.add("fsdp", "loomtrain.parallel.engines.fsdp:FSDPEngine")
ENGINES.add("deepspeed", "loomtrain.parallel.engines.deepspeed:DeepSpeedEngine")


def engine_class(name: str):
    return ENGINES.get(name)
