"""``loomtrain eval SOURCE``: long-context evaluation of a checkpoint or a Hugging Face model directory.

Two measures. The token loss over the first N tokens of a text, overall and by position bucket
(``trainer/position_loss.py``): does the model use a long context? And passkey retrieval (Mohtashami & Jaggi,
2023, "Landmark Attention"): a five-digit number hidden at a given depth in filler text of a given length; a trial
passes when the model's greedy continuation of the question is the number. Greedy decoding reproduces the answer
exactly when, with the answer appended (teacher forcing), every answer token is the argmax after its prefix, so a
trial is one forward, not one per digit.

The model is built and laid over the ranks as the trainer does it (:func:`loomtrain.trainer.train.lay_out_model`:
tensor, context and data parallelism over the mesh, on the meta device first), then filled from the source. The
sequence is split over the context-parallel group the trainer's way (zigzag, ``StaticSP.prepare``); each rank adds
the losses of the tokens it holds at their positions and the group sums them, so cp=2 gives one process's numbers.
Data-parallel ranks (a world larger than cp x tp) repeat the work: evaluation's parallelism is cp (long
sequences) and tp (large models). Padding to a length the group can split goes after the last real token, with
no labels: causal attention keeps it from changing any real position.

:func:`load_eval_source` is the one place a SOURCE becomes (experiment, model weights); :func:`prepare_eval` checks
everything before a process group starts and :func:`evaluate` runs on each rank (``launch/eval.py`` does both).
"""
from __future__ import annotations

import copy
import json
import os
import random
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from loomtrain.errors import ConfigError
from loomtrain.trainer.loss import IGNORE_INDEX
from loomtrain.trainer.position_loss import (bucket_label, bucket_losses, default_bucket, mean_loss,
                                             position_buckets, position_sums)

# Mohtashami & Jaggi (2023), appendix: the prompt of the passkey retrieval task.
PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
                 "I will quiz you about the important information there.")
PASSKEY_FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
                  "There and back again.")
PASSKEY_KEY = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key? The pass key is"
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


# ---------------------------------------------------------------------------------------------- the source
@dataclass
class EvalSource:
    """What a SOURCE gives: the experiment that builds its model, and its weights.

    ``state``: a checkpoint's full tensors under the unsplit model's names (``hf_export.read_model_state``);
    ``None`` for a Hugging Face directory, whose tensors each rank reads as it loads (``hf_import``)."""

    exp: object
    kind: str  # checkpoint | hf
    path: str
    max_seq_len: int  # the longest sequence the model was made for
    vocab_size: int
    state: dict | None = field(default=None, repr=False)

    def load_into(self, model, family, args) -> None:
        """Fill every parameter of ``model`` (laid over the mesh) with this rank's region of the weights."""
        if self.kind == "hf":
            from loomtrain.trainer.hf_import import import_weights

            import_weights([model], self.path, family, args)
            return
        fill_from_state(model, self.state, self.path)


def fill_from_state(model, state: dict, where: str) -> None:
    """Copy each parameter's local region (a DTensor's shard, or all of a plain tensor) out of full tensors."""
    from torch.distributed.tensor import DTensor

    from loomtrain.trainer.hf_import import local_region
    from loomtrain.trainer.models.llama.model import canonical_name

    names = set()
    with torch.no_grad():
        for name, param in model.named_parameters():
            key = canonical_name(name)
            names.add(key)
            if key not in state:
                raise ConfigError(f"SOURCE: {where} has no tensor '{key}' (a checkpoint of another model? check --config)")
            full = state[key]
            if list(full.shape) != list(param.shape):
                raise ConfigError(f"SOURCE: {where}: tensor '{key}' has shape {list(full.shape)}, the model built from "
                                  f"the config has {list(param.shape)} (check --config)")
            offset, shape = local_region(param)
            local = param.to_local() if isinstance(param, DTensor) else param
            if 0 not in shape:
                local.copy_(full[tuple(slice(o, o + s) for o, s in zip(offset, shape))].reshape(local.shape))
    extra = sorted(set(state) - names)
    if extra:
        raise ConfigError(f"SOURCE: {where}: tensor '{extra[0]}' has no place in the model built from the config "
                          f"({len(extra)} such) (check --config)")


