"""The CUDA paths' contracts, modelled on CPU (no GPU here): each test stands in for what the device or a
CUDA library enforces and would fail on the code before the fix (issue 23)."""
import os

import pytest
import torch

from conftest import run_ranks

CUDA_ONLY = "cudaonlygloo"  # a backend bound to the cuda device type only, as torch binds NCCL


def _register_cuda_only_backend():
    import torch.distributed as dist

    if CUDA_ONLY.upper() not in dist.Backend._plugins:
        dist.Backend.register_backend(CUDA_ONLY, lambda store, rank, size, timeout:
                                      dist.ProcessGroupGloo(store, rank, size, timeout), devices=["cuda"])


def _cpu_collectives_on_default_group(rank, backend):
    """Start the default group as ``launch.env`` would on a CUDA machine whose collective backend is
    ``backend`` (standing in for nccl), then run the CPU collectives fault tolerance runs on every step."""
    import torch.distributed as dist

    from loomtrain.launch.env import choose_backend

    _register_cuda_only_backend()
    chosen = choose_backend(backend, torch.device("cuda"))
    dist.init_process_group(chosen)
    try:
        count = torch.tensor([rank + 1], dtype=torch.int64)
        dist.all_reduce(count, op=dist.ReduceOp.MAX)  # faulttol/manager.py: _agree_generation
        name = ["run-a" if rank == 0 else ""]
        dist.broadcast_object_list(name, src=0)
        return chosen, int(count), name[0]
    except RuntimeError as e:
        return chosen, None, str(e)
    finally:
        dist.destroy_process_group()


def test_cuda_backend_keeps_a_cpu_backend_for_host_collectives():
    """A backend registered for ``cuda`` only (as NCCL is) cannot all-reduce CPU tensors on the default group;
    ``choose_backend`` pairs it with gloo for ``cpu``, so the fault-tolerance collectives run."""
    for chosen, count, name in run_ranks(_cpu_collectives_on_default_group, 2, CUDA_ONLY):
        assert chosen == f"cpu:gloo,cuda:{CUDA_ONLY}"
        assert count == 2 and name == "run-a"


def _unmapped_cpu_all_reduce(rank):
    import torch.distributed as dist

    _register_cuda_only_backend()
    dist.init_process_group(CUDA_ONLY)
    try:
        dist.all_reduce(torch.ones(1))
        return "ran"
    except RuntimeError as e:
        return str(e)
    finally:
        dist.destroy_process_group()


def test_cuda_only_backend_models_nccl_refusing_cpu_tensors():
    """The stand-in reproduces NCCL's start-up crash: on a group started with the cuda-only backend alone, a CPU
    all-reduce raises "No backend type associated with device type cpu" (what the old default group did)."""
    for outcome in run_ranks(_unmapped_cpu_all_reduce, 2):
        assert "No backend type associated with device type cpu" in outcome


def test_choose_backend_strings():
    """auto -> gloo on CPU and cpu:gloo,cuda:nccl on CUDA; gloo and explicit mappings are kept as given."""
    from loomtrain.launch.env import choose_backend, device_backend

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert choose_backend("auto", cpu) == "gloo"
    assert choose_backend("auto", cuda) == "cpu:gloo,cuda:nccl"
    assert choose_backend("nccl", cuda) == "cpu:gloo,cuda:nccl"
    assert choose_backend("gloo", cuda) == "gloo"
    assert choose_backend("cpu:gloo,cuda:nccl", cuda) == "cpu:gloo,cuda:nccl"
    assert device_backend("cpu:gloo,cuda:nccl", "cuda") == "nccl"
    assert device_backend("gloo", "cuda") == "gloo"


def _deepspeed_alone(rank, overrides):
    from loomtrain.launch import train as launch_train
    from loomtrain.trainer.config import load_config

    local_rank_before = os.environ.get("LOCAL_RANK")
    r = launch_train.run(load_config("tiny", overrides))
    return local_rank_before, r.last_step


def test_deepspeed_runs_as_a_single_process_without_local_rank(overrides):
    """DeepSpeed asserts LOCAL_RANK is set; a single-process run (no launcher variables) must set it itself."""
    ov = overrides + ["train.steps=2", "parallel.dp_engine=deepspeed", "parallel.zero_stage=1"]
    [(before, last)] = run_ranks(_deepspeed_alone, 0, ov)
    assert before is None and last == 2


