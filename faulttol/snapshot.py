"""Asynchronous in-memory snapshots, erasure-coded across nodes, and restoring from them.

A snapshot of step s is each rank's *payload*: the local shards of every model and
optimizer tensor (in ``get_state_dict`` order), followed by a pickle of the small rest
(LR scheduler, data-sampler position, RNG states, the optimizer's hyperparameters).

1. ``start`` (main thread, after optimizer step s) records the small rest and hands the
   tensors to a background thread, which copies them into a host staging buffer (on CUDA
   the copy is issued on a side stream right away). Training goes on; only the *next*
   optimizer step waits (``before_update``) until the copy is done.
2. The background thread splits the payload into k chunks, adds m parity chunks
   (``ReedSolomon``), sends chunk j to the stripe member j places further on (another
   node) and receives the chunks it holds for others straight into shared-memory
   segments of its node's snapshot process (SMP), with a CRC each.
3. Two-phase commit: only when every rank has written all it holds (an all-reduce on a
   gloo group of the snapshot's own) does each rank commit its entries in its SMP. A
   failure before that leaves an uncommitted (torn) epoch that is never served.

``locate`` + ``restore`` reverse it: every rank reports the committed, checksum-valid
chunks its SMP holds, all ranks pick the newest epoch from which every payload can be
rebuilt (any k of n chunks), chunks travel back to their owners, parity fills in for
chunks lost with a node, and the payload is copied into the freshly built model and
optimizer in place.
"""
from __future__ import annotations

import math
import pickle
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.distributed.tensor import DTensor

from loomtrain.faulttol.erasure import ReedSolomon
from loomtrain.faulttol.layout import NodeLayout, choose_epoch
from loomtrain.faulttol.smp import Attached, SnapshotClient, checksum, socket_path


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A uint8 view of a tensor's storage (writing to it writes the tensor)."""
    if not t.is_contiguous():
        raise RuntimeError(f"snapshot: a state tensor of shape {tuple(t.shape)} is not contiguous")
    return t.detach().reshape(-1).view(torch.uint8)


def flatten_state(model, optimizer) -> list[torch.Tensor]:
    """The live local tensors of the model and optimizer state, in a fixed order.

    ``get_state_dict`` also materializes optimizer state that does not exist yet (a fresh
    optimizer), so a restore can copy into it. Tensors are the *live* local shards.
    """
    model_sd, optim_sd = get_state_dict(model, optimizer)
    leaves, _ = pytree.tree_flatten((model_sd, optim_sd))
    return [(leaf.to_local() if isinstance(leaf, DTensor) else leaf) for leaf in leaves
            if isinstance(leaf, torch.Tensor)]


def _state_ids(optimizer) -> list[int]:
    """Identity of every optimizer state tensor: unchanged while updates happen in place."""
    return [id(v) for st in optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor)]


