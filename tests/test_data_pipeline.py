"""The data pipeline at scale: streaming parallel preparation, one writer per cache, Megatron data as it is,
Parquet corpora, flat sampler memory, whole-document batches, prefetch."""

import json
import multiprocessing as mp
import os
import signal
import time

import numpy as np
import pytest
import torch

from loomtrain.data.indexed import IndexedTokens, IndexedWriter, write_indexed
from loomtrain.data.loader import (DocumentBatches, PackedDataset, Prefetcher, ResumableSampler, TrainBatches,
                                   permute)
from loomtrain.data.prepare import load_prepared, prepare
from loomtrain.errors import ConfigError
from loomtrain.trainer.config import DataConfig


def _jsonl_corpus(path, n, seed=0):
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "long-context", "token", "ring", "é", "∑"]
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            text = " ".join(rng.choice(words, size=int(rng.integers(1, 30))))
            f.write(json.dumps({"text": f"{i}: {text}", "id": i}) + "\n")
    return str(path)


def _files(prefix):
    return {ext: open(f"{prefix}_{split}.{ext}", "rb").read()
            for split in ("train", "valid") for ext in ("bin", "idx")}


# ----------------------------------------------------------------------------- writing
def test_streaming_writer_is_byte_identical_to_megatron_with_sentences(tmp_path):
    pytest.importorskip("megatron.core")
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(1)
    docs = [(rng.integers(0, 500, size=sum(s)), s) for s in ([3, 4, 5], [7], [1, 1], [9, 2])]
    ours = IndexedWriter(str(tmp_path / "ours"), np.uint16)
    ours.CHUNK = 3  # exercise the chunked index writing
    theirs = IndexedDatasetBuilder(str(tmp_path / "theirs.bin"), dtype=np.uint16)
    for toks, sentences in docs:
        ours.add_document(toks, sentences)
        theirs.add_document(torch.from_numpy(toks.astype(np.int64)), sentences)
    ours.finalize()
    theirs.finalize(str(tmp_path / "theirs.idx"))
    for ext in ("bin", "idx"):
        assert (tmp_path / f"ours.{ext}").read_bytes() == (tmp_path / f"theirs.{ext}").read_bytes()
    assert not list(tmp_path.glob("*.tmp-*"))


def test_prepare_gives_the_same_files_with_1_and_2_workers(tmp_path):
    corpus = _jsonl_corpus(tmp_path / "c.jsonl", 3000)
    cfg = DataConfig(corpus=corpus, valid_fraction=0.1)
    import loomtrain.data.corpus as corpus_mod

    old = corpus_mod.TASK_BYTES
    corpus_mod.TASK_BYTES = 4096  # many byte ranges in flight, split mid-line: results must land in corpus order
    try:
        one = prepare(cfg, out_prefix=str(tmp_path / "w1" / "t"), workers=1)
        two = prepare(cfg, out_prefix=str(tmp_path / "w2" / "t"), workers=2)
    finally:
        corpus_mod.TASK_BYTES = old
    assert _files(tmp_path / "w1" / "t") == _files(tmp_path / "w2" / "t")
    assert one.meta["train_documents"] + one.meta["valid_documents"] == 3000
    assert 150 < one.meta["valid_documents"] < 450 and two.meta["workers"] == 2
    train = IndexedTokens(one.train_prefix)
    assert train.num_tokens == one.meta["train_tokens"]
    assert bytes(train[0][:-1].astype(np.uint8)).decode().startswith("0: ")  # the first document always trains


def _prepare_in_child(cfg, prefix, out_q):
    try:
        p = prepare(cfg, out_prefix=prefix, workers=1, on_wait=lambda m: out_q.put(("waited", os.getpid())))
        out_q.put(("done", p.train_prefix, p.meta["train_tokens"]))
    except BaseException as e:  # pragma: no cover - reported to the test
        out_q.put(("error", repr(e)))


