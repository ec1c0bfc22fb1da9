"""Seconds of one sequence's forward + backward on a group of d ranks: the adaptive planner's ``time_fn``.

Measured on the running pool (``calibrate_pool``, every rank at once, cached): for each calibrated group
size d, groups of d run real sequences of a few lengths with the real context-parallel attention while
every other group does the same, and

    T_d(L) = c0_d + c1_d * L^2 + c2_d * L

is fitted per size (non-negative least squares): the per-sequence overhead, attention and everything
linear, with the communication and the contention of ranks that share a machine inside them. The ring
exchange of each group size is timed too (latency and bandwidth per size), and with the one-rank
coefficients it drives ``cp_cost``'s choice of strategy per sequence (none for d = 1; the fastest of
ulysses | ring | tokenring otherwise). Sizes not calibrated (large pools calibrate a subset) are
interpolated geometrically between their calibrated neighbours.

Declared instead (``parallel.sp_alpha1/2``, ``launch/plan.py``'s sample): the analytic form
T(L, d) = alpha2 * L / d + layers * attention(L, d), with declared links.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass

from loomtrain.parallel.cp import predict
from loomtrain.parallel.cp.cost import Shape, attention_flops


@dataclass
class SequenceCost:
    alpha1: float  # attention seconds per token^2 (fwd + bwd, all layers, one rank)
    alpha2: float  # everything else: seconds per token (fwd + bwd, one rank)
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    elem_bytes: int = 4
    intra_bw: float = 100e9 / 8  # bytes/s per link direction inside a node (declared)
    inter_bw: float = 25e9 / 8  # ... between nodes
    latency_s: float = 10e-6
    ranks_per_node: int = 8
    topology: str = "full_mesh"
    impls: tuple = ()  # strategies the planner may pick (empty: every registered one, parallel/cp)
    alpha0: float = 0.0  # seconds per sequence whatever its length (calls, launches)
    fitted: dict | None = None  # group size -> (c0, c1, c2): measured T = c0 + c1 L^2 + c2 L
    links: dict | None = None  # group size -> (latency s, bytes/s): its measured ring exchange

    def link(self, d: int) -> tuple[float, float]:
        """(latency, bandwidth) of a group of d: the measured size nearest d on the same side of a node, or
        the declared link."""
        if self.links:
            rpn = self.ranks_per_node
            near = [g for g in self.links if (g <= rpn) == (d <= rpn)] or list(self.links)
            return tuple(self.links[min(near, key=lambda g: (abs(g - d), g))])
        return self.latency_s, (self.intra_bw if d <= self.ranks_per_node else self.inter_bw)

    def _shape(self, L: int, d: int) -> Shape:
        return Shape(1, L, self.heads, self.kv_heads, self.head_dim, d, self.elem_bytes)

    def _flops(self) -> float:
        """Attention FLOP/s that makes cp_cost's compute term equal alpha1 * L^2 per layer-sum."""
        ref = self._shape(1024, 1)
        return attention_flops(ref) * self.layers / max(self.alpha1 * 1024 ** 2, 1e-30)

    def _attention(self, L: int, d: int, density: float = 1.0) -> tuple[str, float]:
        """(strategy, seconds per layer) of the fastest allowed strategy for L tokens on d ranks; ``density``:
        the attention work of the row over one sequence's of L (sum of its documents' L_i^2 / L^2)."""
        s = self._shape(L, d)
        latency, bandwidth = self.link(d)
        t = predict(s, bandwidth, latency, self._flops() / max(density, 1e-9), self.topology)
        allowed = {k: v for k, v in t.items() if k in self.impls} or t  # a forced strategy that cannot split
        best = min(allowed, key=allowed.get)
        return best, allowed[best]

    def strategy(self, L: int, d: int, density: float = 1.0) -> str:
        return "none" if d == 1 else self._attention(L, d, density)[0]

    def analytic(self, L: int, d: int) -> float:
        """The declared form: alpha0 + alpha2 L / d + attention (cp_cost for d > 1)."""
        linear = self.alpha0 + self.alpha2 * L / d
        if d == 1:
            return linear + self.alpha1 * L * L
        return linear + self.layers * self._attention(L, d)[1]

    def __call__(self, L: int, d: int) -> float:
        if not self.fitted:
            return self.analytic(L, d)
        if d in self.fitted:
            c0, c1, c2 = self.fitted[d]
            return c0 + c1 * L * L + c2 * L
        sizes = sorted(self.fitted)
        lo, hi = max((g for g in sizes if g < d), default=None), min((g for g in sizes if g > d), default=None)
        if lo is None or hi is None:
            return self(L, lo or hi) * self.analytic(L, d) / self.analytic(L, lo or hi)  # the model's trend
        a, b = self(L, lo), self(L, hi)
        w = math.log(d / lo) / math.log(hi / lo)
        return a * (b / a) ** w if a > 0 and b > 0 else a + (b - a) * w

    @classmethod
    def from_calibration(cls, measured: dict, model_args, tp: int = 1, **links) -> "SequenceCost":
        """The model for a ``calibrate_pool`` result (JSON: sizes come back as strings); heads are one
        tensor-parallel rank's."""
        fitted = {int(d): tuple(v["coef"]) for d, v in measured["sizes"].items()}
        c0, c1, c2 = fitted[1]
        return cls(c1, c2, model_args.n_heads // tp, model_args.n_kv_heads // tp, model_args.head_dim,
                   model_args.n_layers, alpha0=c0, fitted=fitted,
                   links={int(d): tuple(v) for d, v in measured["links"].items()}, **links)


