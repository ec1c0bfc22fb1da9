"""The data-parallel engine as a strategy: how gradients are reduced and the update is applied.

An engine owns precision (autocast or the engine's own), gradient sync across
micro-batches, backward, clipping and the optimizer/scheduler step. ``averaging_ranks`` is
how many ranks its gradient reduction averages over; the step path scales the summed loss
by it so the update is the per-token mean of the global batch (``trainer/loss.py``).
``parallel.dp_engine`` picks one: :class:`FSDPEngine` here, ``DeepSpeedEngine`` in
``deepspeed_engine.py``. The data-parallel sync strategy (``parallel/dp_sync/methods.py``) acts
around the update and calls :meth:`step`.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist


def local_value(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's value (losses and norms are replicated), else the tensor itself."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


class FSDPEngine:
    """FSDP2 over dp_shard x cp (replicated over dp_replicate unless its replicas take local updates), or
    no data parallelism at all.

    Gradients are reduce-scattered in the last micro-batch's backward and averaged over all
    dp x cp ranks. bf16 is FSDP's MixedPrecisionPolicy when FSDP is on, else autocast: both
    keep fp32 master weights, and every step path (micro-batches or pipeline schedule)
    runs inside :meth:`precision`.
    """

    applies_fsdp = True
    averages_within_workers = True
    varying_micro_batches = True
    native_checkpoint = False  # DCP checkpoints of model, optimizer and the rest (trainer/checkpoint.py)

    @classmethod
    def check(cls, exp) -> None:
        pass

    @classmethod
    def build(cls, exp, model, optimizer, scheduler, *, dims, device, pp_group=None, uneven=False, micro_batch=1,
              accumulation=1, sharded_accumulation=False) -> "FSDPEngine":
        return cls(model, optimizer, scheduler, dims, grad_clip=exp.optim.grad_clip,
                   bf16=exp.model.dtype == "bfloat16", device=device, pp_group=pp_group, uneven=uneven,
                   sharded_accumulation=sharded_accumulation)

    def __init__(self, model, optimizer, scheduler, dims, *, grad_clip: float, bf16: bool, device,
                 pp_group=None, uneven: bool = False, sharded_accumulation: bool = False):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.averaging_ranks = dims.grad_averaging_ranks
        self.grad_clip = grad_clip or float("inf")
        self.fsdp = dims.fsdp_enabled
        self.autocast = bf16 and not self.fsdp
        self.device = device
        self.pp_group = pp_group  # gradients norms add up over pipeline stages
        # Ranks run different numbers of micro-batches (adaptive sp): parameters stay gathered until the last
        # backward of the step, which alone reduces gradients, so every rank makes the same collectives.
        self.uneven = uneven and self.fsdp
        # Gradients reduce-scattered after every micro-batch (sharded adaptive sp's waves): the accumulated
        # gradient is one rank's shard instead of the whole model's unsharded fp32 gradient, for more traffic.
        self.sharded_accumulation = sharded_accumulation and self.fsdp

    def precision(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast)

    def accumulate(self, last: bool):
        """Context for one micro-batch's backward: reduce gradients only on the step's last one."""
        if self.fsdp:
            self.model.set_requires_gradient_sync(last or self.sharded_accumulation)
            if self.uneven:
                self.model.set_reshard_after_backward(last)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> torch.Tensor:
        """Clip by the global norm (across pipeline stages too), update, clear gradients; the norm (a 0-d device
        tensor: reading it is the caller's host sync)."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.pp_group is None:
            norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip, foreach=True)
        else:
            norm = local_value(torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)) ** 2
            dist.all_reduce(norm, group=self.pp_group)
            norm = norm.sqrt()
            torch.nn.utils.clip_grads_with_norm_(params, self.grad_clip, norm, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return local_value(norm).detach()
