"""Distributed checkpoints with ``torch.distributed.checkpoint`` (DCP), optionally asynchronous.

A checkpoint is the directory ``<output_dir>/checkpoints/step_NNNNNNNN``: model and
optimizer (each rank writes its shards), LR scheduler, data-sampler position, step,
every rank's RNG states and the data-parallel sync's outer state. Workers that take local
updates (``parallel.dp_sync: diloco | co2``) hold different parameters, which DCP would
deduplicate as replicas: each writes its own ``worker<NNN>`` directory inside the step's. It is written under a ``.tmp`` name and renamed by rank 0 once
every rank has finished, and ``latest`` is rewritten atomically after that, so an
interrupted save never looks like a checkpoint.

Loading one runs no code planted in it (a ``--resume`` path can be shared, or written by someone else):
loomtrain's own per-rank parts and tensor parts' host state are JSON (``faulttol/codec.py``), DCP's
``.metadata`` is unpickled with only the classes DCP metadata holds (``SafeFileSystemReader``), and its
non-tensor items with ``torch.load(weights_only=True)`` (``SafeLoadPlanner``); a part pickled by an older
loomtrain is refused unless ``LOOMTRAIN_TRUST_CHECKPOINT_PICKLE=1`` (``UnsafeCheckpointError``).
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
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from loomtrain.comms import traffic
from loomtrain.faulttol import codec
from loomtrain.fsutil import atomic_write_text
from loomtrain.state_reads import reading_state

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


# ----------------------------------------------------------------------------- loading without running code
TRUST_PICKLE_ENV = "LOOMTRAIN_TRUST_CHECKPOINT_PICKLE"


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint holds something whose loading could run code (a pickle where data belongs)."""


# What DCP's ``.metadata`` pickle refers to (logged from every layout the tests write: one process, FSDP,
# pipeline, a checkpoint per worker): its own dataclasses and enum, where the file items are, torch sizes,
# dtypes and layouts, paths. Nothing here runs code when called with the arguments a pickle can give it.
_METADATA_MODULE = dcp_metadata.__name__
_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
    ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
    ("builtins", "set"), ("builtins", "frozenset"),
    ("pathlib", "Path"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata only: any other global (a function to call, a class to build) is refused."""

    def find_class(self, module: str, name: str):
        if module == _METADATA_MODULE:
            found = getattr(dcp_metadata, name, None)
            if isinstance(found, type) and found.__module__ == _METADATA_MODULE:
                return found
        elif module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        elif (module, name) in _METADATA_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it refers to {module}.{name}, which DCP metadata never holds")


class SafeFileSystemReader(dcp.FileSystemReader):
    """``FileSystemReader`` whose ``read_metadata`` unpickles ``.metadata`` with ``_MetadataUnpickler`` (DCP's
    own uses ``pickle.load``: a planted ``.metadata`` would run code before any check). ``label``: what the
    refusal names (the flag or argument the path came from)."""

    def __init__(self, path, *args, label: str = "--resume", **kwargs):
        super().__init__(path, *args, **kwargs)
        self.label = label

    def read_metadata(self, *args, **kwargs) -> dcp_metadata.Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            try:
                metadata = _MetadataUnpickler(f).load()
            except pickle.UnpicklingError as e:
                raise UnsafeCheckpointError(f"{self.label}: refusing {path}: {e}") from None
        if not isinstance(metadata, dcp_metadata.Metadata):
            raise UnsafeCheckpointError(f"{self.label}: refusing {path}: it holds a {type(metadata).__name__}, "
                                        "not DCP Metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _weights_only_reason(e: Exception) -> str:
    """What ``torch.load(weights_only=True)`` refused, in a few words (its message advises allowlisting it)."""
    found = re.search(r"GLOBAL (\S+)", str(e))
    return f"it refers to {found.group(1)}" if found else str(e).strip().splitlines()[0]


class SafeLoadPlanner(DefaultLoadPlanner):
    """``DefaultLoadPlanner`` whose non-tensor items (step, scheduler, data position, encoded parts) are read with
    ``torch.load(weights_only=True)``: plain Python data and tensors only (DCP's own passes ``weights_only=False``)."""

    def __init__(self, checkpoint: str = "", label: str = "--resume", **kwargs):
        super().__init__(**kwargs)
        self.checkpoint, self.label = checkpoint, label

    def load_bytes(self, read_item, value) -> None:
        fqn = read_item.dest_index.fqn
        try:
            loaded = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise UnsafeCheckpointError(f"{self.label}: refusing {self.checkpoint}: item '{fqn}' is not plain data "
                                        f"({_weights_only_reason(e)})") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], loaded)
        else:
            self.state_dict[fqn] = loaded


