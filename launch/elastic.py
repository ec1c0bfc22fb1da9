"""Start N local ranks through torch's elastic launcher (what ``torchrun --standalone`` does)."""
from __future__ import annotations

import sys
import uuid


def worker_args(config_path: str, overrides: list[str], resume: str | None) -> list[str]:
    args = ["-m", "loomtrain.launch.train", config_path]
    for o in overrides:
        args += ["--set", o]
    if resume:
        args += ["--resume", resume]
    return args


def launch_local(config_path: str, overrides: list[str], nproc: int, max_restarts: int, resume: str | None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"loomtrain-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=max_restarts,
                          monitor_interval=0.5)
    try:
        elastic_launch(config, entrypoint=sys.executable)(*worker_args(config_path, overrides, resume))
    except ChildFailedError as e:
        failures = e.failures
        first = failures[min(failures)]
        print(f"error: rank {first.local_rank} failed with exit code {first.exitcode} "
              f"(after {max_restarts} restart(s)); see its output above", file=sys.stderr)
        return 1
    return 0