def _rope_table_dtypes(rank, world, layout):
    """The dtype of the RoPE tables each attention layer receives, the model laid out as ``layout``."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from loomtrain.parallel.parallelize import apply_fsdp
    from loomtrain.trainer.models.llama.model import ModelArgs, Transformer

    dist.init_process_group("gloo")
    try:
        model = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, ffn_hidden=64,
                                      max_seq_len=16))
        model.init_weights(0)
        seen = []
        for block in model.layers.values():
            block.attention.register_forward_pre_hook(lambda m, args: seen.append((args[1].cos.dtype,
                                                                                    args[1].sin.dtype)))
        tokens = torch.randint(0, 64, (1, 16))
        if layout == "fsdp_bf16":
            apply_fsdp(model, init_device_mesh("cpu", (world,)), torch.bfloat16)
            model(tokens)
        else:  # autocast, as the non-FSDP bf16 layouts run
            with torch.autocast("cpu", dtype=torch.bfloat16):
                model(tokens)
        return seen
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("layout", ["fsdp_bf16", "autocast_bf16"])
def test_rope_tables_stay_fp32_under_every_bf16_layout(layout):
    """Every attention layer rotates with fp32 cos/sin whatever the bf16 layout (FSDP2's input cast used to make
    them bf16 under FSDP only, so numerics depended on the layout)."""
    [seen] = run_ranks(_rope_table_dtypes, 1, 1, layout)
    assert len(seen) == 2 and all(d == (torch.float32, torch.float32) for d in seen)


def test_model_dtype_auto_is_bf16_on_cuda_and_fp32_on_cpu():
    """``model.dtype: auto`` (the default) resolves for the device the run plans for."""
    from loomtrain.trainer.checks import check_experiment
    from loomtrain.trainer.config import load_config

    for device, expected in (("cuda", "bfloat16"), ("cpu", "float32")):
        exp = load_config("tiny", ["model.dtype=auto"])
        check_experiment(exp, 1, 1, device)
        assert exp.model.dtype == expected
    exp = load_config("tiny", ["model.dtype=float32"])
    check_experiment(exp, 1, 1, "cuda")
    assert exp.model.dtype == "float32"


def test_cuda_fp32_matmuls_use_tf32():
    """On CUDA, ``configure_math`` turns TF32 on for fp32 matmuls (the peak MFU divides by); CPU runs are unchanged."""
    from loomtrain.device import configure_math

    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    try:
        matmul.fp32_precision = "ieee"
        configure_math("cpu")
        assert matmul.fp32_precision == "ieee"
        configure_math("cuda")
        assert matmul.fp32_precision == "tf32"
    finally:
        matmul.fp32_precision = before


def test_fused_rope_compiles_whole_and_matches_eager():
    """The CUDA RoPE path is ``torch.compile(_rotate, fullgraph=True, dynamic=True)``: on CPU the same compilation
    must succeed in one graph (a graph break would raise) and equal the eager rotation, fp32 and bf16, for two
    sequence lengths (dynamic shapes: no recompilation per length)."""
    from loomtrain.trainer.models.llama.model import _rotate, rope_tables

    fused = torch.compile(_rotate, dynamic=True, fullgraph=True)
    cos_t, sin_t = rope_tables(16, 64, 10000.0)
    for seqlen in (24, 40):
        pos = torch.arange(seqlen).expand(2, seqlen)
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(2, seqlen, 4, 16).to(dtype)
            expected = _rotate(x, cos_t[pos], sin_t[pos])
            got = fused(x, cos_t[pos], sin_t[pos])
            assert got.dtype == dtype
            torch.testing.assert_close(got.float(), expected.float(), rtol=1e-6 if dtype == torch.float32 else 1e-2,
                                       atol=1e-6 if dtype == torch.float32 else 1e-2)


def test_rms_norm_matches_the_fp32_formula():
    """``F.rms_norm`` (fused on CUDA) computes x * rsqrt(mean(x^2) + eps) * w in fp32 and returns x's dtype."""
    from loomtrain.trainer.models.llama.model import RMSNorm

    norm = RMSNorm(32, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(32) + 0.5)
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(3, 5, 32) * 3).to(dtype)
        xf = x.float()
        expected = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight.float()).to(dtype)
        got = norm(x)
        assert got.dtype == dtype
        torch.testing.assert_close(got, expected, rtol=1e-6 if dtype == torch.float32 else 0,
                                   atol=1e-6 if dtype == torch.float32 else 0)


def test_flex_document_mask_matches_the_dense_mask_without_building_it(monkeypatch):
    """Compiled CUDA blocks attend packed documents through FlexAttention's block mask: equal to the dense
    (B, 1, S, S) document mask's result (forward; FlexAttention has no CPU backward), GQA included, and the dense
    mask is never built on that path. Also: ``Module.compile`` on the blocks is what routes a model there."""
    import warnings

    from loomtrain.trainer import attention
    from loomtrain.trainer.models.llama.model import ModelArgs, Transformer, _blocks_compiled

    doc = torch.tensor([[0] * 100 + [1] * 60 + [2] * 96, [0] * 10 + [1] * 246])
    q, k, v = torch.randn(2, 256, 4, 16), torch.randn(2, 256, 2, 16), torch.randn(2, 256, 2, 16)
    dense = attention.attend(q, k, v, doc)  # 256 tokens: below PER_DOCUMENT_MIN_SEQ, the dense-mask call
    block_mask = attention.document_block_mask(doc)

    def no_dense_mask(doc_ids):
        raise AssertionError("a dense document mask was built")

    monkeypatch.setattr(attention, "document_causal_mask", no_dense_mask)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager FlexAttention warns it is unfused
        flex = attention.attend(q, k, v, doc, documents=block_mask)
    torch.testing.assert_close(flex, dense, rtol=1e-5, atol=1e-5)
    model = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, ffn_hidden=64,
                                  max_seq_len=16))
    assert not _blocks_compiled(model)
    for block in model.layers.values():
        block.compile()
    assert _blocks_compiled(model)


def test_no_extra_names_a_package_pip_cannot_build_in_isolation():
    """flash-attn's and NVIDIA apex's builds import torch, so ``pip install 'loomtrain[X]'`` cannot build them (pip
    isolates builds; an extra cannot pass --no-build-isolation): no extra may list them, and docs/gpu.md says how to
    install flash-attn instead."""
    import ast
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    call = next(n for n in ast.walk(ast.parse((root / "setup.py").read_text()))
                if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    extras = ast.literal_eval(next(k.value for k in call.keywords if k.arg == "extras_require"))
    needs_torch_to_build = {"flash-attn", "flash_attn", "apex"}
    assert not {name: pkgs for name, pkgs in extras.items() if needs_torch_to_build & set(pkgs)}
    guide = (root / "docs" / "gpu.md").read_text()
    assert "pip install flash-attn --no-build-isolation" in guide
