"""Llama-style decoder: RMSNorm, RoPE, SwiGLU, grouped-query attention.

Parallelism is not in here: ``loomtrain.parallel.parallelize`` applies TP/FSDP/AC/compile
from outside. The model therefore never assumes head counts: it derives the local
number of heads from the projected tensor's shape, so the same code runs on a
tensor-parallel shard. Packed sequences carry ``doc_ids``; attention never crosses a
document boundary and RoPE positions restart at each document.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from loomtrain.parallel.cp.attention import DocumentAttention
from loomtrain.trainer.attention import attend, document_block_mask, flash_varlen_metadata


@dataclass
class ModelArgs:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    ffn_hidden: int
    max_seq_len: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    init_std: float = 0.02
    attention: str = "auto"
    rope_scaling: dict | None = None  # transformers' rope_parameters of a scaled RoPE (rope_type linear|llama3|yarn)
    qkv_bias: bool = False  # biases on the q, k and v projections (Qwen2); set by the model family

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def from_config(cls, m, vocab_size: int, seq_len: int) -> "ModelArgs":
        ffn = m.ffn_hidden or m.ffn_multiple_of * math.ceil(int(8 * m.dim / 3) / m.ffn_multiple_of)
        vocab = m.vocab_size or 64 * math.ceil(vocab_size / 64)
        return cls(m.dim, m.n_layers, m.n_heads, m.n_kv_heads, vocab, ffn, m.max_seq_len or seq_len,
                   m.norm_eps, m.rope_theta, m.init_std, m.attention, m.rope_scaling.parameters())

    def num_params(self, embeddings: bool = True) -> int:
        d, kv = self.dim, self.n_kv_heads * self.head_dim
        block = d * d * 2 + 2 * d * kv + 3 * d * self.ffn_hidden + 2 * d + (d + 2 * kv if self.qkv_bias else 0)
        total = self.n_layers * block + d + self.vocab_size * d  # blocks, final norm, output
        return total + (self.vocab_size * d if embeddings else 0)

    def saved_per_token(self, device_type: str, working: int, residual: int) -> dict[str, list[tuple]]:
        """What one block keeps for backward per token of its (cp) sequence shard, as the code above runs:
        ``{"none": [...], "input": [...], "matmul": [...], ...}``, each a list of (what, bytes, split over tp). ``working``: bytes of
        the matmul dtype (2 in bf16); ``residual``: of the residual stream (4 under autocast, whose embeddings and
        residual adds stay fp32; 2 under FSDP's bf16 parameters). Not split over tp: the all-gathered input of a
        column-parallel matmul and a row-parallel matmul's partial sums (sequence parallelism splits the rest,
        heads or tokens).

        ``none`` (counted with saved-tensor hooks, ``tests/test_memory_model.py``): the two RMSNorms keep their
        inputs (the block input and the residual after attention) and rstd, on CPU also ``x * rstd`` (the
        norm runs in fp32 there, CUDA's fused kernel needs only rstd); the norm outputs feed the matmuls; RoPE
        keeps only the cos/sin rows (shared by all blocks, :meth:`shared_saved_per_token`); attention keeps the
        rotated q and k, v, its output and the log-sum-exp (fp32 per head); SwiGLU keeps w1's and w3's outputs,
        silu's and the product. ``selective`` (torch's selective checkpointing, ``parallel/ac.py``'s default op
        list): the block input and the output of every matmul and attention call, needed by backward or not."""
        d, kv, f, e, r = self.dim, self.n_kv_heads * self.head_dim, self.ffn_hidden, working, residual
        none = [("block input and residual", 2 * r * d, True),
                ("norm statistics" + (" and x*rstd" if device_type != "cuda" else ""),
                 8 + (8 * d if device_type != "cuda" else 0), True),
                ("norm outputs (matmul inputs)", 2 * e * d, False),
                ("rotated q, k; v", e * (d + 2 * kv), True),
                ("attention output, lse", e * d + 4 * self.n_heads, True),
                ("SwiGLU", 4 * e * f, True)]
        # selective, by ``parallel.ac_save_ops`` group: the block input, then the outputs of that group's ops
        matmul = [("q, k, v", e * (d + 2 * kv), True), ("w1, w3", 2 * e * f, True),
                  ("wo, w2 (partial sums under tp)", 2 * e * d, False)]
        attention = [("attention output, lse", e * d + 4 * self.n_heads, True)]
        # what a selectively checkpointed block's backward recomputes and holds: ``none``'s less the cached outputs
        redo_matmul = none[:3] + [("rotated q, k", e * (d + kv), True), ("silu, product", 2 * e * f, True)]
        # the head (final norm, output projection) keeps what a block's attention norm keeps, once
        head = [("final norm input" + (", x*rstd" if device_type != "cuda" else ""),
                 r * d + 4 + (4 * d if device_type != "cuda" else 0), True), ("final norm output", e * d, False)]
        return {"none": none, "head": head, "input": [("block input", r * d, True)], "matmul": matmul, "attention": attention,
                "recompute, matmul kept": redo_matmul + attention, "recompute, matmul and attention kept": redo_matmul}

    def shared_saved_per_token(self) -> float:
        """Bytes per token every block shares: the fp32 RoPE cos/sin rows and the position ids."""
        return 4 * self.head_dim + 8

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 x matmul parameters + causal attention (6 * L * dim * S).

        The input embedding is a lookup, not a matmul, so it is not counted; attention
        counts the dense causal triangle (document masking does less work than this).
        """
        return 6.0 * self.num_params(embeddings=False) + 6.0 * self.n_layers * self.dim * seq_len


