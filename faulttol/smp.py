"""Snapshot management process (SMP): owns the shared-memory snapshot segments of a node.

The SMP is its own process (started by the launcher in its own session, not as a child
of a trainer), so a trainer killed with SIGKILL loses nothing: the SMP created every
segment and only the SMP unlinks them. Trainers talk to it over a Unix socket with
one JSON object per line, each carrying the run's secret:

- ``register {rank, pid, run, attempt, chain}``: a trainer of generation (run, attempt) lives on this
  node. A new run drops every epoch of the previous one (they can never serve it); a new
  attempt drops the torn leftovers of the last; an older attempt is refused (a fence). ``chain``
  names the launch the trainer belongs to (its launcher), remembered for the run: only a restart
  by a launcher the SMP has seen serve this run is a restart (``ping {chain}`` answers ``chain_known``);
- ``alloc {key, size, epoch, run, attempt}``: a segment for chunk ``key`` of a snapshot, of at least ``size``
  bytes (``segment_capacity``: 1/64 more, rounded up to a page, as chunk sizes drift by a few bytes
  between snapshots; entries record the logical ``size``, readers use that). Space is reserved for real
  (``posix_fallocate``: tmpfs allocates lazily, so an unreserved segment can kill its writer with
  SIGBUS), and segments are reused: once two complete epochs are held, the oldest one's segments
  serve the next snapshot, the closest fit first, one slightly too small grown in place (peak: two
  epochs, not three);
- ``commit {epoch, owner, entries, run, attempt}``: the owner's (a rank's) segments of that epoch
  are complete. Only committed entries are served; the two newest complete epochs, ordered by
  (attempt, epoch), are kept; a commit older than both is refused, not silently dropped;
  re-committing an epoch frees the segments it replaces;
- ``latest``: committed epochs, newest first (not fenced: a restarted trainer reads its predecessors'
  epochs; it changes nothing); ``free_uncommitted {run, attempt}``: drop a torn snapshot's leftovers;
  ``ping``: pid, prefix, generation, ranks; ``shutdown {run, attempt}``: unlink everything and exit.
  Both are fenced like ``alloc`` (a stale trainer cannot free or stop what a newer attempt uses),
  unless sent with ``operator: true`` by the launcher or the job's cleanup (``stop_daemons``).

Each connection is served by a thread of its own with a timeout: a client that dies, stalls
or sends garbage costs its own request only. The committed index is kept in a file next to
the socket, so an SMP restarted after SIGKILL adopts its predecessor's segments; SIGTERM
(scancel, a time limit) unlinks every segment before exiting; so does the death of the process it was
told to watch (``--watch-pid``: the launcher, which SIGKILL or a hangup can end without its cleanup).
SIGHUP is ignored: the SMP runs in a session of its own, so no terminal's hangup is meant for it, and
the snapshots it holds are there to outlive the processes that die. The socket lives in a directory
of mode 0700 owned by the user, and the SMP checks each peer's uid.

Another user can create files in /dev/shm and /tmp. A job's directory in /tmp is named by a key only the job's
user can read (``job_directory``), so nobody else can create it first; segment names start
with a prefix derived from the directory's secret (``segment_prefix``), are created with O_EXCL, and
every cleanup touches only regular files of this uid, skipping (with one warning line) what it cannot
remove: a planted file never stops an SMP, its sweep, or a job's cleanup.

Clients map segments by name (plain mmap), never through Python's resource tracker, which
would unlink a segment when it believes the attaching process died. The daemon imports no
torch, so it starts in a fraction of a second.
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import hmac
import json
import mmap
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zlib

from loomtrain.fsutil import atomic_write_text
from loomtrain.log import say

KEEP_EPOCHS = 2
MAX_CHAINS = 64  # launches of one run remembered per node (each restart by a new agent adds one)
SHM_DIR_ENV = "LOOMTRAIN_SHM_DIR"  # where segments live: /dev/shm unless a test mounts a small tmpfs
REQUEST_TIMEOUT_S = 30.0  # a client that sends nothing for this long loses its connection
CLIENT_TIMEOUT_S = 120.0  # a client waits this long for a reply (alloc of GBs takes a moment)
MAX_REQUEST = 16 << 20
SEGMENT_NAME = re.compile(r"[A-Za-z0-9_-]{1,128}")
PAGE = 4096
HEADROOM = 64  # a segment holds 1/HEADROOM more than asked for: chunk sizes drift between snapshots
REUSE_SLACK = 8  # a pooled segment serves a request if no more than 1/REUSE_SLACK larger than it needs
WATCH_INTERVAL_S = 1.0
LAUNCHER_PID_ENV = "LOOMTRAIN_LAUNCHER_PID"  # set by the loomtrain launcher (launch/elastic.py) for its ranks


class SMPError(RuntimeError):
    """The SMP refused a request or could not be reached."""


def shm_dir() -> str:
    return os.environ.get(SHM_DIR_ENV, "/dev/shm")


def segment_path(name: str) -> str:
    """/dev/shm/<name> for a name the SMP handed out; anything else (a path, '..') is refused."""
    if not isinstance(name, str) or not SEGMENT_NAME.fullmatch(name):
        raise SMPError(f"snapshot: invalid segment name {name!r}")
    return os.path.join(shm_dir(), name)


class Attached:
    """A client's mapping of a daemon-owned segment: a plain mmap of /dev/shm/<name>.

    Deliberately not ``SharedMemory(name=...)``: on Python < 3.13 that registers the segment
    with the resource tracker, which unlinks it when the tracker thinks its user died.
    """

    def __init__(self, name: str):
        fd = os.open(segment_path(name), os.O_RDWR | os.O_NOFOLLOW)
        try:
            size = os.fstat(fd).st_size
            self._mmap = mmap.mmap(fd, size) if size else None
        finally:
            os.close(fd)
        self.buf = memoryview(self._mmap) if self._mmap is not None else memoryview(b"")

    def close(self) -> None:
        self.buf.release()
        if self._mmap is not None:
            self._mmap.close()


def checksum(buf) -> int:
    return zlib.crc32(buf)


def segment_capacity(size: int) -> int:
    """The bytes an SMP reserves for a chunk of ``size``: 1/HEADROOM more (a snapshot's size drifts by a few
    bytes between epochs: host state, padding), rounded up to a page (tmpfs reserves whole pages anyway)."""
    want = max(1, size) + max(1, size) // HEADROOM
    return -(-want // PAGE) * PAGE


def _warn(message: str) -> None:
    say(f"smp: {message}")


def _is_ours(st: os.stat_result, kind=stat.S_ISDIR) -> bool:
    return kind(st.st_mode) and st.st_uid == os.getuid()


def secure_directory(path: str) -> str:
    """Create ``path`` with mode 0700, or check that an existing one is ours and closed to others.

    An existing directory that is not (another user may create the predictable name of a job's directory
    in /tmp first) is refused, never used or repaired: its owner could read the secret or swap the socket.
    The error names the way out (a directory of one's own in ``LOOMTRAIN_SMP_DIR``)."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.lstat(path)
    if not _is_ours(st) or st.st_mode & 0o077:
        raise SMPError(f"snapshot: directory {path} must be a directory owned by uid {os.getuid()} with mode 0700 "
                       f"(it is uid {st.st_uid}, mode {oct(st.st_mode & 0o7777)}); remove it or choose another "
                       f"(LOOMTRAIN_SMP_DIR)")
    return path


def index_path(socket_file: str) -> str:
    """Where an SMP keeps its committed index (for a successor to adopt)."""
    return os.path.splitext(socket_file)[0] + ".index.json"


def secret_path(socket_file: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(socket_file)), "secret")


