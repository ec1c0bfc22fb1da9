"""Point-to-point transfers with byte/message accounting.

Everything context parallelism sends goes through a :class:`P2P` channel (one per attention
module), so tests can count messages and benchmarks can count bytes per rank. The channel
only posts and counts; slower links are simulated by a wrapper that is never used in
production (``comms/link_sim.py``).
"""
from __future__ import annotations

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


class Pending:
    """Posted transfers; ``wait()`` returns once they are done."""

    def __init__(self, works, keep_alive=()):
        self.works = works
        self._keep_alive = keep_alive  # contiguous copies of sent tensors must outlive the transfer

    def wait(self) -> None:
        for w in self.works:
            w.wait()


class P2P:
    """Posts batched sends/receives on a process group and counts what this rank sends."""

    def __init__(self):
        self.stats = CommStats()

    def exchange(self, sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]],
                 group) -> Pending:
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
        self.stats.messages += len(sends)
        self.stats.bytes += nbytes
        works = dist.batch_isend_irecv(ops) if ops else []
        return self._posted(works, ops, nbytes)

    def collective(self, nbytes: int, messages: int) -> None:
        """Count a blocking collective this rank just ran (e.g. an all-to-all)."""
        self.stats.messages += messages
        self.stats.bytes += nbytes

    def _posted(self, works, ops, nbytes: int) -> Pending:
        return Pending(works, ops)
