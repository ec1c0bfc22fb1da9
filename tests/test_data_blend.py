"""Data blends (``data.sources``, data/blend.py): Megatron's blending order exactly, deterministic, resumable, the
same on any number of ranks; per-source token counts and validation losses in a real run; bad input refused."""
import json
import os
import sysconfig

import numpy as np
import pytest
import torch

from conftest import TEST_OVERRIDES, run_ranks
from loomtrain.data.blend import BlendedDataset, blend_draws, normalised
from loomtrain.data.loader import PackedDataset, Prefetcher, TrainBatches
from loomtrain.data.prepare import prepare
from loomtrain.trainer.config import DataConfig

STDLIB = sysconfig.get_paths()["stdlib"]
JSON, HTTP = os.path.join(STDLIB, "json"), os.path.join(STDLIB, "http")  # two real folders of text (48 KB, 210 KB)


# ----------------------------------------------------------------------------- the blend's order
def test_draws_are_megatrons_blending_indices():
    """Sources and per-source sample indices equal megatron-core's ``build_blending_indices`` (its C++ helper) for
    assorted weights, zeros included; exact counts for a known case; every prefix close to the weights."""
    from megatron.core.datasets import helpers_cpp

    rng = np.random.default_rng(0)
    cases = [[0.3, 0.7], [1, 2, 7], [5, 0, 1, 3]] + [rng.random(rng.integers(2, 6)).tolist() for _ in range(6)]
    for weights in cases:
        w = normalised(weights)
        n = 2000
        want_src, want_idx = np.zeros(n, np.int16), np.zeros(n, np.int64)
        helpers_cpp.build_blending_indices(want_src, want_idx, w, len(w), n, False)
        sources, within, counts = blend_draws(w, (0,) * len(w), n)
        np.testing.assert_array_equal(sources, want_src)
        np.testing.assert_array_equal(within, want_idx)
        assert counts == tuple(np.bincount(want_src, minlength=len(w)))
        seen = np.cumsum(np.eye(len(w))[sources], axis=0)  # the error-minimising choice keeps every prefix
        assert np.abs(seen - np.outer(np.arange(1, n + 1), w)).max() < 2  # within 2 samples of the weights
    sources, _, counts = blend_draws(normalised([1, 2, 7]), (0, 0, 0), 1000)
    assert counts == (100, 200, 700)
    np.testing.assert_array_equal(blend_draws(normalised([0.3, 0.7]), (0, 0), 10)[0], [1, 0, 1, 1, 0, 1, 1, 0, 1, 1])


def test_draws_continue_from_counts():
    """The counts are the whole position: drawing from the counts after k samples gives the rest of the stream."""
    w = normalised([2, 1, 1])
    whole, within, _ = blend_draws(w, (0, 0, 0), 300)
    first, _, counts = blend_draws(w, (0, 0, 0), 123)
    rest, rest_within, _ = blend_draws(w, counts, 177)
    np.testing.assert_array_equal(np.concatenate([first, rest]), whole)
    np.testing.assert_array_equal(rest_within, within[123:])


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    """The json and http packages' sources, prepared as a blend's sources are (byte tokens), as PackedDatasets."""
    out = tmp_path_factory.mktemp("blend")
    sets = {}
    for name, folder in (("json", JSON), ("http", HTTP)):
        prepared = prepare(DataConfig(corpus=folder, valid_fraction=0.05, workers=1), out_prefix=str(out / name))
        sets[name] = PackedDataset(prepared.train_prefix, 32)
    return sets


def _rows(plan, steps):
    return [torch.cat([b["input_ids"] for b in plan.next_step()]) for _ in range(steps)]


def test_blend_takes_each_source_in_proportion_and_the_same_on_any_number_of_ranks(two_sources):
    blend = BlendedDataset(two_sources, normalised([1, 3]))
    ref = TrainBatches(blend, 7, 16, 4, 0, 1)
    rows = _rows(ref, 4)
    assert ref.position == (16, 48) and ref.source_tokens() == {"json": 16 * 32, "http": 48 * 32}
    # each row is the window the blend names: source by Megatron's order, window by that source's own order
    sources, _, _ = blend_draws(normalised([1, 3]), (0, 0), 64)
    pairs, _ = blend.sampler(7).span((0, 0), 64)
    np.testing.assert_array_equal(pairs[:, 0], sources)
    for row, (s, w) in zip(torch.cat(rows), pairs):
        np.testing.assert_array_equal(row.numpy(), list(two_sources.values())[s].window(int(w))["input_ids"])
    assert _rows(TrainBatches(blend, 7, 16, 4, 0, 1), 4)[3].equal(rows[3])  # deterministic
    assert not _rows(TrainBatches(blend, 8, 16, 4, 0, 1), 1)[0].equal(rows[0])  # the seed matters
    for dp in (2, 4):
        parts = [_rows(TrainBatches(blend, 7, 16, 0, r, dp), 4) for r in range(dp)]
        for step in range(4):
            assert torch.cat([p[step] for p in parts]).equal(rows[step]), (dp, step)


def test_a_one_source_blend_is_that_corpus_in_its_plain_order(two_sources):
    alone = BlendedDataset({"http": two_sources["http"]}, [1.0])
    assert all(a.equal(b) for a, b in zip(_rows(TrainBatches(alone, 3, 8, 8, 0, 1), 3),
                                          _rows(TrainBatches(two_sources["http"], 3, 8, 8, 0, 1), 3)))


