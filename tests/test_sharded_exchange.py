"""The two-stage quantized average (``dp_sync.diloco.exchange: reduce_scatter``, ``parallel/dp_sync/sharded.py``):
bytes counted at the transport below a bf16 ring's for M = 2, 4, 8 (and by formula up to 1024), the result equal
bit for bit to the same quantize-dequantize steps done in one process, error feedback that loses nothing, and
DiLoCo training with it in the real trainer."""
import pytest
import torch

from conftest import run_ranks
from loomtrain.parallel.dp_sync.methods import DiLoCo
from loomtrain.parallel.dp_sync.quantize import BLOCK, dequantize, quantize, wire_bytes
from loomtrain.parallel.dp_sync.sharded import PendingShardedMean, bytes_per_value

SHAPES = [(96, 64), (70,), (33, 5)]  # 6379 values: not a multiple of a block, nor of M blocks
NUMEL = sum(torch.Size(s).numel() for s in SHAPES)
KINDS = ("fp4", "fp4_e3m0", "int8")


def _deltas(rank: int) -> list[torch.Tensor]:
    """Worker ``rank``'s pseudo-gradient: Gaussian, scaled per tensor, different on every worker."""
    g = torch.Generator().manual_seed(100 + rank)
    return [torch.randn(s, generator=g) * 10.0 ** -(i + 1) for i, s in enumerate(SHAPES)]


def _reference(world: int, kind: str) -> torch.Tensor:
    """The same steps in one process, written out: each worker's flat delta quantized and decoded (stage 1),
    summed in fp32 in rank order and divided by M, each owner's shard of the mean quantized and decoded
    (stage 2)."""
    shard = -(-NUMEL // (world * BLOCK)) * BLOCK
    total = torch.zeros(world * shard)
    for r in range(world):
        flat = torch.cat([t.flatten() for t in _deltas(r)])
        flat = torch.cat([flat, torch.zeros(world * shard - NUMEL)])
        total += dequantize(*quantize(flat, kind), kind, world * shard)
    mean = total / world
    return torch.cat([dequantize(*quantize(mean[j * shard:(j + 1) * shard], kind), kind, shard)
                      for j in range(world)])[:NUMEL]


def _exchange(rank, world):
    import torch.distributed as dist

    from loomtrain.comms import traffic
    from loomtrain.parallel.dp_sync.quantize import PendingMean

    dist.init_process_group("gloo")
    try:
        traffic.install()
        out = {}
        for kind in KINDS:
            traffic.reset()
            with traffic.counted_as("dp_sync"):
                parts = PendingShardedMean(_deltas(rank), kind, dist.group.WORLD).parts()
                mean = torch.cat([p.wait().flatten() for p in parts])
            sent = traffic.counts()["dp_sync"]
            traffic.reset()
            with traffic.counted_as("dp_sync"):  # today's exchange, for comparison
                for t in _deltas(rank):
                    PendingMean(t, kind, dist.group.WORLD).wait()
            out[kind] = {"mean": mean, "bytes": sent, "bytes_all_gather": traffic.counts()["dp_sync"]}
        return out
    finally:
        dist.destroy_process_group()


def _bf16_ring(world: int) -> float:
    return 2 * 2 * (world - 1) / world


@pytest.mark.parametrize("world", [2, 4, 8])
def test_bytes_below_a_bf16_ring_and_the_mean_equals_one_process(world):
    results = run_ranks(_exchange, world, world)
    shard = -(-NUMEL // (world * BLOCK)) * BLOCK
    for kind in KINDS:
        want = _reference(world, kind)
        for r, res in enumerate(results):
            assert torch.equal(res[kind]["mean"], want), (kind, r)  # bit for bit, on every worker
        # each stage: a worker sends M-1 of its M packed shards (payload + 4-byte scale per block)
        expected = 2 * (world - 1) * wire_bytes(shard, kind)
        for res in results:
            assert res[kind]["bytes"] == expected, kind
        per_param = expected / NUMEL
        assert per_param == pytest.approx(bytes_per_value(kind, world), rel=0.05)  # padding aside
        if kind != "int8":
            assert per_param < _bf16_ring(world), (kind, per_param)
    if world == 8:  # today's all-gather sends (M-1) payloads: past the bf16 ring at 8 workers
        assert results[0]["fp4"]["bytes_all_gather"] / NUMEL > _bf16_ring(world)
    # the mean really is a mean of different workers' values (not one worker's, not a sum)
    exact = sum(torch.cat([t.flatten() for t in _deltas(r)]) for r in range(world)) / world
    err = (results[0]["fp4"]["mean"] - exact).norm() / exact.norm()
    assert err < 0.25


def test_bytes_formula_below_a_bf16_ring_at_any_worker_count():
    """2 (M-1)/M * 0.5625 for the 4-bit kinds against 4 (M-1)/M: 0.28x at every M (int8: 2 (M-1)/M * 1.0625,
    0.53x)."""
    assert bytes_per_value("fp4", 64) == pytest.approx(2 * 63 / 64 * 0.5625)
    for world in (2, 3, 7, 8, 14, 64, 1024):
        for kind in KINDS:
            assert bytes_per_value(kind, world) < _bf16_ring(world)
        assert bytes_per_value("fp4", world) / _bf16_ring(world) == pytest.approx(0.28125)


def _feedback_worker(rank, world, error_feedback):
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        w = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 300))
        inner = torch.optim.SGD([w], lr=0.0)  # the test moves w itself, the hook still runs
        d = DiLoCo([[w]], inner, sync_every=1, outer_lr=1.0, outer_momentum=0.0, nesterov=False, quantize="fp4",
                   exchange="reduce_scatter", error_feedback=error_feedback)
        start, mean_sum = w.detach().clone(), torch.zeros(300)
        for k in range(5):
            steps = [torch.randn(300, generator=torch.Generator().manual_seed(10 * k + r)) * torch.logspace(-4, 0, 300)
                     for r in range(world)]
            with torch.no_grad():
                w.copy_(d.anchor[0][0] - steps[rank])  # this worker's round: delta = steps[rank]
            mean_sum += sum(steps) / world
            inner.step()
        out = {"moved": start - d.anchor[0][0].detach(), "mean_sum": mean_sum}
        if error_feedback:
            out |= {"residual": d.residual[0][0].clone(), "residual_mean": d.residual_mean[0][0].clone(),
                    "state": sorted(d.state_tensors())}
        return out
    finally:
        dist.destroy_process_group()


