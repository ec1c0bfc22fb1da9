"""Every parallel layout trains exactly like one process: same seed, data and global batch.

Losses and gradient norms over 6 steps within 1e-4 relative (a x2 gradient-scale error moves
the norm by 100%, the loss by < 1e-6), final parameters (read back from each run's DCP
checkpoint, resharded to full tensors) within 1e-5, fp32, on gloo.
"""
import contextlib
import os

import pytest
import torch

from conftest import run_ranks

STEPS = 6


def _train(rank, overrides):
    from loomtrain.trainer.config import load_config
    from loomtrain.launch.train import run

    result = run(load_config("tiny", overrides))
    return result.losses, result.checkpoint, result.grad_norms


def assert_matches(layout, results, reference, tmp_path):
    """Every rank's losses and grad norms, and the saved parameters, against the single-process run."""
    ref_losses, ref_params, ref_norms = reference
    for losses, _, norms in results:  # every rank reports the same global loss and norm
        assert sorted(losses) == list(range(1, STEPS + 1))
        for step, ref in ref_losses.items():
            assert abs(losses[step] - ref) <= 1e-4 * abs(ref), (layout, step, losses[step], ref)
            assert abs(norms[step] - ref_norms[step]) <= 1e-4 * ref_norms[step], (layout, step, norms[step])
    params = _unprefixed(full_params(results[0][1], tmp_path))
    assert params.keys() == ref_params.keys()  # every stage's parameters were saved, under the unsplit names
    for name, ref in ref_params.items():
        diff = (params[name].float() - ref.float()).abs().max().item()
        assert diff <= 1e-5, (layout, name, diff)
    assert ref_losses[STEPS] < ref_losses[1]  # the run really trained