def load_eval_source(source: str, config_path: str | None = None, overrides=()) -> EvalSource:
    """SOURCE -> (experiment, weights): a loomtrain checkpoint directory (its run's ``config.yaml`` two levels up,
    or ``config_path``) or a Hugging Face model directory (``model.init_from`` fills the model and tokenizer from
    its config.json; ``config_path``, optional, gives the rest). One-line ``ConfigError`` otherwise."""
    from loomtrain.trainer.config import load_config

    if not source:
        raise ConfigError("SOURCE: required (a checkpoint directory or a Hugging Face model directory)")
    path = os.path.abspath(os.path.expanduser(source.rstrip("/")))
    if not os.path.exists(path):
        raise ConfigError(f"SOURCE: '{source}' does not exist")
    if not os.path.isdir(path):
        raise ConfigError(f"SOURCE: '{source}' is not a directory (a checkpoint or a Hugging Face model directory)")
    if config_path is not None and not os.path.isfile(config_path):
        raise ConfigError(f"--config: '{config_path}' does not exist")
    if any(os.path.isfile(os.path.join(path, *p, ".metadata")) for p in ((), ("worker000",))):
        from loomtrain.trainer.hf_export import read_model_state

        config = config_path or os.path.join(os.path.dirname(os.path.dirname(path)), "config.yaml")
        if not os.path.isfile(config):
            raise ConfigError(f"--config: '{config}' does not exist (pass the run's config.yaml)")
        exp = load_config(config, list(overrides))
        state = read_model_state(path)
        if "tok_embeddings.weight" not in state:
            raise ConfigError(f"SOURCE: '{source}' holds no model tensors (tok_embeddings.weight missing)")
        vocab = state["tok_embeddings.weight"].shape[0]
        exp.model.vocab_size = vocab  # the checkpoint's, even if --config names another run's
        return EvalSource(exp, "checkpoint", path, exp.model.max_seq_len or exp.data.seq_len, vocab, state)
    if os.path.isfile(os.path.join(path, "config.json")):
        exp = load_config(config_path, list(overrides) + [f"model.init_from={path}"])
        with open(os.path.join(path, "config.json")) as f:
            positions = json.load(f).get("max_position_embeddings") or exp.data.seq_len
        max_len = exp.model.max_seq_len or max(int(positions), exp.data.seq_len)
        return EvalSource(exp, "hf", path, max_len, exp.model.vocab_size)
    raise ConfigError(f"SOURCE: '{source}' is neither a loomtrain checkpoint (no .metadata) nor a Hugging Face model "
                      "directory (no config.json)")


