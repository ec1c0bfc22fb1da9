"""Point-to-point transfers with byte/message accounting and an optional simulated link.

Everything context parallelism sends goes through :func:`exchange`, so tests can count
messages and benchmarks can count bytes per rank. ``LinkSimulator`` models a slower
link in-process (this kernel has no netem): a batch of transfers posted at time t
completes no earlier than t + latency + bytes / bandwidth, so transfers still overlap
the compute issued after them, as they would on a real link.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class CommStats:
    messages: int = 0  # tensors sent by this rank
    bytes: int = 0  # bytes sent by this rank

    def reset(self) -> None:
        self.messages = 0
        self.bytes = 0


@dataclass
class LinkSimulator:
    latency_s: float = 0.0
    bandwidth_bytes_per_s: float = float("inf")

    def transfer_time(self, nbytes: int) -> float:
        return self.latency_s + nbytes / self.bandwidth_bytes_per_s


STATS = CommStats()
_LINK: LinkSimulator | None = None


def set_link(link: LinkSimulator | None) -> None:
    """Simulate every later transfer over ``link`` (None: the real network only)."""
    global _LINK
    _LINK = link


class Pending:
    """Posted transfers; ``wait()`` returns once they (and the simulated link) are done."""

    def __init__(self, works, ready_at: float, keep_alive=()):
        self.works = works
        self.ready_at = ready_at
        self._keep_alive = keep_alive  # contiguous copies of sent tensors must outlive the transfer

    def wait(self) -> None:
        for w in self.works:
            w.wait()
        delay = self.ready_at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)


def account_collective(nbytes: int, messages: int) -> None:
    """Count a blocking collective's bytes (e.g. an all-to-all) and pay its simulated link time."""
    STATS.messages += messages
    STATS.bytes += nbytes
    if _LINK is not None and nbytes:
        time.sleep(_LINK.transfer_time(nbytes))


def exchange(sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]], group) -> Pending:
    """Post sends ``(tensor, group_rank)`` and receives ``(buffer, group_rank)`` as one batch.

    Tensors are made contiguous (gloo needs it); receive buffers must already be contiguous.
    """
    ops = []
    nbytes = 0
    for tensor, peer in sends:
        t = tensor.contiguous()
        ops.append(dist.P2POp(dist.isend, t, dist.get_global_rank(group, peer), group))
        nbytes += t.numel() * t.element_size()
    for buf, peer in recvs:
        assert buf.is_contiguous()
        ops.append(dist.P2POp(dist.irecv, buf, dist.get_global_rank(group, peer), group))
    STATS.messages += len(sends)
    STATS.bytes += nbytes
    works = dist.batch_isend_irecv(ops) if ops else []
    ready = time.perf_counter() + (_LINK.transfer_time(nbytes) if _LINK and sends else 0.0)
    return Pending(works, ready, ops)
