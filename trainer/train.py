"""The training loop: build data, model and optimizer on the mesh; step; log; evaluate; checkpoint.

``loomtrain.launch.train.run(exp)`` is the one entry point (the CLI, torchrun, Slurm and the tests call
it): it starts the process group and the process-wide services, places the ranks, then builds a
:class:`Trainer` here and calls :meth:`Trainer.fit`.
"""
from __future__ import annotations

import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from loomtrain.comms import traffic
from loomtrain.data.blend import prepare_sources
from loomtrain.data.loader import Prefetcher, eval_batches
from loomtrain.faulttol import heartbeat
from loomtrain.faulttol.health import HealthMonitor, gather_hosts
from loomtrain.faulttol.manager import FaultTolerance
from loomtrain.faulttol.snapshot import RestoreFailed
from loomtrain.data.batching import BATCHINGS
from loomtrain.parallel.engines import ENGINES
from loomtrain.parallel.sp import SP_MODES
from loomtrain.parallel.dp_sync import build_sync
from loomtrain.parallel.sp.modes import ModelCopy, longest_sequence, sequence_parallel
from loomtrain.parallel.parallelize import parallelize_model
from loomtrain.parallel.pipeline import build_schedule, build_stages
from loomtrain.trainer.attention import resolve_backend
from loomtrain.trainer.checkpoint import STEP_DIR, checkpointer_for, latest_checkpoint
from loomtrain.trainer.state import RNGState, SyncState, TrainState
from loomtrain.trainer.checks import check_experiment, check_vocab, cp_attention, tokens_per_step
from loomtrain.trainer.config import Experiment, pipeline_microbatches, pipeline_stage_layers
from loomtrain.trainer.loss import build_loss_sum, label_tokens, token_loss_sum
from loomtrain.trainer.metrics import MetricsSink, PeakMemory, detect_peak_flops
from loomtrain.trainer.position_loss import PLOT_NAME as POSITION_PLOT
from loomtrain.trainer.position_loss import bucket_losses, mean_loss, plot_metrics, position_buckets, position_sums
from loomtrain.trainer.hf_import import import_weights
from loomtrain.trainer.models import model_family
from loomtrain.trainer.optim import build_optimizer, build_scheduler
from loomtrain.trainer.step import MicroBatchSteps, PipelineSteps
from loomtrain.log import say

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class TrainResult:
    losses: dict[int, float] = field(default_factory=dict)  # step -> training loss (per-token mean)
    grad_norms: dict[int, float] = field(default_factory=dict)  # step -> global gradient norm before clipping
    val_losses: dict[int, float] = field(default_factory=dict)
    last_step: int = 0
    stopped_by_signal: bool = False
    resumed_from: str | None = None
    checkpoint: str | None = None
    restored_from: str | None = None  # memory | disk | None (a fresh start)
    restore_seconds: float = 0.0
    snapshots: list[int] = field(default_factory=list)  # steps whose in-memory snapshot this rank committed
    snapshot_failures: int = 0  # snapshots skipped after a failure (training went on)


STOP_FILE = "STOP"  # `touch <output_dir>/STOP`: finish the step, checkpoint, exit 0 (the sbatch script's pre-emption)