def _hyperparameters(optimizer) -> list[dict]:
    """The optimizer's non-tensor state (learning rates, betas, ...), which the scheduler changes."""
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    scalars = {i: {k: v for k, v in optimizer.state[p].items() if not isinstance(v, torch.Tensor)}
               for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"]) if p in optimizer.state}
    return [groups, {i: v for i, v in scalars.items() if v}]


def _set_hyperparameters(optimizer, saved: list) -> None:
    groups, scalars = saved
    for group, values in zip(optimizer.param_groups, groups):
        group.update(values)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for i, values in scalars.items():
        optimizer.state[params[int(i)]].update(values)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass
class Located:
    epoch: int
    sources: dict[int, dict[int, int]]  # src rank -> {chunk: holder rank}
    entries: list[dict]  # every holder's committed entries of that epoch (all_gathered)


@dataclass
class Restored:
    step: int
    host: dict  # scheduler, sampler, rng
    seconds: float
    rebuilt: int  # ranks whose payload needed parity (their chunks were lost with a node)


class Snapshotter:
    def __init__(self, layout: NodeLayout, rank: int, smp_dir: str, signature: str, device: torch.device):
        self.layout, self.rank, self.signature, self.device = layout, rank, signature, device
        self.client = SnapshotClient(socket_path(smp_dir, layout.node_of(rank)))
        self.node = layout.node_of(rank)
        # Groups of their own: the background thread's collectives never interleave with training's.
        self.world_group = dist.new_group(backend="gloo")
        self.stripe_group = None
        for ranks in layout.stripes():
            group = dist.new_group(ranks, backend="gloo") if layout.group_nodes > 1 else None
            if rank in ranks:
                self.stripe_group = group
        self.stripe = layout.stripe(rank)
        self.me = layout.member(rank)
        self.code = ReedSolomon(layout.data, layout.parity) if layout.parity else None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._copied = threading.Event()
        self._copied.set()
        self._cuda_event = None
        self._staging: torch.Tensor | None = None
        self._tensors: list[torch.Tensor] | None = None  # live local state tensors, flattened once
        self._tensor_ids: list[int] = []
        self.committed: list[int] = []  # epochs this rank committed, oldest first
        self.last_stall_s = 0.0  # main-thread time of the newest start()
        self.wait_s = 0.0  # main-thread time spent in before_update waiting for copies (cumulative)
        self.last_seconds = 0.0  # background time of the newest snapshot (copy + encode + exchange + commit)

    # ------------------------------------------------------------------ taking snapshots
    def start(self, step: int, model, optimizer, host: dict) -> None:
        """Begin snapshot ``step``; returns once the copy is under way (the previous snapshot must be done)."""
        t0 = time.perf_counter()
        self.wait()
        if self._tensors is None or _state_ids(optimizer) != self._tensor_ids:
            # get_state_dict costs milliseconds; its tensors are the live ones, updated in place.
            self._tensors = flatten_state(model, optimizer)
            self._tensor_ids = _state_ids(optimizer)
        tensors = self._tensors
        sizes = [_nbytes(t) for t in tensors]
        meta = pickle.dumps({"step": step, "host": host, "optimizer": _hyperparameters(optimizer), "sizes": sizes})
        tensor_bytes = sum(sizes)
        payload = tensor_bytes + len(meta)
        chunk = 8 * max(1, math.ceil(payload / (self.layout.data * 8)))  # int64 words for the bitwise codes
        need = chunk * self.layout.data
        if self._staging is None or self._staging.numel() < need:
            self._staging = torch.empty(need, dtype=torch.uint8, pin_memory=self.device.type == "cuda")
        staging = self._staging[:need]
        staging[tensor_bytes:payload].copy_(torch.frombuffer(bytearray(meta), dtype=torch.uint8))
        staging[payload:].zero_()
        self._copied.clear()
        if self.device.type == "cuda":  # device-to-host on a side stream, after what the step computed
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                self._copy_into(staging, tensors, non_blocking=True)
            self._cuda_event = stream.record_event()
            tensors = None
        self._thread = threading.Thread(target=self._run, name=f"snapshot-{step}", daemon=True,
                                        args=(step, staging, tensors, payload, tensor_bytes, chunk))
        self._thread.start()
        self.last_stall_s = time.perf_counter() - t0

    @staticmethod
    def _copy_into(staging: torch.Tensor, tensors: list[torch.Tensor], non_blocking: bool = False) -> None:
        offset = 0
        for t in tensors:
            n = _nbytes(t)
            staging[offset:offset + n].copy_(_as_bytes(t), non_blocking=non_blocking)
            offset += n

    def before_update(self) -> None:
        """Call before the optimizer changes parameters: the snapshot's copy must have read them."""
        t0 = time.perf_counter()
        if self._cuda_event is not None:
            torch.cuda.current_stream(self.device).wait_event(self._cuda_event)
        else:
            self._copied.wait()
        self.wait_s += time.perf_counter() - t0
        self.raise_error()

    def raise_error(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError(f"snapshot failed on rank {self.rank}: {err}") from err

    def wait(self) -> None:
        """Block until the running snapshot is committed (or failed: then raise)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.raise_error()

    def _run(self, step, staging, tensors, payload, tensor_bytes, chunk) -> None:
        t0 = time.perf_counter()
        ok, failure = True, None
        try:
            if tensors is not None:
                self._copy_into(staging, tensors)
            else:
                self._cuda_event.synchronize()
            self._copied.set()
            entries = self._write_chunks(step, staging, payload, tensor_bytes, chunk)
        except BaseException as e:
            # Reported to the main thread at once (it raises at its next check, and peers stuck in the
            # exchange with this rank then fail too); still take part in the agreement if peers get there.
            ok, failure = False, e
            self._error = e
            self._copied.set()
        try:
            flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.world_group)
            if ok and flag.item() == 0:
                failure = RuntimeError(f"snapshot of step {step} failed on another rank; not committed")
            elif ok:
                self.client._call(op="commit", epoch=step, owner=str(self.rank), entries=entries)
                self.committed.append(step)
        except BaseException as e:
            failure = failure or e
        self.last_seconds = time.perf_counter() - t0
        if failure is not None and self._error is None:
            self._error = failure

    def _write_chunks(self, step, staging, payload, tensor_bytes, chunk) -> dict:
        """Encode, exchange over the stripe and write every chunk this rank holds into its SMP."""
        k, n = self.layout.data, self.layout.group_nodes
        chunks = [staging[i * chunk:(i + 1) * chunk] for i in range(k)]
        if self.code is not None:
            chunks += self.code.encode(chunks)
        # What each stripe member sends: chunk sizes and payload lengths differ between ranks.
        mine = torch.tensor([chunk, payload, tensor_bytes], dtype=torch.int64)
        if n > 1:
            sizes = [torch.zeros(3, dtype=torch.int64) for _ in range(n)]
            dist.all_gather(sizes, mine, group=self.stripe_group)
        else:
            sizes = [mine]
        segments, views, entries = [], {}, {}
        try:
            for i, src in enumerate(self.stripe):  # this rank holds chunk (me - i) mod n of member i
                j = (self.me - i) % n
                size, src_payload, src_tensor_bytes = (int(v) for v in sizes[i])
                try:
                    name = self.client._call(op="alloc", key=f"r{src}c{j}", size=size)["name"]
                except (ConnectionError, FileNotFoundError) as e:
                    raise RuntimeError(f"node {self.node}'s snapshot process is not answering ({e})") from None
                shm = Attached(name)
                segments.append(shm)
                views[i] = torch.frombuffer(shm.buf, dtype=torch.uint8, count=size)
                entries[f"r{src}c{j}"] = {"name": name, "size": size, "src": src, "chunk": j, "step": step,
                                          "payload": src_payload, "tensor_bytes": src_tensor_bytes,
                                          "signature": self.signature}
            views[self.me].copy_(chunks[0])
            ops = []
            for j in range(1, n):
                ops.append(dist.P2POp(dist.isend, chunks[j], self.stripe[(self.me + j) % n], self.stripe_group))
                ops.append(dist.P2POp(dist.irecv, views[(self.me - j) % n], self.stripe[(self.me - j) % n],
                                      self.stripe_group))
            for work in dist.batch_isend_irecv(ops) if ops else []:
                work.wait()
            del ops
            views.clear()
            for shm, entry in zip(segments, entries.values()):
                entry["crc"] = checksum(shm.buf[:entry["size"]])
        finally:
            views.clear()
            for shm in segments:
                shm.close()
        return entries

    # ------------------------------------------------------------------ restoring
    def _inventory(self) -> dict[int, list[dict]]:
        """Committed entries this rank holds whose checksum still matches, by epoch."""
        out: dict[int, list[dict]] = {}
        try:
            epochs = self.client._call(op="latest")["epochs"]
        except (ConnectionError, FileNotFoundError):
            return out
        for ep in epochs:
            for entry in ep["owners"].get(str(self.rank), {}).values():
                try:
                    shm = Attached(entry["name"])
                except FileNotFoundError:
                    continue
                try:
                    if checksum(shm.buf[:entry["size"]]) == entry["crc"]:
                        out.setdefault(int(ep["epoch"]), []).append(entry)
                finally:
                    shm.close()
        return out

    def locate(self) -> tuple[Located | None, str]:
        """Collective: the newest epoch every rank can rebuild, or None and why not."""
        inventories = [None] * self.layout.world
        dist.all_gather_object(inventories, self._inventory(), group=self.world_group)
        found = choose_epoch(inventories, self.layout, self.signature)
        if found is None:
            held = sorted({e for inv in inventories for e in inv})
            why = ("no snapshot in memory" if not held else
                   f"epochs {held} in memory, but none with {self.layout.data} of {self.layout.group_nodes} "
                   f"chunks for every rank (more nodes lost than ec_parity={self.layout.parity}, or a torn snapshot)")
            return None, why
        epoch, sources = found
        entries = [e for inv in inventories for e in inv.get(epoch, [])]
        return Located(epoch, sources, entries), ""

    def restore(self, located: Located, model, optimizer) -> Restored:
        """Collective: bring every rank's payload of ``located.epoch`` home and load it in place."""
        t0 = time.perf_counter()
        k = self.layout.data
        by_key = {(e["src"], e["chunk"]): e for e in located.entries}
        mine = located.sources[self.rank]
        ops, received, segments, sends = [], {}, [], []
        try:
            for src, chunks in located.sources.items():  # chunks I hold that their owners need
                for j, holder in chunks.items():
                    if holder != self.rank:
                        continue
                    entry = by_key[(src, j)]
                    shm = Attached(entry["name"])
                    segments.append(shm)
                    view = torch.frombuffer(shm.buf, dtype=torch.uint8, count=entry["size"])
                    if src == self.rank:
                        received[j] = view.clone()
                        del view
                    else:
                        sends.append(view)
                        ops.append(dist.P2POp(dist.isend, view, src, self.stripe_group))
            for j, holder in mine.items():
                if holder != self.rank:
                    received[j] = torch.empty(by_key[(self.rank, j)]["size"], dtype=torch.uint8)
                    ops.append(dist.P2POp(dist.irecv, received[j], holder, self.stripe_group))
            for work in dist.batch_isend_irecv(ops) if ops else []:
                work.wait()
        finally:
            ops.clear()
            sends.clear()
            for shm in segments:
                shm.close()
        if all(j in received for j in range(k)):
            data = [received[j] for j in range(k)]
        else:
            data = self.code.decode(received)
        entry = by_key[(self.rank, next(iter(mine)))]
        payload = torch.cat(data)[:entry["payload"]]
        meta = pickle.loads(payload[entry["tensor_bytes"]:].numpy().tobytes())

        tensors = flatten_state(model, optimizer)  # also creates a fresh optimizer's state
        sizes = [_nbytes(t) for t in tensors]
        if sizes != meta["sizes"]:
            raise RuntimeError("snapshot: the model/optimizer state no longer has the snapshot's layout")
        offset = 0
        for t, n in zip(tensors, sizes):
            _as_bytes(t).copy_(payload[offset:offset + n])
            offset += n
        _set_hyperparameters(optimizer, meta["optimizer"])
        rebuilt = sum(1 for chunks in located.sources.values() if any(j >= k for j in chunks))
        return Restored(located.epoch, meta["host"], time.perf_counter() - t0, rebuilt)
