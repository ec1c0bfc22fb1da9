"""Data-parallel synchronisation as a strategy: what keeps the replicas' parameters in step.

``parallel.dp_sync`` picks one. The trainer calls :meth:`step` once per optimizer step, after
forward/backward: it applies the update and returns the gradient norm. A strategy that syncs
less often (CO2, Streaming DiLoCo) wraps the engine's update with its own outer step and keeps
its outer state in ``state_dict``; the training loop does not change.
"""
from __future__ import annotations


class EveryStep:
    """Gradients are averaged over all data-parallel ranks inside every step (by the engine's
    reduce-scatter / all-reduce), so the update itself needs no further sync."""

    def __init__(self, engine):
        self.engine = engine

    def step(self) -> float:
        return self.engine.step()

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"dp_sync every_step keeps no state; got keys {sorted(state)}")


SYNCS = {"every_step": EveryStep}


def build_sync(name: str, engine):
    return SYNCS[name](engine)
