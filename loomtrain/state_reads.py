"""Reading an optimizer's state is not a training step.

torch's ``get_state_dict`` / ``set_state_dict`` materialize an optimizer whose state is empty (a fresh one, or
a stateless one such as SGD without momentum: always) by calling its ``step()`` with zero gradients at lr 0.
Step hooks that count inner steps (``parallel/dp_sync``'s outer syncs) would take that call for a training
step: advance their round, even start an exchange. Code that reads or loads the state (checkpoints,
snapshots) wraps the call in :func:`reading_state`; such hooks act only while :func:`real_step` holds.
"""
from __future__ import annotations

import contextlib
import threading

_reading = threading.local()  # per thread: a background save's read does not silence the training loop's steps


@contextlib.contextmanager
def reading_state():
    """The steps this thread's optimizers take inside are torch's materializing ones, not training steps."""
    depth = getattr(_reading, "depth", 0)
    _reading.depth = depth + 1
    try:
        yield
    finally:
        _reading.depth = depth


def real_step() -> bool:
    """False inside :func:`reading_state` (on this thread)."""
    return getattr(_reading, "depth", 0) == 0
