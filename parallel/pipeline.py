"""Pipeline parallelism with ``torch.distributed.pipelining``: split the decoder into stages, run a schedule.

Each pipeline rank holds ``pp_virtual_stages`` stages ("looped" placement: rank r holds
stages r, r + pp, r + 2pp, ...). A stage is a pruned copy of the whole Transformer that
keeps only its layers (the first stage also the embeddings, the last the final norm and
output), so parameter names (FQNs) are those of the unsplit model and the rest of
loomtrain — tensor parallelism, FSDP, checkpoints — treats each stage like a model.
Position and document ids travel as keyword arguments, which the schedule hands to
every stage's forward; only hidden states go from stage to stage.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from loomtrain.trainer.config import pipeline_microbatches, pipeline_stage_layers

SCHEDULES = {"gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B", "interleaved_1f1b": "ScheduleInterleaved1F1B"}


def check_microbatches(exp, dp: int) -> None:
    """Each data-parallel rank's batch must split into ``train.microbatches`` equal parts."""
    from loomtrain.trainer.config import ConfigError

    local, m = exp.train.global_batch_size // dp, pipeline_microbatches(exp)
    if exp.parallel.pp > 1 and local % m:
        raise ConfigError(f"train.microbatches: {m} must divide the per-rank batch {local} "
                          f"(train.global_batch_size {exp.train.global_batch_size} / data-parallel {dp})")


def stage_ids(pp_rank: int, pp: int, virtual: int) -> list[int]:
    return [pp_rank + i * pp for i in range(virtual)]


def split_model(model: nn.Module, stage: int, n_stages: int, layers_per_stage: list[int]) -> nn.Module:
    """A copy of ``model`` keeping only what stage ``stage`` computes."""
    first = sum(layers_per_stage[:stage])
    keep = {str(i) for i in range(first, first + layers_per_stage[stage])}
    part = copy.deepcopy(model)
    for name in list(part.layers):
        if name not in keep:
            del part.layers[name]
    if stage != 0:
        part.tok_embeddings = None
    if stage != n_stages - 1:
        part.norm = None
        part.output = None
    return part


def build_stages(model: nn.Module, exp, pp_rank: int) -> tuple[list[int], list[nn.Module]]:
    """(stage ids, stage modules) this pipeline rank holds."""
    par = exp.parallel
    n_stages = par.pp * par.pp_virtual_stages
    counts = pipeline_stage_layers(exp.model.n_layers, n_stages, par.pp_split)
    ids = stage_ids(pp_rank, par.pp, par.pp_virtual_stages)
    return ids, [split_model(model, s, n_stages, counts) for s in ids]


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy of one microbatch (the schedule averages microbatches)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)


def build_schedule(exp, ids: list[int], parts: list[nn.Module], pp_group, device, loss_fn=token_loss):
    """The configured schedule over this rank's stages."""
    from torch.distributed import pipelining

    par = exp.parallel
    n_stages = par.pp * par.pp_virtual_stages
    stages = [pipelining.PipelineStage(part, s, n_stages, device, group=pp_group) for s, part in zip(ids, parts)]
    cls = getattr(pipelining, SCHEDULES[par.pp_schedule])
    microbatches = pipeline_microbatches(exp)
    if par.pp_schedule == "interleaved_1f1b":
        return cls(stages, n_microbatches=microbatches, loss_fn=loss_fn)
    return cls(stages[0], n_microbatches=microbatches, loss_fn=loss_fn)


def bubble_fraction(schedule: str, pp: int, microbatches: int, virtual: int = 1) -> float:
    """Idle fraction of an ideal pipeline: (p-1)/(m+p-1); interleaving divides the bubble by v."""
    p, m = pp, microbatches
    if schedule == "interleaved_1f1b":
        return (p - 1) / virtual / (m + (p - 1) / virtual)
    return (p - 1) / (m + p - 1)
