"""Shared test helpers: forked multi-rank runs (no re-import of torch per rank) and a small prepared corpus."""
from __future__ import annotations

import os

import pytest

from loomtrain.launch.forked import free_port, run_ranks, run_ranks_restarting  # noqa: F401  (tests import them from here)

TEST_OVERRIDES = [
    "model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "data.seq_len=64",
    "train.global_batch_size=8", "train.progress=false", "train.eval_every=0", "train.threads=1",
    "optim.warmup_steps=2", "optim.lr=1e-3", "checkpoint.at_end=false",
]


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> str:
    """Prefix of a prepared corpus: 300 stdlib modules, byte tokens (built once per session)."""
    from loomtrain.data.prepare import prepare
    from loomtrain.trainer.config import DataConfig

    out = tmp_path_factory.mktemp("corpus") / "stdlib300"
    cfg = DataConfig(corpus="stdlib", max_documents=300, valid_fraction=0.05)
    prepare(cfg, out_prefix=str(out), writer="builtin")
    return str(out)


@pytest.fixture
def overrides(small_corpus, tmp_path) -> list[str]:
    return TEST_OVERRIDES + [f"data.prepared={small_corpus}", f"train.output_dir={tmp_path / 'run'}"]


def signal_self_after_step(step: int, sig: int) -> None:
    """In a forked rank: deliver ``sig`` to this process right after optimizer step ``step``,
    exercising the trainer's real signal path (finish the step, checkpoint, stop)."""

    from loomtrain.trainer import train as train_mod

    original = train_mod.Trainer.train_step

    def step_then_signal(self):
        out = original(self)
        if self.step + 1 == step:
            os.kill(os.getpid(), sig)
        return out

    train_mod.Trainer.train_step = step_then_signal