def test_resume_mid_blend_continues_as_the_uninterrupted_run(two_sources):
    blend = BlendedDataset(two_sources, normalised([2, 1]))
    whole = _rows(TrainBatches(blend, 5, 12, 0, 0, 1), 6)
    first = TrainBatches(blend, 5, 12, 0, 0, 1)
    _rows(first, 2)
    saved = json.loads(json.dumps(first.state_dict()))  # checkpoints keep it as JSON
    assert saved["counts"] == [16, 8] and saved["names"] == ["json", "http"]
    resumed = Prefetcher(TrainBatches(blend, 5, 12, 0, 1, 2), depth=2)  # another world size, prefetching
    other = TrainBatches(blend, 5, 12, 0, 0, 2)
    try:
        resumed.load_state_dict(saved)
        other.load_state_dict(saved)
        for step in range(2, 6):
            assert torch.cat(_rows(other, 1) + _rows(resumed, 1)).equal(whole[step]), step
        assert resumed.source_tokens() == {"json": 48 * 32, "http": 24 * 32}
    finally:
        resumed.close()
    with pytest.raises(ValueError, match="different data"):
        TrainBatches(BlendedDataset(dict(reversed(list(two_sources.items()))), [0.5, 0.5]), 5, 12, 0, 0, 1
                     ).load_state_dict(saved)
    with pytest.raises(ValueError, match="one corpus"):
        TrainBatches(blend, 5, 12, 0, 0, 1).load_state_dict({"consumed": 3, "seed": 5, "num_windows": 9})
    with pytest.raises(ValueError, match="this run reads one corpus"):
        TrainBatches(two_sources["json"], 5, 12, 0, 0, 1).load_state_dict(saved)


# ----------------------------------------------------------------------------- a real run
def _train(rank, overrides, resume=None):
    from loomtrain.launch import train as launch_train
    from loomtrain.trainer.config import load_config

    r = launch_train.run(load_config("tiny", overrides), resume=resume)
    return r.losses, r.val_losses


def _blend_overrides(tmp_path, run="run"):
    sources = f"[{{corpus: {JSON}, weight: 1}}, {{corpus: {HTTP}, weight: 3, name: web}}]"
    return TEST_OVERRIDES + [f"data.sources={sources}", f"data.cache_dir={tmp_path / 'cache'}", "data.workers=1",
                             "data.valid_fraction=0.05", f"train.output_dir={tmp_path / run}", "train.steps=4",
                             "train.eval_every=2", "train.eval_batches=1", "train.log_every=1",
                             "checkpoint.every_steps=2"]


def test_a_blended_run_logs_per_source_tokens_and_validation_losses_and_resumes(tmp_path):
    """4 steps of 8 sequences of 64 tokens on json:http = 1:3: tokens/<name> the Megatron counts x 64, val_loss per
    source and their weighted mean; resumed from step 2, steps 3-4 train on the same batches (same losses)."""
    ov = _blend_overrides(tmp_path)
    losses, val = run_ranks(_train, 0, ov)[0]
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    for r in records:
        _, _, counts = blend_draws(normalised([1, 3]), (0, 0), 8 * r["step"])
        assert (r["tokens/json"], r["tokens/web"]) == (counts[0] * 64, counts[1] * 64)
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [2, 4] and [r["val_loss"] for r in evals] == [val[2], val[4]]
    for r in evals:
        assert r["val_loss/json"] != r["val_loss/web"]
        assert r["val_loss"] == pytest.approx(0.25 * r["val_loss/json"] + 0.75 * r["val_loss/web"], rel=1e-12)
    assert len([d for d in os.listdir(tmp_path / "cache") if d.startswith(("json-", "http-"))]) == 2  # one per source
    resumed, _ = run_ranks(_train, 0, _blend_overrides(tmp_path, "resumed"),
                           str(tmp_path / "run" / "checkpoints" / "step_00000002"))[0]
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert resumed[step] == pytest.approx(losses[step], rel=1e-6), step


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("sources, extra, message", [
    ("[{corpus: JSON, weight: 1}, {corpus: HTTP, weight: -1}]", [], "data.sources[1].weight: must be >= 0, got -1"),
    ("[{corpus: JSON, weight: 0}, {corpus: HTTP, weight: 0}]", [], "data.sources: the weights sum to 0"),
    ("[{corpus: JSON}, {corpus: MISSING}]", [], "data.sources[1].corpus: 'MISSING' is not 'stdlib', an existing"),
    ("[{corpus: JSON}, {prepared: MISSING}]", [], "data.sources[1].prepared: neither 'MISSING.json'"),
    ("[]", [], "data.sources: expected a non-empty list of mappings, got []"),
    ("[{corpus: JSON, prepared: HTTP}]", [], "data.sources[0]: give exactly one of corpus"),
    ("[{corpus: JSON}, {corpus: HTTP}]", ["data.corpus=HTTP"], "data.corpus: not used with data.sources"),
    ("[{corpus: JSON}, {corpus: JSON}]", [], "data.sources[1].name: 'json' is already data.sources[0]'s name"),
    ("[{corpus: JSON}]", ["data.batching=documents"], "data.batching: data.sources blends windows"),
], ids=["negative", "zero-sum", "missing-corpus", "missing-prefix", "empty", "both", "contradicts", "names",
        "documents"])
def test_bad_blends_are_one_line_exit_2_and_nothing_written(sources, extra, message, tmp_path, capsys):
    from loomtrain.launch.cli import main

    def real(text):
        return text.replace("MISSING", str(tmp_path / "missing")).replace("JSON", JSON).replace("HTTP", HTTP)

    args = ["train", "--set", f"data.sources={real(sources)}", "--set", f"data.cache_dir={tmp_path / 'cache'}",
            "--set", f"train.output_dir={tmp_path / 'run'}"]
    for e in extra:
        args += ["--set", real(e)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {real(message)}") and "\n" not in err, err
    assert os.listdir(tmp_path) == []  # no cache, no run directory
