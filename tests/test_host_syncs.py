"""A training step that does not log waits on the device once: the loop's exchange (the stop flag, the health
timings, the loss and the grad norm in one all-gather). The token count, the loss scale, the loss and the
grad norm stay device tensors until then.

Counted with a ``TorchFunctionMode`` on the training thread: every ``Tensor.item``, ``float()``, ``int()``,
``bool()``, ``tolist``, ``cpu`` and ``numpy`` call is a point where the host would wait for the device. Two
places are not counted: the exchange itself (one per step, asserted), and ``label_tokens``, which counts
the labels of the host batch before it moves to the device.
"""
import pytest
import torch
from torch.overrides import TorchFunctionMode

from conftest import run_ranks

SYNCS = {"item", "__float__", "__int__", "__bool__", "tolist", "cpu", "numpy", "__index__"}


class SyncCounter(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.events, self.paused = [], 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if not self.paused and name in SYNCS:
            self.events.append(name)
        return func(*args, **(kwargs or {}))


def _count(rank, overrides, broken):
    import loomtrain.trainer.train as train_mod
    from loomtrain.launch.train import run
    from loomtrain.trainer.config import load_config

    counter = SyncCounter()
    step, exchange, tokens = train_mod.Trainer.train_step, train_mod.Trainer._exchange, train_mod.label_tokens

    def marked_step(self):
        counter.events.append("<step>")
        out = step(self)
        if broken:  # the defect this test is for: reading the loss on every step
            out[0].item()
        return out

    def whole_exchange(self, *args):
        counter.events.append("<exchange>")
        counter.paused += 1
        try:
            return exchange(self, *args)
        finally:
            counter.paused -= 1

    def host_tokens(batches):
        counter.paused += 1
        try:
            return tokens(batches)
        finally:
            counter.paused -= 1

    train_mod.Trainer.train_step, train_mod.Trainer._exchange, train_mod.label_tokens = \
        marked_step, whole_exchange, host_tokens
    fit = train_mod.Trainer.fit

    def counted_fit(self):
        with counter:
            return fit(self)

    train_mod.Trainer.fit = counted_fit
    run(load_config("tiny", overrides))
    steps, current = [], None
    for e in counter.events:
        if e == "<step>":
            current = []
            steps.append(current)
        elif current is not None:
            current.append(e)
    return steps


@pytest.mark.parametrize("broken", [False, True])
def test_a_step_that_does_not_log_waits_on_the_device_once(broken, overrides):
    """2 ranks (tp=2: loss parallelism, sharded norms), 4 steps, logging only at the last one."""
    ov = overrides + ["train.steps=4", "train.log_every=100", "parallel.tp=2", "parallel.dp_shard=1"]
    for steps in run_ranks(_count, 2, ov, broken):
        assert len(steps) == 4
        for events in steps[:3]:  # the last step logs (and may read more)
            if broken:
                assert events != ["<exchange>"]
            else:
                assert events == ["<exchange>"], events
