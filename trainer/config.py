"""Typed experiment configuration: YAML file + ``--set`` overrides -> validated dataclasses.

Precedence is CLI > file > defaults. Every field has a docstring-style comment; every
error a user can cause is a :class:`ConfigError` whose message is one line naming the
field path and what would be valid, raised before any process group starts.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from loomtrain.errors import ConfigError, require_positive
from loomtrain.fsutil import atomic_write_text
from loomtrain.registry import load_plugins
from loomtrain.parallel import ac as activation_modes
from loomtrain.parallel import tiled_mlp
from loomtrain.parallel.cp import CP_STRATEGIES, usable
from loomtrain.parallel.dp_sync import DP_SYNC
from loomtrain.parallel.engines import ENGINES
from loomtrain.parallel.cp import strategy as cp_strategy
from loomtrain.parallel.mesh import MESH_DIMS
from loomtrain.parallel.stages import pipeline_stage_layers  # noqa: F401  (callers import it from here too)


# model.rope_scaling: the parameters each type takes (transformers' RoPE types for the Llama family,
# ``transformers/modeling_rope_utils.py``); "required" ones have no default (unset = 0).
ROPE_SCALING_PARAMS = {
    "default": {"required": (), "optional": ()},
    "linear": {"required": ("factor",), "optional": ()},
    "llama3": {"required": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
               "optional": ()},
    "yarn": {"required": ("factor", "original_max_position_embeddings"),
             "optional": ("beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "truncate")},
}


@dataclass
class RopeScalingConfig:
    """RoPE scaling for a context longer than the one trained (``model.rope_scaling``), as transformers computes it:
    ``type: default`` (none; only model.rope_theta) | linear | llama3 | yarn. Exported to config.json as
    ``rope_parameters`` (and ``rope_scaling``)."""

    type: str = "default"  # default | linear (factor) | llama3 (factor, low_freq_factor, high_freq_factor,
    #   original_max_position_embeddings) | yarn (factor, original_max_position_embeddings; optional beta_fast,
    #   beta_slow, attention_factor, mscale, mscale_all_dim, truncate)
    factor: float = 0.0  # linear, llama3, yarn (required, >= 1): how many times longer the context becomes
    low_freq_factor: float = 0.0  # llama3 (required, > 0): wavelengths above original/low_freq_factor are scaled
    high_freq_factor: float = 0.0  # llama3 (required, > low_freq_factor): below original/high_freq_factor kept
    original_max_position_embeddings: int = 0  # llama3, yarn (required, > 0): the context the model was trained for
    beta_fast: float = 32.0  # yarn: rotations bounding the interpolation ramp (> beta_slow)
    beta_slow: float = 1.0  # yarn (> 0)
    attention_factor: float = 0.0  # yarn: cos/sin multiplier; 0 = transformers' (from factor, mscale, mscale_all_dim)
    mscale: float = 0.0  # yarn: with mscale_all_dim, attention_factor = mscale(factor, mscale)/mscale(factor, all_dim)
    mscale_all_dim: float = 0.0  # yarn
    truncate: bool = True  # yarn: round the ramp's bounds to whole dimensions (transformers' default)

    def parameters(self) -> dict | None:
        """The type's parameters as transformers' ``rope_parameters`` holds them (without rope_theta); None for
        ``default``. Optional yarn values left at 0 are left out (transformers then computes them)."""
        if self.type == "default":
            return None
        spec = ROPE_SCALING_PARAMS[self.type]
        out = {"rope_type": self.type}
        for name in spec["required"] + spec["optional"]:
            value = getattr(self, name)
            if name in ("attention_factor", "mscale", "mscale_all_dim") and not value:
                continue
            out[name] = value
        return out


@dataclass
class ModelConfig:
    """The model: its family (``trainer/models``, or a plugin's) and shape."""

    family: str = "llama"  # a registered model family (trainer/models): llama | qwen2, or one a plugin registers
    init_from: str = ""  # a Hugging Face model directory (config.json, safetensors, tokenizer.json) to start from:
    #   family, shape, vocabulary, RoPE and data.tokenizer come from it (docs/import.md)
    dim: int = 256  # hidden size
    n_layers: int = 4  # decoder blocks
    n_heads: int = 8  # query heads
    n_kv_heads: int = 4  # key/value heads (grouped-query attention); must divide n_heads
    ffn_hidden: int = 0  # SwiGLU hidden size; 0 = 8/3*dim rounded up to ffn_multiple_of
    ffn_multiple_of: int = 64
    vocab_size: int = 0  # 0 = tokenizer's vocabulary rounded up to a multiple of 64
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)  # longer contexts: linear | llama3 | yarn
    max_seq_len: int = 0  # 0 = data.seq_len
    dtype: str = "auto"  # auto (bfloat16 on CUDA, float32 elsewhere) | float32 | bfloat16 (mixed precision, fp32 master weights)
    attention: str = "auto"  # auto (the chooser's pick for the device and dtype) | a backend (docs/gpu.md)
    init_std: float = 0.02


@dataclass
class SourceConfig:
    """One source of a data blend (``data.sources``): a corpus or a prepared prefix, drawn in proportion to its
    weight. The per-corpus fields left empty (text_key, file_glob, max_documents) take data.*'s value; the
    tokenizer, cache, split and packing are data.*'s for every source (one vocabulary, one batch layout)."""

    corpus: str = ""  # as data.corpus (stdlib | a text file | a folder | .jsonl | .parquet); or give prepared
    prepared: str = ""  # as data.prepared: a prepared prefix (loomtrain's or Megatron's .bin/.idx)
    valid_prepared: str = ""  # as data.valid_prepared: with a Megatron prepared prefix, its validation prefix
    weight: float = 1.0  # >= 0; weights are normalised (Megatron's --data-path w1 p1 w2 p2); 0 = evaluated only
    name: str = ""  # in metrics (tokens/<name>, val_loss/<name>); empty = the path's last component
    text_key: str = ""  # empty = data.text_key
    file_glob: str = ""  # empty = data.file_glob
    max_documents: int = 0  # 0 = data.max_documents


