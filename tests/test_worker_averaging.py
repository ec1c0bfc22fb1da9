"""Averaging across data-parallel workers, on 4 real ranks with a different gradient on each, against
closed forms written out here. One worker (no process group) takes ``PendingMean``'s shortcut and never
divides by the world size, so only a multi-worker test can tell a mean from a sum."""
import pytest
import torch

from conftest import run_ranks
from loomtrain.parallel.dp_sync.methods import CO2, DiLoCo
from loomtrain.parallel.dp_sync.quantize import BLOCK, PendingMean

WORLD = 4
GRADS = [1.0, 2.0, 3.0, 4.0]  # worker r's constant gradient
MEAN_GRAD = sum(GRADS) / WORLD  # 2.5; a sum would act like 10, one worker's like 1..4


def _fp4_representable(rank: int) -> torch.Tensor:
    """Two blocks that fp4 encodes exactly (the E2M1 grid times a per-block scale, each block reaching 6 x
    scale): the quantized mean is then the plain mean of the workers' values."""
    fp4_grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    block = fp4_grid.repeat(BLOCK // 8) * (-1) ** torch.arange(BLOCK)
    block[0] = 6.0
    return torch.cat([block * (rank + 1), -block * 2 ** rank])


def _int8_representable(rank: int) -> torch.Tensor:
    """Two blocks that int8 encodes exactly (integer multiples of max / 127, each block reaching 127 steps)."""
    steps = torch.arange(BLOCK) - BLOCK // 2
    steps[0] = 127
    return torch.cat([steps * (rank + 1.0), -steps * 0.25 * (rank + 1)])


def _constant_gradient_trace(method, rank, steps, **kw):
    """torchft's regression setup with gradient ``GRADS[rank]`` on this worker: weights start at 1, inner
    SGD lr 1; each layer's weight after every step, and the method object."""
    layers = torch.nn.ModuleList(torch.nn.Linear(1, 1, bias=False) for _ in range(2))
    for layer in layers:
        torch.nn.init.ones_(layer.weight)
    inner = torch.optim.SGD(layers.parameters(), lr=1.0)
    sync = method(list(layers) if method is DiLoCo else layers.parameters(), inner, **kw)
    trace = []
    for _ in range(steps):
        for p in layers.parameters():
            p.grad = torch.full_like(p, GRADS[rank])
        inner.step()
        trace.append([layer.weight.item() for layer in layers])
    return trace, sync


def _workers(rank, world):
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        means = {
            "none": PendingMean(torch.full((3, 5), GRADS[rank]), "none", dist.group.WORLD).wait(),
            "int8": PendingMean(_int8_representable(rank), "int8", dist.group.WORLD).wait(),
            "fp4": PendingMean(_fp4_representable(rank), "fp4", dist.group.WORLD).wait(),
        }
        diloco, _ = _constant_gradient_trace(DiLoCo, rank, 15, sync_every=6, outer_lr=2.0, outer_momentum=0.0,
                                             nesterov=False)
        co2_trace, co2 = _constant_gradient_trace(CO2, rank, 6, sync_every=2, outer_lr=1.0, outer_momentum=0.0,
                                                  staleness_penalty=1.0, clip=0.0)
        return {"means": means, "diloco": diloco, "co2": [w[0] for w in co2_trace],
                "co2_anchor": co2.anchor[0][0].item()}
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results():
    return run_ranks(_workers, WORLD, WORLD)


def test_pending_mean_is_the_mean_of_the_workers_values(results):
    for r in results:
        assert torch.equal(r["means"]["none"], torch.full((3, 5), MEAN_GRAD))
        assert torch.equal(r["means"]["int8"], sum(_int8_representable(k) for k in range(WORLD)) / WORLD)
        assert torch.equal(r["means"]["fp4"], sum(_fp4_representable(k) for k in range(WORLD)) / WORLD)


def test_diloco_outer_step_moves_by_the_mean_pseudo_gradient(results):
    """2 fragments, H = 6: fragment 0 syncs at steps 3, 9, 15, fragment 1 at 6, 12. Each worker's delta is
    3 steps (then 6) of its own gradient; the global weight moves by outer_lr times the workers' mean:
    fragment 0 at step 3 is 1 - 2 * 3 * mean, then 2 * 6 * mean lower every 6 steps (one worker with
    gradient 2 gives torchft's -11, -35, -59)."""
    for r in results:
        trace = r["diloco"]
        assert [trace[s - 1][0] for s in (3, 9, 15)] == [1 - 6 * MEAN_GRAD - 12 * MEAN_GRAD * k for k in range(3)]
        assert [trace[s - 1][1] for s in (6, 12)] == [1 - 12 * MEAN_GRAD - 12 * MEAN_GRAD * k for k in range(2)]


def test_co2_anchor_moves_by_the_mean_round_one_round_late(results):
    """tau = 2, alpha 1, no momentum: at step 6 the anchor holds rounds 1 and 2 averaged (each round moves
    a worker by 2 * g_r, their mean by 2 * mean) and each worker adds its own round 3 (-2 * g_r)."""
    for rank, r in enumerate(results):
        assert r["co2_anchor"] == 1 - 4 * MEAN_GRAD
        assert r["co2"][5] == 1 - 4 * MEAN_GRAD - 2 * GRADS[rank]
