"""Naming the slow rank (C4, NVIDIA's resiliency extension): which rank everyone else waits for.

In synchronous training every rank's step takes as long as the slowest one's, so step time cannot say
who is slow. The time a rank spends *outside* collectives can: the rank the others wait for spends the
least time blocked in them. Each step every rank measures

- ``busy``: the step's wall time minus the time its main thread was blocked in collectives
  (``comms/traffic.py``: blocking calls, ``Work.wait``, functional ``wait_tensor``), and
- ``data``: the time it waited for its batch,

and the pairs of all ranks travel with the step's stop-flag exchange (no extra collective). A rank is
named, with its host, when its busy time is at least ``threshold`` (1.2) times the median of the others'
in its cohort (its pipeline stage) in ``need`` (8) of the last ``window`` (10) steps; the cause is its data loader when its excess data time is at least
half its excess busy time, else compute. Checkpoints, snapshots' background work and evaluation are
outside the measured step, so they raise no alarm. Measured with host clocks on CPU and with CUDA events on
CUDA (:func:`timer_for`), where a kernel or collective returns to the host before the device has run it, so
host clocks would measure only the launches.
"""
from __future__ import annotations

import statistics
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch

from loomtrain.comms import traffic
from loomtrain.faulttol.manager import host_name
from loomtrain.log import say


@dataclass
class Straggler:
    rank: int
    host: str
    cause: str  # "compute" | "data loader"
    slowdown: float  # its busy time over the median of the others', median over the window
    since_step: int

    def record(self) -> dict:
        return {"straggler_rank": self.rank, "straggler_host": self.host, "straggler_cause": self.cause,
                "straggler_slowdown": round(self.slowdown, 3)}


class StragglerDetector:
    def __init__(self, hosts: list[str], threshold: float = 1.2, window: int = 10, need: int = 8,
                 cohorts: list[list[int]] | None = None):
        self.hosts, self.threshold, self.need, self.cohorts = hosts, threshold, need, cohorts
        self.recent: deque = deque(maxlen=window)  # per step: (slowest rank or None, ratio, cause)
        self.current: Straggler | None = None

    def observe(self, step: int, busy: list[float], data: list[float]) -> Straggler | None:
        """One step's measurements of every rank; returns a newly named straggler (else None). Ranks are
        compared with their cohort (``cohorts``: ranks doing the same work, e.g. one pipeline stage)."""
        slow, ratio, cause = None, 0.0, "compute"
        for cohort in self.cohorts or [list(range(len(busy)))]:
            if len(cohort) < 2:
                continue
            r = max(cohort, key=busy.__getitem__)
            typical = statistics.median(busy[i] for i in cohort if i != r)
            if typical <= 0:
                continue
            if busy[r] / typical > ratio:
                excess = busy[r] - typical
                data_excess = data[r] - statistics.median(data[i] for i in cohort if i != r)
                slow, ratio = r, busy[r] / typical
                cause = "data loader" if excess > 0 and data_excess >= 0.5 * excess else "compute"
        if slow is None:
            return None
        self._note(step, slow, ratio, cause)
        return self._named(step, slow)

    def _note(self, step: int, slow: int, ratio: float, cause: str) -> None:
        self.recent.append((slow if ratio >= self.threshold else None, ratio, cause))
        if self.current is not None and not any(r == self.current.rank for r, _, _ in self.recent):
            self.current = None  # a whole window without it: recovered

    def _named(self, step: int, slow: int) -> Straggler | None:
        hits = [(ratio, cause) for r, ratio, cause in self.recent if r == slow]
        if len(hits) >= self.need and (self.current is None or self.current.rank != slow):
            causes = [c for _, c in hits]
            self.current = Straggler(slow, self.hosts[slow], max(set(causes), key=causes.count),
                                     statistics.median(r for r, _ in hits), step)
            return self.current
        return None