@dataclass
class DataConfig:
    """Where tokens come from and how they are packed."""

    corpus: str = "stdlib"  # stdlib | a text file | a folder | a .jsonl file | a .parquet file or folder of them
    text_key: str = "text"  # field holding the document text in JSONL and Parquet corpora
    file_glob: str = "*.py,*.txt,*.md,*.rst,*.jsonl,*.parquet"  # files read from a folder corpus
    tokenizer: str = "byte"  # byte | path to a Hugging Face tokenizer.json
    prepared: str = ""  # a prepared prefix (loomtrain's, with <prefix>.json) or a Megatron .bin/.idx prefix
    valid_prepared: str = ""  # with a Megatron data.prepared: the validation .bin/.idx prefix (optional)
    vocab_size: int = 0  # with a Megatron data.prepared: its vocabulary (0 = data.tokenizer's)
    cache_dir: str = "~/.cache/loomtrain"  # where prepared token files are cached
    workers: int = 0  # tokenizer processes for preparation; 0 = this machine's cores
    seq_len: int = 256  # tokens per packed training sequence (batching: windows) / longest row (documents)
    valid_fraction: float = 0.02  # fraction of tokens held out for validation (as whole documents)
    max_documents: int = 0  # 0 = all documents of the corpus
    batching: str = "windows"  # windows (fixed seq_len windows) | documents (whole documents up to a token budget)
    max_doc_tokens: int = 0  # batching=documents: longer documents are cut into pieces of this many; 0 = seq_len
    sources: list[SourceConfig] = field(default_factory=list)  # a blend instead of data.corpus / data.prepared:
    #   [{corpus or prepared, weight, name, ...}], samples drawn in proportion to the weights (docs/data.md)


@dataclass
class ParallelConfig:
    """Degrees of each parallel dimension; their product must equal the world size."""

    pp: int = 1  # pipeline-parallel ranks (stages per rank: pp_virtual_stages)
    pp_schedule: str = "1f1b"  # gpipe | 1f1b | interleaved_1f1b
    pp_virtual_stages: int = 1  # stages per pipeline rank (> 1 needs interleaved_1f1b)
    pp_split: str = ""  # layers per stage, e.g. "3,3,2" (pp * pp_virtual_stages numbers); empty = balanced;
    #   auto = by the speed of each stage's fabric with placement=fabric (balanced otherwise)
    dp_replicate: int = 1  # replicated data parallel (HSDP outer dimension)
    dp_shard: int = -1  # sharded data parallel (FSDP2); -1 = whatever the world size leaves
    cp: int = 1  # context (sequence) parallel
    tp: int = 1  # tensor parallel
    cp_impl: str = "auto"  # context-parallel attention: auto (cost model, from shape and cp links) | tokenring | ring |
    #   ulysses | ulysses_ring | ulysses_tokenring (two-dimensional: Ulysses inside groups of cp_ulysses ranks)
    cp_ulysses: int = 0  # with cp_impl=ulysses_ring | ulysses_tokenring: the Ulysses group size U (1 < U < cp, dividing
    #   cp; U consecutive cp ranks, the closest links; ring or TokenRing across the cp/U groups); 0 = unset
    cp_layout: str = "zigzag"  # how a packed row is cut over the cp ranks: zigzag (the row in 2*cp chunks, rank r holds
    #   r and 2*cp-1-r) | zigzag_documents (each document so: balanced work when documents differ in length;
    #   docs/context-parallelism.md)
    cp_link_gbps: float = 100.0  # for cp_impl=auto: bandwidth between cp peers per direction, Gbit/s. With
    #   parallel.cluster and this and cp_inner_link_gbps at their defaults, auto reads both links from the cluster
    #   instead (the tier the real cp groups span; splits only for U whose groups sit on a faster tier:
    #   launch/cp_links.py); set either one and the declared numbers win
    # (auto also assumes logging.peak_tflops, or the H100 datasheet figure when that is 0)
    cp_latency_us: float = 10.0  # for cp_impl=auto: per-transfer latency between cp peers
    cp_topology: str = "full_mesh"  # for cp_impl=auto: full_mesh (NVSwitch-like) | ring
    cp_inner_link_gbps: float = 0.0  # for cp_impl=auto: the faster link inside groups of consecutive cp ranks (a node),
    #   Gbit/s; set, auto also weighs the two-dimensional splits (Ulysses on it, cp_link_gbps between groups); 0 = unknown
    mesh_order: str = "pp,dp_replicate,dp_shard,cp,tp"  # outermost to innermost
    placement: str = "none"  # none (ranks fill the mesh in rank order) | fabric (hosts grouped by the fabric they
    #   share, tp inside a host, dp/cp inside a fabric, pp across: launch/placement.py; needs the default mesh_order)
    cluster: str = ""  # with placement=fabric: a cluster description (launch/topology.py); empty = each host's
    #   NICs from sysfs, hosts whose best NICs match assumed to share a fabric
    backend: str = "auto"  # auto (nccl on CUDA, gloo on CPU) | nccl | gloo
    device: str = "auto"  # auto | cpu | cuda
    activation_checkpoint: str = "none"  # none | full | selective | offload | full+offload | selective+offload
    #   (parallel/ac.py: recompute blocks, keep only chosen ops' outputs, or move saved activations to host memory)
    ac_every: int = 1  # selective: checkpoint every Nth block of each model part (pipeline stage); others kept whole
    ac_save_ops: str = "matmul,attention"  # selective: ops whose outputs are kept, comma-separated (matmul,
    #   attention, or aten names: mm, addmm, bmm, _scaled_dot_product_flash_attention, ...); "" = recompute all
    tiled_mlp_tokens: int = 0  # 0 = off; N = each block's MLP runs over tiles of at most N tokens of the sequence,
    #   each recomputed in backward, so one tile's intermediates exist at a time (parallel/tiled_mlp.py, ALST)
    compile: bool = False  # torch.compile each decoder block
    loss_parallel: bool = True  # vocab-parallel cross entropy when tp > 1
    dp_engine: str = "fsdp"  # fsdp (FSDP2 over the mesh) | deepspeed (ZeRO; data parallelism only)
    zero_stage: int = 2  # with dp_engine=deepspeed: ZeRO stage 1, 2 or 3
    zero_offload_optimizer: bool = False  # with dp_engine=deepspeed: optimizer state in CPU memory
    dp_sync: str = "every_step"  # how dp_replicate replicas stay in sync: every_step (gradients averaged each
    #   step) | diloco (Streaming DiLoCo: local steps, fragments synced in turn) | co2 (local steps, the outer
    #   update all-reduced in the background, applied one round late); settings in the dp_sync section
    sp_mode: str = "static"  # static (the cp degree above) | adaptive (every step: groups sized to its sequences) |
    #   adaptive_sharded (the same groups in waves of one row per rank: FSDP stays sharded)
    sp_degrees: str = ""  # adaptive: allowed group sizes, e.g. "1,2,4,8"; empty = any size
    sp_alpha1: float = 0.0  # adaptive cost model: attention s^2 coefficient; 0 = measure the pool (calibration)
    sp_alpha2: float = 0.0  # adaptive cost model: per-token coefficient; 0 = measure the pool (calibration)
    sp_inter_node_gbps: float = 25.0  # adaptive cost model: bandwidth of groups that span nodes (cp_link_gbps inside)