def load_secret(socket_file: str, create: bool = False) -> str:
    """The run's shared secret, kept in a 0600 file in the SMP directory (created once, atomically)."""
    path = secret_path(socket_file)
    if create and not os.path.exists(path):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
        except FileExistsError:  # another rank or daemon won the race
            pass
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd) as f:
        st = os.fstat(f.fileno())
        if st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise SMPError(f"snapshot: {path} must be owned by uid {os.getuid()} with mode 0600")
        return f.read().strip()


def _scan_segments(prefix: str) -> tuple[list[str], list[str]]:
    """The files in the shm directory named ``prefix-*``: (ours: regular files of this uid, the others, each
    with why it is not ours). Another user can create files there under any name it can guess."""
    d = shm_dir()
    try:
        names = sorted(f for f in os.listdir(d) if f.startswith(prefix + "-"))
    except OSError:
        return [], []
    ours, others = [], []
    for name in names:
        try:
            st = os.lstat(os.path.join(d, name))
        except FileNotFoundError:
            continue
        except OSError as e:
            others.append(f"{name} ({e.strerror})")
            continue
        if _is_ours(st, stat.S_ISREG):
            ours.append(name)
        else:
            others.append(f"{name} (uid {st.st_uid})")
    return ours, others


def orphan_segments(prefix: str) -> list[str]:
    """This user's segments named with ``prefix`` (files of other users that carry it are not)."""
    return _scan_segments(prefix)[0]


def remove_segments(prefix: str) -> list[str]:
    """Unlink every segment of ours named with ``prefix`` (left by a killed daemon, or a node's memory being
    lost). Files of other users, and any that cannot be removed, are left with one warning line, never raised
    on: the SMP, its sweep and the job's cleanup must get past them. Returns what was left."""
    ours, left = _scan_segments(prefix)
    for name in ours:
        try:
            os.unlink(os.path.join(shm_dir(), name))
        except FileNotFoundError:
            pass
        except OSError as e:
            left.append(f"{name} ({e.strerror})")
    if left:
        _warn(f"left {len(left)} file(s) named {prefix}-* in {shm_dir()} alone (another user's, or not removable): "
              + ", ".join(left[:3]) + (", ..." if len(left) > 3 else ""))
    return left


def _newest_first(epochs: dict) -> list[int]:
    return sorted(epochs, key=lambda e: (epochs[e]["attempt"], e), reverse=True)


