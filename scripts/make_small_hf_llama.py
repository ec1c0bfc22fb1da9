"""A small pretrained Hugging Face Llama, and a corpus of short documents, for the CPU long-context recipe
(``configs/cpu_extend_yarn.yaml``).

Trains the default job's model (3.1M parameters, byte tokens) on the Python standard library at 256 tokens per
sequence with loomtrain, then exports it with ``loomtrain export --hf``: a directory transformers loads, which the
recipe imports with ``model.init_from`` and extends to 2,048 tokens with YaRN. It stands in for a real pretrained
model (a Llama 3 at 8K) that is being extended: it has only seen 256 positions. Also writes the docstrings of the
standard library (module, class and function) as a JSONL corpus of short documents, the recipe's second source.

    python scripts/make_small_hf_llama.py runs/small_llama_hf          # about 3 minutes on 2 cores
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import sys


def write_docstrings(out_path: str) -> int:
    """Every docstring of the standard library's modules, one JSONL document each; the count written."""
    from loomtrain.data.corpus import corpus_files
    from loomtrain.fsutil import atomic_write_text

    lines = []
    for path in corpus_files("stdlib", "*.py"):
        try:
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read())
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 40:
                    lines.append(json.dumps({"text": doc}))
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    atomic_write_text(out_path, "\n".join(lines) + "\n")
    return len(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", help="the Hugging Face directory to write")
    ap.add_argument("--steps", type=int, default=200, help="training steps at 256 tokens (default 200)")
    ap.add_argument("--run-dir", default="runs/small_llama_pretrain", help="where the training run goes")
    ap.add_argument("--docstrings", default="runs/stdlib_docstrings.jsonl",
                    help="where the short-document corpus goes (default runs/stdlib_docstrings.jsonl)")
    args = ap.parse_args()

    from loomtrain.launch.cli import main as cli

    print(f"wrote {write_docstrings(args.docstrings):,} docstrings to {args.docstrings}", flush=True)
    code = cli(["train", "tiny", "--set", f"train.steps={args.steps}", "--set", f"train.output_dir={args.run_dir}",
                "--set", "train.eval_every=0", "--set", "data.seq_len=256", "--set", "model.max_seq_len=256",
                "--set", "checkpoint.at_end=true"])
    if code:
        sys.exit(code)
    checkpoint = os.path.join(args.run_dir, "checkpoints", f"step_{args.steps:08d}")
    sys.exit(cli(["export", checkpoint, "--hf", args.out_dir]))


if __name__ == "__main__":
    main()