class AttnContext:
    """Per-forward inputs every attention layer shares (built once in ``Transformer.forward``).

    Deliberately not a dataclass: FSDP2's mixed precision casts a block's floating inputs and recurses into
    dataclasses (``torch/distributed/utils.py::_apply_to_tensors``), which turned the fp32 RoPE tables bf16
    under FSDP only; a plain object passes through untouched, so every layout rotates with fp32 tables."""

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor, doc_ids: torch.Tensor | None, backend: str,
                 context_parallel=None, varlen: tuple | None = None, documents=None):
        self.cos, self.sin = cos, sin  # (B, S, head_dim/2) fp32
        self.doc_ids = doc_ids  # (B, S) or None when no row holds more than one document
        self.backend = backend
        self.context_parallel = context_parallel  # the model's ContextParallelAttention when cp > 1
        self.varlen = varlen  # flash-attn (cu_seqlens, max_len), made once per forward (and reused by recompute)
        self.documents = documents  # a DocumentAttention keeping this forward's per-document plan (one device)


def canonical_name(name: str) -> str:
    """A parameter's name without the wrappers activation checkpointing and compile insert."""
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


class RMSNorm(nn.Module):
    """``F.rms_norm``: one fused kernel on CUDA (fp32 accumulation inside, any input dtype), the same formula as
    ``x * rsqrt(mean(x^2) + eps) * weight`` computed in fp32 on CPU."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if x.is_cuda:
            return F.rms_norm(x, x.shape[-1:], self.weight.to(x.dtype), self.eps)
        return F.rms_norm(x.float(), x.shape[-1:], self.weight.float(), self.eps).type_as(x)

    def reset_parameters(self):
        nn.init.ones_(self.weight)


def rope_frequencies(head_dim: int, theta: float, scaling: dict | None = None) -> tuple[torch.Tensor, float]:
    """(inverse frequency of each pair (head_dim/2, float64), factor multiplying cos and sin): transformers' formulas
    for the Llama family (``transformers/modeling_rope_utils.py``: ``_compute_linear_scaling_rope_parameters``,
    ``_compute_llama3_parameters``, ``_compute_yarn_parameters``), computed in float64. ``scaling`` is a
    ``rope_parameters`` dict (``RopeScalingConfig.parameters``); None: plain RoPE."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "default":
        return freqs, 1.0
    factor = float(scaling["factor"])
    if kind == "linear":  # position interpolation: positions / factor
        return freqs / factor, 1.0
    if kind == "llama3":  # long wavelengths / factor, short ones kept, a smooth blend between
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / freqs
        scaled = torch.where(wavelen > old / low, freqs / factor, freqs)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / high) & (wavelen <= old / low)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":  # NTK-by-parts: interpolate below beta_slow rotations, extrapolate above beta_fast
        old = scaling["original_max_position_embeddings"]

        def mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        attention = scaling.get("attention_factor")
        if attention is None:
            m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
            attention = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
        beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

        def correction_dim(rotations: float) -> float:
            return head_dim * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        lo, hi = correction_dim(beta_fast), correction_dim(beta_slow)
        if scaling.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, head_dim - 1)
        if lo == hi:
            hi += 0.001
        ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - lo) / (hi - lo)).clamp(0, 1)
        return freqs / factor * ramp + freqs * (1 - ramp), float(attention)
    raise ValueError(f"unknown rope_type {kind!r}")