class SnapshotDaemon:
    """The SMP's state and request handling; ``serve`` runs it on a socket."""

    def __init__(self, socket_path: str, prefix: str, idle_exit_s: float = 0.0,
                 request_timeout_s: float = REQUEST_TIMEOUT_S, watch: tuple[int, int | None] | None = None):
        self.socket_path, self.prefix = socket_path, prefix
        self.idle_exit_s, self.request_timeout_s = idle_exit_s, request_timeout_s
        self.watch = watch  # (pid, start time): the launcher whose death frees everything and ends this SMP
        self.index_path = index_path(socket_path)
        # One SMP per socket, taken before anything else: a second one (started because this one looked dead)
        # would otherwise adopt, and unlink, what this one is writing.
        self._lock = _take_lock(socket_path)
        self.secret = load_secret(socket_path, create=True)
        self.lock = threading.Lock()
        self.segments: dict[str, int] = {}  # every segment this SMP owns: name -> capacity (>= what it holds)
        self.pending: dict[str, tuple[int, str]] = {}  # allocated, not yet committed: name -> (epoch, key)
        self.pool: dict[str, int] = {}  # evicted segments waiting to be reused: name -> capacity
        # Committed, by epoch: {epoch: {"attempt", "complete", "owners": {owner: {key: entry}}}}
        self.epochs: dict[int, dict] = {}
        self.run, self.attempt = "", 0
        self.ranks: dict[str, int] = {}  # trainer rank -> pid (this attempt), for node-loss injection
        self.chains: list[str] = []  # the launches (launchers) that served this run on this node
        self._stop = threading.Event()  # the serving loop exits
        self._closing = threading.Event()  # shutdown answered: refuse the rest, stop once the reply is out
        self._last_request = time.monotonic()
        self._warned_unlink = False
        self._adopt()

    # ------------------------------------------------------------------ the committed index
    def _adopt(self) -> None:
        """Take over a SIGKILLed predecessor's committed segments; unlink whatever else carries our prefix."""
        try:
            with open(self.index_path) as f:
                index = json.load(f)
            self.run, self.attempt = str(index["run"]), int(index["attempt"])
            self.ranks = {str(k): int(v) for k, v in index.get("ranks", {}).items()}
            self.chains = [str(c) for c in index.get("chains", [])]
            for epoch, ep in index["epochs"].items():
                owners = {}
                for owner, entries in ep["owners"].items():
                    if all(self._present(e) for e in entries.values()):
                        owners[owner] = entries
                if owners:
                    self.epochs[int(epoch)] = {"attempt": int(ep["attempt"]), "complete": bool(ep["complete"]),
                                               "owners": owners}
        except FileNotFoundError:
            pass
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            say(f"smp: ignoring an unreadable index {self.index_path} ({e})")
            self.epochs.clear()
        for ep in self.epochs.values():
            for entries in ep["owners"].values():
                for e in entries.values():
                    self.segments[e["name"]] = self._present(e)
        for name in orphan_segments(self.prefix):  # ours only: a file another user planted is not touched
            if name not in self.segments:
                self._unlink(name)
        if self.epochs:
            say(f"smp: adopted epochs {sorted(self.epochs)} of run {self.run!r} from {self.index_path}")

    def _present(self, entry: dict) -> int:
        """The capacity of an index entry's segment if it is still there, ours, and holds the entry's bytes; else 0."""
        try:
            name = str(entry["name"])
            st = os.lstat(segment_path(name))
            if name.startswith(self.prefix + "-") and _is_ours(st, stat.S_ISREG) and \
                    st.st_size >= max(1, int(entry["size"])):
                return st.st_size
        except (OSError, SMPError, KeyError, ValueError, TypeError):
            pass
        return 0

    def _save_index(self) -> None:
        index = {"run": self.run, "attempt": self.attempt, "ranks": self.ranks, "chains": self.chains,
                 "epochs": {str(e): ep for e, ep in self.epochs.items()}}
        atomic_write_text(self.index_path, json.dumps(index))

    # ------------------------------------------------------------------ segments
    def _unlink(self, name: str) -> None:
        try:
            os.unlink(os.path.join(shm_dir(), name))
        except FileNotFoundError:  # removed from outside (a wiped node, an operator)
            pass
        except OSError as e:  # never fatal: the SMP goes on serving (warned once)
            if not self._warned_unlink:
                self._warned_unlink = True
                _warn(f"cannot remove {os.path.join(shm_dir(), name)} ({e.strerror}); left in place")

    def _free(self, name: str) -> None:
        self.segments.pop(name, None)
        self.pending.pop(name, None)
        self.pool.pop(name, None)
        self._unlink(name)

    def _retire(self, name: str) -> None:
        """A segment no epoch needs any more: keep it for reuse."""
        self.pending.pop(name, None)
        if name in self.segments:
            self.pool[name] = self.segments[name]

    def _drop_epoch(self, epoch: int, reuse: bool = True) -> None:
        for entries in self.epochs.pop(epoch)["owners"].values():
            for e in entries.values():
                (self._retire if reuse else self._free)(e["name"])

    def _create(self, size: int) -> dict:
        capacity = segment_capacity(size)
        for _ in range(8):
            name = f"{self.prefix}-{uuid.uuid4().hex[:12]}"
            try:  # O_EXCL: never a file someone else made (it is theirs to read or swap)
                fd = os.open(os.path.join(shm_dir(), name), os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_NOFOLLOW, 0o600)
                break
            except FileExistsError:
                continue
            except OSError as e:
                return {"error": f"snapshot: cannot create a segment in {shm_dir()} ({e.strerror})"}
        else:
            return {"error": f"snapshot: cannot create a segment in {shm_dir()} (every name tried exists)"}
        try:
            while True:
                try:
                    os.posix_fallocate(fd, 0, capacity)  # reserve the pages now, not at the first write
                    break
                except OSError as e:
                    if not self.pool:
                        self._unlink(name)
                        return {"error": f"snapshot: {shm_dir()} cannot hold a segment of {size / 2**20:.1f} MiB "
                                         f"({e.strerror}; raise the shm size or snapshot less often)"}
                    for pooled in list(self.pool):  # segments of sizes nobody asks for any more
                        self._free(pooled)
        finally:
            os.close(fd)
        self.segments[name] = capacity
        return {"name": name}

    def _reuse(self, size: int) -> str | None:
        """A pooled segment for a chunk of ``size``: the smallest that holds it without wasting more than
        1/REUSE_SLACK, else the largest smaller one grown in place (a mapping of it stays valid); None if
        neither (a new segment, and pooled ones no request fits are freed when the epoch is sealed)."""
        limit = segment_capacity(size) + segment_capacity(size) // REUSE_SLACK
        snug = [(cap, name) for name, cap in self.pool.items() if size <= cap <= limit]
        if snug:
            name = min(snug)[1]
            del self.pool[name]
            return name
        smaller = [(cap, name) for name, cap in self.pool.items() if cap < size]
        if not smaller:
            return None
        name = max(smaller)[1]
        del self.pool[name]
        capacity = segment_capacity(size)
        try:
            fd = os.open(os.path.join(shm_dir(), name), os.O_RDWR | os.O_NOFOLLOW)
            try:
                os.posix_fallocate(fd, 0, capacity)
            finally:
                os.close(fd)
        except OSError:  # no room to grow it (or it is gone): make room with the rest of the pool, or fail
            self._free(name)
            return None
        self.segments[name] = capacity
        return name

    def _complete(self) -> list[int]:
        return [e for e in _newest_first(self.epochs) if self.epochs[e]["complete"]]

    def _too_old(self, epoch: int) -> dict | None:
        """An epoch older than every complete epoch kept would be evicted at once: refuse it, loudly."""
        complete = self._complete()
        if len(complete) >= KEEP_EPOCHS and epoch not in self.epochs and \
                (self.attempt, epoch) < (self.epochs[complete[-1]]["attempt"], complete[-1]):
            return {"error": f"snapshot: epoch {epoch} is older than the {KEEP_EPOCHS} complete epochs held "
                             f"{sorted(complete)}; not kept"}
        return None

    # ------------------------------------------------------------------ requests
    def _fence(self, req: dict) -> dict | None:
        run, attempt = str(req.get("run", "")), int(req.get("attempt", 0))
        if run != self.run or attempt != self.attempt:
            return {"error": f"snapshot: request of run {run!r} attempt {attempt} refused: this node serves run "
                             f"{self.run!r} attempt {self.attempt} (a stale trainer, or one that did not register)"}
        return None

    def register(self, rank: str, pid: int, run: str, attempt: int, chain: str = "") -> dict:
        if run != self.run:
            if self.epochs:
                say(f"smp: run {run!r} registered; dropping epochs {sorted(self.epochs)} of run {self.run!r}")
            for epoch in list(self.epochs):
                self._drop_epoch(epoch)
            self.run, self.attempt, self.ranks, self.chains = run, attempt, {}, []
            self.free_uncommitted()
        elif attempt < self.attempt:
            return {"error": f"snapshot: attempt {attempt} of run {run!r} refused: attempt {self.attempt} is running"}
        elif attempt > self.attempt:
            self.attempt, self.ranks = attempt, {}
            self.free_uncommitted()
        self.ranks[rank] = pid
        if chain and chain not in self.chains:
            self.chains = (self.chains + [chain])[-MAX_CHAINS:]
        self._save_index()
        return {"ok": True}

    def alloc(self, key: str, size: int, epoch: int) -> dict:
        if size < 0:
            return {"error": f"alloc: size must be >= 0, got {size}"}
        if refused := self._too_old(epoch):
            return refused
        for name, (older, _) in list(self.pending.items()):
            if older < epoch:  # a snapshot of this attempt that failed before its commit
                self._retire(name)
        complete = self._complete()
        if len(complete) >= KEEP_EPOCHS and epoch not in self.epochs:
            self._drop_epoch(complete[-1])  # double buffering: the oldest complete epoch becomes the new one
            self._save_index()
        name = self._reuse(size)
        if name is None:
            reply = self._create(size)
            if "error" in reply:
                return reply
            name = reply["name"]
        self.pending[name] = (epoch, key)
        return {"name": name, "capacity": self.segments[name]}

    def commit(self, epoch: int, owner: str, entries: dict, seal: bool = False) -> dict:
        if epoch in self.epochs and self.epochs[epoch]["attempt"] != self.attempt:
            self._drop_epoch(epoch)  # the same step number of an earlier generation: never mixed with this one
        names = [e.get("name") if isinstance(e, dict) else None for e in entries.values()]
        held = self.epochs.get(epoch, {}).get("owners", {}).get(owner, {})
        held_names = {e["name"] for e in held.values()}
        unknown = [n for n in names if n not in self.pending and n not in held_names]
        if unknown:
            return {"error": f"commit: unknown segments {unknown}"}
        if refused := self._too_old(epoch):
            for n in names:
                self._retire(n)
            return refused
        for name in held_names - set(names):  # a re-commit replaces what the owner had
            self._retire(name)
        for n in names:
            self.pending.pop(n, None)
        ep = self.epochs.setdefault(epoch, {"attempt": self.attempt, "complete": False, "owners": {}})
        ep["owners"][owner] = entries
        if seal:
            self.seal(epoch)
        self._save_index()
        return {"ok": True}

    def seal(self, epoch: int) -> dict:
        """Every rank of the job committed ``epoch`` (the trainers agreed on it): it now counts as complete,
        for keeping and for eviction. An epoch committed here but not everywhere never evicts one that is."""
        if epoch not in self.epochs or self.epochs[epoch]["attempt"] != self.attempt:
            return {"error": f"seal: epoch {epoch} of attempt {self.attempt} is not held"}
        self.epochs[epoch]["complete"] = True
        for name in list(self.pool):  # the snapshot took what it needed; the rest is surplus
            self._free(name)
        for old in self._complete()[KEEP_EPOCHS:]:
            self._drop_epoch(old)
        newest = (self.attempt, epoch)
        for old in list(self.epochs):  # unsealed epochs older than a sealed one never serve
            if not self.epochs[old]["complete"] and (self.epochs[old]["attempt"], old) < newest:
                self._drop_epoch(old)
        self._save_index()
        return {"ok": True}

    def free_all(self) -> None:
        for name in list(self.segments):
            self._free(name)
        self.epochs.clear()
        try:
            os.unlink(self.index_path)
        except OSError:
            pass

    def free_uncommitted(self) -> dict:
        """Drop segments no committed epoch refers to (a torn snapshot's leftovers, the reuse pool)."""
        live = {e["name"] for ep in self.epochs.values() for owned in ep["owners"].values() for e in owned.values()}
        for name in [n for n in self.segments if n not in live]:
            self._free(name)
        return {"ok": True}

    def handle(self, req: dict) -> dict:
        """One request -> one reply; a malformed request is answered with an error, never raised."""
        if not isinstance(req, dict) or not hmac.compare_digest(str(req.get("secret", "")).encode(),
                                                                self.secret.encode()):
            return {"error": "snapshot: unauthorized (wrong or missing secret)"}
        op = req.get("op")
        try:
            with self.lock:
                if self._stop.is_set() or self._closing.is_set():
                    return {"error": "snapshot: this snapshot process is shutting down"}
                if op in ("alloc", "commit", "seal") and (refused := self._fence(req)):
                    return refused
                # A stale trainer must not free or stop what a newer attempt uses; the launcher and the job's
                # cleanup (operators, holding the secret too) stop any SMP.
                if op in ("free_uncommitted", "shutdown") and req.get("operator") is not True and \
                        (refused := self._fence(req)):
                    return refused
                if op == "alloc":
                    return self.alloc(str(req["key"]), int(req["size"]), int(req["epoch"]))
                if op == "commit":
                    if not isinstance(req["entries"], dict):
                        return {"error": "commit: entries must be an object"}
                    return self.commit(int(req["epoch"]), str(req["owner"]), req["entries"], bool(req.get("seal")))
                if op == "seal":
                    return self.seal(int(req["epoch"]))
                if op == "latest":
                    return {"run": self.run, "attempt": self.attempt,
                            "epochs": [{"epoch": e, "attempt": self.epochs[e]["attempt"],
                                        "complete": self.epochs[e]["complete"], "owners": self.epochs[e]["owners"]}
                                       for e in _newest_first(self.epochs)]}
                if op == "free_uncommitted":
                    return self.free_uncommitted()
                if op == "register":
                    return self.register(str(req["rank"]), int(req["pid"]), str(req.get("run", "")),
                                         int(req.get("attempt", 0)), str(req.get("chain", "")))
                if op == "ping":
                    chain = str(req.get("chain", ""))
                    return {"ok": True, "pid": os.getpid(), "prefix": self.prefix, "ranks": self.ranks,
                            "run": self.run, "attempt": self.attempt, "chain_known": bool(chain) and
                            chain in self.chains}
                if op == "shutdown":
                    self.free_all()  # before replying: the caller may check for leftovers next
                    self._closing.set()  # the serving loop stops once this reply is written
                    return {"ok": True}
        except (KeyError, ValueError, TypeError) as e:
            return {"error": f"snapshot: malformed {op!r} request ({type(e).__name__}: {e})"}
        return {"error": f"unknown op {op!r}"}

    # ------------------------------------------------------------------ serving
    def _peer_is_us(self, conn: socket.socket) -> bool:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _, uid, _ = struct.unpack("3i", creds)
        return uid == os.getuid()

    def _serve_connection(self, conn: socket.socket) -> None:
        """One client, isolated: its failures (gone, stalled, garbage) end its connection only."""
        try:
            with conn:
                if not self._peer_is_us(conn):
                    return
                conn.settimeout(self.request_timeout_s)
                with conn.makefile("rwb") as f:
                    while not self._stop.is_set():
                        line = f.readline(MAX_REQUEST)
                        if not line:
                            return
                        self._last_request = time.monotonic()
                        try:
                            req = json.loads(line)
                            reply = self.handle(req)
                        except (ValueError, RecursionError) as e:  # not JSON, or absurdly nested
                            req, reply = None, {"error": f"snapshot: request is not usable JSON ({type(e).__name__})"}
                        shut_down = isinstance(req, dict) and req.get("op") == "shutdown" and reply.get("ok")
                        try:
                            f.write(json.dumps(reply).encode() + b"\n")
                            f.flush()
                        finally:
                            if shut_down:  # only once this reply is out: exiting earlier could cut it off
                                self._stop.set()
        except OSError:  # the client went away mid-request or timed out: its problem, not the node's
            pass
        except Exception as e:  # noqa: BLE001 - e.g. JSON nested too deep: still only this client's problem
            say(f"smp: dropped a client: {type(e).__name__}: {e}")

    def serve(self) -> None:
        lock = self._lock
        if os.path.lexists(self.socket_path):
            os.unlink(self.socket_path)
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            server.bind(self.socket_path)  # created 0600 whatever the caller's umask
        finally:
            os.umask(old_umask)
        server.listen(64)
        server.settimeout(0.2)
        handlers = {signal.SIGTERM: signal.signal(signal.SIGTERM, lambda *_: self._stop.set()),  # scancel, a time
                    # limit: free, then exit. A hangup is not ours (no terminal: a session of its own); the epochs
                    # held are there to outlive what dies, and the launcher's death is seen through ``watch``.
                    signal.SIGHUP: signal.signal(signal.SIGHUP, signal.SIG_IGN)}
        next_watch = 0.0
        try:
            while not self._stop.is_set():
                if self.watch and time.monotonic() >= next_watch:
                    next_watch = time.monotonic() + WATCH_INTERVAL_S
                    if not _same_process(*self.watch):
                        _warn(f"the process it watched (pid {self.watch[0]}, its launcher) is gone: freeing every "
                              f"segment and exiting")
                        return
                try:
                    conn, _ = server.accept()
                except TimeoutError:
                    if self.idle_exit_s and time.monotonic() - self._last_request > self.idle_exit_s and \
                            not any(_alive(pid) for pid in self.ranks.values()):
                        return  # unused for idle_exit_s and none of its trainers lives: the job is gone
                    continue
                threading.Thread(target=self._serve_connection, args=(conn,), daemon=True).start()
        finally:
            with self.lock:
                self.free_all()
            server.close()
            remove_node_files(self.socket_path, self.prefix)
            lock.close()
            _remove_if_unused(os.path.dirname(os.path.abspath(self.socket_path)))
            for signum, handler in handlers.items():
                if handler is not None:  # None: not set from Python; left as it is
                    signal.signal(signum, handler)


