"""The trainer's side of fault tolerance: SMP hookup, snapshots on schedule, restore, injection, watchdog.

The trainer calls ``locate`` (and, if it found an epoch, ``snapshots.restore``) once after building
model and optimizer, ``before_update`` before each optimizer step, ``after_step`` after each step
and ``close`` at the end.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import socket
import uuid

import torch
import torch.distributed as dist

from loomtrain.comms import traffic
from loomtrain.fsutil import atomic_write_text
from loomtrain.faulttol import heartbeat
from loomtrain.faulttol.inject import Watchdog, attempt, maybe_inject, snapshot_phase_fault
from loomtrain.faulttol.layout import NodeLayout, identical_replicas
from loomtrain.faulttol.smp import (SMPError, SnapshotClient, ensure_daemon, host_label, job_directory,
                                   secure_directory, socket_path, stop_daemons)
from loomtrain.errors import ConfigError
from loomtrain.log import say

SMP_DIR_ENV = "LOOMTRAIN_SMP_DIR"
RUN_ID_ENV = "LOOMTRAIN_RUN_ID"
HOST_ID_ENV = "LOOMTRAIN_HOST_ID"
CHAIN_ENV = "LOOMTRAIN_CHAIN"  # set by loomtrain's launchers and the test harness: one launch and its restarts
RUN_ID_FILE = ".run_id"  # in the output directory, when no launcher names the run
# A start-up hookup of the SMPs that failed is tried again at later snapshot steps, every rank together: the gaps
# double from one snapshot interval up to HOOKUP_MAX_GAP intervals, and after HOOKUP_TRIES tries (start-up's
# included) snapshots stay off for the run.
HOOKUP_TRIES = 8
HOOKUP_MAX_GAP = 32


def smp_directory(exp) -> str:
    """Where the node SMPs' sockets live: the launcher's choice, else one per job and output directory."""
    return os.environ.get(SMP_DIR_ENV) or job_directory(exp.train.output_dir, os.environ.get("SLURM_JOB_ID", ""))


def host_name() -> str:
    """This host's name for people and cluster descriptions: ``LOOMTRAIN_HOST_ID``, else the hostname."""
    return os.environ.get(HOST_ID_ENV) or socket.gethostname()


def host_key() -> str:
    """Which machine this is, stable across renumbering and restarts, different after a reboot or on a
    replacement host: the hostname and the kernel's boot id (``LOOMTRAIN_HOST_ID`` overrides)."""
    if os.environ.get(HOST_ID_ENV):
        return os.environ[HOST_ID_ENV]
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}:{boot}"


def run_id() -> str:
    """Fixed at launch and the same in every restart: loomtrain's launcher (or the test harness),
    torchrun's rendezvous id, or Slurm's job id. Empty when nothing names the run."""
    for var in (RUN_ID_ENV, "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID"):
        value = os.environ.get(var, "")
        if value and value != "none":
            return value
    return ""


def launch_chain() -> str:
    """Which launch this process belongs to: the same across its launcher's restarts, new at a relaunch
    (even one with the same run id: a fixed ``--rdzv-id``, one Slurm job, a fixed ``LOOMTRAIN_RUN_ID``).
    ``LOOMTRAIN_CHAIN`` where loomtrain's harness names it; under torch elastic, the agent that started
    this rank (its pid and start time on this host). Empty without a launcher: nothing restarts a bare
    process, so it never restores from memory."""
    if os.environ.get(CHAIN_ENV):
        return os.environ[CHAIN_ENV]
    if not os.environ.get("TORCHELASTIC_RUN_ID"):
        return ""
    parent = os.getppid()
    try:
        with open(f"/proc/{parent}/stat") as f:
            started = f.read().rpartition(")")[2].split()[19]  # field 22, starttime: pids are reused
    except (OSError, IndexError):
        started = ""
    return f"{host_key()}:{parent}:{started}"


def code_version() -> str:
    """A hash of loomtrain's source: a snapshot written by other code is not this run's state."""
    import loomtrain

    digest = hashlib.sha256(loomtrain.__version__.encode())
    roots = [os.path.dirname(loomtrain.__file__)] + [
        os.path.dirname(importlib.util.find_spec(f"loomtrain.{sub}").origin) for sub in CODE_PACKAGES]
    for root in roots:
        for name in sorted(os.listdir(root)):
            if name.endswith(".py"):
                with open(os.path.join(root, name), "rb") as f:
                    digest.update(name.encode() + b"\0" + f.read())
    return digest.hexdigest()[:16]


CODE_PACKAGES = ("trainer", "parallel", "comms", "faulttol", "data", "launch")


