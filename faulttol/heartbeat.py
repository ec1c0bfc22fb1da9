"""Per-rank heartbeats for the hang monitor (``faulttol/hang_monitor.py``), which runs outside the ranks.

Each rank keeps a small record in a memory-mapped file, ``<dir>/rank<NNNNN>.hb``: what it is doing
(phase, step), whether its main thread is blocked in a collective right now, when it last made progress,
its recent p99 step time and the limits it was configured with. Updates are a few ``struct.pack_into``
calls (no system call, no lock), so they can run on every collective; a seqlock lets the monitor read a
record that is being written. A SIGSTOPped, deadlocked or GIL-starved rank cannot report its own hang,
which is why the monitor is another process, and why the rank's Python stacks are dumped by
``faulthandler`` from a signal (``SIGUSR2``) into ``rank<NNNNN>.stack``: C code, no GIL needed.

Heartbeats are on when a launcher names the directory in ``LOOMTRAIN_HEARTBEAT_DIR`` (loomtrain's
launchers, the sbatch script and ``python -m loomtrain.faulttol.hang_monitor -- torchrun ...`` do);
otherwise every call here is a no-op. Standard library only: the record is opened before torch loads.
"""
from __future__ import annotations

import contextlib
import faulthandler
import json
import mmap
import os
import signal
import struct
import time
from collections import deque
from typing import Callable

HEARTBEAT_DIR_ENV = "LOOMTRAIN_HEARTBEAT_DIR"
STACK_SIGNAL = signal.SIGUSR2  # the monitor's request for every thread's Python stack
MAGIC = b"LTHB"
# seq, pid, rank, local_rank, attempt, stage, step, waiting, steps_timed | beat, p99, factor, min_s, phase_timeout
# | warmup_steps | phase (16 bytes) | the process's start time (clock ticks since boot: tells a reused pid apart)
LAYOUT = struct.Struct("<4sI9q5dq16sq")
SEQ_OFFSET = 8  # after magic and version: the seqlock counter (odd while a write is in progress)
VERSION = 1
# Coarse progress through a run: a rank in an earlier stage than its peers is the one they wait for.
STAGES = {"start": 0, "init": 1, "data": 2, "build": 3, "restore": 4, "step": 5, "checkpoint": 5, "eval": 5,
          "done": 6}
UNWATCHED_PHASES = ("data",)  # tokenizing a corpus may take hours without a collective: not a hang


def record_path(directory: str, rank: int, suffix: str = "hb") -> str:
    return os.path.join(directory, f"rank{rank:05d}.{suffix}")


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(one-letter state, start time in clock ticks) of ``pid`` from /proc; None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[0], int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