class SnapshotClient:
    """A trainer's view of its node's SMP: write an epoch of named byte tensors, read the newest intact one."""

    def __init__(self, socket_path: str, run: str = "", attempt: int = 0, timeout_s: float = CLIENT_TIMEOUT_S,
                 chain: str = ""):
        self.socket_path, self.run, self.attempt, self.timeout_s = socket_path, run, attempt, timeout_s
        self.chain = chain
        self._secret = None

    def _request(self, timeout_s: float | None, req: dict) -> dict:
        try:
            if self._secret is None:
                self._secret = load_secret(self.socket_path)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(timeout_s or self.timeout_s)
                s.connect(self.socket_path)
                with s.makefile("rwb") as f:
                    f.write(json.dumps(req | {"secret": self._secret}).encode() + b"\n")
                    f.flush()
                    line = f.readline(MAX_REQUEST)
            reply = json.loads(line) if line else None
        except (OSError, ValueError) as e:
            raise SMPError(f"snapshot process at {self.socket_path} is not answering ({type(e).__name__}: {e})") from e
        if not isinstance(reply, dict):
            raise SMPError(f"snapshot process at {self.socket_path} closed the connection without a reply")
        return reply

    def _call(self, timeout_s: float | None = None, **req) -> dict:
        reply = self._request(timeout_s, req)
        if str(reply.get("error", "")).startswith("snapshot: unauthorized"):
            # A restarted SMP may have written a new secret: read it once more, and ask once more if it changed.
            # Never more: a secret file that does not match its SMP stays so (a loop here would never end).
            sent, self._secret = self._secret, None
            try:
                fresh = load_secret(self.socket_path)
            except OSError as e:
                raise SMPError(f"snapshot process at {self.socket_path} refused its secret and "
                               f"{secret_path(self.socket_path)} cannot be read ({e})") from e
            if fresh != sent:
                self._secret = fresh
                reply = self._request(timeout_s, req)
            if str(reply.get("error", "")).startswith("snapshot: unauthorized"):
                raise SMPError(f"snapshot process at {self.socket_path} refused the secret of "
                               f"{secret_path(self.socket_path)} (secret mismatch: that file does not hold the secret "
                               f"it was started with; stop it and start it again)")
        if "error" in reply:
            raise SMPError(reply["error"])
        return reply

    def register(self, rank: int) -> dict:
        return self._call(op="register", rank=rank, pid=os.getpid(), run=self.run, attempt=self.attempt,
                          chain=self.chain)

    def alloc(self, key: str, size: int, epoch: int) -> str:
        return self._call(op="alloc", key=key, size=size, epoch=epoch, run=self.run, attempt=self.attempt)["name"]

    def commit(self, epoch: int, owner: str, entries: dict) -> dict:
        return self._call(op="commit", epoch=epoch, owner=owner, entries=entries, run=self.run, attempt=self.attempt)

    def seal(self, epoch: int) -> dict:
        return self._call(op="seal", epoch=epoch, run=self.run, attempt=self.attempt)

    def write_epoch(self, epoch: int, tensors: dict, commit: bool = True, owner: str = "0") -> dict:
        """Copy each tensor's bytes into an SMP segment, then commit the epoch (all or nothing)."""
        import torch

        entries = {}
        for key, t in tensors.items():
            data = t.detach().contiguous().view(torch.uint8).reshape(-1).cpu()
            name = self.alloc(key, data.numel(), epoch)
            shm = Attached(name)
            try:
                view = torch.frombuffer(shm.buf, dtype=torch.uint8, count=data.numel()) if data.numel() else None
                if view is not None:
                    view.copy_(data)
                    del view
                entries[key] = {"name": name, "size": data.numel(), "crc": checksum(shm.buf[:data.numel()]),
                                "dtype": str(t.dtype).replace("torch.", ""), "shape": list(t.shape)}
            finally:
                shm.close()
        if commit:  # one writer: its commit is the whole epoch
            self._call(op="commit", epoch=epoch, owner=owner, entries=entries, run=self.run, attempt=self.attempt,
                       seal=True)
        return entries

    def read_latest(self, owner: str = "0") -> tuple[int, dict] | None:
        """Newest committed epoch whose every segment (of ``owner``) passes its checksum; None if none does."""
        import torch

        for ep in self._call(op="latest")["epochs"]:
            if owner not in ep["owners"]:
                continue
            out = {}
            for key, e in ep["owners"][owner].items():
                try:
                    shm = Attached(e["name"])
                except FileNotFoundError:
                    break
                try:
                    raw = bytes(shm.buf[:e["size"]])
                finally:
                    shm.close()
                if checksum(raw) != e["crc"]:
                    break
                dtype = getattr(torch, e["dtype"])
                out[key] = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(e["shape"]) \
                    if e["size"] else torch.empty(e["shape"], dtype=dtype)
            else:
                return ep["epoch"], out
        return None

    def free_uncommitted(self) -> dict:
        """Drop the segments no committed epoch holds; refused unless this client's generation is the SMP's."""
        return self._call(op="free_uncommitted", run=self.run, attempt=self.attempt)

    def shutdown(self, operator: bool | None = None) -> None:
        """Free everything and stop the SMP. A trainer's client (one with a run) is fenced like its other requests;
        ``operator`` (default: a client of no run, the launcher's or the job cleanup's) stops any SMP."""
        if operator is None:
            operator = not self.run
        self._call(op="shutdown", run=self.run, attempt=self.attempt, operator=bool(operator))

    def alive(self, timeout_s: float = 5.0) -> bool:
        """It answers a ping; False on any failure (refused, unreachable, a secret that does not match)."""
        try:
            self._call(op="ping", timeout_s=timeout_s)
            return True
        except Exception:  # noqa: BLE001 - a liveness probe answers, it never raises
            return False


