"""A step's forward and backward over its micro-batches: one contract, two ways to run it.

``forward_backward(micro, scale)`` runs every micro-batch of the step with the loss
``token_loss_sum * scale`` (``scale = averaging_ranks / global label tokens``, see
``trainer/loss.py``) and returns this rank's unscaled loss sum. :class:`MicroBatchSteps`
runs micro-batches one after another through the data-parallel engine;
:class:`PipelineSteps` hands them to a ``torch.distributed.pipelining`` schedule (gradient
scaling off: the scale is already in the loss). Both use the same loss function and the
engine's precision context, so bf16 means the same thing under every layout.
"""
from __future__ import annotations

import inspect

import torch
import torch.distributed as dist

from loomtrain.parallel.engines.fsdp import local_value
from loomtrain.parallel.parallelize import loss_parallel_context  # noqa: F401  (tests patch it here)
from loomtrain.trainer.loss import token_loss_sum




def _no_outputs(schedule) -> dict:
    """``return_outputs=False`` where the schedule takes it (torch >= 2.10): else the last stage keeps every
    microbatch's output (the logits) until the step ends and concatenates them for a return value nobody reads."""
    return {"return_outputs": False} if "return_outputs" in inspect.signature(schedule.step).parameters else {}


class MicroBatchSteps:
    """Every layout without pipeline stages: micro-batches in turn, gradients synced on the last."""

    def __init__(self, engine, forward_loss_sum, loss_parallel: bool, device):
        self.engine, self.forward_loss_sum = engine, forward_loss_sum
        self.loss_parallel, self.device = loss_parallel, device

    def forward_backward(self, micro: list[dict], scale: float) -> torch.Tensor:
        total = torch.zeros((), device=self.device)
        for i, batch in enumerate(micro):
            with self.engine.accumulate(i == len(micro) - 1), loss_parallel_context(self.loss_parallel), \
                    self.engine.precision():
                loss = self.forward_loss_sum(batch)
                self.engine.backward(loss * scale)
            total += local_value(loss).detach()
        return total

    @torch.no_grad()
    def evaluate(self, batch: dict) -> torch.Tensor:
        with loss_parallel_context(self.loss_parallel), self.engine.precision():
            return local_value(self.forward_loss_sum(batch)).detach()


class PipelineSteps:
    """Pipeline stages: the schedule splits the rank batch into its microbatches and runs them."""

    def __init__(self, make_schedule, engine, *, first: bool, last: bool, pp_group, loss_parallel: bool, device,
                 prepare=None, loss_sum=token_loss_sum):
        """``prepare(batch)``: this rank's part of the (host) batch, e.g. its zigzag share of the tokens under context
        parallelism (every stage of a cp rank takes the same share; only hidden states cross stages); ``loss_sum``:
        the loss over the last stage's output (``trainer/loss.py::build_loss_sum``)."""
        self.loss_sum = loss_sum
        self.schedule = make_schedule(self._loss)
        self.engine, self.first, self.last, self.pp_group = engine, first, last, pp_group
        self.loss_parallel, self.device = loss_parallel, device
        self.prepare = prepare or (lambda batch: batch)
        self._scale, self._sums = 1.0, []

    def _loss(self, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The schedule's loss_fn, called on the last stage once per microbatch."""
        loss = self.loss_sum(output, labels)
        self._sums.append(local_value(loss).detach())
        return loss * self._scale

    def _run(self, micro: list[dict], scale: float, train: bool) -> torch.Tensor:
        batch = self.prepare({k: torch.cat([b[k] for b in micro]) for k in micro[0]})
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        self._scale, self._sums = scale, []
        args = (batch["input_ids"],) if self.first else ()
        target = batch["labels"] if self.last else None
        run = self.schedule.step if train else self.schedule.eval
        losses: list[torch.Tensor] = []
        with loss_parallel_context(self.loss_parallel), self.engine.precision():
            run(*args, target=target, losses=losses, position_ids=batch["position_ids"], **_no_outputs(self.schedule),
                **({"doc_ids": batch["doc_ids"]} if "doc_ids" in batch else {}))
        # The schedule's first run also calls loss_fn while it infers shapes: keep the microbatches' own calls.
        mine = self._sums[len(self._sums) - len(losses):] if losses else []
        total = sum(mine, torch.zeros((), device=self.device))
        dist.all_reduce(total, group=self.pp_group)  # only the last stage computed losses
        return total

    def forward_backward(self, micro: list[dict], scale: float) -> torch.Tensor:
        return self._run(micro, scale, train=True)

    @torch.no_grad()
    def evaluate(self, batch: dict) -> torch.Tensor:
        return self._run([batch], 1.0, train=False)
