"""The device check (scripts/gpu_check.py) on CPU: its smoke mode runs every section's code path, and a
kernel that is off by 1% is reported as failed.

The real run needs a GPU (issue 23); what can go wrong in the script itself (an import, a call whose
signature moved, a section that never reports) shows up here first, on tiny shapes.
"""
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.py"


def _load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def test_cpu_smoke_run_reports_every_section(tmp_path):
    """``--device cpu --tiny``: every section runs in its own process and passes (the CUDA-only parts are
    CPU twins or say they were skipped), the kernels and every cp strategy agree with fp32 attention within
    the script's bf16 tolerances, and gpu_check.md holds a table per section."""
    gpu_check = _load_gpu_check()
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), "--device", "cpu", "--tiny"],
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    sections = report["sections"]
    assert list(sections) == list(gpu_check.SECTIONS)
    assert {name: s["status"] for name, s in sections.items()} == {name: "passed" for name in sections}
    assert report["failed"] == []

    tol = gpu_check.TOL
    for name in ("kernels", "cp"):
        measured = [r for r in sections[name]["rows"] if "out" in r]
        assert measured, name
        for row in measured:
            assert row["ok"] is True, row
            assert row["out"] <= tol["out"] and max(row["dq"], row["dk"], row["dv"]) <= tol["grad"], row
    kernels = {(r["kernel"], r["case"]) for r in sections["kernels"]["rows"] if "out" in r}
    assert {k for k, _ in kernels} >= {"cpu_flash", "math", "auto"}
    assert len({c for _, c in kernels}) == 4  # block causal, block masked, DocumentAttention with and without documents
    cp_runs = {(r["ranks"], r["impl"], r["documents"]) for r in sections["cp"]["rows"] if "out" in r}
    assert len(cp_runs) == 2 * 3 * 3  # 2 and 4 ranks x tokenring, ring, ulysses x one, packed, per-document zigzag
    snapshot = [r for r in sections["snapshot"]["rows"] if r.get("ok") is not None]
    assert snapshot and all(r["ok"] and r["step changed the state"] for r in snapshot)
    assert sections["train"]["info"]["how"].startswith("the trainer")
    assert len(sections["train"]["info"]["losses"]) == 3

    md = (tmp_path / "gpu_check.md").read_text()
    assert md.count("\n## ") == len(sections)
    for title in (s["title"] for s in sections.values()):
        assert title in md
    assert "| kernel | case | ran |" in md and "| ranks | impl | documents |" in md


def test_kernel_off_by_one_percent_fails_the_kernel_section(monkeypatch, tmp_path):
    """A block kernel whose output is 1.01x the true one (the bf16 tolerance of out is 0.5% relative) fails
    the kernels section: every measured row through block_kernels.forward is marked failed."""
    gpu_check = _load_gpu_check()
    from loomtrain.parallel.cp import block_kernels

    real = block_kernels.forward

    def off_by_one_percent(*args, **kwargs):
        out, lse = real(*args, **kwargs)
        return out * 1.01, lse

    monkeypatch.setattr(block_kernels, "forward", off_by_one_percent)
    run = gpu_check.Run(torch.device("cpu"), tiny=True, out=str(tmp_path), deadline=time.time() + 120)
    result = gpu_check.run_section("kernels", run)
    assert result["status"] == "failed"
    measured = [r for r in result["rows"] if "out" in r]
    assert measured and all(r["ok"] is False and r["out"] > gpu_check.TOL["out"] for r in measured)