# ---------------------------------------------------------------- starting and stopping daemons
SMP_DIR_PREFIX = "loomtrain-smp-"


JOB_KEY_FILE = ".smp-key"  # in the output directory, mode 0600: what names the job's SMP directories


def job_key(output_dir: str, create: bool = True) -> str | None:
    """This user's random key for ``output_dir``, made once (0600, linked into place: every rank on every host
    reads the same); None if there is none and ``create`` is False. SMPError if the file is not this user's
    alone (another user who could read or plant it could name the job's directory)."""
    path = os.path.join(os.path.abspath(output_dir), JOB_KEY_FILE)
    if create and not os.path.lexists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, (secrets.token_hex(16) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # atomic and never replaces: a key another rank linked first wins
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise SMPError(f"snapshot: cannot read {path} ({e.strerror})") from e
    try:
        st = os.fstat(fd)
        if not _is_ours(st, stat.S_ISREG) or st.st_mode & 0o077:
            raise SMPError(f"snapshot: {path} must be a file owned by uid {os.getuid()} with mode 0600 (it is uid "
                           f"{st.st_uid}, mode {oct(st.st_mode & 0o7777)}); remove it")
        key = os.read(fd, 256).decode(errors="replace").strip()
    finally:
        os.close(fd)
    if not re.fullmatch(r"[0-9a-f]{32}", key):
        raise SMPError(f"snapshot: {path} does not hold a key (32 hex digits); remove it")
    return key


def job_directory(output_dir: str, job_id: str = "", create: bool = True) -> str | None:
    """The SMP directory of a job (bare torchrun or Slurm) on this host: one per output directory and job.

    Its name is keyed by ``job_key``: one derived from the output directory and job id alone could be created
    first by another user of the host (in /tmp, open to all), and that turns snapshots off for the job. None
    when the output directory has no key and ``create`` is False (no job there ever started snapshots)."""
    key = job_key(output_dir, create)
    if key is None:
        return None
    tag = hmac.new(key.encode(), f"{os.path.abspath(output_dir)}|{job_id}".encode(), hashlib.sha256).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), f"{SMP_DIR_PREFIX}{os.getuid()}-{tag}")