def state_signature(exp, env, dims, layout) -> str:
    """What must be equal for a snapshot to be this run's state: the full resolved config, the world and
    mesh, the node layout and the code."""
    config = json.dumps(exp.to_dict(), sort_keys=True, default=str)
    parts = [config, str(env.world_size), dims.describe(), repr(layout), code_version()]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def node_racks(cluster, ft, env) -> list[str] | None:
    """Each node's fabric group (its failure domain: a rack's or a switch's hosts), from the cluster description."""
    if cluster is None:
        return None
    rpn = ft.ranks_per_node or env.local_world_size
    return [cluster.hosts[cluster.host_of(node * rpn)].fabric for node in range(env.world_size // rpn)]


class FaultTolerance:
    @traffic.counted_as("snapshot")
    def __init__(self, exp, env, dims, cluster=None):
        """``cluster``: the placement's cluster description (hosts in rank order), whose fabric groups are the
        failure domains EC groups are spread over."""
        self.exp, self.env, self.cfg = exp, env, exp.faulttol
        self.layout = NodeLayout.from_config(self.cfg, env.world_size, env.local_world_size,
                                             replicas=identical_replicas(dims), racks=node_racks(cluster, self.cfg,
                                                                                                env))
        self.every = self.cfg.snapshot.every_steps
        self.snapshots = None
        self.smp_dir = None
        self.node = None
        self.attempt, self.run = self._agree_generation()
        self.snapshot_failures = 0
        # SMP hookup: tries so far, scheduled snapshot steps to let pass before the next one after a failure,
        # and why the last one failed (the same on every rank: decided by collectives).
        self.hookup_tries, self._hookup_wait, self._hookup_why = 0, 0, ""
        self._chain, self._signature = "", ""
        # Armed first: SMP hookup, snapshot groups and the restore can hang too. Where a hang monitor watches
        # from outside (loomtrain's launchers, the sbatch script), it owns hangs and this stays off.
        self.watchdog = Watchdog(0 if heartbeat.watched() else self.cfg.hang_timeout_s, env.rank,
                                 self.cfg.startup_timeout_s)
        if self.every:
            self._connect(dims)

    def _connect(self, dims) -> None:
        """Start-up: agree on the nodes and the generation, and hook every rank up to its node's SMP. Where some
        rank cannot (its SMP unreachable, or failing to start), training goes on without snapshots and
        ``after_step`` tries again, every rank together, at later snapshot steps (``_retry_hookup``)."""
        self.node = self._agree_nodes()
        self._signature = state_signature(self.exp, self.env, dims, self.layout)
        self._chain = launch_chain()
        why = self._try_hookup(start_up=True)
        if why is not None:
            self._hookup_failed(why, None)

    def _try_hookup(self, start_up: bool) -> str | None:
        """Collective: hook every rank up to its SMP and create the snapshot groups; None and ``self.snapshots``
        set, or why not (the same on every rank). A failure to create the groups does not raise either:
        mid-run, nothing here may stop training."""
        why = self._agree_hookup(self._hook_up(start_up))
        if why is not None:
            return why
        snapshots, problem = None, None
        try:
            snapshots = self._snapshotter()
        except Exception as e:  # noqa: BLE001 - decided below, on every rank
            problem = f"creating the snapshot process groups: {type(e).__name__}: {e}"
        why = self._agree_hookup(problem)
        if why is None:
            self.snapshots = snapshots
        elif snapshots is not None:
            try:
                snapshots._destroy_groups()
            except Exception:  # noqa: BLE001 - never used again
                pass
        return why

    def _hook_up(self, start_up: bool) -> str | None:
        """Collective: make sure this rank's node SMP runs (the node's first rank starts one that does not
        answer) and register with it; at start-up also agree on (attempt, run) from what the SMPs remember.
        This rank's problem in one line, or None. A local failure is recorded, never raised: every rank must
        reach every collective here."""
        env, layout, node = self.env, self.layout, self.node
        first = env.rank == layout.node_ranks(layout.node_of(env.rank))[0]
        problem, client = None, None

        def guarded(fn):
            """Run a local step unless an earlier one failed; a failure is recorded, never raised (every
            rank must still reach the collectives below)."""
            nonlocal problem
            if problem is None:
                try:
                    return fn()
                except (SMPError, OSError) as e:
                    problem = str(e)
            return None

        def connect():
            nonlocal client
            self.smp_dir = secure_directory(smp_directory(self.exp))
            client = SnapshotClient(socket_path(self.smp_dir, node), run=self.run, attempt=self.attempt,
                                    chain=self._chain)
            # Launchers start SMPs; one missing (bare torchrun, or killed) is started here, detached.
            if first and ensure_daemon(self.smp_dir, node, self.cfg.smp_idle_exit_s):
                say(f"faulttol: started the snapshot process of node {node} ({self.smp_dir})")

        guarded(connect)  # the node's first rank makes sure its SMP is up
        dist.barrier()
        if start_up:
            info = guarded(lambda: client._call(op="ping", chain=self._chain))
            self.attempt, self.run = self._agree_chain(info)
            if client is not None:
                client.run, client.attempt = self.run, self.attempt
        if first:
            guarded(lambda: client.register(env.rank))  # first: a new run or attempt drops what can never serve it
        dist.barrier()
        if not first:
            guarded(lambda: client.register(env.rank))
        return problem

    def _agree_hookup(self, problem: str | None) -> str | None:
        """Collective: None if every rank hooked up, else the same line on every rank: the lowest failing rank,
        its node and its reason, and how many ranks failed."""
        world = self.env.world_size
        failed = torch.tensor([1 if problem else 0], dtype=torch.int64)
        lowest = torch.tensor([self.env.rank if problem else world], dtype=torch.int64)
        dist.all_reduce(failed, op=dist.ReduceOp.SUM)
        dist.all_reduce(lowest, op=dist.ReduceOp.MIN)
        if not failed.item():
            return None
        src = int(lowest.item())
        why = [f"rank {self.env.rank} (node {self.node}): {problem}" if problem else None]
        dist.broadcast_object_list(why, src=src)
        others = int(failed.item()) - 1
        return why[0] + (f" (and {others} other rank(s))" if others else "")

    def _snapshotter(self):
        from loomtrain.faulttol.snapshot import Snapshotter

        snap = self.cfg.snapshot
        return Snapshotter(self.layout, self.env.rank, self.smp_dir, self._signature, self.node, self.env.device,
                           run=self.run, attempt=self.attempt, timeout_s=snap.timeout_s, min_gbps=snap.min_gbps,
                           idle_exit_s=self.cfg.smp_idle_exit_s,
                           fault=snapshot_phase_fault(self.cfg.inject, self.env.rank))

    def _hookup_failed(self, why: str, step: int | None) -> None:
        """After a failed hookup (decided on every rank): schedule the next try, the gaps doubling from one
        snapshot interval up to HOOKUP_MAX_GAP, or give up after HOOKUP_TRIES. Rank 0 says so in one line."""
        self.hookup_tries += 1
        self._hookup_why = why
        gap = min(2 ** (self.hookup_tries - 1), HOOKUP_MAX_GAP)  # in snapshot intervals
        self._hookup_wait = gap - 1
        if self.env.rank != 0:
            return
        at = "at start-up" if step is None else f"at step {step}"
        if self.hookup_tries >= HOOKUP_TRIES:
            then = "no more tries: in-memory snapshots are off for the rest of this run"
        elif step is None:
            then = "trying again at the next snapshot step"
        else:
            then = f"trying again at step {step + gap * self.every}"
        say(f"faulttol: WARNING: in-memory snapshots are off: hooking up the snapshot processes failed {at} "
            f"(try {self.hookup_tries} of {HOOKUP_TRIES}): {why}; {then}")

    def _retry_hookup(self, step: int) -> None:
        """At a snapshot step while start-up's hookup has not succeeded: every rank decides alike whether a try is
        due (the schedule depends only on agreed results), and all try together; on success snapshots start
        with this step's."""
        if self.hookup_tries >= HOOKUP_TRIES:
            return
        if self._hookup_wait > 0:
            self._hookup_wait -= 1
            return
        why = self._try_hookup(start_up=False)
        if why is not None:
            self._hookup_failed(why, step)
            return
        if self.env.rank == 0:
            say(f"faulttol: in-memory snapshots are on from step {step}: every node's snapshot process answers "
                f"(after {self.hookup_tries} failed tr{'y' if self.hookup_tries == 1 else 'ies'})")

    def _agree_chain(self, info: dict | None) -> tuple[int, str]:
        """(attempt, run) for the SMPs, the same on every rank. A restart of this launch (some rank's SMP saw
        its launcher serve this run) continues that run with the next attempt: restart counters are per
        node (a failure on node A, then one on node B, both read "1"), and a spare host's counter is 0, so
        the SMPs' count decides. Anything else is a new launch: its run is this run id plus a new suffix, so
        memory left by an earlier launch of the same run id is never loaded (an explicit ``--resume``
        wins) and that launch's stragglers are fenced off."""
        served = None
        if info and info.get("chain_known") and str(info["run"]).rpartition("@")[0] == self.run:
            served = (int(info["attempt"]), str(info["run"]))
        seen = [None] * self.env.world_size
        dist.all_gather_object(seen, served)
        served = max((s for s in seen if s is not None), default=None)
        if served is not None:
            return max(self.attempt, served[0] + 1), served[1]
        name = [f"{self.run}@{uuid.uuid4().hex[:8]}"]
        dist.broadcast_object_list(name, src=0)
        return self.attempt, name[0]

    def _agree_nodes(self) -> str:
        """This rank's node label, checked against every rank's: a real node is its host (hostname and boot
        id, or ``LOOMTRAIN_HOST_ID``), so a host whose ranks were renumbered at a new rendezvous, or that
        moved to another place in the mesh, still finds its SMP and the chunks in it. Simulated nodes are
        numbered. The ranks of one node must share a host; two nodes never do."""
        layout, rank = self.layout, self.env.rank
        if os.environ.get(HOST_ID_ENV) or not layout.simulated:
            label = host_label(host_key())
        else:
            label = str(layout.node_of(rank))
        labels = [None] * self.env.world_size
        dist.all_gather_object(labels, label)
        for node in range(layout.nodes):
            ranks = layout.node_ranks(node)
            mine = {labels[r] for r in ranks}
            if len(mine) != 1 or any(labels[r] in mine for r in range(layout.world) if r not in ranks):
                raise ConfigError(f"faulttol.ranks_per_node: ranks {ranks[0]}..{ranks[-1]} should form one node "
                                  f"(one host each), but their hosts are {sorted(mine)} and other ranks share "
                                  f"them; set ranks_per_node to the ranks per host, or 0")
        return label

    def _agree_generation(self) -> tuple[int, str]:
        """(attempt, run id), the same on every rank. torchrun's agents count restarts per node (a node whose
        workers did not fail restarts without counting), so the attempt is the largest any rank saw. Without
        a launcher-given run id, rank 0 names the run at its first attempt and keeps the name in the output
        directory for the restarts (a relaunch is a new run, whatever an old SMP still holds)."""
        count = torch.tensor([attempt()], dtype=torch.int64)
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        current = int(count.item())
        name = [run_id()]
        if not name[0]:
            if self.env.is_main:
                path = os.path.join(self.exp.train.output_dir, RUN_ID_FILE)
                if current > 0 and os.path.exists(path):
                    with open(path) as f:
                        name[0] = f.read().strip()
                if not name[0]:
                    name[0] = f"run-{uuid.uuid4().hex[:12]}"
                    atomic_write_text(path, name[0])
            dist.broadcast_object_list(name, src=0)
        return current, name[0]

    @property
    def restarted(self) -> bool:
        return self.attempt > 0

    @traffic.counted_as("snapshot")
    def locate(self):
        """(Located or None, why not) — collective. Memory serves only a restart of the same run: a fresh
        start (attempt 0) never loads a snapshot, whatever an SMP still holds."""
        if self.snapshots is None:
            if self.every:
                return None, f"the snapshot processes could not be reached at start-up ({self._hookup_why})"
            return None, "snapshots are off (faulttol.snapshot.every_steps=0)"
        if not self.restarted:
            return None, "a fresh start does not load memory snapshots"
        return self.snapshots.locate()

    def before_update(self) -> None:
        if self.snapshots is not None:
            self.snapshots.before_update()

    @traffic.counted_as("snapshot")
    def after_step(self, step: int, model, optimizer, host_state, extra_state=None) -> None:
        """Snapshot if due, fire an injected fault if due, and tell the watchdog we are alive.
        ``host_state()``: the small rest; ``extra_state()``: more live tensors by name (called first).
        While the start-up hookup of the SMPs has not succeeded, a due snapshot step tries it again first."""
        if self.snapshots is None and self.every and step % self.every == 0:
            with heartbeat.in_phase("checkpoint"):  # a try may start an SMP
                self._retry_hookup(step)
        if self.snapshots is not None:
            self.report_failures()
            if step % self.every == 0:
                with heartbeat.in_phase("checkpoint"):  # the first one allocates its staging buffers
                    extra = extra_state() if extra_state is not None else None
                    self.snapshots.start(step, model, optimizer, host_state(), extra)
        maybe_inject(self.cfg.inject, self.env.rank, step, self.node, self.smp_dir)
        self.watchdog.beat()

    def report_failures(self) -> None:
        """Warn about (and count) snapshots that failed; training goes on without them."""
        for line in self.snapshots.poll():
            self.snapshot_failures += 1
            say(f"faulttol: WARNING: {line}")

    def persist_due(self, step: int) -> bool:
        return bool(self.cfg.persist_every_steps) and step % self.cfg.persist_every_steps == 0

    @traffic.counted_as("snapshot")
    def close(self, finished: bool) -> None:
        """Stop the watchdog; after a clean end, finish the last snapshot and shut the node's SMP down."""
        self.watchdog.stop()
        if self.snapshots is None or not finished:
            return
        self.snapshots.wait()
        self.report_failures()
        dist.barrier()
        if self.env.rank == self.layout.node_ranks(self.layout.node_of(self.env.rank))[0]:
            stop_daemons(self.smp_dir, [self.node])  # the job is done: its memory snapshots go with it
