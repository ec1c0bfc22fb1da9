"""The one loss: next-token cross entropy summed over label tokens, made a per-token mean over the step.

Every layout and engine calls :func:`token_loss_sum` on its logits and scales the sum by
``averaging_ranks / global_label_tokens`` before backward (see ``trainer/step.py``): the
data-parallel engine averages gradients over ``averaging_ranks`` ranks, so the result is
the gradient of the mean over every label token of the global batch, however the tokens
are spread over ranks and micro-batches (labels of -100, documents of different lengths).

With ``train.loss_chunk_tokens`` (:func:`build_loss_sum`) the model returns its hidden states and
:class:`ChunkedTokenLoss` applies the model's head (final norm and output projection) to a chunk of tokens at a
time, each chunk under ``torch.utils.checkpoint``: a chunk's logits exist only while its loss is computed in forward
and again while its gradient is in backward (Liger's and ALST's tiled loss), never the whole sequence's.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of cross entropy over the tokens whose label is not ``IGNORE_INDEX`` (fp32 logits)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def label_tokens(batches: list[dict]) -> int:
    """Tokens that carry a label in these (host) batches."""
    return sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)


class ChunkedTokenLoss:
    """:func:`token_loss_sum` over chunks of the hidden states, through ``head`` (hidden -> logits) per chunk.

    Under tensor parallelism the hidden states are this rank's sequence shard and the head gathers the shards of a
    chunk in rank order (the model's plan: sequence-parallel norm, then the output projection, vocabulary-parallel
    under ``parallel.loss_parallel``); the labels of a chunk are picked in that order. The number of shards is the
    ratio of the labels' length to the hidden states' (1 without tp).
    """

    def __init__(self, head: Callable[[torch.Tensor], torch.Tensor], chunk_tokens: int):
        self.head, self.chunk_tokens = head, chunk_tokens

    def positions(self, rows: int, shards: int) -> int:
        """Positions of the hidden states per chunk: at most ``chunk_tokens`` logits rows, at least one position."""
        return max(1, self.chunk_tokens // (rows * shards))

    def __call__(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        rows, local = hidden.shape[:2]
        shards = labels.shape[1] // local
        if shards * local != labels.shape[1]:
            raise ValueError(f"labels of {labels.shape[1]} tokens do not split into shards of {local}")
        per = self.positions(rows, shards)
        by_shard = labels.reshape(rows, shards, local)
        total = None
        for start, h in zip(range(0, local, per), hidden.split(per, dim=1)):
            y = by_shard[:, :, start:start + per].reshape(rows, -1)
            part = checkpoint(self._chunk, h, y, use_reentrant=False, preserve_rng_state=False)
            total = part if total is None else total + part
        return total

    def _chunk(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return token_loss_sum(self.head(hidden), labels)


def build_loss_sum(chunk_tokens: int, last_part) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loss over the model's output: :func:`token_loss_sum` on its logits, or with ``chunk_tokens`` > 0
    :class:`ChunkedTokenLoss` through the head of ``last_part`` (the model, or the pipeline stage holding the
    output; None on ranks without it), which is told to return its hidden states (``hidden_output``)."""
    if not chunk_tokens or last_part is None:
        return token_loss_sum
    last_part.hidden_output = True
    return ChunkedTokenLoss(last_part.head, chunk_tokens)