def fit(lengths, seconds) -> tuple[float, float, float]:
    """Non-negative least squares of seconds ~ c0 + c1 * L^2 + c2 * L."""
    import numpy as np
    from scipy.optimize import nnls

    L = np.asarray(lengths, dtype=np.float64)
    A = np.stack([np.ones_like(L), L * L, L], axis=1)
    scale = A.max(axis=0)
    coef, _ = nnls(A / scale, np.asarray(seconds, dtype=np.float64))
    coef = coef / scale
    return float(coef[0]), float(coef[1]), float(coef[2])


def calibration_sizes(degrees, ranks_per_node: int) -> list[int]:
    """The group sizes a calibration measures: one, every allowed size inside a node, and whole-node multiples
    that double (plus the largest) across nodes; the others are interpolated."""
    inside = [d for d in degrees if d <= ranks_per_node]
    across = [d for d in degrees if d > ranks_per_node and d % ranks_per_node == 0]  # the planner's sizes there
    doubling = [d for d in across if (d // ranks_per_node) & (d // ranks_per_node - 1) == 0]
    return sorted({1} | set(inside + doubling + across[-1:]))  # 1 always: it fixes the strategies of the rest


def calibration_lengths(d: int, capacity: int, longest: int, points: int = 4, tp: int = 1) -> list[int]:
    """Lengths up to what a group of d holds (d x capacity, at most ``longest``), halving, each one the group
    can split."""
    from loomtrain.parallel.cp.attention import zigzag_multiple

    m = zigzag_multiple(d, tp)
    top = min(d * capacity, longest)
    return sorted({max(m, (top >> k) // m * m) for k in range(points)})


def _best_seconds(run, busy: bool, device, repeats: int) -> float:
    """``run()`` timed on the ranks where ``busy`` (the others only wait), every rank at once: the best over
    ``repeats`` of the slowest rank's time, after one warm-up (connections, kernels)."""
    import torch
    import torch.distributed as dist

    out = []
    for _ in range(repeats + 1):
        dist.barrier()
        t0 = time.perf_counter()
        if busy:
            run()
            if device.type == "cuda":
                torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    slowest = torch.tensor(out[1:], dtype=torch.float64, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return float(slowest.min())


def tiles(d: int, world: int, ranks_per_node: int) -> list[tuple[int, ...]]:
    """The groups of d a calibration runs at once: d-rank tiles of the first node (its devices' contention is
    what a step sees), or the first d ranks for a group of whole nodes. A bounded number of process groups
    whatever the pool (at most 28 inside a node of 8, one per size across nodes)."""
    span = ranks_per_node if d <= ranks_per_node else d
    return [tuple(range(a, a + d)) for a in range(0, min(span, world) - d + 1, d)]


def _my_tile(pool, d: int, ranks_per_node: int):
    """The members of this rank's tile (None: idle while size d is measured)."""
    return next((t for t in tiles(d, pool.size, ranks_per_node) if pool.member in t), None)


def _ring_seconds(pool, tile, nbytes: int, device, repeats: int) -> float:
    """One ring hop (send to the next rank of its tile, receive from the previous), every tile at once."""
    import torch
    import torch.distributed as dist

    send = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    recv = torch.empty_like(send)

    def hop():
        ranks, i = pool.ranks(tile), tile.index(pool.member)
        nxt, prv = ranks[(i + 1) % len(ranks)], ranks[(i - 1) % len(ranks)]
        for w in dist.batch_isend_irecv([dist.P2POp(dist.isend, send, nxt), dist.P2POp(dist.irecv, recv, prv)]):
            w.wait()

    return _best_seconds(hop, tile is not None, device, repeats)


def _sequence_seconds(model, pool, tile, d: int, L: int, attention, device, repeats: int,
                      loss_parallel: bool = False, loss_sum=None) -> float:
    """Forward + backward of one sequence of L tokens on every tile of d at once (``loss_sum(logits, labels)``:
    the training loss, vocabulary-parallel under ``loss_parallel``)."""
    import torch

    from loomtrain.parallel.cp.attention import shard_for
    from loomtrain.parallel.parallelize import loss_parallel_context

    tokens = torch.randint(0, model.args.vocab_size, (1, L), generator=torch.Generator().manual_seed(L))
    positions = torch.arange(L).unsqueeze(0)
    if d > 1 and tile is not None:
        part = pool.member - tile[0]
        tokens, positions = shard_for(tokens, part, d), shard_for(positions, part, d)
    tokens, positions = tokens.to(device), positions.to(device)
    model.context_parallel = attention

    def step():
        with loss_parallel_context(loss_parallel):
            loss_sum(model(tokens, positions), tokens).backward()

    try:
        return _best_seconds(step, tile is not None, device, repeats)
    finally:
        model.zero_grad(set_to_none=True)
        model.context_parallel = None


def calibration_depths(layers: int) -> tuple[int, ...]:
    """The model depths a calibration runs: the model itself when shallow, else 1 and 2 layers, whose
    difference is one layer's cost (a full-depth copy of a large model does not fit one device)."""
    return (layers,) if layers <= 2 else (1, 2)


def to_depth(seconds: dict, layers: int) -> list[float]:
    """Seconds at ``layers`` from those measured at depths {k: [s per length]}: one layer's cost is the
    2-layer time minus the 1-layer time (never negative: noise), times the layers past the first."""
    if len(seconds) == 1:
        return list(next(iter(seconds.values())))
    return [a + (layers - 1) * max(0.0, b - a) for a, b in zip(seconds[1], seconds[2])]


def measure_pool(model_args, device, pool, sizes, capacity: int, groups, links: dict, repeats: int = 2,
                 dtype=None, backend: str = "auto", activation_checkpoint: bool = False, shard_model=None,
                 loss_parallel: bool = False, progress=print, *, build_model, loss_sum) -> dict:
    """Every rank at once: ring hops and sequence times per group size (max over ranks, best repeat), fitted.

    ``pool``: an ``planner.PoolRanks`` (members, their ranks per tensor-parallel coordinate); ``groups``: a
    ``modes.SequenceGroups`` (process groups made collectively, attention modules by rank set);
    ``dtype``/``backend``/``activation_checkpoint``/``shard_model`` (tensor parallelism)/``loss_parallel``: as
    the training model runs. Sizes and tiles count members. Deep models are
    measured at ``calibration_depths`` and extrapolated. Returns ``{"sizes": {d: {"seconds": {depth: [...]},
    "lengths", "coef"}}, "links": {d: (latency, bytes/s)}}``, the same on every rank.
    """
    import dataclasses

    rpn = links.get("ranks_per_node", 8)
    out = {"sizes": {d: {"lengths": calibration_lengths(d, capacity, model_args.max_seq_len, tp=pool.tp),
                         "seconds": {}}
                     for d in sizes}, "links": {}}
    small, big = 1 << 20, 1 << 24  # large enough that the difference is not barrier jitter on fast links
    for d in sizes:
        if d > 1:
            tile = _my_tile(pool, d, rpn)
            t_small, t_big = (_ring_seconds(pool, tile, n, device, max(repeats, 3)) for n in (small, big))
            if t_big > t_small:  # else: not resolved, the declared link stands in for this size
                bw = (big - small) / (t_big - t_small)
                out["links"][d] = (max(t_small - small / bw, 1e-7), bw)
    for depth in calibration_depths(model_args.n_layers):
        shallow = dataclasses.replace(model_args, n_layers=depth)
        model = _calibration_model(build_model, shallow, device, dtype, backend, activation_checkpoint, shard_model)
        for d in sorted(sizes):
            entry = out["sizes"][d]
            if d > 1 and "impls" not in entry:
                # strategies as training will choose them (the one-rank fit, per layer, and this size's measured
                # link), chosen at the first depth and kept: every depth times the same ones
                c0, c1, c2 = fit(out["sizes"][1]["lengths"], out["sizes"][1]["seconds"][depth])
                cost = SequenceCost(c1, c2, shallow.n_heads // pool.tp, shallow.n_kv_heads // pool.tp,
                                    shallow.head_dim, depth, alpha0=c0, links=out["links"], **links)
                entry["impls"] = [cost.strategy(L, d) for L in entry["lengths"]]
            if d > 1:  # every rank makes the same group calls, idle ones too
                groups.ensure(pool.every(tiles(d, pool.size, rpn)))
            tile = _my_tile(pool, d, rpn)
            seconds = []
            for k, L in enumerate(entry["lengths"]):
                attention = groups.module(pool.ranks(tile), entry["impls"][k]) if d > 1 and tile else None
                seconds.append(_sequence_seconds(model, pool, tile, d, L, attention, device, repeats, loss_parallel,
                                                 loss_sum))
            entry["seconds"][depth] = seconds
            if progress is not None and pool.member == 0 and pool.t == 0:
                progress(f"sp calibration ({depth} of {model_args.n_layers} layers): groups of {d}: " + ", ".join(
                    f"{L} tokens {1000 * t:.1f} ms" for L, t in zip(entry["lengths"], seconds)), flush=True)
        del model
    for entry in out["sizes"].values():
        entry["coef"] = fit(entry["lengths"], to_depth(entry["seconds"], model_args.n_layers))
    return out


def _calibration_model(build_model, model_args, device, dtype, backend: str, activation_checkpoint: bool,
                       shard_model=None):
    """``build_model(args)``: the model family's copy with ``args``' (fewer) layers."""
    import torch

    torch.manual_seed(0)
    model = build_model(model_args).to(device)
    if dtype is not None:
        model = model.to(dtype)
    if backend == "auto":  # the run's choice for this device and dtype (block_kernels.run_backend)
        from loomtrain.parallel.cp.block_kernels import run_backend

        backend = run_backend(torch.device(device).type, dtype or torch.float32, model_args.head_dim)
    model.attention_backend = backend
    if shard_model is not None:
        shard_model(model)
    if activation_checkpoint:
        from loomtrain.parallel.parallelize import apply_ac

        apply_ac(model)
    return model


def calibrate_pool(model_args, device, cache_dir: str, *, pool, degrees, capacity: int, groups, repeats: int = 2,
                   dtype=None, backend: str = "auto", activation_checkpoint: bool = False, shard_model=None,
                   loss_parallel: bool = False, build_model, loss_sum, **links) -> SequenceCost:
    """The fitted model of this pool on this machine: measured by every rank at once the first time, cached by
    model shape, pool, capacity, device and software in ``cache_dir``, read by rank 0 and broadcast after."""
    import platform

    import torch
    import torch.distributed as dist

    sizes = calibration_sizes(degrees, links.get("ranks_per_node", 8))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    key = json.dumps({"args": vars(model_args), "device": [device.type, name], "torch": torch.__version__,
                      "machine": platform.machine(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                      "pool": [pool.size, pool.tp], "sizes": sizes, "capacity": capacity, "links": links,
                      "repeats": repeats, "dtype": str(dtype), "backend": backend, "ac": activation_checkpoint,
                      "loss_parallel": loss_parallel, "v": 4}, sort_keys=True, default=str)
    path = os.path.join(os.path.expanduser(cache_dir), f"sp_cost-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json")
    box, rank = [None], dist.get_rank()
    if rank == 0 and os.path.isfile(path):
        try:
            with open(path) as f:
                box[0] = json.load(f)
        except (OSError, ValueError) as e:  # measured again (and rewritten), never a hang of the others
            print(f"sp calibration: cache {path} unreadable ({e}); measuring again", flush=True)
    dist.broadcast_object_list(box, src=0)
    if box[0] is None:
        box[0] = json.loads(json.dumps(measure_pool(model_args, device, pool, sizes, capacity, groups, links,
                                                    repeats, dtype, backend, activation_checkpoint, shard_model,
                                                    loss_parallel, build_model=build_model, loss_sum=loss_sum)))
        if rank == 0:
            from loomtrain.fsutil import atomic_write_text

            atomic_write_text(path, json.dumps(box[0], indent=2))
    return SequenceCost.from_calibration(box[0], model_args, pool.tp, **links)
