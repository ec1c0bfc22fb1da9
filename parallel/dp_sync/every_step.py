"""``every_step``: gradients are averaged over all data-parallel ranks inside every step (the engine's
reduce-scatter / all-reduce), so the update needs no further sync. No torch at import (config checks)."""
from __future__ import annotations

import contextlib


class StatelessSync:
    """Defaults for a method that keeps no state of its own: a plugin subclasses it and overrides
    :meth:`step` (and ``local_updates``, the byte and memory figures) as it needs."""

    local_updates = False

    @classmethod
    def check(cls, exp) -> None:
        pass

    @classmethod
    def replica_bytes_per_step(cls, exp, shard_params: float, replicas: int) -> float:
        """An fp32 ring all-reduce of the gradient shard over the replicas each step."""
        return 2 * (replicas - 1) / replicas * 4 * shard_params

    @classmethod
    def state_copies(cls, exp) -> int:
        return 0

    @classmethod
    def build(cls, exp, engine, **parts):
        return cls(engine)

    def __init__(self, engine):
        self.engine = engine

    def step(self):
        return self.engine.step()

    def state_tensors(self) -> dict:
        return {}

    def checkpoint_tensors(self) -> dict:
        return {}

    def load_checkpoint_tensors(self, loaded: dict) -> None:
        pass

    def host_state(self) -> dict:
        return {"signature": self.signature()}

    def load_host_state(self, state: dict | None) -> None:
        pass

    def signature(self) -> dict:
        return {"method": type(self).__name__}

    def settle(self) -> None:
        pass

    def outer_model(self):
        return contextlib.nullcontext()

    def close(self) -> None:
        pass


class EveryStep(StatelessSync):
    """Gradients averaged over every data-parallel rank in each step (FSDP/HSDP, DeepSpeed)."""
