"""``loomtrain plan``: what a layout costs before any real process group starts.

Builds the DeviceMesh on torch's fake process group (so degrees and flattening are
checked by the same code the trainer runs), then prints group sizes, which ranks
share a node, parameter count, FLOPs per token and a per-device memory estimate.

Memory: the peak per rank by part, from ``launch/memory.py`` (which moment of the step it is, every
activation_checkpoint mode and the chunked loss), and with ``--memory-gib`` the longest sequence that fits per mode.
"""
from __future__ import annotations

import math

from loomtrain.data.batching import BATCHINGS
from loomtrain.device import job_device_type
from loomtrain.launch.cp_links import cluster_links
from loomtrain.parallel.mesh import ParallelDims
from loomtrain.parallel.sp import SP_MODES
from loomtrain.trainer.checks import REFERENCE_TFLOPS, check_experiment, cp_attention, micro_layout, tokens_per_step
from loomtrain.trainer.models import model_family

GiB = 1024 ** 3


ASSUMED_VOCAB = 50304  # GPT-2's, padded: only when neither model.vocab_size nor the data's tokenizer is readable


def planned_model_args(exp):
    """(model args, where the vocabulary came from), as ``train`` would build them: ``model.vocab_size``, else
    the prepared data's or tokenizer's vocabulary (rounded up by the model family); a stated assumption only
    where those files are not on this machine."""
    from loomtrain.data.prepare import data_vocab
    from loomtrain.errors import ConfigError

    if exp.model.vocab_size:
        vocab, source = exp.model.vocab_size, "model.vocab_size"
    else:
        try:
            vocab, source = data_vocab(exp.data)
            source = f"the tokenizer's {vocab} ({source})"
        except ConfigError as e:
            vocab, source = ASSUMED_VOCAB, f"ASSUMED {ASSUMED_VOCAB}: {e}; set model.vocab_size"
    return model_family(exp.model.family).args(exp.model, vocab, exp.data.seq_len), source