class Heartbeat:
    """This rank's record. ``phase``/``step_done``/``waiting`` are what the training loop calls. ``clock`` times
    the steps (tests pass one they advance themselves); the record's ``beat`` is always wall-clock time."""

    def __init__(self, directory: str, rank: int, local_rank: int, attempt: int,
                 clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        os.makedirs(directory, exist_ok=True)
        self.path = record_path(directory, rank)
        tmp = f"{self.path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(b"\0" * LAYOUT.size)
        os.replace(tmp, self.path)  # a restarted rank's new record, never a half-written one
        self._file = open(self.path, "r+b")
        self._map = mmap.mmap(self._file.fileno(), LAYOUT.size)
        self.fields = {"seq": 0, "pid": os.getpid(), "rank": rank, "local_rank": local_rank, "attempt": attempt,
                       "stage": 0, "step": 0, "waiting": 0, "steps_timed": 0, "beat": time.time(), "p99": 0.0,
                       "factor": 3.0, "min_s": 5.0, "phase_timeout": 1800.0, "warmup_steps": 5, "phase": "start",
                       "started": (proc_stat(os.getpid()) or ("", 0))[1]}
        self._times: deque = deque(maxlen=200)
        self._last_step, self._excluded, self._phase_since = None, 0.0, clock()
        self._stacks = open(self.path[:-len(".hb")] + ".stack", "w")
        faulthandler.register(STACK_SIGNAL, file=self._stacks, all_threads=True)
        self._write()

    def configure(self, monitor_cfg, host: str, output_dir: str) -> None:
        """The limits the monitor applies to this rank (``faulttol.monitor``) and who it is, for reports."""
        f = self.fields
        f["factor"], f["min_s"] = monitor_cfg.step_factor, monitor_cfg.min_s
        f["phase_timeout"], f["warmup_steps"] = monitor_cfg.phase_timeout_s, monitor_cfg.warmup_steps
        side = {"host": host, "output_dir": os.path.abspath(output_dir), "slurm_node": os.environ.get("SLURMD_NODENAME")}
        tmp = f"{self.path}.json.tmp-{os.getpid()}"
        with open(tmp, "w") as out:
            json.dump(side, out)
        os.replace(tmp, self.path[:-len(".hb")] + ".json")
        self._write()

    def phase(self, name: str) -> None:
        now = self._clock()
        if self.fields["phase"] != "step" and self._last_step is not None:
            self._excluded += now - self._phase_since  # checkpoints, evaluation: not part of a step's time
        if name == "step" and self._last_step is None:
            self._last_step = now
        self._phase_since = now
        self.fields["phase"], self.fields["stage"] = name, STAGES[name]
        self._write()

    def step_done(self, step: int) -> None:
        """Step ``step`` is done: its time is the time since the last one, less checkpoints and evaluation."""
        now = self._clock()
        seconds = now - (self._last_step if self._last_step is not None else now) - self._excluded
        self._last_step, self._excluded = now, 0.0
        f = self.fields
        f["step"], f["steps_timed"] = step, f["steps_timed"] + 1
        if f["steps_timed"] > f["warmup_steps"]:  # compilation and first allocations are not a step's time
            self._times.append(seconds)
        if self._times and (f["steps_timed"] % 10 == 1 or seconds > f["p99"]):  # p99 of the last 200, cheaply
            ordered = sorted(self._times)
            f["p99"] = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
        self._write()

    def renumber(self, rank: int) -> None:
        """The rank's new number (placement renumbered the ranks); the files keep the name they were given."""
        self.fields["rank"] = rank
        self._write()

    def set_waiting(self, waiting: bool) -> None:
        self.fields["waiting"] = int(waiting)
        self._write()

    def _write(self) -> None:
        f = self.fields
        if os.getpid() != f["pid"]:
            return  # a process forked from this rank: the record is not its own
        f["seq"] += 1  # odd: a write is in progress
        struct.pack_into("<q", self._map, SEQ_OFFSET, f["seq"])
        f["beat"] = time.time()
        LAYOUT.pack_into(self._map, 0, MAGIC, VERSION, f["seq"], f["pid"], f["rank"], f["local_rank"], f["attempt"],
                         f["stage"], f["step"], f["waiting"], f["steps_timed"], f["beat"], f["p99"], f["factor"],
                         f["min_s"], f["phase_timeout"], f["warmup_steps"], f["phase"].encode()[:16], f["started"])
        f["seq"] += 1
        struct.pack_into("<q", self._map, SEQ_OFFSET, f["seq"])

    def close(self) -> None:
        self.phase("done")
        faulthandler.unregister(STACK_SIGNAL)
        signal.signal(STACK_SIGNAL, signal.SIG_IGN)  # a monitor's late request must not kill a finishing rank
        self._map.close()
        self._file.close()
        self._stacks.close()


def read_record(path: str, tries: int = 50) -> dict | None:
    """One rank's record as the monitor sees it (None: not a complete record). Seqlock: a copy counts only if
    the counter was even before it and unchanged after it."""
    names = ("seq", "pid", "rank", "local_rank", "attempt", "stage", "step", "waiting", "steps_timed", "beat",
             "p99", "factor", "min_s", "phase_timeout", "warmup_steps")
    for _ in range(tries):
        try:
            with open(path, "rb") as f:
                data = f.read(LAYOUT.size)
                f.seek(SEQ_OFFSET)
                after = f.read(8)
        except OSError:
            return None
        if len(data) < LAYOUT.size or len(after) < 8:
            return None
        values = LAYOUT.unpack(data)
        if values[0] != MAGIC:
            return None
        if values[2] % 2 == 0 and struct.unpack("<q", after)[0] == values[2]:
            out = dict(zip(names, values[2:17]))
            out["phase"] = values[17].rstrip(b"\0").decode()
            out["started"] = values[18]
            out["file"] = path[:-len(".hb")]  # its .json and .stack beside it (named by the rank it started as)
            out["waiting"] = bool(out["waiting"])
            return out
        time.sleep(0.001)  # caught mid-write: read again
    return None


# ---------------------------------------------------------------- the process's heartbeat (no-op without a monitor)
_current: Heartbeat | None = None


def start(rank: int, local_rank: int, attempt: int) -> Heartbeat | None:
    """Open this rank's record if a monitor watches (``LOOMTRAIN_HEARTBEAT_DIR``); idempotent per process."""
    global _current
    directory = os.environ.get(HEARTBEAT_DIR_ENV)
    if _current is not None and _current.fields["pid"] != os.getpid():
        _current = None  # a forked child: the parent's record is not ours
    if directory and _current is None:
        _current = Heartbeat(directory, rank, local_rank, attempt)
        from loomtrain.comms import traffic

        traffic.set_wait_hook(_current.set_waiting)
    return _current


def watched() -> bool:
    """Whether a monitor outside this process watches it (then it owns hang detection)."""
    return _current is not None


def configure(monitor_cfg, host: str, output_dir: str) -> None:
    if _current is not None:
        _current.configure(monitor_cfg, host, output_dir)


def phase(name: str) -> None:
    if _current is not None:
        _current.phase(name)


def renumber(rank: int) -> None:
    if _current is not None:
        _current.renumber(rank)


def step_done(step: int) -> None:
    if _current is not None:
        _current.step_done(step)


@contextlib.contextmanager
def in_phase(name: str, then: str = "step"):
    """``name`` for the block (a checkpoint, an evaluation), ``then`` after it."""
    phase(name)
    try:
        yield
    finally:
        phase(then)


@contextlib.contextmanager
def waiting():
    """The block waits for other ranks (process-group rendezvous): the monitor does not blame this rank."""
    if _current is not None:
        _current.set_waiting(True)
    try:
        yield
    finally:
        if _current is not None:
            _current.set_waiting(False)


def stop() -> None:
    global _current
    if _current is not None and _current.fields["pid"] == os.getpid():
        from loomtrain.comms import traffic

        traffic.set_wait_hook(None)
        _current.close()
    _current = None
