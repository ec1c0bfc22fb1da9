"""Sequence parallelism as a strategy: a static cp degree, or hybrid data parallelism with adaptive groups.

``parallel.sp_mode`` picks one. Both answer the trainer's two questions: what to do at the start of a
step (``begin_step``) and how one micro-batch meets the model (``prepare``: the rank's part of the
tokens and the attention the model uses for it).

- :class:`StaticSP`: every sequence is split over the mesh's cp group (zigzag); the model's
  ``ContextParallelAttention`` was fixed when it was parallelized.
- :class:`AdaptiveSP` (ByteScale's hybrid data parallelism with FlexSP's planner): all data-parallel
  ranks are one pool (with tensor parallelism each member is a tp group, and a group of members runs
  context parallelism among the ranks of each tp coordinate: ``planner.PoolRanks``). Every step
  :class:`AdaptiveBatches` plans groups with ``planner.plan_groups`` from the step's document lengths and the fitted cost model (identically on every rank, on the prefetch
  thread while the previous step trains), and hands each rank only the sequences its group runs,
  already cut to the rank's zigzag part. A group of one runs plain attention with no CP traffic.
  Ranks may run different numbers of sequences: FSDP keeps parameters gathered over the step and
  reduces gradients once, after the last one (``FSDPEngine(uneven=True)``), so collectives line up.
  Process groups are created collectively and cached: every set a plan can place before the first step
  when there are at most ``PRECREATE_GROUPS`` (a node of 8 has 28), else the calibration's tiles at
  start-up and, at the start of a step, sets not seen before (every rank knows the whole plan, so all
  make the same calls in the same order).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from loomtrain.data.batching import BATCHINGS
from loomtrain.data.loader import DocumentPosition, DocumentStream, document_row
from loomtrain.errors import ConfigError
from loomtrain.parallel.cp import CP_STRATEGIES
from loomtrain.parallel.cp import strategy as cp_strategy
from loomtrain.parallel.cp.attention import shard_for, shard_sequence
from loomtrain.parallel.cp.doc_layout import pieces_for, reorder_batch
from loomtrain.parallel.sp.planner import PoolRanks, placeable_rank_sets, plan_groups
from loomtrain.parallel.sp.waves import pack_rows, padded_length, plan_waves


def impl_codes() -> tuple[str, ...]:
    """A row's strategy travels as its index here ("none": a group of one); the same on every rank."""
    return ("none",) + CP_STRATEGIES.names()


PRECREATE_GROUPS = 64  # pools with at most this many placeable rank sets create them all before the first step


class StaticSP:
    """The mesh's cp group splits every sequence (nothing to do when cp = 1)."""

    uneven = adaptive = sharded_accumulation = waves = False

    @classmethod
    def check(cls, exp, dims) -> None:
        d = exp.data
        max_doc = d.max_doc_tokens or d.seq_len
        if BATCHINGS.get(d.batching).whole_documents and max_doc > d.seq_len:
            raise ConfigError(f"data.max_doc_tokens: {max_doc} must be <= data.seq_len ({d.seq_len}), the longest row")

    @classmethod
    def longest_sequence(cls, exp, world: int) -> int:
        return exp.data.seq_len

    @classmethod
    def build(cls, exp, model_args, dims, mesh, train_data, dp_rank: int, device, ranks_per_node: int, copy,
              cp_impl=None):
        from loomtrain.data.loader import build_batch_plan

        cp_group = mesh["cp"].get_group() if dims.cp > 1 else None
        pieces = pieces_for(cp_impl, dims.cp) if cp_group and exp.parallel.cp_layout == "zigzag_documents" else 0
        return cls(cp_group, pieces), build_batch_plan(exp, train_data, dp_rank, dims.dp)

    def __init__(self, cp_group=None, pieces: int = 0):
        """``pieces``: with ``parallel.cp_layout: zigzag_documents``, how many pieces each packed document of a row
        is cut into before the zigzag cut (``parallel/cp/doc_layout.py``); 0: the row is cut as a whole."""
        self.cp_group, self.pieces = cp_group, pieces

    def host_layout(self, batch: dict) -> dict:
        """Per-document zigzag: each document's pieces over the ranks (about 10 ms of host time per 128K-token row,
        so it runs on the prefetch thread, overlapped with the step before)."""
        return reorder_batch(batch, self.pieces)

    def begin_step(self, micro) -> None:
        pass

    def prepare(self, model, batch: dict) -> dict:
        if self.cp_group is None:
            return batch
        return {k: shard_sequence(v, dim=1, group=self.cp_group) for k, v in batch.items()}