def test_error_feedback_of_both_stages_loses_nothing():
    """2 workers, outer SGD lr 1 without momentum: the global copy moves by the decoded stage-2 average. Each
    worker keeps stage 1's error of its own delta (``residual``) and, as a shard's owner, stage 2's error of that
    shard's average (``residual_mean``, zero off its shard). After any number of rounds
    (start - now) + mean of the residuals + sum of the owners' residuals = the sum of the true mean deltas."""
    world = 2
    results = run_ranks(_feedback_worker, world, world, True)
    moved, mean_sum = results[0]["moved"], results[0]["mean_sum"]
    kept = sum(r["residual"] for r in results) / world + sum(r["residual_mean"] for r in results)
    torch.testing.assert_close(moved + kept, mean_sum, rtol=0, atol=1e-6)
    for r, res in enumerate(results):  # each owner's residual lies on its own shard
        assert res["residual_mean"].abs().max() > 0
        others = torch.ones(300, dtype=torch.bool)
        others[r * 192:(r + 1) * 192] = False  # shards of 192 = 3 blocks
        assert res["residual_mean"][others].abs().max() == 0
        assert "residual_mean.f0.0" in res["state"]  # checkpointed with the rest
    plain = run_ranks(_feedback_worker, world, world, False)[0]
    assert (plain["moved"] - mean_sum).norm() > 10 * (moved + kept - mean_sum).norm()


@pytest.mark.parametrize("kw,message", [
    ({"exchange": "ring"}, "exchange: must be one of all_gather, reduce_scatter"),
    ({"exchange": "reduce_scatter"}, "reduce_scatter needs a quantize other than none"),
])
def test_bad_exchange_settings_name_the_field(kw, message):
    w = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match=message):
        DiLoCo([[w]], torch.optim.SGD([w], lr=0.1), sync_every=2, **kw)


def test_config_refuses_reduce_scatter_unquantized_and_unknown_exchanges(overrides):
    from loomtrain.errors import ConfigError
    from loomtrain.trainer.config import load_config

    diloco = overrides + ["parallel.dp_sync=diloco", "parallel.dp_replicate=2"]
    with pytest.raises(ConfigError, match="dp_sync.diloco.exchange: reduce_scatter needs a quantize"):
        load_config("tiny", diloco + ["dp_sync.diloco.exchange=reduce_scatter"])
    with pytest.raises(ConfigError, match="dp_sync.diloco.exchange: must be one of all_gather, reduce_scatter"):
        load_config("tiny", diloco + ["dp_sync.diloco.exchange=ring"])
    load_config("tiny", diloco + ["dp_sync.diloco.exchange=reduce_scatter", "dp_sync.diloco.quantize=fp4"])


def _train(rank, overrides):
    from conftest import train_capturing

    return train_capturing(rank, overrides)


def test_diloco_trains_with_the_two_stage_exchange(overrides, tmp_path):
    """4 workers, Streaming DiLoCo (2 fragments, delay 1: stage 2 starts from the next step's poll) with fp4,
    the two-stage exchange and error feedback in the real trainer: the workers share one outer model, the
    loss falls, and each rank's dp_sync bytes are the two stages' packed shards."""
    from loomtrain.parallel.dp_sync.sharded import shard_len

    world = 4
    results = run_ranks(_train, world, overrides + [
        "parallel.dp_sync=diloco", f"parallel.dp_replicate={world}", "parallel.dp_shard=1", "train.steps=12",
        "dp_sync.diloco.sync_every=4", "dp_sync.diloco.fragments=2", "dp_sync.diloco.fragment_sync_delay=1",
        "dp_sync.diloco.quantize=fp4", "dp_sync.diloco.exchange=reduce_scatter",
        "dp_sync.diloco.error_feedback=true", "optim.lr=3e-3"])
    losses = results[0][0]
    assert losses[12] < losses[1] - 0.1, losses
    params = results[0][2]["params"]
    # the trainer's fragments: layer i in fragment i % 2, embeddings, norm and head with fragment 0
    numel = {0: 0, 1: 0}
    for name, p in params.items():
        numel[1 if name.startswith("layers.1.") else 0] += p.numel()
    per_sync = {f: 2 * (world - 1) * wire_bytes(shard_len(n, world), "fp4") for f, n in numel.items()}
    expected = sum(per_sync[f] for f in (0, 1, 0, 1, 0, 1))  # a fragment every h = 2 steps over 12 steps
    import json

    with open(tmp_path / "run" / "metrics.jsonl") as f:
        final = [json.loads(line) for line in f][-1]
    assert final["bytes_max_rank_dp_sync"] == expected
    ring_bf16 = 6 * 2 * 2 * (world - 1) / world * sum(numel.values()) / 2  # 6 syncs of half the model, bf16
    assert expected < ring_bf16
