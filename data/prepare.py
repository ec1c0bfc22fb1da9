"""Corpus -> tokenized train/validation IndexedDataset files, cached by what went in.

The corpus is cut into tasks of a few MB (groups of files, byte ranges of a JSONL file, Parquet
row groups); ``data.workers`` processes each read and tokenize a task (a bounded number in flight,
results written in corpus order) and the tokens are appended to the ``.bin``/``.idx`` writers, so
memory does not grow with the corpus and the files do not depend on the worker count. Each document is stored
followed by the tokenizer's end-of-document token, so the ``.bin`` file *is* the packed token
stream and document starts come from the index. A document goes to validation by a seeded
draw in corpus order (the first document always trains; the last validates if nothing else
did), so the split does not depend on the number of workers.

One writer per cache: whoever takes the file lock ``<prefix>.lock`` writes, everyone else
(other ranks, other nodes on a shared filesystem, another job) waits on the lock, not in a
collective, and then reads. ``<prefix>.json`` is written last and marks the cache complete; a
writer that dies leaves only ``*.tmp-<pid>*`` files, removed by the next writer.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from loomtrain.data.corpus import check_corpus, corpus_bytes, corpus_files, read_tasks, task_bytes, task_texts
from loomtrain.data.indexed import IndexedTokens, IndexedWriter, token_dtype, write_indexed
from loomtrain.data.tokenizer import build_tokenizer
from loomtrain.errors import ConfigError
from loomtrain.fsutil import atomic_write_text

FORMAT_VERSION = 4  # 3: the validation split counts tokens, not documents; 4: documents start with the
#   tokenizer's leading special tokens (Llama's BOS)
IN_FLIGHT_PER_WORKER = 2  # tasks queued per worker: bounds memory, keeps workers busy


@dataclass
class PreparedData:
    train_prefix: str
    valid_prefix: str | None
    vocab_size: int
    eos_id: int | None
    meta: dict


def cache_key(data_cfg) -> str:
    """Hash of everything that decides the token files: corpus files (names, sizes, mtimes), tokenizer, split."""
    h = hashlib.sha256()
    files = corpus_files(data_cfg.corpus, data_cfg.file_glob)
    for path in files:
        st = os.stat(path)
        h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\n".encode())
    tok = data_cfg.tokenizer
    if tok != "byte":
        st = os.stat(tok)
        tok = f"{os.path.abspath(tok)}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"
    h.update(f"{tok}|{data_cfg.valid_fraction}|{data_cfg.max_documents}|{data_cfg.text_key}|{FORMAT_VERSION}".encode())
    return h.hexdigest()[:16]


def _corpus_label(spec: str) -> str:
    if spec == "stdlib":
        return f"stdlib-py{sys.version_info.major}{sys.version_info.minor}"
    return os.path.basename(os.path.normpath(spec)).replace(".", "_") or "corpus"


def default_prefix(data_cfg) -> str:
    cache = os.path.expanduser(data_cfg.cache_dir)
    return os.path.join(cache, f"{_corpus_label(data_cfg.corpus)}-{cache_key(data_cfg)}", "tokens")


def prepare(data_cfg, out_prefix: str | None = None, writer: str = "builtin", progress: bool = False,
            workers: int | None = None, on_wait=None, need_valid: bool = False) -> PreparedData:
    """Tokenize the corpus into ``<prefix>_train`` and ``<prefix>_valid`` unless already cached.

    Safe to call from every rank of every node at once: one writes, the rest wait and read.
    ``on_wait(message)`` is told once when this call waits for another writer.
    """
    if data_cfg.prepared and out_prefix is None:
        return load_prepared(data_cfg, need_valid)
    out_prefix = out_prefix or default_prefix(data_cfg)
    if _complete(out_prefix):
        return _load_ours(out_prefix)
    check_corpus(data_cfg.corpus, data_cfg.file_glob, data_cfg.text_key)  # bad input: fail before writing anything
    from filelock import FileLock, Timeout

    os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
    lock = FileLock(out_prefix + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        (on_wait or _print_wait)(f"data: another process is writing {out_prefix}; waiting for it (lock "
                                 f"{out_prefix}.lock)")
        lock.acquire(poll_interval=0.5)
    try:
        if not _complete(out_prefix):  # a writer may have finished while we waited
            _remove_leftovers(out_prefix)
            _write(data_cfg, out_prefix, writer, progress, workers or data_cfg.workers or os.cpu_count() or 1)
    finally:
        if _complete(out_prefix):  # later callers take the fast path above: the lock file has done its job
            with contextlib.suppress(FileNotFoundError):
                os.unlink(out_prefix + ".lock")
        lock.release()
    return _load_ours(out_prefix)


def _print_wait(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _complete(prefix: str) -> bool:
    """The marker exists and both splits' files match their index (a cache a crash left half-written is not)."""
    if not os.path.isfile(prefix + ".json"):
        return False
    try:
        with open(prefix + ".json") as f:
            meta = json.load(f)
        if meta.get("format_version") != FORMAT_VERSION:
            return False
        IndexedTokens(prefix + "_train")
        IndexedTokens(prefix + "_valid")
    except (ValueError, OSError):
        return False
    return True


