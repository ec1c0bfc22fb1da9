"""Per-rank entry point of ``loomtrain eval`` (one process, or each rank under torchrun / ``srun``).

The process-wide steps happen here, as ``launch/train.py`` does them for training: every check before the process
group starts (``trainer.evaluate.prepare_eval``) and the cp links ``parallel.cp_impl: auto`` reads from
``parallel.cluster`` (``launch/cp_links.py``), then the group, rank placement (``parallel.placement``: which rank
fills each place of the mesh, the same that the links were read for), the threads and the math settings, the
evaluation (``trainer.evaluate.evaluate``), and the group's end. So eval runs the strategy training picks.
"""
from __future__ import annotations

import torch.distributed as dist

from loomtrain.device import configure_math
from loomtrain.launch.cp_links import cluster_links
from loomtrain.launch.env import init_distributed, read_env, shutdown
from loomtrain.launch.placement import place_ranks
from loomtrain.trainer.checks import check_experiment
from loomtrain.trainer.evaluate import EvalRequest, evaluate, prepare_eval
from loomtrain.trainer.train import set_threads


def run(req: EvalRequest) -> dict:
    """The result dict (the same on every rank)."""
    _, world, _, local_world, _ = read_env()
    source, exp, tokens, trials = prepare_eval(req, world, local_world)  # one-line ConfigErrors, nothing started
    dims = check_experiment(exp, world, local_world)
    cp_links = cluster_links(exp, dims) if dims.cp > 1 else None  # from parallel.cluster, as launch/train.py
    started = not dist.is_initialized()
    env = init_distributed(exp.parallel)
    try:
        placement = place_ranks(exp, env, dims, unlisted="unplaced")  # eval may run where training did not
        placement.cp_links = cp_links if placement.cluster is not None else None
        set_threads(exp, placement.env)
        configure_math(env.device.type)
        return evaluate(req, source, exp, tokens, trials, placement.env, placement)
    finally:
        if started:
            shutdown()
