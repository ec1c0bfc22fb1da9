"""Peak memory per rank, by part: what ``loomtrain plan`` prints and ``--memory-gib`` searches.

The peak is the largest of three moments of a step, each a sum of what is alive then:

- **loss**: the forward is done; every activation the checkpoint mode keeps is alive (under pipeline
  parallelism, those of the schedule's in-flight microbatches), and the cross entropy's backward holds the fp32
  log-softmax, its incoming gradient and its input's gradient (3 x 4 bytes per logit; the whole shard of logits, or
  one chunk of ``train.loss_chunk_tokens`` under the chunked loss, which keeps the hidden states instead); a
  pipeline's last stage also holds its output, the logits, which the schedule keeps until that microbatch's backward
  (measured: 16 MiB of the 1 x 1,024-token microbatches of ``scripts/bench_memory.py``'s pp case).
- **first block's backward** and **last block's backward**: the kept activations of the blocks not yet done, the
  block's recomputed forward (``full``/``selective``: what ``none`` would have kept for it), its gradient
  temporaries (two of the SwiGLU width and two of the model width per token), and the parameter gradients
  made so far (set to None after each step, they grow during backward).
- **optimizer**: every gradient (fused AdamW makes no whole-model temporaries).

Always alive: fp32 parameters, gradients' accumulation buffers, AdamW's two fp32 moments (one rank's shard of all
three under FSDP), FSDP's gathered units in the working dtype (three blocks and the output unit; every unit of a
pipeline stage or, in ``sp_mode: adaptive``, the whole model, with its unsharded gradients; ``adaptive_sharded``
reshards as static layouts do and accumulates a shard of the gradients, reduce-scattered after every forward),
autocast's bf16 weight copies without FSDP (cached for the step: every matmul keeps its weight's), communication
buffers, and the runtime.

What is saved per block comes from the model family (``saved_per_token``); the modes combine it:
``none`` keeps it all, ``full`` keeps the block input, ``selective`` keeps the block input and the matmul and
attention outputs in every ``ac_every``-th block (the others keep everything), ``offload`` keeps on the device
only what is below the copy threshold and the blocks in flight (two), the rest waits in host memory -- on CPU host
memory is the device, so offload saves nothing there and its host buffers are counted as the device's.

Runtime: on CUDA the context and the caching allocator's slack (not in ``torch.cuda.max_memory_allocated``, so
left out of what that measures); on CPU the modules, data and gloo buffers the trainer adds to the process (measured
once on this code: ``CPU_RUNTIME``; adaptive sp adds the planner's scipy, ``CPU_PLANNER``).
"""
from __future__ import annotations

from dataclasses import replace

from loomtrain.parallel.ac import parse_mode

MiB, GiB = 2 ** 20, 2 ** 30
CPU_RUNTIME = 46 * MiB  # the trainer's growth of a process beyond its parameters before step 1 (bench_memory.py)
CPU_PLANNER = 40 * MiB  # adaptive sp on CPU: scipy.optimize (the planner's MILP), imported by the process (measured)
CUDA_CONTEXT = 0.75 * GiB  # CUDA context, cuBLAS/cuDNN workspaces: outside the allocator's counters
CUDA_SLACK = 0.05  # the caching allocator's reserved-but-unallocated share under a steady step
OFFLOAD_IN_FLIGHT = 2  # blocks an offloading device still holds: the one computing and the one copying


def _save_groups(save_ops: str) -> set[str]:
    """``matmul`` and/or ``attention``: which of the model's op groups ``parallel.ac_save_ops`` keeps (an aten
    name counts for its group)."""
    from loomtrain.parallel.ac import SAVE_OPS

    groups = set()
    for name in (n.strip() for n in save_ops.split(",") if n.strip()):
        groups.add("matmul" if name in ("matmul", "mm", "addmm", "bmm") else "attention" if name in SAVE_OPS else "")
    return groups - {""}


def _mode_parts(exp):
    return parse_mode(exp.parallel.activation_checkpoint)


def estimate(exp, args, dims, device_type: str) -> dict:
    """``{"parts": {name: bytes}, "moment": which, "peak": bytes, "host": bytes offloaded, "moments": {...}}`` for
    the busiest rank (pipeline: the first or the last stage, whichever is larger)."""
    stages = [(True, dims.pp == 1)] if dims.pp == 1 else [(True, False), (False, True)]
    results = [_rank(exp, args, dims, device_type, first, last) for first, last in stages]
    return max(results, key=lambda r: r["peak"])


