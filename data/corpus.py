"""Corpus readers: stream ``(name, text)`` documents in a deterministic order.

The default corpus is the running interpreter's own standard library source: real text
no one here wrote, present on every machine, with long-tail document lengths. A corpus is
also a text file, a folder (files matching ``data.file_glob``), a ``.jsonl`` file (one document
per line) or a Parquet file or folder (the format Hugging Face datasets are distributed in),
read by row groups so memory stays flat. JSONL and Parquet take the text from ``data.text_key``.
"""
from __future__ import annotations

import fnmatch
import json
import os
import sysconfig
from typing import Iterator

from loomtrain.errors import ConfigError


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def _walk(root: str, patterns: list[str], skip_dirs: tuple[str, ...] = ()) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs and not d.startswith("."))
        for f in sorted(filenames):
            if any(fnmatch.fnmatch(f, p) for p in patterns):
                found.append(os.path.join(dirpath, f))
    return found


def corpus_files(spec: str, file_glob: str) -> list[str]:
    """The files a corpus spec names (empty for JSONL, which is one file of many documents)."""
    if spec == "stdlib":
        return _walk(stdlib_root(), ["*.py"], skip_dirs=("site-packages", "__pycache__"))
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        files = _walk(path, [p.strip() for p in file_glob.split(",") if p.strip()])
        if not files:
            raise ConfigError(f"data.corpus: folder '{spec}' holds no files matching data.file_glob ({file_glob})")
        return files
    if os.path.isfile(path):
        return [path]
    raise ConfigError(f"data.corpus: '{spec}' is not 'stdlib', an existing file, or a folder")


def corpus_bytes(spec: str, file_glob: str) -> int:
    """Bytes on disk of the corpus (for progress and ETA)."""
    return sum(os.path.getsize(p) for p in corpus_files(spec, file_glob))


def _json_text(line, where: str, text_key: str) -> str:
    try:
        return str(json.loads(line)[text_key])
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        raise ConfigError(f"data.text_key: {where} is not a JSON object with key '{text_key}'") from None


def _jsonl(path: str, text_key: str) -> Iterator[tuple[str, str]]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                yield f"{path}:{lineno}", _json_text(line, f"{path}:{lineno}", text_key)


def _parquet_file(path: str, text_key: str):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(f"data.corpus: '{path}' is Parquet, which needs pyarrow (pip install 'loomtrain[data]')") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a damaged file
        raise ConfigError(f"data.corpus: '{path}' is not a readable Parquet file ({e})") from None
    if text_key not in pf.schema_arrow.names:
        raise ConfigError(f"data.text_key: '{path}' has no field '{text_key}' (fields: "
                          f"{', '.join(pf.schema_arrow.names)})")
    return pf


def _row_group(pf, group: int, text_key: str) -> list:
    """One Parquet row group's texts (None where a row has none)."""
    return pf.read_row_group(group, columns=[text_key]).column(0).to_pylist()


def _parquet(path: str, text_key: str) -> Iterator[tuple[str, str]]:
    pf = _parquet_file(path, text_key)
    row = 0
    for group in range(pf.num_row_groups):
        for text in _row_group(pf, group, text_key):
            row += 1
            if text:
                yield f"{path}#{row - 1}", str(text)


def _whole_file(path: str) -> Iterator[tuple[str, str]]:
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    if text:
        yield path, text


def read_documents(spec: str, file_glob: str = "*.txt", text_key: str = "text",
                   max_documents: int = 0) -> Iterator[tuple[str, str]]:
    """Documents of a corpus as a stream of ``(name, text)``, one after another (``read_tasks`` cuts the
    corpus for parallel readers instead)."""
    count = 0
    for path in corpus_files(spec, file_glob):
        if path.endswith(".jsonl"):
            docs = _jsonl(path, text_key)
        elif path.endswith(".parquet"):
            docs = _parquet(path, text_key)
        else:
            docs = _whole_file(path)
        for doc in docs:
            yield doc
            count += 1
            if max_documents and count >= max_documents:
                return


# ----------------------------------------------------------------------------- parallel reading
TASK_BYTES = 4 << 20  # corpus bytes per reading task


def read_tasks(spec: str, file_glob: str, text_key: str) -> Iterator[tuple]:
    """The corpus cut into tasks of about ``TASK_BYTES`` that workers read on their own, in corpus order:
    ``("files", paths, bytes)``, ``("jsonl", path, start, end)`` (a byte range; a line belongs to the
    range holding its first byte) or ``("parquet", path, row_group, bytes)``. Parquet schemas are
    checked here, before any work."""
    group, size = [], 0
    for path in corpus_files(spec, file_glob):
        if path.endswith((".jsonl", ".parquet")):
            if group:
                yield ("files", tuple(group), size)
                group, size = [], 0
            if path.endswith(".jsonl"):
                n = os.path.getsize(path)
                for start in range(0, n, TASK_BYTES):
                    yield ("jsonl", path, start, min(n, start + TASK_BYTES))
            else:
                pf = _parquet_file(path, text_key)
                total = max(1, pf.metadata.num_rows)
                for g in range(pf.num_row_groups):
                    rows = pf.metadata.row_group(g).num_rows
                    yield ("parquet", path, g, os.path.getsize(path) * rows // total)
            continue
        group.append(path)
        size += os.path.getsize(path)
        if size >= TASK_BYTES:
            yield ("files", tuple(group), size)
            group, size = [], 0
    if group:
        yield ("files", tuple(group), size)


def check_corpus(spec: str, file_glob: str, text_key: str) -> None:
    """Fail before any file is written: every Parquet file has the field, every JSONL file's first record
    has the key (later bad lines still fail, naming the byte offset, and leave nothing behind)."""
    for path in corpus_files(spec, file_glob):
        if path.endswith(".parquet"):
            _parquet_file(path, text_key)
        elif path.endswith(".jsonl"):
            with open(path, "rb") as f:
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        _json_text(line, f"{path}:{lineno}", text_key)
                        break


def task_bytes(task: tuple) -> int:
    return task[3] - task[2] if task[0] == "jsonl" else task[-1]


def task_texts(task: tuple, text_key: str) -> list[str]:
    """The documents of one task, in order."""
    kind, path = task[0], task[1]
    if kind == "files":
        return [text for p in path for _, text in _whole_file(p)]
    if kind == "parquet":
        return [str(t) for t in _row_group(_parquet_file(path, text_key), task[2], text_key) if t]
    start, end = task[2], task[3]
    texts = []
    with open(path, "rb") as f:
        if start:
            f.seek(start - 1)
            f.readline()  # the line holding byte start-1 belongs to the previous range
        while f.tell() < end:
            at = f.tell()
            line = f.readline()
            if not line:
                break
            if line.strip():
                texts.append(_json_text(line, f"{path} at byte {at}", text_key))
    return texts
