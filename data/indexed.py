"""Token files in Megatron's IndexedDataset format (``.bin`` tokens + ``.idx`` index).

Written with megatron-core's ``IndexedDatasetBuilder`` when it is installed, so files
are exactly what Megatron reads; a built-in writer of the same format keeps the base
install (and a first run) free of megatron-core's heavy import. Read with a numpy
memory map: trainers open the files without importing megatron-core at all.

``.idx`` layout (little endian): ``b"MMIDIDX\\0\\0"``, version u64 = 1, dtype code u8,
sequence count u64, document count u64, int32 sequence lengths, int64 byte pointers,
int64 document indices.
"""
from __future__ import annotations

import os
import struct
from typing import Iterable

import numpy as np

HEADER = b"MMIDIDX\x00\x00"
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
               8: np.uint16}
CODE_OF = {np.dtype(v): k for k, v in DTYPE_CODES.items()}


def token_dtype(vocab_size: int) -> type:
    return np.uint16 if vocab_size < 65500 else np.int32


class IndexedTokens:
    """Read-only, memory-mapped view of ``prefix.bin`` / ``prefix.idx``."""

    def __init__(self, prefix: str):
        idx_path, bin_path = prefix + ".idx", prefix + ".bin"
        for p in (idx_path, bin_path):
            if not os.path.isfile(p):
                raise FileNotFoundError(f"data.prepared: '{p}' does not exist (run 'loomtrain data prepare')")
        with open(idx_path, "rb") as f:
            if f.read(9) != HEADER:
                raise ValueError(f"data.prepared: '{idx_path}' is not a Megatron IndexedDataset index")
            (version,) = struct.unpack("<Q", f.read(8))
            (code,) = struct.unpack("<B", f.read(1))
            seq_count, doc_count = struct.unpack("<QQ", f.read(16))
            offset = f.tell()
        if version != 1 or code not in DTYPE_CODES:
            raise ValueError(f"data.prepared: '{idx_path}' has unsupported version {version} or dtype code {code}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        idx = np.memmap(idx_path, mode="r", order="C")
        self.sequence_lengths = np.frombuffer(idx, np.int32, seq_count, offset)
        self.sequence_pointers = np.frombuffer(idx, np.int64, seq_count, offset + 4 * seq_count)
        self.document_indices = np.frombuffer(idx, np.int64, doc_count, offset + 12 * seq_count)
        self.tokens = np.memmap(bin_path, mode="r", dtype=self.dtype, order="C")

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(self.sequence_pointers[i]) // self.dtype.itemsize
        return self.tokens[start:start + int(self.sequence_lengths[i])]

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))

    @property
    def sequence_starts(self) -> np.ndarray:
        """Token offset of every sequence in the concatenated ``.bin`` stream."""
        return self.sequence_pointers // self.dtype.itemsize


def _write_builtin(bin_path: str, idx_path: str, docs: Iterable[np.ndarray], dtype) -> None:
    lengths = []
    with open(bin_path, "wb") as f:
        for doc in docs:
            f.write(np.asarray(doc, dtype=dtype).tobytes(order="C"))
            lengths.append(len(doc))
    lengths = np.asarray(lengths, dtype=np.int64)
    pointers = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1] * np.dtype(dtype).itemsize, out=pointers[1:])
    with open(idx_path, "wb") as f:
        f.write(HEADER + struct.pack("<Q", 1) + struct.pack("<B", CODE_OF[np.dtype(dtype)]))
        f.write(struct.pack("<QQ", len(lengths), len(lengths) + 1))
        f.write(lengths.astype(np.int32).tobytes())
        f.write(pointers.tobytes())
        f.write(np.arange(len(lengths) + 1, dtype=np.int64).tobytes())


def _write_megatron(bin_path: str, idx_path: str, docs: Iterable[np.ndarray], dtype) -> None:
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(bin_path, dtype=dtype)
    for doc in docs:
        builder.add_document(torch.from_numpy(np.asarray(doc, dtype=np.int64)), [len(doc)])
    builder.finalize(idx_path)


def megatron_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("megatron") is not None and importlib.util.find_spec("megatron.core") is not None


def write_indexed(prefix: str, docs: Iterable[np.ndarray], dtype, writer: str = "auto") -> str:
    """Write one document per sequence; atomic: both files appear together or not at all.

    ``writer`` is ``auto`` (megatron-core when installed), ``megatron`` or ``builtin``.
    Returns the writer used.
    """
    if writer == "auto":
        writer = "megatron" if megatron_available() else "builtin"
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    tmp = f"{prefix}.tmp-{os.getpid()}"
    try:
        (_write_megatron if writer == "megatron" else _write_builtin)(tmp + ".bin", tmp + ".idx", docs, dtype)
        if os.path.exists(prefix + ".idx"):
            os.unlink(prefix + ".idx")  # never pair an old index with a new .bin
        os.replace(tmp + ".bin", prefix + ".bin")
        os.replace(tmp + ".idx", prefix + ".idx")  # the index last: readers look for it
    finally:
        for ext in (".bin", ".idx"):
            if os.path.exists(tmp + ext):
                os.unlink(tmp + ext)
    return writer
