"""Packing into fixed-length sequences and deterministic, resumable sampling.

The ``.bin`` token stream (documents each ending in EOS) is cut into windows of
``seq_len + 1`` tokens; window ``i`` starts at token ``i * seq_len``. Every window
carries per-token document ids and positions that restart at each document, so the
model never attends across a boundary. The order of windows is a seeded permutation
per epoch; the sampler's whole state is the number of windows consumed, which is saved
in checkpoints, so a resumed run sees exactly the batches an uninterrupted run would.
Each optimizer step consumes ``global_batch_size`` windows; data-parallel rank ``r``
takes the ``r``-th contiguous slice, so the global batch does not depend on the layout.
"""
from __future__ import annotations

import numpy as np
import torch

from loomtrain.data.indexed import IndexedTokens
from loomtrain.errors import ConfigError


class PackedDataset:
    def __init__(self, prefix: str, seq_len: int):
        self.data = IndexedTokens(prefix)
        self.seq_len = seq_len
        self.starts = np.asarray(self.data.sequence_starts, dtype=np.int64)
        self.num_windows = (len(self.data.tokens) - 1) // seq_len
        if self.num_windows < 1:
            raise ValueError(f"data.seq_len: {seq_len} is longer than the whole split at '{prefix}' "
                             f"({len(self.data.tokens)} tokens)")

    def __len__(self) -> int:
        return self.num_windows

    def window(self, i: int) -> dict[str, np.ndarray]:
        lo = i * self.seq_len
        toks = np.asarray(self.data.tokens[lo:lo + self.seq_len + 1], dtype=np.int64)
        pos = np.arange(lo, lo + self.seq_len, dtype=np.int64)
        doc = np.searchsorted(self.starts, pos, side="right") - 1  # document index of each token
        position = pos - np.maximum(self.starts[doc], lo)  # restart at each document and at the window start
        return {"input_ids": toks[:-1], "labels": toks[1:], "position_ids": position, "doc_ids": doc - doc[0]}

    def batch(self, indices) -> dict[str, torch.Tensor]:
        windows = [self.window(int(i)) for i in indices]
        return {k: torch.from_numpy(np.stack([w[k] for w in windows])) for k in windows[0]}


class ResumableSampler:
    """Global stream of window indices: epoch ``e`` is ``permutation(seed + e)``; state = windows consumed."""

    def __init__(self, num_windows: int, seed: int, shuffle: bool = True):
        self.num_windows = num_windows
        self.seed = seed
        self.shuffle = shuffle
        self.consumed = 0
        self._perm_epoch = -1
        self._perm = None

    def _epoch_perm(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            if self.shuffle:
                self._perm = np.random.default_rng(self.seed + epoch).permutation(self.num_windows)
            else:
                self._perm = np.arange(self.num_windows)
            self._perm_epoch = epoch
        return self._perm

    def take(self, n: int) -> np.ndarray:
        out = []
        while len(out) < n:
            epoch, offset = divmod(self.consumed, self.num_windows)
            chunk = self._epoch_perm(epoch)[offset:offset + n - len(out)]
            out.extend(chunk.tolist())
            self.consumed += len(chunk)
        return np.asarray(out, dtype=np.int64)

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "seed": self.seed, "num_windows": self.num_windows}

    def load_state_dict(self, state: dict) -> None:
        if int(state["num_windows"]) != self.num_windows or int(state["seed"]) != self.seed:
            raise ValueError(f"checkpoint: data sampler state is for {state['num_windows']} windows / seed "
                             f"{state['seed']}, this run has {self.num_windows} / {self.seed} (different data?)")
        self.consumed = int(state["consumed"])


def batch_layout(global_batch: int, micro_batch: int, dp_size: int) -> tuple[int, int]:
    """(per-rank batch, micro-batch) for a global batch split over ``dp_size`` ranks; ConfigError if it does not
    fit (``trainer/checks.py`` calls this before any process group starts)."""
    if global_batch % dp_size:
        raise ConfigError(f"train.global_batch_size: {global_batch} must be divisible by the data-parallel "
                         f"size {dp_size} (dp_replicate*dp_shard)")
    local = global_batch // dp_size
    micro = micro_batch or local
    if local % micro:
        raise ConfigError(f"train.micro_batch_size: {micro} must divide the per-rank batch {local} "
                         f"(global_batch_size / data-parallel size)")
    return local, micro


class TrainBatches:
    """Per step: this data-parallel rank's micro-batches of the next global batch."""

    def __init__(self, dataset: PackedDataset, seed: int, global_batch: int, micro_batch: int, dp_rank: int,
                 dp_size: int):
        self.local_batch, micro_batch = batch_layout(global_batch, micro_batch, dp_size)
        self.dataset, self.global_batch, self.micro_batch = dataset, global_batch, micro_batch
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.sampler = ResumableSampler(len(dataset), seed)

    @property
    def accumulation_steps(self) -> int:
        return self.local_batch // self.micro_batch

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        indices = self.sampler.take(self.global_batch)
        mine = indices[self.dp_rank * self.local_batch:(self.dp_rank + 1) * self.local_batch]
        return [self.dataset.batch(mine[i:i + self.micro_batch]) for i in range(0, len(mine), self.micro_batch)]


def eval_batches(dataset: PackedDataset, num_batches: int, micro_batch: int, dp_rank: int, dp_size: int):
    """Fixed validation batches: the first windows of the split, in order, dealt round-robin to dp ranks."""
    total = num_batches * micro_batch * dp_size
    indices = np.arange(total) % len(dataset)
    mine = indices.reshape(num_batches, dp_size, micro_batch)[:, dp_rank]
    return [dataset.batch(row) for row in mine]