class SequenceGroups:
    """Process groups by rank set, created collectively and kept; one attention module per (ranks, strategy)."""

    def __init__(self, kernel: str = "auto"):
        self.kernel = kernel  # the run's attention backend, which the cp blocks run too
        self.groups: dict[tuple, tuple] = {}  # ranks -> (group, reverse group)
        self.attention: dict[tuple, object] = {}  # (ranks, strategy) -> its attention callable
        self.created = 0

    def ensure(self, rank_sets) -> None:
        """Every rank calls this with the same sets (the whole step plan): missing groups are made in order."""
        for ranks in sorted({tuple(r) for r in rank_sets if len(r) > 1}):
            if ranks not in self.groups:
                self.groups[ranks] = (dist.new_group(list(ranks)), dist.new_group(list(ranks)))
                self.created += 1

    def module(self, ranks: tuple, impl: str):
        key = (ranks, impl)
        if key not in self.attention:
            group, reverse = self.groups[ranks]
            self.attention[key] = cp_strategy(impl).make(group, reverse_group=reverse, kernel=self.kernel)
        return self.attention[key]


class AdaptiveSP:
    """Groups sized to each step's sequences over a pool of every data-parallel rank (the module docstring)."""

    uneven = adaptive = True
    sharded_accumulation = False
    waves = False  # AdaptiveShardedSP: every rank runs the same number of rows

    @classmethod
    def check(cls, exp, dims) -> None:
        """Every data-parallel rank (a member: a tp group when tp > 1) is one data x context pool (FSDP, or HSDP,
        over all of it)."""
        from loomtrain.parallel.dp_sync import DP_SYNC
        from loomtrain.parallel.engines import ENGINES
        from loomtrain.parallel.sp.planner import sp_degrees

        par, d = exp.parallel, exp.data
        if not BATCHINGS.get(d.batching).whole_documents:
            able = [n for n, b in BATCHINGS.items() if b.whole_documents]
            raise ConfigError(f"parallel.sp_mode: {par.sp_mode} plans whole documents; set data.batching={' or '.join(able)}")
        if DP_SYNC.get(par.dp_sync).local_updates:
            raise ConfigError(f"parallel.dp_sync: {par.dp_sync} is not supported with parallel.sp_mode={par.sp_mode}")
        others = [f"parallel.{k}={getattr(dims, k)}" for k in ("pp", "cp") if getattr(dims, k) > 1]
        if others:
            raise ConfigError(f"parallel.sp_mode: {par.sp_mode} makes every data-parallel rank (a tensor-parallel group) "
                              f"one data x context pool (groups are chosen per step); set {', '.join(others)} to 1")
        if dims.tp > 1 and dims.order[-1] != "tp":
            raise ConfigError(f"parallel.mesh_order: adaptive sp with tp > 1 needs tp innermost (a node holds whole "
                              f"tp groups), got {','.join(dims.order)}")
        if not ENGINES.get(par.dp_engine).varying_micro_batches:
            able = [n for n, e in ENGINES.items() if e.varying_micro_batches]
            raise ConfigError(f"parallel.sp_mode: {par.sp_mode} needs parallel.dp_engine={' or '.join(able)}")
        ds = sp_degrees(par, dims.dp) or [dims.dp]
        max_doc = d.max_doc_tokens or d.seq_len
        if max_doc > d.seq_len * max(ds):
            raise ConfigError(f"data.max_doc_tokens: {max_doc} does not fit the largest group ({max(ds)} ranks x "
                              f"data.seq_len {d.seq_len} tokens per rank" + (f"; a rank here is a tp group of "
                                                                              f"{dims.tp}" if dims.tp > 1 else "") + ")")

    @classmethod
    def longest_sequence(cls, exp, world: int) -> int:
        """A sequence padded for the widest group."""
        d = exp.data
        return max(d.seq_len, -(-(d.max_doc_tokens or d.seq_len) // (2 * world)) * 2 * world)

    @classmethod
    def build(cls, exp, model_args, dims, mesh, train_data, dp_rank: int, device, ranks_per_node: int, copy,
              cp_impl=None):
        """The pool, its process groups, the cost model (declared, or calibrated by the pool) and the plan."""
        from loomtrain.parallel.sp.planner import sp_degrees

        # The pool's members are the data-parallel coordinates (one tensor-parallel group each).
        pool = PoolRanks(dims.groups("dp"), dist.get_rank())
        per_node = max(1, ranks_per_node // dims.tp)
        sp, degrees = cls(pool, copy.backend), sp_degrees(exp.parallel, pool.size)
        nodes = per_node if pool.size % per_node == 0 and per_node < pool.size else None
        every = placeable_rank_sets(pool.size, degrees, nodes)
        if len(every) <= PRECREATE_GROUPS:  # a node's worth: no step ever creates a group
            sp.groups.ensure(pool.every(every))
        shard, loss_parallel = None, exp.parallel.loss_parallel and dims.tp > 1
        if dims.tp > 1:  # the calibration's copies split over the tensor-parallel group as the model is
            from loomtrain.parallel.parallelize import apply_tp

            def shard(model):
                apply_tp(model, mesh["tp"], loss_parallel)
        cost = adaptive_cost(exp, model_args, device, pool, per_node, sp.groups, degrees, shard, loss_parallel,
                             copy=copy)
        t, d = exp.train, exp.data
        plan = AdaptiveBatches(train_data.data, t.seed, t.global_batch_tokens, d.max_doc_tokens or d.seq_len,
                               d.seq_len, pool.member, pool.size, cost, degrees, nodes, dims.tp, waves=cls.waves)
        return sp, plan

    def __init__(self, pool, kernel: str = "auto"):
        self.pool, self.groups = pool, SequenceGroups(kernel)

    def host_layout(self, batch: dict) -> dict:
        return batch  # the plan (AdaptiveBatches) already cut each rank its part, on the prefetch thread

    def begin_step(self, micro) -> None:
        ranges = micro[0]["sp_plan"].tolist()  # (start, size) of every group of this step's plan, in members
        self.groups.ensure(self.pool.every(range(a, a + d) for a, d in ranges))

    def prepare(self, model, batch: dict) -> dict:
        if "sp_group" not in batch:  # evaluation windows: each rank its own, no context parallelism
            model.context_parallel = None
            return batch
        batch = dict(batch)
        start, size = batch.pop("sp_group").tolist()
        impl = impl_codes()[int(batch.pop("sp_impl"))]
        batch.pop("sp_plan")
        model.context_parallel = None if size == 1 else self.groups.module(self.pool.ranks(range(start, start + size)),
                                                                           impl)
        return batch


class AdaptiveShardedSP(AdaptiveSP):
    """Adaptive groups run in waves, so FSDP stays sharded (``parallel.sp_mode: adaptive_sharded``).

    Every rank runs the same number of rows per step: in each wave of ``waves.plan_waves`` every group runs one
    row, and a rank outside that wave's groups an unlabelled two-token row (as an idle rank does). Every pass
    then makes the same FSDP collectives on every rank, so units are resharded after forward and gradients
    reduce-scattered after every backward, as in a static layout: a rank holds its shard of the model and of
    the gradients plus the few units in flight, not the whole model gathered and its unsharded gradients
    (``AdaptiveSP``). The price: a step lasts the sum over waves of each wave's slowest row, rather than the
    busiest group's sum, and each wave gathers the parameters again.
    """

    uneven = False
    sharded_accumulation = waves = True


class AdaptiveBatches(DocumentPosition):
    """Whole documents up to the token budget per step, planned onto groups; this rank's sequences only.

    Each micro-batch is one row (batch 1): the group's sequences in order, packed up to what its ranks hold
    (``rows``; each its own document), padded to a length the group can split (padding unlabelled) and cut
    to this rank's zigzag part, with the group (``sp_group``: start, size), the strategy and the step's
    whole plan (``sp_plan``) as small tensors. An idle rank gets one unlabelled two-token sequence (padded
    to what tp splits), so it still joins the step's gradient reduction. With ``waves``, the step is planned in
    waves (``waves.plan_waves``) and every rank gets one row per wave (``AdaptiveShardedSP``).
    """

    def __init__(self, data, seed: int, global_batch_tokens: int, max_doc_tokens: int, capacity: int, rank: int,
                 world: int, cost, degrees=None, ranks_per_node: int | None = None, tp: int = 1,
                 waves: bool = False):
        self.data, self.budget, self.capacity = data, global_batch_tokens, capacity
        self.rank, self.world, self.cost, self.tp = rank, world, cost, tp  # rank/world: the pool's members
        self.degrees, self.ranks_per_node, self.waves = degrees, ranks_per_node, waves
        self.stream = DocumentStream(data, seed, max_doc_tokens)
        self.seed = seed
        self.micro_batch = 1

    @property
    def accumulation_steps(self) -> int:
        return 1

    def plan(self, position=None):
        """(the step's plan: ``planner.Plan``, or ``waves.Waves`` with ``waves``; its pieces; the next position)."""
        pieces, nxt = self.stream.pieces(self._position if position is None else position, self.budget)
        lengths = [n for _, n in pieces]
        if self.waves:
            return plan_waves(lengths, self.world, self.capacity, self.cost, tp=self.tp, degrees=self.degrees,
                              ranks_per_node=self.ranks_per_node), pieces, nxt
        plan = plan_groups(lengths, self.world, self.capacity, self.cost, degrees=self.degrees,
                           ranks_per_node=self.ranks_per_node, time_limit_s=None)  # no clock: same plan on all ranks
        return plan, pieces, nxt

    def rows(self, seqs, pieces, d: int) -> list[list[tuple[int, int]]]:
        """A group's sequences packed in order into rows its d ranks hold (:func:`pack_rows`)."""
        return pack_rows([pieces[i] for i in seqs], d, self.capacity, self.tp)

    def _padded(self, n: int, d: int) -> int:
        return padded_length(n, d, self.tp)

    def _row(self, row, ranks: tuple, plan_ranges) -> dict[str, torch.Tensor]:
        d = len(ranks)
        n = sum(k for _, k in row)
        arrays = document_row(self.data.tokens, row, self._padded(n, d))
        if len(row) == 1:  # one document: causal attention over it; the padding after it has no labels
            del arrays["doc_ids"]
        out = {k: torch.from_numpy(v).unsqueeze(0) for k, v in arrays.items()}
        if d > 1:
            out = {k: shard_for(v, self.rank - ranks[0], d, dim=1) for k, v in out.items()}
        impl = "none" if d == 1 else self.cost.strategy(n, d, sum(k * k for _, k in row) / max(n * n, 1))
        out["sp_group"] = torch.tensor([ranks[0], d])
        out["sp_impl"] = torch.tensor(impl_codes().index(impl))
        out["sp_plan"] = plan_ranges
        return out

    def _idle(self, ranges) -> dict[str, torch.Tensor]:
        """One unlabelled two-token sequence of this rank's own: a pass that only keeps the collectives in step."""
        batch = self._row([(0, 2)], (self.rank,), ranges)
        batch["labels"].fill_(-100)
        return batch

    def build(self, position):
        plan, pieces, nxt = self.plan(position)
        ranges = torch.tensor(list(dict.fromkeys((r[0], len(r)) for r, _ in plan.groups)),  # waves repeat groups
                              dtype=torch.int64).reshape(-1, 2)
        if self.waves:  # one row per wave: this rank's group's, or an idle one
            out = []
            for wave in plan.waves:
                mine = next(((ranks, row) for ranks, row in wave if self.rank in ranks), None)
                out.append(self._idle(ranges) if mine is None else
                           self._row([pieces[i] for i in mine[1]], mine[0], ranges))
            return out or [self._idle(ranges)], nxt
        mine = plan.group_of(self.rank)
        if mine is None:  # idle this step: one unlabelled two-token sequence of its own
            return [self._idle(ranges)], nxt
        ranks, seqs = mine
        return [self._row(row, ranks, ranges) for row in self.rows(seqs, pieces, len(ranks))], nxt


def adaptive_cost(exp, model_args, device, pool, members_per_node: int, groups: SequenceGroups, degrees,
                  shard_model=None, loss_parallel: bool = False, *, copy):
    """The planner's cost model: declared coefficients, or measured by the whole pool (cached; the same numbers
    on every rank). Group sizes count members; heads are one tensor-parallel rank's. ``copy``: the
    :class:`ModelCopy` calibration times."""
    from loomtrain.parallel.sp.cost import SequenceCost, calibrate_pool

    par = exp.parallel
    links = dict(intra_bw=par.cp_link_gbps * 1e9 / 8, inter_bw=par.sp_inter_node_gbps * 1e9 / 8,
                 latency_s=par.cp_latency_us * 1e-6, ranks_per_node=members_per_node, topology=par.cp_topology,
                 impls=CP_STRATEGIES.names() if par.cp_impl == "auto" else (par.cp_impl,))
    if par.sp_alpha1 or par.sp_alpha2:
        return SequenceCost(par.sp_alpha1, par.sp_alpha2, model_args.n_heads // pool.tp,
                            model_args.n_kv_heads // pool.tp, model_args.head_dim, model_args.n_layers, **links)
    return calibrate_pool(model_args, device, exp.data.cache_dir, pool=pool,
                          degrees=degrees or range(1, pool.size + 1), capacity=exp.data.seq_len, groups=groups,
                          dtype=getattr(torch, exp.model.dtype), backend=copy.backend,
                          build_model=copy.build, loss_sum=copy.loss_sum,
                          activation_checkpoint="full" in par.activation_checkpoint.split("+"), shard_model=shard_model,
                          loss_parallel=loss_parallel, **links)


@dataclass
class ModelCopy:
    """What the adaptive cost model's calibration needs from the run: the model family's ``build(args)`` (a
    copy with fewer layers), the training ``loss_sum(logits, labels)`` and the attention ``backend``."""

    build: Callable
    loss_sum: Callable
    backend: str = "auto"


def sequence_parallel(exp, model_args, dims, mesh, train_data, dp_rank: int, device, ranks_per_node: int,
                      copy: ModelCopy, cp_impl=None):
    """(mode, batch plan) for ``parallel.sp_mode`` (``parallel/sp/__init__.py``); ``cp_impl``: the run's cp
    strategy (``trainer/checks.py::cp_attention``), None without cp."""
    from loomtrain.parallel.sp import SP_MODES

    return SP_MODES.get(exp.parallel.sp_mode).build(exp, model_args, dims, mesh, train_data, dp_rank, device,
                                                    ranks_per_node, copy, cp_impl=cp_impl)


def longest_sequence(exp, world: int) -> int:
    """The longest token row the model sees (its RoPE table), as the configured mode feeds it."""
    from loomtrain.parallel.sp import SP_MODES

    return SP_MODES.get(exp.parallel.sp_mode).longest_sequence(exp, world)
