"""``loomtrain eval`` and ``train.eval_by_position``: loss by position and passkey retrieval.

The loss and its buckets are checked against the model's own forward and ``F.cross_entropy`` in this process;
context parallelism (cp=2, forked gloo ranks) against one process; the passkey prompt and its scoring against an
oracle that reads the number from the prompt (100%) and a barely trained model (0%); the trainer's per-position
evaluation against its plain validation loss, with its metrics and PNG.
"""
import contextlib
import io
import json
import os
import re

import pytest
import torch
import torch.nn.functional as F

from conftest import TEST_OVERRIDES, run_ranks

MAX_SEQ_LEN = 512  # the model's RoPE length (trained on 64-token windows): room for byte-level passkey prompts


@pytest.fixture(scope="module")
def checkpoint(small_corpus, tmp_path_factory) -> str:
    run_dir = tmp_path_factory.mktemp("eval") / "run"
    ov = TEST_OVERRIDES + [f"data.prepared={small_corpus}", f"train.output_dir={run_dir}", "train.steps=2",
                           "checkpoint.at_end=true", f"model.max_seq_len={MAX_SEQ_LEN}"]
    return run_ranks(_train, 0, ov)[0]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("text") / "doc.txt"
    with open(json.__file__) as f:  # real prose and code, more than MAX_SEQ_LEN bytes
        path.write_text(f.read())
    return str(path)


def _train(rank, overrides):
    from loomtrain.launch.train import run
    from loomtrain.trainer.config import load_config

    return run(load_config("tiny", overrides)).checkpoint


def _evaluate(rank, req, oracle=False):
    """``evaluate`` in a forked rank; with ``oracle`` the model's predictions are replaced by the oracle's. Returns
    (result, every predictions list the passkey scoring saw)."""
    from loomtrain.launch.eval import run
    from loomtrain.trainer import evaluate as ev

    seen = []
    if oracle:
        ev.Evaluator.predictions = lambda self, ids: _oracle(ids)
    scoring = ev.passkey_correct
    ev.passkey_correct = lambda trial, predictions: (seen.append(list(predictions)), scoring(trial, predictions))[1]
    return run(req), seen


def _oracle(ids) -> list[int]:
    """Argmax "predictions" of a model that answers the passkey question from the prompt (bytes): after the
    question (and any digits already given) it predicts the key's next character; elsewhere token 0."""
    text = bytes(i for i in ids if i < 256).decode()
    key = " " + re.search(r"The pass key is (\d+)\. Remember it", text).group(1)
    question = text.index("What is the pass key? The pass key is") + len("What is the pass key? The pass key is")
    out = []
    for i in range(len(ids)):
        given = text[question:i + 1] if i + 1 >= question else None
        out.append(ord(key[len(given)]) if given is not None and len(given) < len(key) and key.startswith(given)
                   else 0)
    return out


def _reference(checkpoint: str, tokens: torch.Tensor):
    """Per-token losses of the checkpoint's model, one plain forward in this process."""
    from loomtrain.trainer.config import load_config
    from loomtrain.trainer.hf_export import read_model_state
    from loomtrain.trainer.models.llama.model import ModelArgs, Transformer

    exp = load_config(os.path.join(os.path.dirname(os.path.dirname(checkpoint)), "config.yaml"))
    state = read_model_state(checkpoint)
    model = Transformer(ModelArgs.from_config(exp.model, state["tok_embeddings.weight"].shape[0], exp.data.seq_len))
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        logits = model(tokens[None, :-1])
    return F.cross_entropy(logits[0].float(), tokens[1:], reduction="none").double()