def rope_tables(head_dim: int, max_seq_len: int, theta: float,
                scaling: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (max_seq_len, head_dim/2) cos and sin tables (a scaled RoPE's attention factor folded in: it
    multiplies cos and sin, as transformers' rotary embedding does)."""
    freqs, attention = rope_frequencies(head_dim, theta, scaling)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), freqs)
    return (angles.cos() * attention).float(), (angles.sin() * attention).float()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos.unsqueeze(2), sin.unsqueeze(2)
    return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2).type_as(x)


# On CUDA the rotation is one compiled kernel (upcast, six products, interleave and downcast fused) instead of
# about ten fp32 elementwise passes over q and k; eager elsewhere, and inside a compiled block the block's own
# graph fuses it. Compiled lazily, so CPU runs never pay for it.
_fused_rotate = None


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) of ``x`` (B, S, H, D) by the per-position angles (fp32 tables; the rotation
    runs in fp32 and returns ``x``'s dtype)."""
    global _fused_rotate
    if x.is_cuda and not torch.compiler.is_compiling():
        if _fused_rotate is None:
            _fused_rotate = torch.compile(_rotate, dynamic=True, fullgraph=True)
        return _fused_rotate(x, cos, sin)
    return _rotate(x, cos, sin)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.head_dim = args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=args.qkv_bias)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=args.qkv_bias)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=args.qkv_bias)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)

    def forward(self, x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        q = self.wq(x).view(bsz, seqlen, -1, self.head_dim)  # local heads under TP
        k = self.wk(x).view(bsz, seqlen, -1, self.head_dim)
        v = self.wv(x).view(bsz, seqlen, -1, self.head_dim)
        q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
        out = attend(q, k, v, ctx.doc_ids, ctx.backend, ctx.context_parallel, ctx.varlen, ctx.documents)
        return self.wo(out.reshape(bsz, seqlen, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden)

    def forward(self, x, ctx: AttnContext):
        h = x + self.attention(self.attention_norm(x), ctx)
        return h + self.feed_forward(self.ffn_norm(h))


def _blocks_compiled(model) -> bool:
    """Whether ``parallel.parallelize.apply_compile`` compiled the blocks (``Module.compile`` keeps the compiled
    call in ``_compiled_call_impl``): on CUDA their packed documents then go through FlexAttention (which has no
    CPU backward: compiled CPU blocks keep the dense document mask, ``trainer/attention.py``)."""
    return any(getattr(b, "_compiled_call_impl", None) is not None for b in model.layers.values())


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        # A ModuleDict keyed by layer index keeps FQNs stable when layers are split across stages.
        self.layers = nn.ModuleDict({str(i): TransformerBlock(args, i) for i in range(args.n_layers)})
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        cos, sin = rope_tables(args.head_dim, args.max_seq_len, args.rope_theta, args.rope_scaling)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.attention_backend = "cpu_flash"  # the run's (``block_kernels.run_backend``), set by the trainer
        self.context_parallel = None  # a ContextParallelAttention, set by parallel.parallelize.apply_cp
        self.hidden_output = False  # True: forward stops before ``head`` (trainer/loss.py's chunked loss applies it)

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Deterministic init from ``seed``, whatever part of the model this rank holds and however it is
        sharded: each parameter comes from its own generator keyed by its name, every rank generates
        the full tensor and keeps its shard. So a model built on the meta device, parallelized and
        materialized with ``to_empty`` never holds more than one full parameter at a time.
        """
        for name, param in self.named_parameters():
            fqn = canonical_name(name)
            std = self._init_std(fqn)
            if std is None:  # norm weights: ones; biases: zeros
                full = torch.full(param.shape, 0.0 if fqn.endswith(".bias") else 1.0, device=param.device)
            else:
                gen = torch.Generator(param.device).manual_seed(
                    (seed * 1_000_003 + zlib.crc32(fqn.encode())) % 2 ** 63)
                full = torch.randn(param.shape, generator=gen, device=param.device) * std
            if isinstance(param, DTensor):
                full = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
            param.copy_(full)
        cos, sin = rope_tables(self.args.head_dim, self.args.max_seq_len, self.args.rope_theta, self.args.rope_scaling)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def _init_std(self, fqn: str) -> float | None:
        """Standard deviation of a parameter's normal init (None: ones for norms, zeros for biases)."""
        if fqn.endswith(("norm.weight", ".bias")):
            return None
        if fqn == "tok_embeddings.weight":
            return 1.0
        if fqn == "output.weight":
            return self.args.dim ** -0.5
        if fqn.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
            return self.args.init_std / math.sqrt(2 * self.args.n_layers)
        return self.args.init_std

    # ---- the model family's parallelisation plan: parallel/ asks, it knows no module names
    def tp_plan(self, loss_parallel: bool) -> tuple[dict, dict]:
        """(plan for this module, plan for each block) as ``parallelize_module`` takes them.

        Column-wise q/k/v/w1/w3, row-wise wo/w2, sequence-parallel norms: between blocks
        (and between pipeline stages) activations are sequence-sharded local tensors; the
        output is vocabulary-sharded for the vocabulary-parallel loss.
        """
        from torch.distributed.tensor import Replicate, Shard
        from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                                       SequenceParallel)

        top = {
            "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
            "norm": SequenceParallel(),
            "output": ColwiseParallel(input_layouts=Shard(1),
                                      output_layouts=Shard(-1) if loss_parallel else Replicate(),
                                      use_local_output=not loss_parallel),
        }
        block = {
            "attention_norm": SequenceParallel(),
            "attention": PrepareModuleInput(input_layouts=(Shard(1), None), desired_input_layouts=(Replicate(), None)),
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
            "ffn_norm": SequenceParallel(),
            "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
            "feed_forward.w3": ColwiseParallel(),
        }
        return {k: v for k, v in top.items() if getattr(self, k) is not None}, block  # a stage may lack some

    def fsdp_units(self) -> list[list[nn.Module]]:
        """Modules FSDP shards as units of their own besides the blocks (torchtitan's policy): the
        embeddings, and the final norm with the output (used together, last in forward)."""
        units = [[self.tok_embeddings], [m for m in (self.norm, self.output) if m is not None]]
        return [u for u in units if u and u[0] is not None]

    def position_wise_modules(self) -> tuple[str, ...]:
        """Modules inside each block whose output at a position depends on that position's input alone: the SwiGLU
        MLP, which ``parallel.tiled_mlp_tokens`` runs over tiles of the sequence (``parallel/tiled_mlp.py``). Under
        tensor parallelism its plan takes and gives sequence shards (``tp_plan``), as tiling needs."""
        return ("feed_forward",)

    def pipeline_stage(self, layer_names: set[str], first: bool, last: bool) -> "Transformer":
        """A copy keeping only the named layers, plus the embeddings on the first stage and norm +
        output on the last (FQNs stay those of the unsplit model)."""
        import copy

        part = copy.deepcopy(self)
        for name in list(part.layers):
            if name not in layer_names:
                del part.layers[name]
        if not first:
            part.tok_embeddings = None
        if not last:
            part.norm = None
            part.output = None
        return part

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor | None = None,
                doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids -> logits. A pipeline stage without embeddings takes hidden states instead, and one
        without the output (or with ``hidden_output``) returns hidden states."""
        bsz, seqlen = tokens.shape[:2]
        if position_ids is None:
            position_ids = torch.arange(seqlen, device=tokens.device).expand(bsz, seqlen)
        if position_ids.shape[1] > self.args.max_seq_len:
            raise ValueError(f"sequence length {position_ids.shape[1]} exceeds model.max_seq_len {self.args.max_seq_len}")
        # ``doc_ids`` None: every row is one document (plain causal attention; the data pipeline drops the ids
        # on the host, ``data/loader.py::without_single_document_ids``). On CUDA the flash metadata is the
        # forward's one host sync, once, not per layer.
        varlen = documents = None
        if doc_ids is not None and self.context_parallel is None:
            if doc_ids.is_cuda and _blocks_compiled(self):  # FlexAttention's document block mask, once per forward
                documents = document_block_mask(doc_ids)
            elif self.attention_backend == "flash_attn":
                varlen = flash_varlen_metadata(doc_ids)
            else:
                documents = DocumentAttention(self.attention_backend)  # this forward's (and its recompute's)
        ctx = AttnContext(self.rope_cos[position_ids], self.rope_sin[position_ids], doc_ids,
                          self.attention_backend, self.context_parallel, varlen, documents)
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        for block in self.layers.values():
            h = block(h, ctx)
        if self.output is None or self.hidden_output:
            return h
        return self.head(h)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden states -> logits: the final norm and the output projection (the chunked loss calls it per chunk)."""
        return self.output(self.norm(h))
