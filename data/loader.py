"""Batch plans: what each step trains on, deterministic, resumable, with flat per-rank memory.

Two plans (``data.batching``), both computed identically on every rank from the global data
order, so no rank waits for another to learn the step's sequences:

- ``windows``: the ``.bin`` token stream (documents each ending in EOS) is cut into windows of
  ``seq_len + 1`` tokens; window ``i`` starts at token ``i * seq_len``. Every window carries
  per-token document ids and positions that restart at each document, so the model never
  attends across a boundary. Each step takes ``global_batch_size`` windows of the global order;
  data-parallel rank ``r`` takes the ``r``-th contiguous slice.
- ``documents``: each step takes whole documents (longer ones cut into pieces of at most
  ``data.max_doc_tokens`` predicted tokens) in the global order until ``train.global_batch_tokens``
  would be exceeded. The step's sequence lengths are known to every rank before it starts
  (``DocumentBatches.step_lengths``). For today's trainer each rank gets a token-balanced share,
  packed into rows of ``data.seq_len`` (documents kept apart by their ids, padding unlabelled).

The global order is a seeded bijection per epoch computed on the fly (a Feistel network with
cycle walking), not a stored permutation: memory does not grow with the corpus, and the
position in the stream (a few integers) is the whole state, saved in checkpoints. The order
does not depend on the number of ranks, so a run resumed on another world size continues the
same global sequence of batches. ``Prefetcher`` builds the next steps on a background thread
(into pinned memory on CUDA); its state is that of the steps handed out, not of those built.
"""
from __future__ import annotations

import queue
import threading

import numpy as np
import torch

from loomtrain.data.indexed import IndexedTokens
from loomtrain.errors import ConfigError

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix(x: np.ndarray, key: int) -> np.ndarray:
    """splitmix64 finaliser of ``x ^ key`` (uint64, wrapping): the Feistel round function."""
    with np.errstate(over="ignore"):
        z = x ^ np.uint64(key & 0xFFFFFFFFFFFFFFFF)
        z = (z + np.uint64(0x9E3779B97F4A7C15)) & _M64
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _M64
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _M64
        return z ^ (z >> np.uint64(31))


