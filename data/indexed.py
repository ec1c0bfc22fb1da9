"""Token files in Megatron's IndexedDataset format (``.bin`` tokens + ``.idx`` index).

Written by a streaming built-in writer whose files are byte-identical to megatron-core's
``IndexedDatasetBuilder`` (tested against it), with memory that does not grow with the corpus;
megatron-core's builder can be chosen instead. Read with a numpy memory map: trainers open
the files without importing megatron-core at all.

``.idx`` layout (little endian): ``b"MMIDIDX\\0\\0"``, version u64 = 1, dtype code u8,
sequence count u64, document count u64, int32 sequence lengths, int64 byte pointers,
int64 document indices.
"""
from __future__ import annotations

import bisect
import os
import struct
from typing import Iterable

import numpy as np

from loomtrain.errors import ConfigError

HEADER = b"MMIDIDX\x00\x00"
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
               8: np.uint16}
CODE_OF = {np.dtype(v): k for k, v in DTYPE_CODES.items()}


def token_dtype(vocab_size: int) -> type:
    return np.uint16 if vocab_size < 65500 else np.int32


class IndexedTokens:
    """Read-only, memory-mapped view of ``prefix.bin`` / ``prefix.idx`` (ours or Megatron-LM's).

    Nothing is copied into memory: lengths, pointers and document indices are views of the
    mapped index, so opening a multi-terabyte dataset costs a few pages. The files are checked
    against each other on open (sizes, last pointer), so a truncated or mismatched pair is an
    error naming the file, not garbage tokens.
    """

    def __init__(self, prefix: str, field: str = "data.prepared"):
        idx_path, bin_path = prefix + ".idx", prefix + ".bin"
        for p in (idx_path, bin_path):
            if not os.path.isfile(p):
                raise ConfigError(f"{field}: '{p}' does not exist (run 'loomtrain data prepare')")
        with open(idx_path, "rb") as f:
            head = f.read(34)
        if len(head) < 34 or head[:9] != HEADER:
            raise ConfigError(f"{field}: '{idx_path}' is not a Megatron IndexedDataset index")
        (version,) = struct.unpack("<Q", head[9:17])
        (code,) = struct.unpack("<B", head[17:18])
        seq_count, doc_count = struct.unpack("<QQ", head[18:34])
        if version != 1 or code not in DTYPE_CODES:
            raise ConfigError(f"{field}: '{idx_path}' has unsupported version {version} or dtype code {code}")
        offset = 34
        expected = offset + 12 * seq_count + 8 * doc_count
        if os.path.getsize(idx_path) != expected or doc_count < 1:
            raise ConfigError(f"{field}: '{idx_path}' is corrupt: {os.path.getsize(idx_path)} bytes, its header "
                              f"({seq_count} sequences, {doc_count} document indices) needs {expected}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        idx = np.memmap(idx_path, mode="r", order="C")
        self.sequence_lengths = np.frombuffer(idx, np.int32, seq_count, offset)
        self.sequence_pointers = np.frombuffer(idx, np.int64, seq_count, offset + 4 * seq_count)
        self.document_indices = np.frombuffer(idx, np.int64, doc_count, offset + 12 * seq_count)
        data_bytes = (int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * self.dtype.itemsize
                      if seq_count else 0)
        if os.path.getsize(bin_path) != data_bytes or int(self.document_indices[-1]) != seq_count:
            raise ConfigError(f"{field}: '{bin_path}' does not match its index ({os.path.getsize(bin_path)} bytes, "
                              f"the index describes {data_bytes}); the pair is truncated or from different runs")
        self.tokens = np.memmap(bin_path, mode="r", dtype=self.dtype, order="C") if data_bytes else \
            np.zeros(0, self.dtype)

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    def document_start(self, d) -> np.ndarray:
        """Token offset (in the ``.bin`` stream) where document(s) ``d`` begin; ``d == num_documents``: the end.
        Element by element: fancy indexing would copy the unaligned index arrays whole (see ``document_of``)."""
        n_seq, itemsize = len(self.sequence_pointers), self.dtype.itemsize
        out = []
        for doc in np.atleast_1d(np.asarray(d, dtype=np.int64)).tolist():
            seq = int(self.document_indices[doc])
            out.append(int(self.sequence_pointers[seq]) // itemsize if seq < n_seq else len(self.tokens))
        return np.asarray(out, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(self.sequence_pointers[i]) // self.dtype.itemsize
        return self.tokens[start:start + int(self.sequence_lengths[i])]

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))

    def document_of(self, token_pos) -> np.ndarray:
        """Index of the document holding each token position: a binary search over the mapped index that
        touches O(log n) pages. (Megatron's 34-byte header leaves the int64 arrays unaligned, and numpy's
        ``searchsorted`` copies an unaligned array whole: 150 MB for 10M documents.)"""
        itemsize = self.dtype.itemsize
        out = []
        for pos in np.atleast_1d(np.asarray(token_pos, dtype=np.int64)).tolist():
            seq = bisect.bisect_right(self.sequence_pointers, pos * itemsize) - 1
            out.append(bisect.bisect_right(self.document_indices, seq) - 1)
        return np.asarray(out, dtype=np.int64)


class IndexedWriter:
    """Streams documents into ``prefix.bin``/``.idx`` with memory that does not grow with the corpus.

    Tokens are appended to a temporary ``.bin`` and sequence lengths to a temporary side file;
    ``finalize`` writes the index from that file in fixed-size chunks, then renames both files
    into place (the index last: readers look for it). Until then nothing under ``prefix`` changes,
    so a writer killed mid-way leaves only ``*.tmp-<pid>*`` files, which no reader takes as data.
    Byte-identical to megatron-core's ``IndexedDatasetBuilder`` (tested).
    """

    CHUNK = 1 << 20  # index entries per write

    def __init__(self, prefix: str, dtype):
        self.prefix, self.dtype = prefix, np.dtype(dtype)
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        self.tmp = f"{prefix}.tmp-{os.getpid()}"
        self._bin = open(self.tmp + ".bin", "wb")
        self._lengths = open(self.tmp + ".len", "wb")  # int32 per sequence
        self._docs = open(self.tmp + ".doc", "wb")  # int64 sequence count at each document end
        self.sequences = 0
        self.documents = 0
        self.tokens = 0

    def add_document(self, tokens: np.ndarray, lengths=None) -> None:
        """One document; ``lengths``: its sentences (Megatron's ``--split-sentences``), default one sequence."""
        tokens = np.asarray(tokens)
        lengths = np.asarray([len(tokens)] if lengths is None else lengths, dtype=np.int64)
        if int(lengths.sum()) != len(tokens):
            raise ValueError(f"sentence lengths sum to {int(lengths.sum())}, the document has {len(tokens)} tokens")
        self._bin.write(tokens.astype(self.dtype, copy=False).tobytes(order="C"))
        self._lengths.write(lengths.astype(np.int32).tobytes())
        self.sequences += len(lengths)
        self.documents += 1
        self.tokens += len(tokens)
        self._docs.write(np.int64(self.sequences).tobytes())

    def add_documents(self, flat: np.ndarray, lengths: np.ndarray) -> None:
        """Many one-sequence documents at once: ``flat`` is their tokens back to back."""
        lengths = np.asarray(lengths, dtype=np.int64)
        self._bin.write(np.asarray(flat).astype(self.dtype, copy=False).tobytes(order="C"))
        self._lengths.write(lengths.astype(np.int32).tobytes())
        ends = self.sequences + np.arange(1, len(lengths) + 1, dtype=np.int64)
        self._docs.write(ends.tobytes())
        self.sequences += len(lengths)
        self.documents += len(lengths)
        self.tokens += int(lengths.sum())

    def _chunks(self, path: str, dtype):
        with open(path, "rb") as f:
            while True:
                buf = f.read(self.CHUNK * np.dtype(dtype).itemsize)
                if not buf:
                    return
                yield np.frombuffer(buf, dtype)

    def finalize(self) -> None:
        for f in (self._bin, self._lengths, self._docs):
            f.close()
        with open(self.tmp + ".idx", "wb") as f:
            f.write(HEADER + struct.pack("<Q", 1) + struct.pack("<B", CODE_OF[self.dtype]))
            f.write(struct.pack("<QQ", self.sequences, self.documents + 1))
            for lengths in self._chunks(self.tmp + ".len", np.int32):
                f.write(lengths.tobytes())
            offset = 0
            for lengths in self._chunks(self.tmp + ".len", np.int32):
                sizes = lengths.astype(np.int64) * self.dtype.itemsize
                pointers = np.empty(len(sizes), dtype=np.int64)
                pointers[0] = offset
                np.cumsum(sizes[:-1], out=pointers[1:])
                pointers[1:] += offset
                offset += int(sizes.sum())
                f.write(pointers.tobytes())
            f.write(np.zeros(1, dtype=np.int64).tobytes())
            for ends in self._chunks(self.tmp + ".doc", np.int64):
                f.write(ends.tobytes())
        os.unlink(self.tmp + ".len")
        os.unlink(self.tmp + ".doc")
        if os.path.exists(self.prefix + ".idx"):
            os.unlink(self.prefix + ".idx")  # never pair an old index with the new .bin
        os.replace(self.tmp + ".bin", self.prefix + ".bin")
        os.replace(self.tmp + ".idx", self.prefix + ".idx")  # the index last: readers look for it

    def abort(self) -> None:
        for f in (self._bin, self._lengths, self._docs):
            f.close()
        remove_partial(self.tmp)


def remove_partial(tmp: str) -> None:
    for ext in (".bin", ".idx", ".len", ".doc"):
        if os.path.exists(tmp + ext):
            os.unlink(tmp + ext)


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


def write_indexed(prefix: str, docs: Iterable[np.ndarray], dtype, writer: str = "builtin") -> str:
    """Write one document per sequence; atomic: both files appear together or not at all.

    ``writer``: ``builtin`` (streaming, bounded memory; ``auto`` means it too) or ``megatron``
    (megatron-core's builder, which keeps every length in Python lists). Returns the writer used.
    """
    if writer == "megatron":
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        tmp = f"{prefix}.tmp-{os.getpid()}"
        try:
            _write_megatron(tmp + ".bin", tmp + ".idx", docs, dtype)
            os.replace(tmp + ".bin", prefix + ".bin")
            os.replace(tmp + ".idx", prefix + ".idx")
        finally:
            remove_partial(tmp)
        return writer
    out = IndexedWriter(prefix, dtype)
    try:
        for doc in docs:
            out.add_document(doc)
        out.finalize()
    except BaseException:
        out.abort()
        raise
    return "builtin"
