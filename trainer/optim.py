"""AdamW (fused where the platform has it), or plain SGD, with linear warmup and cosine decay."""
from __future__ import annotations

import math

import torch


def build_optimizer(params, cfg, device: torch.device) -> torch.optim.Optimizer:
    params = list(params)
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]  # norms: no weight decay
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, foreach=True)
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    fused = cfg.fused == "true" or cfg.fused == "auto"  # CUDA and CPU both have fused AdamW (torch>=2.4)
    if fused:
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except RuntimeError:
            if cfg.fused == "true":
                raise
    return torch.optim.AdamW(groups, foreach=True, **kwargs)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer, cfg, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.warmup_steps, total_steps, cfg.min_lr_ratio))