def test_buckets_are_log_spaced_with_a_partial_last_one():
    from loomtrain.trainer.position_loss import bucket_losses, default_bucket, position_buckets

    assert [default_bucket(n) for n in (64, 256, 2048, 8192, 131072)] == [4, 16, 128, 512, 1024]
    assert position_buckets(131072) == [(0, 1024)] + [(1024 << i, 2048 << i) for i in range(7)]
    assert position_buckets(100, 16) == [(0, 16), (16, 32), (32, 64), (64, 100)]
    assert position_buckets(10, 16) == [(0, 10)]
    sums = torch.zeros(2, 100, dtype=torch.float64)
    sums[0, :50], sums[1, :50] = torch.arange(50.0), 1.0  # no tokens past position 49
    got = bucket_losses(sums, position_buckets(100, 16))
    assert [b["tokens"] for b in got] == [16, 16, 18, 0]
    assert got[2]["loss"] == pytest.approx(sum(range(32, 50)) / 18) and got[3]["loss"] is None


def test_loss_and_buckets_equal_a_direct_forward(checkpoint, text_file):
    from loomtrain.data.tokenizer import ByteTokenizer
    from loomtrain.trainer.evaluate import EvalRequest
    from loomtrain.trainer.position_loss import position_buckets

    result, _ = run_ranks(_evaluate, 0, EvalRequest(checkpoint, text=text_file, seq_len=200))[0]
    with open(text_file) as f:
        tokens = torch.from_numpy(ByteTokenizer().encode(f.read())[:201])
    want = _reference(checkpoint, tokens)
    assert result["seq_len"] == 200 and result["tokens"] == 200 and result["bucket"] == 16
    assert result["loss"] == pytest.approx(want.mean().item(), abs=1e-5)
    buckets = position_buckets(200, 16)
    assert buckets[-1] == (128, 200)  # partial
    assert [(b["start"], b["end"]) for b in result["loss_by_position"]] == buckets
    for b, (lo, hi) in zip(result["loss_by_position"], buckets):
        assert b["tokens"] == hi - lo
        assert b["loss"] == pytest.approx(want[lo:hi].mean().item(), abs=1e-5)
    assert len({round(b["loss"], 3) for b in result["loss_by_position"]}) > 1  # a real curve


def test_cp2_gives_one_process_numbers(checkpoint, text_file):
    """Two context-parallel ranks (zigzag shards, FSDP over them) give one process's losses by position and the
    same passkey predictions; 398 tokens (the longest sequence) do not split in 4 chunks: padding is exercised."""
    from loomtrain.trainer.evaluate import EvalRequest

    req = EvalRequest(checkpoint, text=text_file, seq_len=398, passkey_lengths=[300], passkey_depths=[0.0, 1.0],
                      passkey_trials=1)
    one, one_seen = run_ranks(_evaluate, 0, req)[0]
    req.cp = 2
    ranks = run_ranks(_evaluate, 2, req)
    for result, seen in ranks:
        assert result["cp"] == 2 and result["world_size"] == 2
        assert result["loss"] == pytest.approx(one["loss"], abs=1e-5)
        for a, b in zip(result["loss_by_position"], one["loss_by_position"], strict=True):
            assert (a["start"], a["end"], a["tokens"]) == (b["start"], b["end"], b["tokens"])
            assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert seen == one_seen and len(seen) == 2


def _evaluate_on_host(rank, req):
    """:func:`_evaluate` on "host" x1 or x2 (``LOOMTRAIN_HOST_ID``), one rank each."""
    os.environ["LOOMTRAIN_HOST_ID"] = f"x{rank + 1}"
    return _evaluate(rank, req)