def full_params(ckpt_dir, tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = os.path.join(tmp_path, os.path.basename(os.path.dirname(os.path.dirname(ckpt_dir))) + ".pt")
    dcp_to_torch_save(ckpt_dir, out)
    return torch.load(out, weights_only=False)["model"]


@pytest.fixture(scope="module")
def references(small_corpus, tmp_path_factory):
    """Single-process runs, one per model shape, computed once per module."""
    from conftest import TEST_OVERRIDES

    cache = {}

    def get(model_overrides=()):
        key = tuple(model_overrides)
        if key not in cache:
            out = tmp_path_factory.mktemp("ref")
            ov = TEST_OVERRIDES + [f"data.prepared={small_corpus}", f"train.output_dir={out / 'run'}",
                                   f"train.steps={STEPS}", "checkpoint.at_end=true"] + list(key)
            [(losses, ckpt, norms)] = run_ranks(_train, 0, ov)
            cache[key] = losses, full_params(ckpt, out), norms
        return cache[key]

    return get


@pytest.fixture(scope="module")
def reference(references):
    return references()


LAYOUTS = {
    "tp2": ["parallel.tp=2", "parallel.dp_shard=1"],
    "dp_shard2": ["parallel.dp_shard=2"],
    "tp2_dp_shard2": ["parallel.tp=2", "parallel.dp_shard=2"],
    "dp_replicate2": ["parallel.dp_replicate=2", "parallel.dp_shard=1"],
    "tp2_accum2": ["parallel.tp=2", "parallel.dp_shard=1", "train.micro_batch_size=4"],
    "hsdp2_tp2": ["parallel.dp_replicate=2", "parallel.dp_shard=1", "parallel.tp=2"],
    # A non-default order (HSDP slicing crashed on it): ranks {0,2} replicate, {0,1} shard.
    "hsdp_order_pp_shard_rep": ["parallel.dp_replicate=2", "parallel.dp_shard=2",
                                "parallel.mesh_order=pp,dp_shard,dp_replicate,cp,tp"],
    "dp_shard4_ac_compile": ["parallel.dp_shard=4", "parallel.activation_checkpoint=full", "parallel.compile=true"],
}
WORLD = {"tp2": 2, "dp_shard2": 2, "dp_replicate2": 2, "tp2_accum2": 2}  # the others: 4


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_matches_single_process(layout, reference, small_corpus, tmp_path):
    from conftest import TEST_OVERRIDES

    world = WORLD.get(layout, 4)
    ov = TEST_OVERRIDES + [f"data.prepared={small_corpus}", f"train.output_dir={tmp_path / 'run'}",
                           f"train.steps={STEPS}", "checkpoint.at_end=true"] + LAYOUTS[layout]
    assert_matches(layout, run_ranks(_train, world, ov), reference, tmp_path)


CP_LAYOUTS = {f"cp2_{second}_{impl}": ["parallel.cp=2", f"parallel.cp_impl={impl}"] +
              (["parallel.dp_shard=2"] if second == "dp2" else ["parallel.tp=2", "parallel.dp_shard=1"])
              for impl in ("tokenring", "ring", "ulysses") for second in ("dp2", "tp2")}
CP_LAYOUTS["cp2_dp2_auto"] = ["parallel.cp=2", "parallel.cp_impl=auto", "parallel.dp_shard=2",
                              "parallel.cp_link_gbps=0.01"]
# cp outside dp_shard (rank = 2*cp + dp_shard): FSDP's dp_shard_cp is all 4 ranks, listed [0, 2, 1, 3] when
# flattened dp_shard-major; each rank's shard must still be the one at its place in FSDP's process group.
CP_LAYOUTS["cp2_dp2_ring_order_cp_outside_shard"] = ["parallel.cp=2", "parallel.cp_impl=ring",
                                                     "parallel.dp_shard=2",
                                                     "parallel.mesh_order=pp,dp_replicate,cp,dp_shard,tp"]
# Two-dimensional cp: Ulysses inside pairs of cp ranks (the model's 2 KV heads split over them), ring or TokenRing
# across the two pairs.
CP_LAYOUTS.update({f"cp4_ulysses2_{outer}": ["parallel.cp=4", f"parallel.cp_impl=ulysses_{outer}",
                                             "parallel.cp_ulysses=2", "parallel.dp_shard=1"]
                   for outer in ("ring", "tokenring")})
# Ulysses splits heads over cp*tp = 4: that model needs 4 KV heads (its own reference run).
MHA = ("model.n_kv_heads=4",)


@pytest.mark.parametrize("layout", CP_LAYOUTS)
def test_context_parallel_matches_single_process(layout, references, small_corpus, tmp_path):
    """cp=2 x dp=2 and cp=2 x tp=2, each attention strategy, and cp=4 split 2 x 2 (Ulysses x ring / TokenRing):
    the single-process loss curve within 1e-4."""
    from conftest import TEST_OVERRIDES

    model = MHA if layout == "cp2_tp2_ulysses" else ()
    ov = TEST_OVERRIDES + [f"data.prepared={small_corpus}", f"train.output_dir={tmp_path / 'run'}",
                           f"train.steps={STEPS}", "checkpoint.at_end=true"] + CP_LAYOUTS[layout] + list(model)
    assert_matches(layout, run_ranks(_train, 4, ov), references(model), tmp_path)


PP_LAYOUTS = {  # name: (world, overrides); 4 layers so that pp=2 x 2 virtual stages and pp=4 fit
    "pp2_gpipe": (2, ["parallel.pp=2", "parallel.pp_schedule=gpipe", "parallel.dp_shard=1"]),
    "pp2_1f1b": (2, ["parallel.pp=2", "parallel.pp_schedule=1f1b", "parallel.dp_shard=1"]),
    "pp2_interleaved": (2, ["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b",
                            "parallel.pp_virtual_stages=2", "parallel.dp_shard=1"]),
    "pp4_1f1b_split": (4, ["parallel.pp=4", "parallel.dp_shard=1", "train.microbatches=4"]),
    "pp2_dp_shard2": (4, ["parallel.pp=2", "parallel.dp_shard=2"]),
    "pp2_tp2": (4, ["parallel.pp=2", "parallel.tp=2", "parallel.dp_shard=1"]),
    "pp2_dp_replicate2": (4, ["parallel.pp=2", "parallel.dp_replicate=2", "parallel.dp_shard=1"]),
    # context parallelism inside the stages: every stage of a cp rank takes the same zigzag share of the tokens
    "pp2_cp2_gpipe": (4, ["parallel.pp=2", "parallel.cp=2", "parallel.pp_schedule=gpipe", "parallel.dp_shard=1"]),
    "pp2_cp2_1f1b": (4, ["parallel.pp=2", "parallel.cp=2", "parallel.dp_shard=1"]),
    "pp2_cp2_interleaved": (4, ["parallel.pp=2", "parallel.cp=2", "parallel.pp_schedule=interleaved_1f1b",
                                "parallel.pp_virtual_stages=2", "parallel.dp_shard=1"]),
    "pp2_cp2_tp2": (8, ["parallel.pp=2", "parallel.cp=2", "parallel.tp=2", "parallel.dp_shard=1"]),
    "pp2_cp2_dp_shard2": (8, ["parallel.pp=2", "parallel.cp=2", "parallel.dp_shard=2"]),
}
FOUR_LAYERS = ("model.n_layers=4",)


def _unprefixed(params: dict) -> dict:
    """Interleaved stages live in a ModuleList: '0.layers.1.x' -> 'layers.1.x'."""
    return {(k.split(".", 1)[1] if k.split(".", 1)[0].isdigit() else k): v for k, v in params.items()}


@pytest.mark.parametrize("layout", PP_LAYOUTS)
def test_pipeline_matches_single_process(layout, references, small_corpus, tmp_path):
    """Each schedule, and pp composed with FSDP and with TP: the single-process run within 1e-4 / 1e-5."""
    from conftest import TEST_OVERRIDES

    world, extra = PP_LAYOUTS[layout]
    ov = TEST_OVERRIDES + [f"data.prepared={small_corpus}", f"train.output_dir={tmp_path / 'run'}",
                           f"train.steps={STEPS}", "checkpoint.at_end=true"] + extra + list(FOUR_LAYERS)
    assert_matches(layout, run_ranks(_train, world, ov), references(FOUR_LAYERS), tmp_path)


@contextlib.contextmanager
def _process_group(overrides):
    """(experiment, env) of this forked rank, its process group torn down afterwards."""
    import torch.distributed as dist

    from loomtrain.launch.env import init_distributed
    from loomtrain.trainer.config import load_config

    exp = load_config("tiny", overrides)
    env = init_distributed(exp.parallel)
    try:
        yield exp, env
    finally:
        dist.destroy_process_group()


def _initial_params(rank, overrides):
    """Full values of this rank's parameters right after the trainer built them (meta -> shards)."""
    from torch.distributed.tensor import DTensor

    from loomtrain.trainer.models.llama.model import canonical_name
    from loomtrain.trainer.train import Trainer

    with _process_group(overrides) as (exp, env):
        trainer = Trainer(exp, env)
        return trainer.args, _unprefixed({canonical_name(n): (p.full_tensor() if isinstance(p, DTensor)
                                                              else p.detach()).clone()
                                          for n, p in trainer.model.named_parameters()})


@pytest.mark.parametrize("layout", [
    ["parallel.tp=2", "parallel.dp_shard=2", "parallel.activation_checkpoint=full"],
    ["parallel.pp=2", "parallel.dp_shard=2", "parallel.pp_schedule=interleaved_1f1b",
     "parallel.pp_virtual_stages=2", "model.n_layers=4", "train.microbatches=4"],
    ["parallel.cp=2", "parallel.dp_shard=2", "parallel.mesh_order=pp,dp_replicate,cp,dp_shard,tp"],
], ids=["tp2_dp_shard2_ac", "pp2_interleaved_dp_shard2", "cp2_dp_shard2_order_cp_outside_shard"])
def test_sharded_init_equals_single_process_init(layout, small_corpus, tmp_path):
    """The model is built on the meta device and each rank fills only its shards; the values are
    exactly those of the whole model initialised in one process."""
    from conftest import TEST_OVERRIDES

    from loomtrain.trainer.config import load_config
    from loomtrain.trainer.models.llama.model import Transformer

    ov = TEST_OVERRIDES + [f"data.prepared={small_corpus}", f"train.output_dir={tmp_path / 'run'}"] + layout
    results = run_ranks(_initial_params, 4, ov)
    whole = Transformer(results[0][0])
    whole.init_weights(load_config("tiny", ov).train.seed)
    want = dict(whole.named_parameters())
    seen = set()
    for _, got in results:
        for name, value in got.items():
            assert torch.equal(value, want[name]), name
            seen.add(name)
    assert seen == want.keys()  # every parameter is held by some rank


def _proc_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _build_peak_memory(rank, overrides):
    """(peak resident growth while the trainer builds its model, bytes of this rank's parameter shards)."""
    from torch.distributed.tensor import DTensor

    from loomtrain.trainer.train import Trainer

    with _process_group(overrides) as (exp, env):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak (VmHWM) to the current resident size
        before = _proc_kib("VmRSS")
        trainer = Trainer(exp, env)
        grown = (_proc_kib("VmHWM") - before) * 1024
        local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() * 4 for p in trainer.model.parameters())
        return grown, local, trainer.args.num_params() * 4


