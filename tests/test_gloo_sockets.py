"""Sockets per rank do not grow with the world (issue 27 M7): gloo connects a group as a full mesh unless told to
connect lazily, and loomtrain runs several world-sized gloo groups, which at 1,024 ranks is thousands of sockets
per rank against a common limit of 1,024 open files."""
import os

import torch

from conftest import run_ranks


def _sockets() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except OSError:
            pass
    return count


def _groups_as_training_has_them(rank):
    """loomtrain's default group plus two world-sized background groups (snapshots, async checkpoints), each
    used as they are: an all-reduce and an all-gather of small objects."""
    import torch.distributed as dist

    from loomtrain.launch.env import init_distributed, shutdown
    from loomtrain.trainer.config import ParallelConfig

    os.environ.pop("TORCH_GLOO_LAZY_INIT", None)  # what a fresh rank sees, whatever the harness inherited
    init_distributed(ParallelConfig())
    try:
        groups = [None, dist.new_group(backend="gloo"), dist.new_group(backend="gloo")]
        for group in groups:
            flag = torch.ones(1)
            dist.all_reduce(flag, group=group)
            seen = [None] * dist.get_world_size()
            dist.all_gather_object(seen, rank, group=group)
        dist.barrier()
        return _sockets()
    finally:
        shutdown()


def test_sockets_per_rank_do_not_grow_with_the_world():
    """Doubling the world (4 -> 8 ranks) adds at most one socket per group to every rank but rank 0 (the store's
    host): gloo's algorithms talk to O(log world) peers. A full mesh of three groups would add 3 x 4 = 12."""
    small, large = (run_ranks(_groups_as_training_has_them, world) for world in (4, 8))
    assert max(large[1:]) <= max(small[1:]) + 3, (small, large)


def test_a_rank_raises_its_open_files_limit_to_the_hard_limit():
    """The other half of M7: a rank started with a low soft limit (1,024 is common) raises it to the hard one at
    start-up, where the sockets of many peers and the snapshot mappings need room."""
    import subprocess
    import sys

    code = ("import resource; from loomtrain.launch.env import few_sockets; few_sockets(); "
            "print(*resource.getrlimit(resource.RLIMIT_NOFILE))")

    def low_soft_limit():
        import resource

        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 4096))

    out = subprocess.run([sys.executable, "-c", code], preexec_fn=low_soft_limit, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["4096", "4096"], out