@dataclass
class OptimConfig:
    """AdamW (or plain SGD) with linear warmup and cosine decay."""

    name: str = "adamw"  # adamw | sgd (plain SGD with optim.momentum: e.g. the check that DiLoCo at H=1 is DDP)
    momentum: float = 0.0  # sgd only
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    warmup_steps: int = 10
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 = no clipping
    fused: str = "auto"  # auto | true | false  (fused AdamW where the platform has it)


@dataclass
class TrainConfig:
    """Loop length, batch, seeds and outputs."""

    steps: int = 100
    seed: int = 1234
    global_batch_size: int = 16  # sequences per optimizer step, over all data-parallel ranks
    micro_batch_size: int = 0  # sequences per rank per forward (rows with data.batching=documents); 0 = all at once
    global_batch_tokens: int = 0  # data.batching=documents: predicted tokens per optimizer step, all ranks
    microbatches: int = 0  # pipeline microbatches per step (parallel.pp > 1); 0 = 2 * stages
    log_every: int = 1
    eval_every: int = 50  # 0 = never
    eval_batches: int = 4
    eval_by_position: bool = False  # each evaluation also gives the loss by position bucket (metrics.jsonl's
    #   loss_by_position) and redraws <output_dir>/loss_by_position.png (needs matplotlib; docs/evaluation.md)
    eval_bucket: int = 0  # eval_by_position's first bucket [0, B), then doubling; 0 = 1024, less for short seq_len
    output_dir: str = "runs/tiny"
    threads: int = 0  # torch intra-op threads per rank; 0 = cores / local ranks
    progress: bool = True  # progress bar on rank 0 (a terminal); log lines otherwise
    loss_chunk_tokens: int = 0  # 0 = one cross entropy over all logits; N = over chunks of at most N tokens'
    #   logits, each recomputed in backward (the whole sequence's full-vocabulary logits never exist)


@dataclass
class CheckpointConfig:
    """Distributed checkpoints (torch.distributed.checkpoint)."""

    every_steps: int = 0  # 0 = only at the end and on SIGTERM/SIGINT
    keep: int = 2  # newest checkpoints kept on disk; 0 = keep all
    async_save: bool = False  # save in the background (dcp.async_save)
    at_end: bool = True


@dataclass
class LoggingConfig:
    """Metrics destinations."""

    wandb: bool = False
    wandb_project: str = "loomtrain"
    wandb_mode: str = "auto"  # auto (online when WANDB_API_KEY is set, else offline) | online | offline
    peak_tflops: float = 0.0  # per-device peak for MFU; 0 = detect (GPU table, CPU matmul probe)


@dataclass
class SnapshotConfig:
    """In-memory snapshots held by each node's snapshot process (SMP)."""

    every_steps: int = 0  # snapshot every N optimizer steps; 0 = off
    # A snapshot whose collective, exchange or SMP request takes longer than timeout_s plus the time its bytes take
    # at min_gbps (Gbit/s, the slowest rate assumed healthy) is skipped (training goes on); a restore likewise.
    timeout_s: float = 120.0
    min_gbps: float = 1.0


@dataclass
class InjectConfig:
    """A fault fired once, on one attempt only (tests and demos)."""

    kind: str = "none"  # none | sigkill | exception | hang | smp_kill | node_loss | snapshot_kill
    rank: int = 0  # the rank that fails (node_loss: every rank of this rank's node)
    step: int = 1  # fires right after this optimizer step (snapshot_kill: inside the snapshot of this step)
    phase: str = "exchange"  # snapshot_kill: SIGKILL inside this phase: copy | request | exchange | commit |
    #                          restore (step = the epoch being restored; use with attempt >= 1)
    attempt: int = 0  # fires on this attempt only (0 = the first run; 1 = after the first restart)