def test_cp_impl_auto_reads_the_cluster_as_train_does(checkpoint, text_file, tmp_path):
    """``cp_impl: auto`` with ``parallel.placement: fabric`` and ``parallel.cluster`` (2 hosts of 1 device joined by
    1 Gbit/s): eval (2 forked ranks, cp=2) places its ranks and runs the strategy training's path picks for the same
    experiment (``launch/cp_links.py::cluster_links`` into ``checks.cp_attention``), not the one the declared default
    link (100 Gbit/s) gives; the numbers stay one process's."""
    import yaml

    from loomtrain.launch.cp_links import cluster_links
    from loomtrain.trainer.checks import check_experiment, cp_attention
    from loomtrain.trainer.evaluate import EvalRequest, prepare_eval
    from loomtrain.trainer.models import model_family

    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump({"fabrics": {"net": {"kind": "ethernet", "gbps": 1}},
                                    "hosts": [{"name": f"x{i}", "fabric": "net", "devices": 1} for i in (1, 2)]}))
    req = EvalRequest(checkpoint, None, ["parallel.cp_impl=auto", "parallel.placement=fabric",
                                         f"parallel.cluster={path}"], text=text_file, seq_len=398, cp=2)
    source, exp, _, _ = prepare_eval(req, 2, 2)
    dims = check_experiment(exp, 2, 2)
    args = model_family(exp.model.family).args(exp.model, source.vocab_size, exp.model.max_seq_len)
    trained, declared = (str(cp_attention(exp, args, dims, links)) for links in (cluster_links(exp, dims), None))
    assert trained != declared  # the file changes the pick (ulysses on the slow link, ring on 100 Gbit/s)
    one, _ = run_ranks(_evaluate, 0, EvalRequest(checkpoint, text=text_file, seq_len=398))[0]
    for result, _ in run_ranks(_evaluate_on_host, 2, req):
        assert result["cp_impl"] == trained
        assert result["loss"] == pytest.approx(one["loss"], abs=1e-5)
    # A checkpoint evaluated on hosts the file does not list (another machine than training's): one line, the
    # ranks unplaced and the declared links' pick, where training refuses to start.
    other = tmp_path / "other.yaml"
    other.write_text(path.read_text().replace("x1", "y1").replace("x2", "y2"))
    elsewhere = EvalRequest(checkpoint, None, ["parallel.cp_impl=auto", "parallel.placement=fabric",
                                               f"parallel.cluster={other}"], text=text_file, seq_len=398, cp=2)
    for result, _ in run_ranks(_evaluate_on_host, 2, elsewhere):
        assert result["cp_impl"] == declared
        assert result["loss"] == pytest.approx(one["loss"], abs=1e-5)


def test_passkey_prompt_and_scoring():
    from loomtrain.data.tokenizer import ByteTokenizer
    from loomtrain.trainer.evaluate import (PASSKEY_INTRO, PASSKEY_QUESTION, passkey_correct, passkey_trial,
                                            passkey_trials)

    tok = ByteTokenizer()
    for depth in (0.0, 0.5, 1.0):
        trial = passkey_trial(tok, 700, depth, 12345)
        text = tok.decode(trial.ids)
        assert 700 - len(" There and back again.") < len(trial.ids) <= 700
        assert text.startswith(PASSKEY_INTRO) and text.endswith(PASSKEY_QUESTION + " 12345")
        assert tok.decode(trial.ids[trial.answer_start:]) == " 12345"
        region = text[len(PASSKEY_INTRO):text.index(" " + PASSKEY_QUESTION)]  # filler with the key inside
        needle = " The pass key is 12345. Remember it. 12345 is the pass key."
        before, filler = region.index(needle), len(region) - len(needle)
        assert before == pytest.approx(depth * filler, abs=len(" There and back again."))  # whole sentences
        assert passkey_correct(trial, _oracle(trial.ids))
        wrong = _oracle(trial.ids)
        wrong[trial.answer_start + 2] = ord("0")  # one digit off
        assert not passkey_correct(trial, wrong)
    a, b = passkey_trials(tok, [400], [0.5], 3, seed=7), passkey_trials(tok, [400], [0.5], 3, seed=7)
    assert [t.key for t in a] == [t.key for t in b] and len({t.key for t in a}) == 3  # deterministic, varied
    assert [t.key for t in passkey_trials(tok, [400], [0.5], 3, seed=8)] != [t.key for t in a]


