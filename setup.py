"""Installs the repository's code folders as one package, ``loomtrain``.

Each top-level folder maps to a subpackage (``parallel/`` -> ``loomtrain.parallel``)
so nothing generic such as ``data`` or ``launch`` lands in site-packages.
"""
import os

from setuptools import setup

SUBPACKAGES = ["trainer", "parallel", "comms", "faulttol", "data", "launch", "configs"]

setup(
    name="loomtrain",
    version="0.1.0",
    description="Distributed training for large-scale and long-context LLM pretraining",
    python_requires=">=3.10",
    packages=["loomtrain"] + [f"loomtrain.{d.replace(os.sep, '.')}" for p in SUBPACKAGES for d, _, files in os.walk(p)
                              if "__init__.py" in files],  # each folder's subfolders too (parallel/cp, ...)
    package_dir={"loomtrain": "loomtrain", **{f"loomtrain.{p}": p for p in SUBPACKAGES}},
    package_data={"loomtrain.configs": ["*.yaml"]},
    include_package_data=True,
    # torch 2.7: pipeline schedules' scale_grads switch (the per-token loss scales itself); the CI tests 2.13.
    install_requires=["torch>=2.7", "numpy", "pyyaml", "tqdm", "filelock"],
    extras_require={
        "dev": ["pytest", "pytest-timeout", "deepspeed", "megatron-core", "wandb", "scipy", "tokenizers", "hypothesis",
                "transformers", "safetensors", "pyarrow", "pyeclib", "matplotlib"],
        "data": ["pyarrow", "tokenizers", "safetensors"],  # Parquet corpora, tokenizer.json, model.init_from
        # No "gpu" extra: flash-attn is a source package whose build imports torch (it needs
        # --no-build-isolation, which an extra cannot pass). docs/gpu.md says how to install it; torch's own
        # cuDNN and flash kernels serve without it.
        "ec": ["pyeclib"],  # ISA-L's erasure-code kernels (bundled in its wheel) for CPU snapshots
        "bench": ["matplotlib"],  # the plots of scripts/bench_*.py
    },
    entry_points={"console_scripts": ["loomtrain=loomtrain.launch.cli:main"]},
)
