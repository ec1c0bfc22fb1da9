"""Data blends (``data.sources``): several corpora or prepared prefixes, sampled in proportion to their weights.

Megatron's semantics (``--data-path w1 p1 w2 p2``, megatron-core's ``BlendedDataset``): the weights are
normalised, and sample ``i`` of the blend comes from the source whose count lags its share the most,
``argmax_s(w_s * max(i, 1) - c_s)`` (the first on ties), which keeps every prefix of the stream within one
sample of the weights. :func:`blend_draws` reproduces megatron-core's ``build_blending_indices`` exactly (tested
against it). A source's ``c``-th sample is its ``c``-th window in its own seeded order (``loader.ResumableSampler``
with seed ``train.seed + s * 2**32``, so a one-source blend is that corpus's plain order).

Megatron stores both index arrays for the run's whole length. Here the per-source counts are the position (their
sum is the global position) and the next samples are computed from them: memory does not grow with the run, and
the counts are the whole resumable state, saved in checkpoints as the sampler's. The global order does not depend
on the number of ranks; each takes its slice of the global batch as with one corpus. A checkpoint resumed with
other weights continues from its counts toward the new shares.

Each source is an ordinary ``data.*`` corpus (:func:`source_config`), prepared and cached as ``data.corpus`` is.
Every source is checked (paths, records, one vocabulary) before any is prepared, so bad input writes nothing.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import re

import numpy as np
import torch

from loomtrain.data.loader import PackedDataset, ResumableSampler, stacked
from loomtrain.data.prepare import PreparedData, data_vocab, prepare
from loomtrain.errors import ConfigError

SOURCE_NAME = r"[A-Za-z0-9_.-]+"  # a source's name, as it appears in metric keys
SEED_STRIDE = 1 << 32  # source s orders its windows with seed train.seed + s * SEED_STRIDE
PER_SOURCE_FIELDS = ("corpus", "prepared", "valid_prepared", "text_key", "file_glob", "max_documents")


def source_name(source) -> str:
    """A ``data.sources`` entry's name: its own, else its path's last component (other characters as '_')."""
    if source.name:
        return source.name
    label = os.path.basename(os.path.normpath(os.path.expanduser(source.corpus or source.prepared)))
    return re.sub(r"[^A-Za-z0-9_.-]", "_", label) or "source"


def source_config(data_cfg, source):
    """The entry as a one-corpus ``data`` section: its own corpus or prefix, data.*'s values for what it leaves
    empty (text_key, file_glob, max_documents) and for everything shared (tokenizer, cache, split, packing)."""
    return dataclasses.replace(
        data_cfg, sources=[], corpus=source.corpus or data_cfg.corpus, prepared=source.prepared,
        valid_prepared=source.valid_prepared, text_key=source.text_key or data_cfg.text_key,
        file_glob=source.file_glob or data_cfg.file_glob, max_documents=source.max_documents or data_cfg.max_documents)


@contextlib.contextmanager
def _as_entry(i: int):
    """A one-corpus error (``data.corpus: ...``) renamed to the entry's field (``data.sources[i].corpus: ...``)."""
    try:
        yield
    except ConfigError as e:
        message = re.sub(r"^data\.(%s):" % "|".join(PER_SOURCE_FIELDS), rf"data.sources[{i}].\1:", str(e))
        raise ConfigError(message) from None


def check_sources(data_cfg, need_valid: bool = False) -> tuple[int, str]:
    """Every source readable (a corpus's files and first records, a prefix's files; ``need_valid``: its validation
    split) and all of one vocabulary, before anything is written: (the vocabulary, where it comes from)."""
    from loomtrain.data.corpus import check_corpus

    vocab = first = None
    for i, source in enumerate(data_cfg.sources):
        cfg = source_config(data_cfg, source)
        with _as_entry(i):
            if not cfg.prepared:
                check_corpus(cfg.corpus, cfg.file_glob, cfg.text_key)
            size, where = data_vocab(cfg, need_valid)
        if vocab is None:
            vocab, first = size, where
        elif size != vocab:
            raise ConfigError(f"data.sources[{i}]: vocabulary {size} ({where}) differs from data.sources[0]'s {vocab} "
                              f"({first}); a blend has one vocabulary")
    return vocab, first


# ----------------------------------------------------------------------------- the blend's order
def normalised(weights) -> np.ndarray:
    """Weights as fractions of their sum (float64, as megatron-core's ``normalize``)."""
    w = np.asarray(weights, dtype=np.float64)
    return w / w.sum()


def blend_draws(weights, counts, n: int) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """The ``n`` samples of the blend after per-source ``counts``: (each one's source, its index within that source,
    the counts after them). ``weights`` normalised. Megatron's error-minimising choice, in the same float64
    arithmetic (C++ doubles are Python floats), so the sequence is megatron-core's."""
    w = [float(x) for x in weights]
    c = [int(x) for x in counts]
    i = sum(c)
    sources, within = np.empty(n, np.int64), np.empty(n, np.int64)
    for k in range(n):
        at = float(max(i + k, 1))
        best, best_error = 0, w[0] * at - c[0]
        for s in range(1, len(w)):
            error = w[s] * at - c[s]
            if error > best_error:
                best, best_error = s, error
        sources[k], within[k] = best, c[best]
        c[best] += 1
    return sources, within, tuple(c)


