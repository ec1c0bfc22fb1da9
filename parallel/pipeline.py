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

from torch import nn

SCHEDULES = {"gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B", "interleaved_1f1b": "ScheduleInterleaved1F1B"}


def stage_ids(pp_rank: int, pp: int, virtual: int) -> list[int]:
    return [pp_rank + i * pp for i in range(virtual)]


def build_stages(model: nn.Module, layers_per_stage: list[int], pp_rank: int, pp: int,
                 virtual: int) -> tuple[list[int], list[nn.Module]]:
    """(stage ids, stage modules) this pipeline rank holds; the model prunes its own copies
    (``model.pipeline_stage(layer_names, first, last)``), so nothing here knows its modules."""
    n_stages = pp * virtual
    ids = stage_ids(pp_rank, pp, virtual)
    names = list(model.layers)
    parts = []
    for s in ids:
        first = sum(layers_per_stage[:s])
        keep = set(names[first:first + layers_per_stage[s]])
        parts.append(model.pipeline_stage(keep, first=s == 0, last=s == n_stages - 1))
    return ids, parts


def build_schedule(schedule: str, ids: list[int], parts: list[nn.Module], n_stages: int, microbatches: int,
                   pp_group, device, loss_fn):
    """The named schedule over this rank's stages. Gradients are not rescaled by the schedule:
    ``loss_fn`` already returns the step's per-token-scaled loss (``trainer/step.py``)."""
    from torch.distributed import pipelining

    stages = [pipelining.PipelineStage(part, s, n_stages, device, group=pp_group) for s, part in zip(ids, parts)]
    cls = getattr(pipelining, SCHEDULES[schedule])
    if schedule == "interleaved_1f1b":
        return cls(stages, n_microbatches=microbatches, loss_fn=loss_fn, scale_grads=False)
    return cls(stages[0], n_microbatches=microbatches, loss_fn=loss_fn, scale_grads=False)


def bubble_fraction(schedule: str, pp: int, microbatches: int, virtual: int = 1) -> float:
    """Idle fraction of an ideal pipeline: (p-1)/(m+p-1); interleaving divides the bubble by v."""
    p, m = pp, microbatches
    if schedule == "interleaved_1f1b":
        return (p - 1) / virtual / (m + (p - 1) / virtual)
    return (p - 1) / (m + p - 1)
