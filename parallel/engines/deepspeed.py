"""DeepSpeed ZeRO as the data-parallel engine (``parallel.dp_engine: deepspeed``).

loomtrain builds the model, AdamW and the LR schedule as usual and hands them to
``deepspeed.initialize``; ZeRO stage, optimizer-state offload, clipping and precision come
from the experiment. Checkpoints are DeepSpeed's own files, written into loomtrain's
``step_NNNNNNNN`` directories with the same atomic commit and ``latest`` pointer, and carry
the sampler position and RNG states like the DCP ones.
"""
from __future__ import annotations

import contextlib
import os
import shutil

import torch
import torch.distributed as dist

from loomtrain.fsutil import atomic_write_text
from loomtrain.trainer.checkpoint import list_checkpoints, rng_state, set_rng_state


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

    def __init__(self, ds, dims):
        self.ds = ds
        self.averaging_ranks = dims.dp * dims.cp

    def precision(self):
        return contextlib.nullcontext()

    def accumulate(self, last: bool):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss, scale_wrt_gas=False)
        self.ds.step()

    def step(self) -> float:
        return float(self.ds.get_global_grad_norm() or 0.0)


class DeepSpeedCheckpointer:
    """The Checkpointer interface over ``engine.save_checkpoint`` / ``load_checkpoint``."""

    def __init__(self, ckpt_root: str, keep: int, rank: int, engine):
        self.root, self.keep, self.rank, self.engine = ckpt_root, keep, rank, engine

    def save(self, model, optimizer, scheduler, sampler, step: int, sync=None) -> str:
        """``sync``: always every_step under DeepSpeed (config checks refuse the others): nothing to save."""
        name = f"step_{step:08d}"
        final, tmp = os.path.join(self.root, name), os.path.join(self.root, name + ".tmp")
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(self.root, exist_ok=True)
        dist.barrier()
        self.engine.save_checkpoint(self.root, tag=name + ".tmp", save_latest=False,
                                    client_state={"step": step, "sampler": sampler.state_dict()})
        # Every rank's RNG state: DeepSpeed keeps client_state from rank 0 only, so each rank adds a file.
        torch.save(rng_state(), os.path.join(tmp, f"loomtrain_rng_rank{self.rank}.pt"))
        dist.barrier()
        if self.rank == 0:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            atomic_write_text(os.path.join(self.root, "latest"), name + "\n")
            for _, old in list_checkpoints(self.root)[:-self.keep] if self.keep else []:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()
        return final

    def load(self, path: str, model, optimizer, scheduler, sampler, sync=None) -> int:
        path = path.rstrip("/")
        rng_file = os.path.join(path, f"loomtrain_rng_rank{self.rank}.pt")
        if not os.path.isfile(rng_file):
            raise FileNotFoundError(f"--resume: '{path}' is not a complete DeepSpeed checkpoint of this world size")
        _, client = self.engine.load_checkpoint(os.path.dirname(path), tag=os.path.basename(path))
        sampler.load_state_dict(client["sampler"])
        set_rng_state(torch.load(rng_file, weights_only=False))
        return int(client["step"])

    def wait(self) -> None:
        pass

    def poll(self) -> None:
        pass
