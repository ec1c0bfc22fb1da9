"""Bytes each rank sends, per purpose, counted where torch.distributed is called (the transport).

Every collective and point-to-point call goes through one of two Python layers: ``torch.distributed``'s
c10d functions (FSDP2, pipelining, context parallelism, the data-parallel syncs, snapshots) and the
functional collectives DTensor uses (tensor parallelism). :func:`install` wraps both once per process;
each call adds the bytes *this rank puts on the wire* to the purpose its process group was labelled
with (:func:`label`; unlabelled groups count as ``other``), or to the purpose a :func:`counted_as` block
names on this thread (a group can serve two purposes: a mesh dimension that spans the world *is* the
world group, which also carries the trainer's small control collectives). A call made inside another
counted call (``all_gather_into_tensor`` is ``all_gather_single`` underneath) is not counted twice; the
``*_object`` helpers are counted through the tensor collectives they make.

Bytes per call, n ranks in the group, S the bytes of the tensor named (the bandwidth-optimal ring
algorithms, the same accounting as NCCL's bus bandwidth):

- ``all_reduce``: 2(n-1)/n * S (reduce-scatter, then all-gather);
- ``all_gather``: (n-1) * S_in; ``reduce_scatter``: (n-1)/n * S_in; ``all_to_all``: (n-1)/n * S_in;
- ``broadcast``, ``scatter``: the source sends (n-1) * S (gloo's one-to-all), the others nothing;
  ``gather``: every rank but the destination sends S; ``reduce``: (n-1)/n * S;
- ``send``/``isend``: S; receives: nothing.

Counts are this process's since it started (a resumed run starts again from zero).

What a quantized exchange sends is whatever tensors it hands to these calls (payload and scales), so
compression shows up as it really is. Collectives inside ``torch.compile``d regions are counted when
traced, not when run (``parallel.compile: true`` with tp: ``bytes_tp`` undercounts). Functional
collectives' coalesced variants and DTensor's mesh_broadcast/mesh_scatter (set-up, not training) are not
wrapped.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import threading
import time
from collections import Counter

import torch
import torch.distributed as dist

PURPOSES = ("dp_sync", "fsdp", "tp", "cp", "pp", "snapshot", "checkpoint", "other")

_lock = threading.Lock()
_depth = threading.local()  # per thread: nesting depth of counted calls, counted_as purpose
_labels: dict[str, str] = {}  # process group name -> purpose
_bytes: Counter = Counter()
_messages: Counter = Counter()
_installed = False
_blocked = [0.0]  # seconds the main thread spent blocked in collectives (faulttol/health.py)
_MAIN = threading.main_thread().ident
_wait_hook = [None]  # called with True/False around the main thread's blocking waits (faulttol/heartbeat.py)
_device_marker = [None]  # records a device event on the current stream (faulttol/health.py's CUDA timer)
_device_waits: list = []  # (event before, event after) of each of the main thread's waits while a marker is set


def label(group, purpose: str) -> None:
    """Count ``group``'s traffic (a ProcessGroup, or a 1-D DeviceMesh) as ``purpose``."""
    if purpose not in PURPOSES:
        raise ValueError(f"traffic: purpose must be one of {', '.join(PURPOSES)}, got {purpose!r}")
    if hasattr(group, "get_group"):
        group = group.get_group()
    _labels[group.group_name] = purpose


@contextlib.contextmanager
def counted_as(purpose: str):
    """Count this thread's calls inside the block as ``purpose``, whatever their group."""
    if purpose not in PURPOSES:
        raise ValueError(f"traffic: purpose must be one of {', '.join(PURPOSES)}, got {purpose!r}")
    previous = getattr(_depth, "purpose", None)
    _depth.purpose = purpose
    try:
        yield
    finally:
        _depth.purpose = previous


def counts() -> dict[str, int]:
    """Bytes this rank has sent so far, per purpose (every purpose present, zeros included)."""
    with _lock:
        return {p: int(_bytes[p]) for p in PURPOSES}


