"""Block-scaled quantization for outer syncs over slow links, the same on CPU and CUDA (plain torch ops).

``int8``: one fp32 scale per block of ``BLOCK`` values, ``scale = max|x| / 127``, values rounded to the
nearest step: error <= scale / 2 per value. ``fp4``: 4-bit floats (E2M1: sign, magnitudes 0, 0.5, 1,
1.5, 2, 3, 4, 6) times one fp32 scale per block, ``scale = max|x| / 6``, nearest value: error <= one
scale unit (the widest gap, 4..6, is 2 units). ``fp4_e3m0``: 4-bit floats with three exponent bits and no
mantissa (sign, magnitudes 0 and 2^-6 .. 2^0) times ``scale = max|x|``, nearest value (linear): error
<= half the gap around the value, a third of it at most (1.5 * 2^k -> 2^k or 2^(k+1)). E3M0 spans 64x
where E2M1 spans 12x, at one significant bit: on Gaussian blocks it zeroes fewer values but rounds the
rest more coarsely (``tests/test_diloco.py`` measures both). Values that are representable (multiples of
the step for int8, the grid times the scale for the 4-bit kinds) come back exactly.

Exchange (``all_gather_mean``) sends each rank's quantized payload and scales once; every rank
dequantizes all of them and averages in fp32, so nothing is quantized twice (a quantized all-reduce
would re-quantize partial sums).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

BLOCK = 64
KINDS = ("none", "int8", "fp4", "fp4_e3m0")
# 4-bit kinds: the eight magnitudes (code & 7) in increasing order; the sign is bit 3
GRIDS = {"fp4": torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]),
         "fp4_e3m0": torch.tensor([0.0] + [2.0 ** e for e in range(-6, 1)])}
_MIDPOINTS = {k: (g[1:] + g[:-1]) / 2 for k, g in GRIDS.items()}


def _blocks(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    flat = x.detach().float().flatten()
    n = flat.numel()
    pad = (-n) % BLOCK
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, BLOCK), n


def quantize(x: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(payload uint8, scales fp32 per block). int8: one byte a value; 4-bit kinds: two values a byte."""
    if kind not in KINDS[1:]:
        raise ValueError(f"quantize: must be one of {', '.join(KINDS)}, got {kind!r}")
    blocks, _ = _blocks(x)
    amax = blocks.abs().amax(dim=1)
    if kind == "int8":
        scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
        q = torch.round(blocks / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        return q.view(torch.uint8).flatten(), scale
    top = float(GRIDS[kind][-1])
    scale = torch.where(amax > 0, amax / top, torch.ones_like(amax))
    scaled = blocks / scale[:, None]
    # nearest magnitude, ties to the lower one, without an (N, 8) temporary
    idx = torch.bucketize(scaled.abs(), _MIDPOINTS[kind].to(blocks.device)).to(torch.uint8)
    code = idx | ((scaled < 0).to(torch.uint8) << 3)
    code = code.flatten()
    return code[0::2] | (code[1::2] << 4), scale


def dequantize(payload: torch.Tensor, scale: torch.Tensor, kind: str, numel: int) -> torch.Tensor:
    """The fp32 values ``quantize`` encoded (flat, ``numel`` long)."""
    if kind == "int8":
        values = payload.view(torch.int8).float().view(-1, BLOCK) * scale[:, None]
        return values.flatten()[:numel]
    code = torch.stack([payload & 0x0F, payload >> 4], dim=1).flatten()
    magnitude = GRIDS[kind].to(payload.device)[(code & 0x07).long()]
    values = torch.where((code & 0x08) > 0, -magnitude, magnitude).view(-1, BLOCK) * scale[:, None]
    return values.flatten()[:numel]


def wire_bytes(numel: int, kind: str) -> int:
    """Bytes one rank sends for ``numel`` values (payload + scales)."""
    if kind == "none":
        return 4 * numel
    blocks = -(-numel // BLOCK)
    per_value = 1.0 if kind == "int8" else 0.5
    return int(blocks * BLOCK * per_value) + 4 * blocks


class PendingMean:
    """An average over a group in flight; ``wait()`` returns it (fp32, the shape of the input).

    ``sent``: what this rank's payload decodes to (fp32, the shape of the input), so a caller can keep the
    quantization error for error feedback; ``None`` unquantized."""

    def __init__(self, x: torch.Tensor, kind: str, group):
        self.shape, self.kind, self.numel = x.shape, kind, x.numel()
        self.world = dist.get_world_size(group) if group is not None else 1
        self._mine = None  # (payload, scales) this rank sent, decoded only if ``sent`` is asked for
        if group is None or self.world == 1:
            self.result = x.detach().float().clone() if kind == "none" else \
                dequantize(*quantize(x, kind), kind, self.numel).view(self.shape)
            self.works = []
            return
        self.result = None
        if kind == "none":
            self.buf = x.detach().float().clone()
            self.works = [dist.all_reduce(self.buf, group=group, async_op=True)]
            return
        payload, scale = quantize(x, kind)
        self._mine = (payload, scale)
        self.payloads = [torch.empty_like(payload) for _ in range(self.world)]
        self.scales = [torch.empty_like(scale) for _ in range(self.world)]
        self.works = [dist.all_gather(self.payloads, payload, group=group, async_op=True),
                      dist.all_gather(self.scales, scale, group=group, async_op=True)]

    @property
    def sent(self) -> torch.Tensor | None:
        if self.kind == "none":
            return None
        if self._mine is None:  # one rank: the result is its own payload decoded
            return self.result
        return dequantize(*self._mine, self.kind, self.numel).view(self.shape)

    def poll(self) -> None:
        """Nothing to advance: one collective, started at once (``sharded.PendingShardedMean`` has two)."""

    def wait(self) -> torch.Tensor:
        if self.result is None:
            for w in self.works:
                w.wait()
            if self.kind == "none":
                self.result = (self.buf / self.world).view(self.shape)
            else:
                total = sum(dequantize(p, s, self.kind, self.numel) for p, s in zip(self.payloads, self.scales))
                self.result = (total / self.world).view(self.shape)
        return self.result
