"""A context-parallel strategy from outside loomtrain: all-gather K/V (Megatron's ``allgather`` CP).

Each rank keeps its zigzag shard of Q, gathers every rank's K and V, and attends to them with a
causal (and document) mask built from the tokens' global positions. Backward all-reduces the K/V
gradients and keeps this rank's rows. Registered as ``parallel.cp_impl: allgather``.
"""
import math

import torch
import torch.distributed as dist

from loomtrain.parallel.cp import CP_STRATEGIES
from loomtrain.parallel.cp.attention import shard_for
from loomtrain.parallel.cp.cost import attention_flops


class _GatherRows(torch.autograd.Function):
    """(B, S/W, ...) shard -> (B, S, ...) rows of every rank in rank order; gradients summed back."""

    @staticmethod
    def forward(ctx, x, group, world, rank):
        ctx.meta = group, world, rank, x.shape[1]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad):
        group, world, rank, n = ctx.meta
        grad = grad.contiguous()
        dist.all_reduce(grad, group=group)
        return grad[:, rank * n:(rank + 1) * n], None, None, None


class AllGatherAttention:
    def __init__(self, group):
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def __call__(self, q, k, v, *, causal=True, doc_ids=None, return_lse=False):
        b, n, h, d = q.shape
        seq = n * self.world
        positions = torch.arange(seq, device=q.device).unsqueeze(0)
        q_pos = shard_for(positions, self.rank, self.world, dim=1)[0]  # (n,)
        k_pos = torch.cat([shard_for(positions, r, self.world, dim=1)[0] for r in range(self.world)])  # gathered order
        k_all = _GatherRows.apply(k, self.group, self.world, self.rank)
        v_all = _GatherRows.apply(v, self.group, self.world, self.rank)
        rep = h // k.shape[2]
        k_all, v_all = k_all.repeat_interleave(rep, dim=2), v_all.repeat_interleave(rep, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k_all.float()) / math.sqrt(d)
        allowed = (k_pos[None, :] <= q_pos[:, None]) if causal else torch.ones(n, seq, dtype=torch.bool)
        allowed = allowed.to(q.device).expand(b, n, seq)
        if doc_ids is not None:
            docs = _GatherRows.apply(doc_ids.unsqueeze(-1), self.group, self.world, self.rank).squeeze(-1)
            allowed = allowed & (doc_ids[:, :, None] == docs[:, None, :])
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)  # (b, h, n)
        out = torch.einsum("bhqk,bkhd->bqhd", torch.exp(scores - lse[..., None]), v_all.float()).to(q.dtype)
        return (out, lse) if return_lse else out


class AllGather:
    needs_reverse_group = False
    overlaps_compute = False

    def unsupported(self, heads, kv_heads, world):
        return None

    def bytes_per_rank(self, shape):
        kv = shape.batch * shape.seq // shape.world * shape.kv_heads * shape.head_dim
        fwd = (shape.world - 1) * 2 * kv * shape.elem_bytes  # all-gather of K and V
        return fwd, 2 * (shape.world - 1) / shape.world * 2 * kv * shape.world * 4  # fp32 all-reduce of dK, dV

    def seconds(self, shape, bandwidth, latency, flops, topology="full_mesh"):
        fwd, bwd = self.bytes_per_rank(shape)
        return attention_flops(shape) / shape.world / flops + (fwd + bwd) / bandwidth + 2 * latency

    def make(self, group, *, reverse_group=None, layout="zigzag", comm=None, kernel="auto"):
        return AllGatherAttention(group if group is not None else dist.group.WORLD)


CP_STRATEGIES.add("allgather", AllGather())