def test_concurrent_prepares_one_killed_leave_one_valid_cache(tmp_path):
    """A writer SIGKILLed mid-way while three others wait on the lock: one of them takes over, the others
    wait for it, all end with the same, valid files; nothing of the dead writer survives."""
    corpus = _jsonl_corpus(tmp_path / "c.jsonl", 120_000)
    cfg = DataConfig(corpus=corpus, valid_fraction=0.05)
    prefix = str(tmp_path / "cache" / "tokens")
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    first = ctx.Process(target=_prepare_in_child, args=(cfg, prefix, q))
    first.start()
    deadline = time.time() + 60
    while not list((tmp_path / "cache").glob("tokens_train.tmp-*.bin")):
        assert time.time() < deadline and first.is_alive(), "the first writer never started writing"
        time.sleep(0.01)
    os.kill(first.pid, signal.SIGSTOP)  # mid-way, holding the lock, until it is killed: it cannot finish first
    assert not (tmp_path / "cache" / "tokens.json").exists()
    others = [ctx.Process(target=_prepare_in_child, args=(cfg, prefix, q)) for _ in range(3)]
    for p in others:
        p.start()
    results = [q.get(timeout=120) for _ in others]  # each says so when it finds the lock taken
    assert sorted(results) == sorted(("waited", p.pid) for p in others), results
    os.kill(first.pid, signal.SIGKILL)
    first.join()
    for p in others:
        p.join(120)
        assert p.exitcode == 0
    while len([r for r in results if r[0] != "waited"]) < len(others):
        results.append(q.get(timeout=10))
    while not q.empty():
        results.append(q.get())
    done = [r for r in results if r[0] == "done"]
    assert len(done) == 3 and not [r for r in results if r[0] == "error"], results
    assert len({r[1:] for r in done}) == 1
    assert len([r for r in results if r[0] == "waited"]) == 3  # every one of them waited on the lock
    assert not list((tmp_path / "cache").glob("*.tmp-*"))
    reference = prepare(cfg, out_prefix=str(tmp_path / "ref" / "tokens"), workers=2)
    assert _files(prefix) == _files(str(tmp_path / "ref" / "tokens"))
    assert done[0][2] == reference.meta["train_tokens"]


def test_a_half_written_cache_is_not_taken_as_valid(tmp_path):
    corpus = _jsonl_corpus(tmp_path / "c.jsonl", 200)
    cfg = DataConfig(corpus=corpus, valid_fraction=0.1)
    prefix = str(tmp_path / "cache" / "tokens")
    good = prepare(cfg, out_prefix=prefix)
    with open(prefix + "_train.bin", "r+b") as f:  # truncated by a crash or a full disk
        f.truncate(10)
    again = prepare(cfg, out_prefix=prefix)  # detected and rewritten, not read as garbage
    assert again.meta["train_tokens"] == good.meta["train_tokens"]
    assert IndexedTokens(again.train_prefix).num_tokens == good.meta["train_tokens"]


# ----------------------------------------------------------------------------- reading
def _megatron_dataset(tmp_path):
    """Megatron's own builder, multi-sentence documents (as --split-sentences writes), no loomtrain metadata."""
    pytest.importorskip("megatron.core")
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(str(tmp_path / "meg_text_document.bin"), dtype=np.int32)
    docs = [[[5, 6, 7], [8, 9]], [[10, 11, 12, 13]], [[14], [15, 16], [17, 18, 19]]]
    for sentences in docs:
        flat = [t for s in sentences for t in s]
        builder.add_document(torch.tensor(flat), [len(s) for s in sentences])
    builder.finalize(str(tmp_path / "meg_text_document.idx"))
    return str(tmp_path / "meg_text_document"), docs


def test_megatron_data_trains_as_it_is(tmp_path):
    prefix, docs = _megatron_dataset(tmp_path)
    with pytest.raises(ConfigError, match="data.vocab_size"):
        load_prepared(DataConfig(prepared=prefix))
    with pytest.raises(ConfigError, match="data.valid_prepared"):
        load_prepared(DataConfig(prepared=prefix, vocab_size=64), need_valid=True)
    p = load_prepared(DataConfig(prepared=prefix, vocab_size=64))
    assert (p.vocab_size, p.valid_prefix, p.meta["train_documents"], p.meta["train_sequences"]) == (64, None, 3, 6)
    ds = PackedDataset(p.train_prefix, seq_len=14)
    w = ds.window(0)
    np.testing.assert_array_equal(w["input_ids"], np.arange(5, 19))
    # documents, not sentences: ids change at 10 and 14 only, positions restart there only
    np.testing.assert_array_equal(w["doc_ids"], [0] * 5 + [1] * 4 + [2] * 5)
    np.testing.assert_array_equal(w["position_ids"], [0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2, 3, 4])


