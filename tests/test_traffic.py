"""Byte accounting at the transport: each call counted once, under its group's purpose, by the ring formulas."""
import torch

from conftest import run_ranks


def _traffic(rank, world):
    import torch.distributed as dist
    from torch.distributed import _functional_collectives as funcol

    from loomtrain.comms import traffic

    dist.init_process_group("gloo")
    try:
        traffic.install()
        traffic.install()  # idempotent: still counted once
        pairs = dist.new_group([0, 1]), dist.new_group([2, 3])
        pair = pairs[rank // 2]
        traffic.label(pair, "tp")
        x = torch.ones(1000)  # 4,000 bytes
        dist.all_reduce(x)  # world: other
        dist.all_reduce(x, group=pair)  # tp
        funcol.all_reduce(x, "sum", pair).wait()  # the functional path DTensor takes: tp
        out = torch.empty(2000)
        dist.all_gather_into_tensor(out, x, group=pair)  # tp
        dist.reduce_scatter_tensor(torch.empty(500), x, group=pair)  # tp
        dist.all_gather_object([None] * world, {"a": 1})  # inner gathers only: other
        dist.gather(x, [torch.empty(1000) for _ in range(2)] if rank % 2 == 0 else None, group_dst=0,
                    group=pair)  # tp: 4,000 bytes from the pair's second rank, none from its first
        dist.broadcast(x, group_src=1, group=pair)  # tp: the pair's second rank sends 4,000
        peer = rank ^ 1
        ops = [dist.P2POp(dist.isend, torch.ones(250), peer, pair), dist.P2POp(dist.irecv, torch.empty(250), peer, pair)]
        for w in dist.batch_isend_irecv(ops):  # 1,000 bytes sent: tp
            w.wait()
        return traffic.counts(), traffic.messages()
    finally:
        dist.destroy_process_group()


def test_every_call_is_counted_once_by_the_formula_under_its_purpose():
    results = run_ranks(_traffic, 4, 4)
    for rank, (counts, messages) in enumerate(results):
        s, n = 4000, 2
        tp = 2 * (2 * (n - 1) * s // n) + (n - 1) * s + (n - 1) * s // n + 1000
        assert counts["tp"] == tp + (2 * s if rank % 2 else 0)  # gather and broadcast: sent by the second rank
        assert messages["tp"] == 7
        world_all_reduce = 2 * 3 * s // 4
        assert counts["other"] > world_all_reduce  # plus all_gather_object's size and payload gathers
        assert messages["other"] == 3
        assert counts["dp_sync"] == counts["fsdp"] == 0