def _rank(exp, args, dims, device_type: str, first: bool, last: bool) -> dict:
    from loomtrain.parallel.engines import ENGINES
    from loomtrain.parallel.sp import SP_MODES
    from loomtrain.trainer.checks import micro_layout

    par, cuda = exp.parallel, device_type == "cuda"
    bf16 = exp.model.dtype == "bfloat16"
    fsdp = dims.fsdp_enabled and ENGINES.get(par.dp_engine).applies_fsdp
    sp_kind = SP_MODES.get(par.sp_mode)
    adaptive = sp_kind.adaptive  # one row per forward, several forwards per step
    gathered_step = sp_kind.uneven  # every unit gathered for the whole step
    sharded_acc = fsdp and sp_kind.sharded_accumulation  # gradients reduce-scattered after every forward
    e = 2 if bf16 else 4
    r = 2 if bf16 and fsdp else 4  # FSDP casts the parameters (everything bf16); autocast keeps fp32 residuals
    micro, n_micro = micro_layout(exp, dims)
    if adaptive:
        micro = 1
    tokens = micro * exp.data.seq_len / dims.cp  # this rank's tokens per forward (before tp's sequence split)
    tp, vocab, h = dims.tp, args.vocab_size, args.dim
    layers = args.n_layers / dims.pp
    n = args.num_params()
    embed, head = vocab * h, vocab * h + h
    block = (n - embed - head) / args.n_layers
    mine = (block * layers + (embed if first else 0) + (head if last else 0)) / tp  # this rank's model part
    shard = dims.dp_shard * dims.cp if fsdp else 1
    parts = {"parameters (fp32)": 4 * mine / shard}
    parts["optimizer state (AdamW, fp32)"] = 8 * mine / shard
    from loomtrain.parallel.dp_sync import DP_SYNC

    if copies := DP_SYNC.get(par.dp_sync).state_copies(exp):
        parts["outer state (dp_sync)"] = 4 * copies * mine / shard
    grads_all = 4 * mine / shard
    if fsdp and (shard > 1 or adaptive):
        gathered = (mine if gathered_step or dims.pp > 1 else (3 * block + (head if last else 0)) / tp)
        parts["FSDP gathered parameters"] = e * gathered
        accumulating = n_micro > 1 or adaptive
    else:
        accumulating = n_micro > 1
        if bf16 and not fsdp:
            parts["bf16 weight copies (autocast cache)"] = 2 * (mine - (embed / tp if first else 0))
    if accumulating and fsdp and (shard > 1 or adaptive) and not sharded_acc:
        parts["accumulation gradients (unsharded fp32)"] = 4 * mine
        grads_all = 4 * mine / shard  # the sharded ones appear at the last reduce-scatter

    # activations, per token of this rank's shard
    modes = _mode_parts(exp)
    saved = args.saved_per_token(device_type, e, r)
    per = {k: sum(b / (tp if split else 1) for _, b, split in v) for k, v in saved.items()}
    # parallel.tiled_mlp_tokens (one tile when it covers the forward's tokens: the MLP runs untiled, parallel/
    # tiled_mlp.py): the MLP keeps only its input (the norm output, counted); each tile's w1/w3 outputs, silu and
    # product exist in the tile's own forward and its recompute. Under selective checkpointing the policy's cache
    # still keeps every tile's matmul outputs until the block's backward: no saving there.
    tile = par.tiled_mlp_tokens if 0 < par.tiled_mlp_tokens < tokens else 0
    ffn_tok = e * args.ffn_hidden / tp  # bytes per token of one (B, S, ffn) tensor of a tp rank
    if tile:
        per["none"] -= 4 * ffn_tok
    none_b, input_b = per["none"], per["input"]
    if "selective" in modes:
        every = par.ac_every
        groups = _save_groups(par.ac_save_ops)
        kept_ckpt = input_b + sum(per[g] for g in groups)
        frac = 1 / every  # share of blocks checkpointed
        keep = frac * kept_ckpt + (1 - frac) * none_b
        redo = (per["recompute, matmul and attention kept"] if groups == {"matmul", "attention"} else
                per["recompute, matmul kept"] if groups == {"matmul"} else none_b)
    elif "full" in modes:
        keep, redo = input_b, none_b
    else:
        keep, redo = none_b, 0.0
    offload = "offload" in modes
    in_flight = 1
    if dims.pp > 1:  # microbatches whose activations the stage holds when its first backward starts
        in_flight = n_micro if par.pp_schedule == "gpipe" else min(n_micro, dims.pp) if first else 1
    act_tokens = tokens * in_flight
    shared = args.shared_saved_per_token() * act_tokens
    work = (2 * e * args.ffn_hidden + 2 * e * h) / tp * tokens  # one block's backward temporaries
    if tile:  # the MLP's backward runs per tile: its temporaries, and the recomputed tile's four tensors
        work += (2 + 4) * ffn_tok * tile - 2 * ffn_tok * tokens
    host = 0.0
    kept_all = keep * layers * act_tokens
    if offload:
        host = kept_all
        kept_all = min(kept_all, OFFLOAD_IN_FLIGHT * keep * tokens)
        if not cuda:  # host memory is this memory: the copies stay counted, plus the block being copied
            kept_all, host = host + keep * tokens, 0.0
    label = par.activation_checkpoint
    parts[f"activations ({label})"] = kept_all + shared
    # logits and loss (last stage only)
    chunk = exp.train.loss_chunk_tokens
    lp = tp if (tp > 1 and par.loss_parallel) else 1
    loss = 0.0
    if last:
        rows = min(tokens, chunk) if chunk else tokens
        logits = rows * vocab / lp
        # fp32 log-softmax, its gradient and the input's gradient; torch's vocabulary-parallel log-softmax
        # (tensor/parallel/loss.py) holds the logits, their shifted copy, its exp and the result at once
        loss = (16 if lp > 1 else 12) * logits + (e * logits if bf16 else 0)
        if dims.pp > 1 and not chunk:  # the schedule keeps the stage's output, the logits, until its backward
            loss += e * logits
        if chunk:  # the hidden states stay (the head runs per chunk); their gradient builds up over the chunks
            loss += (r + 4) * tokens * h / tp
        else:
            loss += per["head"] * tokens
        parts["logits and loss" + (f" (chunks of {chunk} tokens)" if chunk else "")] = loss
    # communication buffers: FSDP's reduce-scatter input (one block's unsharded gradient, fp32); tp's gathered
    # layer input; a pipeline stage's send/receive buffers; cp's ring of k/v blocks in flight
    comm = 0.0
    if fsdp and shard > 1:
        comm += 4 * block / tp
    if tp > 1:
        comm += 2 * e * tokens * h
    if dims.pp > 1:
        comm += 4 * r * micro * exp.data.seq_len / dims.cp * h / tp
    if dims.cp > 1:
        kv = args.n_kv_heads * args.head_dim
        comm += 4 * e * tokens * kv / tp
    if comm:
        parts["communication buffers"] = comm
    base = sum(parts.values()) - kept_all - shared - loss
    grad_block = 4 * block / tp / shard
    grad_head = 4 * (head / tp if last else 0) / shard
    early = grads_all if (accumulating and not fsdp) or sharded_acc or (dims.pp > 1 and par.pp_schedule != "gpipe") \
        else 0.0  # gradients of earlier forwards of the step (sharded ones under sharded accumulation)
    moments = {
        "loss": base + kept_all + shared + loss + early,
        "first block backward": base + kept_all + shared + redo * tokens + work + max(early, grad_head + grad_block),
        "last block backward": base + (kept_all + shared) / layers + redo * tokens + work + max(early, grads_all),
        "optimizer": base + grads_all,
    }
    moment = max(moments, key=moments.get)
    extra = moments[moment] - base - kept_all - shared - loss
    if moment == "optimizer":
        parts[f"activations ({label})"] = 0.0
        parts = {k: (0.0 if k.startswith("logits") else v) for k, v in parts.items()}
    parts["gradients and backward temporaries"] = extra
    device_peak = moments[moment]
    if cuda:
        runtime = CUDA_CONTEXT + CUDA_SLACK * device_peak
    else:
        runtime = CPU_RUNTIME + (CPU_PLANNER if adaptive else 0)
    parts["runtime and allocator"] = runtime
    return {"parts": parts, "moment": moment, "moments": moments, "allocated": device_peak,
            "peak": device_peak + runtime, "host": host}


def longest_sequence(exp, args_for, dims, device_type: str, budget: float, multiple: int) -> tuple[int, float]:
    """The longest ``data.seq_len`` (a multiple of ``multiple``) whose estimated peak fits ``budget`` bytes, and that
    peak; (0, peak at ``multiple``) when even that does not fit. ``args_for(seq_len)``: the model's args at it (its
    RoPE table grows with it)."""
    def peak(s):
        e = replace(exp, data=replace(exp.data, seq_len=s))
        return estimate(e, args_for(s), dims, device_type)["peak"]

    lo, hi = 0, multiple
    if peak(multiple) > budget:
        return 0, peak(multiple)
    while peak(hi) <= budget and hi < 2 ** 34:
        lo, hi = hi, hi * 2
    while hi - lo > multiple:
        mid = (lo + hi) // 2 // multiple * multiple
        if mid <= lo:
            break
        lo, hi = (mid, hi) if peak(mid) <= budget else (lo, mid)
    return lo, peak(lo)
