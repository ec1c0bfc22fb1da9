"""The data-parallel sync methods with local updates (the interface: ``parallel/dp_sync/__init__.py``).

The trainer calls :meth:`OuterSync.step` once per optimizer step, after forward/backward: it applies the
update and returns the gradient norm.

- ``diloco`` (:class:`DiLoCo`) and ``co2`` (:class:`CO2`): each ``dp_replicate`` replica is a *worker*
  that takes local steps (FSDP/TP/CP/PP inside it as usual) and the workers meet in an outer step.
  Both hook the inner optimizer's ``step``, so they also run under any plain loop.

Outer state lives on each rank's local shards (fp32), so under FSDP it is sharded over the worker's
ranks (ZeRO-style) for free: rank r of every worker holds the same shard and syncs it with its peers
of the ``dp_replicate`` group. Checkpoints and snapshots take :meth:`OuterSync.state_tensors` (live
buffers, copied in place on restore) and :meth:`OuterSync.host_state`; averages still in flight are
waited for first (:meth:`OuterSync.settle`).
"""
from __future__ import annotations

import contextlib

from loomtrain.errors import ConfigError, require_positive

import torch
import torch.distributed as dist

from loomtrain.comms import traffic
from loomtrain.parallel.dp_sync.quantize import KINDS, PendingMean
from loomtrain.parallel.dp_sync.sharded import PendingShardedMean
from loomtrain.state_reads import real_step

EXCHANGES = ("all_gather", "reduce_scatter")  # dp_sync.diloco.exchange: how a quantized average travels