def permute(x: np.ndarray, n: int, seed: int, rounds: int = 6) -> np.ndarray:
    """A seeded bijection of [0, n) evaluated at ``x`` (any shape): a balanced Feistel network over
    the smallest even number of bits covering n, walking cycles until the value lands below n
    (fewer than 4 walks expected). O(len(x)) time, no state."""
    x = np.asarray(x, dtype=np.uint64)
    if n <= 1:
        return x.astype(np.int64)
    half = max(1, ((int(n - 1).bit_length()) + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    keys = [int(_mix(np.asarray([(seed * 1_000_003 + r) & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64), 0x5EED)[0])
            for r in range(rounds)]

    def once(v):
        left, right = v >> np.uint64(half), v & mask
        for k in keys:
            left, right = right, left ^ (_mix(right, k) & mask)
        return (left << np.uint64(half)) | right

    out = once(x)
    todo = out >= np.uint64(n)
    while todo.any():
        out[todo] = once(out[todo])
        todo = out >= np.uint64(n)
    return out.astype(np.int64)


class ResumableSampler:
    """Global stream of item indices: epoch ``e`` is ``permute(., n, seed + e)``; state = items consumed."""

    def __init__(self, num_items: int, seed: int, shuffle: bool = True):
        self.num_windows = num_items
        self.seed = seed
        self.shuffle = shuffle
        self.consumed = 0

    def at(self, positions: np.ndarray) -> np.ndarray:
        """Item index at global stream positions (stateless)."""
        positions = np.asarray(positions, dtype=np.int64)
        epoch, offset = np.divmod(positions, self.num_windows)
        if not self.shuffle:
            return offset
        out = np.empty_like(offset)
        for e in np.unique(epoch):
            sel = epoch == e
            out[sel] = permute(offset[sel], self.num_windows, self.seed + int(e))
        return out

    def take(self, n: int) -> np.ndarray:
        out = self.at(np.arange(self.consumed, self.consumed + n))
        self.consumed += n
        return out

    @property
    def position(self) -> int:
        return self.consumed

    @position.setter
    def position(self, position: int) -> None:
        self.consumed = position

    def span(self, position: int, n: int) -> tuple[np.ndarray, int]:
        """(the ``n`` items from stream ``position`` on, the position after them): the plans' one call."""
        return self.at(np.arange(position, position + n)), position + n

    def source_tokens(self, seq_len: int) -> dict[str, int]:
        return {}  # one corpus: the step's tokens are all its own (a blend's sampler counts per source)

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "seed": self.seed, "num_windows": self.num_windows}

    def load_state_dict(self, state: dict) -> None:
        if "consumed" not in state:
            raise ValueError("checkpoint: its data position is not a one-corpus windows position (a blend's, "
                             "data.sources, or data.batching=documents'); this run reads one corpus in windows")
        if int(state["num_windows"]) != self.num_windows or int(state["seed"]) != self.seed:
            raise ValueError(f"checkpoint: data sampler state is for {state['num_windows']} items / seed "
                             f"{state['seed']}, this run has {self.num_windows} / {self.seed} (different data?)")
        self.consumed = int(state["consumed"])


class PackedDataset:
    """Fixed windows over a token stream; document boundaries from the index's ``document_indices``
    (so Megatron data preprocessed with ``--split-sentences`` is masked per document, not per sentence)."""

    def __init__(self, prefix: str, seq_len: int):
        self.data = IndexedTokens(prefix)
        self.seq_len = seq_len
        self.num_windows = (len(self.data.tokens) - 1) // seq_len
        if self.num_windows < 1:
            raise ConfigError(f"data.seq_len: {seq_len} is longer than the whole split at '{prefix}' "
                              f"({len(self.data.tokens)} tokens)")

    def __len__(self) -> int:
        return self.num_windows

    def sampler(self, seed: int) -> ResumableSampler:
        """The global order of the windows (``data/blend.py``'s ``BlendedDataset`` answers with a blend's)."""
        return ResumableSampler(len(self), seed)

    def rescaled(self, state: dict) -> dict:
        return rescaled_to_length(state, self)

    def window(self, i: int) -> dict[str, np.ndarray]:
        lo = i * self.seq_len
        toks = np.asarray(self.data.tokens[lo:lo + self.seq_len + 1], dtype=np.int64)
        first, last = self.data.document_of(np.asarray([lo, lo + self.seq_len - 1]))
        starts = self.data.document_start(np.arange(first, last + 1))  # the few documents this window touches
        pos = np.arange(lo, lo + self.seq_len, dtype=np.int64)
        doc = np.searchsorted(starts, pos, side="right") - 1
        position = pos - np.maximum(starts[doc], lo)  # restart at each document and at the window start
        return {"input_ids": toks[:-1], "labels": toks[1:], "position_ids": position, "doc_ids": doc}

    def batch(self, indices) -> dict[str, torch.Tensor]:
        return stacked([self.window(int(i)) for i in indices])


def stacked(windows: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Rows of equal length as one batch of tensors."""
    return {k: torch.from_numpy(np.stack([w[k] for w in windows])) for k in windows[0]}


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
    """``windows``: per step, this data-parallel rank's micro-batches of the next global batch of windows."""

    whole_documents = False

    @classmethod
    def tokens_per_step(cls, exp) -> int:
        return exp.train.global_batch_size * exp.data.seq_len

    @classmethod
    def check(cls, exp) -> None:
        pass

    @classmethod
    def from_experiment(cls, exp, dataset: "PackedDataset", dp_rank: int, dp_size: int) -> "TrainBatches":
        t = exp.train
        return cls(dataset, t.seed, t.global_batch_size, t.micro_batch_size, dp_rank, dp_size)

    def __init__(self, dataset: PackedDataset, seed: int, global_batch: int, micro_batch: int, dp_rank: int,
                 dp_size: int):
        self.local_batch, micro_batch = batch_layout(global_batch, micro_batch, dp_size)
        self.dataset, self.global_batch, self.micro_batch = dataset, global_batch, micro_batch
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.sampler = dataset.sampler(seed)  # one corpus's window order, or a blend's (data/blend.py)

    @property
    def accumulation_steps(self) -> int:
        return self.local_batch // self.micro_batch

    @property
    def position(self):
        return self.sampler.position

    def build(self, position):
        """(this rank's micro-batches of the step starting at stream ``position``, the next position)."""
        indices, nxt = self.sampler.span(position, self.global_batch)
        mine = indices[self.dp_rank * self.local_batch:(self.dp_rank + 1) * self.local_batch]
        micro = [self.dataset.batch(mine[i:i + self.micro_batch]) for i in range(0, len(mine), self.micro_batch)]
        return without_single_document_ids(micro), nxt

    def advance(self, position) -> None:
        self.sampler.position = position

    def source_tokens(self) -> dict[str, int]:
        """Tokens drawn so far from each source of a blend (``tokens/<name>`` in metrics); {} for one corpus."""
        return self.sampler.source_tokens(self.dataset.seq_len)

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        micro, nxt = self.build(self.position)
        self.advance(nxt)
        return micro

    def state_dict(self) -> dict:
        return self.sampler.state_dict() | {"seq_len": self.dataset.seq_len}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(self.dataset.rescaled(state))


def rescaled_to_length(state: dict, dataset: "PackedDataset") -> dict:
    """A windows position saved at another ``data.seq_len`` (the previous stage of a context extension), moved to
    this length's windows of the same data: the same number of tokens consumed, so the same fraction of the epoch
    (the order of the new windows is another permutation: the rest of that epoch may repeat or skip some tokens;
    ``data.batching: documents`` keeps the exact position). A position of other data still fails the check."""
    old_len = int(state.get("seq_len", dataset.seq_len))
    if old_len == dataset.seq_len or "consumed" not in state:
        return state
    tokens = len(dataset.data.tokens) - 1
    if int(state["num_windows"]) != tokens // old_len:
        return state  # not this data at another length: the sampler's check says so
    return state | {"num_windows": len(dataset), "seq_len": dataset.seq_len,
                    "consumed": -(-int(state["consumed"]) * old_len // dataset.seq_len)}


# ----------------------------------------------------------------------------- documents
class DocumentStream:
    """Whole documents of a split in the seeded global order, cut into pieces of at most ``max_tokens``
    predicted tokens. A document of D stored tokens (EOS included) predicts D - 1 of them; one that
    predicts nothing is skipped. Position = (documents started, pieces of the current one taken)."""

    def __init__(self, data: IndexedTokens, seed: int, max_tokens: int):
        self.data, self.max_tokens = data, max_tokens
        self.order = ResumableSampler(data.num_documents, seed)
        if data.num_documents < 1:
            raise ConfigError("data.batching: documents needs at least one document")

    BLOCK = 256  # documents looked up at once

    def _documents(self, doc_pos: int):
        """(stream position, token start, token end) of the documents from ``doc_pos`` on."""
        while True:
            positions = np.arange(doc_pos, doc_pos + self.BLOCK)
            ids = self.order.at(positions)
            starts = self.data.document_start(ids)
            ends = self.data.document_start(ids + 1)
            yield from zip(positions.tolist(), starts.tolist(), ends.tolist())
            doc_pos += self.BLOCK

    def pieces(self, position: tuple[int, int], budget: int):
        """(pieces [(token start, length)], next position): pieces in order while their lengths fit in
        ``budget`` (at least one piece, so a budget below max_tokens still advances)."""
        doc_pos, piece = position
        out, used, empty_run = [], 0, 0
        for doc_pos, start, end in self._documents(doc_pos):
            predicted = end - start - 1
            if predicted <= 0:
                empty_run += 1
                if empty_run >= 2 * self.data.num_documents:  # a whole epoch of them (runs may span two)
                    raise ConfigError("data.batching: documents: every document is empty")
                piece = 0
                continue
            empty_run = 0
            n_pieces = -(-predicted // self.max_tokens)
            while piece < n_pieces:
                lo = piece * self.max_tokens
                length = min(self.max_tokens, predicted - lo)
                if out and used + length > budget:
                    return out, (doc_pos, piece)
                out.append((start + lo, length))
                used += length
                piece += 1
            piece = 0


def _balanced_shares(lengths: list[int], parts: int) -> list[list[int]]:
    """Longest-first greedy: each sequence to the part with the fewest tokens so far (ties: lowest part)."""
    shares, load = [[] for _ in range(parts)], [0] * parts
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        p = min(range(parts), key=lambda p: (load[p], p))
        shares[p].append(i)
        load[p] += lengths[i]
    return shares


def _pack_rows(lengths: list[int], items: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing into rows of ``capacity`` tokens."""
    rows, free = [], []
    for i in sorted(items, key=lambda i: (-lengths[i], i)):
        for r, f in enumerate(free):
            if lengths[i] <= f:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(capacity - lengths[i])
    return rows


class DocumentPosition:
    """The resumable position of a plan over a ``DocumentStream`` (``self.data``, ``seed``, ``budget``)."""

    _position = (0, 0)

    @property
    def position(self):
        return self._position

    def advance(self, position) -> None:
        self._position = tuple(position)

    def state_dict(self) -> dict:
        return {"documents_started": self._position[0], "piece": self._position[1], "seed": self.seed,
                "num_documents": self.data.num_documents, "budget": self.budget}

    def load_state_dict(self, state: dict) -> None:
        if "documents_started" not in state:
            raise ValueError("checkpoint: its data position is for data.batching=windows, this run uses documents")
        if int(state["num_documents"]) != self.data.num_documents or int(state["seed"]) != self.seed:
            raise ValueError(f"checkpoint: data state is for {state['num_documents']} documents / seed "
                             f"{state['seed']}, this run has {self.data.num_documents} / {self.seed} (different data?)")
        self._position = (int(state["documents_started"]), int(state["piece"]))


def document_row(tokens, pieces, length: int) -> dict[str, np.ndarray]:
    """One row of ``length`` tokens holding ``pieces`` ((start, predicted tokens) pairs) one after another:
    positions restart per piece, each piece is its own document, the padding after them another one (no
    labels, small positions: inside the RoPE table)."""
    row = {"input_ids": np.zeros(length, np.int64), "labels": np.full(length, -100, np.int64),
           "position_ids": np.zeros(length, np.int64), "doc_ids": np.zeros(length, np.int64)}
    at = 0
    for k, (start, n) in enumerate(pieces):
        toks = np.asarray(tokens[start:start + n + 1], dtype=np.int64)
        row["input_ids"][at:at + n] = toks[:-1]
        row["labels"][at:at + n] = toks[1:]
        row["position_ids"][at:at + n] = np.arange(n)
        row["doc_ids"][at:at + n] = k
        at += n
    row["doc_ids"][at:] = len(pieces)
    row["position_ids"][at:] = np.arange(length - at)
    return row


class DocumentBatches(DocumentPosition):
    """``documents``: per step, whole documents up to ``global_batch_tokens``; this rank's share packed
    into rows of ``seq_len`` and split into micro-batches of ``micro_batch`` rows (0: one micro-batch).
    Every rank holds the same number of rows (padding rows are unlabelled), so collectives line up."""

    whole_documents = True

    @classmethod
    def tokens_per_step(cls, exp) -> int:
        return exp.train.global_batch_tokens  # the budget (the documents' tokens are at most this)

    @classmethod
    def check(cls, exp) -> None:
        budget, max_doc = exp.train.global_batch_tokens, exp.data.max_doc_tokens or exp.data.seq_len
        if budget <= 0:
            raise ConfigError("train.global_batch_tokens: data.batching=documents needs a token budget per step (> 0)")
        if budget < max_doc:
            raise ConfigError(f"train.global_batch_tokens: {budget} must be >= data.max_doc_tokens ({max_doc})")

    @classmethod
    def from_experiment(cls, exp, dataset: "PackedDataset", dp_rank: int, dp_size: int) -> "DocumentBatches":
        t, d = exp.train, exp.data
        return cls(dataset.data, t.seed, t.global_batch_tokens, d.max_doc_tokens or d.seq_len, d.seq_len,
                   t.micro_batch_size, dp_rank, dp_size)

    def __init__(self, data: IndexedTokens, seed: int, global_batch_tokens: int, max_doc_tokens: int, seq_len: int,
                 micro_batch: int, dp_rank: int, dp_size: int):
        self.data, self.budget, self.seq_len = data, global_batch_tokens, seq_len
        self.micro_batch, self.dp_rank, self.dp_size = micro_batch, dp_rank, dp_size
        self.stream = DocumentStream(data, seed, max_doc_tokens)
        self.seed = seed

    @property
    def accumulation_steps(self) -> int:  # varies per step; the trainer does not rely on it
        return 1

    def step_lengths(self, position=None) -> list[int]:
        """The sequence lengths (predicted tokens) of the step at ``position`` (default: the next one)."""
        pieces, _ = self.stream.pieces(self._position if position is None else position, self.budget)
        return [n for _, n in pieces]

    def _row(self, pieces) -> dict[str, np.ndarray]:
        return document_row(self.data.tokens, pieces, self.seq_len)

    def build(self, position) -> tuple[list[dict[str, torch.Tensor]], tuple[int, int]]:
        pieces, nxt = self.stream.pieces(position, self.budget)
        lengths = [n for _, n in pieces]
        shares = _balanced_shares(lengths, self.dp_size)
        rows_per_rank = [_pack_rows(lengths, share, self.seq_len) for share in shares]
        n_rows = max(len(r) for r in rows_per_rank)
        micro = self.micro_batch or n_rows
        n_rows = -(-n_rows // micro) * micro  # every rank: the same number of equally sized micro-batches
        mine = rows_per_rank[self.dp_rank]
        rows = [self._row([pieces[i] for i in row]) for row in mine] + [self._row([])] * (n_rows - len(mine))
        batches = [{k: torch.from_numpy(np.stack([r[k] for r in rows[i:i + micro]])) for k in rows[0]}
                   for i in range(0, n_rows, micro)]
        return without_single_document_ids(batches), nxt

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        micro, nxt = self.build(self._position)
        self.advance(nxt)
        return micro


# ----------------------------------------------------------------------------- prefetch
class Prefetcher:
    """Builds the next ``depth`` steps of a batch plan on a background thread.

    The plan's ``build(position) -> (batches, next position)`` is pure, so the thread works from its
    own cursor while ``state_dict`` reports the position after the last step *handed out*: a
    checkpoint resumes exactly where training was. ``layout(batch) -> batch``, when given, runs on each
    micro-batch there too (host work the consumer would otherwise do in its step, e.g. reordering rows). On
    CUDA batches are pinned, so the step's ``.to(device, non_blocking=True)`` overlaps the copy with compute.
    """

    def __init__(self, plan, depth: int = 2, pin_memory: bool = False, layout=None):
        self.plan, self.depth, self.pin, self.layout = plan, depth, pin_memory, layout
        self._thread = None
        self._start()

    @property
    def micro_batch(self):
        return self.plan.micro_batch

    @property
    def accumulation_steps(self):
        return self.plan.accumulation_steps

    def _start(self) -> None:
        self._queue = queue.Queue(maxsize=self.depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(self.plan.position,), daemon=True,
                                        name="loomtrain-prefetch")
        self._thread.start()

    def _put(self, item) -> None:
        """Queue ``item`` unless the consumer is closing us (never block past a stop)."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _run(self, position) -> None:
        try:
            while not self._stop.is_set():
                batches, nxt = self.plan.build(position)
                if self.layout is not None:
                    batches = [self.layout(b) for b in batches]
                if self.pin:
                    batches = [{k: v.pin_memory() for k, v in b.items()} for b in batches]
                self._put((batches, nxt, None))
                position = nxt
        except BaseException as e:  # handed to the training thread, which raises it
            self._put((None, None, e))

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        batches, nxt, error = self._queue.get()
        if error is not None:
            raise error
        self.plan.advance(nxt)
        return batches

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def state_dict(self) -> dict:
        return self.plan.state_dict()

    def source_tokens(self) -> dict[str, int]:
        """The plan's per-source token counts at the steps handed out (a blend's; {} otherwise)."""
        return getattr(self.plan, "source_tokens", dict)()

    def load_state_dict(self, state: dict) -> None:
        self.close()
        self.plan.load_state_dict(state)
        self._start()


def build_batch_plan(exp, dataset: PackedDataset, dp_rank: int, dp_size: int):
    """The ``data.batching`` plan for this data-parallel rank (checked by ``trainer/checks.py``)."""
    from loomtrain.data.batching import BATCHINGS

    return BATCHINGS.get(exp.data.batching).from_experiment(exp, dataset, dp_rank, dp_size)


def eval_batches(dataset: PackedDataset, num_batches: int, micro_batch: int, dp_rank: int, dp_size: int):
    """Fixed validation batches: the first windows of the split, in order, dealt round-robin to dp ranks."""
    total = num_batches * micro_batch * dp_size
    indices = np.arange(total) % len(dataset)
    mine = indices.reshape(num_batches, dp_size, micro_batch)[:, dp_rank]
    return [without_single_document_ids([dataset.batch(row)])[0] for row in mine]


def without_single_document_ids(batches: list[dict]) -> list[dict]:
    """A step's micro-batches without ``doc_ids`` when every row of every one of them is one document: the
    model then runs plain causal attention. Decided here, on the host, so no forward waits on the device to
    learn it (and every micro-batch of a step keeps the same keys, as pipeline schedules need). Whole rows
    only: every context-parallel rank of a row must make the same choice (its shard alone cannot tell)."""
    if all("doc_ids" not in b or bool((b["doc_ids"][:, -1] == b["doc_ids"][:, 0]).all()) for b in batches):
        return [{k: v for k, v in b.items() if k != "doc_ids"} for b in batches]
    return batches
