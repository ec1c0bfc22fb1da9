"""Corpus readers: yield ``(name, text)`` documents in a deterministic order.

The default corpus is the running interpreter's own standard library source: real text
no one here wrote, present on every machine, with long-tail document lengths.
"""
from __future__ import annotations

import fnmatch
import json
import os
import sysconfig
from typing import Iterator


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
            raise FileNotFoundError(f"data.corpus: folder '{spec}' holds no files matching data.file_glob ({file_glob})")
        return files
    if os.path.isfile(path):
        return [path]
    raise FileNotFoundError(f"data.corpus: '{spec}' is not 'stdlib', an existing file, or a folder")


def read_documents(spec: str, file_glob: str = "*.txt", jsonl_key: str = "text",
                   max_documents: int = 0) -> Iterator[tuple[str, str]]:
    """Documents of a corpus: one per file, or one per line of a ``.jsonl`` file."""
    count = 0
    for path in corpus_files(spec, file_glob):
        if path.endswith(".jsonl"):
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        text = json.loads(line)[jsonl_key]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise ValueError(f"data.corpus: {path}:{lineno} is not a JSON object with key "
                                         f"'{jsonl_key}' (set data.jsonl_key)") from None
                    yield f"{path}:{lineno}", str(text)
                    count += 1
                    if max_documents and count >= max_documents:
                        return
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        if text:
            yield path, text
            count += 1
            if max_documents and count >= max_documents:
                return
