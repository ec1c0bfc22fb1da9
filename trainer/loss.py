"""The one loss: next-token cross entropy summed over label tokens, made a per-token mean over the step.

Every layout and engine calls :func:`token_loss_sum` on its logits and scales the sum by
``averaging_ranks / global_label_tokens`` before backward (see ``trainer/step.py``): the
data-parallel engine averages gradients over ``averaging_ranks`` ranks, so the result is
the gradient of the mean over every label token of the global batch, however the tokens
are spread over ranks and micro-batches (labels of -100, documents of different lengths).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of cross entropy over the tokens whose label is not ``IGNORE_INDEX`` (fp32 logits)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def label_tokens(batches: list[dict]) -> int:
    """Tokens that carry a label in these (host) batches."""
    return sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)
