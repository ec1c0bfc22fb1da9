"""``loomtrain plan``'s memory model (``launch/memory.py``): the saved activations per block against what autograd
really saves, the parts of a small config against hand-computed numbers, ``--memory-gib``'s answers, and the estimate
against the peak measured in the real trainer on CPU (``scripts/bench_memory.py``'s measurement)."""
from __future__ import annotations

import os
import sys

import pytest
import torch

SMALL = ["model.dim=256", "model.n_layers=4", "model.n_heads=8", "model.n_kv_heads=4", "model.vocab_size=4096",
         "model.ffn_hidden=704", "data.seq_len=1024", "train.global_batch_size=2", "parallel.dp_shard=1",
         "parallel.device=cpu", "model.dtype=float32"]


def _estimate(overrides, world=1, device="cpu"):
    from loomtrain.launch.memory import estimate
    from loomtrain.trainer.checks import check_experiment
    from loomtrain.trainer.config import load_config
    from loomtrain.trainer.models.llama.model import ModelArgs

    exp = load_config("tiny", SMALL + overrides)
    dims = check_experiment(exp, world, world, device)
    args = ModelArgs.from_config(exp.model, exp.model.vocab_size, exp.data.seq_len)
    return exp, args, dims, estimate(exp, args, dims, device)


def test_saved_activations_per_block_are_what_autograd_saves_on_cpu():
    """One block of the real model in fp32 on CPU, every tensor autograd saves counted once by storage (parameters
    left out): the model family's ``saved_per_token`` (``none``) plus the shared RoPE rows, per token, exactly."""
    from loomtrain.trainer.models.llama.model import ModelArgs, Transformer

    args = ModelArgs(dim=128, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=256, ffn_hidden=352, max_seq_len=256)
    model = Transformer(args)
    model.init_weights(0)
    model.hidden_output = True
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    embedded = []
    model.tok_embeddings.register_forward_hook(lambda m, i, o: embedded.append(o.untyped_storage().data_ptr()))
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.randint(0, 256, (2, 256)))
    tokens = 2 * 256
    per_block = sum(b for _, b, _ in args.saved_per_token("cpu", 4, 4)["none"])
    assert sum(seen.values()) == per_block * tokens + args.shared_saved_per_token() * tokens


def test_parts_of_a_small_config_match_hand_computed_numbers():
    """dim 256, 4 layers, GQA 8/4, ffn 704, vocab 4096, 2 x 1024 tokens, fp32, one CPU process, no checkpointing:
    peak at the loss's backward."""
    exp, args, dims, est = _estimate([])
    d, kv, f, V, T, L = 256, 128, 704, 4096, 2048, 4
    n = 2 * V * d + L * (2 * d * d + 2 * d * kv + 3 * d * f + 2 * d) + d
    assert args.num_params() == n
    parts = est["parts"]
    assert parts["parameters (fp32)"] == 4 * n
    assert parts["optimizer state (AdamW, fp32)"] == 8 * n
    block = 4 * (8 * d + 2 * kv + 4 * f + 8 + 2)  # per token: see saved_per_token's docstring
    assert parts["activations (none)"] == L * block * T + (4 * 32 + 8) * T
    head = 4 * (d + 1) + 4 * d + 4 * d  # final norm input, rstd, x*rstd, output
    assert parts["logits and loss"] == 12 * T * V + head * T
    assert est["moment"] == "loss"
    assert est["peak"] == sum(parts.values())
    # full checkpointing keeps each block's input and recomputes one block in backward
    _, _, _, full = _estimate(["parallel.activation_checkpoint=full"])
    assert full["parts"]["activations (full)"] == L * 4 * d * T + (4 * 32 + 8) * T
    # the chunked loss holds one chunk's logits, plus the hidden states and their gradient
    _, _, _, chunked = _estimate(["train.loss_chunk_tokens=256"])
    assert chunked["parts"]["logits and loss (chunks of 256 tokens)"] == 12 * 256 * V + 8 * T * d
    # on CPU offload saves nothing (host memory is this memory); on CUDA the device keeps two blocks
    _, _, _, off = _estimate(["parallel.activation_checkpoint=offload"])
    assert off["parts"]["activations (offload)"] == (L + 1) * block * T + (4 * 32 + 8) * T
    _, _, _, off_cuda = _estimate(["parallel.activation_checkpoint=offload"], device="cuda")
    assert off_cuda["host"] > 0 and off_cuda["parts"]["activations (offload)"] < off["parts"]["activations (offload)"]


