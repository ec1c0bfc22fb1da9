"""Asynchronous in-memory snapshots, erasure-coded across nodes, and restoring from them.

A snapshot of step s is each rank's *payload*: the local shards of every model and
optimizer tensor (in ``get_state_dict`` order), followed by JSON of the small rest (LR
scheduler, data-sampler position, RNG states, the optimizer's hyperparameters, the state's
layout: names, dtypes, shapes). Nothing read back from shared memory is unpickled.

1. ``start`` (main thread, after optimizer step s) records the small rest and hands the
   tensors to a background thread, which copies them into a host staging buffer (on CUDA
   through a few fixed-size pinned buffers on a side stream ordered after the step:
   :class:`PinnedStaging`). Training goes on; only the *next* optimizer step waits
   (``before_update``) until the copy is done.
2. The background thread splits the payload into k chunks, adds m parity chunks
   (``ReedSolomon``), computes each chunk's CRC at the source, reserves the segments it
   will hold in its node's snapshot process (SMP), and — once every rank has reserved
   (an agreement) — sends chunk j to the stripe member j places further on (another node),
   receiving the chunks it holds for others straight into the segments and checking them
   against the source CRCs.
3. Two-phase commit: only when every rank has written and verified all it holds (a second
   agreement, on a gloo group of the snapshot's own) does each rank commit its entries,
   tagged with the run, attempt, epoch and source, in its SMP. A failure anywhere skips that
   snapshot (counted, reported by ``poll``): each rank closes every mapping it opened for it
   and its SMP drops the uncommitted segments (never served, never handed out again), and
   training goes on. A collective of the snapshot's own groups that fails (a timeout, a dead
   peer) leaves them out of step: at the next snapshot every rank learns it from one all-reduce
   on the default group and all rebuild them together; snapshots go off (one warning) only if
   the rebuild fails or the groups fail at ``MAX_GROUP_FAILURES`` snapshots in a row. How long a
   snapshot's collectives, transfers and SMP requests may take grows with the bytes it moves
   (``snapshot_timeout_s``).

``locate`` + ``restore`` reverse it: every rank reports the committed, checksum-valid
chunks its SMP holds, all ranks pick the newest epoch from which every payload can be
rebuilt (any k of n chunks), chunks travel back to their owners, parity fills in for
chunks lost with a node, and the payload is copied into the freshly built model and
optimizer in place.
"""
from __future__ import annotations

import datetime
import math
import threading
import time
import zlib
from collections import deque
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.distributed.tensor import DTensor

from loomtrain.comms import traffic
from loomtrain.faulttol import codec
from loomtrain.faulttol.erasure import ReedSolomon
from loomtrain.faulttol.layout import NodeLayout, choose_chunks
from loomtrain.faulttol.smp import Attached, SMPError, SnapshotClient, checksum, ensure_daemon, socket_path
from loomtrain.log import say
from loomtrain.state_reads import reading_state


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A uint8 view of a tensor's storage (writing to it writes the tensor)."""
    if not t.is_contiguous():
        raise RuntimeError(f"snapshot: a state tensor of shape {tuple(t.shape)} is not contiguous")
    return t.detach().reshape(-1).view(torch.uint8)


def flatten_state(model, optimizer, extra: dict | None = None) -> tuple[list[torch.Tensor], list[list]]:
    """The live local tensors of the model and optimizer state (and ``extra``: the data-parallel sync's
    outer state) in a fixed order, and their layout ([name, dtype, local shape] each: what a restore
    must find again, not just the byte sizes).

    ``get_state_dict`` also materializes optimizer state that does not exist yet (a fresh
    optimizer), so a restore can copy into it. Tensors are the *live* local shards.
    """
    with reading_state():  # the materializing step is not an inner step (loomtrain/state_reads.py)
        leaves, _ = pytree.tree_flatten_with_path((get_state_dict(model, optimizer), extra or {}))
    tensors, layout = [], []
    for path, leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            local = leaf.to_local() if isinstance(leaf, DTensor) else leaf
            tensors.append(local)
            layout.append([pytree.keystr(path), str(local.dtype).removeprefix("torch."), list(local.shape)])
    return tensors, layout


def _crc(t: torch.Tensor) -> int:
    return zlib.crc32(t.numpy()) if t.numel() else 0


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


# Pinned buffers the CUDA staging goes through. A power of two: torch's caching host allocator rounds every
# pinned block up to one, so one payload-sized pinned block (what this replaced) pinned up to 2x the payload
# (a 17 GB shard: 32 GB per rank). Two buffers: the device fills one while the host empties the other.
PINNED_BUFFER_BYTES = 64 << 20
PINNED_BUFFERS = 2