def _remove_leftovers(prefix: str) -> None:
    """Files of an earlier writer that died (we hold the lock: no writer is alive)."""
    folder, base = os.path.split(os.path.abspath(prefix))
    for name in os.listdir(folder):  # only this prefix's files: a sibling prefix may be another job's
        if name.startswith((base + "_train.tmp-", base + "_valid.tmp-")) or name == base + ".json":
            os.unlink(os.path.join(folder, name))


# ----------------------------------------------------------------------------- tokenizing
_WORKER = None  # (tokenizer, text_key, token dtype) of this process


def _init_worker(spec: str, text_key: str, dtype) -> None:
    global _WORKER
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _WORKER = (build_tokenizer(spec), text_key, np.dtype(dtype))


def _tokenize_task(task) -> tuple[np.ndarray, np.ndarray]:
    """Read one corpus task and tokenize it: (tokens of every document, each followed by EOS, back to back,
    in the file dtype; their lengths). Workers read their own input, so only tokens cross processes."""
    tokenizer, text_key, dtype = _WORKER
    eos = np.asarray([tokenizer.eos_id], dtype=dtype)
    parts, lengths = [], []
    for text in task_texts(task, text_key):
        ids = tokenizer.encode(text).astype(dtype)
        parts += (ids, eos)
        lengths.append(len(ids) + 1)
    return (np.concatenate(parts) if parts else np.zeros(0, dtype)), np.asarray(lengths, dtype=np.int64)


def tokenized_tasks(tasks, init_args: tuple, workers: int):
    """Yield ``(task, tokens, lengths)`` in corpus order; ``workers`` processes read and tokenize, at most
    ``IN_FLIGHT_PER_WORKER`` tasks each in flight (Pool.imap would queue the whole corpus ahead)."""
    if workers <= 1:
        _init_worker(*init_args)
        for task in tasks:
            yield (task, *_tokenize_task(task))
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    # spawn, not fork: the caller may be a trainer with communication threads running (forkserver's
    # server does not survive the fork of a forked rank either); and a worker that dies (say, killed for
    # memory) raises BrokenProcessPool here instead of hanging the writer and everyone waiting on its lock.
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=init_args) as pool:
        pending = deque()
        for task in tasks:
            pending.append((task, pool.submit(_tokenize_task, task)))
            if len(pending) >= workers * IN_FLIGHT_PER_WORKER:
                task_, result = pending.popleft()
                yield (task_, *result.result())
        while pending:
            task_, result = pending.popleft()
            yield (task_, *result.result())