def test_passkey_oracle_scores_all_and_a_barely_trained_model_none(checkpoint, text_file):
    from loomtrain.trainer.evaluate import EvalRequest

    req = EvalRequest(checkpoint, text=text_file, seq_len=64, passkey_lengths=[300, 500],
                      passkey_depths=[0.0, 0.5, 1.0], passkey_trials=2)
    oracle, _ = run_ranks(_evaluate, 0, req, True)[0]
    assert oracle["passkey"]["accuracy"] == 1.0 and oracle["passkey"]["trials"] == 12
    assert [(c["length"], c["depth"], c["correct"]) for c in oracle["passkey"]["by_length_depth"]] == \
        [(n, d, 2) for n in (300, 500) for d in (0.0, 0.5, 1.0)]
    model, seen = run_ranks(_evaluate, 0, req)[0]
    assert model["passkey"]["accuracy"] == 0.0 and len(seen) == 12


def _cli(rank, argv):
    from loomtrain.launch.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    return code, out.getvalue()


def test_cli_json_and_table(checkpoint, text_file):
    argv = ["eval", checkpoint, "--text", text_file, "--seq-len", "100", "--passkey-lengths", "300",
            "--passkey-depths", "0.5", "--passkey-trials", "1"]
    code, out = run_ranks(_cli, 0, argv + ["--json"])[0]
    assert code == 0
    result = json.loads(out)  # one JSON object, nothing else on stdout
    assert {"loss", "loss_by_position", "passkey", "seq_len", "tokens"} <= set(result)
    assert isinstance(result["loss"], float) and result["seq_len"] == 100
    assert all(set(b) == {"start", "end", "loss", "tokens"} for b in result["loss_by_position"])
    assert result["passkey"]["trials"] == 1 and set(result["passkey"]["by_length_depth"][0]) == \
        {"length", "depth", "accuracy", "correct", "trials"}
    code, table = run_ranks(_cli, 0, argv)[0]
    assert code == 0 and "mean loss" in table and "64-100" in table and "passkey retrieval" in table


def test_hugging_face_directory_gives_the_checkpoints_numbers(checkpoint, text_file, tmp_path):
    """SOURCE as a Hugging Face directory (the checkpoint exported): weights read by ``model.init_from``'s importer,
    the tokenizer from tokenizer.json; the same losses."""
    pytest.importorskip("safetensors")
    pytest.importorskip("tokenizers")
    from loomtrain.trainer.evaluate import EvalRequest

    out = str(tmp_path / "hf")
    assert run_ranks(_cli, 0, ["export", checkpoint, "--hf", out])[0][0] == 0
    # one thread, as the checkpoint's run config says: more would start OpenMP's pool anew in a forked child
    hf, _ = run_ranks(_evaluate, 0, EvalRequest(out, None, ["train.threads=1"],
                                                text=text_file, seq_len=150))[0]
    ours, _ = run_ranks(_evaluate, 0, EvalRequest(checkpoint, text=text_file, seq_len=150))[0]
    assert hf["kind"] == "hf" and hf["tokens"] == 150
    assert hf["loss"] == pytest.approx(ours["loss"], abs=1e-5)


@pytest.mark.parametrize("argv, message", [
    ([], "SOURCE: required"),
    (["{tmp}/nowhere"], "does not exist"),
    (["{tmp}"], "neither a loomtrain checkpoint (no .metadata) nor a Hugging Face model directory"),
    (["{ckpt}", "--seq-len", "513"], "--seq-len: 513 is longer than the model's max_seq_len 512"),
    (["{ckpt}", "--text", "{tmp}/short.txt", "--seq-len", "40"], "--seq-len: 40 is longer than the text (19 tokens"),
    (["{ckpt}", "--passkey-lengths", "100"], "--passkey-lengths: 100 tokens cannot hold the passkey prompt"),
    (["{ckpt}", "--passkey-lengths", "600"], "--passkey-lengths: 600 is longer than the model's max_seq_len 512"),
    (["{ckpt}", "--passkey-lengths", "300", "--passkey-depths", "1.5"], "--passkey-depths: each must be in [0, 1]"),
    (["{ckpt}", "--cp", "0"], "--cp: must be >= 1"),
], ids=["no_source", "missing", "neither", "seq_len_model", "seq_len_text", "passkey_short", "passkey_long",
        "depth", "cp"])
