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
        named = _eos_token(os.path.join(os.path.dirname(self.name), "tokenizer_config.json"))
        ids = [self._tok.token_to_id(n) for n in ((named,) if named else ()) + self.EOS_NAMES]
        found = [i for i in ids if i is not None]
        self.eos_id = found[0] if found else base
        self.vocab_size = max(base, self.eos_id + 1)
        self.bos_ids = self._leading_specials()

    def _leading_specials(self) -> list[int]:
        """The special tokens the tokenizer's post-processor puts before a text: Llama's BOS, none for Qwen2 or
        GPT-2-style tokenizers. Every document starts with them, as the model saw in its pretraining."""
        plain = self._tok.encode("a", add_special_tokens=False).ids
        full = self._tok.encode("a", add_special_tokens=True).ids
        for start in range(len(full) - len(plain) + 1):
            if full[start:start + len(plain)] == plain:
                return full[:start]
        return []

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.bos_ids + self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])


def _eos_token(config_path: str) -> str | None:
    """``eos_token`` of a ``tokenizer_config.json`` beside the tokenizer (a string or an AddedToken mapping)."""
    import json

    try:
        with open(config_path) as f:
            token = json.load(f).get("eos_token")
    except (OSError, ValueError, AttributeError):
        return None
    return token.get("content") if isinstance(token, dict) else token if isinstance(token, str) else None


def build_tokenizer(spec: str):
    """``byte`` or a path to a Hugging Face ``tokenizer.json``."""
    if spec == "byte":
        return ByteTokenizer()
    if not os.path.isfile(spec):
        raise FileNotFoundError(f"data.tokenizer: '{spec}' is neither 'byte' nor an existing tokenizer.json")
    return HFTokenizer(spec)
