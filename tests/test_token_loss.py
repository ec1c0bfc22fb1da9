"""The loss is a per-token mean over the global batch, whatever the layout.

Each step's batch is made uneven on purpose: labels of some sequences are masked with -100
(so data-parallel ranks hold different numbers of label tokens), and every other micro-batch
is cut to 40 of its 64 tokens. Loss, gradient norm and final parameters must equal one
process over the same tokens (1e-5 relative, fp32). The old mean-of-means was off here.
"""
import pytest

from conftest import run_ranks
from test_parallel_parity import full_params

STEPS = 4
MASKED = [0, 50, 10, 63, 5, 30, 0, 60]  # labels masked at the start of global sequence i (of 8)


def _uneven(rank, overrides, truncate):
    from loomtrain.data import loader
    from loomtrain.trainer.config import load_config
    from loomtrain.launch.train import run

    original = loader.TrainBatches.build
    built = []

    def build(self, position):
        built.append(position)
        out = []
        micro, nxt = original(self, position)
        for j, batch in enumerate(micro):
            first = self.dp_rank * self.local_batch + j * self.micro_batch  # global index of its first sequence
            if truncate and (first // self.micro_batch) % 2:
                batch = {k: v[:, :40] for k, v in batch.items()}
            batch = {k: v.clone() for k, v in batch.items()}
            for r in range(batch["labels"].shape[0]):
                batch["labels"][r, :MASKED[(first + r) % len(MASKED)]] = -100
            out.append(batch)
        return out, nxt

    loader.TrainBatches.build = build
    result = run(load_config("tiny", overrides))
    assert built, "the uneven batches were never built: the patch missed the trainer's batch path"
    return result.losses, result.grad_norms, result.checkpoint


LAYOUTS = {  # name: (world, overrides, truncate); micro-batches of 2 sequences where the layout allows
    "dp_shard2": (2, ["parallel.dp_shard=2", "train.micro_batch_size=2"], True),
    "tp2_dp_shard2": (4, ["parallel.tp=2", "parallel.dp_shard=2", "train.micro_batch_size=2"], True),
    "cp2_dp_shard2": (4, ["parallel.cp=2", "parallel.dp_shard=2", "train.micro_batch_size=2",
                          "parallel.cp_impl=ring"], True),
    "dp_replicate2_accum": (2, ["parallel.dp_replicate=2", "parallel.dp_shard=1", "train.micro_batch_size=2"], True),
    "pp2_dp_shard2": (4, ["parallel.pp=2", "parallel.dp_shard=2", "model.n_layers=4"], False),
    "deepspeed_dp2": (2, ["parallel.dp_engine=deepspeed", "parallel.dp_shard=2", "train.micro_batch_size=2"], True),
}


@pytest.fixture(scope="module")
def uneven_reference(small_corpus, tmp_path_factory):
    from conftest import TEST_OVERRIDES

    cache = {}

    def get(model, truncate):
        key = (tuple(model), truncate)
        if key not in cache:
            out = tmp_path_factory.mktemp("uneven_ref")
            ov = TEST_OVERRIDES + [f"data.prepared={small_corpus}", f"train.output_dir={out / 'run'}",
                                   f"train.steps={STEPS}", "checkpoint.at_end=true", "train.micro_batch_size=2"]
            [(losses, norms, ckpt)] = run_ranks(_uneven, 0, ov + list(model), truncate)
            cache[key] = losses, norms, full_params(ckpt, out)
        return cache[key]

    return get


@pytest.mark.parametrize("layout", LAYOUTS)
def test_uneven_tokens_match_single_process(layout, uneven_reference, small_corpus, tmp_path):
    from conftest import TEST_OVERRIDES

    world, extra, truncate = LAYOUTS[layout]
    model = [o for o in extra if o.startswith("model.")]
    ref_losses, ref_norms, ref_params = uneven_reference(model, truncate)
    ov = TEST_OVERRIDES + [f"data.prepared={small_corpus}", f"train.output_dir={tmp_path / 'run'}",
                           f"train.steps={STEPS}", "checkpoint.at_end=true"] + extra
    results = run_ranks(_uneven, world, ov, truncate)
    for losses, norms, _ in results:
        for step in range(1, STEPS + 1):
            assert losses[step] == pytest.approx(ref_losses[step], rel=1e-5), (layout, step)
            assert norms[step] == pytest.approx(ref_norms[step], rel=1e-5), (layout, step)
    if layout.startswith("deepspeed"):
        return  # DeepSpeed writes its own checkpoint format; its loss and norm already matched
    params = full_params(results[0][2], tmp_path)
    for name, ref in ref_params.items():
        diff = (params[name].float() - ref.float()).abs().max().item()
        assert diff <= 1e-5 * max(1.0, ref.abs().max().item()), (layout, name, diff)


def _documents_run(rank, overrides):
    from loomtrain.trainer.config import load_config
    from loomtrain.launch.train import run

    result = run(load_config("tiny", overrides))
    return result.losses, result.grad_norms


DOCUMENTS = ["data.batching=documents", "train.global_batch_tokens=600", "data.max_doc_tokens=48", "train.steps=3"]


@pytest.mark.parametrize("world, extra", [
    (2, ["parallel.dp_shard=2", "train.micro_batch_size=2"]),
    (4, ["parallel.cp=2", "parallel.dp_shard=2", "parallel.cp_impl=ring"]),
    # per-document zigzag (each packed document split over the cp ranks), 1-D and two-dimensional
    (2, ["parallel.cp=2", "parallel.dp_shard=1", "parallel.cp_impl=tokenring", "parallel.cp_layout=zigzag_documents"]),
    (4, ["parallel.cp=4", "parallel.dp_shard=1", "parallel.cp_impl=ulysses_ring", "parallel.cp_ulysses=2",
         "parallel.cp_layout=zigzag_documents"]),
])
def test_whole_document_batches_match_single_process(world, extra, small_corpus, tmp_path):
    """data.batching=documents: each rank packs its token-balanced share of the step's documents into rows;
    loss and grad norm equal one process over the same documents (1e-5)."""
    from conftest import TEST_OVERRIDES

    base = TEST_OVERRIDES + [f"data.prepared={small_corpus}"] + DOCUMENTS
    [(ref_losses, ref_norms)] = run_ranks(_documents_run, 0, base + [f"train.output_dir={tmp_path / 'one'}"])
    for losses, norms in run_ranks(_documents_run, world, base + extra + [f"train.output_dir={tmp_path / 'many'}"]):
        for step in ref_losses:
            assert losses[step] == pytest.approx(ref_losses[step], rel=1e-5), step
            assert norms[step] == pytest.approx(ref_norms[step], rel=1e-5), step



def _pp_cp_documents(rank, overrides):
    """``train_capturing`` with interleaved stages' ModuleList prefixes dropped ('0.layers.1.x' -> 'layers.1.x'), the
    validation losses, and where the per-document reorder ran: {"prefetch" (the prefetch thread), "evaluation" (the
    main thread, in an evaluation) or "step" (the main thread otherwise): rows it really moved}."""
    import threading

    from conftest import train_capturing
    from test_parallel_parity import _unprefixed

    from loomtrain.parallel.sp import modes
    from loomtrain.trainer import train as train_mod

    reorder_batch, evaluate, moved, val = modes.reorder_batch, train_mod.Trainer.evaluate, {}, {}

    def reorder(batch, pieces):
        out = reorder_batch(batch, pieces)
        where = ("prefetch" if threading.current_thread().name == "loomtrain-prefetch" else
                 "evaluation" if val.get("running") else "step")
        moved[where] = moved.get(where, 0) + int((out["input_ids"] != batch["input_ids"]).any(1).sum())
        return out

    def evaluated(self):
        val["running"] = True
        record = evaluate(self)
        val[self.step], val["running"] = record["val_loss"], False
        return record

    modes.reorder_batch, train_mod.Trainer.evaluate = reorder, evaluated
    losses, norms, captured = train_capturing(rank, overrides)
    val.pop("running", None)
    return losses, norms, {"params": _unprefixed(captured["params"]), "moved": moved, "val": val}


# Per-document zigzag inside pipeline stages (every stage of a cp rank reorders and cuts its rows the same way), on
# packed windows of real paragraphs: documents of different lengths, their boundaries inside the rows.
PP_CP_DOCUMENTS = {
    "1f1b_ring": ["parallel.cp_impl=ring"],
    "interleaved_tokenring": ["parallel.cp_impl=tokenring", "parallel.pp_schedule=interleaved_1f1b",
                              "parallel.pp_virtual_stages=2"],
}
PARAGRAPH_WINDOWS = ["model.n_layers=4", "train.steps=3", "train.eval_every=3", "train.eval_batches=2"]


@pytest.fixture(scope="module")
def paragraph_windows_reference(paragraphs, tmp_path_factory):
    from conftest import TEST_OVERRIDES

    out = tmp_path_factory.mktemp("paragraph_windows_ref")
    return run_ranks(_pp_cp_documents, 0, TEST_OVERRIDES + [f"data.prepared={paragraphs}", f"train.output_dir={out}"]
                     + PARAGRAPH_WINDOWS)


@pytest.mark.parametrize("schedule", PP_CP_DOCUMENTS)
def test_pipeline_cp_zigzag_documents_match_single_process(schedule, paragraph_windows_reference, paragraphs,
                                                           tmp_path):
    """pp=2 x cp=2 with ``parallel.cp_layout: zigzag_documents``, 1F1B and interleaved: loss, grad norm and
    validation loss within 1e-5 of one process, final parameters within 1e-5 (fp32); the rows were really reordered
    per document, training's on the prefetch thread (overlapped with the step before, not in it)."""
    from conftest import TEST_OVERRIDES, assert_same_training

    ov = TEST_OVERRIDES + [f"data.prepared={paragraphs}", f"train.output_dir={tmp_path}"] + PARAGRAPH_WINDOWS + [
        "parallel.pp=2", "parallel.cp=2", "parallel.dp_shard=1", "parallel.cp_layout=zigzag_documents"]
    results = run_ranks(_pp_cp_documents, 4, ov + PP_CP_DOCUMENTS[schedule])
    assert_same_training(results, paragraph_windows_reference, rtol=1e-5, atol_params=1e-5)
    [(_, _, one)] = paragraph_windows_reference
    for _, _, captured in results:
        assert captured["val"].keys() == one["val"].keys() == {3}
        assert captured["val"][3] == pytest.approx(one["val"][3], rel=1e-5)
        assert captured["moved"].keys() == {"prefetch", "evaluation"} and min(captured["moved"].values()) > 0
