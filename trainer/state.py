"""The trainer's state: one mapping of stateful parts that disk checkpoints, memory snapshots and restore use.

The model and the optimizer are the sharded tensors (DCP writes their shards; a snapshot copies them). Every
other part is a small named object with ``state_dict()`` / ``load_state_dict(state)``; adding one is one
line in ``Trainer.__init__`` (``parts={... "name": obj}``) and every save and restore path carries it.
Two optional attributes say how a part is saved:

- ``per_rank = True``: every rank's state differs (RNG streams): a checkpoint holds all ranks' (one
  JSON-encoded list (faulttol/codec.py) under the part's name); a run resumed on the same world continues each rank's own,
  on another rank r takes saved rank r mod the saved world;
- ``tensors()`` / ``checkpoint_tensors()`` / ``load_checkpoint_tensors()`` / ``signature()``: the part also
  has live tensors (the dp_sync method's outer state), saved beside its host state, and loaded only
  where the saved ``signature`` matches.

The rest of a checkpoint's parts sit under ``trainer`` with the step, so the on-disk layout of the
built-in parts is the one written before this module existed (old checkpoints load).
"""
from __future__ import annotations

from loomtrain.trainer.checkpoint import rng_state, set_rng_state


class RNGState:
    """torch, numpy, Python (and CUDA) generators of this rank."""

    per_rank = True

    def state_dict(self) -> dict:
        return rng_state()

    def load_state_dict(self, state: dict) -> None:
        set_rng_state(state)


class SyncState:
    """The dp_sync method's state: host counters (``state_dict``) and live tensors."""

    def __init__(self, sync):
        self.sync = sync

    def state_dict(self) -> dict:
        return self.sync.host_state()

    def load_state_dict(self, state: dict | None) -> None:
        self.sync.load_host_state(state)

    def tensors(self) -> dict:
        """Live buffers, averages in flight arrived (a snapshot copies them; a restore copies into them)."""
        self.sync.settle()
        return self.sync.state_tensors()

    def checkpoint_tensors(self) -> dict:
        self.sync.settle()
        return self.sync.checkpoint_tensors()

    def load_checkpoint_tensors(self, loaded: dict) -> None:
        self.sync.load_checkpoint_tensors(loaded)

    def signature(self) -> dict:
        return self.sync.signature()


class TrainState:
    """``model``, ``optimizer`` and the named ``parts`` (insertion order is save and restore order)."""

    def __init__(self, model, optimizer, parts: dict):
        self.model, self.optimizer, self.parts = model, optimizer, dict(parts)

    def host_state(self) -> dict:
        """Every part's host state by name (what a snapshot keeps besides tensors)."""
        return {name: part.state_dict() for name, part in self.parts.items()}

    def load_host_state(self, state: dict) -> None:
        for name, part in self.parts.items():
            part.load_state_dict(state.get(name))

    def tensor_parts(self) -> dict:
        """Parts with live tensors of their own, by name."""
        return {name: part for name, part in self.parts.items() if hasattr(part, "tensors")}

    def extra_tensors(self) -> dict:
        """Those parts' live tensors as one flat mapping (``<part>.<key>``) for a snapshot."""
        return {f"{name}.{key}": t for name, part in self.tensor_parts().items() for key, t in part.tensors().items()}