NODE_LABEL = re.compile(r"[A-Za-z0-9]{1,32}")


def host_label(host_key: str) -> str:
    """A file-name-safe label for a host key (hostname and boot id): what names its SMP's files."""
    return "h" + hashlib.sha256(host_key.encode()).hexdigest()[:24]


def node_label(node: int | str) -> str:
    """Simulated nodes are numbered (0, 1, ...); real ones are labelled by host (``host_label``)."""
    label = str(node)
    if not NODE_LABEL.fullmatch(label):
        raise SMPError(f"snapshot: invalid node label {label!r}")
    return label


def socket_path(smp_dir: str, node: int | str) -> str:
    return os.path.join(smp_dir, f"node{node_label(node)}.sock")


def directory_nodes(smp_dir: str) -> list[str]:
    """The node labels with an SMP socket or lock file in ``smp_dir``."""
    names = os.listdir(smp_dir) if os.path.isdir(smp_dir) else []
    found = {m.group(1) for n in names if (m := re.fullmatch(r"node([A-Za-z0-9]{1,32})\.(sock|lock)", n))}
    return sorted(found)


def lock_path(socket_file: str) -> str:
    """The file an SMP holds an exclusive flock on while it lives (the kernel drops it at any death)."""
    return os.path.splitext(socket_file)[0] + ".lock"