class HostTimer:
    """A step's (busy, data) on host clocks: right where a call returns when its work is done (CPU).

    ``clock`` and ``blocked`` (seconds so far blocked in collectives) are the host clock and
    ``comms/traffic.py``'s counter; tests pass clocks they advance themselves, so what is named
    does not depend on how the machine schedules the ranks."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter,
                 blocked: Callable[[], float] = traffic.blocked_seconds):
        self.clock, self.blocked = clock, blocked
        self._t0 = self._blocked0 = self._data = 0.0

    def start(self) -> None:
        self._t0, self._blocked0 = self.clock(), self.blocked()

    def data_ready(self) -> None:
        self._data = self.clock() - self._t0

    def stop(self) -> tuple[float, float]:
        """(busy, data) of the step just measured."""
        return self.clock() - self._t0 - (self.blocked() - self._blocked0), self._data


class CudaTimer:
    """A step's (busy, data) in device time: CUDA events recorded on the current stream at the step's start,
    when its batch is ready and at its end, and around each of the main thread's waits on a collective
    (``comms/traffic.py`` records those; the device time they span is the time blocked in collectives).

    Reading an event's time needs the device to have reached it, so ``stop`` returns the *previous* step's
    times (zeros at the first), whose events are done by then: the step's exchange (the trainer's one host
    sync) came after them, so reading them never waits for the device. A straggler is named one step later
    than on CPU. Only waits made on the step's stream are bracketed: a wait issued under another stream
    (FSDP2's reduce-scatter stream) stalls that stream, not the step's; and the stream waits FSDP2 makes
    without ``Work.wait`` count as busy."""

    def __init__(self):
        self._marks: list = []
        self._stream = None
        self._previous = None  # (start, data ready, stop, [(before, after) of each wait])

    def _mark(self):
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def _wait_mark(self):
        return self._mark() if torch.cuda.current_stream() == self._stream else None

    def start(self) -> None:
        traffic.take_device_waits()  # waits outside a measured step (evaluation, checkpoints) do not count
        traffic.set_device_marker(self._wait_mark)
        self._stream = torch.cuda.current_stream()
        self._marks = [self._mark()]

    def data_ready(self) -> None:
        self._marks.append(self._mark())

    def stop(self) -> tuple[float, float]:
        self._marks.append(self._mark())
        traffic.set_device_marker(None)
        previous, self._previous = self._previous, (*self._marks, traffic.take_device_waits())
        if previous is None:
            return 0.0, 0.0
        t0, data, t1, waits = previous
        for e in [t1] + [after for _, after in waits]:
            e.synchronize()  # done already (see above): this does not wait
        blocked = sum(before.elapsed_time(after) for before, after in waits)
        return (t0.elapsed_time(t1) - blocked) / 1000, t0.elapsed_time(data) / 1000


def timer_for(device_type: str, **host):
    """The step timer for a device: CUDA events on CUDA, host clocks (``host``: clock, blocked) elsewhere."""
    return CudaTimer() if device_type == "cuda" else HostTimer(**host)


class HealthMonitor:
    """Per rank: times its steps (busy, data) and, from every rank's times, names the straggler.

    ``device_type`` picks the timer (:func:`timer_for`); ``clock`` and ``blocked`` are the host timer's."""

    def __init__(self, hosts: list[str], is_main: bool, clock: Callable[[], float] = time.perf_counter,
                 blocked: Callable[[], float] = traffic.blocked_seconds, device_type: str = "cpu", **detector):
        self.timer = timer_for(device_type, clock=clock, blocked=blocked)
        self.detector = StragglerDetector(hosts, **detector)
        self.is_main = is_main
        self.busy = self.data = 0.0

    def start(self) -> None:
        self.timer.start()

    def data_ready(self) -> None:
        self.timer.data_ready()

    def stop(self) -> None:
        self.busy, self.data = self.timer.stop()

    def observe(self, step: int, busy: list[float], data: list[float]) -> None:
        found = self.detector.observe(step, busy, data)
        if found is not None and self.is_main:
            say(f"health: WARNING: rank {found.rank} on host {found.host} is the slow one since step "
                f"{found.since_step}: its steps take {found.slowdown:.2f}x the others' outside collectives "
                f"({found.cause})")

    def record(self) -> dict:
        """metrics.jsonl fields while a straggler is named."""
        return self.detector.current.record() if self.detector.current is not None else {}


@traffic.counted_as("other")
def gather_hosts(world_size: int) -> list[str]:
    """Every rank's host name, by rank (collective on the default group)."""
    import torch.distributed as dist

    hosts = [None] * world_size
    dist.all_gather_object(hosts, host_name())
    return hosts
