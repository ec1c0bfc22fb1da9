"""A quantized average whose bytes stay below a bf16 ring at any worker count (``exchange: reduce_scatter``).

``PendingMean``'s quantized exchange all-gathers every worker's whole payload: (M-1) * q bytes a value per
worker (q = 0.5625 for the 4-bit kinds: half a byte plus a 4-byte scale per 64 values), which passes a bf16
ring's 2 * 2 (M-1)/M at about 7 workers. Here the M workers of ``group`` average in two stages instead:

1. **reduce-scatter of quantized shards.** Each worker flattens the tensors it is given into one buffer
   (zero-padded to M shards of L values, L a multiple of ``BLOCK``: a block never straddles two shards),
   quantizes it (stage 1: the worker's own values) and sends shard j to worker j (``all_to_all``). Worker
   j dequantizes the M shards it received and averages them in fp32 (summed in rank order, then / M).
2. **all-gather of the quantized average.** Worker j quantizes its averaged shard (stage 2: the mean, by its
   one owner) and all-gathers it; every worker dequantizes the M averaged shards into the same result, bit
   for bit.

Each value is quantized exactly twice (once in its worker's delta, once in the mean); no partial sum is
re-quantized. Bytes a value per worker: (M-1)/M * q in each stage, 2 (M-1)/M * q in all (0.28x a bf16
ring's, 0.14x an fp32 ring's, at every M) plus the padding, under M * BLOCK values per call. Payload and
scales travel packed in one uint8 message per shard.

Error feedback (optional, as with ``PendingMean``): stage 1's error stays with its worker (``sent`` is what
its payload decodes to), stage 2's with the shard's owner (``shard_residual``: tensors shaped like the
inputs, non-zero only on the owner's shard, added to its next average before quantizing).

Stage 2 cannot start before stage 1 has arrived: :meth:`poll` starts it when it has (the caller polls once
an inner step, so it overlaps the next step's compute), :meth:`wait` forces both.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from loomtrain.parallel.dp_sync.quantize import BLOCK, dequantize, quantize


def shard_len(numel: int, world: int) -> int:
    """L: values per shard, a multiple of ``BLOCK`` (M * L >= numel)."""
    return -(-numel // (world * BLOCK)) * BLOCK


def _payload_bytes(values: int, kind: str) -> int:
    return values if kind == "int8" else values // 2


def _pack(payload: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.cat([payload, scale.contiguous().view(torch.uint8)])


def _decode(packed: torch.Tensor, kind: str, values: int) -> torch.Tensor:
    """The fp32 values of one packed shard."""
    n = _payload_bytes(values, kind)
    return dequantize(packed[:n], packed[n:].view(torch.float32), kind, values)


def bytes_per_value(kind: str, world: int) -> float:
    """What one worker sends per averaged value, padding aside: 2 (M-1)/M times the quantized size."""
    q = _payload_bytes(BLOCK, kind) / BLOCK + 4 / BLOCK
    return 2 * (world - 1) / world * q


class PendingShardedMean:
    """The mean over ``group`` of ``tensors`` (each worker passes tensors of the same shapes), in flight.

    :meth:`parts` gives one pending average per input tensor (``wait()``, ``sent``, ``poll()``), the shape
    :class:`~loomtrain.parallel.dp_sync.quantize.PendingMean` has, so a caller can take either."""

    def __init__(self, tensors, kind: str, group, shard_residual=None):
        if kind == "none":
            raise ValueError("PendingShardedMean: needs a quantized kind (unquantized, an all-reduce is the ring)")
        self.kind, self.residual = kind, shard_residual
        self.shapes = [t.shape for t in tensors]
        self.numels = [t.numel() for t in tensors]
        self.numel = sum(self.numels)
        self.group = group
        solo = group is None or dist.get_world_size(group) == 1
        self.world = 1 if solo else dist.get_world_size(group)
        self.rank = 0 if solo else dist.get_rank(group)
        self.L = shard_len(self.numel, self.world)
        flat = self._flat(tensors)
        self.device = flat.device
        self._mine = quantize(flat, kind)  # stage 1
        payload, scale = self._mine
        per_payload, per_scale = _payload_bytes(self.L, kind), self.L // BLOCK
        sends = [_pack(payload[j * per_payload:(j + 1) * per_payload], scale[j * per_scale:(j + 1) * per_scale])
                 for j in range(self.world)]
        self._sent = self._result = None
        self._gathered = None  # stage 2's packed shards, once started
        if solo:
            self._received, self._works = sends, []
        else:
            self._received = [torch.empty_like(s) for s in sends]
            self._works = [dist.all_to_all(self._received, sends, group=group, async_op=True)]

    # ---- progress
    def poll(self) -> None:
        """Start stage 2 if stage 1 has arrived (never blocks)."""
        if self._gathered is None and all(w.is_completed() for w in self._works):
            self._start_stage_two()

    def _start_stage_two(self) -> None:
        for w in self._works:
            w.wait()
        total = torch.zeros(self.L, device=self.device)
        for packed in self._received:  # rank order: every worker's sum is the same
            total += _decode(packed, self.kind, self.L)
        mean = total / self.world
        if self.residual is not None:
            owned = slice(self.rank * self.L, (self.rank + 1) * self.L)
            kept = self._flat(self.residual)
            mean = mean + kept[owned]
            payload, scale = quantize(mean, self.kind)
            kept[owned] = mean - dequantize(payload, scale, self.kind, self.L)
            for t, piece in zip(self.residual, kept[:self.numel].split(self.numels)):
                t.view(-1).copy_(piece)
        else:
            payload, scale = quantize(mean, self.kind)
        mine = _pack(payload, scale)
        if self.world == 1:
            self._gathered, self._works = [mine], []
        else:
            self._gathered = [torch.empty_like(mine) for _ in range(self.world)]
            self._works = [dist.all_gather(self._gathered, mine, group=self.group, async_op=True)]

    def _flat(self, tensors) -> torch.Tensor:
        flat = torch.cat([t.detach().float().flatten() for t in tensors])
        return torch.cat([flat, flat.new_zeros(self.world * self.L - self.numel)])

    def _split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [piece.view(shape) for piece, shape in zip(flat[:self.numel].split(self.numels), self.shapes)]

    # ---- results
    def wait_all(self) -> list[torch.Tensor]:
        if self._result is None:
            if self._gathered is None:
                self._start_stage_two()
            for w in self._works:
                w.wait()
            self._result = self._split(torch.cat([_decode(p, self.kind, self.L) for p in self._gathered]))
        return self._result

    def sent_all(self) -> list[torch.Tensor]:
        """What this worker's stage-1 payload decodes to, per input tensor (for error feedback)."""
        if self._sent is None:
            self._sent = self._split(dequantize(*self._mine, self.kind, self.world * self.L))
        return self._sent

    def parts(self) -> list["_Part"]:
        return [_Part(self, i) for i in range(len(self.shapes))]


class _Part:
    """One input tensor's share of a :class:`PendingShardedMean`."""

    def __init__(self, whole: PendingShardedMean, i: int):
        self.whole, self.i = whole, i

    def poll(self) -> None:
        self.whole.poll()

    def wait(self) -> torch.Tensor:
        return self.whole.wait_all()[self.i]

    @property
    def sent(self) -> torch.Tensor:
        return self.whole.sent_all()[self.i]
