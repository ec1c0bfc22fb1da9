"""Activation offload: what a block saves for backward waits in host memory between its forward and backward.

A pair of saved-tensor hooks (``torch.autograd.graph.saved_tensors_hooks``, the mechanism of torch's
``save_on_cpu``) wraps each block's forward: every activation autograd saves there is copied to a host buffer
(pack) and the device copy is dropped once nothing else holds it; backward copies it back (unpack). Parameters
are never copied (they stay resident anyway), nor tensors below ``min_bytes`` (on CUDA 1 MiB by default).

How the copies run is chosen at run time from the saved tensor's device (:func:`copies_for`):

- CUDA (:class:`StreamCopies`): pinned host buffers, copies on a side stream so they overlap the compute on the
  current one. A tensor is copied out after the kernel that made it (the side stream waits for the current
  one) and recorded on the side stream, so its memory is not reused before the copy has read it. The first
  unpack of a block's tensors brings the whole block back on the side stream and starts bringing back the
  block before it (its backward comes next), so the copy of one block overlaps the backward of another; the
  current stream waits for a tensor's copy only when backward takes it.
- anything else (:class:`SyncCopies`, CPU): the same hooks and bookkeeping, plain synchronous copies into host
  buffers that come back as they are.

Saved tensors are copied when saved, as ``save_on_cpu`` does: an in-place change after that is not seen (nor
reported, as autograd reports it for tensors it holds itself).
"""
from __future__ import annotations

import contextlib
import weakref

import torch
from torch import nn


CUDA_MIN_BYTES = 2 ** 20


class SyncCopies:
    """Copies in program order (CPU, or any device without streams): a host buffer out, the device tensor back."""

    pinned = False

    def to_host(self, t: torch.Tensor):
        """(host copy, readiness token) of ``t``."""
        buf = torch.empty(t.shape, dtype=t.dtype, device="cpu")
        buf.copy_(t)
        return buf, None

    def to_device(self, buf: torch.Tensor, ready, device: torch.device):
        """Start bringing ``buf`` back: (tensor, readiness token)."""
        return buf.to(device), None

    def use(self, t: torch.Tensor, ready) -> torch.Tensor:
        """``t`` made safe to read on the current stream."""
        return t


class CudaStreams:
    """The stream calls :class:`StreamCopies` makes (tests stand in a recorder that runs them on CPU)."""

    Stream = torch.cuda.Stream

    @staticmethod
    def current_stream(device):
        return torch.cuda.current_stream(device)

    @staticmethod
    def stream(s):
        return torch.cuda.stream(s)

    @staticmethod
    def record(t: torch.Tensor, s) -> None:
        t.record_stream(s)

    @staticmethod
    def host_buffer(shape, dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device="cpu", pin_memory=True)  # the caching host allocator's


class StreamCopies:
    """CUDA: pinned buffers and a side stream (``streams``: :class:`CudaStreams`)."""

    pinned = True

    def __init__(self, device: torch.device, streams=None):
        self.streams = streams or CudaStreams()
        self.device = device
        self.side = self.streams.Stream(device=device)

    def to_host(self, t: torch.Tensor):
        self.side.wait_stream(self.streams.current_stream(self.device))  # the kernel that made ``t`` has run
        with self.streams.stream(self.side):
            buf = self.streams.host_buffer(t.shape, t.dtype)
            buf.copy_(t, non_blocking=True)
            done = self.side.record_event()
        self.streams.record(t, self.side)  # the allocator keeps ``t``'s memory until the side stream has read it
        return buf, done

    def to_device(self, buf: torch.Tensor, ready, device: torch.device):
        with self.streams.stream(self.side):
            if ready is not None:
                self.side.wait_event(ready)
            t = torch.empty(buf.shape, dtype=buf.dtype, device=device)
            t.copy_(buf, non_blocking=True)
            done = self.side.record_event()
        return t, done

    def use(self, t: torch.Tensor, ready) -> torch.Tensor:
        current = self.streams.current_stream(self.device)
        if ready is not None:
            current.wait_event(ready)  # this stream waits for the copy only now, when backward takes the tensor
        self.streams.record(t, current)  # allocated on the side stream, freed after its use on this one
        return t


def copies_for(device: torch.device):
    """The copy strategy for tensors on ``device`` (run time: a CUDA tensor gets streams and pinned memory)."""
    return StreamCopies(device) if device.type == "cuda" else SyncCopies()


