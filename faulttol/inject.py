"""Fault injection (``faulttol.inject``) and the hang watchdog.

Faults fire once, right after the configured optimizer step (``snapshot_kill``: inside a
phase of that step's snapshot, or of its restore), and only on the configured attempt
(``faulttol.inject.attempt``, default 0: torch elastic's ``TORCHELASTIC_RESTART_COUNT``, or
``LOOMTRAIN_ATTEMPT`` from the test harness), so the restarted group runs through.
"""
from __future__ import annotations

import faulthandler
import os
import signal
import sys
import threading
import time
from typing import Protocol

from loomtrain.faulttol.smp import SnapshotClient, remove_segments, segment_prefix, socket_path
from loomtrain.registry import Registry
from loomtrain.log import say

EXIT_HANG = 124  # what timeout(1) uses


def attempt() -> int:
    """0 on a job's first run, n after n restarts."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or os.environ.get("LOOMTRAIN_ATTEMPT") or 0)


class InjectedFault(RuntimeError):
    pass


def due(cfg, rank: int, step: int) -> bool:
    """The fault's rank, step and attempt are now."""
    return cfg.kind != "none" and step == cfg.step and attempt() == cfg.attempt and rank == cfg.rank


class FaultKind(Protocol):
    """The contract of a fault kind (``faulttol.inject.kind``; tests and demos of recovery).

    ``after_step(cfg, rank, step, node, smp_dir)``: called on every rank after every optimizer step; fires
    when the fault is due (:func:`due`: its rank, step and attempt). ``snapshot_hook(cfg, rank)``: a hook
    ``(phase, step)`` the snapshot thread calls at each phase of a snapshot or restore, or None.
    ``cfg``: the ``faulttol.inject`` section; ``node``/``smp_dir``: this rank's node and the snapshot
    processes' directory (None without snapshots).
    """

    def after_step(self, cfg, rank: int, step: int, node: str | None, smp_dir: str | None) -> None: ...

    def snapshot_hook(self, cfg, rank: int): ...


class AfterStep:
    """A fault fired right after its optimizer step; subclasses say what it does (:meth:`fire`)."""

    def after_step(self, cfg, rank: int, step: int, node: str | None, smp_dir: str | None) -> None:
        if due(cfg, rank, step):
            say(f"faulttol: injecting '{cfg.kind}' on rank {rank} after step {step}")
            self.fire(rank, step, node, smp_dir)

    def fire(self, rank: int, step: int, node: str | None, smp_dir: str | None) -> None:
        raise NotImplementedError

    def snapshot_hook(self, cfg, rank: int):
        return None


class SigKill(AfterStep):
    def fire(self, rank, step, node, smp_dir):
        os.kill(os.getpid(), signal.SIGKILL)


class Raise(AfterStep):
    def fire(self, rank, step, node, smp_dir):
        raise InjectedFault(f"injected exception on rank {rank} after step {step}")


class Hang(AfterStep):
    def fire(self, rank, step, node, smp_dir):
        while True:  # the watchdog has to notice
            time.sleep(1.0)


class SmpKill(AfterStep):
    def fire(self, rank, step, node, smp_dir):
        _kill_smp(node, smp_dir)


class NodeLoss(AfterStep):
    def fire(self, rank, step, node, smp_dir):
        _lose_node(node, smp_dir)


class SnapshotKill:
    """SIGKILL inside a phase (``faulttol.inject.phase``) of the snapshot of its step (or of its restore)."""

    def after_step(self, cfg, rank, step, node, smp_dir) -> None:
        pass

    def snapshot_hook(self, cfg, rank: int):
        def hook(phase: str, step: int) -> None:
            if phase == cfg.phase and due(cfg, rank, step):
                say(f"faulttol: injecting 'snapshot_kill' on rank {rank} inside the '{phase}' phase of the "
                    f"snapshot of step {step}")
                os.kill(os.getpid(), signal.SIGKILL)

        return hook


FAULT_KINDS = Registry("faulttol.inject.kind", "fault kind", special=("none",))
for _name, _kind in (("sigkill", SigKill()), ("exception", Raise()), ("hang", Hang()), ("smp_kill", SmpKill()),
                     ("node_loss", NodeLoss()), ("snapshot_kill", SnapshotKill())):
    FAULT_KINDS.add(_name, _kind)


def snapshot_phase_fault(cfg, rank: int):
    """The configured fault's hook into the snapshot thread's phases (None when it has none)."""
    return None if cfg.kind == "none" else FAULT_KINDS.get(cfg.kind).snapshot_hook(cfg, rank)


def maybe_inject(cfg, rank: int, step: int, node: str | None, smp_dir: str | None) -> None:
    """Fire ``cfg`` (an InjectConfig) if this is its rank, its step, and its attempt."""
    if cfg.kind != "none":
        FAULT_KINDS.get(cfg.kind).after_step(cfg, rank, step, node, smp_dir)


def _kill_smp(node: str | None, smp_dir: str | None) -> dict:
    """SIGKILL node ``node``'s snapshot process (it cannot unlink anything); returns what it reported."""
    if smp_dir is None or node is None:
        raise InjectedFault("faulttol.inject: smp_kill/node_loss need snapshots on (faulttol.snapshot.every_steps)")
    info = SnapshotClient(socket_path(smp_dir, node))._call(op="ping")
    os.kill(info["pid"], signal.SIGKILL)
    return info


def _lose_node(node: str | None, smp_dir: str | None) -> None:
    """A node disappears: its SMP and its memory, then every rank on it (this one last)."""
    say(f"faulttol: injecting 'node_loss' of node {node}")
    info = _kill_smp(node, smp_dir)
    remove_segments(segment_prefix(smp_dir, node))  # the node's RAM is gone
    for pid in info["ranks"].values():
        if pid != os.getpid():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    os.kill(os.getpid(), signal.SIGKILL)


class Watchdog:
    """Exit the process when the training loop makes no progress for ``timeout_s`` (a hang).

    A hung rank holds its peers in a collective; exiting lets the launcher see a failure
    and restart the group. Armed from construction: until the first step it allows
    ``startup_s`` (snapshot-process hookup, process-group creation, restore, the first step's
    compilation), then ``timeout_s`` between steps.
    """

    def __init__(self, timeout_s: float, rank: int, startup_s: float = 0.0):
        self.timeout_s, self.rank, self.startup_s = timeout_s, rank, max(startup_s, timeout_s)
        self._last = time.monotonic()
        self._started = False
        self._stop = threading.Event()
        self._thread = None
        if timeout_s > 0:
            self._thread = threading.Thread(target=self._watch, name="watchdog", daemon=True)
            self._thread.start()

    def beat(self) -> None:
        self._last = time.monotonic()
        self._started = True

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout_s / 4)):
            limit = self.timeout_s if self._started else self.startup_s
            if time.monotonic() - self._last > limit:
                phase = "between steps" if self._started else "before its first step"
                say(f"faulttol: watchdog: rank {self.rank} made no progress for {limit:g}s {phase}; "
                    f"exiting so the launcher restarts the group. Stacks:")
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                os._exit(EXIT_HANG)
