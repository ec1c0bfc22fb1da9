"""Loss by position: how well a model predicts a token given how much context precedes it.

Long-context training is judged by the loss at late positions, which a mean over the whole sequence hides
(most tokens of a sample of documents sit early in their document). Positions are grouped in log-spaced buckets
``[0, B), [B, 2B), [2B, 4B), ...``, the last one cut at the sequence length (a partial bucket). The base ``B``
is 1024 for long sequences (0-1K, 1K-2K, 2K-4K, ... as long-context papers report); for short ones it shrinks
with the length, to the power of two at least ``seq_len / 16`` (``seq_len`` 2048: 128, so the buckets
``[0, 128) ... [1024, 2048)``; ``seq_len`` 256: 16), so a CPU-sized run still gets about five buckets. A position
is the number of tokens of context before the predicted token within its document (the RoPE position the model
saw), so packed windows and one long text are counted alike.

Both ``loomtrain eval`` (``trainer/evaluate.py``) and the trainer's ``train.eval_by_position`` compute
:func:`position_sums` on each rank's logits (its context-parallel shard: each token carries its position) and
add the sums over the ranks holding disjoint tokens; :func:`bucket_losses` then divides.
"""
from __future__ import annotations

import io
import json
import math
import os

import torch
import torch.nn.functional as F

from loomtrain.errors import ConfigError
from loomtrain.fsutil import atomic_write_bytes
from loomtrain.trainer.loss import IGNORE_INDEX

LONG_BUCKET = 1024  # the base bucket of long sequences
MIN_BUCKETS = 16  # short sequences: the base is at least seq_len / this, rounded up to a power of two
PLOT_NAME = "loss_by_position.png"


def default_bucket(seq_len: int) -> int:
    """The base bucket for sequences of ``seq_len`` tokens (module docstring)."""
    return min(LONG_BUCKET, 1 << max(0, math.ceil(math.log2(max(1.0, seq_len / MIN_BUCKETS)))))


def position_buckets(seq_len: int, base: int = 0) -> list[tuple[int, int]]:
    """``[lo, hi)`` position ranges: ``[0, base)`` then doubling, the last cut at ``seq_len``; ``base`` 0: the
    default for the length."""
    base = base or default_bucket(seq_len)
    edges = [0, base]
    while edges[-1] < seq_len:
        edges.append(edges[-1] * 2)
    edges = [min(e, seq_len) for e in edges]
    return [(lo, hi) for lo, hi in zip(edges, edges[1:]) if hi > lo]


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token cross entropy (fp32, 0 where the label is ignored), shaped like ``labels``. Vocabulary-parallel
    logits (a DTensor sharded over tensor parallelism) are gathered first: evaluation, not the training loss."""
    from torch.distributed.tensor import DTensor

    if isinstance(logits, DTensor):
        logits = logits.full_tensor()
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="none").view(labels.shape)


def position_sums(logits: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor, length: int) -> torch.Tensor:
    """(2, ``length``) float64: summed token loss and labelled-token count at each position, over the tokens these
    logits predict (a rank's shard; ranks with disjoint tokens add theirs up)."""
    losses = token_losses(logits, labels).flatten()
    keep = labels.flatten() != IGNORE_INDEX
    pos = position_ids.flatten()[keep].to(torch.int64)
    out = torch.zeros(2, length, dtype=torch.float64, device=losses.device)
    out[0].index_add_(0, pos, losses[keep].double())
    out[1].index_add_(0, pos, torch.ones_like(pos, dtype=torch.float64))
    return out


def bucket_losses(sums: torch.Tensor, buckets: list[tuple[int, int]]) -> list[dict]:
    """``[{start, end, loss, tokens}]`` per bucket from :func:`position_sums` (all ranks' added up); ``loss`` is
    None for a bucket without labelled tokens."""
    sums = sums.detach().cpu()
    out = []
    for lo, hi in buckets:
        total, count = float(sums[0, lo:hi].sum()), int(sums[1, lo:hi].sum())
        out.append({"start": lo, "end": hi, "loss": total / count if count else None, "tokens": count})
    return out


def mean_loss(sums: torch.Tensor) -> float:
    """The per-token mean over every position of :func:`position_sums`."""
    count = float(sums[1].sum())
    return float(sums[0].sum()) / count if count else float("nan")


def bucket_label(lo: int, hi: int) -> str:
    """``0-1K``, ``1K-2K``, ``64-128``: a bucket as the tables and the plot name it."""
    def short(n: int) -> str:
        return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)

    return f"{short(lo)}-{short(hi)}"


# ---------------------------------------------------------------------------------------------- the PNG
def require_matplotlib(field: str) -> None:
    """A one-line error naming the extra, before any work, when the plot cannot be drawn."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise ConfigError(f"{field}: the loss-by-position plot needs matplotlib (pip install matplotlib, or "
                          "loomtrain[dev])")


def plot_metrics(metrics_path: str, png_path: str) -> int:
    """Draw every ``loss_by_position`` record of a ``metrics.jsonl`` (one line per evaluated step, loss against
    the bucket's first position, log x) into ``png_path``, written atomically; returns the lines drawn."""
    records = []
    with open(metrics_path) as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                if record.get("loss_by_position"):
                    records.append((record["step"], record["loss_by_position"]))
    if records:
        plot_curves([(f"step {step}", buckets) for step, buckets in records], png_path,
                    title=os.path.basename(os.path.dirname(os.path.abspath(metrics_path))))
    return len(records)


def plot_curves(curves: list[tuple[str, list[dict]]], png_path: str, title: str = "") -> None:
    """Loss against position for each ``(label, bucket_losses)``; written to a temporary file in the same
    directory and renamed, so a reader never sees a half-written PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    try:
        cmap = plt.get_cmap("viridis")
        for i, (label, buckets) in enumerate(curves):
            points = [(b["start"] + b["end"]) / 2 for b in buckets if b["loss"] is not None]
            losses = [b["loss"] for b in buckets if b["loss"] is not None]
            ax.plot(points, losses, marker="o", label=label, color=cmap(i / max(1, len(curves) - 1)))
        ax.set_xscale("log", base=2)
        ax.set_xlabel("position (tokens of context; bucket midpoints)")
        ax.set_ylabel("loss (nats/token)")
        ax.set_title(f"loss by position{': ' + title if title else ''}")
        ax.grid(True, alpha=0.3)
        if len(curves) <= 12:
            ax.legend(fontsize=8)
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=100, bbox_inches="tight")
        atomic_write_bytes(png_path, png.getvalue())
    finally:
        plt.close(fig)
