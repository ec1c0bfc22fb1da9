"""Atomic file writes: readers see the old file or the whole new one, never a torn one."""
from __future__ import annotations

import os
import tempfile


def atomic_write_text(path: str, text: str) -> None:
    _atomic_write(path, text, "w")


def atomic_write_bytes(path: str, data: bytes) -> None:
    _atomic_write(path, data, "wb")


def _atomic_write(path: str, content, mode: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-")
    try:
        with os.fdopen(fd, mode) as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
