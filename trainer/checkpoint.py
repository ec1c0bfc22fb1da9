"""Distributed checkpoints with ``torch.distributed.checkpoint`` (DCP), optionally asynchronous.

A checkpoint is the directory ``<output_dir>/checkpoints/step_NNNNNNNN``: model and
optimizer (each rank writes its shards), LR scheduler, data-sampler position, step,
every rank's RNG states and the data-parallel sync's outer state. Workers that take local
updates (``parallel.dp_sync: diloco | co2``) hold different parameters, which DCP would
deduplicate as replicas: each writes its own ``worker<NNN>`` directory inside the step's. It is written under a ``.tmp`` name and renamed by rank 0 once
every rank has finished, and ``latest`` is rewritten atomically after that, so an
interrupted save never looks like a checkpoint.
"""
from __future__ import annotations

import os
import pickle
import random
import re
import shutil

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from loomtrain.comms import traffic
from loomtrain.fsutil import atomic_write_text

STEP_DIR = re.compile(r"^step_(\d{8})$")
# Optimizer state keyed per parameter FQN ("state.<fqn>.exp_avg", "param_groups.<fqn>.lr"): pipeline
# ranks hold different parameters and param groups, which the nested form does not restore.
OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def list_checkpoints(ckpt_root: str) -> list[tuple[int, str]]:
    """Committed checkpoints (step, path), oldest first. ``.tmp`` directories are never listed."""
    if not os.path.isdir(ckpt_root):
        return []
    found = [(int(m.group(1)), os.path.join(ckpt_root, name))
             for name in os.listdir(ckpt_root) if (m := STEP_DIR.match(name))]
    return sorted(found)


def latest_checkpoint(ckpt_root: str) -> str | None:
    found = list_checkpoints(ckpt_root)
    return found[-1][1] if found else None


def _dcp_dir(step_dir: str, worker: int | None) -> str:
    return step_dir if worker is None else os.path.join(step_dir, f"worker{worker:03d}")


