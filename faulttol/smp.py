"""Snapshot management process (SMP): owns the shared-memory snapshot segments of a node.

The SMP is its own process (started by the launcher in its own session, not as a child
of a trainer), so a trainer killed with SIGKILL loses nothing: the SMP created every
segment and only the SMP unlinks them. Trainers talk to it over a Unix socket with
one JSON object per line:

- ``alloc {key, size}``: create a segment (after checking /dev/shm has room: tmpfs
  allocates lazily, so an overfull /dev/shm would otherwise kill the writer with SIGBUS);
- ``commit {epoch, owner, entries}``: the owner's (a rank's) segments of that epoch are
  complete, with one checksum per segment; only committed entries are ever served, the
  two newest epochs are kept and older ones unlinked (a failure during a snapshot falls
  back to the previous epoch);
- ``latest``: committed epochs, newest first; ``free_uncommitted``: drop a torn
  snapshot's leftovers; ``register {rank, pid}`` / ``ping``: which trainer processes
  live on this node; ``shutdown``: unlink everything and exit.

Clients map segments by name (plain mmap of /dev/shm/<name>), never through Python's
resource tracker, which would unlink a segment when it believes the attaching process died.
The daemon imports no torch, so it starts in a fraction of a second.
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
import zlib

KEEP_EPOCHS = 2
SHM_DIR = "/dev/shm"


class Attached:
    """A client's mapping of a daemon-owned segment: a plain mmap of /dev/shm/<name>.

    Deliberately not ``SharedMemory(name=...)``: on Python < 3.13 that registers the segment
    with the resource tracker, which unlinks it when the tracker thinks its user died.
    """

    def __init__(self, name: str):
        fd = os.open(os.path.join(SHM_DIR, name.lstrip("/")), os.O_RDWR)
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


def orphan_segments(prefix: str) -> list[str]:
    return sorted(f for f in os.listdir(SHM_DIR) if f.startswith(prefix + "-")) if os.path.isdir(SHM_DIR) else []


def remove_segments(prefix: str) -> None:
    """Unlink every segment named with ``prefix`` (left by a killed daemon, or a node's memory being lost)."""
    for name in orphan_segments(prefix):
        try:
            os.unlink(os.path.join(SHM_DIR, name))
        except FileNotFoundError:
            pass


class SnapshotDaemon:
    def __init__(self, socket_path: str, prefix: str, idle_exit_s: float = 0.0):
        self.socket_path, self.prefix, self.idle_exit_s = socket_path, prefix, idle_exit_s
        # name -> size. Segments are files in /dev/shm created here, not SharedMemory objects: Python's
        # resource tracker would unlink them if this daemon were killed (and could not tell it apart).
        self.segments: dict[str, int] = {}
        # Committed, by epoch: {epoch: {owner: {key: {name, size, crc, ...}}}}
        self.epochs: dict[int, dict[str, dict]] = {}
        self.ranks: dict[str, int] = {}  # trainer rank -> pid, for node-loss injection
        # A predecessor killed with SIGKILL could not unlink its segments; its index died with it.
        remove_segments(prefix)

    def alloc(self, key: str, size: int) -> dict:
        free = shutil.disk_usage(SHM_DIR).free if os.path.isdir(SHM_DIR) else float("inf")
        if size > free:
            return {"error": f"snapshot: /dev/shm has {free / 2**20:.1f} MiB free, segment '{key}' needs "
                             f"{size / 2**20:.1f} MiB (raise the shm size or snapshot less often)"}
        name = f"{self.prefix}-{uuid.uuid4().hex[:12]}"
        fd = os.open(os.path.join(SHM_DIR, name), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, max(1, size))
        finally:
            os.close(fd)
        self.segments[name] = size
        return {"name": name}

    def commit(self, epoch: int, owner: str, entries: dict) -> dict:
        missing = [k for k, e in entries.items() if e["name"] not in self.segments]
        if missing:
            return {"error": f"commit: unknown segments for {missing}"}
        self.epochs.setdefault(epoch, {})[owner] = entries
        for old in sorted(self.epochs)[:-KEEP_EPOCHS]:
            for owned in self.epochs.pop(old).values():
                for e in owned.values():
                    self._free(e["name"])
        return {"ok": True}

    def _free(self, name: str) -> None:
        if self.segments.pop(name, None) is not None:
            try:
                os.unlink(os.path.join(SHM_DIR, name))
            except FileNotFoundError:  # removed from outside (a wiped node, an operator)
                pass

    def free_all(self) -> None:
        for name in list(self.segments):
            self._free(name)

    def free_uncommitted(self) -> dict:
        """Drop segments no committed epoch refers to (a torn snapshot's leftovers)."""
        live = {e["name"] for ep in self.epochs.values() for owned in ep.values() for e in owned.values()}
        for name in [n for n in self.segments if n not in live]:
            self._free(name)
        return {"ok": True}

    def handle(self, req: dict) -> dict:
        op = req.get("op")
        if op == "alloc":
            return self.alloc(req["key"], int(req["size"]))
        if op == "commit":
            return self.commit(int(req["epoch"]), str(req.get("owner", "0")), req["entries"])
        if op == "latest":
            return {"epochs": [{"epoch": e, "owners": self.epochs[e]} for e in sorted(self.epochs, reverse=True)]}
        if op == "free_uncommitted":
            return self.free_uncommitted()
        if op == "register":
            self.ranks[str(req["rank"])] = int(req["pid"])
            return {"ok": True}
        if op == "ping":
            return {"ok": True, "pid": os.getpid(), "prefix": self.prefix, "ranks": self.ranks}
        return {"error": f"unknown op {op!r}"}

    def serve(self) -> None:
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(self.socket_path)
        server.listen(64)
        if self.idle_exit_s:
            server.settimeout(self.idle_exit_s)
        try:
            while True:
                try:
                    conn, _ = server.accept()
                except TimeoutError:  # nobody used us for idle_exit_s: the job is gone
                    return
                with conn, conn.makefile("rw") as f:
                    for line in f:
                        req = json.loads(line)
                        if req.get("op") == "shutdown":
                            self.free_all()  # before replying: the caller may check for leftovers next
                            f.write(json.dumps({"ok": True}) + "\n")
                            f.flush()
                            return
                        f.write(json.dumps(self.handle(req)) + "\n")
                        f.flush()
        finally:
            self.free_all()
            server.close()
            if os.path.exists(self.socket_path):
                os.unlink(self.socket_path)


class SnapshotClient:
    """A trainer's view of its node's SMP: write an epoch of named byte tensors, read the newest intact one."""

    def __init__(self, socket_path: str):
        self.socket_path = socket_path

    def _call(self, **req) -> dict:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(self.socket_path)
            with s.makefile("rw") as f:
                f.write(json.dumps(req) + "\n")
                f.flush()
                reply = json.loads(f.readline())
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return reply

    def write_epoch(self, epoch: int, tensors: dict, commit: bool = True, owner: str = "0") -> dict:
        """Copy each tensor's bytes into a fresh SMP segment, then commit the epoch (all or nothing)."""
        import torch

        entries = {}
        for key, t in tensors.items():
            data = t.detach().contiguous().view(torch.uint8).reshape(-1).cpu()
            name = self._call(op="alloc", key=key, size=data.numel())["name"]
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
        if commit:
            self._call(op="commit", epoch=epoch, owner=owner, entries=entries)
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

    def shutdown(self) -> None:
        self._call(op="shutdown")

    def alive(self) -> bool:
        try:
            self._call(op="ping")
            return True
        except (OSError, ValueError):
            return False


# ---------------------------------------------------------------- starting and stopping daemons
def socket_path(smp_dir: str, node: int) -> str:
    return os.path.join(smp_dir, f"node{node}.sock")


def segment_prefix(smp_dir: str, node: int) -> str:
    """Stable per (job directory, node): a restarted daemon finds and removes its predecessor's orphans."""
    return f"lt{zlib.crc32(os.path.abspath(smp_dir).encode()):08x}n{node}"


def start_daemon(smp_dir: str, node: int, idle_exit_s: float = 0.0, timeout_s: float = 30.0) -> int:
    """Start node ``node``'s SMP in a session of its own (no trainer's death takes it down); returns its pid."""
    os.makedirs(smp_dir, exist_ok=True)
    sock = socket_path(smp_dir, node)
    proc = subprocess.Popen([sys.executable, "-m", "loomtrain.faulttol.smp", "--socket", sock,
                             "--prefix", segment_prefix(smp_dir, node), "--idle-exit-s", str(idle_exit_s)],
                            start_new_session=True, stdin=subprocess.DEVNULL)
    client = SnapshotClient(sock)
    deadline = time.monotonic() + timeout_s
    while not client.alive():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"snapshot process for node {node} did not start (socket {sock})")
        time.sleep(0.02)
    return proc.pid


def ensure_daemon(smp_dir: str, node: int, idle_exit_s: float = 0.0) -> bool:
    """Start node ``node``'s SMP unless one answers; True if it had to be started."""
    if SnapshotClient(socket_path(smp_dir, node)).alive():
        return False
    start_daemon(smp_dir, node, idle_exit_s)
    return True


def stop_daemons(smp_dir: str, nodes: range | list[int]) -> None:
    """Shut down (unlinking every segment) the SMPs of ``nodes`` that are still running."""
    for node in nodes:
        client = SnapshotClient(socket_path(smp_dir, node))
        if client.alive():
            client.shutdown()
        remove_segments(segment_prefix(smp_dir, node))  # a SIGKILLed daemon's leftovers


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="loomtrain.faulttol.smp", description="node snapshot daemon")
    p.add_argument("--socket", required=True)
    p.add_argument("--prefix", default=f"loomtrain-{os.getpid()}")
    p.add_argument("--idle-exit-s", type=float, default=0.0, help="exit after this long without a request; 0 = never")
    a = p.parse_args(argv)
    SnapshotDaemon(a.socket, a.prefix, a.idle_exit_s).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