def test_corrupt_or_missing_index_is_one_line_exit_2(tmp_path, capsys):
    from loomtrain.launch.cli import main

    prefix, _ = _megatron_dataset(tmp_path)
    base = ["train", "--set", f"data.prepared={prefix}", "--set", "data.vocab_size=64", "--set",
            "train.eval_every=0", "--set", f"train.output_dir={tmp_path / 'run'}"]
    with open(prefix + ".idx", "r+b") as f:
        f.truncate(os.path.getsize(prefix + ".idx") - 8)
    assert main(base) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: data.prepared:") and "corrupt" in err and "\n" not in err
    os.unlink(prefix + ".idx")
    assert main(base) == 2
    assert "meg_text_document" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing written


def test_bad_corpus_record_is_one_line_exit_2_and_nothing_written(tmp_path, capsys):
    from loomtrain.launch.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"body": "no text field"}) + "\n")
    out = tmp_path / "out" / "tokens"
    assert main(["data", "prepare", "--set", f"data.corpus={bad}", "--output", str(out)]) == 2
    assert capsys.readouterr().err.strip() == (f"error: data.text_key: {bad}:1 is not a JSON object with key "
                                                f"'text'")
    assert not (tmp_path / "out").exists()


def test_tokenizer_vocabulary_larger_than_the_model_is_refused(tmp_path, capsys):
    from loomtrain.launch.cli import main

    corpus = _jsonl_corpus(tmp_path / "c.jsonl", 20)
    assert main(["train", "--set", f"data.corpus={corpus}", "--set", "model.vocab_size=200",
                 "--set", f"train.output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: model.vocab_size: 200 is smaller than the vocabulary of byte (257)"


def test_parquet_corpus_streams_row_groups(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    texts = [f"document {i} " + "x" * (i % 17) for i in range(500)]
    folder = tmp_path / "hf"
    folder.mkdir()
    for part in range(2):  # a dataset folder of two shards, several row groups each
        table = pa.table({"content": texts[part * 250:(part + 1) * 250], "n": list(range(250))})
        pq.write_table(table, folder / f"train-{part:05d}-of-00002.parquet", row_group_size=64)
    with open(tmp_path / "same.jsonl", "w") as f:
        for t in texts:
            f.write(json.dumps({"content": t}) + "\n")
    a = prepare(DataConfig(corpus=str(folder), text_key="content", valid_fraction=0.1),
                out_prefix=str(tmp_path / "pq" / "t"), workers=2)
    prepare(DataConfig(corpus=str(tmp_path / "same.jsonl"), text_key="content", valid_fraction=0.1),
            out_prefix=str(tmp_path / "js" / "t"), workers=1)
    assert a.meta["train_documents"] + a.meta["valid_documents"] == 500
    assert _files(tmp_path / "pq" / "t") == _files(tmp_path / "js" / "t")
    with pytest.raises(ConfigError, match=r"data.text_key: '.*train-00000-of-00002.parquet' has no field 'text'"):
        prepare(DataConfig(corpus=str(folder)), out_prefix=str(tmp_path / "bad" / "t"))
    assert not (tmp_path / "bad").exists()  # nothing written


# ----------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4097])
def test_permutation_is_a_seeded_bijection(n):
    a = permute(np.arange(n), n, seed=3)
    assert sorted(a.tolist()) == list(range(n))
    if n > 10:
        assert not np.array_equal(a, permute(np.arange(n), n, seed=4))
        assert not np.array_equal(a, np.arange(n))


def test_sampler_position_is_independent_of_the_number_of_ranks():
    s = ResumableSampler(1000, seed=9)
    whole = s.take(96)
    parts = [ResumableSampler(1000, seed=9).at(np.arange(r * 24, (r + 1) * 24)) for r in range(4)]
    np.testing.assert_array_equal(np.concatenate(parts), whole)


def _rss_growth_of_loader(prefix, seq_len, q):
    def rss():  # private memory; the mapped files' pages are page cache, shared and reclaimable
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["RssAnon"].split()[0]) * 1024

    before = rss()
    ds = PackedDataset(prefix, seq_len)
    batches = TrainBatches(ds, seed=1, global_batch=16, micro_batch=8, dp_rank=1, dp_size=2)
    for _ in range(20):
        batches.next_step()
    batches.sampler.consumed = 10 * len(ds) + 12345  # far into a later epoch: nothing is materialised either
    batches.next_step()
    q.put((rss() - before, len(ds)))


def test_loader_memory_is_flat_on_a_huge_index(tmp_path):
    """10M documents, 10G tokens (a sparse .bin): 39M windows. A per-epoch permutation alone would be 312 MB and
    the document starts 80 MB of private memory; the loader's stays a few MB."""
    n_docs, doc_len = 10_000_000, 1000
    prefix = str(tmp_path / "huge")
    with open(prefix + ".idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + (1).to_bytes(8, "little") + (8).to_bytes(1, "little"))
        f.write(n_docs.to_bytes(8, "little") + (n_docs + 1).to_bytes(8, "little"))
        np.full(n_docs, doc_len, np.int32).tofile(f)
        (np.arange(n_docs, dtype=np.int64) * (2 * doc_len)).tofile(f)
        np.arange(n_docs + 1, dtype=np.int64).tofile(f)
    with open(prefix + ".bin", "wb") as f:
        f.truncate(n_docs * doc_len * 2)
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_rss_growth_of_loader, args=(prefix, 256, q))
    p.start()
    growth, windows = q.get(timeout=120)
    p.join()
    assert windows == (n_docs * doc_len - 1) // 256
    assert growth < 32 * 2 ** 20, f"loader grew by {growth / 2 ** 20:.1f} MiB"


# ----------------------------------------------------------------------------- documents
def _docs_file(tmp_path, lengths, seed=0):
    rng = np.random.default_rng(seed)
    docs = [np.concatenate([rng.integers(0, 250, size=n - 1), [256]]) for n in lengths]
    write_indexed(str(tmp_path / "docs"), docs, np.uint16)
    return IndexedTokens(str(tmp_path / "docs")), docs


def _predicted(batches):
    """The (input, label) pairs a step trains on, as a multiset."""
    pairs = []
    for b in batches:
        keep = b["labels"] != -100
        pairs += list(zip(b["input_ids"][keep].tolist(), b["labels"][keep].tolist(),
                          b["position_ids"][keep].tolist()))
    return sorted(pairs)


def test_document_batches_take_whole_documents_up_to_the_budget(tmp_path):
    lengths = [5, 300, 41, 1000, 7, 64, 2, 130, 999, 12] * 3
    data, docs = _docs_file(tmp_path, lengths)
    plan = DocumentBatches(data, seed=2, global_batch_tokens=600, max_doc_tokens=256, seq_len=256, micro_batch=0,
                           dp_rank=0, dp_size=1)
    seen, steps = [], 0
    while plan.position[0] < data.num_documents:
        step_lengths = plan.step_lengths()
        assert sum(step_lengths) <= 600 and max(step_lengths) <= 256
        batches = plan.next_step()
        assert sum(int((b["labels"] != -100).sum()) for b in batches) == sum(step_lengths)
        for b in batches:
            assert b["input_ids"].shape[1] == 256
        seen += step_lengths
        steps += 1
    # the first epoch: every document once, cut into pieces of at most 256 predicted tokens (the last step
    # may already reach into the next epoch)
    expected = sorted(p for n in lengths for p in [256] * ((n - 1) // 256) + ([(n - 1) % 256] if (n - 1) % 256 else []))
    assert sorted(seen[:len(expected)]) == expected


def test_document_batches_are_resumable_and_the_same_on_any_number_of_ranks(tmp_path):
    data, _ = _docs_file(tmp_path, [int(x) for x in np.random.default_rng(3).integers(2, 400, size=60)])
    kw = dict(seed=5, global_batch_tokens=900, max_doc_tokens=128, seq_len=128)
    single = DocumentBatches(data, micro_batch=0, dp_rank=0, dp_size=1, **kw)
    steps = [single.next_step() for _ in range(6)]
    ranks = [DocumentBatches(data, micro_batch=2, dp_rank=r, dp_size=3, **kw) for r in range(3)]
    for step in steps:
        per_rank = [plan.next_step() for plan in ranks]
        assert len({len(b) for b in per_rank}) == 1  # same number of micro-batches on every rank
        assert _predicted([b for rank in per_rank for b in rank]) == _predicted(step)
    resumed = DocumentBatches(data, micro_batch=0, dp_rank=0, dp_size=1, **kw)
    again = DocumentBatches(data, micro_batch=0, dp_rank=0, dp_size=1, **kw)
    for _ in range(3):
        again.next_step()
    resumed.load_state_dict(json.loads(json.dumps(again.state_dict())))
    for _ in range(3):
        assert _predicted(resumed.next_step()) == _predicted(again.next_step())


def test_prefetcher_reports_the_position_handed_out(tmp_path):
    data, docs = _docs_file(tmp_path, [300] * 40)
    write_indexed(str(tmp_path / "flat"), docs, np.uint16)
    ds = PackedDataset(str(tmp_path / "flat"), 32)
    plain = TrainBatches(ds, 4, 8, 4, 0, 1)
    ahead = Prefetcher(TrainBatches(ds, 4, 8, 4, 0, 1), depth=3)
    try:
        for _ in range(3):
            for a, b in zip(plain.next_step(), ahead.next_step()):
                torch.testing.assert_close(a, b)
        time.sleep(0.2)  # the thread has built steps 4-6 by now
        assert ahead.state_dict() == plain.state_dict() == {"consumed": 24, "seed": 4, "num_windows": len(ds),
                                                            "seq_len": 32}
        ahead.load_state_dict({"consumed": 8, "seed": 4, "num_windows": len(ds)})
        plain.load_state_dict({"consumed": 8, "seed": 4, "num_windows": len(ds)})
        for a, b in zip(plain.next_step(), ahead.next_step()):
            torch.testing.assert_close(a, b)
    finally:
        ahead.close()


def test_many_empty_documents_are_skipped_not_an_error(tmp_path):
    docs = [np.asarray([256])] * 9 + [np.asarray([5, 6, 7, 256])]  # nine documents that predict nothing
    write_indexed(str(tmp_path / "e"), docs, np.uint16)
    plan = DocumentBatches(IndexedTokens(str(tmp_path / "e")), seed=0, global_batch_tokens=3, max_doc_tokens=3,
                           seq_len=4, micro_batch=0, dp_rank=0, dp_size=1)
    for _ in range(3):
        assert plan.step_lengths() == [3]
        plan.next_step()


def test_leftover_cleanup_spares_a_sibling_prefix(tmp_path):
    from loomtrain.data.prepare import _remove_leftovers

    for name in ("owt_train.tmp-1.bin", "owt.json", "owt2_train.tmp-2.bin", "owt2.json"):
        (tmp_path / name).write_text("x")
    _remove_leftovers(str(tmp_path / "owt"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["owt2.json", "owt2_train.tmp-2.bin"]


def test_a_dead_tokenizer_worker_fails_the_writer_instead_of_hanging(tmp_path, monkeypatch):
    from concurrent.futures.process import BrokenProcessPool

    import loomtrain.data.prepare as prep

    corpus = _jsonl_corpus(tmp_path / "c.jsonl", 50)
    monkeypatch.setattr(prep, "_tokenize_task", _die)
    with pytest.raises(BrokenProcessPool):
        prepare(DataConfig(corpus=corpus), out_prefix=str(tmp_path / "out" / "t"), workers=2)
    assert not list((tmp_path / "out").glob("t_*")) and not (tmp_path / "out" / "t.json").exists()


def _die(task):
    os._exit(9)  # a worker killed mid-task (the OOM killer)
