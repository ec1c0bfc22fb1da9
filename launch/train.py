"""Per-rank entry point: ``torchrun ... -m loomtrain.launch.train CONFIG [--set k=v ...] [--resume]``.

Also what ``loomtrain train --nproc N`` and the sbatch scripts start. Under ``srun``
without torchrun, rank and rendezvous come from the SLURM_* variables.
"""
from __future__ import annotations

import argparse
import os
import sys

from loomtrain.comms import traffic
from loomtrain.device import configure_math
from loomtrain.faulttol import heartbeat
from loomtrain.faulttol.inject import attempt
from loomtrain.faulttol.manager import host_name
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
    may renumber this rank and restart the default group)."""
    load_plugins(exp.plugins)  # an Experiment built in another process: its plugins register here too
    rank, world, local_rank, local_world, _ = read_env()
    dims = check_experiment(exp, world, local_world)  # before any process group starts
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
        if env.is_main:
            save_config(exp, os.path.join(exp.train.output_dir, "config.yaml"))
        return Trainer(exp, env, resume, placement).fit()
    finally:
        shutdown()
        heartbeat.stop()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="loomtrain.launch.train")
    p.add_argument("config")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--resume", nargs="?", const="latest", default=None)
    args = p.parse_args(argv)
    try:
        exp = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run(exp, resume=args.resume)
    return 0


if __name__ == "__main__":
    sys.exit(main())
