"""Checkpointer edge cases: asynchronous saves finishing at different times on different ranks."""
import datetime
import os

from conftest import run_ranks


class _Future:
    def __init__(self, done):
        self._done = done

    def done(self):
        return self._done

    def result(self):
        return None


def _poll_when_ranks_disagree(rank, root):
    import torch
    import torch.distributed as dist

    from loomtrain.trainer.checkpoint import Checkpointer, latest_checkpoint

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
    try:
        ck = Checkpointer(root, keep=2, async_save=False, rank=rank)
        tmp, final = os.path.join(root, "step_00000001.tmp"), os.path.join(root, "step_00000001")
        if rank == 0:
            os.makedirs(tmp, exist_ok=True)
        dist.barrier()
        ck._pending = (_Future(done=rank == 0), tmp, final)  # rank 0 finished writing, rank 1 not yet
        ck.poll()
        committed_early = latest_checkpoint(root)
        x = torch.ones(1)
        dist.all_reduce(x)  # the next step's collective: must not meet a commit barrier on another rank
        ck._pending = (_Future(done=True), tmp, final)
        ck.poll()
        return committed_early, latest_checkpoint(root), x.item()
    finally:
        dist.destroy_process_group()


def test_async_commit_waits_for_every_rank(tmp_path):
    results = run_ranks(_poll_when_ranks_disagree, 2, str(tmp_path), timeout=120)
    for early, late, total in results:
        assert early is None  # nobody committed while rank 1 was still writing
        assert late == str(tmp_path / "step_00000001") and total == 2.0
