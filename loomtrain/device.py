"""Which device a run uses (shared by the checks, the launcher and ``plan``)."""
from __future__ import annotations


def device_type_for(requested: str) -> str:
    """``parallel.device`` resolved on this machine: cuda (asked for, or auto with CUDA present) or cpu."""
    if requested == "cuda":
        return "cuda"
    if requested != "auto":
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def job_device_type(requested: str) -> str:
    """``parallel.device`` for a job that asks Slurm for GPUs (``loomtrain slurm``, ``plan``): cuda unless the
    config says cpu, whatever the machine writing the script has."""
    return "cpu" if requested == "cpu" else "cuda"