def eval_layout(exp, world: int, cp: int, tp: int, seq_len: int, longest: int):
    """A copy of ``exp`` laid out for evaluation on ``world`` ranks: context and tensor parallelism as asked, the
    rest data parallel (FSDP, repeating the work); no pipeline, no snapshots, no compile (one forward per
    sequence does not pay for it). ``seq_len``: the longest sequence evaluated; ``longest``: the model's.
    ``parallel.placement`` and ``parallel.cluster`` stay: ranks are placed as training places them, and
    ``cp_impl: auto`` reads its links from the cluster as training does (``launch/eval.py``)."""
    from loomtrain.parallel.cp.attention import zigzag_multiple
    from loomtrain.trainer.config import FaultTolConfig

    exp = copy.deepcopy(exp)
    par = exp.parallel
    par.pp, par.pp_virtual_stages, par.pp_split = 1, 1, ""
    par.dp_replicate, par.dp_shard, par.cp, par.tp = 1, -1, cp, tp
    par.dp_sync, par.sp_mode, par.dp_engine = "every_step", "static", "fsdp"
    par.compile, par.activation_checkpoint = False, "none"
    exp.data.batching, exp.data.max_doc_tokens = "windows", 0
    multiple = zigzag_multiple(cp, tp)
    exp.data.seq_len = -(-seq_len // multiple) * multiple  # padded, as the forward pads; what cp_impl=auto plans for
    exp.model.max_seq_len = longest + multiple  # RoPE rows for the padding too
    exp.train.global_batch_size, exp.train.micro_batch_size = world, 0
    exp.faulttol = FaultTolConfig()
    return exp


# ---------------------------------------------------------------------------------------------- the text
def text_tokens(exp, tokenizer, text: str | None, corpus: str | None, need: int):
    """Up to ``need`` tokens: of the ``--text`` file (one document), else of the documents of ``--corpus`` (else
    the run's ``data.corpus``) in order, each ended by the tokenizer's end of document."""
    import numpy as np

    if text is not None:
        if not os.path.isfile(text):
            raise ConfigError(f"--text: '{text}' is not a file")
        with open(text, encoding="utf-8", errors="replace") as f:
            return tokenizer.encode(f.read())[:need]
    from loomtrain.data.corpus import read_documents

    spec = corpus or exp.data.corpus
    if spec != "stdlib" and not os.path.exists(os.path.expanduser(spec)):
        raise ConfigError(f"--corpus: '{spec}' does not exist")
    parts, count = [], 0
    for _, doc in read_documents(spec, exp.data.file_glob, exp.data.text_key):
        ids = tokenizer.encode(doc)
        parts += [ids, np.asarray([tokenizer.eos_id], dtype=np.int64)]
        count += len(ids) + 1
        if count >= need:
            break
    return np.concatenate(parts)[:need] if parts else np.zeros(0, dtype=np.int64)


# ---------------------------------------------------------------------------------------------- passkey
@dataclass
class PasskeyTrial:
    length: int  # asked
    depth: float
    key: int
    ids: list  # prompt then answer: what the model reads
    answer_start: int  # index of the answer's first token in ``ids``


def _piece(tokenizer, text: str) -> list[int]:
    """Tokens of ``text`` without the tokenizer's leading specials (the prompt's BOS comes once, first)."""
    bos = list(getattr(tokenizer, "bos_ids", []))
    ids = tokenizer.encode(text).tolist()
    return ids[len(bos):] if ids[:len(bos)] == bos else ids


def passkey_trial(tokenizer, length: int, depth: float, key: int) -> PasskeyTrial:
    """The prompt and answer for one trial: intro, filler sentences (as many whole ones as fit ``length``
    tokens with the rest), the key sentence after ``depth`` of them, the question, the answer (the number)."""
    bos = list(getattr(tokenizer, "bos_ids", []))
    intro = _piece(tokenizer, PASSKEY_INTRO)
    needle = _piece(tokenizer, " " + PASSKEY_KEY.format(key=key))
    question = _piece(tokenizer, " " + PASSKEY_QUESTION)
    answer = _piece(tokenizer, f" {key}")
    fixed = len(bos) + len(intro) + len(needle) + len(question) + len(answer)
    if length < fixed:
        raise ConfigError(f"--passkey-lengths: {length} tokens cannot hold the passkey prompt ({fixed} tokens "
                          "without filler)")
    sentences = [_piece(tokenizer, " " + s) for s in PASSKEY_FILLER]
    filler, room = [], length - fixed
    while len(sentences[len(filler) % len(sentences)]) <= room:
        room -= len(sentences[len(filler) % len(sentences)])
        filler.append(sentences[len(filler) % len(sentences)])
    before = round(depth * len(filler))
    prompt = bos + intro + sum(filler[:before], []) + needle + sum(filler[before:], []) + question
    return PasskeyTrial(length, depth, key, prompt + answer, len(prompt))


def passkey_trials(tokenizer, lengths, depths, trials: int, seed: int) -> list[PasskeyTrial]:
    """``trials`` per (length, depth), keys drawn from ``seed`` (the same on every rank and every run)."""
    out = []
    for length in lengths:
        for depth in depths:
            for t in range(trials):
                key = random.Random(f"passkey:{seed}:{length}:{depth}:{t}").randint(10000, 99999)
                out.append(passkey_trial(tokenizer, length, depth, key))
    return out


def passkey_correct(trial: PasskeyTrial, predictions) -> bool:
    """``predictions[i]``: the argmax next token after ``trial.ids[:i + 1]``. Greedy decoding gives the answer
    iff each answer token is the prediction after the tokens before it."""
    answer = trial.ids[trial.answer_start:]
    got = [int(p) for p in predictions[trial.answer_start - 1:len(trial.ids) - 1]]
    return got == answer


def passkey_report(trials: list[PasskeyTrial], correct: list[bool]) -> dict:
    """Accuracy overall and per (length, depth)."""
    cells: dict = {}
    for trial, ok in zip(trials, correct):
        cell = cells.setdefault((trial.length, trial.depth), [0, 0])
        cell[0] += int(ok)
        cell[1] += 1
    return {"accuracy": sum(correct) / len(correct) if correct else None, "trials": len(correct),
            "by_length_depth": [{"length": n, "depth": d, "accuracy": c / t, "correct": c, "trials": t}
                                for (n, d), (c, t) in cells.items()]}


# ---------------------------------------------------------------------------------------------- the model
class Evaluator:
    """The source's model on this rank's mesh, and the two forwards evaluation needs."""

    def __init__(self, source: EvalSource, exp, env, placement=None):
        """``placement``: ``launch.placement.place_ranks``'s answer with the cp links ``cp_impl: auto`` decides on
        (read from ``parallel.cluster`` as for training; None: ranks in launch order, the configured links)."""
        from loomtrain.parallel.cp.attention import zigzag_multiple
        from loomtrain.parallel.engines.fsdp import FSDPEngine
        from loomtrain.parallel.sp.modes import StaticSP
        from loomtrain.trainer.attention import resolve_backend
        from loomtrain.trainer.checks import check_experiment, cp_attention
        from loomtrain.trainer.models import model_family
        from loomtrain.trainer.train import DTYPES, lay_out_model

        self.env = env
        self.dims = dims = check_experiment(exp, env.world_size, env.local_world_size)
        if placement is not None and placement.order is not None:
            dims.placement = tuple(placement.order)
        self.mesh = dims.build_mesh(env.device.type, placement.override if placement else {})
        family = model_family(exp.model.family)
        self.args = family.args(exp.model, source.vocab_size, exp.model.max_seq_len)
        backend = resolve_backend(exp.model.attention, env.device.type, DTYPES[exp.model.dtype], self.args.head_dim)
        links = placement.cp_links if placement is not None else None
        cp_impl = cp_attention(exp, self.args, dims, links) if dims.cp > 1 else None
        torch.manual_seed(exp.train.seed)
        with torch.device("meta"):
            model = family.build(self.args)
        model.attention_backend = backend
        lay_out_model([model], exp, dims, self.mesh, env.device, cp_impl=cp_impl, loss_parallel=False)
        source.load_into(model, family, self.args)
        model.eval()
        self.model, self.cp_impl = model, cp_impl
        self.cp_group = self.mesh["cp"].get_group() if dims.cp > 1 else None
        self.sp = StaticSP(self.cp_group)  # the trainer's zigzag split of each sequence over the cp group
        self.engine = FSDPEngine(model, None, None, dims, grad_clip=0.0, bf16=exp.model.dtype == "bfloat16",
                                 device=env.device)  # bf16 as training runs it (FSDP's policy or autocast)
        self.multiple = zigzag_multiple(dims.cp, dims.tp)

    @torch.no_grad()
    def forward(self, ids, labels=None):
        """(this rank's logits, its part of the batch) for one sequence, padded after its end to a length the
        group splits (padding: position 0, no label)."""
        ids = torch.as_tensor(ids, dtype=torch.int64)
        n = ids.numel()
        pad = -n % self.multiple
        labels = torch.full((n,), IGNORE_INDEX, dtype=torch.int64) if labels is None else torch.as_tensor(labels)
        batch = {"input_ids": torch.cat([ids, ids.new_zeros(pad)]),
                 "labels": torch.cat([labels, labels.new_full((pad,), IGNORE_INDEX)]),
                 "position_ids": torch.cat([torch.arange(n), torch.zeros(pad, dtype=torch.int64)])}
        batch = self.sp.prepare(self.model, {k: v.unsqueeze(0) for k, v in batch.items()})
        batch = {k: v.to(self.env.device) for k, v in batch.items()}
        with self.engine.precision():
            return self.model(batch["input_ids"], batch["position_ids"]), batch

    def loss_sums(self, tokens) -> torch.Tensor:
        """(2, N) summed loss and count by position over ``tokens`` (N + 1 of them: inputs and next tokens),
        summed over the cp group."""
        tokens = torch.as_tensor(tokens, dtype=torch.int64)
        n = tokens.numel() - 1
        logits, batch = self.forward(tokens[:-1], tokens[1:])
        sums = position_sums(logits, batch["labels"], batch["position_ids"], n)
        if self.cp_group is not None:
            dist.all_reduce(sums, group=self.cp_group)
        return sums

    def predictions(self, ids) -> list[int]:
        """The argmax next token after each prefix of ``ids`` (every rank gets all of them)."""
        from loomtrain.parallel.cp.attention import unshard_sequence

        logits, _ = self.forward(ids)
        pred = logits.argmax(-1)
        if self.cp_group is not None:
            pred = unshard_sequence(pred, dim=1, group=self.cp_group)
        return pred[0, :len(ids)].tolist()


# ---------------------------------------------------------------------------------------------- the command
@dataclass
class EvalRequest:
    source: str
    config: str | None = None
    overrides: list = field(default_factory=list)
    text: str | None = None
    corpus: str | None = None
    seq_len: int | None = None
    bucket: int = 0
    passkey_lengths: list = field(default_factory=list)
    passkey_depths: list = field(default_factory=lambda: list(DEFAULT_DEPTHS))
    passkey_trials: int = 5
    seed: int = 0
    cp: int = 1
    tp: int = 1


def prepare_eval(req: EvalRequest, world: int, local_world: int):
    """Everything checked before a process group starts: (source, eval experiment, tokens, passkey trials)."""
    from loomtrain.data.tokenizer import build_tokenizer
    from loomtrain.trainer.checks import check_experiment

    for flag in ("cp", "tp", "passkey_trials"):
        if getattr(req, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')}: must be >= 1, got {getattr(req, flag)}")
    if req.seq_len is not None and req.seq_len < 1:
        raise ConfigError(f"--seq-len: must be >= 1, got {req.seq_len}")
    if req.bucket < 0:
        raise ConfigError(f"--bucket: must be >= 1 (or 0: by the length), got {req.bucket}")
    bad = [d for d in req.passkey_depths if not 0.0 <= d <= 1.0]
    if bad:
        raise ConfigError(f"--passkey-depths: each must be in [0, 1], got {bad[0]}")
    if any(n < 1 for n in req.passkey_lengths):
        raise ConfigError(f"--passkey-lengths: each must be >= 1, got {min(req.passkey_lengths)}")
    source = load_eval_source(req.source, req.config, req.overrides)
    exp, longest = source.exp, source.max_seq_len
    if req.seq_len is not None and req.seq_len > longest:
        raise ConfigError(f"--seq-len: {req.seq_len} is longer than the model's max_seq_len {longest}")
    too_long = [n for n in req.passkey_lengths if n > longest]
    if too_long:
        raise ConfigError(f"--passkey-lengths: {too_long[0]} is longer than the model's max_seq_len {longest}")
    try:
        tokenizer = build_tokenizer(exp.data.tokenizer)
    except (FileNotFoundError, RuntimeError) as e:
        raise ConfigError(str(e)) from None
    want = req.seq_len or longest
    tokens = text_tokens(exp, tokenizer, req.text, req.corpus, want + 1)
    if len(tokens) < 2:
        raise ConfigError(f"--text: '{req.text or req.corpus or exp.data.corpus}' has fewer than 2 tokens")
    if req.seq_len is not None and len(tokens) < want + 1:
        raise ConfigError(f"--seq-len: {req.seq_len} is longer than the text ({len(tokens) - 1} tokens to "
                          f"predict in {req.text or req.corpus or exp.data.corpus})")
    if tokens.max() >= source.vocab_size:
        raise ConfigError(f"data.tokenizer: token id {int(tokens.max())} is outside the model's vocabulary "
                          f"({source.vocab_size}); is this the model's tokenizer?")
    trials = passkey_trials(tokenizer, req.passkey_lengths, req.passkey_depths, req.passkey_trials, req.seed)
    n = len(tokens) - 1
    run_exp = eval_layout(exp, world, req.cp, req.tp, max([n] + [len(t.ids) for t in trials]), longest)
    check_experiment(run_exp, world, local_world)
    return source, run_exp, tokens, trials


def evaluate(req: EvalRequest, source: EvalSource, exp, tokens, trials: list[PasskeyTrial], env,
             placement=None) -> dict:
    """Run :func:`prepare_eval`'s evaluation on this rank (``env``: its ``launch.env.DistEnv``, the process group
    started; ``placement``: :class:`Evaluator`'s); every rank returns the same result dict."""
    ev = Evaluator(source, exp, env, placement)
    source.state = None  # the model holds its shards now
    sums = ev.loss_sums(tokens)
    n = len(tokens) - 1
    base = req.bucket or default_bucket(n)
    result = {"source": source.path, "kind": source.kind, "seq_len": n, "tokens": int(sums[1].sum()),
              "loss": mean_loss(sums), "bucket": base, "loss_by_position": bucket_losses(sums, position_buckets(n, base)),
              "world_size": env.world_size, "cp": ev.dims.cp, "tp": ev.dims.tp,
              "cp_impl": str(ev.cp_impl) if ev.cp_impl else None}
    if trials:
        correct = [passkey_correct(t, ev.predictions(t.ids)) for t in trials]
        result["passkey"] = passkey_report(trials, correct)
    return result


def format_report(result: dict) -> str:
    """The readable table (``--json`` prints ``result`` instead)."""
    lines = [f"{result['source']} ({result['kind']}): {result['tokens']:,} tokens, mean loss {result['loss']:.4f} "
             f"nats/token (world {result['world_size']}, cp {result['cp']}"
             + (f" {result['cp_impl']}" if result.get("cp_impl") else "") + f", tp {result['tp']})",
             "", f"{'positions':>14}  {'tokens':>9}  {'loss':>8}"]
    for b in result["loss_by_position"]:
        loss = "-" if b["loss"] is None else f"{b['loss']:.4f}"
        lines.append(f"{bucket_label(b['start'], b['end']):>14}  {b['tokens']:>9,}  {loss:>8}")
    if "passkey" in result:
        pk = result["passkey"]
        lines += ["", f"passkey retrieval: {pk['accuracy']:.0%} of {pk['trials']} trials",
                  f"{'length':>8}  {'depth':>6}  {'accuracy':>8}"]
        for c in pk["by_length_depth"]:
            lines.append(f"{c['length']:>8}  {c['depth']:>6.2f}  {c['correct']:>3}/{c['trials']:<4}")
    return "\n".join(lines)
