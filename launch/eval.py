"""Per-rank entry point of ``loomtrain eval`` (one process, or each rank under torchrun / ``srun``).

The process-wide steps happen here, as ``launch/train.py`` does them for training: every check before the process
group starts (``trainer.evaluate.prepare_eval``), then the group, the threads and the math settings, the
evaluation (``trainer.evaluate.evaluate``), and the group's end.
"""
from __future__ import annotations

import torch.distributed as dist

from loomtrain.device import configure_math
from loomtrain.launch.env import init_distributed, read_env, shutdown
from loomtrain.trainer.evaluate import EvalRequest, evaluate, prepare_eval
from loomtrain.trainer.train import set_threads


def run(req: EvalRequest) -> dict:
    """The result dict (the same on every rank)."""
    _, world, _, local_world, _ = read_env()
    source, exp, tokens, trials = prepare_eval(req, world, local_world)  # one-line ConfigErrors, nothing started
    started = not dist.is_initialized()
    env = init_distributed(exp.parallel)
    try:
        set_threads(exp, env)
        configure_math(env.device.type)
        return evaluate(req, source, exp, tokens, trials, env)
    finally:
        if started:
            shutdown()