def remove_node_files(socket_file: str, prefix: str | None) -> None:
    """Everything of one node's SMP: its segments (``prefix``; None: unknown, left), index, socket and lock file."""
    if prefix is not None:
        remove_segments(prefix)
    for leftover in (index_path(socket_file), socket_file, lock_path(socket_file)):
        try:
            os.unlink(leftover)
        except OSError:
            pass


def _take_lock(socket_file: str, tries: int = 50):
    """The exclusive lock an SMP holds while it lives, with its pid written in (for a stop that finds it too busy
    to answer). A liveness probe (_serving) holds it for an instant, so a few tries; the lock must be on the file
    the path names now (a sweep may have removed the one opened), else taken again."""
    path = lock_path(socket_file)
    for attempt in range(tries):
        lock = open(path, "a")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            if attempt == tries - 1:
                raise SMPError(f"snapshot: another snapshot process serves {socket_file}") from None
            time.sleep(0.01)
            continue
        try:
            same = os.fstat(lock.fileno()).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            lock.truncate(0)
            lock.write(f"{os.getpid()}\n")
            lock.flush()
            return lock
        lock.close()
    raise SMPError(f"snapshot: cannot take the lock {path}")


def _lock_holder(socket_file: str) -> int:
    """The pid an SMP wrote into its lock file (0 if none can be read)."""
    try:
        with open(lock_path(socket_file)) as f:
            return int(f.read().strip() or 0)
    except (OSError, ValueError):
        return 0


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie (a SIGKILLed SMP whose parent has not reaped it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive, and not ours to judge
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _start_time(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot; /proc), None if unknown: a reused pid differs in it."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _same_process(pid: int, start: int | None) -> bool:
    """Process ``pid`` lives and is the one that started at ``start`` (not a later one given its pid)."""
    return _alive(pid) and (start is None or _start_time(pid) in (None, start))


def watch_spec(pid: int) -> str:
    """``pid:start``: how an SMP is told which process to die with (``--watch-pid``)."""
    start = _start_time(pid)
    return f"{pid}:{start}" if start is not None else str(pid)


def _launcher_pid() -> int | None:
    """The loomtrain launcher this process runs under (it exports its pid to its ranks), if any."""
    pid = os.environ.get(LAUNCHER_PID_ENV, "")
    return int(pid) if pid.isdigit() else None


def _parse_watch(spec: str) -> tuple[int, int | None]:
    pid, _, start = spec.partition(":")
    return int(pid), int(start) if start else None


def _serving(socket_file: str) -> bool:
    """An SMP holds this socket's lock (it is alive, even if too busy to answer or not yet listening)."""
    try:
        with open(lock_path(socket_file), "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(lock, fcntl.LOCK_UN)
            return False
    except OSError:
        return False


def _remove_if_dead(socket_file: str, prefix: str | None) -> bool:
    """Remove a node's files unless an SMP serves it (holds its lock, busy or not), holding the lock meanwhile
    so that none starts in the middle; True if removed."""
    try:
        lock = open(lock_path(socket_file), "a")
    except OSError:
        return False
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        remove_node_files(socket_file, prefix)
        return True


def _prefix_or_none(smp_dir: str, node: int | str) -> str | None:
    try:
        return segment_prefix(smp_dir, node)
    except SMPError as e:
        _warn(f"the segments of node {node} in {smp_dir} cannot be found: {e}")
        return None


STALE_TEMP_S = 600  # an atomic write's temporary file this old was left by a writer killed mid-write


def _remove_if_unused(d: str, min_age_s: float = 0.0) -> None:
    """Remove an SMP directory loomtrain named once no SMP uses it (nothing but the secret is left, and
    perhaps a temporary file a writer killed mid-write left long ago), if old enough. A directory a user or
    launcher chose is theirs to remove."""
    if not os.path.basename(d).startswith(SMP_DIR_PREFIX):
        return
    try:
        now = time.time()
        left = {f for f in os.listdir(d)
                if not (f.startswith(".tmp-") and now - os.stat(os.path.join(d, f)).st_mtime >= STALE_TEMP_S)}
        if left <= {"secret"} and now - os.stat(d).st_mtime >= min_age_s:
            shutil.rmtree(d, ignore_errors=True)
    except OSError:
        pass


def _our_directory(d: str) -> bool:
    """``d`` is a directory (not a link) of this user, closed to others: one an SMP of ours may use."""
    try:
        st = os.lstat(d)
    except OSError:
        return False
    return _is_ours(st) and not st.st_mode & 0o077


def sweep_dead(keep: str | None = None) -> list[str]:
    """Remove the segments, index and socket of every SMP of this user on this host whose process is gone
    (SIGKILLed with its job, a node's trainers killed by Slurm): the cleanup that also runs after SIGKILL,
    at the next start of an SMP on the host. ``keep``: a directory not to touch (the one an SMP is about to
    start in: it adopts its predecessor's segments). An SMP that lives (its lock held), however busy, keeps
    everything. Returns the directories swept."""
    swept, root = [], tempfile.gettempdir()
    try:
        entries = os.listdir(root)
    except OSError:
        return swept
    for entry in entries:
        d = os.path.join(root, entry)
        if not entry.startswith(SMP_DIR_PREFIX) or (keep and os.path.abspath(d) == os.path.abspath(keep)):
            continue
        if not _our_directory(d):  # another user's (or a planted one): not ours to judge
            continue
        try:
            nodes = directory_nodes(d)
        except OSError:
            continue
        for node in nodes:
            sock = socket_path(d, node)
            if not _serving(sock) and _remove_if_dead(sock, _prefix_or_none(d, node)):
                swept.append(d)
        _remove_if_unused(d, min_age_s=600)  # an old directory nobody serves from (a job started may be new)
    return swept


def cleanup_job(output_dir: str, job_id: str) -> None:
    """Stop the job's SMPs on this host and remove everything they held (the sbatch script's last step).
    A directory of that name that is not this user's is left alone; one an SMP still serves is kept."""
    try:
        d = job_directory(output_dir, job_id, create=False)
    except SMPError as e:
        _warn(str(e))
        return
    if d is None or not os.path.lexists(d):
        return
    if not _our_directory(d):
        _warn(f"{d} is not a private directory of uid {os.getuid()}: left alone")
        return
    stop_daemons(d, directory_nodes(d))
    if not any(_serving(socket_path(d, node)) for node in directory_nodes(d)):
        shutil.rmtree(d, ignore_errors=True)


def segment_prefix(smp_dir: str, node: int | str) -> str:
    """What names node ``node``'s segments: stable per (job directory, node), so a restarted SMP finds its
    predecessor's, and derived from the directory's secret (readable by this user only): another user cannot
    know it, so cannot create files under it before the SMP does. SMPError if the secret cannot be read."""
    d, label = os.path.abspath(smp_dir), node_label(node)
    try:
        secret = load_secret(socket_path(d, label))
    except OSError as e:
        raise SMPError(f"snapshot: no readable secret in {d} ({e.strerror})") from e
    tag = hmac.new(secret.encode(), f"segments|{d}|{label}".encode(), hashlib.sha256).hexdigest()[:16]
    return f"lt{tag}n{label}"


def start_daemon(smp_dir: str, node: int | str, idle_exit_s: float = 0.0, timeout_s: float = 30.0,
                 env: dict | None = None, watch_pid: int | None = None) -> int:
    """Start node ``node``'s SMP in a session of its own (no trainer's death takes it down); returns its pid.
    ``watch_pid`` (default: the loomtrain launcher this runs under, ``LOOMTRAIN_LAUNCHER_PID``; none under plain
    torchrun or Slurm, where the SMP must outlive every process of a restart): when that process is gone, the
    SMP frees everything and exits (a launcher SIGKILLed or hung up never runs its cleanup)."""
    for swept in sweep_dead(keep=smp_dir):
        say(f"smp: removed the leftovers of a dead snapshot process in {swept}")
    secure_directory(smp_dir)
    sock = socket_path(smp_dir, node)
    load_secret(sock, create=True)
    watch_pid = watch_pid or _launcher_pid()
    watch = watch_spec(watch_pid) if watch_pid else ""
    proc = subprocess.Popen([sys.executable, "-m", "loomtrain.faulttol.smp", "--socket", sock,
                             "--prefix", segment_prefix(smp_dir, node), "--idle-exit-s", str(idle_exit_s)]
                            + (["--watch-pid", watch] if watch else []),
                            start_new_session=True, stdin=subprocess.DEVNULL,
                            env=dict(os.environ, **env) if env else None)
    client = SnapshotClient(sock)
    deadline = time.monotonic() + timeout_s
    while not client.alive(timeout_s=1.0):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SMPError(f"snapshot process for node {node} did not start (socket {sock})")
        time.sleep(0.02)
    return proc.pid


def ensure_daemon(smp_dir: str, node: int | str, idle_exit_s: float = 0.0) -> bool:
    """Start node ``node``'s SMP unless one answers; True if it had to be started."""
    sock = socket_path(smp_dir, node)
    if SnapshotClient(sock).alive():
        return False
    if _serving(sock):  # busy (a long allocation), not dead: a second SMP must not start
        raise SMPError(f"the snapshot process of node {node} is alive but not answering")
    start_daemon(smp_dir, node, idle_exit_s)
    return True


def stop_daemons(smp_dir: str, nodes, timeout_s: float = 10.0, run: str | None = None, attempt: int = 0) -> None:
    """Shut down (unlinking every segment) the SMPs of ``nodes`` that are still running, and remove what dead
    ones left. ``run``/``attempt``: a trainer's stop at its clean end, fenced like its other requests (an SMP now
    serving a newer attempt is left running); without: an operator's (launcher, job cleanup), any SMP. One that
    lives but does not answer is sent SIGTERM; the files of an SMP that still lives are never removed."""
    for node in nodes:
        sock = socket_path(smp_dir, node)
        client = SnapshotClient(sock, run=run or "", attempt=attempt)
        try:
            pid = int(client._call(op="ping", timeout_s=min(5.0, timeout_s))["pid"])
        except (SMPError, KeyError, TypeError, ValueError):
            pid = 0
        if pid:
            try:
                client.shutdown(operator=run is None)
            except SMPError as e:
                if run is not None:
                    _warn(f"left the snapshot process of node {node} running: {e}")
                    continue
        elif _serving(sock) and (pid := _lock_holder(sock)):  # alive, too busy to answer: as scancel would
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:
                pass
        deadline = time.monotonic() + timeout_s
        while _serving(sock) and time.monotonic() < deadline:  # gone before the caller looks for leftovers
            time.sleep(0.02)
        if not os.path.isdir(smp_dir):  # the last SMP to exit removed its directory: nothing is left
            continue
        if not _remove_if_dead(sock, _prefix_or_none(smp_dir, node)):  # a SIGKILLed one's files too
            _warn(f"the snapshot process of node {node} ({sock}) still runs: its files are left to it")
    _remove_if_unused(smp_dir)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="loomtrain.faulttol.smp", description="node snapshot daemon")
    p.add_argument("--cleanup-job", metavar="OUTPUT_DIR", default=None,
                   help="instead of serving: stop this host's SMPs of the job (SLURM_JOB_ID) writing to OUTPUT_DIR "
                        "and remove their segments, and those of any dead SMP of this user")
    p.add_argument("--socket")
    p.add_argument("--prefix", default=f"loomtrain-{os.getpid()}")
    p.add_argument("--idle-exit-s", type=float, default=0.0, help="exit after this long without a request; 0 = never")
    p.add_argument("--watch-pid", metavar="PID[:START]", default=None,
                   help="free everything and exit once this process (started at START, clock ticks) is gone")
    a = p.parse_args(argv)
    if a.cleanup_job:
        cleanup_job(a.cleanup_job, os.environ.get("SLURM_JOB_ID", ""))
        sweep_dead()
        return 0
    if not a.socket:
        p.error("--socket is required")
    try:
        watch = _parse_watch(a.watch_pid) if a.watch_pid else None
    except ValueError:
        p.error(f"--watch-pid: PID or PID:START, not {a.watch_pid!r}")
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # from the start (see ``serve``)
    secure_directory(os.path.dirname(os.path.abspath(a.socket)))
    SnapshotDaemon(a.socket, a.prefix, a.idle_exit_s, watch=watch).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
