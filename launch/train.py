"""Per-rank entry point: ``torchrun ... -m loomtrain.launch.train CONFIG [--set k=v ...] [--resume]``.

Also what ``loomtrain train --nproc N`` and the sbatch scripts start. Under ``srun``
without torchrun, rank and rendezvous come from the SLURM_* variables.
"""
from __future__ import annotations

import argparse
import sys

from loomtrain.trainer.config import ConfigError, load_config


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
    from loomtrain.trainer.train import run

    run(exp, resume=args.resume)
    return 0


if __name__ == "__main__":
    sys.exit(main())
