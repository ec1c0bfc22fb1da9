"""Every check of a whole experiment against a world size, in one place, before any process group starts.

``train`` (``run``), ``plan`` and the CLI preflight all call :func:`check_experiment`, so the
three refuse exactly the same experiments with the same one-line :class:`ConfigError`
(the CLI prints it and exits 2). Static checks (types, choices, one-field ranges) are
``config.validate``, which ``load_config`` already ran; this adds what depends on the
world size, the node size and how the fields combine.
"""
from __future__ import annotations

from loomtrain.errors import ConfigError
from loomtrain.parallel.mesh import ParallelDims
from loomtrain.trainer.config import Experiment, pipeline_microbatches, validate


def check_experiment(exp: Experiment, world_size: int, local_world_size: int | None = None,
                     device_type: str | None = None) -> ParallelDims:
    """The experiment's ParallelDims for ``world_size`` ranks, or ConfigError naming the first bad field.

    ``device_type``: where it will run (``None``: where ``parallel.device`` resolves on this machine;
    ``plan`` passes ``cuda``, the cluster it plans for). Resolves ``model.dtype: auto`` for that device."""
    validate(exp)
    par = exp.parallel
    from loomtrain.device import device_type_for

    if device_type is None:
        device_type = device_type_for(par.device)
    from loomtrain.device import resolve_dtype

    exp.model.dtype = resolve_dtype(exp.model.dtype, device_type)  # auto: bf16 on CUDA, fp32 elsewhere
    if device_type == device_type_for(par.device):  # running here (not planning for another machine)
        _check_attention(exp, device_type)
        if exp.train.eval_by_position:
            from loomtrain.trainer.position_loss import require_matplotlib

            require_matplotlib("train.eval_by_position")
    if exp.train.eval_by_position and par.pp > 1:
        raise ConfigError("train.eval_by_position: not with parallel.pp > 1 (per-token losses are taken from the "
                          "model's logits; a pipeline's last stage alone has them); use pp=1 or leave it off")
    if par.compile and par.tp > 1 and device_type == "cpu":  # measured by tests/test_parallel_parity.py before
        raise ConfigError("parallel.compile: not with parallel.tp > 1 on CPU: compiled tensor-parallel blocks gave "
                          "gradient norms 0.7% off eager (and crashed with activation checkpointing) on torch "
                          "2.13's CPU inductor; use compile with tp=1 or tp without compile")
    dims = ParallelDims.from_config(par, world_size)
    from loomtrain.faulttol.layout import NodeLayout, identical_replicas

    NodeLayout.from_config(exp.faulttol, world_size, local_world_size or world_size, replicas=identical_replicas(dims))
    _check_batch(exp, dims)
    return dims


def _check_batch(exp: Experiment, dims: ParallelDims) -> None:
    """The batch plan, the sequence-parallel mode and the engine together; the global batch splits over data
    parallel, micro-batches and pipeline microbatches."""
    from loomtrain.data.batching import BATCHINGS
    from loomtrain.data.loader import batch_layout
    from loomtrain.parallel.engines import ENGINES
    from loomtrain.parallel.sp import SP_MODES

    batching, engine = BATCHINGS.get(exp.data.batching), ENGINES.get(exp.parallel.dp_engine)
    batching.check(exp)
    SP_MODES.get(exp.parallel.sp_mode).check(exp, dims)
    if batching.whole_documents:  # a varying number of rows per step
        if dims.pp > 1:
            raise ConfigError(f"data.batching: {exp.data.batching} gives a varying number of rows per step; pipeline "
                              f"schedules need a fixed one (use parallel.pp=1 or a fixed batching)")
        if not engine.varying_micro_batches:
            raise ConfigError(f"data.batching: {exp.data.batching} is not available with parallel.dp_engine="
                              f"{exp.parallel.dp_engine} (its accumulation steps are fixed)")
        return
    gbs = exp.train.global_batch_size
    local, _ = batch_layout(gbs, exp.train.micro_batch_size, dims.dp)
    m = pipeline_microbatches(exp)
    if dims.pp > 1 and local % m:
        raise ConfigError(f"train.microbatches: {m} must divide the per-rank batch {local} "
                          f"(train.global_batch_size {gbs} / data-parallel {dims.dp})")


def tokens_per_step(exp: Experiment) -> int:
    """Tokens of one optimizer step, as the batch plan counts them."""
    from loomtrain.data.batching import BATCHINGS

    return BATCHINGS.get(exp.data.batching).tokens_per_step(exp)