def test_layouts_divide_what_they_split():
    """tp halves the head-sharded activations and the vocabulary-parallel logits, cp halves the tokens, FSDP over 4
    ranks quarters the states; pipeline 1F1B holds min(microbatches, pp) microbatches on its first stage, and its last
    stage the logits of its microbatch as well."""
    _, _, _, one = _estimate([])
    _, _, _, cp = _estimate(["parallel.cp=2", "data.seq_len=2048"], world=2)
    assert cp["parts"]["activations (none)"] == pytest.approx(one["parts"]["activations (none)"], rel=1e-9)
    _, _, _, fsdp = _estimate(["parallel.dp_shard=4", "train.global_batch_size=8"], world=4)
    assert fsdp["parts"]["optimizer state (AdamW, fp32)"] == one["parts"]["optimizer state (AdamW, fp32)"] / 4
    _, _, _, tp = _estimate(["parallel.tp=2"], world=2)
    assert tp["parts"]["activations (none)"] < 0.6 * one["parts"]["activations (none)"]
    _, _, _, pp = _estimate(["parallel.pp=2", "train.microbatches=4", "train.global_batch_size=8",
                             "parallel.pp_schedule=1f1b"], world=2)
    _, _, _, gpipe = _estimate(["parallel.pp=2", "train.microbatches=4", "train.global_batch_size=8",
                                "parallel.pp_schedule=gpipe"], world=2)
    assert gpipe["peak"] > pp["peak"]
    # the last stage's microbatch is one's forward (2 x 1,024 tokens) and also holds its logits (fp32): the schedule
    # keeps a stage's output until that microbatch's backward (bench_memory.py's pp case: 16 MiB)
    from loomtrain.launch import memory

    exp, args, dims, _ = _estimate(["parallel.pp=2", "train.microbatches=4", "train.global_batch_size=8"], world=2)
    last = memory._rank(exp, args, dims, "cpu", first=False, last=True)
    assert last["parts"]["logits and loss"] == one["parts"]["logits and loss"] + 4 * 2 * 1024 * 4096


def test_memory_gib_answers_are_monotone_and_consistent_with_the_estimate():
    """More memory never gives a shorter sequence; the answer's estimate fits, one step longer does not; full
    checkpointing reaches at least as far as none."""
    from dataclasses import replace

    from loomtrain.launch.memory import GiB, estimate, longest_sequence
    from loomtrain.trainer.models.llama.model import ModelArgs

    exp, args, dims, _ = _estimate([])

    def args_for(s):
        return ModelArgs.from_config(replace(exp.model, max_seq_len=0), exp.model.vocab_size, s)

    answers = []
    for gib in (0.5, 1, 2, 4):
        s, peak = longest_sequence(exp, args_for, dims, "cpu", gib * GiB, 2)
        assert s > 0 and peak <= gib * GiB
        longer = replace(exp, data=replace(exp.data, seq_len=s + 2))
        assert estimate(longer, args_for(s + 2), dims, "cpu")["peak"] > gib * GiB
        answers.append(s)
    assert answers == sorted(answers) and answers[0] < answers[-1]
    full = replace(exp, parallel=replace(exp.parallel, activation_checkpoint="full"))
    assert longest_sequence(full, args_for, dims, "cpu", GiB, 2)[0] > answers[1]
    assert longest_sequence(exp, args_for, dims, "cpu", 0.01 * GiB, 2)[0] == 0


