"""Data-parallel synchronisation as a strategy: what keeps the replicas' parameters in step.

``parallel.dp_sync`` picks one. The trainer calls :meth:`step` once per optimizer step, after
forward/backward: it applies the update and returns the gradient norm. A strategy that syncs
less often (CO2, Streaming DiLoCo) wraps the engine's update with its own outer step and keeps
its outer state in ``state_dict``; the training loop does not change.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from loomtrain.parallel.quantize import KINDS, PendingMean, wire_bytes


class EveryStep:
    """Gradients are averaged over all data-parallel ranks inside every step (by the engine's
    reduce-scatter / all-reduce), so the update itself needs no further sync."""

    def __init__(self, engine):
        self.engine = engine

    def step(self) -> float:
        return self.engine.step()

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"dp_sync every_step keeps no state; got keys {sorted(state)}")


SYNCS = {"every_step": EveryStep}


def build_sync(name: str, engine):
    return SYNCS[name](engine)


class DiLoCo:
    """Streaming DiLoCo (arXiv 2501.18512), usable with any loop: ``loss.backward(); inner_optimizer.step()``.

    It hooks ``inner_optimizer.step``. With inner steps t = 1, 2, ..., H = ``sync_every``, F fragments and
    h = H / F, fragment f = (t/h - 1) mod F is synchronised at every t that is a multiple of h (torchft's
    schedule, so results compare):

    - at step t - tau (tau = ``fragment_sync_delay`` < h) each worker takes the pseudo-gradient
      delta = theta_global[f] - theta_local[f] and starts averaging it over ``group`` in the background
      (quantized per ``quantize``: each worker's payload sent once, summed in fp32);
    - at step t the outer optimizer (torch SGD: ``outer_lr``, ``outer_momentum``, ``nesterov``) steps
      theta_global[f] with gradient mean(delta), and the fragment's local parameters become
      (1 - alpha) * theta_global[f] + alpha * theta_local[f] (alpha = ``fragment_update_alpha``).

    ``fragments``: modules (use :func:`strided_fragments` to cut a model's blocks into strided groups, as
    the paper recommends). ``group=None``: the default group when one is initialised, else one worker.
    ``stats``: bytes and messages this worker sent for the outer syncs.
    """

    def __init__(self, fragments, inner_optimizer, *, group=None, sync_every: int, fragment_sync_delay: int = 0,
                 fragment_update_alpha: float = 0.0, outer_lr: float = 0.7, outer_momentum: float = 0.9,
                 nesterov: bool = True, quantize: str = "none"):
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
        if group is None and dist.is_available() and dist.is_initialized():
            group = dist.group.WORLD
        self.group, self.quantize = group, quantize
        self.delay, self.alpha, self.sync_every = fragment_sync_delay, fragment_update_alpha, sync_every
        self.local = [[p for p in f.parameters()] for f in fragments]
        self.global_ = [[torch.nn.Parameter(p.detach().float().clone()) for p in ps] for ps in self.local]
        self.outer = [torch.optim.SGD(g, lr=outer_lr, momentum=outer_momentum, nesterov=nesterov and outer_momentum > 0)
                      for g in self.global_]
        self.pending: dict[int, list] = {}
        self.t = 0
        self.stats = {"bytes": 0, "messages": 0}
        self._hook = inner_optimizer.register_step_post_hook(lambda *_: self.after_inner_step())

    def _fragment(self, t: int) -> int:
        return (t // self.h - 1) % len(self.local)

    def after_inner_step(self) -> None:
        """Called after every inner step (by the hook)."""
        self.t += 1
        t = self.t
        if (t + self.delay) % self.h == 0:  # start averaging the fragment due at t + delay
            f = self._fragment(t + self.delay)
            deltas = [g.detach() - p.detach().float() for g, p in zip(self.global_[f], self.local[f])]
            self.pending[f] = [PendingMean(d, self.quantize, self.group) for d in deltas]
            if self.group is not None and dist.get_world_size(self.group) > 1:
                self.stats["bytes"] += sum(wire_bytes(d.numel(), self.quantize) for d in deltas)
                self.stats["messages"] += len(deltas) * (1 if self.quantize == "none" else 2)
        if t % self.h == 0:
            f = self._fragment(t)
            with torch.no_grad():
                for g, pending in zip(self.global_[f], self.pending.pop(f)):
                    g.grad = pending.wait().to(g.dtype)
                self.outer[f].step()
                self.outer[f].zero_grad(set_to_none=True)
                for g, p in zip(self.global_[f], self.local[f]):
                    p.copy_(((1 - self.alpha) * g + self.alpha * p.float()).to(p.dtype))

    def state_dict(self) -> dict:
        """Inner-step count, global copies and outer optimizer states (in-flight averages are waited for)."""
        return {"t": self.t, "global": [[g.detach().clone() for g in gs] for gs in self.global_],
                "outer": [o.state_dict() for o in self.outer],
                "pending": {f: [p.wait() for p in ps] for f, ps in self.pending.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.t = int(state["t"])
        with torch.no_grad():
            for gs, saved in zip(self.global_, state["global"]):
                for g, s in zip(gs, saved):
                    g.copy_(s)
        for o, s in zip(self.outer, state["outer"]):
            o.load_state_dict(s)
        self.pending = {int(f): [PendingMean(m, "none", None) for m in ms] for f, ms in state["pending"].items()}

    def close(self) -> None:
        self._hook.remove()


def strided_fragments(blocks, n: int):
    """``n`` fragments of ``blocks`` taken with stride n (block i in fragment i mod n), as ModuleLists."""
    blocks = list(blocks)
    if not 1 <= n <= len(blocks):
        raise ValueError(f"dp_sync.diloco.fragments: must be in 1..{len(blocks)} (blocks), got {n}")
    return [torch.nn.ModuleList(blocks[i::n]) for i in range(n)]