@dataclass
class MonitorConfig:
    """Limits of the hang monitor that runs beside the ranks (faulttol/hang_monitor.py; loomtrain's launchers)."""

    step_factor: float = 3.0  # no progress for factor x the p99 step time (and at least min_s) is a hang
    min_s: float = 5.0
    warmup_steps: int = 5  # steps timed before that limit applies (until then: phase_timeout_s)
    phase_timeout_s: float = 1800.0  # the limit in start-up, restore, warm-up steps, checkpoints, evaluation


@dataclass
class FaultTolConfig:
    """Surviving failures: snapshots in memory, erasure coding across nodes, restarts, watchdog."""

    snapshot: SnapshotConfig = field(default_factory=SnapshotConfig)
    persist_every_steps: int = 0  # also write a DCP checkpoint to disk every N steps; 0 = never
    ranks_per_node: int = 0  # 0 = real nodes (LOCAL_WORLD_SIZE); N simulates nodes of N ranks on one host
    ec_group_nodes: int = 0  # nodes per erasure-coding group (k + m); 0 = all nodes
    ec_group_stride: int = 0  # N > 1: racks are N consecutive nodes, and each group takes its nodes from different
    #   racks (losing one rack costs a group at most one node); 1: groups of consecutive nodes; 0 = auto: racks are
    #   the fabric groups of parallel.cluster with placement=fabric, else consecutive
    redundancy: str = "auto"  # auto | erasure | replicas: with dp_replicate > 1 (every-step sync) and replicas on
    #   other nodes, the replicas' identical states are the redundancy (one copy per rank, no encoding; REFT)
    ec_parity: int = 1  # parity chunks m per group: any m nodes of a group may be lost
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    # Without a hang monitor (a bare torchrun), each rank's own watchdog thread: exit when a step makes no
    # progress this long (0 = off), and before the first step (SMP hookup, restore, compilation).
    hang_timeout_s: float = 600.0
    startup_timeout_s: float = 1800.0
    smp_idle_exit_s: float = 1800.0  # an SMP the trainer had to start exits after this long unused
    inject: InjectConfig = field(default_factory=InjectConfig)


@dataclass
class DiLoCoConfig:
    """Streaming DiLoCo (arXiv 2501.18512): ``parallel.dp_sync: diloco``; torchft's semantics."""

    sync_every: int = 100  # H: inner steps per full round; every H/fragments steps one fragment syncs
    fragments: int = 1  # F: strided groups of layers synced in turn (1 = plain DiLoCo)
    fragment_sync_delay: int = 0  # tau: inner steps a fragment's average overlaps (< sync_every / fragments)
    fragment_update_alpha: float = 0.0  # weight kept on the local parameters when the outer step lands
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    nesterov: bool = True
    quantize: str = "none"  # none | int8 | fp4 (E2M1) | fp4_e3m0: outer gradients on the wire (fp32 scale per 64)
    exchange: str = "all_gather"  # quantized: all_gather (each payload once, (M-1) payloads a worker) |
    #   reduce_scatter (quantized shards to their owners, averaged in fp32, the quantized average all-gathered:
    #   2(M-1)/M payloads a worker, below a bf16 ring at any worker count; the mean is quantized a second time)
    error_feedback: bool = False  # quantized: each worker re-sends next round what quantization dropped


@dataclass
class CO2Config:
    """CO2 (arXiv 2401.16265): ``parallel.dp_sync: co2``."""

    sync_every: int = 10  # tau: local steps per outer round; the round's all-reduce overlaps the next tau
    outer_lr: float = 1.0
    outer_momentum: float = 0.5
    staleness_penalty: float = 1.0  # lambda > 0: the outer momentum takes the stale average / lambda (1 = none)
    clip: float = 1.0  # outer momentum clipped element-wise to [-clip, clip] (0 = off); the authors' defaults


@dataclass
class DPSyncConfig:
    """Settings of the data-parallel sync methods (``parallel.dp_sync`` picks one)."""

    diloco: DiLoCoConfig = field(default_factory=DiLoCoConfig)
    co2: CO2Config = field(default_factory=CO2Config)


