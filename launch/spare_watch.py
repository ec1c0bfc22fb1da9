"""Under ``loomtrain slurm --spare-nodes``: requeue the job when its batch host is lost.

A job with spares runs with ``--no-kill``, so that a lost node ends neither the job nor the step. The batch host
is the exception: it runs the batch script and the rendezvous store, and when it dies Slurm (22.05, tried) kills the
batch step but keeps the job RUNNING on the other nodes, with nothing left to end or requeue it before its time
limit. The agents cannot go on either: their rendezvous store is gone. So each node's task runs under this watch:
it probes the store every ``every_s`` seconds (also after the task failed, for a while: the agents give up before
Slurm notices a dead node), and after ``misses`` failed probes in a row asks Slurm whether the
batch host has left the job's node list; if it has, it requeues the job (``scontrol requeue``; ``scancel`` when
Slurm says it may not be requeued), which then resumes from the last disk checkpoint like any requeued job.

    python -m loomtrain.launch.spare_watch --store HOST:PORT -- COMMAND ...
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import time

from loomtrain.log import say


def store_reachable(host: str, port: int, timeout_s: float = 3.0) -> bool:
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def _scontrol(*args: str) -> str:
    try:
        return subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""


def batch_host_lost(job: str) -> bool:
    """Slurm has removed the job's batch host from its node list (it failed; the job runs on without it)."""
    fields = dict(re.findall(r"(\w+)=(\S+)", _scontrol("show", "job", job)))
    batch, nodes = fields.get("BatchHost"), fields.get("NodeList")
    if not batch or not nodes or nodes == "(null)":
        return False
    return batch not in _scontrol("show", "hostnames", nodes).split()


def end_job(job: str) -> None:
    """Requeue the job, or cancel it if it may not be requeued. Every node's watch may get here: a requeue
    refused because another node's came first ("Job is pending execution") is fine, and never a cause to cancel."""
    if dict(re.findall(r"(\w+)=(\S+)", _scontrol("show", "job", job))).get("Requeue") == "0":
        say(f"loomtrain: the batch host of job {job} (the rendezvous store) is lost; the job may not be requeued: "
            f"cancelling it")
        subprocess.run(["scancel", job], capture_output=True)
        return
    say(f"loomtrain: the batch host of job {job} (the rendezvous store) is lost: requeueing the job")
    subprocess.run(["scontrol", "requeue", job], capture_output=True)


def watch(command: list[str], host: str, port: int, job: str, every_s: float = 5.0, misses: int = 3,
          wait_s: float = 600.0) -> int:
    """Run ``command``; its exit status. Meanwhile, and for up to ``wait_s`` after it failed while the store was
    unreachable (the agents give up before Slurm notices a dead node: SlurmdTimeout, 300 s by default), end the
    job if the store is lost with the batch host."""
    # Slurm signals every process of the step itself: this one stays to report the command's status.
    signal.signal(signal.SIGTERM, lambda *_: None)
    proc = subprocess.Popen(command)
    missed, deadline = 0, None
    while True:
        try:
            rc = proc.wait(timeout=every_s) if proc.returncode is None else proc.returncode
        except subprocess.TimeoutExpired:
            rc = None
        if rc == 0:
            return 0
        missed = 0 if store_reachable(host, port) else missed + 1
        if missed >= misses and batch_host_lost(job):
            end_job(job)
            return proc.wait() if rc is None else rc  # Slurm ends the step now
        if rc is not None:
            if missed == 0:
                return rc  # failed with the store alive: not this watch's business
            deadline = deadline or time.monotonic() + wait_s
            if time.monotonic() > deadline:
                return rc
            time.sleep(every_s)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loomtrain.launch.spare_watch", description=__doc__.split("\n")[0])
    p.add_argument("--store", required=True, metavar="HOST:PORT", help="the rendezvous store on the batch host")
    p.add_argument("--every-s", type=float, default=5.0, help="seconds between probes of the store (default 5)")
    p.add_argument("--misses", type=int, default=3, help="failed probes in a row before asking Slurm (default 3)")
    p.add_argument("--wait-s", type=float, default=600.0,
                   help="after the command failed with the store unreachable, how long to wait for Slurm to drop the "
                        "batch host (default 600; Slurm's SlurmdTimeout is 300 by default)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ...")
    a = p.parse_args(argv)
    command = a.command[1:] if a.command[:1] == ["--"] else a.command
    host, _, port = a.store.rpartition(":")
    if not command or not host or not port.isdigit():
        p.error("usage: --store HOST:PORT -- COMMAND ...")
    return watch(command, host, int(port), os.environ.get("SLURM_JOB_ID", ""), a.every_s, a.misses,
                 a.wait_s)


if __name__ == "__main__":
    sys.exit(main())
