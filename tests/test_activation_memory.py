"""Activation memory (issue 25): ``parallel.activation_checkpoint`` none | full | selective | offload and their
combinations, the chunked loss (``train.loss_chunk_tokens``), the tiled MLP (``parallel.tiled_mlp_tokens``) and
``mem_peak_mib`` in ``metrics.jsonl``.

Each mode trades memory for recomputation or copies and must not change the training: losses, gradient norms and
final parameters equal ``none``'s within 1e-5 (fp32) on one process and on 4 ranks (tp2 x cp2, pp2 x tp2), each
layout against itself without the modes. The pieces are checked where they act: the selective policy keeps the
matmuls and attention kernel (backward recomputes none of them, full checkpointing recomputes all), the offload
hooks really move every activation a block saves (and nothing else) and bring the block before back ahead of its
backward, on CUDA on a side stream after the producing kernel; the chunked loss never computes more than a chunk's
logits at once, under tensor parallelism vocabulary-parallel; the tiled MLP saves none of its intermediates and
recomputes one tile at a time (on CUDA: a lower allocator peak).
"""
import contextlib
import json

import pytest
import torch

from conftest import TEST_OVERRIDES, assert_same_training, run_ranks, train_capturing

STEPS = 3
AC = "parallel.activation_checkpoint="
TILED = "parallel.tiled_mlp_tokens="
ONE_PROCESS = {  # every mode, every combination, and the settings of selective
    "full": [AC + "full"],
    "selective": [AC + "selective"],
    "selective_mm_every2": [AC + "selective", "parallel.ac_save_ops=mm,addmm", "parallel.ac_every=2"],
    "selective_layers": [AC + "selective", "parallel.ac_save_ops=", "parallel.ac_every=2"],
    "offload": [AC + "offload"],
    "full+offload": [AC + "full+offload"],
    "selective+offload": [AC + "selective+offload", "parallel.ac_every=2"],
    "chunked_loss": ["train.loss_chunk_tokens=100", "train.eval_every=3"],  # evaluation through it too
    "chunked_loss+selective+offload": ["train.loss_chunk_tokens=100", AC + "selective+offload"],
    # the tiled MLP: 8 rows x 12 positions per tile, 6 tiles (the last of 4 positions)
    "tiled_mlp": [TILED + "100", "train.eval_every=3"],
    "tiled_mlp+full": [TILED + "100", AC + "full"],
    "tiled_mlp+offload": [TILED + "100", AC + "offload"],
    "tiled_mlp+selective+offload+chunked_loss": [TILED + "100", AC + "selective+offload", "train.loss_chunk_tokens=100"],
}
FOUR_RANKS = {  # layout, the modes it runs
    "tp2_cp2": (["parallel.tp=2", "parallel.cp=2", "parallel.dp_shard=1"],
                [AC + "selective+offload", "parallel.ac_every=2", "train.loss_chunk_tokens=100"]),
    "pp2_tp2": (["parallel.pp=2", "parallel.tp=2", "parallel.dp_shard=1"],
                [AC + "full+offload", "train.loss_chunk_tokens=100"]),
    "pp2_cp2": (["parallel.pp=2", "parallel.cp=2", "parallel.dp_shard=1"],
                [AC + "offload", "train.loss_chunk_tokens=100"]),
    # the tiled MLP alone and combined: tiles of a tp rank's local shard (3 tiles: 6, 6, 4 positions of 16), per
    # pipeline microbatch (2 tiles), under FSDP
    "tp2_cp2_tiled": (["parallel.tp=2", "parallel.cp=2", "parallel.dp_shard=1"], [TILED + "100"]),
    "pp2_tp2_tiled": (["parallel.pp=2", "parallel.tp=2", "parallel.dp_shard=1"],
                      [TILED + "100", AC + "full+offload", "train.loss_chunk_tokens=100"]),
    "dp2_cp2_tiled": (["parallel.dp_shard=2", "parallel.cp=2"], [TILED + "40", AC + "full"]),
}