class _Split:
    """Routes whole documents, in corpus order, to train or validation so that validation holds about
    ``valid_fraction`` of the *tokens*. Each document validates on a seeded draw with that probability, which
    does not depend on its length (validation looks like the corpus), but never when that would give
    validation more than twice its share of the tokens seen so far, and always (when it fits) while
    validation holds less than half its share. Large corpora are split by the draws alone; a small one with a
    few long documents no longer gives them 20% of its tokens (or none at all)."""

    def __init__(self, out_prefix: str, dtype, valid_fraction: float):
        self.writers = {"train": IndexedWriter(out_prefix + "_train", dtype),
                        "valid": IndexedWriter(out_prefix + "_valid", dtype)}
        self.valid_fraction = valid_fraction
        self.rng = np.random.default_rng(0)
        self.seen = 0
        self.seen_tokens = self.valid_tokens = 0
        self.pending = None  # the last document, held back: it validates if nothing else did

    def _draws(self, lengths: np.ndarray) -> np.ndarray:
        drawn = self.rng.random(len(lengths)) < self.valid_fraction
        draws = np.zeros(len(lengths), dtype=bool)
        for i, n in enumerate(lengths.tolist()):
            self.seen_tokens += n
            target = self.valid_fraction * self.seen_tokens
            if self.seen == 0 and i == 0:  # the first document always trains
                continue
            fits = self.valid_tokens + n <= 2 * target
            short = self.valid_tokens < target / 2 and self.valid_tokens + n <= target
            if fits and (drawn[i] or short):
                draws[i] = True
                self.valid_tokens += n
        return draws

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        draws = self._draws(lengths)
        ends = np.cumsum(lengths)
        starts = ends - lengths
        for split in ("train", "valid"):
            sel = np.flatnonzero(draws == (split == "valid"))
            if len(lengths):  # the batch's last document waits for the next one
                sel = sel[sel != len(lengths) - 1]
            if len(sel):
                self._flush_pending()
                flat = np.concatenate([tokens[starts[i]:ends[i]] for i in sel])
                self.writers[split].add_documents(flat, lengths[sel])
        if len(lengths):
            self._flush_pending()
            last = len(lengths) - 1
            self.pending = (tokens[starts[last]:ends[last]].copy(), bool(draws[last]))
        self.seen += len(lengths)

    def _flush_pending(self) -> None:
        if self.pending is not None:
            toks, valid = self.pending
            self.writers["valid" if valid else "train"].add_document(toks)
            self.pending = None

    def finish(self) -> None:
        if self.pending is not None:
            toks, valid = self.pending
            needs_valid = self.valid_fraction > 0 and self.writers["valid"].documents == 0
            needs_train = self.writers["train"].documents == 0
            self.writers["valid" if (valid or needs_valid) and not needs_train else "train"].add_document(toks)
            self.pending = None
        for w in self.writers.values():
            w.finalize()

    def abort(self) -> None:
        for w in self.writers.values():
            w.abort()


def _write(data_cfg, out_prefix: str, writer: str, progress: bool, workers: int) -> None:
    tokenizer = build_tokenizer(data_cfg.tokenizer)
    dtype = token_dtype(tokenizer.vocab_size)
    tasks = read_tasks(data_cfg.corpus, data_cfg.file_glob, data_cfg.text_key)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=corpus_bytes(data_cfg.corpus, data_cfg.file_glob), unit="B", unit_scale=True,
                   unit_divisor=1024, desc=f"tokenizing ({workers} worker{'s' * (workers > 1)})", smoothing=0.1)
    start = time.perf_counter()
    split = _Split(out_prefix, dtype, data_cfg.valid_fraction)
    limit = data_cfg.max_documents
    try:
        for task, tokens, lengths in tokenized_tasks(tasks, (data_cfg.tokenizer, data_cfg.text_key, dtype), workers):
            if limit and split.seen + len(lengths) > limit:  # the last task needed, cut to the limit
                lengths = lengths[:limit - split.seen]
                tokens = tokens[:int(lengths.sum())]
            split.add(tokens, lengths)
            if bar is not None:
                bar.update(task_bytes(task))
            if limit and split.seen >= limit:
                break
        if split.seen < 2:
            raise ConfigError(f"data.corpus: '{data_cfg.corpus}' holds {split.seen} document(s); need at least 2")
        split.finish()
    except BaseException:
        split.abort()
        raise
    finally:
        if bar is not None:
            bar.close()
    train, valid = split.writers["train"], split.writers["valid"]
    meta = {
        "format_version": FORMAT_VERSION, "corpus": data_cfg.corpus, "tokenizer": tokenizer.name,
        "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id, "writer": "builtin", "workers": workers,
        "train_documents": train.documents, "train_tokens": train.tokens,
        "valid_documents": valid.documents, "valid_tokens": valid.tokens,
        "seconds": round(time.perf_counter() - start, 3),
    }
    if writer == "megatron":  # rewrite both splits through megatron-core's builder (same bytes; tested)
        for name in ("train", "valid"):
            data = IndexedTokens(f"{out_prefix}_{name}")
            write_indexed(f"{out_prefix}_{name}", (np.array(data[i]) for i in range(len(data))), dtype, "megatron")
        meta["writer"] = "megatron"
    atomic_write_text(out_prefix + ".json", json.dumps(meta, indent=2))  # written last: marks the cache complete