def test_plan_prints_the_parts_and_the_longest_sequences(capsys):
    from loomtrain.launch.cli import main

    assert main(["plan", "tiny", "--world-size", "1", "--memory-gib", "2", "--set", "parallel.device=cpu"]) == 0
    out = capsys.readouterr().out
    for part in ("parameters (fp32)", "optimizer state", "activations (none)", "logits and loss",
                 "runtime and allocator", "longest sequence per rank within 2 GiB", "full+offload"):
        assert part in out, part
    assert main(["plan", "tiny", "--world-size", "1", "--memory-gib", "-1"]) == 2


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="measures the resident set through /proc")
@pytest.mark.parametrize("mode", ["none", "full"])
def test_estimate_is_within_15_percent_of_the_measured_cpu_peak(mode, tmp_path):
    """The real trainer, one process, 2 steps; measured as scripts/bench_memory.py measures (peak resident growth
    over the steps from before the trainer was built, malloc giving freed blocks back)."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
    import bench_memory

    from loomtrain.launch.forked import run_ranks

    prefix = bench_memory.prepared_corpus(str(tmp_path))
    ov = bench_memory.MODEL + ["train.steps=2", "train.global_batch_size=2", "data.seq_len=1024",
                               f"parallel.activation_checkpoint={mode}", f"data.prepared={prefix}",
                               f"train.output_dir={tmp_path}/run"]
    want = bench_memory.estimate(ov, 1)
    got = run_ranks(bench_memory.measure, 0, ov, timeout=120)[0]
    assert abs(want - got) / got < 0.15, (want / 2 ** 20, got / 2 ** 20)


@pytest.mark.parametrize("mode", ["none", "full", "selective"])
def test_tiled_mlp_keeps_only_one_tiles_intermediates(mode):
    """``parallel.tiled_mlp_tokens``: the blocks no longer keep SwiGLU's (B, S, ffn) tensors for backward (none: four
    of them; selective keeps every tile's matmul outputs in its cache anyway), only one tile's while its backward
    runs; full keeps block inputs either way, so only the backward's working set shrinks. (Measured on CPU by scripts/bench_tiled_mlp.py at 8K
    tokens: peak growth 0.59x none, 0.66x full; this model gives 0.54x and 0.66x for that shape, BENCHMARKS.md.)"""
    tokens, tile = 2 * 1024, 256
    _, args, _, plain = _estimate([f"parallel.activation_checkpoint={mode}"])
    _, _, _, tiled = _estimate([f"parallel.activation_checkpoint={mode}", f"parallel.tiled_mlp_tokens={tile}"])
    ffn_tok = 4 * args.ffn_hidden  # fp32: bytes per token of one (B, S, ffn) tensor
    label = f"activations ({mode})"
    # selective: the policy's cache keeps every tile's w1/w3 outputs until the block's backward (no saving)
    kept = {"none": 4, "selective": 0, "full": 0}[mode] * ffn_tok * tokens * args.n_layers
    assert plain["parts"][label] - tiled["parts"][label] == pytest.approx(kept)
    # a block's backward: the recomputed MLP holds one tile's four tensors (and temporaries), not the sequence's
    saved_in_backward = plain["moments"]["first block backward"] - tiled["moments"]["first block backward"]
    assert saved_in_backward >= kept + ffn_tok * (2 * tokens - 6 * tile)


def test_pipeline_steps_ask_the_schedule_not_to_keep_every_output():
    """The last stage would otherwise keep every microbatch's logits until the step ends (and concatenate them):
    bench_memory.py's pp case measured 270 MiB on the last stage with them, 218-222 without. Older torch (no
    ``return_outputs``) gets nothing it would hand to the model as a keyword."""
    import inspect

    from torch.distributed import pipelining

    from loomtrain.trainer.step import _no_outputs

    class Old:
        def step(self, *args, target=None, losses=None, **kwargs):
            pass

    assert _no_outputs(Old()) == {}
    for name in ("ScheduleGPipe", "Schedule1F1B", "ScheduleInterleaved1F1B"):
        cls = getattr(pipelining, name)
        if "return_outputs" not in inspect.signature(cls.step).parameters:
            pytest.skip("torch < 2.10: schedules take no return_outputs")
        assert _no_outputs(cls) == {"return_outputs": False}, name


def test_one_tile_is_no_tiling():
    """A tile as long as the forward's tokens runs the MLP untiled (``tiled_forward``): nothing is saved."""
    _, _, _, plain = _estimate(["parallel.activation_checkpoint=none"])
    _, _, _, one = _estimate(["parallel.activation_checkpoint=none", "parallel.tiled_mlp_tokens=2048"])
    assert one["peak"] == plain["peak"]
