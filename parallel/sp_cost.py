"""Seconds of one sequence's forward + backward on a group of d ranks: the adaptive planner's ``time_fn``.

    T(L, d) = alpha2 * L / d + layers * attention(L, d)

where ``attention`` is ``cp_cost.predict_seconds`` for the group's strategy (none for d = 1; the
fastest of ulysses | ring | tokenring otherwise, chosen by that model) with the attention compute
rate implied by ``alpha1`` (attention seconds = alpha1 * L^2 on one rank) and the bandwidth of a
group of that size (``bandwidth(d)``: inside a node vs across nodes). ``alpha1`` and ``alpha2`` are
fitted from short measurements of the running model on this machine (``calibrate``, cached by
model shape, device and torch version), not hard-coded.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass

from loomtrain.parallel.cp_cost import Shape, attention_flops, predict_seconds


@dataclass
class SequenceCost:
    alpha1: float  # attention seconds per token^2 (fwd + bwd, all layers, one rank)
    alpha2: float  # everything else: seconds per token (fwd + bwd, one rank)
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    elem_bytes: int = 4
    intra_bw: float = 100e9 / 8  # bytes/s per link direction inside a node
    inter_bw: float = 25e9 / 8  # ... between nodes
    latency_s: float = 10e-6
    ranks_per_node: int = 8
    topology: str = "full_mesh"
    impls: tuple = ("tokenring", "ring", "ulysses")

    def bandwidth(self, d: int) -> float:
        return self.intra_bw if d <= self.ranks_per_node else self.inter_bw

    def _shape(self, L: int, d: int) -> Shape:
        return Shape(1, L, self.heads, self.kv_heads, self.head_dim, d, self.elem_bytes)

    def _flops(self) -> float:
        """Attention FLOP/s that makes cp_cost's compute term equal alpha1 * L^2 per layer-sum."""
        ref = self._shape(1024, 1)
        return attention_flops(ref) * self.layers / max(self.alpha1 * 1024 ** 2, 1e-30)

    def _attention(self, L: int, d: int) -> tuple[str, float]:
        """(strategy, seconds per layer) of the fastest allowed strategy for one sequence on d ranks."""
        s = self._shape(L, d)
        t = predict_seconds(s, self.bandwidth(d), self.latency_s, self._flops(), self.topology)
        if s.heads % d or s.kv_heads % d:
            t.pop("ulysses")
        allowed = {k: v for k, v in t.items() if k in self.impls} or t  # a forced ulysses that cannot split
        best = min(allowed, key=allowed.get)
        return best, allowed[best]

    def strategy(self, L: int, d: int) -> str:
        return "none" if d == 1 else self._attention(L, d)[0]

    def __call__(self, L: int, d: int) -> float:
        linear = self.alpha2 * L / d
        if d == 1:
            return linear + self.alpha1 * L * L
        return linear + self.layers * self._attention(L, d)[1]


def fit(lengths, seconds) -> tuple[float, float]:
    """Non-negative least squares of seconds ~ alpha1 * L^2 + alpha2 * L."""
    import numpy as np
    from scipy.optimize import nnls

    L = np.asarray(lengths, dtype=np.float64)
    A = np.stack([L * L, L], axis=1)
    scale = A.max(axis=0)
    coef, _ = nnls(A / scale, np.asarray(seconds, dtype=np.float64))
    coef = coef / scale
    return float(coef[0]), float(coef[1])


def measure(model_args, lengths, device, repeats: int = 2) -> list[float]:
    """Forward + backward seconds of one sequence of each length through a fresh model on ``device``."""
    import torch

    from loomtrain.trainer.model import Transformer

    torch.manual_seed(0)
    model = Transformer(model_args).to(device)
    out = []
    for L in lengths:
        tokens = torch.randint(0, model_args.vocab_size, (1, L), device=device)
        best = float("inf")
        for _ in range(repeats + 1):  # the first run warms up
            start = time.perf_counter()
            model(tokens).float().logsumexp(-1).sum().backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
        out.append(best)
        model.zero_grad(set_to_none=True)
    return out


def calibrate(model_args, device, cache_dir: str, lengths=(128, 256, 512, 1024), **links) -> SequenceCost:
    """The fitted model for this model shape on this machine, measured once and cached in ``cache_dir``."""
    import platform

    import torch

    key = json.dumps({"args": {k: v for k, v in vars(model_args).items()}, "device": device.type,
                      "torch": torch.__version__, "machine": platform.machine(), "cpus": os.cpu_count(),
                      "threads": torch.get_num_threads(), "lengths": list(lengths)}, sort_keys=True, default=str)
    path = os.path.join(os.path.expanduser(cache_dir), f"sp_cost-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json")
    if os.path.isfile(path):
        with open(path) as f:
            fitted = json.load(f)
    else:
        seconds = measure(model_args, list(lengths), device)
        a1, a2 = fit(lengths, seconds)
        fitted = {"alpha1": a1, "alpha2": a2, "lengths": list(lengths), "seconds": seconds}
        from loomtrain.fsutil import atomic_write_text

        atomic_write_text(path, json.dumps(fitted, indent=2))
    return SequenceCost(fitted["alpha1"], fitted["alpha2"], model_args.n_heads, model_args.n_kv_heads,
                        model_args.head_dim, model_args.n_layers, **links)
