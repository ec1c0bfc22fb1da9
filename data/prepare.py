"""Corpus -> tokenized train/validation IndexedDataset files, cached by what went in.

Each document is stored followed by the tokenizer's end-of-document token, so the
``.bin`` file *is* the packed token stream and document starts come from the index.
A document goes to validation by a seeded draw, so the split does not depend on the
order files are read in.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass

import numpy as np

from loomtrain.data.corpus import corpus_files, read_documents
from loomtrain.data.indexed import token_dtype, write_indexed
from loomtrain.data.tokenizer import build_tokenizer
from loomtrain.fsutil import atomic_write_text

FORMAT_VERSION = 1


@dataclass
class PreparedData:
    train_prefix: str
    valid_prefix: str
    vocab_size: int
    eos_id: int
    meta: dict


def cache_key(data_cfg) -> str:
    """Hash of everything that decides the token files: corpus files (names, sizes, mtimes), tokenizer, split."""
    h = hashlib.sha256()
    files = corpus_files(data_cfg.corpus, data_cfg.file_glob)
    for path in files:
        st = os.stat(path)
        h.update(f"{path}\0{st.st_size}\0{int(st.st_mtime)}\n".encode())
    tok = data_cfg.tokenizer
    if tok != "byte":
        st = os.stat(tok)
        tok = f"{os.path.abspath(tok)}:{st.st_size}:{int(st.st_mtime)}"
    h.update(f"{tok}|{data_cfg.valid_fraction}|{data_cfg.max_documents}|{data_cfg.jsonl_key}|{FORMAT_VERSION}".encode())
    return h.hexdigest()[:16]


def _corpus_label(spec: str) -> str:
    if spec == "stdlib":
        return f"stdlib-py{sys.version_info.major}{sys.version_info.minor}"
    return os.path.basename(os.path.normpath(spec)).replace(".", "_") or "corpus"


def prepare(data_cfg, out_prefix: str | None = None, writer: str = "auto", progress: bool = False) -> PreparedData:
    """Tokenize the corpus into ``<prefix>_train`` and ``<prefix>_valid`` unless already cached."""
    if data_cfg.prepared and out_prefix is None:
        return load_prepared(data_cfg.prepared)
    if out_prefix is None:
        cache = os.path.expanduser(data_cfg.cache_dir)
        out_prefix = os.path.join(cache, f"{_corpus_label(data_cfg.corpus)}-{cache_key(data_cfg)}", "tokens")
    if os.path.isfile(out_prefix + ".json"):
        return load_prepared(out_prefix)

    tokenizer = build_tokenizer(data_cfg.tokenizer)
    dtype = token_dtype(tokenizer.vocab_size)
    docs = list(read_documents(data_cfg.corpus, data_cfg.file_glob, data_cfg.jsonl_key, data_cfg.max_documents))
    if len(docs) < 2:
        raise ValueError(f"data.corpus: '{data_cfg.corpus}' holds {len(docs)} document(s); need at least 2")
    rng = np.random.default_rng(0)
    is_valid = rng.random(len(docs)) < data_cfg.valid_fraction
    if data_cfg.valid_fraction > 0 and not is_valid.any():
        is_valid[-1] = True
    if is_valid.all():
        is_valid[0] = False
    eos = np.asarray([tokenizer.eos_id], dtype=np.int64)
    stats = {"train": [0, 0], "valid": [0, 0]}

    def encoded(split_valid: bool):
        iterator = [(n, t) for (n, t), v in zip(docs, is_valid) if v == split_valid]
        if progress:
            from tqdm import tqdm

            iterator = tqdm(iterator, desc=f"tokenizing {'valid' if split_valid else 'train'}", unit="doc")
        key = "valid" if split_valid else "train"
        for _, text in iterator:
            ids = np.concatenate([tokenizer.encode(text), eos])
            stats[key][0] += 1
            stats[key][1] += len(ids)
            yield ids

    used = write_indexed(out_prefix + "_train", encoded(False), dtype, writer)
    write_indexed(out_prefix + "_valid", encoded(True), dtype, writer)
    meta = {
        "format_version": FORMAT_VERSION, "corpus": data_cfg.corpus, "tokenizer": tokenizer.name,
        "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id, "writer": used,
        "train_documents": stats["train"][0], "train_tokens": stats["train"][1],
        "valid_documents": stats["valid"][0], "valid_tokens": stats["valid"][1],
    }
    atomic_write_text(out_prefix + ".json", json.dumps(meta, indent=2))  # written last: marks the cache complete
    return load_prepared(out_prefix)


def load_prepared(prefix: str) -> PreparedData:
    meta_path = prefix + ".json"
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"data.prepared: '{meta_path}' does not exist (run 'loomtrain data prepare')")
    with open(meta_path) as f:
        meta = json.load(f)
    return PreparedData(prefix + "_train", prefix + "_valid", meta["vocab_size"], meta["eos_id"], meta)
