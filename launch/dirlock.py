"""One run per output directory: an exclusive lock on ``<train.output_dir>/.lock`` held for the run's life.

``loomtrain train --nproc N`` takes it in the launcher (launch/elastic.py) before any rank starts and tells its
ranks so (``LOOMTRAIN_DIR_LOCK``); without a loomtrain launcher (``loomtrain train`` in one process, torchrun,
srun) global rank 0 takes it in ``launch/train.py``'s ``run``. A second run on the directory fails at start with
one line naming the holder: its pid, host and run id, which the holder writes into the file.

The lock is an ``flock``: the kernel drops it when the holder's descriptor closes, at the latest when the holder
dies, even by SIGKILL. A crashed run's successor, or a restart of the same run (its previous rank 0 is gone
before the next starts), therefore takes it at once and nothing needs cleaning up; the file stays, and what it
says matters only while it is locked. A descriptor is shared by children forked without exec, which then hold
the lock too; processes started with ``subprocess`` do not inherit it.

On NFS the lock is only as good as the mount's locking: Linux clients turn ``flock`` into a whole-file lock at the
server (NLM or NFSv4), which holds across hosts, but with ``local_lock=flock``/``all`` (and on Lustre without
``-o flock``, or FUSE filesystems that ignore locks) it is local to each host, so two runs started on different
hosts can both take it. A filesystem that refuses locks altogether gets a warning and no lock.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time

from loomtrain.errors import ConfigError

LOCK_FILE = ".lock"
HELD_ENV = "LOOMTRAIN_DIR_LOCK"  # the lock file a loomtrain launcher holds on its ranks' behalf


class DirectoryInUse(ConfigError):
    """Another live run holds the output directory's lock."""


def lock_path(output_dir: str) -> str:
    return os.path.join(os.path.realpath(output_dir), LOCK_FILE)


def held_by_launcher(output_dir: str) -> bool:
    """Whether the loomtrain launcher that started this process holds ``output_dir``'s lock for it."""
    return os.environ.get(HELD_ENV) == lock_path(output_dir)


class DirLock:
    """A held lock (``fd`` None: the filesystem refused locks and nothing is held); ``release`` drops it."""

    def __init__(self, path: str, fd: int | None):
        self.path, self.fd = path, fd

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)  # a leftover file names nobody
            os.close(self.fd)  # closing the last descriptor drops the flock
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _holder(fd: int) -> dict:
    """What the holder wrote; it truncates and writes right after locking, so an empty read is retried briefly."""
    for _ in range(20):
        try:
            return json.loads(os.pread(fd, 4096, 0).decode())
        except (ValueError, UnicodeDecodeError):
            time.sleep(0.05)
    return {}


def describe(holder: dict) -> str:
    if "pid" not in holder:
        return "holder unknown"
    parts = [f"pid {holder['pid']} on host {holder.get('host', '?')}"]
    if holder.get("run"):
        parts.append(f"run {holder['run']}")
    if holder.get("since"):
        parts.append(f"since {holder['since']}")
    return ", ".join(parts)


def acquire(output_dir: str, run: str = "") -> DirLock:
    """Lock ``output_dir`` (created if missing) for this process, recording its pid, host and ``run``; raises
    ``DirectoryInUse`` (a ``ConfigError``: one line, exit code 2) if another run holds it. Never waits."""
    os.makedirs(output_dir, exist_ok=True)
    path = lock_path(output_dir)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise DirectoryInUse(f"train.output_dir: '{output_dir}' is in use by another run ({describe(holder)}); "
                             f"wait for it to end, stop it, or choose another train.output_dir") from None
    except OSError as e:
        os.close(fd)
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        print(f"warning: train.output_dir: cannot lock {path} ({e.strerror}): nothing stops a second run from "
              f"writing to '{output_dir}' at the same time", file=sys.stderr, flush=True)
        return DirLock(path, None)
    info = {"pid": os.getpid(), "host": socket.gethostname(), "run": run,
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    return DirLock(path, fd)