@dataclass
class Experiment:
    """A whole experiment: one YAML file."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    faulttol: FaultTolConfig = field(default_factory=FaultTolConfig)
    dp_sync: DPSyncConfig = field(default_factory=DPSyncConfig)
    # Python modules (names on sys.path, or .py paths) imported before the rest of the file is read: they
    # register model families, cp strategies, dp_sync methods, ... under new names (README: Extending).
    plugins: list = field(default_factory=list)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        if not out["data"]["sources"]:  # no blend: no key (an empty data.sources is refused when read back)
            del out["data"]["sources"]
        return out


CHOICES = {
    "model.dtype": ("auto", "float32", "bfloat16"),
    "model.rope_scaling.type": tuple(ROPE_SCALING_PARAMS),
    "model.attention": ("auto", "cudnn", "fa3", "flash_attn", "sdpa_flash", "sdpa_efficient", "cpu_flash", "math"),
    "parallel.backend": ("auto", "nccl", "gloo"),
    "parallel.device": ("auto", "cpu", "cuda"),
    "parallel.cp_topology": ("full_mesh", "ring"),
    "parallel.cp_layout": ("zigzag", "zigzag_documents"),
    "parallel.pp_schedule": ("gpipe", "1f1b", "interleaved_1f1b"),
    "dp_sync.diloco.quantize": ("none", "int8", "fp4", "fp4_e3m0"),
    "dp_sync.diloco.exchange": ("all_gather", "reduce_scatter"),
    "parallel.placement": ("none", "fabric"),
    "faulttol.redundancy": ("auto", "erasure", "replicas"),
    "optim.fused": ("auto", "true", "false"),
    "optim.name": ("adamw", "sgd"),
    "logging.wandb_mode": ("auto", "online", "offline"),
    "faulttol.inject.phase": ("copy", "request", "exchange", "commit", "restore"),
}


def registries() -> dict:
    """Config fields whose values are registered implementations (``loomtrain/registry.py``)."""
    from loomtrain.data.batching import BATCHINGS
    from loomtrain.faulttol.inject import FAULT_KINDS
    from loomtrain.parallel.sp import SP_MODES
    from loomtrain.trainer.models import MODEL_FAMILIES

    return {"parallel.cp_impl": CP_STRATEGIES, "parallel.dp_sync": DP_SYNC, "model.family": MODEL_FAMILIES,
            "parallel.dp_engine": ENGINES, "parallel.sp_mode": SP_MODES, "data.batching": BATCHINGS,
            "faulttol.inject.kind": FAULT_KINDS}


def _coerce(path: str, value: Any, typ: type) -> Any:
    """Convert ``value`` to the field type, accepting the strings ``--set`` produces."""
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{path}: expected true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else int(value)
            except ValueError:
                pass
        raise ConfigError(f"{path}: expected an integer, got {value!r}")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{path}: expected a number, got {value!r}")
    if typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{path}: expected a string, got {value!r}")
    raise TypeError(f"unsupported field type {typ} at {path}")


def _unknown_key(path: str, key: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"
    where = f"{path}.{key}" if path else key
    return ConfigError(f"{where}: unknown key{hint}")


def _apply(obj: Any, values: dict, path: str = "") -> None:
    """Set fields of dataclass ``obj`` from a nested dict, rejecting unknown keys and bad types."""
    if not isinstance(values, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in values.items():
        if key not in names:
            raise _unknown_key(path, str(key), names)
        sub = f"{path}.{key}" if path else key
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _apply(current, value if value is not None else {}, sub)
        elif typing.get_origin(hints[key]) is list:
            setattr(obj, key, _list_of(sub, value, typing.get_args(hints[key])[0]))
        else:
            setattr(obj, key, _coerce(sub, value, hints[key]))


def _list_of(path: str, values: Any, cls: type) -> list:
    """A YAML list of mappings as a list of ``cls`` dataclasses, each read like a section (``path[i].key``)."""
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{path}: expected a non-empty list of mappings, got {values!r}")
    out = []
    for i, item in enumerate(values):
        out.append(cls())
        _apply(out[-1], item, f"{path}[{i}]")
    return out


def parse_overrides(overrides: list[str]) -> dict:
    """Turn ``["train.steps=5", ...]`` into a nested dict (values parsed as YAML scalars)."""
    nested: dict = {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item}: expected section.key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) < 2 or not all(parts):
            raise ConfigError(f"--set {key}: expected section.key (e.g. train.steps)")
        value = yaml.safe_load(raw) if raw.strip() else ""
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: '{part}' was already given a value")
        node[parts[-1]] = value
    return nested


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Experiment:
    """Load defaults, then the YAML file, then ``--set`` overrides; validate; return the result."""
    exp = Experiment()
    if path is not None:
        path = resolve_config_path(str(path))
        try:
            with open(path) as f:
                values = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            first = str(e).splitlines()[0] if str(e) else "parse error"
            raise ConfigError(f"{path}: not valid YAML ({first})") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping of sections, got {type(values).__name__}")
        plugins = values.pop("plugins", None) or []
        if not isinstance(plugins, list):
            raise ConfigError(f"plugins: expected a list of module names or .py paths, got {plugins!r}")
        exp.plugins = [_plugin_path(p, path) for p in plugins]
        load_plugins(exp.plugins)  # before the sections: they may name what a plugin registers
        _apply(exp, values)
    else:
        values = {}
    overridden = parse_overrides(overrides or [])
    _apply(exp, overridden)
    if exp.model.init_from:  # the model's shape, RoPE and tokenizer from its config.json (headers checked)
        from loomtrain.trainer.hf_import import given_keys, resolve_init_from

        resolve_init_from(exp, given_keys(values) | given_keys(overridden))
    validate(exp)
    return exp


def _plugin_path(spec, config_path: str):
    """A plugin's .py path relative to the YAML file that names it (module names stay as they are)."""
    if isinstance(spec, str) and spec.endswith(".py") and not os.path.isabs(spec) and not os.path.isfile(spec):
        beside = os.path.join(os.path.dirname(os.path.abspath(config_path)), spec)
        if os.path.isfile(beside):
            return beside
    return spec


def resolve_config_path(path: str) -> str:
    """Accept a file path, or the name of a config shipped in ``loomtrain/configs`` (e.g. ``tiny``)."""
    if os.path.isfile(path):
        return path
    import loomtrain.configs

    shipped = os.path.dirname(loomtrain.configs.__file__)
    if os.path.basename(path) == path:  # a bare name: look among the shipped configs
        for name in (path, f"{path}.yaml"):
            if os.path.isfile(os.path.join(shipped, name)):
                return os.path.join(shipped, name)
    names = sorted(f[:-5] for f in os.listdir(shipped) if f.endswith(".yaml"))
    raise ConfigError(f"config: no such file '{path}' (shipped configs: {', '.join(names)})")


