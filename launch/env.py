"""Where this process sits: single process, torchrun (or our elastic launch), or Slurm ``srun``.

Reads rank, world size, local rank and the rendezvous address from the environment,
chooses the device and backend (NCCL on CUDA, gloo on CPU unless overridden) and
starts the default process group.
"""
from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass

import torch

from loomtrain.device import device_type_for  # noqa: F401  (callers import it from here too)
import torch.distributed as dist


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str
    source: str  # single | torchrun | slurm

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def expand_slurm_nodelist(nodelist: str) -> list[str]:
    """``node[01-03,7],gpu5`` -> ``['node01', 'node02', 'node03', 'node7', 'gpu5']`` (what scontrol prints)."""
    hosts = []
    parts = re.findall(r"[^,\[]+(?:\[[^\]]*\])?", nodelist)
    for part in parts:
        m = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", part)
        if not m:
            hosts.append(part)
            continue
        prefix, ranges, suffix = m.groups()
        for r in ranges.split(","):
            if "-" in r:
                lo, hi = r.split("-")
                hosts += [f"{prefix}{str(n).zfill(len(lo))}{suffix}" for n in range(int(lo), int(hi) + 1)]
            else:
                hosts.append(f"{prefix}{r}{suffix}")
    return hosts


def read_env(environ=None) -> tuple[int, int, int, int, str]:
    """(rank, world_size, local_rank, local_world_size, source) from torchrun or Slurm variables."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        return (int(env["RANK"]), world, int(env.get("LOCAL_RANK", 0)),
                int(env.get("LOCAL_WORLD_SIZE", world)), "torchrun")
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        world = int(env["SLURM_NTASKS"])
        tasks_per_node = env.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]
        local_world = int(tasks_per_node) if tasks_per_node.isdigit() else world
        return int(env["SLURM_PROCID"]), world, int(env.get("SLURM_LOCALID", 0)), local_world, "slurm"
    return 0, 1, 0, 1, "single"


def slurm_rendezvous(environ=None) -> tuple[str, str]:
    """MASTER_ADDR (first host of the job) and MASTER_PORT (derived from the job id) under srun."""
    env = os.environ if environ is None else environ
    addr = env.get("MASTER_ADDR") or expand_slurm_nodelist(env.get("SLURM_JOB_NODELIST", "127.0.0.1"))[0]
    port = env.get("MASTER_PORT") or str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
    return addr, port


def choose_device(requested: str, local_rank: int) -> torch.device:
    if device_type_for(requested) == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("parallel.device: 'cuda' requested but CUDA is not available")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def choose_backend(requested: str, device: torch.device) -> str:
    """The default group's backend string, always with a CPU backend: fault tolerance, checkpoint and
    snapshot bookkeeping all-reduce CPU tensors on the default group, and NCCL binds to ``cuda`` only
    ("No backend type associated with device type cpu"). So CUDA runs get ``cpu:gloo,cuda:nccl``."""
    if requested == "auto":
        requested = "nccl" if device.type == "cuda" else "gloo"
    if requested == "gloo" or ":" in requested:  # gloo serves both device types; a mapping is taken as given
        return requested
    return f"cpu:gloo,{device.type}:{requested}" if device.type != "cpu" else requested


def device_backend(backend: str, device_type: str) -> str:
    """The backend a ``choose_backend`` string uses for ``device_type`` tensors (``nccl`` for cuda in
    ``cpu:gloo,cuda:nccl``)."""
    if ":" not in backend:
        return backend
    return dict(part.split(":") for part in backend.split(","))[device_type]


def few_sockets() -> None:
    """Keep each rank's sockets in proportion to the peers it talks to, not to the world. gloo connects every
    group as a full mesh at creation: each world-sized group costs world - 1 sockets per rank, and loomtrain has
    several (the default group's CPU side, the snapshots' and the async checkpoint's background groups), which at
    1,024 ranks is thousands of sockets against a common default limit of 1,024 open files. Lazy connection
    (``TORCH_GLOO_LAZY_INIT``, unless the user set it) connects a pair at its first message: a ring's two
    neighbours, a broadcast root's peers. The soft open-files limit is also raised to the hard one."""
    os.environ.setdefault("TORCH_GLOO_LAZY_INIT", "1")
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20),
                                                        hard))
    except (ImportError, ValueError, OSError):
        pass  # not POSIX, or a limit the kernel refuses: keep what the launcher gave


def init_distributed(par_cfg, timeout_s: float = 600.0) -> DistEnv:
    """Start the default process group (a one-rank gloo group when running alone)."""
    rank, world, local_rank, local_world, source = read_env()
    # DeepSpeed (and other libraries) assert LOCAL_RANK is set; single-process and srun runs never set it.
    os.environ.setdefault("LOCAL_RANK", str(local_rank))
    few_sockets()
    device = choose_device(par_cfg.device, local_rank)
    backend = choose_backend(par_cfg.backend, device)
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        if source == "single":
            store = dist.HashStore()
            dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=timeout)
        else:
            if source == "slurm":
                addr, port = slurm_rendezvous()
                os.environ.setdefault("MASTER_ADDR", addr)
                os.environ.setdefault("MASTER_PORT", port)
            dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout, store=_attempt_store(world, timeout),
                                    device_id=device if device.type == "cuda" else None)
    return DistEnv(rank, world, local_rank, local_world, device, backend, source)


def _attempt_store(world: int, timeout: datetime.timedelta):
    """Under torch elastic's agent store, a store namespaced by restart attempt (else None: env://).

    The agent keeps one TCPStore across restarts, so without a prefix a restarted group reads
    the dead attempt's addresses and gloo fails to connect ("connection refused") or hangs.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=timeout)
    return dist.PrefixStore(f"loomtrain/attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
