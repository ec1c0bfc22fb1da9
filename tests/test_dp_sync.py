"""Data-parallel sync methods in the trainer (parallel.dp_sync: diloco | co2 over dp_replicate) and CO2 on
its own: closed-form updates, replicas that agree, outer state through checkpoints and snapshots, and the
bytes each method sends, counted at the transport."""
import json
import signal

import pytest
import torch

from conftest import run_ranks, signal_self_after_step
from loomtrain.parallel.dp_sync.methods import CO2
from loomtrain.parallel.dp_sync.quantize import wire_bytes


def _co2_constant_gradient(steps, **kw):
    """One weight starting at 1, gradient 2 every inner step, inner SGD lr 1, tau = 2; the weight after
    each step and the CO2 object."""
    w = torch.nn.Parameter(torch.ones(1))
    inner = torch.optim.SGD([w], lr=1.0)
    co2 = CO2([w], inner, **({"sync_every": 2, "outer_lr": 1.0, "outer_momentum": 0.0, "staleness_penalty": 1.0,
                              "clip": 0.0} | kw))
    trace = []
    for _ in range(steps):
        w.grad = torch.full_like(w, 2.0)
        inner.step()
        trace.append(w.item())
    return trace, co2


def test_co2_update_in_closed_form():
    # alpha 1, no momentum, lambda 1 (no penalty): one round late, nothing lost: plain SGD at every step
    trace, co2 = _co2_constant_gradient(6)
    assert trace == [1 - 2 * t for t in range(1, 7)]
    assert co2.anchor[0][0].item() == -7  # round 2's average lands at step 6: anchor 1 - 4 - 4
    # outer momentum 0.5: m = 0.5 * 4 + 4 = 6 at step 6: anchor -3 - 6 = -9, weight -9 - 4 = -13
    assert _co2_constant_gradient(6, outer_momentum=0.5)[0][5] == -13


def test_co2_staleness_gap_penalty_divides_the_stale_average():
    """The authors' formula m = beta * m + D / lambda (fairscale-CO2's co2_gap_penalty), by hand: each round
    moves the weight by D = 4 (gradient 2, lr 1, tau 2); the first average lands at step 4."""
    # lambda 2, beta 0: step 4: m = 4 / 2 = 2, anchor 1 - 2 = -1, weight -1 + round 2's own -4 = -5;
    # step 6: m = 2, anchor -3, weight -3 - 4 = -7
    trace, co2 = _co2_constant_gradient(6, staleness_penalty=2.0)
    assert trace[3] == -5 and trace[5] == -7 and co2.momentum[0][0].item() == 2.0
    # lambda 4, beta 0.5: step 4: m = 1, anchor 0, weight -4; step 6: m = 0.5 + 1 = 1.5, anchor -1.5, weight -5.5
    trace, co2 = _co2_constant_gradient(6, staleness_penalty=4.0, outer_momentum=0.5)
    assert trace[3] == -4 and trace[5] == -5.5 and co2.momentum[0][0].item() == 1.5
    with pytest.raises(ValueError, match="staleness_penalty and outer_lr must be > 0"):
        _co2_constant_gradient(1, staleness_penalty=0.0)


def test_co2_clip_really_clips_the_momentum():
    trace, co2 = _co2_constant_gradient(4, clip=1.0)
    assert co2.momentum[0][0].item() == 1.0  # clamp_(-1, 1) of 4, in place
    assert trace[3] == 0 - 4  # anchor 1 - 1, plus round 2's own progress -4


def test_co2_clip_is_element_wise():
    """Two weights with gradients 2 and 0.25 (D = 4 and 0.5 a round), clip 1: only the first is clipped."""
    w = torch.nn.Parameter(torch.ones(2))
    inner = torch.optim.SGD([w], lr=1.0)
    co2 = CO2([w], inner, sync_every=2, outer_lr=1.0, outer_momentum=0.0, staleness_penalty=1.0, clip=1.0)
    for _ in range(4):
        w.grad = torch.tensor([2.0, 0.25])
        inner.step()
    assert co2.momentum[0][0].tolist() == [1.0, 0.5]
    assert w.tolist() == [1 - 1 - 4, 1 - 0.5 - 0.5]  # anchor 1 - m, plus round 2's own progress


