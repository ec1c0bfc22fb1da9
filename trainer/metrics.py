"""Throughput and utilization: tokens/s, MFU against a configured or detected peak, metric sinks.

MFU = (training FLOPs per token x tokens/s) / (peak FLOP/s per device x devices). The
peak comes from ``logging.peak_tflops``, else a table of GPU datasheet figures, else
(CPU) a short matmul probe measured with the threads this rank uses, so CPU MFU is
relative to what this machine's matmul actually reaches.
"""
from __future__ import annotations

import json
import os
import time

import torch

from loomtrain.fsutil import atomic_write_text

# Dense datasheet peaks in TFLOP/s (bf16 / fp32-via-TF32 where it applies).
GPU_PEAK_TFLOPS = {
    "H200": (989.0, 494.0), "H100": (989.0, 494.0), "H800": (989.0, 494.0), "A100": (312.0, 156.0),
    "A800": (312.0, 156.0), "L40S": (362.0, 183.0), "A10": (125.0, 62.5), "V100": (125.0, 15.7),
}


def detect_peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """Per-device peak FLOP/s and where the figure came from."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (bf16, fp32) in GPU_PEAK_TFLOPS.items():
            if key in name:
                return (bf16 if dtype == torch.bfloat16 else fp32) * 1e12, f"datasheet {key}"
        return 312e12, f"unknown GPU '{name}': assumed A100"
    return measure_matmul_flops(dtype), f"CPU matmul probe ({torch.get_num_threads()} threads)"


def measure_matmul_flops(dtype: torch.dtype = torch.float32, n: int = 1024, seconds: float = 0.3) -> float:
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    iters, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.mm(a, b)
        iters += 1
    return 2.0 * n ** 3 * iters / (time.perf_counter() - start)


class PeakMemory:
    """This process's peak memory since the last :meth:`read_mib` (``mem_peak_mib`` in ``metrics.jsonl``).

    - CUDA: the caching allocator's peak of allocated bytes on the device (``torch.cuda.max_memory_allocated``),
      reset after each read (``reset_peak_memory_stats``): tensors only, not the allocator's reserved slack.
    - CPU (Linux): the peak resident set size of the process (``VmHWM`` in ``/proc/self/status``: everything the
      process holds in RAM, the Python interpreter and torch's libraries included), reset to the current RSS after
      each read by writing 5 to ``/proc/self/clear_refs``. Where that file cannot be written (not Linux, or a
      kernel that refuses), the process's peak RSS since it started (``ru_maxrss``), which never goes down.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.resettable = True
        self._reset()

    def _reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        if self.resettable:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                self.resettable = False

    def read_mib(self) -> float:
        """The peak since the last read (or construction), in MiB; starts the next interval."""
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = _peak_rss() if self.resettable else None
            if peak is None:
                import resource
                import sys

                self.resettable = False
                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        self._reset()
        return peak / 2 ** 20


def _peak_rss() -> int | None:
    """``VmHWM`` of this process in bytes (None without ``/proc``)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class MetricsSink:
    """JSON lines to ``<output_dir>/metrics.jsonl`` (one flushed line per record) and wandb when enabled."""

    def __init__(self, output_dir: str, log_cfg, config_dict: dict, enabled: bool, resume_step: int | None):
        """``resume_step``: records after it (logged before a crash, then lost with the step) are dropped."""
        self.enabled = enabled
        self.file = None
        self.wandb = None
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        path = os.path.join(output_dir, "metrics.jsonl")
        if resume_step is not None and os.path.isfile(path):
            with open(path) as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] <= resume_step]
            atomic_write_text(path, "".join(kept))
        self.file = open(path, "a" if resume_step is not None else "w")
        if log_cfg.wandb:
            self.wandb = _start_wandb(output_dir, log_cfg, config_dict)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb is not None:
            # scalars only: lists (loss_by_position) stay in metrics.jsonl
            self.wandb.log({k: v for k, v in record.items() if k != "step" and not isinstance(v, (list, dict))},
                           step=record["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _start_wandb(output_dir: str, log_cfg, config_dict: dict):
    try:
        import wandb
    except ImportError:
        raise RuntimeError("logging.wandb: wandb is not installed (pip install wandb, or 'loomtrain[dev]')") from None
    mode = log_cfg.wandb_mode
    if mode == "auto":
        mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return wandb.init(project=log_cfg.wandb_project, dir=output_dir, config=config_dict, mode=mode)