def _get(exp: Experiment, path: str) -> Any:
    obj = exp
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def validate(exp: Experiment) -> None:
    """Reject impossible values. World-size-dependent checks live in ParallelDims."""
    for p, choices in CHOICES.items():
        v = _get(exp, p)
        if v not in choices:
            raise ConfigError(f"{p}: must be one of {', '.join(choices)}, got {v!r}")
    for p, registry in registries().items():  # strategies: the registered names (plugins' included)
        v = _get(exp, p)
        if v not in registry.choices():
            raise ConfigError(f"{p}: must be one of {', '.join(registry.choices())}, got {v!r}")
    require_positive(exp, "model.dim", "model.n_layers", "model.n_heads", "model.n_kv_heads",
              "model.ffn_multiple_of", "model.norm_eps", "model.rope_theta", "data.seq_len",
              "train.steps", "train.global_batch_size", "train.log_every", "optim.lr",
              "parallel.cp_link_gbps", "faulttol.snapshot.timeout_s", "faulttol.snapshot.min_gbps",
              "faulttol.monitor.step_factor",
              "faulttol.monitor.min_s", "faulttol.monitor.phase_timeout_s")
    require_positive(exp, "model.ffn_hidden", "model.vocab_size", "model.max_seq_len", "train.micro_batch_size",
              "train.eval_every", "train.eval_batches", "train.eval_bucket", "train.threads", "parallel.cp_latency_us", "optim.warmup_steps",
              "optim.weight_decay", "optim.grad_clip", "optim.eps", "checkpoint.every_steps",
              "checkpoint.keep", "data.max_documents", "data.workers", "data.vocab_size", "data.max_doc_tokens", "train.global_batch_tokens",
              "parallel.sp_alpha1", "parallel.sp_alpha2", "parallel.sp_inter_node_gbps", "parallel.cp_inner_link_gbps", "logging.peak_tflops",
              "faulttol.snapshot.every_steps", "faulttol.persist_every_steps", "faulttol.ranks_per_node", "faulttol.ec_group_stride",
              "faulttol.ec_group_nodes", "faulttol.ec_parity", "faulttol.hang_timeout_s", "faulttol.startup_timeout_s",
              "faulttol.smp_idle_exit_s", "faulttol.inject.rank", "faulttol.inject.step", "faulttol.inject.attempt",
              "train.microbatches", "faulttol.monitor.warmup_steps", "train.loss_chunk_tokens",
              allow_zero=True)
    require_positive(exp, "parallel.pp_virtual_stages")
    m = exp.model
    if m.dim % m.n_heads:
        raise ConfigError(f"model.dim: must be divisible by model.n_heads ({m.n_heads}), got {m.dim}")
    if (m.dim // m.n_heads) % 2:
        raise ConfigError(f"model.dim: dim/n_heads must be even for RoPE, got {m.dim // m.n_heads}")
    if m.n_heads % m.n_kv_heads:
        raise ConfigError(f"model.n_kv_heads: must divide model.n_heads ({m.n_heads}), got {m.n_kv_heads}")
    _validate_rope_scaling(m.rope_scaling)
    if m.max_seq_len and m.max_seq_len < exp.data.seq_len:
        raise ConfigError(f"model.max_seq_len: must be >= data.seq_len ({exp.data.seq_len}), got {m.max_seq_len}")
    _validate_sources(exp.data)
    if exp.train.eval_by_position and not exp.train.eval_every:
        raise ConfigError("train.eval_by_position: needs train.eval_every > 0 (it runs with each evaluation)")
    if not 0.0 <= exp.data.valid_fraction < 1.0:
        raise ConfigError(f"data.valid_fraction: must be in [0, 1), got {exp.data.valid_fraction}")
    if not 0.0 <= exp.optim.min_lr_ratio <= 1.0:
        raise ConfigError(f"optim.min_lr_ratio: must be in [0, 1], got {exp.optim.min_lr_ratio}")
    for p in ("optim.beta1", "optim.beta2", "optim.momentum"):
        v = getattr(exp.optim, p.split(".")[1])
        if not 0.0 <= v < 1.0:
            raise ConfigError(f"{p}: must be in [0, 1), got {v}")
    par = exp.parallel
    for d in MESH_DIMS:
        v = getattr(par, d)
        if v < 1 and not (d == "dp_shard" and v == -1):
            valid = ">= 1 or -1 (fill the world)" if d == "dp_shard" else ">= 1"
            raise ConfigError(f"parallel.{d}: must be {valid}, got {v}")
    order = [s.strip() for s in par.mesh_order.split(",")]
    if sorted(order) != sorted(MESH_DIMS):
        raise ConfigError(f"parallel.mesh_order: must be a permutation of {','.join(MESH_DIMS)}, got {par.mesh_order!r}")
    if par.placement != "none" and tuple(order) != MESH_DIMS:
        raise ConfigError(f"parallel.mesh_order: placement={par.placement} decides which rank fills each place of the "
                          f"mesh; leave mesh_order at {','.join(MESH_DIMS)}")
    if par.cluster and par.placement == "none":
        raise ConfigError("parallel.cluster: only used with parallel.placement=fabric")
    if par.cluster and not os.path.isfile(par.cluster):
        raise ConfigError(f"parallel.cluster: '{par.cluster}' does not exist")
    if m.n_kv_heads % par.tp or m.n_heads % par.tp:
        raise ConfigError(f"parallel.tp: must divide model.n_heads ({m.n_heads}) and model.n_kv_heads ({m.n_kv_heads}), got {par.tp}")
    # Sequence-parallel TP shards each rank's part of the sequence over tp; zigzag CP cuts it into 2*cp chunks.
    unit = math.lcm(par.tp, 2 * par.cp, par.cp * par.tp) if par.cp > 1 else par.tp
    if exp.data.seq_len % unit:
        raise ConfigError(f"data.seq_len: must be divisible by {unit} (tp{' and 2*cp and cp*tp (zigzag)' if par.cp > 1 else ''} "
                          f"for parallel.tp={par.tp}, cp={par.cp}), got {exp.data.seq_len}")
    _validate_cp_ulysses(exp)
    if par.cp_layout == "zigzag_documents" and par.cp == 1 and par.sp_mode == "static":
        raise ConfigError("parallel.cp_layout: zigzag_documents splits documents over cp ranks; it needs "
                          "parallel.cp > 1")
    if par.cp_layout == "zigzag_documents" and par.sp_mode != "static":
        raise ConfigError(f"parallel.cp_layout: zigzag_documents cuts the rows of static cp (parallel.sp_mode=static); "
                          f"sp_mode={par.sp_mode} cuts its own rows, use cp_layout=zigzag")
    if par.cp > 1 and par.cp_impl != "auto" and not par.cp_ulysses:  # (a 2-D one: checked with its U above)
        heads, kv_heads = m.n_heads // par.tp, m.n_kv_heads // par.tp  # one tensor-parallel rank's
        if why := cp_strategy(par.cp_impl).unsupported(heads, kv_heads, par.cp):
            others = usable(heads, kv_heads, par.cp)
            raise ConfigError(f"parallel.cp_impl: {why} (model.n_heads {m.n_heads}, n_kv_heads {m.n_kv_heads} over "
                              f"tp={par.tp} x cp={par.cp}); use {' or '.join(others) or 'another cp degree'}")
    if exp.train.micro_batch_size and exp.train.global_batch_size % exp.train.micro_batch_size:
        raise ConfigError(
            f"train.micro_batch_size: must divide train.global_batch_size ({exp.train.global_batch_size}), "
            f"got {exp.train.micro_batch_size}")
    activation_modes.check(par)
    tiled_mlp.check(par)
    _validate_faulttol(exp)
    _validate_dp_sync(exp)
    _validate_pipeline(exp)
    _validate_engine(exp)


def _validate_cp_ulysses(exp: Experiment) -> None:
    """``parallel.cp_ulysses``: given exactly with a two-dimensional ``cp_impl``, and a group size that strategy can
    use for this cp degree and these heads (its ``unsupported``, with U bound)."""
    from loomtrain.parallel.cp import two_dimensional

    par, m = exp.parallel, exp.model
    s = cp_strategy(par.cp_impl) if par.cp_impl != "auto" else None
    if not two_dimensional(s):
        if par.cp_ulysses:
            two_d = [n for n, t in CP_STRATEGIES.items() if two_dimensional(t)]
            raise ConfigError(f"parallel.cp_ulysses: only used with parallel.cp_impl={' | '.join(two_d)}, got "
                              f"cp_impl={par.cp_impl} (unset it, or pick a two-dimensional cp_impl)")
        return
    if par.cp_ulysses < 0:
        raise ConfigError(f"parallel.cp_ulysses: must be >= 2, got {par.cp_ulysses}")
    if why := s.with_ulysses(par.cp_ulysses).unsupported(m.n_heads // par.tp, m.n_kv_heads // par.tp, par.cp):
        raise ConfigError(f"parallel.cp_ulysses: {why} (parallel.cp_impl={par.cp_impl}, cp={par.cp}, tp={par.tp}, "
                          f"model.n_heads {m.n_heads}, n_kv_heads {m.n_kv_heads})")


def _validate_rope_scaling(rs: RopeScalingConfig) -> None:
    """model.rope_scaling: every parameter its type needs, valid, and none it does not use (type checked by CHOICES)."""
    spec = ROPE_SCALING_PARAMS[rs.type]
    takes = spec["required"] + spec["optional"]
    defaults = RopeScalingConfig()
    for f in dataclasses.fields(rs):
        if f.name != "type" and f.name not in takes and getattr(rs, f.name) != getattr(defaults, f.name):
            uses = ", ".join(takes) if takes else "no parameters (model.rope_theta sets the base)"
            raise ConfigError(f"model.rope_scaling.{f.name}: not used by type {rs.type}, which takes {uses}")
    p = "model.rope_scaling"

    def need(name: str, ok: bool, valid: str) -> None:
        value = getattr(rs, name)
        if name in spec["required"] and value == getattr(defaults, name):
            raise ConfigError(f"{p}.{name}: required by type {rs.type} ({valid})")
        if not (ok and math.isfinite(value)):
            raise ConfigError(f"{p}.{name}: must be {valid}, got {value}")

    if "factor" in takes:
        need("factor", rs.factor >= 1, "a number >= 1")
    if "original_max_position_embeddings" in takes:
        need("original_max_position_embeddings", rs.original_max_position_embeddings > 0,
             "the context the model was trained for, > 0")
    if rs.type == "llama3":
        need("low_freq_factor", rs.low_freq_factor > 0, "a number > 0")
        need("high_freq_factor", rs.high_freq_factor > rs.low_freq_factor,
             f"a number > low_freq_factor ({rs.low_freq_factor})")
    if rs.type == "yarn":
        need("beta_slow", rs.beta_slow > 0, "a number > 0")
        need("beta_fast", rs.beta_fast >= rs.beta_slow, f"a number >= beta_slow ({rs.beta_slow})")
        for name in ("attention_factor", "mscale", "mscale_all_dim"):
            need(name, getattr(rs, name) >= 0, "a number >= 0 (0: transformers' default)")


def _validate_sources(d: DataConfig) -> None:
    """data.sources: each entry one corpus or prepared prefix, a weight >= 0, a distinct name; weights with a
    positive sum; nothing that data.corpus / data.prepared would contradict. (Paths: data/blend.py's
    ``check_sources``, on the machine that reads them.)"""
    if not d.sources:
        return
    from loomtrain.data.blend import SOURCE_NAME, source_name

    defaults = DataConfig()
    for key in ("corpus", "prepared", "valid_prepared"):
        if getattr(d, key) != getattr(defaults, key):
            raise ConfigError(f"data.{key}: not used with data.sources (give each source's {key} in its entry), "
                              f"got {getattr(d, key)!r}")
    if d.batching != "windows":
        raise ConfigError(f"data.batching: data.sources blends windows; use data.batching=windows, got {d.batching}")
    names: dict[str, int] = {}
    for i, s in enumerate(d.sources):
        p = f"data.sources[{i}]"
        if bool(s.corpus) == bool(s.prepared):
            raise ConfigError(f"{p}: give exactly one of corpus (text to prepare) or prepared (a prepared prefix), "
                              f"got {'both' if s.corpus else 'neither'}")
        if s.valid_prepared and not s.prepared:
            raise ConfigError(f"{p}.valid_prepared: only with {p}.prepared (a Megatron prefix)")
        if not (math.isfinite(s.weight) and s.weight >= 0):
            raise ConfigError(f"{p}.weight: must be >= 0, got {s.weight:g}")
        if s.max_documents < 0:
            raise ConfigError(f"{p}.max_documents: must be >= 0, got {s.max_documents}")
        name = source_name(s)
        if not re.fullmatch(SOURCE_NAME, name):
            raise ConfigError(f"{p}.name: letters, digits, '_', '.', '-' only (it is a metric key), got {name!r}")
        if name in names:
            raise ConfigError(f"{p}.name: '{name}' is already data.sources[{names[name]}]'s name; give each source "
                              f"a distinct name")
        names[name] = i
    total = sum(s.weight for s in d.sources)
    if not total > 0:
        raise ConfigError(f"data.sources: the weights sum to {total:g}; at least one must be > 0")


def _validate_faulttol(exp: Experiment) -> None:
    ft = exp.faulttol
    if ft.ec_parity > 8:
        raise ConfigError(f"faulttol.ec_parity: must be <= 8, got {ft.ec_parity}")
    if ft.inject.kind != "none" and ft.inject.step < 1:
        raise ConfigError(f"faulttol.inject.step: must be >= 1, got {ft.inject.step}")
    if ft.inject.kind != "none" and ft.inject.step >= exp.train.steps:
        raise ConfigError(f"faulttol.inject.step: must be before the last step (train.steps={exp.train.steps}), "
                          f"got {ft.inject.step}")


def _validate_dp_sync(exp: Experiment) -> None:
    """What every method with local updates needs from the layout, then the method's own settings."""
    par = exp.parallel
    method = DP_SYNC.get(par.dp_sync)
    if method.local_updates:
        if not ENGINES.get(par.dp_engine).averages_within_workers:
            able = [n for n, e in ENGINES.items() if e.averages_within_workers]
            raise ConfigError(f"parallel.dp_sync: {par.dp_sync} runs on parallel.dp_engine={' or '.join(able)} "
                              f"({par.dp_engine} averages gradients over every data-parallel rank itself)")
    method.check(exp)


def pipeline_microbatches(exp: Experiment) -> int:
    par = exp.parallel
    return exp.train.microbatches or 2 * par.pp * par.pp_virtual_stages


def _validate_pipeline(exp: Experiment) -> None:
    par = exp.parallel
    if par.pp == 1:
        return
    stages = par.pp * par.pp_virtual_stages
    if par.pp_virtual_stages > 1 and par.pp_schedule != "interleaved_1f1b":
        raise ConfigError(f"parallel.pp_virtual_stages: {par.pp_virtual_stages} stages per rank need "
                          f"parallel.pp_schedule=interleaved_1f1b, got {par.pp_schedule}")
    if stages > exp.model.n_layers:
        raise ConfigError(f"parallel.pp: {stages} pipeline stages (pp x pp_virtual_stages) but model.n_layers is "
                          f"{exp.model.n_layers}; at most one stage per layer")
    pipeline_stage_layers(exp.model.n_layers, stages, par.pp_split)
    m = pipeline_microbatches(exp)
    if par.pp_schedule == "1f1b" and m < par.pp:
        raise ConfigError(f"train.microbatches: 1f1b needs at least parallel.pp ({par.pp}) microbatches, got {m}")
    if par.pp_schedule == "interleaved_1f1b" and m % max(1, m // par.pp):
        raise ConfigError(f"train.microbatches: interleaved_1f1b needs a multiple of max(1, microbatches // pp) "
                          f"(e.g. a multiple of parallel.pp = {par.pp}), got {m}")
    if exp.train.micro_batch_size:
        raise ConfigError("train.micro_batch_size: with parallel.pp > 1 the batch is split by train.microbatches; "
                          "leave micro_batch_size at 0")


def _validate_engine(exp: Experiment) -> None:
    if exp.parallel.zero_stage not in (1, 2, 3):
        raise ConfigError(f"parallel.zero_stage: must be 1, 2 or 3, got {exp.parallel.zero_stage}")
    ENGINES.get(exp.parallel.dp_engine).check(exp)


def save_config(exp: Experiment, path: str) -> None:
    """Write the resolved config atomically (temp file + rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_text(path, yaml.safe_dump(exp.to_dict(), sort_keys=False))
