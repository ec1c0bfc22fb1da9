"""Tokenizers: byte-level by default, a Hugging Face ``tokenizer.json`` when configured."""
from __future__ import annotations

import os

import numpy as np


class ByteTokenizer:
    """UTF-8 bytes are the tokens (0..255); 256 ends a document. Needs no files, knows every text."""

    name = "byte"
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8", errors="replace"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A ``tokenizer.json`` read with the ``tokenizers`` library (optional dependency)."""

    EOS_NAMES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "[SEP]")

    def __init__(self, path: str):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise RuntimeError("data.tokenizer: a tokenizer.json needs the 'tokenizers' package (pip install tokenizers)") from None
        self._tok = Tokenizer.from_file(path)
        self.name = os.path.abspath(path)
        base = self._tok.get_vocab_size(with_added_tokens=True)
        ids = [self._tok.token_to_id(n) for n in self.EOS_NAMES]
        found = [i for i in ids if i is not None]
        self.eos_id = found[0] if found else base
        self.vocab_size = max(base, self.eos_id + 1)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])


def build_tokenizer(spec: str):
    """``byte`` or a path to a Hugging Face ``tokenizer.json``."""
    if spec == "byte":
        return ByteTokenizer()
    if not os.path.isfile(spec):
        raise FileNotFoundError(f"data.tokenizer: '{spec}' is neither 'byte' nor an existing tokenizer.json")
    return HFTokenizer(spec)
