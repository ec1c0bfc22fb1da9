"""A slower link simulated in-process, for tests and benchmarks only (this kernel has no netem).

``SimulatedLink`` is a :class:`~loomtrain.comms.p2p.P2P` channel whose batch of transfers posted
at time t completes no earlier than t + latency + bytes / bandwidth, so transfers still overlap
the compute issued after them, as they would on a real link; a blocking collective pays its
transfer time at once. Hand it to an attention module as ``comm=``.
"""
from __future__ import annotations

import time

from loomtrain.comms.p2p import P2P, Pending


class _DelayedPending(Pending):
    def __init__(self, works, keep_alive, ready_at: float):
        super().__init__(works, keep_alive)
        self.ready_at = ready_at

    def wait(self) -> None:
        super().wait()
        delay = self.ready_at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)


class SimulatedLink(P2P):
    def __init__(self, latency_s: float = 0.0, bandwidth_bytes_per_s: float = float("inf")):
        super().__init__()
        self.latency_s = latency_s
        self.bandwidth_bytes_per_s = bandwidth_bytes_per_s

    def transfer_time(self, nbytes: int) -> float:
        return self.latency_s + nbytes / self.bandwidth_bytes_per_s

    def collective(self, nbytes: int, messages: int) -> None:
        super().collective(nbytes, messages)
        if nbytes:
            time.sleep(self.transfer_time(nbytes))

    def _posted(self, works, ops, nbytes: int) -> Pending:
        delay = self.transfer_time(nbytes) if nbytes else 0.0
        return _DelayedPending(works, ops, time.perf_counter() + delay)