def messages() -> dict[str, int]:
    with _lock:
        return {p: int(_messages[p]) for p in PURPOSES}


def blocked_seconds() -> float:
    """Seconds the main thread has spent blocked in collectives: blocking calls, ``Work.wait`` and the
    functional collectives' ``wait_tensor`` (what the others' slowness costs this rank)."""
    return _blocked[0]


def set_wait_hook(hook) -> None:
    """``hook(True)`` when the main thread starts blocking on a collective, ``hook(False)`` when it returns
    (the heartbeat the hang monitor reads: a rank that waits is not the one that hangs). None: off."""
    _wait_hook[0] = hook


def set_device_marker(mark) -> None:
    """``mark()`` records an event on the current stream and returns it, or None where it cannot serve (None:
    off). While set, each of the main thread's waits is also bracketed by two events: on CUDA a wait returns
    to the host before the device has waited, so only the device time between them says how long the rank
    was blocked."""
    _device_marker[0] = mark


def take_device_waits() -> list:
    """The (before, after) events of the waits bracketed since the last call."""
    out = _device_waits[:]
    _device_waits.clear()
    return out


def _waited(fn, args, kwargs):
    """Call ``fn``, adding the time to the main thread's blocked seconds and telling the wait hook."""
    hook, mark = _wait_hook[0], _device_marker[0]
    if hook is not None:
        hook(True)
    before = mark() if mark is not None else None
    t0 = time.perf_counter()
    try:
        return fn(*args, **kwargs)
    finally:
        _blocked[0] += time.perf_counter() - t0
        after = mark() if before is not None else None
        if after is not None:
            _device_waits.append((before, after))
        if hook is not None:
            hook(False)