class CudaCopies:
    """The device operations of :class:`PinnedStaging` on CUDA: a seam, so a test can stand in a device
    that finishes queued work later than the host's call returns."""

    def __init__(self, device: torch.device):
        self.device = device

    def stream(self):
        return torch.cuda.Stream(self.device)

    def current_stream(self):
        return torch.cuda.current_stream(self.device)

    def pinned(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def copy(self, stream, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Queue ``dst.copy_(src)`` for each (dst, src) on ``stream`` (device to pinned host: asynchronous)."""
        with torch.cuda.stream(stream):
            for dst, src in pairs:
                dst.copy_(src, non_blocking=True)


def _windows(tensors: list[torch.Tensor], size: int):
    """Consecutive windows of at most ``size`` bytes over the tensors' bytes laid end to end, as
    (offset, length, [(source bytes, offset in the window)]): small tensors share a window."""
    parts, offset, used = [], 0, 0
    for t in tensors:
        src, at = _as_bytes(t), 0
        while at < src.numel():
            n = min(size - used, src.numel() - at)
            parts.append((src[at:at + n], used))
            used, at = used + n, at + n
            if used == size:
                yield offset, used, parts
                parts, offset, used = [], offset + used, 0
    if used:
        yield offset, used, parts


class PinnedStaging:
    """Device-to-host copies of the live state into pageable staging memory through ``buffers`` pinned
    buffers of ``buffer_bytes`` each, on a side stream: the device fills one buffer while the host copies
    the last one out. Pinned memory stays ``buffers * buffer_bytes`` whatever the payload.

    Host memory per rank on CUDA: the payload-sized pageable staging buffer (kept between snapshots), plus
    ``PINNED_BUFFERS * PINNED_BUFFER_BYTES`` pinned (128 MiB), plus, while a snapshot is encoded, its m parity
    chunks (m/k x the payload), plus the shared-memory segments this rank holds in its node's SMP: two epochs
    of (k+m)/k x the payload (erasure), or two copies of it (replicas as the redundancy)."""

    def __init__(self, ops, buffer_bytes: int = PINNED_BUFFER_BYTES, buffers: int = PINNED_BUFFERS):
        self.ops, self.buffer_bytes, self.buffers = ops, buffer_bytes, buffers
        self._stream = None
        self._pinned: list[torch.Tensor] = []

    def after_compute(self) -> None:
        """Main thread, after the step: the copies queued later come after what the current stream holds.
        The first call allocates the stream and the pinned buffers (here, on the rank's device)."""
        if self._stream is None:  # both or neither: an allocation that failed is tried again next time
            stream = self.ops.stream()
            pinned = [self.ops.pinned(self.buffer_bytes) for _ in range(self.buffers)]
            self._stream, self._pinned = stream, pinned
        self._stream.wait_stream(self.ops.current_stream())

    def copy(self, staging: torch.Tensor, tensors: list[torch.Tensor]) -> None:
        """Background thread: returns once ``staging`` holds every byte, so the device has read them all."""
        pending = deque()  # (event, pinned buffer, staging slice): copies queued, not yet copied out

        def drain():
            event, buf, dst = pending.popleft()
            event.synchronize()  # the device wrote ``buf``; only now may the host read it (or refill it)
            dst.copy_(buf[:dst.numel()])

        try:
            for i, (offset, length, parts) in enumerate(_windows(tensors, self.buffer_bytes)):
                if len(pending) == self.buffers:
                    drain()
                buf = self._pinned[i % self.buffers]
                self.ops.copy(self._stream, [(buf[at:at + src.numel()], src) for src, at in parts])
                pending.append((self._stream.record_event(), buf, staging[offset:offset + length]))
        except BaseException:
            for event, _, _ in pending:  # failed midway: the device is done with the buffers before we go on
                event.synchronize()
            raise
        while pending:
            drain()


@dataclass
class Located:
    epoch: int
    attempt: int  # the generation that wrote it: chunks of two generations are never combined
    needs: dict[int, int]  # this rank's chunks to use: chunk -> holder rank (k of them, data chunks first)
    records: dict[int, dict]  # chunk -> what its holder committed (size, crc, data_crcs, payload, tensor_bytes)
    serves: list[tuple[int, int, dict]]  # (owner rank, chunk, this rank's entry): chunks this rank sends home
    rebuilt: int  # ranks whose own chunks are lost: rebuilt from parity (or fetched from a replica)


@dataclass
class Restored:
    step: int
    host: dict  # scheduler, sampler, rng
    seconds: float
    rebuilt: int  # ranks whose payload needed parity (their chunks were lost with a node), or a replica's copy


MAX_GROUP_FAILURES = 3  # snapshots in a row whose own process groups failed before snapshots go off


def snapshot_timeout_s(floor_s: float, moved_bytes: int, min_gbps: float) -> float:
    """Seconds a snapshot's (or restore's) collectives, transfers and SMP requests may each take before it is
    skipped: ``floor_s + moved_bytes * 8 / (min_gbps * 1e9)``. ``floor_s`` (``faulttol.snapshot.timeout_s``)
    covers the fixed costs (scheduling, an SMP restarted mid-snapshot); the second term is ``moved_bytes``, the
    most bytes any rank moves (agreed, so every rank waits alike; see ``moved_bytes``), at ``min_gbps``
    (``faulttol.snapshot.min_gbps``), the slowest rate a healthy snapshot is assumed to reach. A big shard on a
    slow link is not cut off by a fixed value, and a small state need not wait that long for a dead peer."""
    return float(floor_s) + max(0, int(moved_bytes)) * 8 / (float(min_gbps) * 1e9)


class Snapshotter:
    """One rank's side of the snapshots. A failed snapshot is skipped, counted and reported by ``poll``;
    training never stops for one (the previous epoch still serves, and the next snapshot retries)."""

    def __init__(self, layout: NodeLayout, rank: int, smp_dir: str, signature: str, node: int | str,
                 device: torch.device, *,
                 run: str = "", attempt: int = 0, timeout_s: float = 120.0, min_gbps: float = 1.0,
                 idle_exit_s: float = 0.0, fault=None, copier: PinnedStaging | None = None):
        self.layout, self.rank, self.signature, self.device = layout, rank, signature, device
        # How the device's tensors reach host memory (None: plain copies, on CPU); a test passes a fake device.
        self._copier = copier or (PinnedStaging(CudaCopies(device)) if device.type == "cuda" else None)
        self.run, self.attempt = run, attempt
        self._fault = fault or (lambda phase, step: None)  # fault injection: called at each phase (tests)
        self.smp_dir, self.idle_exit_s = smp_dir, idle_exit_s
        self.node = node  # this rank's node's SMP: its host, not a rank number (see FaultTolerance)
        self.client = SnapshotClient(socket_path(smp_dir, node), run=run, attempt=attempt, timeout_s=timeout_s)
        # timeout_s is the floor; each snapshot and restore waits snapshot_timeout_s of the bytes it moves
        self.timeout_s, self.min_gbps = timeout_s, min_gbps
        self.wait_timeout_s = timeout_s  # what the running snapshot's (or restore's) groups and requests wait
        self.world_group = self.stripe_group = None
        self._make_groups()
        self.stripe = layout.stripe(rank)
        self.me = layout.member(rank)
        self.code = ReedSolomon(layout.data, layout.parity) if layout.parity and not layout.by_replicas else None
        self._thread: threading.Thread | None = None
        self._failures: list[str] = []  # failed snapshots not yet reported by poll()
        self.late = 0  # snapshots that had to wait for the previous one to finish
        # Set by the background thread: a collective or transfer of the snapshot groups failed, so they are out of
        # step (a peer may still be in an operation this rank gave up on). Every rank rebuilds them at the next start.
        self._groups_broken = False
        self._group_failures = 0  # consecutive snapshots whose groups failed (decided the same on every rank)
        self._unsettled = False  # the running snapshot left a transfer into its segments unfinished
        # Mappings of segments a failed transfer may still write into: kept (the SMP has unlinked the segments)
        # until the groups that hold the transfer are destroyed, then closed.
        self._quarantine: list[Attached] = []
        self.broken = False  # snapshots are off for the rest of the run (every rank decided it together)
        self._copied = threading.Event()
        self._copied.set()
        self._staging: torch.Tensor | None = None
        self._tensors: list[torch.Tensor] | None = None  # live local state tensors, flattened once
        self._layout: list[list] = []
        self._tensor_ids: list[int] = []
        self.committed: list[int] = []  # epochs this rank committed, oldest first
        self.last_stall_s = 0.0  # main-thread time of the newest start()
        self.wait_s = 0.0  # main-thread time spent in before_update waiting for copies (cumulative)
        self.last_seconds = 0.0  # background time of the newest snapshot (copy + encode + exchange + commit)

    # ------------------------------------------------------------------ taking snapshots
    def _make_groups(self) -> None:
        """The snapshot's gloo groups: every rank creates every group, in the same order (``new_group`` is
        collective over the default group). Groups of their own: the background thread's collectives never
        interleave with training's, and a peer that died mid-exchange ends this snapshot with an error after
        its timeout instead of a hang (created with the floor ``timeout_s``; ``_use_timeout`` sets each
        snapshot's)."""
        timeout = datetime.timedelta(seconds=self.timeout_s)
        self.world_group = dist.new_group(backend="gloo", timeout=timeout)
        self.stripe_group = None
        for ranks in self.layout.stripes():
            group = dist.new_group(ranks, backend="gloo", timeout=timeout) if self.layout.group_nodes > 1 else None
            if self.rank in ranks:
                self.stripe_group = group

    def _use_timeout(self, seconds: float) -> None:
        """The timeout of what comes next on the snapshot groups (their collectives; point-to-point waits are
        given it) and of this rank's SMP requests. Only while no snapshot runs (the main thread)."""
        self.wait_timeout_s = self.client.timeout_s = seconds
        timeout = datetime.timedelta(seconds=seconds)
        for group in (self.world_group, self.stripe_group):
            if group is not None:
                dist.distributed_c10d._set_pg_timeout(timeout, group)

    def _wait_works(self, works) -> None:
        timeout = datetime.timedelta(seconds=self.wait_timeout_s)
        for work in works:
            work.wait(timeout)

    def moved_bytes(self, payload: int, chunk: int) -> int:
        """Bytes this rank's snapshot moves: its payload copied into staging, plus (erasure) the n-1 chunks it
        sends and the n-1 it receives, or (replicas) its copy written into its segment."""
        if self.layout.by_replicas:
            return 2 * payload
        return payload + 2 * (self.layout.group_nodes - 1) * chunk

    def _destroy_groups(self) -> None:
        """Destroy this rank's snapshot groups (their connections close: no transfer of theirs runs any more),
        then close the mappings quarantined for their transfers."""
        groups = [g for g in (self.stripe_group, self.world_group) if g is not None]
        self.world_group = self.stripe_group = None
        try:
            for group in groups:
                dist.destroy_process_group(group)
        finally:
            del groups
            quarantine, self._quarantine = self._quarantine, []
            for shm in quarantine:
                try:
                    shm.close()
                except BufferError:  # a view still holds it: unmapped when the last one goes
                    pass

    def start(self, step: int, model, optimizer, host: dict, extra: dict | None = None) -> None:
        """Begin snapshot ``step``; returns once the copy is under way (the previous snapshot must be done).
        ``extra``: more live tensors by name (the sync's outer state), restored in place like the rest.

        Collective over the default group: every rank calls it at the same step. One all-reduce of three ints
        says whether every rank prepared its snapshot and whether any rank's snapshot groups failed, so all
        ranks skip this snapshot, or rebuild the groups, together, and the most bytes any rank's snapshot moves,
        which sets every rank's timeout alike (``snapshot_timeout_s``). A failure here never reaches the training
        loop (it is reported by ``poll``); only the default group's own all-reduce may raise, as training's
        next collective would."""
        if self.broken:
            return
        t0 = time.perf_counter()
        if self._thread is not None and self._thread.is_alive():
            self.late += 1  # the interval is shorter than a snapshot takes: say so instead of stretching it quietly
            if self.late in (1, 10, 100) or self.late % 1000 == 0:
                say(f"faulttol: WARNING: rank {self.rank}: snapshot of step {step} waits for the previous one "
                    f"({self.late} time(s) so far; one takes {self.last_seconds:.2f}s in the background): "
                    f"raise faulttol.snapshot.every_steps")
        self.wait()
        job, problem, moved = None, None, 0
        try:
            job = self._prepare(step, model, optimizer, host, extra)
            moved = self.moved_bytes(job[3], job[5])
        except Exception as e:  # noqa: BLE001 - reported by poll(); training goes on
            problem = f"prepare: {type(e).__name__}: {e}"
        if self._go_ahead(step, problem, moved):
            self._copied.clear()
            try:
                thread = threading.Thread(target=self._run, name=f"snapshot-{step}", daemon=True, args=job)
                thread.start()
                self._thread = thread
            except Exception as e:  # noqa: BLE001 - no thread: the peers give up on this rank after timeout_s
                self._copied.set()
                self._groups_broken = True
                self._failures.append(f"snapshot of step {step} skipped on rank {self.rank}: start: "
                                      f"{type(e).__name__}: {e}")
        self.last_stall_s = time.perf_counter() - t0

    def _prepare(self, step, model, optimizer, host, extra) -> tuple:
        """Main thread: the small rest as JSON, the staging buffer, the device ordering; the background
        thread's arguments."""
        ids = _state_ids(optimizer) + [id(t) for t in (extra or {}).values()]
        if self._tensors is None or ids != self._tensor_ids:
            # get_state_dict costs milliseconds; its tensors are the live ones, updated in place.
            self._tensors, self._layout = flatten_state(model, optimizer, extra)
            self._tensor_ids = ids
        tensors = self._tensors
        for t, (name, _, _) in zip(tensors, self._layout):  # the copies read raw bytes: checked here, not midway
            if not t.is_contiguous():
                raise RuntimeError(f"snapshot: state tensor {name} of shape {tuple(t.shape)} is not contiguous")
        meta = codec.dumps({"step": step, "rank": self.rank, "host": host, "optimizer": _hyperparameters(optimizer),
                            "layout": self._layout})
        tensor_bytes = sum(_nbytes(t) for t in tensors)
        payload = tensor_bytes + len(meta)
        chunk = 8 * max(1, math.ceil(payload / (self.layout.data * 8)))  # int64 words for the bitwise codes
        need = chunk * self.layout.data
        if self._staging is None or self._staging.numel() < need:
            self._staging = None  # the old buffer goes first: the new one is larger
            self._staging = torch.empty(need, dtype=torch.uint8)  # pageable: pinned memory goes through _copier
        staging = self._staging[:need]
        staging[tensor_bytes:payload].copy_(torch.frombuffer(bytearray(meta), dtype=torch.uint8))
        staging[payload:].zero_()
        if self._copier is not None:
            self._copier.after_compute()  # the side stream's copies come after what the step computed
        return step, staging, tensors, payload, tensor_bytes, chunk, meta

    def _go_ahead(self, step: int, problem: str | None, moved: int = 0) -> bool:
        """Collective over the default group (never used by the background thread, so never out of step with
        it): rebuild the snapshot groups if any rank's failed, and start this snapshot only if every rank
        prepared its own, with the timeout of the most bytes any rank moves (``moved``: this rank's)."""
        flags = torch.tensor([int(self._groups_broken), int(problem is not None), moved], dtype=torch.int64)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        regroup, skip, most = bool(flags[0]), bool(flags[1]), int(flags[2])
        if regroup:
            self._group_failures += 1
            if not self._regroup():
                return False
        else:
            self._group_failures = 0
        if skip:
            self._failures.append(f"snapshot of step {step} skipped on rank {self.rank}: "
                                  f"{problem or 'another rank could not prepare its snapshot'}")
            return False
        self._use_timeout(snapshot_timeout_s(self.timeout_s, most, self.min_gbps))
        return True

    def _regroup(self) -> bool:
        """Every rank at once: destroy the snapshot groups and create them again, or turn snapshots off (after
        ``MAX_GROUP_FAILURES`` failed snapshots in a row, or if the rebuild fails on any rank)."""
        if self._group_failures >= MAX_GROUP_FAILURES:
            self._turn_off(f"their process groups failed at {self._group_failures} snapshots in a row", None)
            return False
        problem = None
        try:
            self._destroy_groups()
        except Exception as e:  # noqa: BLE001 - still create the new ones: every rank must call new_group alike
            problem = f"destroying the old groups: {type(e).__name__}: {e}"
        try:
            self._make_groups()
        except Exception as e:  # noqa: BLE001 - decided below, on every rank
            problem = problem or f"{type(e).__name__}: {e}"
        flag = torch.tensor([0 if problem is None else 1], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
            self._turn_off("rebuilding their process groups failed", problem)
            return False
        self._groups_broken = False
        if self.rank == 0:
            say(f"faulttol: rebuilt the snapshot process groups after a failed collective ({self._group_failures} "
                f"failure(s) in a row; snapshots go off at {MAX_GROUP_FAILURES})")
        return True

    def _turn_off(self, why: str, problem: str | None) -> None:
        """Snapshots off for the rest of the run, on every rank (the callers decided it together): rank 0 says
        why in one line, and a rank whose own rebuild failed says how."""
        self.broken = True
        try:
            self._destroy_groups()
        except Exception:  # noqa: BLE001 - off anyway; the groups are never used again
            pass
        if self.rank == 0 or problem is not None:
            say(f"faulttol: WARNING: in-memory snapshots are off for the rest of this run (rank {self.rank}): "
                f"{why}" + (f" ({problem})" if problem else ""))

    def _copy_into(self, staging: torch.Tensor, tensors: list[torch.Tensor]) -> None:
        if self._copier is not None:
            self._copier.copy(staging, tensors)
            return
        offset = 0
        for t in tensors:
            n = _nbytes(t)
            staging[offset:offset + n].copy_(_as_bytes(t))
            offset += n

    def before_update(self) -> None:
        """Call before the optimizer changes parameters: the snapshot's copy must have read them (on CUDA
        too: the background thread sets ``_copied`` only after the device finished every copy)."""
        t0 = time.perf_counter()
        self._copied.wait()
        self.wait_s += time.perf_counter() - t0

    def poll(self) -> list[str]:
        """Failed snapshots since the last call, one line each (the caller warns and counts)."""
        out, self._failures = self._failures, []
        return out

    def wait(self) -> None:
        """Block until the running snapshot is committed or has failed (see ``poll``)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _agree(self, ok: bool) -> bool:
        """Collective: did every rank get this far?"""
        flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.world_group)
        return bool(flag.item())

    @traffic.counted_as("snapshot")
    def _run(self, step, staging, tensors, payload, tensor_bytes, chunk, meta) -> None:
        """Local phases separated by agreements, so every rank reaches every collective in the same order
        whatever failed where: copy, encode | agree | sizes and source CRCs over the stripe, reserve segments
        in the SMP | agree | exchange and verify | agree | commit | agree | seal.

        With replicas as the redundancy the stripe exchanges only the small host states (each copy holds all
        of them) and checks that the states are the same bytes; nothing else is sent.

        A rank whose SMP is dead or full never leaves its peers waiting in the exchange, and an epoch is
        sealed (counts as complete in every SMP) only once every rank committed it. A failure skips this
        snapshot only: this rank closes the mappings it opened for it and its SMP drops the uncommitted
        segments. A collective that itself fails (a timeout, a dead peer) marks the snapshot groups for a
        rebuild at the next ``start``; mappings a failed transfer may still write into stay open until then.
        """
        t0 = time.perf_counter()
        failure, views, segments, entries, chunks = None, {}, [], None, None
        reserving = False
        self._unsettled = False  # set by _exchange: a transfer into the segments may still be running

        def local(what, fn):
            nonlocal failure
            if failure is None:
                try:
                    return fn()
                except Exception as e:  # noqa: BLE001 - reported by poll(); training goes on
                    failure = f"{what}: {e}" if isinstance(e, SMPError) else f"{what}: {type(e).__name__}: {e}"
            return None

        def agreed(what) -> bool:
            nonlocal failure
            if self._agree(failure is None):
                return True
            failure = failure or f"another rank could not {what}"
            return False

        try:
            try:
                local("copy", lambda: (self._copy_into(staging, tensors), self._fault("copy", step)))
            finally:
                self._copied.set()
            chunks = local("encode", lambda: self._encode(staging, chunk))
            if agreed("copy and encode its payload"):
                sources = self._gather_replicas(staging, tensor_bytes, meta) if self.layout.by_replicas else \
                    self._gather_sources(chunks, chunk, payload, tensor_bytes)
                reserving = True
                entries = local("reserve", lambda: self._reserve(step, sources, views, segments))
                if agreed("reserve its segments") and \
                        local("exchange", lambda: self._exchange(step, chunks, views, entries)) is None and \
                        agreed("exchange its chunks"):
                    local("commit", lambda: (self.client.commit(step, str(self.rank), entries),
                                             self._fault("commit", step)))
                    if agreed("commit"):
                        local("seal", lambda: self.client.seal(step))
                        if failure is None:
                            self.committed.append(step)
        except BaseException as e:  # a collective failed (timeout, a dead peer): the groups are out of step
            failed = f"a snapshot collective failed: {type(e).__name__}: {e}"
            failure = f"{failure}; then {failed}" if failure else failed
            self._groups_broken = True
        finally:
            views.clear()
            entries = chunks = None
            if self._unsettled:  # never unmap under a transfer: closed once its groups are destroyed
                self._quarantine.extend(segments)
            else:
                self._unmap(segments)
            if failure is not None and reserving:
                self._drop_uncommitted()
        self.last_seconds = time.perf_counter() - t0
        if failure is not None:
            if self._groups_broken:
                failure += "; the snapshot process groups are rebuilt at the next snapshot"
            self._failures.append(f"snapshot of step {step} skipped on rank {self.rank}: {failure}")

    def _unmap(self, segments: list[Attached]) -> None:
        for shm in segments:
            try:
                shm.close()
            except BufferError:  # a view of it is still alive somewhere: closed with the quarantine instead
                self._quarantine.append(shm)
        segments.clear()

    def _drop_uncommitted(self) -> None:
        """After a failed snapshot: this node's SMP unlinks the segments reserved and not committed (this
        rank's and, on a node of several ranks, its neighbours', which failed the same snapshot: the failure
        was agreed), so they are never handed out again while a mapping or a late transfer still holds them.
        Only an SMP that serves this generation is asked: a stale trainer must not free a newer one's."""
        try:
            info = self.client._call(op="ping")
            if (info.get("run"), info.get("attempt")) == (self.run, self.attempt):
                self.client._call(op="free_uncommitted", run=self.run, attempt=self.attempt)
        except (SMPError, KeyError, TypeError):  # a dead SMP holds nothing; a restarted one adopts committed ones
            pass

    def _smp_up(self) -> None:
        """Make sure this rank's SMP serves this generation: the node's first rank restarts a dead one (it
        adopts its predecessor's committed epochs); every rank registers again with one that lost them."""
        if self.rank == self.layout.node_ranks(self.layout.node_of(self.rank))[0] and not self.client.alive():
            ensure_daemon(self.smp_dir, self.node, self.idle_exit_s)
            say(f"faulttol: restarted the snapshot process of node {self.node}")
        info = self.client._call(op="ping")
        if (info["run"], info["attempt"]) != (self.run, self.attempt) or str(self.rank) not in info["ranks"]:
            self.client.register(self.rank)

    def _encode(self, staging, chunk) -> list[torch.Tensor]:
        if self.layout.by_replicas:
            return [staging]
        chunks = [staging[i * chunk:(i + 1) * chunk] for i in range(self.layout.data)]
        return chunks + (self.code.encode(chunks) if self.code is not None else [])

    def _gather_sources(self, chunks, chunk, payload, tensor_bytes) -> list[torch.Tensor]:
        """Collective over the stripe: what each member sends (sizes differ between ranks) and, computed at
        the source, the CRC of every chunk (a holder checks what it received, a restore what it rebuilt)."""
        n = self.layout.group_nodes
        mine = torch.tensor([chunk, payload, tensor_bytes] + [_crc(c) for c in chunks], dtype=torch.int64)
        if n == 1:
            return [mine]
        sources = [torch.zeros(3 + n, dtype=torch.int64) for _ in range(n)]
        dist.all_gather(sources, mine, group=self.stripe_group)
        return sources

    def _gather_replicas(self, staging, tensor_bytes, meta: bytes) -> list[torch.Tensor]:
        """Collective over the replicas: every replica's host state (each copy holds them all, so any copy
        serves any replica), and each copy's size and CRC (equal when the replicas' states are)."""
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in self.stripe]
        dist.all_gather(sizes, torch.tensor([len(meta)], dtype=torch.int64), group=self.stripe_group)
        longest = max(int(v) for v in sizes)
        padded = torch.zeros(longest, dtype=torch.uint8)
        padded[:len(meta)] = torch.frombuffer(bytearray(meta), dtype=torch.uint8)
        metas = [torch.zeros(longest, dtype=torch.uint8) for _ in self.stripe]
        dist.all_gather(metas, padded, group=self.stripe_group)
        self._replica_meta = b"{" + b",".join(b'"%d":' % src + m[:int(n)].numpy().tobytes()
                                              for src, m, n in zip(self.stripe, metas, sizes)) + b"}"
        payload = tensor_bytes + len(self._replica_meta)
        size = 8 * max(1, math.ceil(payload / 8))
        crc = zlib.crc32(bytes(size - payload), zlib.crc32(self._replica_meta, _crc(staging[:tensor_bytes])))
        rows = [torch.zeros(4, dtype=torch.int64) for _ in self.stripe]
        dist.all_gather(rows, torch.tensor([size, payload, tensor_bytes, crc], dtype=torch.int64),
                        group=self.stripe_group)
        return rows

    def _reserve(self, step, sources, views, segments) -> dict:
        """A segment in this node's SMP for every chunk this rank holds, mapped; the entries to commit."""
        self._smp_up()
        if self.layout.by_replicas:
            return self._reserve_copy(step, sources, views, segments)
        k, n = self.layout.data, self.layout.group_nodes
        entries = {}
        for i, src in enumerate(self.stripe):  # this rank holds chunk (me - i) mod n of member i
            j = (self.me - i) % n
            size, src_payload, src_tensor_bytes, *crcs = (int(v) for v in sources[i])
            name = self.client.alloc(f"r{src}c{j}", size, step)
            self._fault("request", step)
            shm = Attached(name)
            segments.append(shm)
            views[i] = torch.frombuffer(shm.buf, dtype=torch.uint8, count=size)
            entries[f"r{src}c{j}"] = {"name": name, "size": size, "src": src, "chunk": j, "step": step,
                                      "run": self.run, "attempt": self.attempt, "crc": crcs[j],
                                      "data_crcs": crcs[:k], "payload": src_payload,
                                      "tensor_bytes": src_tensor_bytes, "signature": self.signature}
        return entries

    def _reserve_copy(self, step, sources, views, segments) -> dict:
        """Replicas: one segment for this rank's copy, committed as every replica's chunk (the same bytes)."""
        if any(not torch.equal(row, sources[0]) for row in sources):
            raise RuntimeError(f"the data-parallel replicas {self.stripe} hold different states (size, payload, "
                               f"tensor bytes, CRC: {[row.tolist() for row in sources]}): their copies cannot stand in "
                               f"for each other; set faulttol.redundancy=erasure")
        size, payload, tensor_bytes, crc = (int(v) for v in sources[self.me])
        name = self.client.alloc(f"r{self.rank}", size, step)
        self._fault("request", step)
        shm = Attached(name)
        segments.append(shm)
        views[self.me] = torch.frombuffer(shm.buf, dtype=torch.uint8, count=size)
        n = self.layout.group_nodes
        return {f"r{src}c{(self.me - i) % n}": {
            "name": name, "size": size, "src": src, "chunk": (self.me - i) % n, "step": step, "run": self.run,
            "attempt": self.attempt, "crc": crc, "data_crcs": [crc], "payload": payload, "tensor_bytes": tensor_bytes,
            "signature": self.signature} for i, src in enumerate(self.stripe)}

    def _exchange(self, step, chunks, views, entries) -> None:
        """Send chunk j to the member j places on, receive into the reserved segments, verify each."""
        n = self.layout.group_nodes
        if self.layout.by_replicas:  # nothing travels: write this rank's copy with every replica's host state
            view, entry = views[self.me], next(iter(entries.values()))
            tensor_bytes, payload = entry["tensor_bytes"], entry["payload"]
            view[:tensor_bytes].copy_(chunks[0][:tensor_bytes])
            view[tensor_bytes:payload].copy_(torch.frombuffer(bytearray(self._replica_meta), dtype=torch.uint8))
            view[payload:].zero_()
            self._fault("exchange", step)
            if _crc(view) != entry["crc"]:
                raise RuntimeError("this rank's copy does not match its CRC after writing it")
            return
        views[self.me].copy_(chunks[0])
        ops = []
        for j in range(1, n):
            ops.append(dist.P2POp(dist.isend, chunks[j], self.stripe[(self.me + j) % n], self.stripe_group))
            ops.append(dist.P2POp(dist.irecv, views[(self.me - j) % n], self.stripe[(self.me - j) % n],
                                  self.stripe_group))
        # Every transfer into or out of the segments ends before they are unmapped, even when this rank failed
        # meanwhile (its peers posted theirs: they complete). One that fails, or may not have been posted, leaves
        # the stripe group out of step and its segments possibly still written: both wait for the rebuild.
        try:
            works = dist.batch_isend_irecv(ops) if ops else []
        except BaseException:
            self._unsettled = self._groups_broken = True
            raise
        finally:
            ops.clear()
        try:
            self._fault("exchange", step)
        finally:
            try:
                self._wait_works(works)
            except BaseException:
                self._unsettled = self._groups_broken = True
                raise
            finally:
                works.clear()
        for i, entry in zip(range(n), entries.values()):
            if _crc(views[i]) != entry["crc"]:
                raise RuntimeError(f"chunk {entry['chunk']} of rank {entry['src']} arrived corrupted "
                                   f"(CRC differs from the source's)")

    # ------------------------------------------------------------------ restoring
    def _inventory(self) -> list[dict]:
        """Committed entries of this run that this rank holds and whose bytes still match the source's CRC."""
        out = []
        try:
            epochs = self.client._call(op="latest")["epochs"]
        except SMPError:
            return out
        rpn = self.layout.ranks_per_node
        valid: dict[tuple, bool] = {}  # (segment, size, crc) -> checked (a replica's copy serves several entries)
        for ep in epochs:
            # What this node's SMP holds, whichever ranks wrote it: the host may have had other rank numbers
            # then. Each of its ranks reports the owners with its own place inside the node.
            mine = [entries for owner, entries in ep["owners"].items()
                    if owner.isdigit() and int(owner) % rpn == self.rank % rpn]
            for entry in (e for entries in mine for e in entries.values()):
                if entry.get("run") != self.run or entry.get("signature") != self.signature:
                    continue
                key = (entry["name"], entry["size"], entry["crc"])
                if key not in valid:
                    valid[key] = self._intact(entry)
                if valid[key]:
                    out.append(entry)
        return out

    @staticmethod
    def _intact(entry: dict) -> bool:
        try:
            shm = Attached(entry["name"])
        except (FileNotFoundError, SMPError):
            return False
        try:
            return checksum(shm.buf[:entry["size"]]) == entry["crc"]
        finally:
            shm.close()

    RECORD = ("size", "crc", "payload", "tensor_bytes")  # what a holder tells a chunk's owner, then data_crcs

    @traffic.counted_as("snapshot")
    def locate(self) -> tuple[Located | None, str]:
        """Collective: the newest epoch every rank can rebuild, or None and why not.

        Nothing per entry crosses the world: generations are tried newest first (one all-reduced number
        each), and for one generation a dense table of who holds chunk j of rank r (world x n int32,
        all-reduced with MIN) decides, the same on every rank. Then each holder tells only the owners it
        serves what it committed, point to point. So a rank sends O(world x n) 4-byte words per generation
        tried plus O(n) records, instead of receiving every rank's inventory.
        """
        if self.broken:  # decided on every rank alike: no rank enters the collectives below
            return None, "in-memory snapshots were turned off earlier in this run"
        inventory = self._inventory()
        world, n, k = self.layout.world, self.layout.group_nodes, self.layout.data
        held = {(int(e["attempt"]), int(e["step"])) for e in inventory}
        tried, bound = [], None
        while True:
            below = [g for g in held if bound is None or g < bound]
            newest = torch.tensor([max(below)[0] << 40 | max(below)[1] if below else -1], dtype=torch.int64)
            dist.all_reduce(newest, op=dist.ReduceOp.MAX, group=self.world_group)
            if int(newest) < 0:
                why = ("no snapshot of this run in memory" if not tried else
                       f"epochs {sorted(e for _, e in tried)} in memory, but none with {k} of {n} chunks for every "
                       f"rank (more nodes lost than the redundancy covers ({self.layout.parity}), or a torn snapshot)")
                return None, why
            generation = bound = (int(newest) >> 40, int(newest) & (1 << 40) - 1)
            tried.append(generation)
            table = torch.full((world, n), world, dtype=torch.int32)  # world = nobody holds it
            mine = {}
            for e in inventory:
                if (int(e["attempt"]), int(e["step"])) == generation and 0 <= e["src"] < world and 0 <= e["chunk"] < n:
                    # Any holder serves: after hosts were renumbered or replaced, chunks are not where
                    # layout.holder would put them now.
                    table[e["src"], e["chunk"]] = self.rank
                    mine[(e["src"], e["chunk"])] = e
            dist.all_reduce(table, op=dist.ReduceOp.MIN, group=self.world_group)
            chosen = choose_chunks(table, k)  # the same choice on every rank
            if chosen is not None:
                break
        needs = {int(j): int(table[self.rank, j]) for j in torch.nonzero(chosen[self.rank]).flatten()}
        serves = [(src, j, mine[(src, j)]) for (src, j) in sorted(mine)
                  if chosen[src, j] and int(table[src, j]) == self.rank]
        lost_home = ~chosen[:, 0] if self.layout.by_replicas else chosen[:, k:].any(dim=1)  # a copy or parity serves
        rebuilt = int(lost_home.sum())
        records = self._exchange_records(needs, serves)
        return Located(generation[1], generation[0], needs, records, serves, rebuilt), ""

    def _exchange_records(self, needs: dict[int, int], serves: list) -> dict[int, dict]:
        """Each holder sends the owners it serves what it committed for their chunks (point to point)."""
        fields = len(self.RECORD)
        received, sends = {}, []
        for src, j, entry in serves:
            row = torch.tensor([int(entry[f]) for f in self.RECORD] + [int(c) for c in entry["data_crcs"]],
                               dtype=torch.int64)
            if src == self.rank:
                received[j] = row
            else:
                sends.append((src, row))
        for j, holder in needs.items():
            if holder != self.rank:
                received[j] = torch.zeros(fields + self.layout.data, dtype=torch.int64)
        self._send_home(sends, [(holder, received[j]) for j, holder in needs.items() if holder != self.rank])
        return {j: dict(zip(self.RECORD, map(int, row[:fields])), data_crcs=[int(c) for c in row[fields:]])
                for j, row in received.items()}

    def _send_home(self, sends: list[tuple[int, torch.Tensor]], receives: list[tuple[int, torch.Tensor]]) -> None:
        """Post every (peer, tensor) send and receive at once over the world group, and wait for them: after a
        renumbering or a replaced host, a chunk's holder need not be in its owner's stripe."""
        ops = [dist.P2POp(dist.isend, t, peer, self.world_group) for peer, t in sends] + \
            [dist.P2POp(dist.irecv, t, peer, self.world_group) for peer, t in receives]
        try:
            self._wait_works(dist.batch_isend_irecv(ops) if ops else [])
        finally:
            ops.clear()  # they hold views into shared-memory segments the caller unmaps

    @traffic.counted_as("snapshot")
    def restore(self, located: Located, model, optimizer, extra: dict | None = None) -> Restored:
        """Collective: bring every rank's payload of ``located.epoch`` home, verify it, and load it in place.

        Every chunk is checked against its source CRC on arrival and the rebuilt payload against the
        source's data-chunk CRCs; the state is touched only once every rank has verified its payload,
        so a failure (``RestoreFailed`` on every rank) leaves a fresh model for the disk fallback. Its timeout
        grows with the most bytes any rank sends and receives (``snapshot_timeout_s``), like a snapshot's.
        """
        t0 = time.perf_counter()
        moved = sum(int(e["size"]) for src, _, e in located.serves if src != self.rank) + \
            sum(int(located.records[j]["size"]) for j, holder in located.needs.items() if holder != self.rank)
        most = torch.tensor([moved], dtype=torch.int64)
        dist.all_reduce(most, op=dist.ReduceOp.MAX, group=self.world_group)
        self._use_timeout(snapshot_timeout_s(self.timeout_s, int(most), self.min_gbps))
        k = self.layout.data
        problem, meta, data, d, segments = None, None, None, None, []
        try:
            received = self._gather_chunks(located, segments)
            self._fault("restore", located.epoch)
            bad = [j for j, t in received.items() if _crc(t) != located.records[j]["crc"]]
            if bad:
                raise RuntimeError(f"chunks {bad} arrived corrupted")
            entry = located.records[next(iter(located.needs))]
            if self.layout.by_replicas:  # any copy is the whole payload
                data = [next(iter(received.values()))]
            else:
                data = [received[j] for j in range(k)] if all(j in received for j in range(k)) \
                    else self.code.decode(received)
            # A data chunk that arrived as itself was checked above (its CRC is the source's data CRC): only
            # rebuilt ones are hashed again, and every one is compared with the owner's record.
            for i, d in enumerate(data):
                verified = located.records[i]["crc"] if d is received.get(i) else _crc(d)
                if verified != entry["data_crcs"][i]:
                    raise RuntimeError("the rebuilt payload does not match the source's CRCs")
            meta = codec.loads(_read_range(data, entry["tensor_bytes"], entry["payload"]))
            if self.layout.by_replicas:
                meta = meta[str(self.rank)]
            if meta["step"] != located.epoch or meta["rank"] != self.rank:
                raise RuntimeError(f"payload is step {meta['step']} of rank {meta['rank']}, expected step "
                                   f"{located.epoch} of rank {self.rank}")
            tensors, layout = flatten_state(model, optimizer, extra)  # also creates a fresh optimizer's state
            if layout != meta["layout"]:
                diff = next(((a, b) for a, b in zip(layout, meta["layout"]) if a != b),
                            (f"{len(layout)} tensors", f"{len(meta['layout'])} tensors"))
                raise RuntimeError(f"the model/optimizer state no longer has the snapshot's layout "
                                   f"(now {diff[0]}, snapshot {diff[1]})")
        except Exception as e:  # noqa: BLE001 - any failure here must reach the agreement, not hang peers
            problem = f"{type(e).__name__}: {e}"
        try:
            if not self._agree(problem is None):
                raise RestoreFailed(f"rank {self.rank}: {problem}" if problem else
                                    "another rank could not verify its part")
            _copy_from_chunks(tensors, data)  # straight from the chunks (some still in shared memory)
        finally:
            received = data = d = None  # every view into a segment, before it is unmapped
            for shm in segments:
                shm.close()
        _set_hyperparameters(optimizer, meta["optimizer"])
        return Restored(located.epoch, meta["host"], time.perf_counter() - t0, located.rebuilt)

    def _gather_chunks(self, located: Located, segments: list) -> dict[int, torch.Tensor]:
        """Send the chunks this rank holds to their owners; receive the k this rank needs. A chunk this rank
        holds for itself is a view into its segment, which stays mapped (in ``segments``) until the caller
        closes it."""
        received, sends = {}, []
        try:
            for src, j, entry in located.serves:
                shm = Attached(entry["name"])
                segments.append(shm)
                view = torch.frombuffer(shm.buf, dtype=torch.uint8, count=entry["size"])
                if src == self.rank:
                    received[j] = view
                else:
                    sends.append((src, view))
            for j, holder in located.needs.items():
                if holder != self.rank:
                    received[j] = torch.empty(located.records[j]["size"], dtype=torch.uint8)
            self._send_home(sends, [(holder, received[j]) for j, holder in located.needs.items()
                                    if holder != self.rank])
        finally:
            sends.clear()  # views into the segments: dropped before the caller unmaps them
        return received


def _read_range(chunks: list[torch.Tensor], start: int, end: int) -> bytes:
    """Bytes ``start:end`` of the payload the chunks hold one after another."""
    out, offset = [], 0
    for c in chunks:
        lo, hi = max(start, offset), min(end, offset + c.numel())
        if lo < hi:
            out.append(c[lo - offset:hi - offset].numpy().tobytes())
        offset += c.numel()
    return b"".join(out)


def _copy_from_chunks(tensors: list[torch.Tensor], chunks: list[torch.Tensor]) -> None:
    """Load the payload's leading tensor bytes into ``tensors`` in place, one pass over the chunks (no
    concatenated copy of the payload first)."""
    ci, co = 0, 0  # chunk index, offset in it
    for t in tensors:
        dst, done, n = _as_bytes(t), 0, _nbytes(t)
        while done < n:
            while co == chunks[ci].numel():
                ci, co = ci + 1, 0
            take = min(n - done, chunks[ci].numel() - co)
            dst[done:done + take].copy_(chunks[ci][co:co + take])
            done, co = done + take, co + take


class RestoreFailed(RuntimeError):
    """Restoring from memory failed on some rank; every rank raises it, and nothing was loaded."""