def rows_per_step(exp: Experiment) -> int:
    """Sequences of ``data.seq_len`` per step (documents: the fewest rows the budget packs into)."""
    return max(1, -(-tokens_per_step(exp) // exp.data.seq_len))


def micro_layout(exp: Experiment, dims: ParallelDims) -> tuple[int, int]:
    """(sequences per forward, forwards per step) on one data-parallel rank: pipeline microbatches
    under pp, else ``train.micro_batch_size`` (gradient accumulation) or the whole rank batch."""
    local = max(1, rows_per_step(exp) // dims.dp)
    if dims.pp > 1:
        n = pipeline_microbatches(exp)
        return max(1, local // n), n
    micro = exp.train.micro_batch_size or local
    return micro, max(1, local // micro)


def check_vocab(vocab_size: int, tokenizer_vocab: int, tp: int, source: str = "the tokenizer") -> None:
    """Once the tokenizer is known: the embedding covers it and splits over tensor parallel."""
    if vocab_size < tokenizer_vocab:
        raise ConfigError(f"model.vocab_size: {vocab_size} is smaller than the vocabulary of {source} "
                          f"({tokenizer_vocab})")
    if vocab_size % tp:
        raise ConfigError(f"model.vocab_size: {vocab_size} must be divisible by parallel.tp {tp}")


def _check_attention(exp: Experiment, device_type: str) -> None:
    """``model.attention`` can run on this machine in this dtype and head size (a forced backend that cannot is
    refused before any work, naming the ones that can)."""
    import torch

    from loomtrain.parallel.cp.block_kernels import run_backend

    m = exp.model
    try:
        run_backend(device_type, getattr(torch, m.dtype), m.dim // max(1, m.n_heads), m.attention)
    except ValueError as e:
        raise ConfigError(f"model.attention: {e}") from None


# Compute rate the cp_impl=auto choice assumes when logging.peak_tflops is not set: the H100 dense
# datasheet figure (what `plan` assumes too). A constant, not a measurement: every rank and `plan`
# make the same choice from the same config. One rate for every kernel-call shape: the cost model takes a rate
# per shape (`parallel/cp/cost.py::Rate`; ring's S/2W-token chunk pairs vs Ulysses' whole sequence) where one
# was measured (scripts/bench_context_tiers.py on CPU), but no GPU's per-shape rates have been.
REFERENCE_TFLOPS = {"bfloat16": 989.0, "float32": 494.0}


def cp_attention(exp: Experiment, args, dims: ParallelDims, links=None):
    """The context-parallel attention strategy: the configured one (a name; a two-dimensional strategy bound to
    ``parallel.cp_ulysses``), or for ``auto`` the cost model's fastest for this model shape and the cp links:
    read from ``parallel.cluster`` for the run's real cp groups when one is set and the link numbers below are
    left at their defaults (``launch/cp_links.py``: the tier across, and only the Ulysses group sizes whose
    groups sit on a faster tier), else the configured ones (``parallel.cp_link_gbps``; with
    ``cp_inner_link_gbps`` also the two-dimensional splits), with ``cp_latency_us`` and ``cp_topology``.
    ``links``: the ``launch/cp_links.py::CpLinks`` the launcher read from ``parallel.cluster`` (None: the
    configured numbers). A pure function of the experiment (and the cluster file), so identical on every rank."""
    par = exp.parallel
    if par.cp_ulysses:  # a two-dimensional strategy (validated): bound to its Ulysses group size
        from loomtrain.parallel.cp import strategy

        return strategy(par.cp_impl).with_ulysses(par.cp_ulysses)
    if par.cp_impl != "auto":
        return par.cp_impl
    from loomtrain.parallel.cp import choose
    from loomtrain.parallel.cp.cost import Shape

    micro, _ = micro_layout(exp, dims)
    shape = Shape(micro, exp.data.seq_len, args.n_heads // dims.tp, args.n_kv_heads // dims.tp,
                  args.head_dim, dims.cp, elem_bytes=2 if exp.model.dtype == "bfloat16" else 4)
    flops = (exp.logging.peak_tflops or REFERENCE_TFLOPS[exp.model.dtype]) * 1e12
    across, inner = links.bandwidths() if links else (par.cp_link_gbps * 1e9 / 8, par.cp_inner_link_gbps * 1e9 / 8)
    return choose(shape, across, par.cp_latency_us * 1e-6, flops, par.cp_topology, inner_bandwidth=inner or None)
