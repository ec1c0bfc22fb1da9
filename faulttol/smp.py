"""Snapshot management process (SMP): owns the shared-memory snapshot segments of a node.

The SMP is its own process (started by the launcher in its own session, not as a child
of a trainer), so a trainer killed with SIGKILL loses nothing: the SMP created every
segment and only the SMP unlinks them. Trainers talk to it over a Unix socket with
one JSON object per line:

- ``alloc {key, size}``: create a segment (after checking /dev/shm has room: tmpfs
  allocates lazily, so an overfull /dev/shm would otherwise kill the writer with SIGBUS);
- ``commit {epoch, entries}``: the epoch's segments are complete, with one checksum per
  segment; only committed epochs are ever served, the two newest are kept, older ones
  are unlinked (a failure during a snapshot falls back to the previous epoch);
- ``latest``: committed epochs, newest first; ``shutdown``: unlink everything and exit.

Clients attach to segments by name and immediately unregister them from Python's
resource tracker, which would otherwise unlink a segment when the attaching process dies.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import uuid
import zlib
from multiprocessing import resource_tracker, shared_memory

import torch

KEEP_EPOCHS = 2
SHM_DIR = "/dev/shm"


def _attach(name: str) -> shared_memory.SharedMemory:
    shm = shared_memory.SharedMemory(name=name)
    resource_tracker.unregister(shm._name, "shared_memory")  # this process must never unlink it
    return shm


def checksum(buf) -> int:
    return zlib.crc32(buf)


class SnapshotDaemon:
    def __init__(self, socket_path: str, prefix: str):
        self.socket_path, self.prefix = socket_path, prefix
        self.segments: dict[str, shared_memory.SharedMemory] = {}  # name -> segment
        self.epochs: list[dict] = []  # committed, oldest first: {"epoch", "entries": {key: {name, size, crc}}}

    def alloc(self, key: str, size: int) -> dict:
        free = shutil.disk_usage(SHM_DIR).free if os.path.isdir(SHM_DIR) else float("inf")
        if size > free:
            return {"error": f"snapshot: /dev/shm has {free / 2**20:.1f} MiB free, segment '{key}' needs "
                             f"{size / 2**20:.1f} MiB (raise the shm size or snapshot less often)"}
        name = f"{self.prefix}-{uuid.uuid4().hex[:12]}"
        self.segments[name] = shared_memory.SharedMemory(name=name, create=True, size=max(1, size))
        return {"name": name}

    def commit(self, epoch: int, entries: dict) -> dict:
        missing = [k for k, e in entries.items() if e["name"] not in self.segments]
        if missing:
            return {"error": f"commit: unknown segments for {missing}"}
        self.epochs.append({"epoch": epoch, "entries": entries})
        while len(self.epochs) > KEEP_EPOCHS:
            old = self.epochs.pop(0)
            for e in old["entries"].values():
                self._free(e["name"])
        return {"ok": True}

    def _free(self, name: str) -> None:
        shm = self.segments.pop(name, None)
        if shm is not None:
            shm.close()
            shm.unlink()

    def free_uncommitted(self) -> dict:
        """Drop segments no committed epoch refers to (a torn snapshot's leftovers)."""
        live = {e["name"] for ep in self.epochs for e in ep["entries"].values()}
        for name in [n for n in self.segments if n not in live]:
            self._free(name)
        return {"ok": True}

    def handle(self, req: dict) -> dict:
        op = req.get("op")
        if op == "alloc":
            return self.alloc(req["key"], int(req["size"]))
        if op == "commit":
            return self.commit(int(req["epoch"]), req["entries"])
        if op == "latest":
            return {"epochs": list(reversed(self.epochs))}
        if op == "free_uncommitted":
            return self.free_uncommitted()
        if op == "ping":
            return {"ok": True, "pid": os.getpid()}
        return {"error": f"unknown op {op!r}"}

    def serve(self) -> None:
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(self.socket_path)
        server.listen(64)
        try:
            while True:
                conn, _ = server.accept()
                with conn, conn.makefile("rw") as f:
                    for line in f:
                        req = json.loads(line)
                        if req.get("op") == "shutdown":
                            f.write(json.dumps({"ok": True}) + "\n")
                            f.flush()
                            return
                        f.write(json.dumps(self.handle(req)) + "\n")
                        f.flush()
        finally:
            for name in list(self.segments):
                self._free(name)
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

    def write_epoch(self, epoch: int, tensors: dict[str, torch.Tensor], commit: bool = True) -> dict:
        """Copy each tensor's bytes into a fresh SMP segment, then commit the epoch (all or nothing)."""
        entries = {}
        for key, t in tensors.items():
            data = t.detach().contiguous().view(torch.uint8).reshape(-1).cpu()
            name = self._call(op="alloc", key=key, size=data.numel())["name"]
            shm = _attach(name)
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
            self._call(op="commit", epoch=epoch, entries=entries)
        return entries

    def read_latest(self) -> tuple[int, dict[str, torch.Tensor]] | None:
        """Newest committed epoch whose every segment passes its checksum; None if none does."""
        for ep in self._call(op="latest")["epochs"]:
            out = {}
            for key, e in ep["entries"].items():
                try:
                    shm = _attach(e["name"])
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="loomtrain.faulttol.smp", description="node snapshot daemon")
    p.add_argument("--socket", required=True)
    p.add_argument("--prefix", default=f"loomtrain-{os.getpid()}")
    a = p.parse_args(argv)
    SnapshotDaemon(a.socket, a.prefix).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
