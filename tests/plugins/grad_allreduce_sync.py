"""A data-parallel sync method from outside loomtrain: replicas average their gradients by hand.

Each ``dp_replicate`` replica is a worker (``local_updates``: FSDP shards and averages inside a worker
only); before the update this method all-reduces the gradient shards over the replicas, so the result
is plain data parallelism written as a sync method. Registered as ``parallel.dp_sync: grad_allreduce``.
"""
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from loomtrain.parallel.dp_sync import DP_SYNC
from loomtrain.parallel.dp_sync.every_step import StatelessSync


@DP_SYNC.register("grad_allreduce")
class GradAllReduce(StatelessSync):
    local_updates = True

    @classmethod
    def build(cls, exp, engine, *, blocks, params, names, group, worker_group=None):
        sync = cls(engine)
        sync.params, sync.group = params, group
        sync.replicas = dist.get_world_size(group)
        return sync

    def step(self):
        with torch.no_grad():
            for p in self.params:
                if p.grad is None:
                    continue
                g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
                dist.all_reduce(g, group=self.group)
                g.div_(self.replicas)
        return self.engine.step()
