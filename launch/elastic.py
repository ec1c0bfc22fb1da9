"""Start N local ranks through torch's elastic launcher (what ``torchrun --standalone`` does).

With in-memory snapshots on, the launcher also starts one snapshot process (SMP) per
(simulated) node before the ranks and shuts them down after the last attempt: the SMPs
outlive every restart in between, which is what lets a restarted group restore from memory.
A hang monitor (``faulttol/hang_monitor.py``) watches the ranks' heartbeats from this process: it
kills a rank that hangs, which the elastic agent restarts like any other failure.

The launcher owns the run: it holds ``train.output_dir``'s lock (``launch/dirlock.py``) from before the first
rank starts until after the last attempt, so restarts never meet their own run's lock and a second launch on
the directory fails at once; and its ranks die with it (``launch/train.py``'s ``die_with_launcher``), so a
launcher killed outright leaves no rank training on into the directory.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import uuid

from loomtrain.faulttol.smp import LAUNCHER_PID_ENV  # for the ranks: the launcher they die with (launch/train.py)


def worker_args(config_path: str, overrides: list[str], resume: str | None) -> list[str]:
    args = ["-m", "loomtrain.launch.train", config_path]
    for o in overrides:
        args += ["--set", o]
    if resume:
        args += ["--resume", resume]
    return args


@contextlib.contextmanager
def node_snapshot_processes(exp, nproc: int):
    """One SMP per node of ``exp``'s layout on this host for the duration of the block (if snapshots are on)."""
    if not exp.faulttol.snapshot.every_steps:
        yield None
        return
    from loomtrain.faulttol.layout import NodeLayout, identical_replicas
    from loomtrain.faulttol.manager import HOST_ID_ENV, SMP_DIR_ENV, host_key
    from loomtrain.faulttol.smp import directory_nodes, host_label, start_daemon, stop_daemons
    from loomtrain.parallel.mesh import ParallelDims

    replicas = identical_replicas(ParallelDims.from_config(exp.parallel, nproc))
    layout = NodeLayout.from_config(exp.faulttol, nproc, nproc, replicas=replicas)
    # The labels the ranks will look for (FaultTolerance._agree_nodes): simulated nodes by number, else this host.
    nodes = range(layout.nodes) if layout.simulated and not os.environ.get(HOST_ID_ENV) else [host_label(host_key())]
    smp_dir = tempfile.mkdtemp(prefix="loomtrain-smp-")
    previous = os.environ.get(SMP_DIR_ENV)
    try:
        for node in nodes:
            start_daemon(smp_dir, node)
        os.environ[SMP_DIR_ENV] = smp_dir  # the workers inherit it
        yield smp_dir
    finally:
        stop_daemons(smp_dir, directory_nodes(smp_dir))  # also any a rank had to start
        shutil.rmtree(smp_dir, ignore_errors=True)
        if previous is None:
            os.environ.pop(SMP_DIR_ENV, None)
        else:
            os.environ[SMP_DIR_ENV] = previous


@contextlib.contextmanager
def owning_the_run(output_dir: str, run_id: str):
    """For the block: ``output_dir`` locked by this process (``DirectoryInUse`` if another run holds it), and in
    the environment the ranks started inside it inherit, that the lock is held for them and the pid to die with."""
    from loomtrain.launch.dirlock import HELD_ENV, acquire

    with acquire(output_dir, run=run_id) as lock:
        values = {HELD_ENV: lock.path, LAUNCHER_PID_ENV: str(os.getpid())}
        previous = {k: os.environ.get(k) for k in values}
        os.environ.update(values)
        try:
            yield lock
        finally:
            for k, v in previous.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def launch_local(exp, config_path: str, overrides: list[str], nproc: int, max_restarts: int,
                 resume: str | None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from loomtrain.faulttol.hang_monitor import watching

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"loomtrain-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=max_restarts,
                          monitor_interval=0.5)
    try:
        with owning_the_run(exp.train.output_dir, config.run_id), node_snapshot_processes(exp, nproc), \
                watching(nproc):
            elastic_launch(config, entrypoint=sys.executable)(*worker_args(config_path, overrides, resume))
    except ChildFailedError as e:
        failures = e.failures
        first = failures[min(failures)]
        print(f"error: rank {first.local_rank} failed with exit code {first.exitcode} "
              f"(after {max_restarts} restart(s)); see its output above", file=sys.stderr)
        return 1
    return 0