class BlendedSampler:
    """The blend's global stream of (source, window) pairs; position = the per-source counts (a tuple)."""

    def __init__(self, weights, sizes: list[int], seed: int, names: list[str]):
        self.weights, self.names, self.seed = normalised(weights), list(names), seed
        self.orders = [ResumableSampler(n, seed + s * SEED_STRIDE) for s, n in enumerate(sizes)]
        self.position = (0,) * len(sizes)

    def span(self, position, n: int) -> tuple[np.ndarray, tuple[int, ...]]:
        """((n, 2) array of [source, window] from ``position`` on, the position after them)."""
        sources, within, nxt = blend_draws(self.weights, position, n)
        windows = np.empty(n, np.int64)
        for s, order in enumerate(self.orders):
            mine = sources == s
            if mine.any():
                windows[mine] = order.at(within[mine])
        return np.stack([sources, windows], axis=1), nxt

    def source_tokens(self, seq_len: int) -> dict[str, int]:
        return {name: count * seq_len for name, count in zip(self.names, self.position)}

    def state_dict(self) -> dict:
        return {"counts": list(self.position), "names": self.names, "seed": self.seed,
                "num_windows": [order.num_windows for order in self.orders]}

    def load_state_dict(self, state: dict) -> None:
        if "counts" not in state:
            raise ValueError("checkpoint: its data position is for one corpus (data.corpus / data.prepared); this run "
                             "blends data.sources")
        saved = (list(state["names"]), [int(n) for n in state["num_windows"]], int(state["seed"]))
        ours = (self.names, [order.num_windows for order in self.orders], self.seed)
        if saved != ours:
            raise ValueError(f"checkpoint: data blend position is for sources {saved[0]} with {saved[1]} windows / "
                             f"seed {saved[2]}; this run has {ours[0]} with {ours[1]} / {ours[2]} (different data?)")
        self.position = tuple(int(c) for c in state["counts"])


class BlendedDataset:
    """The sources' training windows (each a ``loader.PackedDataset``) as one dataset whose items are
    (source, window) pairs, in the order of :class:`BlendedSampler`."""

    def __init__(self, datasets: dict[str, PackedDataset], weights):
        self.names, self.datasets, self.weights = list(datasets), list(datasets.values()), list(weights)
        self.seq_len = self.datasets[0].seq_len

    def sampler(self, seed: int) -> BlendedSampler:
        return BlendedSampler(self.weights, [len(d) for d in self.datasets], seed, self.names)

    def batch(self, pairs) -> dict[str, torch.Tensor]:
        return stacked([self.datasets[int(s)].window(int(w)) for s, w in pairs])

    def rescaled(self, state: dict) -> dict:
        """A position saved at another ``data.seq_len`` (a previous stage): each source keeps the tokens it had
        given (as ``loader.rescaled_to_length`` does for one corpus); the blend then goes on from those counts."""
        old_len = int(state.get("seq_len", self.seq_len))
        if old_len == self.seq_len or "counts" not in state:
            return state
        if [int(n) for n in state["num_windows"]] != [(len(d.data.tokens) - 1) // old_len for d in self.datasets]:
            return state  # other data: the sampler's check says so
        return state | {"num_windows": [len(d) for d in self.datasets], "seq_len": self.seq_len,
                        "counts": [-(-int(c) * old_len // self.seq_len) for c in state["counts"]]}


# ----------------------------------------------------------------------------- prepared sources
@dataclasses.dataclass
class Source:
    name: str
    weight: float  # normalised
    data: PreparedData


class PreparedSources:
    """The run's data as the trainer takes it: one corpus (``blended`` False: exactly today's datasets) or a blend's
    sources, each with its prepared splits and normalised weight."""

    def __init__(self, sources: list[Source], blended: bool):
        self.sources, self.blended = sources, blended

    @property
    def vocab_size(self) -> int:
        return self.sources[0].data.vocab_size

    @property
    def meta(self) -> dict:
        meta = dict(self.sources[0].data.meta)
        if self.blended:
            meta["train_tokens"] = sum(s.data.meta["train_tokens"] for s in self.sources)
            meta["sources"] = {s.name: s.data.meta["train_tokens"] for s in self.sources}
        return meta

    def train_dataset(self, seq_len: int):
        if not self.blended:
            return PackedDataset(self.sources[0].data.train_prefix, seq_len)
        return BlendedDataset({s.name: PackedDataset(s.data.train_prefix, seq_len) for s in self.sources},
                              [s.weight for s in self.sources])

    def valid_datasets(self, seq_len: int) -> dict[str, PackedDataset]:
        """Each source's validation windows by name (one corpus: under '')."""
        return {s.name: PackedDataset(s.data.valid_prefix, seq_len) for s in self.sources}

    def val_record(self, losses: dict[str, float]) -> dict[str, float]:
        """Metrics of one evaluation from each source's validation loss: ``val_loss`` (a blend: the losses weighted
        as the blend draws its sources, the loss expected on a blended batch) and ``val_loss/<name>``."""
        if not self.blended:
            return {"val_loss": losses[self.sources[0].name]}
        mean = sum(s.weight * losses[s.name] for s in self.sources)
        return {"val_loss": mean} | {f"val_loss/{s.name}": losses[s.name] for s in self.sources}


def prepare_sources(data_cfg, need_valid: bool = False, **kwargs) -> PreparedSources:
    """``data.corpus`` / ``data.prepared`` as today, or every source of ``data.sources`` (each checked first, then
    each prepared and cached as one corpus is; ``kwargs`` as :func:`prepare.prepare` takes them)."""
    if not data_cfg.sources:
        return PreparedSources([Source("", 1.0, prepare(data_cfg, need_valid=need_valid, **kwargs))], blended=False)
    check_sources(data_cfg, need_valid)
    weights = normalised([s.weight for s in data_cfg.sources])
    out = []
    for i, (source, weight) in enumerate(zip(data_cfg.sources, weights)):
        with _as_entry(i):
            prepared = prepare(source_config(data_cfg, source), need_valid=need_valid, **kwargs)
        out.append(Source(source_name(source), float(weight), prepared))
    return PreparedSources(out, blended=True)