def test_no_rank_materializes_the_whole_model(small_corpus, tmp_path):
    """A ~400 MB (fp32) model over dp_shard=4: building it grows each rank by its shard (100 MB) plus
    start-up costs, not by the whole model as when every rank initialised it in full before sharding
    (that measured 1.3x the model here)."""
    from conftest import TEST_OVERRIDES

    ov = TEST_OVERRIDES + [f"data.prepared={small_corpus}", f"train.output_dir={tmp_path / 'run'}",
                           "model.dim=1024", "model.n_layers=8", "model.n_heads=8", "model.n_kv_heads=8",
                           "parallel.dp_shard=4", "logging.peak_tflops=1"]  # no CPU matmul probe
    for grown, local, whole in run_ranks(_build_peak_memory, 4, ov):
        assert whole > 150e6 and local < 0.3 * whole, (local, whole)
        assert grown < 0.75 * whole, f"building grew this rank by {grown / 1e6:.0f} MB; whole model {whole / 1e6:.0f} MB"


def _train_spying_logits(rank, overrides):
    """(losses, dtypes of the logits the loss saw on this rank)."""
    from loomtrain.trainer import loss as loss_mod
    from loomtrain.trainer import step as step_mod
    from loomtrain.trainer import train as train_mod
    from loomtrain.launch import train as launch_train
    from loomtrain.trainer.config import load_config

    seen, original = set(), loss_mod.token_loss_sum

    def spy(logits, labels):
        seen.add(str(logits.dtype))
        return original(logits, labels)

    # the steps get the loss from loss.build_loss_sum (train.loss_chunk_tokens), which hands out this module's
    step_mod.token_loss_sum = train_mod.token_loss_sum = loss_mod.token_loss_sum = spy
    result = launch_train.run(load_config("tiny", overrides))
    return result.losses, result.grad_norms, seen


