"""The trainer's side of fault tolerance: SMP hookup, snapshots on schedule, restore, injection, watchdog.

The trainer calls ``locate`` (and, if it found an epoch, ``snapshots.restore``) once after building
model and optimizer, ``before_update`` before each optimizer step, ``after_step`` after each step
and ``close`` at the end.
"""
from __future__ import annotations

import os
import sys
import tempfile
import zlib

import torch.distributed as dist

from loomtrain.faulttol.inject import Watchdog, attempt, maybe_inject
from loomtrain.faulttol.layout import NodeLayout
from loomtrain.faulttol.smp import SnapshotClient, ensure_daemon, socket_path, stop_daemons

SMP_DIR_ENV = "LOOMTRAIN_SMP_DIR"


def smp_directory(exp) -> str:
    """Where the node SMPs' sockets live: the launcher's choice, else one per job and output directory."""
    if os.environ.get(SMP_DIR_ENV):
        return os.environ[SMP_DIR_ENV]
    key = f"{os.path.abspath(exp.train.output_dir)}|{os.environ.get('SLURM_JOB_ID', '')}"
    return os.path.join(tempfile.gettempdir(), f"loomtrain-smp-{os.getuid()}-{zlib.crc32(key.encode()):08x}")


class FaultTolerance:
    def __init__(self, exp, env, dims):
        self.exp, self.env, self.cfg = exp, env, exp.faulttol
        self.layout = NodeLayout.from_config(self.cfg, env.world_size, env.local_world_size)
        self.every = self.cfg.snapshot.every_steps
        self.snapshots = None
        self.smp_dir = None
        if self.every:
            self._connect(dims)
        self.watchdog = Watchdog(self.cfg.hang_timeout_s, env.rank)

    def _connect(self, dims) -> None:
        from loomtrain.faulttol.snapshot import Snapshotter

        env, layout = self.env, self.layout
        self.smp_dir = smp_directory(self.exp)
        node = layout.node_of(env.rank)
        client = SnapshotClient(socket_path(self.smp_dir, node))
        if env.rank == layout.node_ranks(node)[0]:  # the node's first rank makes sure its SMP is up
            # Launchers start SMPs; one missing (bare torchrun, or killed) is started here, detached.
            if ensure_daemon(self.smp_dir, node, self.cfg.smp_idle_exit_s):
                print(f"faulttol: started the snapshot process of node {node} ({self.smp_dir})", file=sys.stderr,
                      flush=True)
            client._call(op="free_uncommitted")  # torn leftovers
        dist.barrier()
        client._call(op="register", rank=env.rank, pid=os.getpid())
        signature = "|".join([str(env.world_size), dims.describe(), repr(layout), repr(self.exp.model),
                              str(self.exp.data.seq_len), os.path.abspath(self.exp.train.output_dir)])
        self.snapshots = Snapshotter(layout, env.rank, self.smp_dir, f"{zlib.crc32(signature.encode()):08x}",
                                     env.device)

    @property
    def restarted(self) -> bool:
        return attempt() > 0

    def locate(self):
        """(Located or None, why not) — collective."""
        if self.snapshots is None:
            return None, "snapshots are off (faulttol.snapshot.every_steps=0)"
        return self.snapshots.locate()

    def before_update(self) -> None:
        if self.snapshots is not None:
            self.snapshots.before_update()

    def after_step(self, step: int, model, optimizer, host_state) -> None:
        """Snapshot if due, fire an injected fault if due, and tell the watchdog we are alive."""
        if self.snapshots is not None:
            self.snapshots.raise_error()
            if step % self.every == 0:
                self.snapshots.start(step, model, optimizer, host_state())
        maybe_inject(self.cfg.inject, self.env.rank, step, self.layout, self.smp_dir)
        self.watchdog.beat()

    def persist_due(self, step: int) -> bool:
        return bool(self.cfg.persist_every_steps) and step % self.cfg.persist_every_steps == 0

    def close(self, finished: bool) -> None:
        """Stop the watchdog; after a clean end, finish the last snapshot and shut the node's SMP down."""
        self.watchdog.stop()
        if self.snapshots is None or not finished:
            return
        self.snapshots.wait()
        dist.barrier()
        node = self.layout.node_of(self.env.rank)
        if self.env.rank == self.layout.node_ranks(node)[0]:
            stop_daemons(self.smp_dir, [node])  # the job is done: its memory snapshots go with it