def safe_dcp_load(state_dict: dict, checkpoint: str, label: str = "--resume", **kwargs) -> None:
    """``dcp.load`` of ``checkpoint`` into ``state_dict`` with ``SafeFileSystemReader`` and ``SafeLoadPlanner``;
    an ``UnsafeCheckpointError`` on any rank is raised as itself (DCP wraps it in a ``CheckpointException``)."""
    try:
        dcp.load(state_dict, storage_reader=SafeFileSystemReader(checkpoint, label=label),
                 planner=SafeLoadPlanner(checkpoint, label=label), **kwargs)
    except CheckpointException as e:
        refused = [exc for exc, _ in e.failures.values() if isinstance(exc, UnsafeCheckpointError)]
        if refused:
            raise refused[0] from e
        raise


def read_dcp_metadata(checkpoint: str, label: str = "--resume") -> dcp_metadata.Metadata:
    """The ``.metadata`` of the DCP checkpoint ``checkpoint``, read without running code."""
    return SafeFileSystemReader(checkpoint, label=label).read_metadata()


def _decode_part(data, checkpoint: str, name: str):
    """Part ``name``'s state from its stored bytes (``codec`` JSON). Pickled bytes (written by a loomtrain from
    before parts were JSON) are unpickled only under ``LOOMTRAIN_TRUST_CHECKPOINT_PICKLE=1``."""
    if isinstance(data, bytes) and data[:1] == b"\x80":  # pickle's PROTO opcode: an older loomtrain's part
        if os.environ.get(TRUST_PICKLE_ENV) == "1":
            return pickle.loads(data)
        raise UnsafeCheckpointError(
            f"--resume: refusing {checkpoint}: part '{name}' is pickled (written by an older loomtrain), and "
            f"unpickling could run code planted in it; if you trust whoever wrote it, resume once with "
            f"{TRUST_PICKLE_ENV}=1 (checkpoints saved from then on are in the new format)")
    try:
        if not isinstance(data, bytes):
            raise TypeError(f"a {type(data).__name__}, not bytes")
        return codec.loads(data)
    except (ValueError, TypeError, KeyError, AttributeError) as e:  # JSON, UTF-8, tags, dtypes
        raise UnsafeCheckpointError(f"--resume: refusing {checkpoint}: part '{name}' is not loomtrain's "
                                    f"encoded state ({e})") from None


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
        every layout (DCP reshards tensors between layouts): a per-rank part travels as one encoded (``codec``
        JSON, never a pickle) list of all ranks' states, so a run resumed on another world size finds its key.
        ``gather=False`` (a template to load into) skips the all-gathers: DCP replaces the values."""
        with reading_state():  # torch may step an optimizer with empty state here to materialize it
            model_sd, optim_sd = get_state_dict(state.model, state.optimizer, options=OPTIONS)
        out = {"model": model_sd, "optim": optim_sd, "trainer": {"step": step}}
        for name, part in state.parts.items():
            if getattr(part, "per_rank", False):
                mine = part.state_dict()
                every = [mine]
                if gather and dist.is_initialized() and dist.get_world_size() > 1:
                    every = [None] * dist.get_world_size()
                    dist.all_gather_object(every, mine)
                out[name] = codec.dumps(every)  # one opaque value: its key does not depend on the world size
            elif hasattr(part, "checkpoint_tensors"):
                out[name] = {"tensors": part.checkpoint_tensors(), "host": codec.dumps(part.state_dict())}
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
        safe_dcp_load(probe, source, process_group=self._pg)
        return _decode_part(probe[name]["host"], source, f"{name}.host").get("signature") == part.signature()

    def load(self, path: str, state) -> int:
        """Restore ``state`` (a ``TrainState``) from ``path``; the step it was saved at. A part the checkpoint
        lacks keeps its fresh state (one added since); a tensor part whose saved ``signature`` differs (an outer
        state of another dp_sync method or layout) gets ``load_state_dict(None)``: the outer schedule restarts
        from the loaded parameters. every_step and
        diloco/co2 checkpoints are laid out differently (one DCP directory, or one per worker) and refuse each
        other. Nothing in the checkpoint is unpickled beyond plain data (``safe_dcp_load``, ``_decode_part``):
        one that would run code raises ``UnsafeCheckpointError``."""
        source = _dcp_dir(path, self.worker)
        if not os.path.isfile(os.path.join(source, ".metadata")):
            other = os.path.join(path, ".metadata") if self.worker is not None else _dcp_dir(path, 0) + "/.metadata"
            hint = (" (it was saved under another parallel.dp_sync: every_step writes one checkpoint, diloco and "
                    "co2 one per worker)") if os.path.isfile(other) else ""
            raise FileNotFoundError(f"--resume: '{source}' is not a complete checkpoint (no .metadata){hint}")
        template = self._state(state, 0, gather=False)
        keys = read_dcp_metadata(source).state_dict_metadata
        missing = [name for name, part in state.parts.items()
                   if (name in template or name in template["trainer"])
                   and not self._loadable(source, keys, name, part)]
        for name in missing:
            template.pop(name, None)
            template["trainer"].pop(name, None)
        safe_dcp_load(template, source, process_group=self._pg)
        with reading_state():
            set_state_dict(state.model, state.optimizer, model_state_dict=template["model"],
                           optim_state_dict=template["optim"], options=OPTIONS)
        for name, part in state.parts.items():
            if getattr(part, "per_rank", False) and name in template:
                # Same world size: each rank continues its own streams (exact resume). Another layout has no
                # such continuation; rank r takes saved rank r mod the saved world size.
                saved = _decode_part(template[name], source, name)
                part.load_state_dict(saved[self.rank % len(saved)])
            elif hasattr(part, "checkpoint_tensors"):
                if name in template:
                    part.load_checkpoint_tensors(template[name]["tensors"])
                part.load_state_dict(_decode_part(template[name]["host"], source, f"{name}.host")
                                     if name in template else None)
            elif name in template["trainer"]:
                part.load_state_dict(template["trainer"][name])
            elif name in missing:  # a part added since the checkpoint was written
                print(f"resume: rank {self.rank}: '{name}' is not in {path}; it starts fresh", flush=True)
        return int(template["trainer"]["step"])


class DeepSpeedCheckpointer:
    """The Checkpointer interface over ``engine.save_checkpoint`` / ``load_checkpoint``.

    loomtrain's own file per rank (``loomtrain_rng_rank<r>.pt``: the per-rank parts, RNG states) holds their
    ``codec`` JSON and is read with ``torch.load(weights_only=True)``; one written by an older loomtrain (a pickle
    with numpy objects) is refused unless ``LOOMTRAIN_TRUST_CHECKPOINT_PICKLE=1``. DeepSpeed's own
    ``load_checkpoint`` still reads its files (model, optimizer, ``client_state``: step, scheduler, data position)
    with ``torch.load(weights_only=False)``: resuming a DeepSpeed checkpoint trusts whoever wrote it."""

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
        torch.save({"codec": codec.dumps(ranked)}, os.path.join(tmp, f"loomtrain_rng_rank{self.rank}.pt"))
        dist.barrier()
        if self.rank == 0:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            atomic_write_text(os.path.join(self.root, "latest"), name + "\n")
            for _, old in list_checkpoints(self.root)[:-self.keep] if self.keep else []:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()
        return final

    def _ranked(self, rng_file: str) -> dict:
        """This rank's per-rank parts by name, from ``rng_file``, running no code planted in it."""
        try:
            stored = torch.load(rng_file, weights_only=True)
        except pickle.UnpicklingError as e:
            if os.environ.get(TRUST_PICKLE_ENV) != "1":
                raise UnsafeCheckpointError(
                    f"--resume: refusing {rng_file}: it is not plain data ({_weights_only_reason(e)}); a file written "
                    f"by an older loomtrain is a pickle, and unpickling could run code planted in it; if you trust "
                    f"whoever wrote it, resume once with {TRUST_PICKLE_ENV}=1 (checkpoints saved from then on are "
                    f"in the new format)") from None
            stored = torch.load(rng_file, weights_only=False)
        if isinstance(stored, dict) and set(stored) == {"codec"}:
            return _decode_part(stored["codec"], rng_file, "per-rank parts")
        return stored  # an older file that holds plain data only (or one trusted above)

    def load(self, path: str, state) -> int:
        path = path.rstrip("/")
        rng_file = os.path.join(path, f"loomtrain_rng_rank{self.rank}.pt")
        if not os.path.isfile(rng_file):
            raise FileNotFoundError(f"--resume: '{path}' is not a complete DeepSpeed checkpoint of this world size")
        ranked = self._ranked(rng_file)  # before DeepSpeed reads its own files: a planted file stops the resume
        _, client = self.engine.load_checkpoint(os.path.dirname(path), tag=os.path.basename(path))
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
