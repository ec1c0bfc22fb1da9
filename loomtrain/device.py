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


def resolve_dtype(requested: str, device_type: str) -> str:
    """``model.dtype``: ``auto`` is bf16 mixed precision on CUDA (fp32 master weights) and fp32 elsewhere
    (CPU bf16 matmuls are slower than fp32 ones)."""
    if requested != "auto":
        return requested
    return "bfloat16" if device_type == "cuda" else "float32"


def configure_math(device_type: str) -> None:
    """On CUDA, fp32 matmuls and convolutions use TF32 (about 8x the fp32 rate on Hopper, which is the peak MFU
    divides by for fp32 runs, ``trainer/metrics.py``); nothing changes on CPU."""
    if device_type != "cuda":
        return
    import torch

    matmul, cudnn_conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9's precision API (allow_tf32 is deprecated there)
        matmul.fp32_precision = "tf32"
        cudnn_conv.fp32_precision = "tf32"
    else:  # pragma: no cover - older torch
        matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