def test_bad_input_is_one_line_exit_2(argv, message, checkpoint, tmp_path, capsys):
    from loomtrain.launch.cli import main

    (tmp_path / "short.txt").write_text("twenty bytes of text")
    argv = [a.format(tmp=tmp_path, ckpt=checkpoint) for a in argv]
    assert main(["eval"] + argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1
    assert message in captured.err


def test_eval_by_position_config_errors():
    from loomtrain.trainer.checks import check_experiment
    from loomtrain.trainer.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="train.eval_by_position: needs train.eval_every > 0"):
        load_config("tiny", ["train.eval_by_position=true", "train.eval_every=0"])
    exp = load_config("tiny", ["train.eval_by_position=true", "parallel.pp=2", "parallel.dp_shard=1"])
    with pytest.raises(ConfigError, match="train.eval_by_position: not with parallel.pp > 1"):
        check_experiment(exp, 2)


def _train_result(rank, overrides):
    from loomtrain.launch.train import run
    from loomtrain.trainer.config import load_config

    return run(load_config("tiny", overrides)).val_losses


def test_trainer_eval_by_position_writes_metrics_and_png(small_corpus, tmp_path):
    """Every ``train.eval_every`` steps: ``loss_by_position`` in metrics.jsonl, its token-weighted mean the plain
    validation loss of a run without it, and a PNG redrawn in place (no temporary file left)."""
    base = TEST_OVERRIDES + [f"data.prepared={small_corpus}", "train.steps=4", "train.eval_every=2",
                             "train.eval_batches=2"]
    plain = run_ranks(_train_result, 0, base + [f"train.output_dir={tmp_path / 'plain'}"])[0]
    out = tmp_path / "pos"
    val = run_ranks(_train_result, 0, base + [f"train.output_dir={out}", "train.eval_by_position=true"])[0]
    assert sorted(val) == sorted(plain) == [2, 4]
    for step in (2, 4):
        assert val[step] == pytest.approx(plain[step], rel=1e-6)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evaluated = [r for r in records if "loss_by_position" in r]
    assert [r["step"] for r in evaluated] == [2, 4]
    for r in evaluated:
        buckets = r["loss_by_position"]
        assert [(b["start"], b["end"]) for b in buckets] == [(0, 4), (4, 8), (8, 16), (16, 32), (32, 64)]
        mean = sum(b["loss"] * b["tokens"] for b in buckets) / sum(b["tokens"] for b in buckets)
        assert mean == pytest.approx(r["val_loss"], rel=1e-9)
    png = out / "loss_by_position.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [f for f in os.listdir(out) if f.startswith(".tmp-")]


@pytest.mark.parametrize("layout", [["parallel.cp=2", "parallel.dp_shard=1"], ["parallel.dp_shard=2"]],
                         ids=["cp2", "dp2"])
def test_trainer_eval_by_position_on_two_ranks_matches_one(layout, small_corpus, tmp_path):
    """The per-position sums of ranks holding disjoint tokens (cp shards, dp batches) add up to one process's."""
    base = TEST_OVERRIDES + [f"data.prepared={small_corpus}", "train.steps=1", "train.eval_every=1",
                             "train.eval_batches=2", "train.eval_by_position=true", "train.eval_bucket=8"]
    curves = {}
    for name, world, extra in (("one", 0, []), ("two", 2, layout)):
        run_ranks(_train_result, world, base + [f"train.output_dir={tmp_path / name}"] + extra)
        record = json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[-1])
        curves[name] = record["loss_by_position"]
    assert [(b["start"], b["end"]) for b in curves["one"]] == [(0, 8), (8, 16), (16, 32), (32, 64)]
    for a, b in zip(curves["two"], curves["one"], strict=True):
        assert a["tokens"] == b["tokens"] and a["loss"] == pytest.approx(b["loss"], rel=1e-5)