def _co2_workers(rank, world):
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1))
        inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
        co2 = CO2(model.parameters(), inner, sync_every=3, outer_momentum=0.5, staleness_penalty=2.0, clip=0.05)
        g = torch.Generator().manual_seed(rank)  # every worker sees different data
        for _ in range(12):
            inner.zero_grad()
            model(torch.randn(16, 8, generator=g)).pow(2).mean().backward()
            inner.step()
        return [a.detach().clone() for a in co2.anchor[0]], [p.detach().clone() for p in model.parameters()]
    finally:
        dist.destroy_process_group()


def test_co2_replicas_keep_one_outer_model():
    (a0, p0), (a1, p1) = run_ranks(_co2_workers, 2, 2)
    for x, y in zip(a0, a1):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert any(not torch.equal(x, y) for x, y in zip(p0, p1))  # local models differ by their own last round


def _train(rank, overrides, resume=None, signal_at=0):
    from loomtrain.trainer import train as train_mod
    from loomtrain.launch import train as launch_train
    from loomtrain.trainer.config import load_config

    if signal_at:
        signal_self_after_step(signal_at, signal.SIGTERM)
    captured = {}
    original, original_step = train_mod.Trainer.fit, train_mod.Trainer.train_step

    def state_of(self) -> dict:
        """Parameters, AdamW moments and the outer anchors, as local tensors."""
        local = (lambda t: t.detach().to_local().clone() if hasattr(t, "to_local") else t.detach().clone())
        return {"anchor": {k: v.detach().clone() for k, v in self.sync.state_tensors().items()
                           if k.startswith("anchor.")},
                "params": {n: local(p) for n, p in self.model.named_parameters()},
                "moments": {(n, k): local(self.optimizer.state[p][k]) for n, p in self.model.named_parameters()
                            if p in self.optimizer.state for k in ("exp_avg", "exp_avg_sq")}}

    def fit(self):
        result = original(self)
        captured["restored_from"] = result.restored_from
        captured.update(state_of(self))
        return result

    def train_step(self):
        captured.setdefault("start", state_of(self))  # what the first step begins from (after any resume)
        return original_step(self)

    train_mod.Trainer.fit, train_mod.Trainer.train_step = fit, train_step
    r = launch_train.run(load_config("tiny", overrides), resume=resume)
    return r.losses, captured


