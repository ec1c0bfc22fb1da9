"""Per-rank entry point: ``torchrun ... -m loomtrain.launch.train CONFIG [--set k=v ...] [--resume]``.

Also what ``loomtrain train --nproc N`` and the sbatch scripts start. Under ``srun``
without torchrun, rank and rendezvous come from the SLURM_* variables.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import signal
import sys

from loomtrain.launch.elastic import LAUNCHER_PID_ENV  # no heavy imports: the module imports torch lazily

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_launcher() -> bool:
    """Have the kernel SIGKILL this rank when the launcher that started it dies, even by SIGKILL; whether armed.

    Ranks run in sessions of their own (torch elastic starts them with ``start_new_session``), so a launcher
    killed without the chance to stop them leaves them training on, writing steps and checkpoints that a
    relaunch in the same directory races. Linux's parent-death signal (``PR_SET_PDEATHSIG``) is delivered by the
    kernel the moment the parent goes, whatever state this rank is in (blocked in a collective, in a C call
    holding the GIL), which a watcher thread polling the launcher's pid could not promise. SIGKILL, not SIGTERM:
    SIGTERM would make the trainer finish its step and checkpoint, which is the write a relaunch races.

    The signal fires when the *thread* that started this process exits: torch elastic starts ranks with
    ``subprocess.Popen`` from the thread running the agent, the main thread of torchrun and of loomtrain's
    launcher, so in effect when the launcher process dies. Armed only under a launcher (loomtrain's sets
    ``LOOMTRAIN_LAUNCHER_PID``; torch elastic sets ``TORCHELASTIC_RUN_ID``), never for a process started
    from a shell. A launcher that died before the signal was armed is caught by comparing the parent pid
    after arming with the launcher's pid (under plain torchrun, with the parent's pid read just before).
    """
    launcher = os.environ.get(LAUNCHER_PID_ENV)
    if not sys.platform.startswith("linux") or not (launcher or os.environ.get("TORCHELASTIC_RUN_ID")):
        return False
    parent = int(launcher) if launcher else os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(signal.SIGKILL), ctypes.c_ulong(0), ctypes.c_ulong(0),
                  ctypes.c_ulong(0)) != 0:
        print(f"warning: prctl(PR_SET_PDEATHSIG) failed ({os.strerror(ctypes.get_errno())}): this rank will not "
              "stop if its launcher is killed", file=sys.stderr, flush=True)
        return False
    if os.getppid() != parent:
        print(f"error: the launcher that started this rank (pid {parent}) is gone; stopping", file=sys.stderr,
              flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    return True


if __name__ == "__main__":
    die_with_launcher()  # first, before the imports below (seconds): the launcher may die meanwhile

from loomtrain.comms import traffic
from loomtrain.device import configure_math
from loomtrain.faulttol import heartbeat
from loomtrain.faulttol.inject import attempt
from loomtrain.faulttol.manager import host_name, run_id
from loomtrain.launch import dirlock
from loomtrain.launch.cp_links import cluster_links
from loomtrain.launch.env import init_distributed, read_env, shutdown
from loomtrain.launch.placement import place_ranks
from loomtrain.registry import load_plugins
from loomtrain.trainer.checks import check_experiment
from loomtrain.trainer.config import ConfigError, Experiment, load_config, save_config
from loomtrain.trainer.train import Trainer, set_threads


def run(exp: Experiment, resume: str | None = None):
    """Train ``exp`` in this process (one rank of whatever launched it); the ``TrainResult``.

    The process-wide steps happen here, once, before the trainer is built: the hang monitor's heartbeat,
    the process group, the traffic counters' hooks on ``torch.distributed``, and rank placement (which
    may renumber this rank and restart the default group). First, unless loomtrain's launcher holds it for the
    ranks, global rank 0 locks ``train.output_dir`` for the run (``DirectoryInUse`` if another run holds it)."""
    load_plugins(exp.plugins)  # an Experiment built in another process: its plugins register here too
    rank, world, local_rank, local_world, _ = read_env()
    dims = check_experiment(exp, world, local_world)  # before any process group starts
    cp_links = cluster_links(exp, dims) if dims.cp > 1 else None  # from parallel.cluster, before any work
    locks_here = rank == 0 and not dirlock.held_by_launcher(exp.train.output_dir)
    lock = dirlock.acquire(exp.train.output_dir, run=run_id()) if locks_here else None
    try:
        # A heartbeat for the launcher's hang monitor (when one runs): from before the rendezvous on.
        heartbeat.start(rank, local_rank, attempt())
        heartbeat.configure(exp.faulttol.monitor, host_name(), exp.train.output_dir)
        heartbeat.phase("init")
        with heartbeat.waiting():  # for the rest of the ranks to join
            env = init_distributed(exp.parallel)
        heartbeat.phase("build")
        set_threads(exp, env)
        configure_math(env.device.type)  # TF32 for fp32 matmuls on CUDA
        traffic.install()  # bytes sent per purpose, logged with the metrics; the hang monitor sees the waits
        placement = place_ranks(exp, env, dims)
        env = placement.env  # renumbered, where the fabric order needs it
        placement.cp_links = cp_links
        if env.is_main:
            save_config(exp, os.path.join(exp.train.output_dir, "config.yaml"))
        return Trainer(exp, env, resume, placement).fit()
    finally:
        shutdown()
        heartbeat.stop()
        if lock is not None:
            lock.release()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="loomtrain.launch.train")
    p.add_argument("config")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--resume", nargs="?", const="latest", default=None)
    args = p.parse_args(argv)
    try:
        exp = load_config(args.config, args.overrides)
        run(exp, resume=args.resume)
    except ConfigError as e:  # a user error (the directory in use too): one line, exit 2, as the CLI does
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