class Checkpointer:
    """``workers``: (this rank's worker, every worker's ranks) when replicas take local updates, else None."""

    def __init__(self, ckpt_root: str, keep: int, async_save: bool, rank: int, device: torch.device | str = "cpu",
                 workers: tuple[int, list[list[int]]] | None = None):
        self.root = ckpt_root
        self.device = device  # where the default group's collectives take their tensors
        self.keep = keep
        self.async_save = async_save
        self.rank = rank
        self._pending = None  # (future, tmp_dir, final_dir)
        self._pg = None
        self.worker = workers[0] if workers else None
        if workers:  # every rank creates every worker's group, in the same order
            groups = [dist.new_group(ranks, backend="gloo") for ranks in workers[1]]
            self._pg = groups[self.worker]
            traffic.label(self._pg, "checkpoint")
        elif async_save and dist.is_initialized():
            # A group of its own: the background save's collectives must not interleave with training's.
            self._pg = dist.new_group(backend="gloo")
            traffic.label(self._pg, "checkpoint")

    def _state(self, state, step: int, gather: bool = True) -> dict:
        """The DCP mapping of ``state`` (a ``trainer/state.py::TrainState``). Keys are the same on every rank and
        every layout (DCP reshards tensors between layouts): a per-rank part travels as one pickled list of
        all ranks' states, so a run resumed on another world size finds its key. ``gather=False`` (a template
        to load into) skips the all-gathers: DCP replaces the values."""
        model_sd, optim_sd = get_state_dict(state.model, state.optimizer, options=OPTIONS)
        out = {"model": model_sd, "optim": optim_sd, "trainer": {"step": step}}
        for name, part in state.parts.items():
            if getattr(part, "per_rank", False):
                mine = part.state_dict()
                every = [mine]
                if gather and dist.is_initialized() and dist.get_world_size() > 1:
                    every = [None] * dist.get_world_size()
                    dist.all_gather_object(every, mine)
                out[name] = pickle.dumps(every)  # one opaque value: its key does not depend on the world size
            elif hasattr(part, "checkpoint_tensors"):
                out[name] = {"tensors": part.checkpoint_tensors(), "host": pickle.dumps(part.state_dict())}
            else:
                out["trainer"][name] = part.state_dict()
        return out

    @traffic.counted_as("checkpoint")
    def save(self, state, step: int) -> str:
        """Write ``state`` (a ``TrainState``) as the checkpoint of ``step``; its final path."""
        self.wait()
        final = os.path.join(self.root, f"step_{step:08d}")
        tmp = final + ".tmp"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp, exist_ok=True)
        if dist.is_initialized():
            dist.barrier()
        saved = self._state(state, step)
        target = _dcp_dir(tmp, self.worker)
        if self.async_save:
            future = dcp.async_save(saved, checkpoint_id=target, process_group=self._pg)
            self._pending = (future, tmp, final)
        else:
            dcp.save(saved, checkpoint_id=target, process_group=self._pg)
            self._commit(tmp, final)
        return final

    @traffic.counted_as("checkpoint")
    def wait(self) -> None:
        """Finish a pending asynchronous save (commit it)."""
        if self._pending is None:
            return
        future, tmp, final = self._pending
        self._pending = None
        future.result()
        self._commit(tmp, final)

    @traffic.counted_as("checkpoint")
    def poll(self) -> None:
        """Commit a finished asynchronous save without blocking when it is still running.

        Ranks finish their writes at different moments; committing has barriers, so all
        ranks first agree that every rank is done (else one rank would sit in the commit
        barrier while the others run the next step's collectives: a deadlock).
        """
        if self._pending is None:
            return
        done = self._pending[0].done()
        if dist.is_initialized():
            # On the default group, in program order on every rank; the save's own group is busy
            # with the background thread's collectives.
            flag = torch.tensor([1 if done else 0], dtype=torch.int32, device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            done = bool(flag.item())
        if done:
            self.wait()

    def _commit(self, tmp: str, final: str) -> None:
        if dist.is_initialized():
            dist.barrier()  # every rank's shards are on disk
        if self.rank == 0:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            atomic_write_text(os.path.join(self.root, "latest"), os.path.basename(final) + "\n")
            for _, old in list_checkpoints(self.root)[:-self.keep] if self.keep else []:
                shutil.rmtree(old, ignore_errors=True)
        if dist.is_initialized():
            dist.barrier()

    @traffic.counted_as("checkpoint")
    def _loadable(self, source: str, keys, name: str, part) -> bool:
        """The checkpoint at ``source`` (whose DCP keys are ``keys``) holds part ``name`` in a form it can load
        (tensor parts: the same ``signature``: same method, fragments, tensors); a part added after the
        checkpoint was written is not there."""
        if getattr(part, "per_rank", False):
            return name in keys
        if not hasattr(part, "checkpoint_tensors"):
            return any(k == f"trainer.{name}" or k.startswith(f"trainer.{name}.") for k in keys)
        if f"{name}.host" not in keys:
            return False
        probe = {name: {"host": b""}}
        dcp.load(probe, checkpoint_id=source, process_group=self._pg)
        return pickle.loads(probe[name]["host"]).get("signature") == part.signature()

    def load(self, path: str, state) -> int:
        """Restore ``state`` (a ``TrainState``) from ``path``; the step it was saved at. A part the checkpoint
        lacks keeps its fresh state (one added since); a tensor part whose saved ``signature`` differs (an outer
        state of another dp_sync method or layout) gets ``load_state_dict(None)``: the outer schedule restarts
        from the loaded parameters. every_step and
        diloco/co2 checkpoints are laid out differently (one DCP directory, or one per worker) and refuse each
        other."""
        source = _dcp_dir(path, self.worker)
        if not os.path.isfile(os.path.join(source, ".metadata")):
            other = os.path.join(path, ".metadata") if self.worker is not None else _dcp_dir(path, 0) + "/.metadata"
            hint = (" (it was saved under another parallel.dp_sync: every_step writes one checkpoint, diloco and "
                    "co2 one per worker)") if os.path.isfile(other) else ""
            raise FileNotFoundError(f"--resume: '{source}' is not a complete checkpoint (no .metadata){hint}")
        template = self._state(state, 0, gather=False)
        keys = dcp.FileSystemReader(source).read_metadata().state_dict_metadata
        missing = [name for name, part in state.parts.items()
                   if (name in template or name in template["trainer"])
                   and not self._loadable(source, keys, name, part)]
        for name in missing:
            template.pop(name, None)
            template["trainer"].pop(name, None)
        dcp.load(template, checkpoint_id=source, process_group=self._pg)
        set_state_dict(state.model, state.optimizer, model_state_dict=template["model"],
                       optim_state_dict=template["optim"], options=OPTIONS)
        for name, part in state.parts.items():
            if getattr(part, "per_rank", False) and name in template:
                # Same world size: each rank continues its own streams (exact resume). Another layout has no
                # such continuation; rank r takes saved rank r mod the saved world size.
                saved = pickle.loads(template[name])
                part.load_state_dict(saved[self.rank % len(saved)])
            elif hasattr(part, "checkpoint_tensors"):
                if name in template:
                    part.load_checkpoint_tensors(template[name]["tensors"])
                part.load_state_dict(pickle.loads(template[name]["host"]) if name in template else None)
            elif name in template["trainer"]:
                part.load_state_dict(template["trainer"][name])
            elif name in missing:  # a part added since the checkpoint was written
                print(f"resume: rank {self.rank}: '{name}' is not in {path}; it starts fresh", flush=True)
        return int(template["trainer"]["step"])


class DeepSpeedCheckpointer:
    """The Checkpointer interface over ``engine.save_checkpoint`` / ``load_checkpoint``."""

    def __init__(self, ckpt_root: str, keep: int, rank: int, engine):
        self.root, self.keep, self.rank, self.engine = ckpt_root, keep, rank, engine

    def save(self, state, step: int) -> str:
        """Write ``state`` (a ``TrainState``) as the checkpoint of ``step``; its final path."""
        """``sync``: always every_step under DeepSpeed (config checks refuse the others): nothing to save."""
        name = f"step_{step:08d}"
        final, tmp = os.path.join(self.root, name), os.path.join(self.root, name + ".tmp")
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(self.root, exist_ok=True)
        dist.barrier()
        plain = {n: p.state_dict() for n, p in state.parts.items()
                 if not getattr(p, "per_rank", False) and not hasattr(p, "checkpoint_tensors")}
        self.engine.save_checkpoint(self.root, tag=name + ".tmp", save_latest=False,
                                    client_state={"step": step, **plain})
        ranked = {n: p.state_dict() for n, p in state.parts.items() if getattr(p, "per_rank", False)}
        torch.save(ranked, os.path.join(tmp, f"loomtrain_rng_rank{self.rank}.pt"))
        dist.barrier()
        if self.rank == 0:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            atomic_write_text(os.path.join(self.root, "latest"), name + "\n")
            for _, old in list_checkpoints(self.root)[:-self.keep] if self.keep else []:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()
        return final

    def load(self, path: str, state) -> int:
        path = path.rstrip("/")
        rng_file = os.path.join(path, f"loomtrain_rng_rank{self.rank}.pt")
        if not os.path.isfile(rng_file):
            raise FileNotFoundError(f"--resume: '{path}' is not a complete DeepSpeed checkpoint of this world size")
        _, client = self.engine.load_checkpoint(os.path.dirname(path), tag=os.path.basename(path))
        ranked = torch.load(rng_file, weights_only=False)
        if "torch" in ranked:  # written before per-rank parts had names: the RNG state itself
            ranked = {"rng": ranked}
        for name, part in state.parts.items():
            if getattr(part, "per_rank", False) and name in ranked:
                part.load_state_dict(ranked[name])
            elif name in client:
                part.load_state_dict(client[name])
        return int(client["step"])

    def wait(self) -> None:
        pass

    def poll(self) -> None:
        pass


def checkpointer_for(engine, root: str, cfg, rank: int, device, workers=None):
    """The checkpointer of ``engine``'s state: DCP files of every part (``Checkpointer``), or the engine's own
    files where it partitions the state itself (``native_checkpoint``: DeepSpeed). ``cfg``: the checkpoint
    section; ``workers``: (this worker, workers) when replicas take local updates (a checkpoint per worker)."""
    if engine.native_checkpoint:
        return DeepSpeedCheckpointer(root, cfg.keep, rank, engine.ds)
    return Checkpointer(root, cfg.keep, cfg.async_save, rank, device, workers=workers)
