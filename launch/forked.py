"""Run a function on N local ranks forked from this process (no re-import of torch per rank).

Each child gets the environment torchrun (or ``srun``) would give it, so code under test
initializes its process group exactly as in production. Used by the tests and by the
benchmark scripts; ``world_size=0`` forks one process with no distributed environment.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import signal
import socket
import time
import traceback
import uuid
from multiprocessing.connection import wait as wait_any

import torch


def free_port() -> int:
    """A port free now, for a server started elsewhere (slurmctld in tests/test_slurm.py). Another process may
    take it before that server binds it; for torch's store the ranks are given a :func:`held_port`."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def held_port() -> socket.socket:
    """A socket bound to a free port and kept bound, not listening, until it is closed. Meanwhile no other
    process's bind, to that port or to port 0, gets it; a server that sets SO_REUSEADDR (torch's TCPStore,
    started by rank 0 from ``MASTER_PORT``) still binds and listens on it. Close it when the ranks are done."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    return s


LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS",
               "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE", "SLURM_JOB_NODELIST", "SLURM_JOB_ID")


def launch_env(launcher: str, rank: int, world: int, port: int) -> dict:
    """The variables torchrun or ``srun`` would give rank ``rank`` of a one-node job."""
    if launcher == "slurm":
        return {"SLURM_PROCID": str(rank), "SLURM_NTASKS": str(world), "SLURM_LOCALID": str(rank),
                "SLURM_NTASKS_PER_NODE": str(world), "SLURM_JOB_NODELIST": "127.0.0.1", "MASTER_PORT": str(port)}
    return {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def _child(fn, rank, world, port, args, conn, env, launcher, holder):
    try:
        holder.close()  # the launcher's copy keeps the port until the store is done with it
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


def _fork_ranks(fn, world_size: int, args, env: dict, launcher: str):
    """The ranks' processes and pipes, and the socket holding ``MASTER_PORT`` (the caller closes it once the
    ranks are reaped): no other process can take the port between here and rank 0's store binding it."""
    ctx = mp.get_context("fork")
    holder = held_port()
    port = holder.getsockname()[1]
    procs, pipes = [], []
    try:
        for rank in range(max(1, world_size)):
            parent, child = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_child, args=(fn, rank, world_size, port, args, child, env, launcher, holder))
            p.start()
            child.close()
            procs.append(p)
            pipes.append(parent)
    except BaseException:
        _reap(procs)
        holder.close()
        raise
    return procs, pipes, holder


def _new_run() -> dict:
    """A run id and a launch (chain) of its own: what a launcher invocation gives its ranks."""
    return {"LOOMTRAIN_RUN_ID": f"forked-{uuid.uuid4().hex[:12]}", "LOOMTRAIN_CHAIN": f"launch-{uuid.uuid4().hex[:12]}"}


def _reap(procs, grace: float = 5.0) -> None:
    for p in procs:
        p.join(grace)
        if p.is_alive():
            p.kill()
            p.join()


def run_ranks(fn, world_size: int, *args, timeout: float = 300.0, env: dict | None = None,
              launcher: str = "torchrun") -> list:
    """Run ``fn(rank, *args)`` in ``world_size`` forked processes wired as one torchrun-style job.

    ``world_size=0`` runs one forked process with no distributed environment (single-process mode).
    Returns the per-rank results; raises with the child's traceback if any rank failed.
    """
    procs, pipes, holder = _fork_ranks(fn, world_size, args, _new_run() | (env or {}), launcher)
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
        _reap(procs)
        holder.close()
    if errors:
        raise AssertionError("\n".join(errors))
    return results


def run_ranks_restarting(fn, world_size: int, *args, max_restarts: int = 1, timeout: float = 300.0,
                         env: dict | None = None, monitor=None) -> tuple[list, list[str]]:
    """Like ``run_ranks``, but when any rank fails (exception, signal, exit) the whole group is killed
    and started again, up to ``max_restarts`` times — what torch's elastic agent does, by fork.

    Each attempt sees ``LOOMTRAIN_ATTEMPT`` (0, 1, ...). ``monitor``: a ``HangMonitor`` watching the ranks'
    heartbeats (as ``loomtrain train --nproc`` runs one). Returns the last attempt's per-rank results
    and one line per failed attempt saying which rank failed and how.
    """
    failures = []
    run_env = _new_run() | (env or {})  # one run and launch: its attempts share both
    if monitor is not None:
        from loomtrain.faulttol.heartbeat import HEARTBEAT_DIR_ENV

        run_env[HEARTBEAT_DIR_ENV], monitor.expected = monitor.directory, world_size
        monitor.start()
        try:
            return _restarting(fn, world_size, args, max_restarts, timeout, run_env, failures)
        finally:
            monitor.stop()
    return _restarting(fn, world_size, args, max_restarts, timeout, run_env, failures)


def _restarting(fn, world_size, args, max_restarts, timeout, run_env, failures):
    for attempt in range(max_restarts + 1):
        attempt_env = dict(run_env, LOOMTRAIN_ATTEMPT=str(attempt))
        procs, pipes, holder = _fork_ranks(fn, world_size, args, attempt_env, "torchrun")
        results: dict[int, object] = {}
        failed = None
        deadline = time.monotonic() + timeout
        try:
            pending = dict(enumerate(pipes))
            while pending and failed is None:
                ready = wait_any(list(pending.values()), timeout=max(0.0, deadline - time.monotonic()))
                if not ready:
                    failed = f"attempt {attempt}: timed out after {timeout}s"
                for rank, conn in list(pending.items()):
                    if conn not in ready:
                        continue
                    del pending[rank]
                    try:
                        status, payload = conn.recv()
                    except EOFError:  # died without a word: a signal or os._exit
                        procs[rank].join(5)
                        failed = f"attempt {attempt}: rank {rank} died (exit code {procs[rank].exitcode})"
                        break
                    if status != "ok":
                        failed = f"attempt {attempt}: rank {rank} raised:\n{payload}"
                        break
                    results[rank] = pickle.loads(payload)
            if failed is not None and "raised" in failed:
                # A peer's "connection closed" often arrives before the dead rank's EOF: name the dead one.
                deadline = time.monotonic() + 2.0
                while time.monotonic() < deadline and not any((p.exitcode or 0) < 0 for p in procs):
                    time.sleep(0.05)
                dead = [r for r, p in enumerate(procs) if (p.exitcode or 0) < 0]
                if dead:
                    failed = f"attempt {attempt}: rank {dead[0]} died (exit code {procs[dead[0]].exitcode})"
        finally:
            if failed is not None:
                for p in procs:  # the rest of the group is stuck in collectives with the dead rank
                    if p.is_alive():
                        os.kill(p.pid, signal.SIGKILL)
            _reap(procs)
            holder.close()
        if failed is None:
            return [results[r] for r in range(len(procs))], failures
        failures.append(failed)
    raise AssertionError(f"gave up after {max_restarts} restart(s):\n" + "\n".join(failures))
