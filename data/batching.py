"""Batch plans (``data.batching``): what each step trains on. The interface and its registry.

Built-ins (:data:`BATCHINGS`, both in ``loader.py``): ``windows`` (``TrainBatches``: fixed windows of
``data.seq_len``) and ``documents`` (``DocumentBatches``: whole documents up to a token budget).
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

from loomtrain.registry import Registry


@runtime_checkable
class BatchPlan(Protocol):
    """The contract of a batch plan.

    On the class: ``whole_documents`` (True: each step takes whole documents up to a token budget, so the
    number of rows varies from step to step; pipelines and fixed-accumulation engines cannot take it),
    ``tokens_per_step(exp)`` (tokens of one optimizer step, for throughput and MFU), ``check(exp)``
    (ConfigError for its own settings) and ``from_experiment(exp, dataset, dp_rank, dp_size)`` (this
    data-parallel rank's plan over a ``loader.PackedDataset``).

    On the instance (``loader.Prefetcher`` drives it on a thread): ``micro_batch`` and
    ``accumulation_steps``, ``build(position) -> (micro-batches, next position)`` (a pure function of the
    position: every rank computes the same global order), ``advance(position)``, ``state_dict()`` /
    ``load_state_dict(state)`` (the position: a few integers, saved in checkpoints and snapshots).
    """

    whole_documents: bool

    @classmethod
    def tokens_per_step(cls, exp) -> int: ...

    @classmethod
    def check(cls, exp) -> None: ...

    @classmethod
    def from_experiment(cls, exp, dataset, dp_rank: int, dp_size: int) -> "BatchPlan": ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


BATCHINGS = Registry("data.batching", "batch plan")
BATCHINGS.add("windows", "loomtrain.data.loader:TrainBatches")
BATCHINGS.add("documents", "loomtrain.data.loader:DocumentBatches")


def batching(name: str):
    return BATCHINGS.get(name)