@pytest.mark.parametrize("extra", [["parallel.dp_shard=1"], ["parallel.dp_shard=2"]], ids=["pp2", "pp2_dp_shard2"])
def test_pipeline_bf16_runs_in_bf16(extra, small_corpus, tmp_path):
    """bf16 under pipeline parallelism is real: autocast without FSDP (it used to run in fp32 there),
    FSDP's mixed precision with it; loss and gradient norm near one bf16 process within the measured bf16
    spread's tolerances (conftest; bf16 rounding differs by layout), on a run that learns by more than that."""
    from conftest import BF16_LOSS_RTOL, BF16_NORM_RTOL, TEST_OVERRIDES

    ov = TEST_OVERRIDES + [f"data.prepared={small_corpus}", f"train.steps={STEPS}", "model.dtype=bfloat16"] + \
        list(FOUR_LAYERS)
    [(ref, ref_norms, ref_seen)] = run_ranks(_train_spying_logits, 0, ov + [f"train.output_dir={tmp_path / 'ref'}"])
    assert ref_seen == {"torch.bfloat16"}
    assert ref[1] - ref[STEPS] > 10 * BF16_LOSS_RTOL * ref[1]
    results = run_ranks(_train_spying_logits, 4 if "parallel.dp_shard=2" in extra else 2,
                        ov + [f"train.output_dir={tmp_path / 'pp'}", "parallel.pp=2"] + extra)
    assert set().union(*(seen for _, _, seen in results)) == {"torch.bfloat16"}
    for losses, norms, _ in results:
        for step in range(1, STEPS + 1):
            assert losses[step] == pytest.approx(ref[step], rel=BF16_LOSS_RTOL), step
            assert norms[step] == pytest.approx(ref_norms[step], rel=BF16_NORM_RTOL), step
