"""Run a function on N local ranks forked from this process (no re-import of torch per rank).

Each child gets the environment torchrun (or ``srun``) would give it, so code under test
initializes its process group exactly as in production. Used by the tests and by the
benchmark scripts; ``world_size=0`` forks one process with no distributed environment.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import socket
import traceback

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS",
               "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE", "SLURM_JOB_NODELIST", "SLURM_JOB_ID")


def launch_env(launcher: str, rank: int, world: int, port: int) -> dict:
    """The variables torchrun or ``srun`` would give rank ``rank`` of a one-node job."""
    if launcher == "slurm":
        return {"SLURM_PROCID": str(rank), "SLURM_NTASKS": str(world), "SLURM_LOCALID": str(rank),
                "SLURM_NTASKS_PER_NODE": str(world), "SLURM_JOB_NODELIST": "127.0.0.1", "MASTER_PORT": str(port)}
    return {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def _child(fn, rank, world, port, args, conn, env, launcher):
    try:
        torch.set_num_threads(1)  # libgomp's pool does not survive fork; one thread per rank
        for k in LAUNCH_VARS:
            os.environ.pop(k, None)
        os.environ.update(env)
        if world > 0:
            os.environ.update(launch_env(launcher, rank, world, port))
        result = fn(rank, *args)
        conn.send(("ok", pickle.dumps(result)))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()
        os._exit(0)


def run_ranks(fn, world_size: int, *args, timeout: float = 300.0, env: dict | None = None,
              launcher: str = "torchrun") -> list:
    """Run ``fn(rank, *args)`` in ``world_size`` forked processes wired as one torchrun-style job.

    ``world_size=0`` runs one forked process with no distributed environment (single-process mode).
    Returns the per-rank results; raises with the child's traceback if any rank failed.
    """
    ctx = mp.get_context("fork")
    port = free_port()
    procs, pipes = [], []
    for rank in range(max(1, world_size)):
        parent, child = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_child, args=(fn, rank, world_size, port, args, child, env or {}, launcher))
        p.start()
        child.close()
        procs.append(p)
        pipes.append(parent)
    results, errors = [], []
    try:
        for rank, conn in enumerate(pipes):
            if not conn.poll(timeout):
                errors.append(f"rank {rank}: timed out after {timeout}s")
                break
            status, payload = conn.recv()
            if status == "ok":
                results.append(pickle.loads(payload))
            else:
                errors.append(f"rank {rank}:\n{payload}")
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise AssertionError("\n".join(errors))
    return results