def build_fake_mesh(dims: ParallelDims):
    """Build the real DeviceMesh on the fake backend (no communication), then tear it down."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    already = dist.is_initialized()
    if not already:
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=dims.world_size)
    try:
        meshes = dims.build_mesh("cpu")
        return {name: meshes[name].size() for name in dims.order + tuple(dims.FLATTENED)}
    finally:
        if not already:
            dist.destroy_process_group()


def memory_estimate(exp, args, dims: ParallelDims, vocab: int, device_type: str | None = None) -> dict[str, float]:
    """Bytes per rank by part at the step's peak (``launch/memory.py``); ``vocab`` is ``args.vocab_size``'s (kept
    for callers). ``device_type``: the run's (default: ``parallel.device``'s)."""
    from loomtrain.launch.memory import estimate

    return estimate(exp, args, dims, device_type or job_device_type(exp.parallel.device))["parts"]


MODES_SHOWN = ("none", "full", "selective", "offload", "full+offload")


def memory_lines(exp, args, dims: ParallelDims, device: str, device_memory_gb: float) -> tuple[list[str], float]:
    """(the plan's memory section, the estimated peak in bytes)."""
    from loomtrain.launch.memory import estimate

    est = estimate(exp, args, dims, device)
    lines = [f"peak memory per rank (estimate; at the {est['moment']}; "
             f"activation_checkpoint {exp.parallel.activation_checkpoint}"
             + (f", loss chunks of {exp.train.loss_chunk_tokens} tokens" if exp.train.loss_chunk_tokens else "")
             + "):"]
    for k, v in est["parts"].items():
        lines.append(f"  {k:<44}{v / GiB:>10.2f} GiB")
    lines.append(f"  {'total':<44}{est['peak'] / GiB:>10.2f} GiB"
                 + (f"  of {device_memory_gb:g} GiB" if device == "cuda" else "  (CPU: host memory)"))
    if est["host"]:
        lines.append(f"  {'offloaded to host memory':<44}{est['host'] / GiB:>10.2f} GiB")
    if device == "cuda":
        lines.append(f"  (torch.cuda.max_memory_allocated would read about {est['allocated'] / GiB:.2f} GiB: "
                     "the total less the context and the allocator's slack)")
    by_mode = []
    for mode in MODES_SHOWN:
        if mode == exp.parallel.activation_checkpoint:
            continue
        other = estimate(_with_mode(exp, mode), args, dims, device)
        by_mode.append(f"{mode} {other['peak'] / GiB:.2f}")
    lines.append("  other activation_checkpoint modes (GiB): " + ", ".join(by_mode))
    return lines, est["peak"]


def _with_mode(exp, mode: str):
    """``exp`` with another ``parallel.activation_checkpoint`` (selective with its default op list)."""
    from dataclasses import replace

    from loomtrain.parallel.ac import DEFAULT_SAVE_OPS

    sel = "selective" in mode
    return replace(exp, parallel=replace(exp.parallel, activation_checkpoint=mode,
                                         ac_every=exp.parallel.ac_every if sel else 1,
                                         ac_save_ops=exp.parallel.ac_save_ops if sel else DEFAULT_SAVE_OPS))


def longest_sequence_lines(exp, dims: ParallelDims, device: str, memory_gib: float) -> list[str]:
    """``--memory-gib``: per activation_checkpoint mode, the longest ``data.seq_len`` whose estimated peak fits."""
    from dataclasses import replace

    from loomtrain.launch.memory import longest_sequence
    from loomtrain.trainer.models import model_family

    family = model_family(exp.model.family)
    args0, _ = planned_model_args(exp)

    def args_for(seq_len):
        m = replace(exp.model, vocab_size=args0.vocab_size, max_seq_len=0)
        return family.args(m, args0.vocab_size, seq_len)

    multiple = 2 * dims.cp * dims.tp  # zigzag chunks under cp; whole tokens per tp rank
    chunk = exp.train.loss_chunk_tokens
    lines = [f"longest sequence per rank within {memory_gib:g} GiB (data.seq_len, {multiple}-token steps; "
             f"micro-batch and layout as configured; loss " + (f"chunks of {chunk} tokens" if chunk else "unchunked")
             + "):",
             f"  {'activation_checkpoint':<24}{'data.seq_len':>14}{'tokens per rank':>18}{'peak (GiB)':>12}"]
    for mode in MODES_SHOWN:
        s, peak = longest_sequence(_with_mode(exp, mode), args_for, dims, device, memory_gib * GiB, multiple)
        shown = f"{s:,}" if s else "none fits"
        lines.append(f"  {mode:<24}{shown:>14}{s // dims.cp:>18,}{peak / GiB:>12.2f}")
    return lines


def traffic_per_step(exp, args, dims: ParallelDims, cp_impl=None) -> dict[str, float]:
    """Bytes one rank sends per optimizer step over each kind of group (ring formulas, as comms/traffic.py
    counts them): ``tp`` (sequence parallel: 2 all-gathers + 2 reduce-scatters of the layer's activations
    forward, the same backward), ``dp_shard_cp`` (FSDP: parameter all-gathers forward and backward in
    the working dtype, fp32 gradient reduce-scatter), ``dp_replicate`` (HSDP's fp32 all-reduce of the
    gradient shard), ``cp`` (``parallel/cp/cost.py``) and ``pp`` (each microbatch's activations forward
    and their gradients backward across a stage boundary). ``cp_impl``: the cp strategy (default:
    ``checks.cp_attention``'s, what train runs)."""
    from loomtrain.parallel.cp import strategy
    from loomtrain.parallel.cp.cost import Shape

    e = 2 if exp.model.dtype == "bfloat16" else 4
    micro, n_micro = micro_layout(exp, dims)  # under pp: the schedule's microbatches
    s, h, layers = exp.data.seq_len, args.dim, args.n_layers / dims.pp
    act = s / dims.cp * micro * h * e
    params = args.num_params() / dims.tp / dims.pp
    shard = dims.dp_shard * dims.cp
    out = {"tp": 8 * act * (dims.tp - 1) / dims.tp * layers * n_micro if dims.tp > 1 else 0.0,
           "dp_shard_cp": (2 * params * e + params * 4) * (shard - 1) / shard if dims.fsdp_enabled else 0.0,
           "dp_replicate": _outer_sync_bytes(exp, params / shard, dims.dp_replicate),
           # each of a rank's v stages hands its microbatches on (interleaved: v boundaries per rank)
           "pp": 2 * act / dims.tp * n_micro * exp.parallel.pp_virtual_stages * (dims.pp - 1) / dims.pp
           if dims.pp > 1 else 0.0,
           "cp": 0.0}
    if dims.cp > 1:
        impl = cp_impl or cp_attention(exp, args, dims, cluster_links(exp, dims))
        shape = Shape(micro, s, args.n_heads // dims.tp, args.n_kv_heads // dims.tp, args.head_dim, dims.cp, e)
        out["cp"] = sum(strategy(impl).bytes_per_rank(shape)) * layers * n_micro
    return out


def _outer_sync_bytes(exp, shard_params: float, replicas: int) -> float:
    """Bytes per step a rank sends to its dp_replicate peers, as the sync method counts them."""
    from loomtrain.parallel.dp_sync import DP_SYNC

    return DP_SYNC.get(exp.parallel.dp_sync).replica_bytes_per_step(exp, shard_params, replicas)


def step_estimate(exp, args, dims: ParallelDims, link, peak_flops: float, cp_impl=None) -> dict[str, float]:
    """Modelled seconds per optimizer step and MFU. ``link(dim)``: bytes/s per device of that dimension's
    slowest group (``dp_shard_cp`` for FSDP's group); ``cp_impl``: as :func:`traffic_per_step`.

    compute: FLOPs / (devices x peak), stretched by the pipeline bubble of the configured
    schedule ((p-1)/(m+p-1); interleaving divides the idle part by the virtual stages);
    tensor parallel and pipeline sends are exposed; FSDP's all-gather (forward and
    backward) and reduce-scatter and HSDP's all-reduce overlap compute, so only their excess
    shows; context parallel is exposed for Ulysses, overlapped for ring and TokenRing.
    """
    from loomtrain.parallel.pipeline import bubble_fraction

    _, n_micro = micro_layout(exp, dims)
    tokens = tokens_per_step(exp)
    compute = tokens * args.flops_per_token(exp.data.seq_len) / (dims.world_size * peak_flops)
    bubble = bubble_fraction(exp.parallel.pp_schedule, dims.pp, n_micro, exp.parallel.pp_virtual_stages)
    impl = (cp_impl or cp_attention(exp, args, dims, cluster_links(exp, dims))) if dims.cp > 1 else None  # as train
    sent = traffic_per_step(exp, args, dims, impl)
    t = {d: sent[d] / link(d) if sent[d] else 0.0 for d in sent}
    from loomtrain.parallel.cp import strategy

    overlapped = impl is not None and strategy(impl).overlaps_compute
    exposed_cp = max(0.0, t["cp"] - compute) if overlapped else t["cp"]
    fsdp = t["dp_shard_cp"] + t["dp_replicate"]
    step = compute / (1 - bubble) + t["tp"] + t["pp"] + max(0.0, fsdp - compute) + exposed_cp
    return {"compute_s": compute, "bubble": bubble, "tp_s": t["tp"], "fsdp_s": fsdp, "cp_s": t["cp"],
            "pp_s": t["pp"], "cp_impl": impl, "step_s": step, "mfu": compute / step}


def node_links(dims: ParallelDims, gpus_per_node: int, intra_bw: float, inter_bw: float):
    """``link(dim)`` for uniform nodes of ``gpus_per_node`` ranks in rank order."""
    def link(name):
        parts = ParallelDims.FLATTENED.get(name, (name,))
        spans = any(len({r // gpus_per_node for r in g}) > 1 for part in parts for g in dims.groups(part)[:1])
        return inter_bw if spans else intra_bw
    return link


def plan(exp, world_size: int, gpus_per_node: int = 8, device_memory_gb: float = 80.0,
         peak_tflops: float = 0.0, intra_node_gbps: float = 3600.0, inter_node_gbps: float = 400.0,
         cluster_file: str | None = None, memory_gib: float = 0.0) -> str:
    """The plan's text. ``cluster_file``: the step is modelled per fabric from that file (printed after this),
    so the two-tier node estimate is left out rather than contradicting it. ``memory_gib``: also the longest sequence
    per rank that fits in that much memory, per activation_checkpoint mode."""
    device = job_device_type(exp.parallel.device)
    dims = check_experiment(exp, world_size, min(gpus_per_node, world_size), device)  # refuses what train refuses
    sizes = build_fake_mesh(dims)
    args, vocab_source = planned_model_args(exp)
    nodes, per_node = math.ceil(world_size / gpus_per_node), min(gpus_per_node, world_size)
    lines = [f"plan: {dims.describe()}  ({nodes} node{'s' * (nodes > 1)} x {per_node} "
             f"{'GPU' if device == 'cuda' else 'CPU process'}{'es' * (device != 'cuda' and per_node > 1)}"
             f"{'s' * (device == 'cuda' and per_node > 1)})"]
    lines.append("")
    lines.append(f"{'dimension':<14}{'size':>6}{'groups':>8}  first group (ranks)         spans nodes")
    for name in dims.order:
        groups = dims.groups(name)
        first = groups[0]
        nodes = sorted({r // gpus_per_node for r in first})
        shown = ",".join(map(str, first[:8])) + (",..." if len(first) > 8 else "")
        lines.append(f"{name:<14}{sizes[name]:>6}{len(groups):>8}  {shown:<28}{len(nodes)}")
    for name in dims.FLATTENED:
        lines.append(f"{name:<14}{sizes[name]:>6}{world_size // sizes[name]:>8}  (flattened)")
    n = args.num_params()
    fpt = args.flops_per_token(exp.data.seq_len)
    tokens = tokens_per_step(exp)
    count = f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"
    lines += ["", f"model: {count} parameters ({args.n_layers} layers, dim {args.dim}, "
                  f"{args.n_heads}/{args.n_kv_heads} heads, ffn {args.ffn_hidden}, vocab {args.vocab_size} from "
                  f"{vocab_source})",
              f"FLOPs per token: {fpt / 1e9:.2f} GFLOP (6N + causal attention at seq {exp.data.seq_len})",
              (f"batch: whole documents up to {tokens:,} tokens/step (rows of {exp.data.seq_len}), "
               if BATCHINGS.get(exp.data.batching).whole_documents else
               f"batch: {exp.train.global_batch_size} sequences x {exp.data.seq_len} = {tokens:,} tokens/step, ") +
              f"{fpt * tokens / 1e15:.2f} PFLOP/step", "",
              ]
    mem_lines, total = memory_lines(exp, args, dims, device, device_memory_gb)
    lines += mem_lines
    if memory_gib:
        lines += [""] + longest_sequence_lines(exp, dims, device, memory_gib)
    peak = (peak_tflops or exp.logging.peak_tflops or REFERENCE_TFLOPS[exp.model.dtype]) * 1e12
    uneven = SP_MODES.get(exp.parallel.sp_mode).adaptive  # groups planned per step
    est = step_estimate(exp, args, dims, node_links(dims, gpus_per_node, intra_node_gbps * 1e9 / 8,
                                                    inter_node_gbps * 1e9 / 8), peak)
    if device != "cuda":
        lines += ["", "step estimate: none (parallel.device: cpu; the model is calibrated for GPUs)"]
    elif cluster_file:
        lines += ["", f"step estimate: per fabric of {cluster_file}, below"]
    elif uneven:
        lines += ["", "step estimate: the sample step below (documents of very different lengths: a uniform-row "
                      "estimate would leave out their attention)"]
    else:
        lines += ["", f"step estimate (model, not a measurement; peak {peak / 1e12:g} TFLOP/s/device, links "
                      f"{intra_node_gbps:g} Gbit/s in a node, {inter_node_gbps:g} Gbit/s between nodes):",
                  f"  compute {est['compute_s']:.3f} s, pipeline bubble {100 * est['bubble']:.1f}% "
                  f"({exp.parallel.pp_schedule if dims.pp > 1 else 'no pipeline'}), "
                  f"tensor-parallel {est['tp_s']:.3f} s exposed, pipeline sends {est['pp_s']:.3f} s, FSDP/HSDP "
                  f"{est['fsdp_s']:.3f} s (overlapped), "
                  f"context-parallel {est['cp_s']:.3f} s" + (f" ({est['cp_impl']})" if est["cp_impl"] else ""),
                  f"  estimated step time {est['step_s']:.3f} s, MFU {est['mfu']:.3f} "
                  "(a fraction, as in metrics.jsonl; upper bound: kernels assumed to run at peak)"]
    if uneven:  # groups planned per step: show a sample step's plan
        lines += [""] + adaptive_sample(exp, args, dims.dp, max(1, gpus_per_node // dims.tp), peak * dims.tp,
                                        intra_node_gbps, inter_node_gbps, dims.tp)
    warnings = []
    if dims.tp > gpus_per_node:
        warnings.append(f"tp={dims.tp} spans nodes ({gpus_per_node} devices per node): tensor-parallel traffic "
                        "would cross the slow inter-node links")
    if total > device_memory_gb * GiB:
        warnings.append(f"estimated {total / GiB:.1f} GiB exceeds the {device_memory_gb:g} GiB device: raise tp/pp/"
                        "dp_shard, enable activation checkpointing or lower the micro-batch")
    if est["bubble"] > 0.25:
        warnings.append(f"pipeline bubble {100 * est['bubble']:.0f}%: raise train.microbatches or use "
                        "parallel.pp_schedule=interleaved_1f1b with pp_virtual_stages > 1")
    lines += [""] + [f"warning: {w}" for w in warnings] if warnings else []
    return "\n".join(lines)


def plan_cluster(exp, cluster, peak_tflops: float = 0.0) -> dict:
    """``plan --cluster``: the NIC-aware placement against Megatron's default order (``launch/placement.py``)."""
    from loomtrain.launch.placement import compare

    dims = check_experiment(exp, cluster.world_size, max(h.devices for h in cluster.hosts),
                            job_device_type(exp.parallel.device))
    args, _ = planned_model_args(exp)
    peak = (peak_tflops or exp.logging.peak_tflops or REFERENCE_TFLOPS[exp.model.dtype]) * 1e12
    return compare(exp, args, dims, cluster, peak)


def adaptive_sample(exp, args, world: int, gpus_per_node: int, peak: float, intra_gbps: float,
                    inter_gbps: float, tp: int = 1) -> list[str]:
    """A sample step plan of ``sp_mode: adaptive``: synthetic long-tailed lengths (Pareto 1.1 from 512 tokens
    to data.max_doc_tokens) filling train.global_batch_tokens, planned with the cost model the trainer uses
    (declared alphas, or ones derived from the peak FLOP/s here: the trainer fits them on the machine).
    ``world`` counts the pool's members (tensor-parallel groups of ``tp`` devices, ``peak`` their sum)."""
    import random

    from loomtrain.parallel.sp.planner import plan_groups, static_makespan
    from loomtrain.parallel.cp.cost import Shape, attention_flops
    from loomtrain.parallel.sp.cost import SequenceCost
    from loomtrain.parallel.sp.planner import sp_degrees

    par, d = exp.parallel, exp.data
    max_doc, capacity = d.max_doc_tokens or d.seq_len, d.seq_len
    a1 = par.sp_alpha1 or attention_flops(Shape(1, 1024, args.n_heads, args.n_kv_heads, args.head_dim, 1)) \
        * args.n_layers / 1024 ** 2 / peak
    a2 = par.sp_alpha2 or 6.0 * args.num_params(embeddings=False) / peak
    cost = SequenceCost(a1, a2, args.n_heads // tp, args.n_kv_heads // tp, args.head_dim, args.n_layers,
                        2 if exp.model.dtype == "bfloat16" else 4, intra_gbps * 1e9 / 8, inter_gbps * 1e9 / 8,
                        par.cp_latency_us * 1e-6, gpus_per_node, par.cp_topology,
                        impls=() if par.cp_impl == "auto" else (par.cp_impl,))  # what train may pick
    rng, lengths = random.Random(0), []
    while sum(lengths) < exp.train.global_batch_tokens:
        lengths.append(int(min(max_doc, 512 * (1 - rng.random()) ** (-1 / 1.1))))
    plan = plan_groups(lengths, world, capacity, cost, degrees=sp_degrees(par, world),
                       ranks_per_node=gpus_per_node if world % gpus_per_node == 0 and gpus_per_node < world else None)
    out = [f"adaptive sp, sample step ({len(lengths)} synthetic long-tailed sequences, {sum(lengths):,} tokens, "
           f"longest {max(lengths):,}; {capacity:,} tokens per " + (f"tp group of {tp}):" if tp > 1 else "device):")]
    by_size = {}
    for ranks, seqs in plan.groups:
        longest = max(lengths[i] for i in seqs)
        by_size.setdefault(len(ranks), []).append((len(seqs), longest, cost.strategy(longest, len(ranks))))
    for size in sorted(by_size, reverse=True):
        groups = by_size[size]
        strategies = sorted({g[2] for g in groups})
        out.append(f"  {len(groups):>4} group(s) of {size:>4} {'tp group(s)' if tp > 1 else 'rank(s)'}: "
                   f"{sum(g[0] for g in groups):>5} sequences, "
                   f"longest {max(g[1] for g in groups):>8,} tokens, attention {'/'.join(strategies)}")
    statics = {deg: static_makespan(lengths, world, capacity, cost, deg)
               for deg in (2 ** k for k in range(world.bit_length())) if deg <= world}
    statics = {deg: t for deg, t in statics.items() if t < float("inf")}
    best = min(statics, key=statics.get) if statics else None
    vs = (f"; best static degree {best}: {statics[best]:.3f} s ({statics[best] / plan.makespan:.2f}x)" if best
          else "; no static degree holds the longest sequence")
    out.append(f"  predicted makespan {plan.makespan:.3f} s ({plan.method}){vs}")
    if SP_MODES.get(par.sp_mode).waves:  # every rank the same number of rows: FSDP stays sharded
        from loomtrain.parallel.sp.waves import plan_waves

        w = plan_waves(lengths, world, capacity, cost, tp=tp, degrees=sp_degrees(par, world),
                       ranks_per_node=gpus_per_node if world % gpus_per_node == 0 and gpus_per_node < world else None)
        out.append(f"  in waves (sp_mode: {par.sp_mode}, FSDP sharded): {len(w.waves)} waves, {w.time:.3f} s "
                   f"({w.method}; {w.time / plan.makespan:.2f}x the makespan" +
                   (f", {statics[best] / w.time:.2f}x faster than static)" if best else ")"))
    return out