def _timed(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if threading.get_ident() != _MAIN or getattr(_depth, "n", 0):  # inside a timed call: counted there
            return fn(*args, **kwargs)
        return _waited(fn, args, kwargs)

    wrapper.__loomtrain_counted__ = True
    return wrapper


def reset() -> None:
    with _lock:
        _bytes.clear()
        _messages.clear()


def _nbytes(t) -> int:
    if isinstance(t, (list, tuple)):
        return sum(_nbytes(x) for x in t)
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _c10d_group(group):
    return group if group is not None else dist.group.WORLD


def _funcol_group(group, tag=""):
    from torch.distributed import _functional_collectives as funcol
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(funcol._resolve_group_name(group, tag))


def _add(group, nbytes: float) -> None:
    purpose = getattr(_depth, "purpose", None) or _labels.get(group.group_name, "other")
    with _lock:
        _bytes[purpose] += int(nbytes)
        _messages[purpose] += 1


# formula -> bytes one rank sends, from S (the named tensor's bytes) and n (ranks in the group)
_RING = {
    "all_reduce": lambda s, n: 2 * (n - 1) * s / n,
    "all_gather": lambda s, n: (n - 1) * s,
    "reduce_scatter": lambda s, n: (n - 1) * s / n,
    "all_to_all": lambda s, n: (n - 1) * s / n,
    "send": lambda s, n: s,
}


C10D = {  # function: (tensor argument, formula)
    "all_reduce": ("tensor", "all_reduce"), "all_reduce_coalesced": ("tensors", "all_reduce"),
    "all_gather": ("tensor", "all_gather"), "all_gather_into_tensor": ("input_tensor", "all_gather"),
    "all_gather_single": ("input_tensor", "all_gather"), "all_gather_coalesced": ("input_tensor_list", "all_gather"),
    "reduce_scatter": ("output", "all_gather"),  # (n-1) * S_out = (n-1)/n * S_in
    "reduce_scatter_tensor": ("input", "reduce_scatter"), "reduce_scatter_single": ("input", "reduce_scatter"),
    "all_to_all_single": ("input", "all_to_all"), "all_to_all": ("input_tensor_list", "all_to_all"),
    "send": ("tensor", "send"), "isend": ("tensor", "send"), "broadcast": ("tensor", "broadcast"),
    "scatter": ("tensor", "broadcast"), "gather": ("tensor", "gather"), "reduce": ("tensor", "reduce_scatter"),
}
FUNCOL = {
    "all_reduce": ("self", "all_reduce"), "all_reduce_coalesced": ("self", "all_reduce"),
    "all_gather_single": ("self", "all_gather"), "all_gather_tensor": ("self", "all_gather"),
    "all_gather_single_autograd": ("self", "all_gather"), "all_gather_tensor_autograd": ("self", "all_gather"),
    "reduce_scatter_single": ("self", "reduce_scatter"), "reduce_scatter_tensor": ("self", "reduce_scatter"),
    "reduce_scatter_single_autograd": ("self", "reduce_scatter"),
    "reduce_scatter_tensor_autograd": ("self", "reduce_scatter"),
    "all_to_all_single": ("self", "all_to_all"), "all_to_all_single_autograd": ("self", "all_to_all"),
    "broadcast": ("self", "broadcast"),
}


def _is_root(a: dict, key: str, group, functional: bool) -> bool:
    """This rank is the call's source/destination (functional collectives name it by group rank)."""
    if functional:
        return a.get(key) == dist.get_rank(group)
    if a.get(f"group_{key}") is not None:
        return a[f"group_{key}"] == dist.get_rank(group)
    return a.get(key, 0) == dist.get_rank()


def _counted(fn, tensor_arg: str, formula: str, functional: bool, may_block: bool = False):
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        outermost = getattr(_depth, "n", 0) == 0
        blocking = False
        if outermost:
            try:
                bound = signature.bind(*args, **kwargs)
                a = bound.arguments
                blocking = may_block and not a.get("async_op", False) and threading.get_ident() == _MAIN
                group = _funcol_group(a.get("group"), a.get("tag", "")) if functional else \
                    _c10d_group(a.get("group"))
                n, s = group.size(), _nbytes(a.get(tensor_arg))
                if formula in ("broadcast", "gather"):
                    key = "src" if formula == "broadcast" else "dst"
                    root = _is_root(a, key, group, functional)
                    sent = ((n - 1) * s if root else 0) if formula == "broadcast" else (0 if root else s)
                else:
                    sent = _RING[formula](s, n)
                _add(group, sent)
            except Exception:  # noqa: BLE001 - accounting must never break a collective; torch raises its own
                pass
        _depth.n = getattr(_depth, "n", 0) + 1
        try:
            return _waited(fn, args, kwargs) if blocking else fn(*args, **kwargs)
        finally:
            _depth.n -= 1

    wrapper.__loomtrain_counted__ = True
    return wrapper


def install() -> None:
    """Wrap torch.distributed's c10d and functional collectives, and time the main thread's waits on them
    (idempotent; per process)."""
    global _installed
    if _installed:
        return
    from torch.distributed import _functional_collectives as funcol
    from torch.distributed import distributed_c10d as c10d

    for name, (arg, formula) in C10D.items():
        fn = getattr(c10d, name, None)
        if fn is None or getattr(fn, "__loomtrain_counted__", False):
            continue
        wrapped = _counted(fn, arg, formula, functional=False, may_block=name != "isend")
        setattr(c10d, name, wrapped)  # calls inside c10d (batch_isend_irecv's op.op, *_object helpers)
        if getattr(dist, name, None) is fn:
            setattr(dist, name, wrapped)  # calls through the public namespace (FSDP2, pipelining, ours)
    for name, (arg, formula) in FUNCOL.items():
        fn = getattr(funcol, name, None)
        if fn is not None and not getattr(fn, "__loomtrain_counted__", False):
            setattr(funcol, name, _counted(fn, arg, formula, functional=True))
    if not getattr(dist.Work.wait, "__loomtrain_counted__", False):
        dist.Work.wait = _timed(dist.Work.wait)  # FSDP2 and pipelining wait on async works from Python
    if not getattr(funcol.wait_tensor, "__loomtrain_counted__", False):
        funcol.wait_tensor = _timed(funcol.wait_tensor)  # DTensor's (tensor parallelism's) waits
    _installed = True