def _local(t: torch.Tensor) -> torch.Tensor:
    """A parameter's local shard (a DTensor's local tensor, which aliases the parameter's storage)."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


class Resolved:
    """An average that has arrived (restored, or waited for before a snapshot)."""

    def __init__(self, value: torch.Tensor):
        self.value = value

    def wait(self) -> torch.Tensor:
        return self.value

    def poll(self) -> None:
        """Nothing left to start."""


class OuterSync:
    """What DiLoCo and CO2 share: per-parameter fp32 anchors of the local shards, the hook on the inner
    optimizer, and named state for checkpoints and snapshots.

    ``groups``: lists of parameters (DiLoCo's fragments; CO2 has one). ``names``: parameter -> stable key
    (the trainer passes fully qualified names, so pipeline stages never collide); default ``f<i>.<j>``.
    """

    local_updates = True  # each replica is a worker; its gradients are averaged inside it only

    @classmethod
    def replica_bytes_per_step(cls, exp, shard_params: float, replicas: int) -> float:
        raise NotImplementedError

    @classmethod
    def state_copies(cls, exp) -> int:
        """fp32 anchors and arrived averages, plus the method's own (``_tensor_sets``)."""
        raise NotImplementedError

    def __init__(self, groups, inner_optimizer, group, names: dict | None, engine=None):
        if group is None and dist.is_available() and dist.is_initialized():
            group = dist.group.WORLD
        self.group, self.engine = group, engine
        self.local = [list(ps) for ps in groups]
        self.keys = [[(names or {}).get(p, f"f{f}.{j}") for j, p in enumerate(ps)] for f, ps in enumerate(self.local)]
        self.anchor = [[torch.nn.Parameter(_local(p).detach().float().clone()) for p in ps] for ps in self.local]
        self.inflight = [[torch.zeros_like(a) for a in ps] for ps in self.anchor]  # arrived averages (settle)
        self.pending: dict[int, list] = {}  # group -> its averages in flight
        self.t = 0
        self._check_same_start()
        # torch's state-dict functions step an optimizer with empty state to materialize it: not an inner step
        self._hook = inner_optimizer.register_step_post_hook(lambda *_: real_step() and self.after_inner_step())

    @traffic.counted_as("other")  # once at start-up: not the sync's bytes
    def _check_same_start(self) -> None:
        """Workers must start from the same parameters (outer steps average their *differences* from a shared
        anchor): a checksum of this rank's shards (sum and sum of squares per parameter, float64) is compared
        with its ``dp_replicate`` peers', which hold the same shards. A seed or an import that differs between
        workers stops the run here instead of training a silently averaged mixture."""
        if self.group is None or dist.get_world_size(self.group) < 2:
            return
        flat = [a.detach().double() for ps in self.anchor for a in ps]
        # on the parameters' device: one vector, no host round trip per parameter
        mine = torch.stack([s for a in flat for s in (a.sum(), (a * a).sum())]) if flat else \
            torch.zeros(1, dtype=torch.float64)
        every = [torch.empty_like(mine) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(every, mine, group=self.group)
        differ = [i for i, other in enumerate(every) if not torch.equal(other, mine)]
        if differ:
            raise RuntimeError(f"dp_sync: the workers do not start from the same parameters (this rank's checksum "
                               f"differs from group rank(s) {differ}): give every worker the same train.seed and "
                               f"model.init_from")

    # The trainer's strategy interface (the engine clips, updates and schedules; the hook does the rest).
    def step(self):
        return self.engine.step()

    def after_inner_step(self) -> None:
        raise NotImplementedError

    def _tensor_sets(self) -> dict[str, list[list[torch.Tensor]]]:
        """Named families of per-parameter tensors that make up the state (besides ``host_state``)."""
        return {"anchor": self.anchor, "inflight": self.inflight}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Live fp32 buffers by name; a restore copies into them (call :meth:`settle` first)."""
        return {f"{kind}.{key}": t for kind, sets in self._tensor_sets().items()
                for keys, ts in zip(self.keys, sets) for key, t in zip(keys, ts)}

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """:meth:`state_tensors` laid out like their parameters (DTensors where those are), for DCP."""
        from torch.distributed.tensor import DTensor

        out = {}
        for kind, sets in self._tensor_sets().items():
            for params, keys, ts in zip(self.local, self.keys, sets):
                for p, key, t in zip(params, keys, ts):
                    out[f"{kind}.{key}"] = DTensor.from_local(t, p.device_mesh, p.placements, run_check=False,
                                                              shape=p.shape, stride=p.stride()) \
                        if isinstance(p, DTensor) else t
        return out

    def load_checkpoint_tensors(self, loaded: dict[str, torch.Tensor]) -> None:
        live = self.state_tensors()
        with torch.no_grad():
            for key, t in loaded.items():
                live[key].copy_(_local(t))

    def state_dict(self) -> dict:
        """For loops of your own: copies of the outer tensors (averages in flight waited for) and counters."""
        self.settle()
        return {"tensors": {k: t.detach().clone() for k, t in self.state_tensors().items()},
                "host": self.host_state()}

    def load_state_dict(self, state: dict) -> None:
        self.load_checkpoint_tensors(state["tensors"])
        self.load_host_state(state["host"])

    ANCHORED = ("anchor",)  # state that starts as a copy of the parameters; the rest starts at zero

    @traffic.counted_as("dp_sync")
    def reset(self) -> None:
        """Collective over the workers: average the parameters (they differ after local steps), anchor on
        the average and forget the outer history (a start from a checkpoint without a loadable one)."""
        with torch.no_grad():
            for params in self.local:
                means = [PendingMean(_local(p), "none", self.group) for p in params]
                for p, mean in zip(params, means):
                    _local(p).copy_(mean.wait())
            for kind, sets in self._tensor_sets().items():
                for params, ts in zip(self.local, sets):
                    for p, t in zip(params, ts):
                        if kind in self.ANCHORED:
                            t.copy_(_local(p))
                        else:
                            t.zero_()
        self.t = 0
        self.pending = {}

    @traffic.counted_as("dp_sync")  # a two-stage exchange may start its second stage here
    def settle(self) -> None:
        """Wait for the averages in flight and keep them in the ``inflight`` buffers (for a snapshot)."""
        with torch.no_grad():
            for f, pendings in self.pending.items():
                self.pending[f] = [Resolved(buf.copy_(p.wait())) for buf, p in zip(self.inflight[f], pendings)]

    def host_state(self) -> dict:
        return {"signature": self.signature(), "t": self.t, "pending": sorted(self.pending)}

    @contextlib.contextmanager
    def outer_model(self):
        """The parameters temporarily replaced by the outer model the workers share (for evaluation)."""
        with torch.no_grad():
            saved = [[_local(p).detach().clone() for p in ps] for ps in self.local]
            for ps, anchors in zip(self.local, self.anchor):
                for p, a in zip(ps, anchors):
                    _local(p).copy_(a)
        try:
            yield
        finally:
            with torch.no_grad():
                for ps, copies in zip(self.local, saved):
                    for p, c in zip(ps, copies):
                        _local(p).copy_(c)

    def signature(self) -> dict:
        """What a saved outer state must match to be loaded (else the outer schedule restarts)."""
        return {"method": type(self).__name__, "groups": [len(ps) for ps in self.local],
                "tensors": sorted(self._tensor_sets())}

    def load_host_state(self, state: dict | None) -> None:
        """Counters and in-flight averages of a saved state; none, or one of another method or layout
        (``signature``): anchor on the current parameters and start the outer schedule over."""
        if not state or state.get("signature") != self.signature():
            self.reset()
            return
        self.t = int(state["t"])
        self.pending = {int(f): [Resolved(buf) for buf in self.inflight[int(f)]] for f in state["pending"]}

    def close(self) -> None:
        self._hook.remove()


class DiLoCo(OuterSync):
    """Streaming DiLoCo (arXiv 2501.18512), usable with any loop: ``loss.backward(); inner_optimizer.step()``.

    It hooks ``inner_optimizer.step``. With inner steps t = 1, 2, ..., H = ``sync_every``, F fragments and
    h = H / F, fragment f = (t/h - 1) mod F is synchronised at every t that is a multiple of h (torchft's
    schedule, so results compare):

    - at step t - tau (tau = ``fragment_sync_delay`` < h) each worker takes the pseudo-gradient
      delta = theta_global[f] - theta_local[f] and starts averaging it over ``group`` in the background
      (quantized per ``quantize``, exchanged per ``exchange``: ``all_gather`` sends each worker's payload
      once and every worker sums them in fp32, (M-1) payloads a worker; ``reduce_scatter`` (``sharded.py``)
      sends each worker's shard j to worker j, which averages it in fp32, quantizes that average and
      all-gathers it, 2 (M-1)/M payloads a worker, below a bf16 ring at any M; with ``error_feedback`` the
      worker adds what quantization dropped from its previous delta of the fragment, e, and keeps
      e = (delta + e) - decoded(payload), and under ``reduce_scatter`` a shard's owner keeps what stage 2
      dropped of its average likewise: nothing is lost for good, only sent a round late);
    - at step t the outer optimizer (torch SGD: ``outer_lr``, ``outer_momentum``, ``nesterov``) steps
      theta_global[f] with gradient mean(delta), and the fragment's local parameters become
      (1 - alpha) * theta_global[f] + alpha * theta_local[f] (alpha = ``fragment_update_alpha``).

    ``fragments``: modules or lists of parameters (use :func:`strided_fragments` to cut a model's blocks into strided groups, as
    the paper recommends). ``group=None``: the default group when one is initialised, else one worker.
    """

    @classmethod
    def check(cls, exp) -> None:
        from loomtrain.parallel.stages import pipeline_stage_layers

        par, d = exp.parallel, exp.dp_sync.diloco
        require_positive(exp, "dp_sync.diloco.sync_every", "dp_sync.diloco.fragments", "dp_sync.diloco.outer_lr")
        require_positive(exp, "dp_sync.diloco.fragment_sync_delay", "dp_sync.diloco.outer_momentum",
                         allow_zero=True)
        try:
            counts = pipeline_stage_layers(exp.model.n_layers, par.pp * par.pp_virtual_stages, par.pp_split)
        except ConfigError:
            counts = [exp.model.n_layers]  # the pipeline check names the problem
        fewest = min(sum(counts[r::par.pp]) for r in range(par.pp))  # layers on the pipeline rank with fewest
        if d.fragments > fewest:
            raise ConfigError(f"dp_sync.diloco.fragments: must be <= {fewest}, the layers of the pipeline rank with "
                              f"the fewest (fragments are cut from each rank's own layers), got {d.fragments}")
        if d.sync_every % d.fragments:
            raise ConfigError(f"dp_sync.diloco.sync_every: {d.sync_every} must be a multiple of "
                              f"dp_sync.diloco.fragments ({d.fragments})")
        if d.fragment_sync_delay >= d.sync_every // d.fragments:
            raise ConfigError(f"dp_sync.diloco.fragment_sync_delay: must be < sync_every/fragments = "
                              f"{d.sync_every // d.fragments}, got {d.fragment_sync_delay}")
        if not 0.0 <= d.fragment_update_alpha <= 1.0:
            raise ConfigError(f"dp_sync.diloco.fragment_update_alpha: must be in [0, 1], got {d.fragment_update_alpha}")
        if not d.outer_momentum < 1.0:
            raise ConfigError(f"dp_sync.diloco.outer_momentum: must be in [0, 1), got {d.outer_momentum}")
        if d.error_feedback and d.quantize == "none":
            raise ConfigError("dp_sync.diloco.error_feedback: needs a quantize other than none (nothing is lost "
                              "unquantized)")
        if d.exchange == "reduce_scatter" and d.quantize == "none":
            raise ConfigError("dp_sync.diloco.exchange: reduce_scatter needs a quantize other than none "
                              "(unquantized, the all-reduce already is a ring)")

    @classmethod
    def replica_bytes_per_step(cls, exp, shard_params: float, replicas: int) -> float:
        """One fp32 ring all-reduce of the shard per round, or the quantized payload all-gathered, or
        reduce-scattered and all-gathered quantized (``sharded.py``)."""
        from loomtrain.parallel.dp_sync.quantize import wire_bytes
        from loomtrain.parallel.dp_sync.sharded import bytes_per_value

        d = exp.dp_sync.diloco
        if d.quantize == "none":
            sent = 2 * (replicas - 1) / replicas * 4 * shard_params
        elif d.exchange == "reduce_scatter":
            sent = bytes_per_value(d.quantize, replicas) * shard_params
        else:
            sent = (replicas - 1) * wire_bytes(int(shard_params), d.quantize)
        return sent / d.sync_every

    @classmethod
    def state_copies(cls, exp) -> int:
        d = exp.dp_sync.diloco
        return 2 + (d.outer_momentum > 0) + bool(d.error_feedback) * (1 + (d.exchange == "reduce_scatter"))

    @classmethod
    def build(cls, exp, engine, *, blocks, params, names, group, worker_group=None) -> "DiLoCo":
        """Strided fragments of ``blocks``; parameters outside them (embeddings, head) join the first."""
        cfg = exp.dp_sync.diloco
        in_blocks = {id(p) for b in blocks for p in b.parameters()}
        fragments = [list(f.parameters()) for f in strided_fragments(blocks, cfg.fragments)]
        fragments[0] += [p for p in params if id(p) not in in_blocks]
        return cls(fragments, engine.optimizer, group=group, sync_every=cfg.sync_every,
                   fragment_sync_delay=cfg.fragment_sync_delay, fragment_update_alpha=cfg.fragment_update_alpha,
                   outer_lr=cfg.outer_lr, outer_momentum=cfg.outer_momentum, nesterov=cfg.nesterov,
                   quantize=cfg.quantize, exchange=cfg.exchange, error_feedback=cfg.error_feedback, names=names,
                   engine=engine)

    def __init__(self, fragments, inner_optimizer, *, group=None, sync_every: int, fragment_sync_delay: int = 0,
                 fragment_update_alpha: float = 0.0, outer_lr: float = 0.7, outer_momentum: float = 0.9,
                 nesterov: bool = True, quantize: str = "none", exchange: str = "all_gather",
                 error_feedback: bool = False, names: dict | None = None, engine=None):
        fragments = list(fragments)
        n = len(fragments)
        if n < 1:
            raise ValueError("dp_sync.diloco: needs at least one fragment")
        if sync_every < 1 or sync_every % n:
            raise ValueError(f"dp_sync.diloco.sync_every: {sync_every} must be a positive multiple of the number of "
                             f"fragments ({n})")
        self.h = sync_every // n
        if not 0 <= fragment_sync_delay < self.h:
            raise ValueError(f"dp_sync.diloco.fragment_sync_delay: must be in [0, sync_every/fragments = {self.h}), "
                             f"got {fragment_sync_delay}")
        if not 0.0 <= fragment_update_alpha <= 1.0:
            raise ValueError(f"dp_sync.diloco.fragment_update_alpha: must be in [0, 1], got {fragment_update_alpha}")
        if quantize not in KINDS:
            raise ValueError(f"dp_sync.diloco.quantize: must be one of {', '.join(KINDS)}, got {quantize!r}")
        if error_feedback and quantize == "none":
            raise ValueError("dp_sync.diloco.error_feedback: needs a quantize other than none")
        if exchange not in EXCHANGES:
            raise ValueError(f"dp_sync.diloco.exchange: must be one of {', '.join(EXCHANGES)}, got {exchange!r}")
        if exchange == "reduce_scatter" and quantize == "none":
            raise ValueError("dp_sync.diloco.exchange: reduce_scatter needs a quantize other than none")
        super().__init__([list(f.parameters() if isinstance(f, torch.nn.Module) else f) for f in fragments],
                         inner_optimizer, group, names, engine)
        self.quantize, self.exchange = quantize, exchange
        self.delay, self.alpha = fragment_sync_delay, fragment_update_alpha
        self.outer = [torch.optim.SGD(g, lr=outer_lr, momentum=outer_momentum, nesterov=nesterov and outer_momentum > 0)
                      for g in self.anchor]
        self.momentum = [[] for _ in self.anchor]
        if outer_momentum > 0:  # created now (torch's first step gives the same update from a zero buffer), so
            for f, (opt, gs) in enumerate(zip(self.outer, self.anchor)):  # checkpoints always hold it
                for g in gs:
                    opt.state[g]["momentum_buffer"] = torch.zeros_like(g)
                self.momentum[f] = [opt.state[g]["momentum_buffer"] for g in gs]
        # per worker, what quantization has not yet delivered of each fragment's deltas (error feedback)
        self.residual = [[torch.zeros_like(g) for g in gs] for gs in self.anchor] if error_feedback else None
        # reduce_scatter: what stage 2 dropped of the average of the shard this worker owns (zero elsewhere)
        self.residual_mean = [[torch.zeros_like(g) for g in gs] for gs in self.anchor] \
            if error_feedback and exchange == "reduce_scatter" else None

    def _tensor_sets(self):
        return super()._tensor_sets() | ({"momentum": self.momentum} if any(self.momentum) else {}) | \
            ({"residual": self.residual} if self.residual is not None else {}) | \
            ({"residual_mean": self.residual_mean} if self.residual_mean is not None else {})

    def _fragment(self, t: int) -> int:
        return (t // self.h - 1) % len(self.local)

    @traffic.counted_as("dp_sync")
    def after_inner_step(self) -> None:
        """Called after every inner step (by the hook)."""
        self.t += 1
        t = self.t
        for pendings in self.pending.values():  # a two-stage exchange starts its second stage when it can
            for pending in pendings:
                pending.poll()
        if (t + self.delay) % self.h == 0:  # start averaging the fragment due at t + delay
            f = self._fragment(t + self.delay)
            deltas = [g.detach() - _local(p).detach().float() for g, p in zip(self.anchor[f], self.local[f])]
            if self.residual is not None:
                deltas = [d.add_(e) for d, e in zip(deltas, self.residual[f])]
            if self.exchange == "reduce_scatter":
                self.pending[f] = PendingShardedMean(deltas, self.quantize, self.group, shard_residual=None if
                                                     self.residual_mean is None else self.residual_mean[f]).parts()
            else:
                self.pending[f] = [PendingMean(d, self.quantize, self.group) for d in deltas]
            if self.residual is not None:
                for e, d, pending in zip(self.residual[f], deltas, self.pending[f]):
                    torch.sub(d, pending.sent, out=e)
        if t % self.h == 0:
            f = self._fragment(t)
            with torch.no_grad():
                for g, pending in zip(self.anchor[f], self.pending.pop(f)):
                    g.grad = pending.wait().to(g.dtype)
                self.outer[f].step()
                self.outer[f].zero_grad(set_to_none=True)
                for g, p in zip(self.anchor[f], self.local[f]):
                    local = _local(p)
                    local.copy_(((1 - self.alpha) * g + self.alpha * local.float()).to(local.dtype))

    def signature(self) -> dict:
        return super().signature() | {"h": self.h, "delay": self.delay}


class CO2(OuterSync):
    """CO2 (arXiv 2401.16265): local steps with the outer all-reduce fully overlapped, one round late.

    Every tau = ``sync_every`` inner steps (round k ends), on each worker:

    1. delta_k = start - theta: the round's local movement; a *copy* is averaged over ``group`` in the
       background (never the live parameters), and ``start`` becomes theta after step 3;
    2. D_{k-1} = mean(delta_{k-1}), started one round ago, is waited for (round 1 has none);
    3. the outer step, with state identical on every worker (the authors' code, below):
         outer momentum with the staleness gap penalty
                                m_k = beta * m_{k-1} + D_{k-1} / lambda
                                (beta = ``outer_momentum``, lambda = ``staleness_penalty``, a constant > 0;
                                1 = no penalty, > 1 damps the stale average)
         momentum clipping      m_k = clamp(m_k, -phi, phi), element-wise   (phi = ``clip``; 0 = off)
         update                 anchor -= alpha * m_k                     (alpha = ``outer_lr``)
       and the local parameters become anchor + (theta - start): the overlapped round's own progress is
       kept on top of the averaged one, so no local step is thrown away.

    Source of the formulas: the authors' implementation, github.com/weigao266/fairscale-CO2 (the code
    OpenNLPLab/CO2's README points to) at commit 55aaca56ee57302a4d96fc730a5596fa562dac0f,
    ``fairscale/experimental/nn/data_parallel/gossip/co2.py``, ``_perform_local_optimization``:
    ``gmb.mul_(outer_momentum).sub_(p, alpha=1/co2_gap_penalty).add_(old, alpha=1/co2_gap_penalty)``
    (old - p is the averaged movement D), then ``_co2_clip(gmb, co2_clip_threshold)`` when ``co2_clip``,
    then ``old.add_(gmb, alpha=-outer_lr)``. Defaults there: outer_momentum 0.5, outer_lr 1.0,
    co2_gap_penalty 1.0, co2_clip_threshold 1.0 (ours). One difference, stated: their ``_co2_clip`` calls
    the out-of-place ``torch.clamp`` and discards the result, so in their runs the clip never acts; we
    clamp in place, as the paper's name for it and the function's say (``clip: 0`` reproduces their runs
    exactly). The paper's own text could not be read here: these are the code's formulas.

    With a constant gradient g (inner SGD lr eta) and alpha = 1, lambda = 1, beta = 0 this is exactly
    single-worker SGD one round late; tests check it in closed form.
    """

    ANCHORED = ("anchor", "start")

    @classmethod
    def check(cls, exp) -> None:
        require_positive(exp, "dp_sync.co2.sync_every", "dp_sync.co2.outer_lr", "dp_sync.co2.staleness_penalty")
        if exp.dp_sync.co2.staleness_penalty < 1:  # below 1 the divisor amplifies the stale average
            raise ConfigError(f"dp_sync.co2.staleness_penalty: must be >= 1 (1 = no penalty; it divides the stale "
                              f"average, the authors' constant; the earlier adaptive form is gone), got "
                              f"{exp.dp_sync.co2.staleness_penalty:g}")
        require_positive(exp, "dp_sync.co2.clip", "dp_sync.co2.outer_momentum", allow_zero=True)
        if not exp.dp_sync.co2.outer_momentum < 1.0:
            raise ConfigError(f"dp_sync.co2.outer_momentum: must be in [0, 1), got {exp.dp_sync.co2.outer_momentum}")

    @classmethod
    def replica_bytes_per_step(cls, exp, shard_params: float, replicas: int) -> float:
        """One fp32 ring all-reduce of the shard's movement per round."""
        return 2 * (replicas - 1) / replicas * 4 * shard_params / exp.dp_sync.co2.sync_every

    @classmethod
    def state_copies(cls, exp) -> int:
        return 4  # anchors, arrived averages, outer momentum, the round's start

    @classmethod
    def build(cls, exp, engine, *, blocks, params, names, group, worker_group=None) -> "CO2":
        cfg = exp.dp_sync.co2
        in_blocks = {id(p) for b in blocks for p in b.parameters()}
        ordered = [p for b in blocks for p in b.parameters()] + [p for p in params if id(p) not in in_blocks]
        return cls(ordered, engine.optimizer, group=group, sync_every=cfg.sync_every, outer_lr=cfg.outer_lr,
                   outer_momentum=cfg.outer_momentum, staleness_penalty=cfg.staleness_penalty, clip=cfg.clip,
                   names=names, engine=engine)

    def __init__(self, params, inner_optimizer, *, group=None, sync_every: int, outer_lr: float = 1.0,
                 outer_momentum: float = 0.5, staleness_penalty: float = 1.0, clip: float = 1.0,
                 names: dict | None = None, engine=None):
        if sync_every < 1:
            raise ValueError(f"dp_sync.co2.sync_every: must be >= 1, got {sync_every}")
        if not 0.0 <= outer_momentum < 1.0:
            raise ValueError(f"dp_sync.co2.outer_momentum: must be in [0, 1), got {outer_momentum}")
        if staleness_penalty <= 0 or clip < 0 or outer_lr <= 0:
            raise ValueError("dp_sync.co2: staleness_penalty and outer_lr must be > 0, clip >= 0")
        super().__init__([list(params)], inner_optimizer, group, names, engine)
        self.tau, self.lr, self.beta, self.lam, self.clip = sync_every, outer_lr, outer_momentum, \
            staleness_penalty, clip
        self.momentum = [[torch.zeros_like(a) for a in self.anchor[0]]]
        self.start = [[a.detach().clone() for a in self.anchor[0]]]

    def _tensor_sets(self):
        return super()._tensor_sets() | {"momentum": self.momentum, "start": self.start}

    @traffic.counted_as("dp_sync")
    def after_inner_step(self) -> None:
        self.t += 1
        if self.t % self.tau:
            return
        with torch.no_grad():
            params = [_local(p) for p in self.local[0]]
            deltas = [s - p.float() for s, p in zip(self.start[0], params)]  # fresh tensors: copies
            arrived = self.pending.pop(0, None)
            self.pending[0] = [PendingMean(d, "none", self.group) for d in deltas]
            if arrived is not None:
                means = [pending.wait() for pending in arrived]
                for i, (mean_delta, p) in enumerate(zip(means, params)):
                    self._outer_step(i, mean_delta, p)
            for s, p in zip(self.start[0], params):
                s.copy_(p)

    def _outer_step(self, i: int, mean_delta: torch.Tensor, p: torch.Tensor) -> None:
        anchor, m = self.anchor[0][i], self.momentum[0][i]
        m.mul_(self.beta).add_(mean_delta, alpha=1.0 / self.lam)  # the staleness gap penalty: a constant divisor
        if self.clip:
            m.clamp_(-self.clip, self.clip)  # in place: the authors' code computes this clamp and discards it
        progress = p.float() - self.start[0][i]
        anchor.add_(m, alpha=-self.lr)
        p.copy_((anchor + progress).to(p.dtype))



def strided_fragments(blocks, n: int):
    """``n`` fragments of ``blocks`` taken with stride n (block i in fragment i mod n), as ModuleLists."""
    blocks = list(blocks)
    if not 1 <= n <= len(blocks):
        raise ValueError(f"dp_sync.diloco.fragments: must be in 1..{len(blocks)} (blocks), got {n}")
    return [torch.nn.ModuleList(blocks[i::n]) for i in range(n)]
