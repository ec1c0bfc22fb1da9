"""Tokenizer, corpus readers, Megatron IndexedDataset compatibility, packing and resumable sampling."""
import json

import numpy as np
import pytest

from loomtrain.data.corpus import read_documents
from loomtrain.data.indexed import IndexedTokens, write_indexed
from loomtrain.data.loader import PackedDataset, ResumableSampler, TrainBatches, eval_batches
from loomtrain.data.prepare import prepare
from loomtrain.data.tokenizer import ByteTokenizer
from loomtrain.trainer.config import DataConfig


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "def f(x):\n    return 'λ' * x\n"
    ids = tok.encode(text)
    assert ids.max() < 256 and tok.decode(ids) == text
    assert tok.eos_id == 256 and tok.vocab_size == 257


def test_corpus_readers(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("beta")
    (tmp_path / "c.bin").write_text("ignored")
    docs = list(read_documents(str(tmp_path), "*.txt,*.md"))
    assert [t for _, t in docs] == ["alpha", "beta"]
    jl = tmp_path / "d.jsonl"
    jl.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert [t for _, t in read_documents(str(jl))] == ["one", "two"]
    jl.write_text(json.dumps({"body": "one"}) + "\n")
    with pytest.raises(ValueError, match="d.jsonl:1 is not a JSON object with key 'text'"):
        list(read_documents(str(jl)))
    stdlib = list(read_documents("stdlib", max_documents=5))
    assert len(stdlib) == 5 and all(name.endswith(".py") for name, _ in stdlib)


def test_megatron_reads_our_files_and_we_read_megatrons(tmp_path):
    pytest.importorskip("megatron.core")
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 300, size=n) for n in (5, 1, 17, 3)]
    write_indexed(str(tmp_path / "ours"), docs, np.uint16, writer="builtin")
    write_indexed(str(tmp_path / "theirs"), docs, np.uint16, writer="megatron")
    assert (tmp_path / "ours.idx").read_bytes() == (tmp_path / "theirs.idx").read_bytes()
    assert (tmp_path / "ours.bin").read_bytes() == (tmp_path / "theirs.bin").read_bytes()
    meg = IndexedDataset(str(tmp_path / "ours"))
    mine = IndexedTokens(str(tmp_path / "theirs"))
    assert len(meg) == len(mine) == 4
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(meg[i], d)
        np.testing.assert_array_equal(mine[i], d)
    assert not list(tmp_path.glob("*.tmp-*"))


def test_prepare_caches_and_splits(tmp_path):
    for i in range(20):
        (tmp_path / f"doc{i:02d}.txt").write_text(f"document number {i}\n" * (i + 1))
    cfg = DataConfig(corpus=str(tmp_path), valid_fraction=0.2, cache_dir=str(tmp_path / "cache"))
    p = prepare(cfg, writer="builtin")
    m = p.meta
    assert m["train_documents"] + m["valid_documents"] == 20 and m["valid_documents"] >= 1
    train, valid = IndexedTokens(p.train_prefix), IndexedTokens(p.valid_prefix)
    assert train.num_tokens == m["train_tokens"] and valid.num_tokens == m["valid_tokens"]
    assert all(train[i][-1] == 256 for i in range(len(train)))  # every document ends in EOS
    again = prepare(cfg)  # cached: same files, nothing rewritten
    assert again.train_prefix == p.train_prefix
    (tmp_path / "doc00.txt").write_text("changed, and longer than before")
    assert prepare(cfg, writer="builtin").train_prefix != p.train_prefix  # corpus change -> new cache entry


def _packed(tmp_path, docs, seq_len):
    write_indexed(str(tmp_path / "p"), [np.asarray(d) for d in docs], np.uint16, writer="builtin")
    return PackedDataset(str(tmp_path / "p"), seq_len)


def test_packing_keeps_document_boundaries(tmp_path):
    docs = [[1, 2, 3, 256], [4, 5, 256], [6, 7, 8, 9, 10, 256], [11, 256]]
    ds = _packed(tmp_path, docs, seq_len=4)
    stream = np.concatenate(docs)
    assert len(ds) == (len(stream) - 1) // 4
    w = ds.window(1)  # tokens 4..7 of the stream: [4, 5, 256, 6] -> labels [5, 256, 6, 7]
    np.testing.assert_array_equal(w["input_ids"], [4, 5, 256, 6])
    np.testing.assert_array_equal(w["labels"], stream[5:9])
    np.testing.assert_array_equal(w["doc_ids"], [0, 0, 0, 1])
    np.testing.assert_array_equal(w["position_ids"], [0, 1, 2, 0])  # restarts at the window and each document
    w = ds.window(2)  # [7, 8, 9, 10] all inside document 2, which began in the previous window
    np.testing.assert_array_equal(w["position_ids"], [0, 1, 2, 3])
    np.testing.assert_array_equal(w["doc_ids"], [0, 0, 0, 0])


def test_sampler_is_resumable_and_covers_each_epoch():
    a = ResumableSampler(10, seed=5)
    first = a.take(7)
    b = ResumableSampler(10, seed=5)
    b.load_state_dict(a.state_dict())
    np.testing.assert_array_equal(a.take(9), b.take(9))
    c = ResumableSampler(10, seed=5)
    stream = c.take(20)
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    np.testing.assert_array_equal(stream[:7], first)
    with pytest.raises(ValueError, match="different data"):
        ResumableSampler(11, seed=5).load_state_dict(a.state_dict())


def test_data_parallel_ranks_split_the_global_batch(tmp_path):
    ds = _packed(tmp_path, [list(range(1, 200)) + [256]], seq_len=8)
    single = TrainBatches(ds, seed=1, global_batch=8, micro_batch=2, dp_rank=0, dp_size=1)
    whole = np.concatenate([b["input_ids"].numpy() for b in single.next_step()])
    parts = []
    for r in range(4):
        tb = TrainBatches(ds, seed=1, global_batch=8, micro_batch=0, dp_rank=r, dp_size=4)
        [batch] = tb.next_step()
        parts.append(batch["input_ids"].numpy())
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    with pytest.raises(ValueError, match="divisible by the data-parallel size 3"):
        TrainBatches(ds, 1, 8, 0, 0, 3)
    val = eval_batches(ds, num_batches=2, micro_batch=2, dp_rank=1, dp_size=2)
    assert [b["input_ids"].shape for b in val] == [(2, 8), (2, 8)]


def test_validation_split_holds_its_fraction_of_tokens_and_no_lock_is_left(tmp_path):
    """54 documents, 2 of them 40% of the corpus each: the validation split holds 5-20% of the *tokens* for
    valid_fraction 0.1 (drawing documents alone gave 2.8% here, or 40% had a long one been drawn); nothing is
    left beside the cache but its files."""
    sizes = [40] * 54
    sizes[10] = sizes[30] = 4000  # streaming: documents after the long ones let the split catch up
    for i, n in enumerate(sizes):
        (tmp_path / f"doc{i:02d}.txt").write_text("x" * (n - 1))  # + EOS = n tokens
    cfg = DataConfig(corpus=str(tmp_path), valid_fraction=0.1, cache_dir=str(tmp_path / "cache"))
    m = prepare(cfg, writer="builtin").meta
    total = m["train_tokens"] + m["valid_tokens"]
    assert total == sum(sizes) and m["train_documents"] + m["valid_documents"] == 54
    assert 0.05 <= m["valid_tokens"] / total <= 0.2  # half to twice its share, whichever way the draws fell
    assert not list((tmp_path / "cache").rglob("*.lock"))