class _Group:
    """One block forward's offloaded tensors: host copies, and device copies brought back ahead of use."""

    def __init__(self, previous: "_Group | None"):
        self.host: list = []  # (buf, ready, device, rebuild) per saved tensor
        self.back: dict[int, tuple] = {}  # index -> (device tensor, ready), brought back, not yet taken
        self.fetched = False
        self.previous = weakref.ref(previous) if previous is not None else None  # the block run before this one
        # The same memory saved twice in one block is copied once, while the tensor first copied is alive (once it is
        # freed, the allocator may hand its address to a new tensor of the same shape).
        self.keys: dict[tuple, tuple] = {}  # memory -> (index, weak reference to the tensor copied)


class Offloader:
    """Saved-tensor hooks that move activations to host memory per block (:meth:`block`), with counters that say
    what moved: ``packed`` / ``packed_bytes`` (copied out), ``shared`` (saved again in the same block: the copy
    already made serves), ``kept`` (not copied: parameters and small tensors), ``unpacked`` (handed back to
    backward), ``prefetched`` (brought back before backward asked)."""

    def __init__(self, min_bytes: int | None = None, copies=None):
        """``min_bytes``: smaller tensors stay where they are (None: :data:`CUDA_MIN_BYTES` on CUDA, where a copy's
        launch costs more than it saves, every tensor elsewhere); ``copies``: a fixed copy strategy (tests), else
        :func:`copies_for` the tensor's device."""
        self.min_bytes = min_bytes
        self._copies = {} if copies is None else None
        self._fixed = copies
        self._last = None  # a weak reference to the newest group (holding it would keep its host copies alive)
        self.packed = self.packed_bytes = self.kept = self.shared = self.unpacked = self.prefetched = 0

    def copies(self, device: torch.device):
        if self._fixed is not None:
            return self._fixed
        key = (device.type, device.index)
        if key not in self._copies:
            self._copies[key] = copies_for(device)
        return self._copies[key]

    @contextlib.contextmanager
    def block(self):
        """Offload what autograd saves inside: one group, brought back together in backward."""
        group = _Group(self._last() if self._last is not None else None)
        self._last = weakref.ref(group)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: self._pack(group, t),
                                                      lambda packed: self._unpack(packed)):
            yield

    # ---- hooks
    def _offloadable(self, t: torch.Tensor) -> bool:
        local = _local(t)
        if isinstance(t, nn.Parameter) or local.device.type == "meta":
            return False
        limit = self.min_bytes if self.min_bytes is not None else CUDA_MIN_BYTES if local.is_cuda else 0
        return local.numel() * local.element_size() >= limit

    def _pack(self, group: _Group, t: torch.Tensor):
        if not self._offloadable(t):
            self.kept += 1
            return t
        local, rebuild = _local(t), _rebuilder(t)
        key = _same_memory(local)
        index, alive = group.keys.get(key, (None, lambda: None))
        if alive() is not None:  # the tensor copied then still holds that memory: the same values
            self.shared += 1
            return group, index
        buf, ready = self.copies(local.device).to_host(local)
        group.host.append((buf, ready, local.device, rebuild))
        if key is not None:
            group.keys[key] = len(group.host) - 1, weakref.ref(local)
        self.packed += 1
        self.packed_bytes += local.numel() * local.element_size()
        return group, len(group.host) - 1

    def _unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        group, i = packed
        if not group.fetched:  # backward reached this block: bring it all back, and start on the block before
            self._fetch(group, skip=i)
            previous = group.previous() if group.previous is not None else None
            if previous is not None and not previous.fetched:
                self._fetch(previous)
                self.prefetched += len(previous.host)
        buf, ready, device, rebuild = group.host[i]
        copies = self.copies(device)
        t, done = group.back.pop(i, None) or copies.to_device(buf, ready, device)
        self.unpacked += 1
        return rebuild(copies.use(t, done))

    def _fetch(self, group: _Group, skip: int = -1) -> None:
        group.fetched = True
        for i, (buf, ready, device, _) in enumerate(group.host):
            if i != skip:
                group.back[i] = self.copies(device).to_device(buf, ready, device)


def _same_memory(t: torch.Tensor) -> tuple | None:
    """What identifies the values ``t`` holds (its memory, view and version); None for a tensor without storage of
    its own (a collective's result still in flight), which is then never taken for another."""
    try:
        ptr = t.untyped_storage().data_ptr()
    except RuntimeError:
        return None
    return ptr, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype, t._version


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (what is copied), else ``t``."""
    from torch.distributed.tensor import DTensor

    return t._local_tensor if isinstance(t, DTensor) else t


def _rebuilder(t: torch.Tensor):
    """How the local tensor becomes what was saved again (a DTensor with ``t``'s mesh, placements and shape)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(t, DTensor):
        return lambda local: local
    mesh, placements, shape, stride = t.device_mesh, t.placements, t.shape, t.stride()
    return lambda local: DTensor.from_local(local, mesh, placements, run_check=False, shape=shape, stride=stride)