class StopFlag:
    """SIGTERM/SIGINT or a ``STOP`` file in the output directory ask the loop to finish its step, checkpoint
    and exit; SIGUSR1 to checkpoint and go on. The file is what the generated sbatch script uses on Slurm's
    pre-emption warning: signals would have to pass srun (which turns SIGTERM into SIGKILL) and torchrun
    (which exits non-zero on SIGTERM and gives its workers 30 s)."""

    def __init__(self, stop_file: str | None = None):
        self.requested = False
        self.flush = False
        self.stop_file = stop_file
        self._previous = {}

    def file_requested(self) -> bool:
        """The stop file exists (consumed: a requeued job must not stop again at its first step)."""
        if self.stop_file is None or not os.path.exists(self.stop_file):
            return False
        try:
            os.unlink(self.stop_file)
        except FileNotFoundError:
            pass
        return True

    def install(self):
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if signum == signal.SIGUSR1:
            self.flush = True
        else:
            self.requested = True

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def set_threads(exp: Experiment, env) -> None:
    threads = exp.train.threads or max(1, (os.cpu_count() or 1) // env.local_world_size)
    if env.device.type == "cpu":
        torch.set_num_threads(threads)


def lay_out_model(parts, exp: Experiment, dims, mesh, device, *, cp_impl, loss_parallel: bool,
                  fsdp: bool = True, keep_gathered: bool = False) -> None:
    """Lay the parts of a model built on the meta device over the mesh (``parallelize_model``: TP, CP, tiled MLP,
    AC, compile, FSDP in that order), then allocate them on ``device`` and initialize them from ``train.seed``. The
    trainer's one way to place its model, which ``loomtrain eval`` (``trainer/evaluate.py``) reuses before loading
    weights.
    ``cp_impl``: ``checks.cp_attention``'s answer (None without context parallelism)."""
    par = exp.parallel
    for part in parts:
        parallelize_model(part, dims, mesh, loss_parallel=loss_parallel, activation_checkpoint=par.activation_checkpoint,
                          compile=par.compile, param_dtype=DTYPES[exp.model.dtype], cp_impl=cp_impl, fsdp=fsdp,
                          keep_gathered=keep_gathered, ac_every=par.ac_every, ac_save_ops=par.ac_save_ops,
                          tiled_mlp_tokens=par.tiled_mlp_tokens)
    for part in parts:
        part.to_empty(device=device)
        part.init_weights(exp.train.seed)


class Trainer:
    def __init__(self, exp: Experiment, env, resume: str | None = None, placement=None):
        """``env``: this rank's ``launch.env.DistEnv``; ``placement``: ``launch.placement.place_ranks``'s answer
        (which rank fills each place of the mesh, each dimension's interface; None: ranks in launch order)."""
        self.exp, self.env = exp, env
        tcfg = exp.train
        self.dims = check_experiment(exp, env.world_size, env.local_world_size)
        self.placement = placement
        if placement is not None and placement.order is not None:
            self.dims.placement = tuple(placement.order)
        self.mesh = self.dims.build_mesh(env.device.type, placement.override if placement else {})
        self.mesh.label_traffic()
        self.dp_rank = self.mesh["dp"].get_local_rank()
        self.dtype = DTYPES[exp.model.dtype]

        # Data: every rank asks for the token files; one process writes them under a file lock, the
        # rest wait on the lock (not in a collective that could time out) and read.
        # A blend (data.sources) prepares each source so; its sampler draws them in proportion to their weights.
        with heartbeat.in_phase("data", then="build"):  # may take hours: not watched for hangs
            prepared = prepare_sources(exp.data, progress=env.is_main and tcfg.progress, on_wait=self._data_wait,
                                       need_valid=bool(tcfg.eval_every))
        self.prepared = prepared
        self.train_data = prepared.train_dataset(exp.data.seq_len)
        self.valid_data = prepared.valid_datasets(exp.data.seq_len) if tcfg.eval_every else None  # by source

        # Model: identical full init on every rank (seeded), then laid over the mesh.
        family = model_family(exp.model.family)
        self.args = family.args(exp.model, prepared.vocab_size, longest_sequence(exp, env.world_size))
        check_vocab(self.args.vocab_size, prepared.vocab_size, self.dims.tp,
                    prepared.meta.get("vocab_source", prepared.meta.get("tokenizer", "the tokenizer")))
        # Sequence parallelism (static cp, or adaptive groups per step) and the batch plan that feeds it.
        backend = self.attention_backend = resolve_backend(exp.model.attention, env.device.type, self.dtype,
                                                           self.args.head_dim)
        links = placement.cp_links if placement is not None else None  # from parallel.cluster (the launcher's)
        self.cp_impl = cp_attention(exp, self.args, self.dims, links) if self.dims.cp > 1 else None
        self.sp, plan = sequence_parallel(exp, self.args, self.dims, self.mesh, self.train_data, self.dp_rank,
                                          env.device, env.local_world_size,
                                          ModelCopy(family.build, token_loss_sum, backend), cp_impl=self.cp_impl)
        self.batches = Prefetcher(plan, pin_memory=env.device.type == "cuda", layout=self.sp.host_layout)
        self.tokens_per_step = tokens_per_step(exp)
        self.flops_per_token = self.args.flops_per_token(exp.data.seq_len)
        if exp.logging.peak_tflops:
            self.peak_flops, self.peak_source = exp.logging.peak_tflops * 1e12, "logging.peak_tflops"
        else:
            self.peak_flops, self.peak_source = detect_peak_flops(env.device, self.dtype)

        engine_kind = ENGINES.get(exp.parallel.dp_engine)  # how gradients are reduced and the update applied
        sp_kind = SP_MODES.get(exp.parallel.sp_mode)
        uneven = sp_kind.uneven  # ranks may run different numbers of micro-batches
        torch.manual_seed(tcfg.seed)
        with torch.device("meta"):  # no rank ever holds the whole model: built empty, sharded, then filled
            model = family.build(self.args)
        model.attention_backend = backend
        self.loss_parallel = exp.parallel.loss_parallel and self.dims.tp > 1
        par = exp.parallel
        n_stages = par.pp * par.pp_virtual_stages
        parts = [model]
        if self.dims.pp > 1:  # this rank's pipeline stages, each a pruned copy laid over the rest of the mesh
            split = self.placement.pp_split(exp, self.args, self.dims, self.peak_flops) if self.placement \
                else par.pp_split  # "auto": by the stages' fabrics when placed
            counts = pipeline_stage_layers(exp.model.n_layers, n_stages, split)
            self.stage_ids, parts = build_stages(model, counts, self.mesh["pp"].get_local_rank(), par.pp,
                                                 par.pp_virtual_stages)
            del model
        lay_out_model(parts, exp, self.dims, self.mesh, env.device, cp_impl=self.cp_impl,
                      loss_parallel=self.loss_parallel, fsdp=engine_kind.applies_fsdp,
                      keep_gathered=self.dims.pp > 1 or uneven)
        # A pretrained model: each rank reads only the regions of the files it holds (not when an explicit
        # --resume PATH, e.g. the previous stage of a context extension, replaces the weights anyway).
        if exp.model.init_from and resume in (None, "latest", "auto"):
            self.imported = import_weights(parts, exp.model.init_from, family, self.args)
            if env.is_main:
                print(f"init_from: {self.imported['tensors']} tensors ({self.imported['bytes_read'] / 2**20:.1f} MiB "
                      f"on rank 0) from {exp.model.init_from} in {self.imported['seconds']:.2f}s", flush=True)
        # The loss over the model's output: its logits, or its hidden states through its head chunk by chunk.
        self.loss_sum = build_loss_sum(tcfg.loss_chunk_tokens, parts[-1] if self.dims.pp == 1
                                       or n_stages - 1 in self.stage_ids else None)
        model = parts[0] if len(parts) == 1 else torch.nn.ModuleList(parts)

        # The engine takes the model, optimizer and schedule (DeepSpeed hands back its own wrappers of them).
        optimizer = build_optimizer(model.parameters(), exp.optim, env.device)
        self.engine = engine_kind.build(exp, model, optimizer, build_scheduler(optimizer, exp.optim, tcfg.steps),
                                        dims=self.dims, device=env.device, uneven=uneven,
                                        sharded_accumulation=sp_kind.sharded_accumulation,
                                        pp_group=self.mesh["pp"].get_group() if self.dims.pp > 1 else None,
                                        micro_batch=self.batches.micro_batch,
                                        accumulation=self.batches.accumulation_steps)
        self.model, self.optimizer, self.scheduler = self.engine.model, self.engine.optimizer, self.engine.scheduler
        workers = (self.mesh["dp_replicate"].get_local_rank(), self.dims.workers()) if self.dims.local_updates \
            else None  # replicas with local updates hold different parameters: a checkpoint per worker
        self.ckpt = checkpointer_for(self.engine, os.path.join(tcfg.output_dir, "checkpoints"), exp.checkpoint,
                                     env.rank, env.device, workers)
        # What keeps the data-parallel replicas in step: gradients every step, or outer steps between workers.
        self.sync = build_sync(exp, self.engine, blocks=[b for part in parts for b in part.layers.values()],
                               params=[p for part in parts for p in part.parameters()],
                               names={p: n for part in parts for n, p in part.named_parameters()},
                               group=self.mesh["dp_replicate"].get_group(), worker_group=self._worker_group())
        # The run's stateful parts, in one mapping that checkpoints, snapshots and restore all use.
        self.state = TrainState(self.model, self.optimizer, {"scheduler": self.scheduler, "sampler": self.batches,
                                                             "rng": RNGState(), "dp_sync": SyncState(self.sync)})
        # How a step's micro-batches run: one after another, or through the pipeline schedule.
        if self.dims.pp > 1:
            make = lambda loss_fn: build_schedule(
                par.pp_schedule, self.stage_ids, parts, n_stages, pipeline_microbatches(exp),
                self.mesh["pp"].get_group(), env.device, loss_fn)
            self.steps = PipelineSteps(make, self.engine, first=0 in self.stage_ids,
                                       last=n_stages - 1 in self.stage_ids, pp_group=self.mesh["pp"].get_group(),
                                       loss_parallel=self.loss_parallel, device=env.device,
                                       prepare=lambda batch: self.sp.prepare(None, batch), loss_sum=self.loss_sum)
        else:
            self.steps = MicroBatchSteps(self.engine, self._forward_loss_sum, self.loss_parallel, env.device)
        self.step = 0
        self.resumed_from = None
        self.restored_from, self.restore_seconds = None, 0.0
        self.ft = FaultTolerance(exp, env, self.dims, self.placement.cluster if self.placement else None)
        # Ranks are compared with the others of their pipeline stage (stages differ in work by design).
        self.health = HealthMonitor(gather_hosts(env.world_size), env.is_main, device_type=env.device.type,
                                    cohorts=[list(c) for c in zip(*self.dims.groups("pp"))])
        with heartbeat.in_phase("restore"):
            self._restore(resume)

    def _worker_group(self):
        """One replica's ranks (pp x dp_shard x cp x tp) when replicas take local updates and span ranks."""
        if not self.dims.local_updates or self.env.world_size == self.dims.dp_replicate:
            return None
        return self.mesh.root["pp", "dp_shard", "cp", "tp"]._flatten("worker").get_group()

    def _data_wait(self, message: str) -> None:
        if self.env.is_main:
            say(message)

    def _restore(self, resume: str | None) -> None:
        """Where the state comes from, in an order users can predict (and the log says which and why):

        - a fresh start (attempt 0): ``--resume PATH`` or ``--resume latest`` from disk, else step 0. Memory
          snapshots are never loaded, whatever an SMP still holds;
        - a restart of the same run (the launcher restarted the ranks): the newest of this run's memory
          snapshot (same run id, config and code) and the latest checkpoint under the output directory,
          else ``--resume PATH`` again.
        """
        ft = self.ft
        if ft.restarted:
            explicit = resume if resume not in (None, "latest", "auto") else None
            path = latest_checkpoint(self.ckpt.root) or explicit
        else:
            path = latest_checkpoint(self.ckpt.root) if resume in ("latest", "auto") else resume
        located, why = ft.locate()
        disk_step = int(m.group(1)) if path and (m := STEP_DIR.match(os.path.basename(path.rstrip("/")))) else -1
        if located is not None and located.epoch >= disk_step:
            try:
                restored = ft.snapshots.restore(located, self.model, self.optimizer, self.state.extra_tensors())
            except RestoreFailed as e:
                why = f"restoring step {located.epoch} failed: {e}"
            else:
                self.state.load_host_state(restored.host)
                self.step, self.restored_from, self.restore_seconds = restored.step, "memory", restored.seconds
                self.resumed_from = f"memory snapshot of step {restored.step}"
                if self.env.is_main:
                    how = ("taken {}' state from a replica's copy" if ft.layout.by_replicas else
                           "rebuilt {}' state from parity")
                    rebuilt = "; " + how.format(f"{restored.rebuilt} rank(s)") if restored.rebuilt else ""
                    disk = f"disk has step {disk_step}" if disk_step >= 0 else "no disk checkpoint"
                    print(f"faulttol: restored step {restored.step} from memory in {restored.seconds:.2f}s "
                          f"(restart {ft.attempt} of run {ft.run or '(unnamed)'}; {disk}){rebuilt}", flush=True)
                return
        elif located is not None:
            why = f"memory has step {located.epoch}, the disk checkpoint is newer"
        if resume == "latest" and path is None:
            raise FileNotFoundError(f"--resume: no checkpoint under '{self.ckpt.root}'")
        loud = ft.restarted and ft.snapshots is not None
        if path:
            start = time.perf_counter()
            self.step = self.ckpt.load(path, self.state)
            self.resumed_from, self.restored_from = path, "disk"
            self.restore_seconds = time.perf_counter() - start
            if self.env.is_main:
                if loud:
                    say(f"faulttol: WARNING: memory snapshots could not serve ({why}); restored step {self.step} "
                        f"from the disk checkpoint {path} in {self.restore_seconds:.2f}s")
                else:
                    print(f"resume: step {self.step} from the disk checkpoint {path} in {self.restore_seconds:.2f}s "
                          f"({why})", flush=True)
        elif ft.restarted and self.env.is_main:
            say(f"faulttol: WARNING: restarted with nothing to restore ({why}; no disk checkpoint): "
                f"training again from step 0")

    # ------------------------------------------------------------------ steps
    def _forward_logits(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """(the model's output: logits, or hidden states under the chunked loss; this rank's part of the batch on the
        device) for one (host) micro-batch."""
        batch = self.sp.prepare(self.model, batch)  # this rank's part of the tokens, and its attention
        batch = {k: v.to(self.env.device, non_blocking=True) for k, v in batch.items()}
        return self.model(batch["input_ids"], batch["position_ids"], batch.get("doc_ids")), batch

    def _forward_loss_sum(self, batch: dict) -> torch.Tensor:
        """This rank's summed token loss over one (host) micro-batch (chunked when train.loss_chunk_tokens > 0: the
        model then returns hidden states and the loss applies its head chunk by chunk)."""
        output, batch = self._forward_logits(batch)
        return self.loss_sum(output, batch["labels"])

    @traffic.counted_as("other")
    def _global_tokens(self, batches: list[dict]) -> torch.Tensor:
        """Label tokens of the step over the ranks whose gradients are averaged together: every data-parallel
        rank, or one worker's when replicas take local updates (cp/tp/pp peers hold the same batch). A device
        tensor: the loss scale is computed from it on the device, without waiting for the all-reduce."""
        dims = self.dims
        count = torch.tensor(label_tokens(batches), dtype=torch.int64, device=self.env.device)
        if (dims.dp_shard if dims.local_updates else dims.dp) > 1:
            dist.all_reduce(count, group=self.mesh["dp_shard" if dims.local_updates else "dp"].get_group())
        return count

    @traffic.counted_as("other")
    def _global_mean(self, local_sum: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The per-token mean over every data-parallel rank (``tokens`` as :meth:`_global_tokens` counts), a
        float64 device tensor."""
        dims = self.dims
        if dims.local_updates:  # tokens are one worker's: each of its dp_shard x cp ranks adds its share
            both = torch.stack([local_sum.double(), tokens.double() / (dims.dp_shard * dims.cp)])
            dist.all_reduce(both, group=self.mesh["loss"].get_group())
            return both[0] / both[1].round().clamp(min=1)
        if dims.dp * dims.cp > 1:
            dist.all_reduce(local_sum, group=self.mesh["loss"].get_group())  # dp x cp ranks hold disjoint tokens
        return local_sum.double() / tokens.clamp(min=1)

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step: (per-token mean loss over the global batch, gradient norm), device tensors; the
        loop reads them in its one exchange per step (:meth:`_exchange`)."""
        self.health.start()  # this rank's time outside collectives names the straggler
        micro = self.batches.next_step()
        self.health.data_ready()
        self.sp.begin_step(micro)  # adaptive sp: process groups for rank sets this plan uses first
        tokens = self._global_tokens(micro)
        self.model.train()
        scale = (self.engine.averaging_ranks / tokens.clamp(min=1).double()).float()
        local_sum = self.steps.forward_backward(micro, scale)
        self.ft.before_update()  # an in-flight snapshot must have copied the parameters first
        grad_norm = self.sync.step()
        loss = self._global_mean(local_sum, tokens)
        self.health.stop()
        return loss, grad_norm

    @torch.no_grad()
    def evaluate(self) -> dict:
        """``val_loss`` (a blend: also ``val_loss/<source>``, each over its own validation split); with
        ``train.eval_by_position`` also ``loss_by_position``, pooled over every split's tokens
        (``trainer/position_loss.py``), from the same forwards."""
        self.model.eval()
        positions = torch.zeros(2, self.exp.data.seq_len, dtype=torch.float64, device=self.env.device) \
            if self.exp.train.eval_by_position else None
        record = self.prepared.val_record({name: self._validation_loss(data, positions)
                                           for name, data in self.valid_data.items()})
        if positions is not None:
            record["loss_by_position"] = bucket_losses(positions, position_buckets(self.exp.data.seq_len,
                                                                                   self.exp.train.eval_bucket))
        return record

    def _validation_loss(self, data, positions: torch.Tensor | None = None) -> float:
        """The per-token mean over ``data``'s validation batches (every rank's); ``positions``: also add each token's
        loss and count at its position (within its document) into it, summed over the ranks."""
        tcfg = self.exp.train
        micro = tcfg.micro_batch_size or self.batches.micro_batch or 1
        batches = [self.sp.host_layout(b) for b in eval_batches(data, tcfg.eval_batches, micro, self.dp_rank,
                                                                self.dims.dp)]
        if positions is not None:
            return self._loss_by_position(batches, positions)
        tokens = self._global_tokens(batches)
        with self.sync.outer_model():  # workers with local updates: the model they share, not their own
            total = sum((self.steps.evaluate(b) for b in batches), torch.zeros((), device=self.env.device))
        with heartbeat.waiting():
            return self._global_mean(total, tokens).item()

    @torch.no_grad()
    def _loss_by_position(self, batches: list[dict], positions: torch.Tensor) -> float:
        """:meth:`_validation_loss` keeping every token's loss (one forward per batch, as there): the sums of the
        ranks holding disjoint tokens (dp x cp) add up; tp and pp peers hold the same ones (pp is refused)."""
        sums = torch.zeros_like(positions)
        with self.sync.outer_model():
            for batch in batches:
                with self.engine.precision():
                    logits, batch = self._forward_logits(batch)
                    if getattr(self.model, "hidden_output", False):  # chunked loss: the head, for every position
                        logits = self.model.head(logits)
                    sums += position_sums(logits, batch["labels"], batch["position_ids"], sums.shape[1])
        if self.dims.dp * self.dims.cp > 1:
            with traffic.counted_as("other"):
                dist.all_reduce(sums, group=self.mesh["loss"].get_group())
        positions += sums
        with heartbeat.waiting():
            return mean_loss(sums)

    # ------------------------------------------------------------------ loop
    def fit(self) -> TrainResult:
        exp, env, tcfg = self.exp, self.env, self.exp.train
        result = TrainResult(resumed_from=self.resumed_from, restored_from=self.restored_from,
                             restore_seconds=self.restore_seconds)
        sink = MetricsSink(tcfg.output_dir, exp.logging, exp.to_dict(), env.is_main,
                           resume_step=self.step if self.resumed_from else None)
        stop = StopFlag(os.path.join(tcfg.output_dir, STOP_FILE))
        stop.install()
        bar = None
        if env.is_main:
            self._announce()
            if tcfg.progress and sys.stderr.isatty():  # in logs (CI, Slurm), plain lines read better
                from tqdm import tqdm

                bar = tqdm(total=tcfg.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        finished, self._fit_start, self._fit_first_step = False, time.perf_counter(), self.step
        self.peak_memory = PeakMemory(env.device)  # each logged step's record: the peak since the previous one
        heartbeat.phase("step")
        try:
            while self.step < tcfg.steps:
                start = time.perf_counter()
                stopping, flush, loss, grad_norm = self._exchange(stop, *self.train_step())  # the step's host sync
                step_time = time.perf_counter() - start
                self.step += 1
                result.losses[self.step], result.grad_norms[self.step] = loss, grad_norm
                if not math.isfinite(loss):
                    raise FloatingPointError(f"loss is {loss} at step {self.step}")
                record = self._metrics(loss, grad_norm, step_time) if self._due(tcfg.log_every) else None
                if tcfg.eval_every and self._due(tcfg.eval_every):
                    with heartbeat.in_phase("eval"):
                        val = self.evaluate()
                    result.val_losses[self.step] = val["val_loss"]
                    record = (record or {"step": self.step}) | val
                self._report(record, sink, bar, loss)
                if record and "loss_by_position" in record and env.is_main:  # every evaluated step so far
                    plot_metrics(os.path.join(tcfg.output_dir, "metrics.jsonl"),
                                 os.path.join(tcfg.output_dir, POSITION_PLOT))
                with heartbeat.in_phase("checkpoint"):  # an async save's commit and pruning
                    self.ckpt.poll()
                self.ft.after_step(self.step, self.model, self.optimizer, self.state.host_state,
                                   self.state.extra_tensors)
                heartbeat.step_done(self.step)  # the hang monitor's limit follows the steps' p99
                if stopping:
                    result.stopped_by_signal = True
                    break
                every = exp.checkpoint.every_steps
                if self.step < tcfg.steps and (flush or self.ft.persist_due(self.step)
                                               or (every and self.step % every == 0)):
                    with heartbeat.in_phase("checkpoint"):
                        result.checkpoint = self.ckpt.save(self.state, self.step)
                    self._say(f"checkpoint of step {self.step}: {result.checkpoint}")
                    stop.flush = False
            heartbeat.phase("checkpoint")  # the last save and the waits for background work
            if result.stopped_by_signal or exp.checkpoint.at_end:
                result.checkpoint = self.ckpt.save(self.state, self.step)
            self.ckpt.wait()
            if self.ft.snapshots is not None:
                self.ft.snapshots.wait()
                self.ft.report_failures()
                result.snapshots = list(self.ft.snapshots.committed)
                result.snapshot_failures = self.ft.snapshot_failures
            finished = True
        finally:
            self.batches.close()  # a prefetch left inside a torch op aborts the process at interpreter exit
            self.ft.close(finished)
            stop.restore()
            if bar is not None:
                bar.close()
            sink.close()
        result.last_step = self.step
        if result.stopped_by_signal:
            self._say(f"stopped by signal after step {self.step}; checkpoint saved to {result.checkpoint}")
        self._say(f"done: step {self.step}/{tcfg.steps} ({self.step - self._fit_first_step} this run), "
                  f"{self.step * self.tokens_per_step:,} tokens, {time.perf_counter() - self._fit_start:.1f} s; "
                  f"checkpoint {result.checkpoint or 'none (checkpoint.at_end: false)'}; "
                  f"metrics {os.path.join(tcfg.output_dir, 'metrics.jsonl')}")
        return result

    def _say(self, line: str) -> None:
        """One line on rank 0's stdout (logs read it; the progress bar is on stderr)."""
        if self.env.is_main:
            print(line, flush=True)

    def _due(self, every: int) -> bool:
        """A step that ``every`` names (and the last one)."""
        return self.step % every == 0 or self.step == self.exp.train.steps

    def _metrics(self, loss: float, grad_norm: float, step_time: float) -> dict:
        """The logged step's record: loss, lr, norm, throughput and MFU, bytes sent, health."""
        tps = self.tokens_per_step / step_time
        record = {"step": self.step, "loss": loss, "lr": self.scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                  "tokens_per_s": tps, "mfu": self.flops_per_token * tps / (self.peak_flops * self.env.world_size),
                  "step_time_s": step_time, "tokens": self.step * self.tokens_per_step, "time": time.time(),
                  "attention": self.attention_backend, "dtype": self.exp.model.dtype}
        record |= {f"tokens/{name}": n for name, n in self.batches.source_tokens().items()}  # a blend's sources
        if self.ft.snapshots is not None:
            record["snapshot_failures"] = self.ft.snapshot_failures
        return record | self._bytes_sent() | self._memory_peak() | self.health.record()

    def _report(self, record: dict | None, sink, bar, loss: float) -> None:
        """The record to the metrics sinks, and to the progress bar or a log line."""
        if record:
            sink.log(record)
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{record.get('tokens_per_s', 0):.0f}",
                                mfu=f"{record.get('mfu', 0):.3f}", refresh=False)
            else:
                self._say(f"step={self.step}/{self.exp.train.steps} " + " ".join(
                    f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
                    if k not in ("step", "time", "loss_by_position") and not k.startswith("bytes_"))
                    + f" eta={self._eta()}")
        if bar is not None:
            bar.update(1)

    def _eta(self) -> str:
        """Time left at this run's average step time so far (evaluation and checkpoints included)."""
        per_step = (time.perf_counter() - self._fit_start) / max(1, self.step - self._fit_first_step)
        left = int(per_step * (self.exp.train.steps - self.step))
        return f"{left // 3600}h{left % 3600 // 60:02d}m" if left >= 3600 else f"{left // 60}m{left % 60:02d}s"

    @traffic.counted_as("other")
    def _exchange(self, stop: StopFlag, loss: torch.Tensor, grad_norm) -> tuple[bool, bool, float, float]:
        """The step's one host sync: (stop, flush to disk, loss, grad norm). All ranks agree on stopping if any of
        them got the signal (so they act at the same step); the health times, the loss and the norm (device
        tensors until here) travel in the same all-gather."""
        if self.env.is_main and stop.file_requested():
            print(f"found {stop.stop_file}: checkpointing and stopping", flush=True)
            stop.requested = True
        flags = torch.tensor([float(stop.requested), float(stop.flush), self.health.busy, self.health.data],
                             dtype=torch.float64, device=self.env.device)
        values = torch.as_tensor(grad_norm, dtype=torch.float64, device=self.env.device).reshape(1)
        every = self._gather_rows(torch.cat([flags, loss.detach().reshape(1).double(), values]))
        self.health.observe(self.step + 1, every[:, 2].tolist(), every[:, 3].tolist())
        mine = every[dist.get_rank()]
        return bool(every[:, 0].max() > 0), bool(every[:, 1].max() > 0), float(mine[4]), float(mine[5])

    def _gather_rows(self, values) -> torch.Tensor:
        """Every rank's ``values`` (floats, or a 1-d device tensor) as a (world, len) float64 CPU tensor (one
        all-gather on the default group)."""
        mine = torch.as_tensor(values, dtype=torch.float64, device=self.env.device)
        every = mine.new_empty(self.env.world_size * mine.numel())
        # all_gather_single where torch has it: all_gather_into_tensor warns (FutureWarning) on every run
        getattr(dist, "all_gather_single", dist.all_gather_into_tensor)(every, mine)
        with heartbeat.waiting():
            return every.view(self.env.world_size, -1).cpu()

    @traffic.counted_as("other")
    def _bytes_sent(self) -> dict:
        """Bytes sent so far per purpose (comms/traffic.py): summed over ranks, and the busiest rank's."""
        every = self._gather_rows([float(v) for v in traffic.counts().values()])
        total, busiest = every.sum(0), every.max(0).values
        return {f"bytes_{p}": int(total[i]) for i, p in enumerate(traffic.PURPOSES)} | \
            {f"bytes_max_rank_{p}": int(busiest[i]) for i, p in enumerate(traffic.PURPOSES)}

    @traffic.counted_as("other")
    def _memory_peak(self) -> dict:
        """The busiest rank's peak memory since the last logged step (``trainer/metrics.py::PeakMemory``)."""
        return {"mem_peak_mib": round(float(self._gather_rows([self.peak_memory.read_mib()])[:, 0].max()), 1)}

    def _announce(self) -> None:
        a = self.args
        cp = f" (cp attention: {self.cp_impl}, {self.exp.parallel.cp_layout})" if self.cp_impl else ""
        if self.dims.pp > 1:
            par = self.exp.parallel
            cp += (f" (pipeline: {par.pp_schedule}, {par.pp * par.pp_virtual_stages} stages, "
                   f"{pipeline_microbatches(self.exp)} microbatches; this rank: stages {self.stage_ids})")
        d = self.exp.data
        if BATCHINGS.get(d.batching).whole_documents:
            batch = (f"batch: whole documents up to {self.tokens_per_step:,} tokens (pieces of at most "
                     f"{d.max_doc_tokens or d.seq_len}, " + (f"{self.exp.parallel.sp_mode} sp groups, {d.seq_len} "
                                                              f"tokens per rank)"
                                                              if SP_MODES.get(self.exp.parallel.sp_mode).adaptive else
                                                              f"rows of {d.seq_len})"))
        else:
            batch = (f"batch {self.exp.train.global_batch_size} x {d.seq_len} tokens "
                     f"({self.batches.accumulation_steps} micro-steps/rank)")
        print(f"loomtrain: {self.dims.describe()}{cp} on {self.env.device.type} ({self.env.backend}); "
              f"model {a.num_params() / 1e6:.2f}M params ({a.n_layers} layers, dim {a.dim}, "
              f"{a.n_heads}/{a.n_kv_heads} heads, vocab {a.vocab_size}, {self.exp.model.dtype}, attention "
              f"{self.attention_backend}); "
              f"{batch}; data {self.prepared.meta['train_tokens']:,} train tokens; peak {self.peak_flops / 1e12:.3g} "
              f"TFLOP/s/device ({self.peak_source})"
              + (f"; resumed from {self.resumed_from} at step {self.step}" if self.resumed_from else "")
              + (f"; snapshots every {self.ft.every} steps to memory, {self.ft.layout.describe()}"
                 if self.ft.snapshots is not None else ""),
              flush=True)