def _metrics(run_dir):
    with open(run_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


DILOCO = ["parallel.dp_sync=diloco", "parallel.dp_replicate=2", "dp_sync.diloco.sync_every=2",
          "dp_sync.diloco.fragments=2", "train.steps=6"]


@pytest.mark.parametrize("quantize", ["none", "fp4"])
def test_diloco_workers_agree_and_bytes_match_the_formula(overrides, tmp_path, quantize):
    ov = overrides + DILOCO + [f"dp_sync.diloco.quantize={quantize}", "checkpoint.at_end=true"]
    results = run_ranks(_train, 2, ov)
    (losses, a), (_, b) = results
    # The export reads the outer model the workers share out of the per-worker checkpoint.
    from loomtrain.trainer.hf_export import read_model_state

    exported = read_model_state(str(tmp_path / "run" / "checkpoints" / "step_00000006"))
    assert exported.keys() == {k.removeprefix("anchor.") for k in a["anchor"]}
    for k, t in a["anchor"].items():
        assert torch.equal(exported[k.removeprefix("anchor.")], t), k
    assert a["anchor"] and a["anchor"].keys() == b["anchor"].keys()
    for k in a["anchor"]:
        torch.testing.assert_close(a["anchor"][k], b["anchor"][k], rtol=0, atol=0)  # one global model
    # Fragment 1 (the odd layer) synced at step 6, the last: with alpha 0 both workers hold the global copy.
    synced = [n for n in a["params"] if n.startswith("layers.1.")]
    assert synced
    for n in synced:
        torch.testing.assert_close(a["params"][n], b["params"][n], rtol=0, atol=0)
    assert any(not torch.equal(a["params"][n], b["params"][n]) for n in a["params"] if n.startswith("layers.0."))
    assert losses[6] < losses[1]
    # Bytes: each h = 1 step one fragment's outer gradient goes out, every parameter tensor on its own.
    numels = {0: [], 1: []}
    for n, p in a["params"].items():
        numels[1 if n.startswith("layers.1.") else 0].append(p.numel())
    per_sync = {f: sum(2 * 4 * x // 2 if quantize == "none" else wire_bytes(x, quantize) for x in xs)
                for f, xs in numels.items()}  # 2 workers: all-reduce 2(n-1)/n * 4 bytes, or (n-1) * payload
    expected = sum(per_sync[(t - 1) % 2] for t in range(1, 7))
    final = _metrics(tmp_path / "run")[-1]
    assert final["bytes_dp_sync"] == 2 * expected  # summed over both workers
    assert final["bytes_max_rank_dp_sync"] == expected
    assert final["bytes_fsdp"] == 0  # one rank per worker: nothing sharded


def _param_count(captured) -> int:
    return sum(p.numel() for p in captured["params"].values())


def test_every_step_sends_every_gradient_every_step_and_co2_once_a_round(overrides, tmp_path):
    """The DDP baseline (dp_replicate=2: FSDP2's replica all-reduce is dp_sync traffic) against CO2 with
    tau = 2: the same formula, 2(n-1)/n * 4 bytes a parameter, every step vs every other step."""
    ddp = run_ranks(_train, 2, overrides + ["parallel.dp_replicate=2", "train.steps=6"])
    p = _param_count(ddp[0][1])
    assert _metrics(tmp_path / "run")[-1]["bytes_max_rank_dp_sync"] == 6 * 4 * p
    out = tmp_path / "co2"
    co2 = run_ranks(_train, 2, overrides + ["parallel.dp_sync=co2", "parallel.dp_replicate=2", "train.steps=6",
                                            "dp_sync.co2.sync_every=2", f"train.output_dir={out}"])
    assert _metrics(out)[-1]["bytes_max_rank_dp_sync"] == 3 * 4 * p
    (_, a), (_, b) = co2
    for k in a["anchor"]:
        torch.testing.assert_close(a["anchor"][k], b["anchor"][k], rtol=0, atol=0)  # one outer model


def test_diloco_shards_its_outer_state_over_the_workers_fsdp_ranks(overrides, tmp_path):
    """dp_replicate=2 x dp_shard=2: FSDP inside each worker, and each rank keeps (and syncs) only its shard of
    the outer state, with the same shard of the other worker."""
    results = run_ranks(_train, 4, overrides + DILOCO + ["parallel.dp_shard=2"])
    ranks = [captured for _, captured in results]
    full = sum(p.numel() for p in ranks[0]["params"].values()) + sum(p.numel() for p in ranks[1]["params"].values())
    mine = sum(a.numel() for a in ranks[0]["anchor"].values())
    assert mine == sum(p.numel() for p in ranks[0]["params"].values()) < full  # a shard, not the model
    # Mesh order pp, dp_replicate, dp_shard: ranks 0 and 2 hold shard 0 of workers 0 and 1.
    for k in ranks[0]["anchor"]:
        torch.testing.assert_close(ranks[0]["anchor"][k], ranks[2]["anchor"][k], rtol=0, atol=0)
        torch.testing.assert_close(ranks[1]["anchor"][k], ranks[3]["anchor"][k], rtol=0, atol=0)
    final = _metrics(tmp_path / "run")[-1]
    assert final["bytes_fsdp"] > 0 and final["bytes_dp_sync"] > 0


RESUMABLE = {
    "diloco": ["parallel.dp_sync=diloco", "dp_sync.diloco.sync_every=4", "dp_sync.diloco.fragments=2",
               "dp_sync.diloco.fragment_sync_delay=1", "dp_sync.diloco.fragment_update_alpha=0.5"],
    "co2": ["parallel.dp_sync=co2", "dp_sync.co2.sync_every=2", "dp_sync.co2.outer_momentum=0.5"],
}


@pytest.mark.parametrize("method", sorted(RESUMABLE))
def test_stop_and_resume_from_disk_equals_an_uninterrupted_run(method, overrides, tmp_path):
    """Stopped at step 3, where an average is in flight (DiLoCo: the fragment due at step 4, started at 3;
    CO2: round 1's, started at step 2): the resumed run ends bit-identical to an uninterrupted one."""
    base = overrides + RESUMABLE[method] + ["parallel.dp_replicate=2", "train.steps=6"]
    full = run_ranks(_train, 2, base)
    out = [f"train.output_dir={tmp_path / 'split'}"]
    run_ranks(_train, 2, base + out, None, 3)
    assert sorted((tmp_path / "split" / "checkpoints" / "step_00000003").iterdir()) == \
        [tmp_path / "split" / "checkpoints" / "step_00000003" / f"worker00{w}" for w in (0, 1)]
    resumed = run_ranks(_train, 2, base + out, "latest")
    for (losses, captured), (ref_losses, ref) in zip(resumed, full):
        assert sorted(losses) == [4, 5, 6]
        assert all(losses[s] == ref_losses[s] for s in losses)
        for n, p in captured["params"].items():
            assert torch.equal(p, ref["params"][n]), n
        for k, a in captured["anchor"].items():
            assert torch.equal(a, ref["anchor"][k]), k


def test_resuming_under_another_method_restarts_the_outer_schedule(overrides, tmp_path):
    """A DiLoCo checkpoint resumed as CO2: AdamW moments load exactly as saved; the outer state does not
    (another method's), so the outer schedule restarts from the workers' average: both workers start from
    the mean of the two saved (differing) local models, anchored there; every_step checkpoints are refused
    by name."""
    base = overrides + ["parallel.dp_replicate=2", "train.steps=6"]
    saved = run_ranks(_train, 2, base + RESUMABLE["diloco"], None, 3)
    resumed = run_ranks(_train, 2, base + RESUMABLE["co2"], "latest")
    (_, w0), (_, w1) = saved
    assert any(not torch.equal(w0["params"][n], w1["params"][n]) for n in w0["params"])  # local steps differ
    for (_, at_save), (losses, captured) in zip(saved, resumed):
        assert sorted(losses) == [4, 5, 6]
        start = captured["start"]
        assert start["params"].keys() == at_save["params"].keys() and start["moments"]
        for n, p in start["params"].items():
            torch.testing.assert_close(p, (w0["params"][n] + w1["params"][n]) / 2, rtol=0, atol=1e-7, msg=n)
        for k, m in start["moments"].items():
            assert torch.equal(m, at_save["moments"][k]), k
        assert start["anchor"].keys() == {f"anchor.{n}" for n in start["params"]}
        for n, p in start["params"].items():
            assert torch.equal(start["anchor"][f"anchor.{n}"], p), n
    out = [f"train.output_dir={tmp_path / 'ddp'}"]
    run_ranks(_train, 2, base + out, None, 3)
    with pytest.raises(AssertionError, match="saved under another parallel.dp_sync"):
        run_ranks(_train, 2, base + out + RESUMABLE["diloco"], "latest")


@pytest.mark.parametrize("method", sorted(RESUMABLE))
def test_a_killed_worker_resumes_from_memory_snapshots_with_its_outer_state(method, overrides, tmp_path):
    from conftest import run_ranks_restarting
    from loomtrain.faulttol.smp import start_daemon, stop_daemons

    smp = str(tmp_path / "smp")
    for node in range(2):
        start_daemon(smp, node)
    try:
        base = overrides + RESUMABLE[method] + ["parallel.dp_replicate=2", "train.steps=6",
                                                "faulttol.snapshot.every_steps=1", "faulttol.ranks_per_node=1"]
        env = {"LOOMTRAIN_SMP_DIR": smp}
        full = run_ranks(_train, 2, base + [f"train.output_dir={tmp_path / 'full'}"], env=env)
        for node in range(2):
            start_daemon(smp, node)  # the clean end shut them down
        results, failures = run_ranks_restarting(
            _train, 2, base + ["faulttol.inject={kind: sigkill, rank: 1, step: 3}"], max_restarts=1, env=env)
    finally:
        stop_daemons(smp, range(2))
    assert len(failures) == 1
    for (losses, captured), (ref_losses, ref) in zip(results, full):
        assert captured["restored_from"] == "memory" and min(losses) in (3, 4) and max(losses) == 6
        assert all(losses[s] == ref_losses[s] for s in losses)
        for n, p in captured["params"].items():
            assert torch.equal(p, ref["params"][n]), n
