"""DeepSpeed ZeRO as the data-parallel engine (``parallel.dp_engine: deepspeed``).

loomtrain builds the model, AdamW and the LR schedule as usual and hands them to
``deepspeed.initialize``; ZeRO stage, optimizer-state offload, clipping and precision come
from the experiment. Checkpoints are DeepSpeed's own files, written into loomtrain's
``step_NNNNNNNN`` directories with the same atomic commit and ``latest`` pointer, and carry
the sampler position and RNG states like the DCP ones.
"""
from __future__ import annotations

import contextlib

import torch



def ds_config(exp, micro_batch: int, accumulation: int) -> dict:
    par = exp.parallel
    zero = {"stage": par.zero_stage}
    if par.zero_offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": exp.optim.grad_clip or 0.0,
        "zero_optimization": zero,
        # loomtrain's AdamW is the client optimizer; offloaded, it runs on the CPU copy as is
        # (DeepSpeedCPUAdam would need a ~70 s C++ build here).
        "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": exp.model.dtype == "bfloat16"},
        "steps_per_print": 2**31,
        "wall_clock_breakdown": False,
    }


def initialize(model, optimizer, scheduler, exp, micro_batch: int, accumulation: int):
    """(engine, optimizer, scheduler) from ``deepspeed.initialize`` on the existing process group."""
    import deepspeed

    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=ds_config(exp, micro_batch, accumulation), dist_init_required=False)
    return engine, optimizer, scheduler


class DeepSpeedEngine:
    """The data-parallel engine interface (``parallel/engines/fsdp.py``) over a DeepSpeed engine.

    ZeRO averages gradients over the data-parallel ranks; the loss arrives already scaled
    per token, so DeepSpeed's own division by the accumulation steps is switched off.
    DeepSpeed wants ``step()`` after every micro-batch's backward (it updates only at the
    accumulation boundary, clipping and scheduling itself), so :meth:`backward` calls it.
    bf16 is DeepSpeed's (the module is cast), hence no autocast.
    """

    applies_fsdp = False  # ZeRO partitions the model itself
    averages_within_workers = False  # it averages over every data-parallel rank
    varying_micro_batches = False  # its accumulation steps are fixed at initialisation
    native_checkpoint = True

    @classmethod
    def check(cls, exp) -> None:
        from loomtrain.errors import ConfigError

        par = exp.parallel
        others = {d: getattr(par, d) for d in ("pp", "cp", "tp", "dp_replicate") if getattr(par, d) != 1}
        if others:
            raise ConfigError(f"parallel.dp_engine: deepspeed runs data parallelism only here; set "
                              f"{', '.join(f'parallel.{d}=1' for d in others)} (or use dp_engine=fsdp)")
        if exp.faulttol.snapshot.every_steps:
            raise ConfigError("faulttol.snapshot.every_steps: in-memory snapshots need dp_engine=fsdp "
                              "(ZeRO partitions are DeepSpeed's); use checkpoint.every_steps with deepspeed")
        if exp.checkpoint.async_save:
            raise ConfigError("checkpoint.async_save: not available with dp_engine=deepspeed")

    @classmethod
    def build(cls, exp, model, optimizer, scheduler, *, dims, device, pp_group=None, uneven=False, micro_batch=1,
              accumulation=1, sharded_accumulation=False) -> "DeepSpeedEngine":
        """``deepspeed.initialize`` on the model, optimizer and schedule (it returns its own wrappers)."""
        return cls(*initialize(model, optimizer, scheduler, exp, micro_batch, accumulation), dims)

    def __init__(self, ds, optimizer, scheduler, dims):
        self.ds = self.model = ds
        self.optimizer, self.scheduler = optimizer, scheduler
        self.averaging_ranks = dims.dp * dims.cp

    def precision(self):
        return contextlib.nullcontext()

    def accumulate(self, last: bool):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss, scale_wrt_gas=False)
        self.ds.step()

    def step(self) -> torch.Tensor:
        norm = self.ds.get_global_grad_norm()  # None before the first boundary
        return torch.zeros(()) if norm is None else torch.as_tensor(norm).detach()