@pytest.fixture(scope="module")
def base(small_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("memory")
    return lambda name: TEST_OVERRIDES + [f"data.prepared={small_corpus}", f"train.steps={STEPS}",
                                          f"train.output_dir={out / name}"]


@pytest.fixture(scope="module")
def one_process_none(base):
    return run_ranks(train_capturing, 0, base("none"))


@pytest.mark.parametrize("name", list(ONE_PROCESS))
def test_every_mode_trains_like_none_on_one_process(name, base, one_process_none):
    results = run_ranks(train_capturing, 0, base(name) + ONE_PROCESS[name])
    assert_same_training(results, one_process_none, rtol=1e-5, atol_params=1e-5)


@pytest.mark.parametrize("layout", list(FOUR_RANKS))
def test_modes_train_like_none_on_four_ranks(layout, base):
    dims, modes = FOUR_RANKS[layout]
    reference = run_ranks(train_capturing, 4, base(layout + "_none") + dims)
    results = run_ranks(train_capturing, 4, base(layout) + dims + modes)
    assert_same_training(results, reference, rtol=1e-5, atol_params=1e-5)


def test_metrics_record_the_peak_memory_of_each_logged_step(base, tmp_path):
    run_ranks(train_capturing, 0, base("metrics") + ["train.log_every=1", f"train.output_dir={tmp_path}"])
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert all(50 < r["mem_peak_mib"] < 8192 for r in records)  # the process's peak RSS (CPU), MiB


# ---------------------------------------------------------------------------- the pieces, in one process
@pytest.mark.parametrize("argv, field", [
    ([AC + "partial"], "parallel.activation_checkpoint: must be none, full, selective, offload"),
    ([AC + "full+selective"], "parallel.activation_checkpoint: 'full+selective' does not combine"),
    ([AC + "none+offload"], "parallel.activation_checkpoint: 'none+offload' does not combine"),
    ([AC + "offload+offload"], "parallel.activation_checkpoint: 'offload+offload' does not combine"),
    ([AC + "selective", "parallel.ac_save_ops=mm,softmax"], "parallel.ac_save_ops: unknown op 'softmax'; valid: "),
    ([AC + "full", "parallel.ac_every=2"], "parallel.ac_every: only used with activation_checkpoint selective"),
    ([AC + "offload", "parallel.ac_save_ops=mm"], "parallel.ac_save_ops: only used with activation_checkpoint"),
    ([AC + "selective", "parallel.ac_every=0"], "parallel.ac_every: must be >= 1, got 0"),
    ([AC + "full+offload", "parallel.compile=true"], "parallel.compile: not with activation_checkpoint offload"),
    (["train.loss_chunk_tokens=-1"], "train.loss_chunk_tokens: must be >= 0"),
    ([TILED + "-1"], "parallel.tiled_mlp_tokens: must be >= 0"),
])
def test_bad_modes_are_one_line_and_exit_2(argv, field, capsys, tmp_path):
    from loomtrain.launch.cli import main

    assert main(["train"] + [a for x in argv for a in ("--set", x)] + ["--set", f"train.output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: " + field) and "\n" not in err, err
    assert not any(tmp_path.iterdir())


def _block_model(mode: str = "none", seq: int = 64, tiled: int = 0, backend: str = "cpu_flash", **kw):
    """A 2-layer model of the test shape on CPU, its MLPs tiled by ``tiled`` tokens (0: not) and its blocks wrapped
    for ``mode``; (model, offloader)."""
    from loomtrain.parallel.ac import apply_ac
    from loomtrain.parallel.tiled_mlp import apply_tiled_mlp
    from loomtrain.trainer.config import load_config
    from loomtrain.trainer.models import model_family

    family = model_family("llama")
    args = family.args(load_config("tiny", TEST_OVERRIDES).model, 320, seq)
    torch.manual_seed(0)
    model = family.build(args)
    model.init_weights(0)
    model.attention_backend = backend
    if tiled:
        apply_tiled_mlp(model, tiled)
    return model, (apply_ac(model, mode, **kw) if mode != "none" else None)


def _tokens():
    return torch.randint(0, 320, (2, 64), generator=torch.Generator().manual_seed(1))


class OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func] = self.counts.get(func, 0) + 1
        return func(*args, **(kwargs or {}))


def _backward_ops(mode: str, **kw) -> dict:
    model, _ = _block_model(mode, **kw)
    loss = model(_tokens()).logsumexp(-1).sum()
    with OpCounter() as counter:
        loss.backward()
    return counter.counts


def test_selective_keeps_matmuls_and_attention_and_recomputes_elementwise_ops():
    """What backward runs of each block's forward: nothing without checkpointing; the elementwise ops (SwiGLU's silu)
    but no matmul or attention kernel under selective; everything under full; ``ac_every=2``: one block of two."""
    aten = torch.ops.aten
    attention, silu, mm = aten._scaled_dot_product_flash_attention_for_cpu.default, aten.silu.default, aten.mm.default
    none, selective, full = _backward_ops("none"), _backward_ops("selective"), _backward_ops("full")
    every2 = _backward_ops("selective", every=2, save_ops="")  # every second block recomputed whole
    assert none.get(silu, 0) == none.get(attention, 0) == 0
    assert selective[silu] == full[silu] == 2 and every2[silu] == 1  # recomputed: 2 blocks, 1 of 2
    assert selective.get(attention, 0) == 0 and full[attention] == 2 and every2[attention] == 1  # kept / recomputed
    recomputed = every2[mm] - none[mm]  # one block's matmuls up to its last saved tensor (q, k, v, wo, w1, w3)
    assert selective[mm] == none[mm] and recomputed == 6 and full[mm] == none[mm] + 2 * recomputed
    mm_only = _backward_ops("selective", save_ops="mm")
    assert mm_only.get(attention, 0) == 2 and mm_only[mm] == none[mm]  # an op list of one: attention recomputed


def _packed_step(mode: str, route: str):
    """(loss, gradients by parameter name, attention forward calls in forward and in backward) of one step over 2
    rows of 512 tokens holding 5 documents each: long enough for the per-document variable-length calls
    (``trainer/attention.py::PER_DOCUMENT_MIN_SEQ``). ``route``: ``cpu_flash`` (fp32, a CPU flash call per
    document) or ``flash_op`` (bf16 autocast through torch's varlen flash op, the CUDA route)."""
    from test_cp_kernel_calls import packed_ids

    model, _ = _block_model(mode, seq=512, backend="sdpa_flash" if route == "flash_op" else "cpu_flash")
    op = (torch.ops.aten._flash_attention_forward if route == "flash_op"
          else torch.ops.aten._scaled_dot_product_flash_attention_for_cpu).default
    tokens = torch.randint(0, 320, (2, 512), generator=torch.Generator().manual_seed(2))
    with OpCounter() as forward, torch.autocast("cpu", torch.bfloat16, enabled=route == "flash_op"):
        loss = model(tokens, doc_ids=packed_ids(3, 512, 5, seed=2)[1:]).float().logsumexp(-1).mean()
    with OpCounter() as backward:
        loss.backward()
    grads = {n.replace("_checkpoint_wrapped_module.", ""): p.grad for n, p in model.named_parameters()}
    return loss.detach(), grads, forward.counts.get(op, 0), backward.counts.get(op, 0)


@pytest.mark.parametrize("route", ["cpu_flash", "flash_op"])
def test_selective_over_packed_documents_trains_like_none(route):
    """Selective checkpointing with the default ``ac_save_ops`` (the attention kernels' outputs kept) over packed
    documents: loss and gradients equal ``none``'s within 1e-5, and backward reruns no attention kernel.

    ``cpu_flash``: the process's first CPU flash call comes from inside a checkpointed block (the kernel's GQA
    probe, cached per process, is cleared first): the probe's own calls of the op were once recorded by the
    selective mode and handed to the recompute in place of the documents' results (a shape error in backward).
    ``flash_op``: the CUDA route, torch's varlen flash op modelled on CPU by a kernel that enforces its contract
    (tests/test_cp_kernel_calls.py), one call per layer."""
    from test_cp_kernel_calls import flash_op_on_cpu

    from loomtrain.parallel.cp import block_kernels

    with flash_op_on_cpu() if route == "flash_op" else contextlib.nullcontext():
        loss, grads, calls, _ = _packed_step("none", route)
        block_kernels._cpu_flash_gqa.cache_clear()
        sel_loss, sel_grads, sel_calls, recomputed = _packed_step("selective", route)
    assert calls == sel_calls == (2 if route == "flash_op" else 2 * 2 * 5) and recomputed == 0
    torch.testing.assert_close(sel_loss, loss, rtol=1e-5, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(sel_grads[name], grad, rtol=1e-5, atol=1e-5, msg=name)


class Recording:
    """Copies that log what moves, in order (a :class:`loomtrain.parallel.offload.SyncCopies`)."""

    def __init__(self):
        from loomtrain.parallel.offload import SyncCopies

        self.inner, self.log, self.out = SyncCopies(), [], []

    def to_host(self, t):
        self.out.append(t)
        self.log.append(("out", t.shape))
        return self.inner.to_host(t)

    def to_device(self, buf, ready, device):
        self.log.append(("in", buf.shape))
        return self.inner.to_device(buf, ready, device)

    def use(self, t, ready):
        self.log.append(("use", t.shape))
        return t


def test_offload_moves_every_saved_activation_and_no_parameter_and_prefetches_the_block_before():
    from loomtrain.parallel.offload import Offloader

    reference, _ = _block_model()
    model, offloader = _block_model("offload", offloader=Offloader(copies=Recording()))  # logging copies
    saved, outside = [], []  # what autograd saves: without offload; with it, outside the blocks (inner hooks win)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ref_loss = reference(_tokens()).logsumexp(-1).sum()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: outside.append(t) or t, lambda t: t):
        loss = model(_tokens()).logsumexp(-1).sum()
    copies = offloader._fixed
    assert copies.log and all(kind == "out" for kind, _ in copies.log)  # forward: copies out only
    assert not any(isinstance(t, torch.nn.Parameter) for t in copies.out) and offloader.packed > 0

    def params(ts):
        return sum(isinstance(t, torch.nn.Parameter) for t in ts)

    assert params(saved) == params(outside) + offloader.kept  # the blocks' parameters: kept, never copied
    assert len(saved) - params(saved) == len(outside) - params(outside) + offloader.packed + offloader.shared
    n_forward = len(copies.log)
    ref_loss.backward()
    loss.backward()
    back = copies.log[n_forward:]
    first_use = next(i for i, (kind, _) in enumerate(back) if kind == "use")
    assert sum(kind == "in" for kind, _ in back[:first_use + 1]) == offloader.packed  # both blocks on the way back
    assert offloader.prefetched > 0 and offloader.unpacked >= offloader.packed
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        assert torch.equal(p.grad, q.grad), name


def test_full_offload_moves_only_the_block_inputs():
    model, offloader = _block_model("full+offload")
    model(_tokens()).sum().backward()
    assert offloader.packed == 2 and offloader.packed_bytes == 2 * 2 * 64 * 64 * 4  # one (2, 64, 64) fp32 input each


class FakeStreams:
    """The CUDA stream calls, logged, on CPU (``parallel/offload.py::CudaStreams``)."""

    def __init__(self):
        self.log = []
        outer = self

        class Stream:
            def __init__(self, device=None, name="side"):
                self.name = name

            def wait_stream(self, other):
                outer.log.append((self.name, "wait_stream", other.name))

            def wait_event(self, event):
                outer.log.append((self.name, "wait_event", event))

            def record_event(self):
                outer.log.append((self.name, "record_event"))
                return f"event{len(outer.log)}"

        self.Stream, self.main, self.active = Stream, Stream(name="main"), "main"

    def current_stream(self, device):
        return self.main

    def stream(self, s):
        import contextlib

        @contextlib.contextmanager
        def on():
            self.active = s.name
            yield
            self.active = "main"
        return on()

    def record(self, t, s):
        self.log.append(("record_stream", s.name))

    def host_buffer(self, shape, dtype):
        self.log.append(("host_buffer", self.active))
        return torch.empty(shape, dtype=dtype)


def test_cuda_copies_run_on_a_side_stream_after_the_producer_and_before_their_use():
    """StreamCopies' ordering, its CUDA calls logged on CPU: out on the side stream after the current stream's work,
    the source kept alive for the side stream, back on the side stream after the copy out, and the current stream
    waits for a tensor only when backward takes it."""
    from loomtrain.parallel.offload import StreamCopies

    streams = FakeStreams()
    copies = StreamCopies(torch.device("cpu"), streams)
    t = torch.randn(3, 4)
    buf, ready = copies.to_host(t)
    assert streams.log == [("side", "wait_stream", "main"), ("host_buffer", "side"), ("side", "record_event"),
                           ("record_stream", "side")] and torch.equal(buf, t)
    streams.log.clear()
    back, done = copies.to_device(buf, ready, torch.device("cpu"))
    assert streams.log == [("side", "wait_event", ready), ("side", "record_event")]
    streams.log.clear()
    assert torch.equal(copies.use(back, done), t)
    assert streams.log == [("main", "wait_event", done), ("record_stream", "main")]


def test_chunked_loss_equals_the_whole_loss_and_never_holds_more_than_a_chunk_of_logits():
    from loomtrain.trainer.loss import ChunkedTokenLoss, token_loss_sum

    model, _ = _block_model()
    hidden = torch.randn(2, 64, 64, requires_grad=True)
    labels = _tokens()
    labels[0, :10] = -100
    want = token_loss_sum(model.head(hidden), labels)
    want_grads = torch.autograd.grad(want, [hidden, model.output.weight, model.norm.weight])
    rows = []

    def head(h):
        rows.append(h.shape[0] * h.shape[1])
        return model.head(h)

    got = ChunkedTokenLoss(head, chunk_tokens=40)(hidden, labels)  # 20 positions x 2 rows: 4 chunks (20+20+20+4)
    grads = torch.autograd.grad(got, [hidden, model.output.weight, model.norm.weight])
    assert rows[:4] == [40, 40, 40, 8] and sorted(rows[4:]) == [8, 40, 40, 40]  # forward, then backward recomputes
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)  # summed in another order


@pytest.mark.parametrize("mode", ["none", "full"])
def test_tiled_mlp_saves_no_intermediate_and_recomputes_one_tile_at_a_time(mode):
    """Forward keeps none of the MLP's (rows x positions x ffn_hidden) intermediates (the untiled model keeps four per
    block); backward recomputes the tiles last first, each tile's gradient done before the next tile is recomputed,
    and every tile holds at most ``tiled_mlp_tokens`` tokens (2 rows x 20 positions: tiles of 20, 20, 20, 4)."""
    hidden = _block_model()[0].args.ffn_hidden

    def saved_ffn(model):  # activations (not weights) of ffn_hidden features autograd saves outside the tiles
        weights, saved = {p.untyped_storage().data_ptr() for p in model.parameters()}, []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            loss = model(_tokens()).logsumexp(-1).sum()
        return loss, sum(t.shape[-1] == hidden and t.untyped_storage().data_ptr() not in weights for t in saved)

    assert saved_ffn(_block_model(mode)[0])[1] == (8 if mode == "none" else 0)  # full: recomputed whole blocks
    model, _ = _block_model(mode, tiled=40)
    log, phase = [], ["forward"]
    w1 = model.layers["1"].get_submodule(("_checkpoint_wrapped_module." if mode == "full" else "")
                                         + "feed_forward._checkpoint_wrapped_module.w1")

    def on_w1(module, args, out):
        positions = args[0].shape[1]
        log.append((phase[0], positions))
        if phase[0] == "forward" and out.requires_grad:  # the graph backward runs is the one forward built
            out.register_hook(lambda g: log.append(("gradient", positions)))

    w1.register_forward_hook(on_w1)
    loss, saved = saved_ffn(model)
    assert saved == 0 and log == [("forward", 20)] * 3 + [("forward", 4)]
    log.clear()
    phase[0] = "backward"
    loss.backward()
    if mode == "full":  # the block's recompute runs up to the last thing it saved, the last tile's input: through
        assert log[:3] == [("backward", 20)] * 3  # the other tiles' forwards (under their checkpoints: nothing kept)
        log = log[3:]
    assert log == [e for positions in (4, 20, 20, 20) for e in (("backward", positions), ("gradient", positions))]


def test_peak_memory_covers_the_interval_and_resets():
    from loomtrain.trainer.metrics import PeakMemory

    peak = PeakMemory(torch.device("cpu"))
    before = peak.read_mib()
    x = torch.ones(2 ** 26)  # 256 MiB, touched
    del x
    during = peak.read_mib()
    after = peak.read_mib()
    assert during - before > 200
    if peak.resettable:  # Linux: VmHWM reset through /proc/self/clear_refs
        assert after < during - 200


@pytest.mark.gpu
def test_cuda_offload_takes_activations_off_the_device_and_trains_alike():
    """On CUDA: pinned buffers and a side stream (StreamCopies), the offloaded activations are off the device between
    forward and backward, the block before is brought back ahead of its backward, and the gradients equal those
    without offload."""
    from loomtrain.parallel.offload import StreamCopies
    from loomtrain.trainer.attention import resolve_backend

    device = torch.device("cuda")
    tokens = torch.randint(0, 320, (8, 1024), device=device, generator=torch.Generator(device).manual_seed(0))

    def run(mode):
        model, offloader = _block_model(mode, seq=1024, **({"min_offload_bytes": 0} if mode != "none" else {}))
        model.to(device)
        model.attention_backend = resolve_backend("auto", "cuda", torch.float32, model.args.head_dim)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        loss = model(tokens).logsumexp(-1).sum()
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated() - before
        loss.backward()
        torch.cuda.synchronize()
        return model, offloader, held

    reference, _, held_reference = run("none")
    model, offloader, held = run("offload")
    assert isinstance(offloader.copies(device), StreamCopies) and offloader.packed > 0 and offloader.prefetched > 0
    assert held < held_reference - offloader.packed_bytes // 2, (held, held_reference, offloader.packed_bytes)
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.gpu
def test_cuda_tiled_mlp_lowers_the_peak_by_the_mlp_intermediates_and_trains_alike():
    """On CUDA, where the allocator's peak is exact: tiles of 2048 tokens (4 rows x 512 positions of 4096) lower the
    peak of a forward and backward by at least half of what the untiled MLPs keep (four rows x positions x
    ffn_hidden fp32 tensors per block), with the gradients of the untiled model."""
    from loomtrain.trainer.attention import resolve_backend

    device = torch.device("cuda")
    tokens = torch.randint(0, 320, (4, 4096), device=device, generator=torch.Generator(device).manual_seed(0))

    def run(tiled):
        model, _ = _block_model(seq=4096, tiled=tiled)
        model.to(device)
        model.attention_backend = resolve_backend("auto", "cuda", torch.float32, model.args.head_dim)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        model(tokens).logsumexp(-1).sum().backward()
        torch.cuda.synchronize()
        return model, torch.cuda.max_memory_allocated() - before

    reference, peak_reference = run(0)
    model, peak = run(2048)
    kept = 4 * tokens.numel() * model.args.ffn_hidden * 4 * model.args.n_layers
    assert peak < peak_reference - kept // 2, (peak, peak_reference, kept)
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)