# ----------------------------------------------------------------------------- reading
def _load_ours(prefix: str) -> PreparedData:
    with open(prefix + ".json") as f:
        meta = json.load(f)
    return PreparedData(prefix + "_train", prefix + "_valid", meta["vocab_size"], meta["eos_id"], meta)


def load_prepared(data_cfg, need_valid: bool = False) -> PreparedData:
    """``data.prepared``: loomtrain's prefix (``<prefix>.json`` beside ``_train``/``_valid``) or an existing
    Megatron ``.bin``/``.idx`` pair, read as it is (documents from its ``document_indices``).
    ``need_valid``: evaluation will run, so a validation split must exist."""
    prefix = os.path.expanduser(data_cfg.prepared)
    if os.path.isfile(prefix + ".json"):
        return _load_ours(prefix)
    if not (os.path.isfile(prefix + ".idx") or os.path.isfile(prefix + ".bin")):
        raise ConfigError(f"data.prepared: neither '{prefix}.json' (loomtrain) nor '{prefix}.bin/.idx' (Megatron) "
                          f"exists (run 'loomtrain data prepare')")
    train = IndexedTokens(prefix)
    valid = None
    if data_cfg.valid_prepared:
        valid = os.path.expanduser(data_cfg.valid_prepared)
        IndexedTokens(valid, field="data.valid_prepared")
    elif need_valid:
        raise ConfigError(f"data.valid_prepared: '{prefix}' is a Megatron dataset without a validation split; "
                          f"give one here or set train.eval_every=0")
    if data_cfg.vocab_size:
        vocab, eos, source = data_cfg.vocab_size, None, "data.vocab_size"
    elif data_cfg.tokenizer != "byte":
        tok = build_tokenizer(data_cfg.tokenizer)
        vocab, eos, source = tok.vocab_size, tok.eos_id, data_cfg.tokenizer
    else:
        raise ConfigError(f"data.vocab_size: '{prefix}' is a Megatron dataset; give its vocabulary size "
                          f"(data.vocab_size) or its tokenizer.json (data.tokenizer)")
    meta = {"format": "megatron", "vocab_size": vocab, "vocab_source": source, "eos_id": eos,
            "train_documents": train.num_documents, "train_tokens": len(train.tokens), "train_sequences": len(train)}
    return PreparedData(prefix, valid, vocab, eos, meta)


def data_vocab(data_cfg, need_valid: bool = False) -> tuple[int, str]:
    """(vocabulary size, where it comes from) that training will use, without tokenizing anything: the
    prepared data's (``data.prepared``; ``need_valid`` as in :func:`load_prepared`), else the tokenizer's.
    ConfigError when those files are not here. A blend (``data.sources``): its sources' one vocabulary."""
    if data_cfg.sources:
        from loomtrain.data.blend import check_sources

        return check_sources(data_cfg, need_valid)
    if data_cfg.prepared:
        prepared = load_prepared(data_cfg, need_valid)
        return prepared.vocab_size, prepared.meta.get("vocab_source", data_cfg.prepared)
    try:
        return build_tokenizer(data_cfg.tokenizer).vocab_size, data_cfg.tokenizer
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
