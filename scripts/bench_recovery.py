"""Losing a host: the time from its death to training again, from memory (the lost host's chunks rebuilt from
parity on a spare) vs from a disk checkpoint, on hosts made of network namespaces (``launch/netns.py``).

Three training hosts and one spare, one rank each, their agents (``loomtrain.launch.agent``) meeting at a store on a
fifth host; FSDP over the three ranks; EC groups of k=2 + m=1. The model is sized so that each rank's state (fp32
parameters and AdamW's two moments) is at least ``--state-gib``. Two runs, the same but for where step 2's state
goes: a memory snapshot, or a DCP checkpoint on this machine's disk. Once step 3 is logged (and ``--settle-s``
later, so the snapshot of step 2 has surely committed), host ``b`` is killed whole, and the page cache is
dropped (``/proc/sys/vm/drop_caches``) in both runs: a cluster's shared filesystem is not warm, and the restarted
ranks' imports are cold either way. Measured:

- restore: the trainer's own timing of the load (memory: locate, fetch, decode, verify, load in place; disk:
  ``dcp.load``);
- end to end: the kill to the start of the first step after the restore (that step's record time minus its
  step time), which also counts failure detection, the rendezvous (the dead agent's keep-alive must expire
  first), starting the ranks, building the model and the restore;
- bytes each host received from the kill until the restore line appeared (interface counters; polled every
  20 ms, so a little of the first step's traffic may be in it).

Needs root (namespaces, drop_caches) and about 16 GiB of free memory at the default size.

    python scripts/bench_recovery.py --state-gib 1.0
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

PORT = 29411
HOSTS, SPARES = ["a", "b", "c"], ["d"]
LOST = "b"


def model_sets(state_gib: float, ranks: int) -> tuple[list[str], int]:
    """Overrides for a model whose per-rank state (12 bytes per parameter over ``ranks``) reaches ``state_gib``."""
    from loomtrain.launch.plan import planned_model_args
    from loomtrain.trainer.config import load_config

    base = ["model.dim=1536", "model.n_heads=12", "model.n_kv_heads=4", "data.seq_len=64"]
    for layers in range(1, 200):
        sets = base + [f"model.n_layers={layers}"]
        params = planned_model_args(load_config("tiny", sets))[0].num_params()
        if params * 12 / ranks >= state_gib * 2 ** 30:
            return sets, params
    raise SystemExit("--state-gib: too large")


def _steps(out) -> list[dict]:
    try:
        with open(os.path.join(out, "metrics.jsonl")) as f:
            return [r for r in map(json.loads, f) if "loss" in r]
    except OSError:
        return []


def _rx_bytes(cluster) -> dict[str, int]:
    out = {}
    for name, host in cluster.hosts.items():
        r = subprocess.run(["ip", "netns", "exec", host.namespace, "cat",
                            f"/sys/class/net/{host.interface}/statistics/rx_bytes"], capture_output=True, text=True)
        out[name] = int(r.stdout.strip() or 0)
    return out


def _wait(predicate, timeout_s: float, what: str, poll_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise TimeoutError(f"waited {timeout_s:.0f}s for {what}")


def run(mode: str, sets: list[str], work: str, settle_s: float) -> dict:
    from loomtrain.launch.netns import HostCluster, read_log as _read

    out = os.path.join(work, mode)
    saving = (["faulttol.snapshot.every_steps=2", "faulttol.persist_every_steps=0"] if mode == "memory" else
              ["faulttol.snapshot.every_steps=0", "faulttol.persist_every_steps=2"])
    overrides = sets + saving + [f"train.output_dir={out}"]
    logs = {h: os.path.join(work, f"{mode}-{h}.log") for h in HOSTS + SPARES + ["store"]}
    with HostCluster(HOSTS + SPARES + ["store"], shm_size="6g") as cluster:
        store = cluster.hosts["store"].address
        cluster.spawn("store", [sys.executable, "-m", "loomtrain.launch.rdzv_store", "--port", str(PORT)],
                      log=logs["store"])

        def agent(host):
            return cluster.spawn_agent(host, f"{store}:{PORT}", len(HOSTS), f"bench-{mode}", overrides, logs[host],
                                       max_restarts=2)

        agents = {h: agent(h) for h in HOSTS}
        print(f"[{mode}] starting 3 hosts; waiting for step 1", flush=True)
        _wait(lambda: _steps(out), 1200, "step 1")
        agents.update({h: agent(h) for h in SPARES})
        _wait(lambda: any(r["step"] >= 3 for r in _steps(out)), 1200, "step 3")
        time.sleep(settle_s)
        before = _rx_bytes(cluster)
        killed_at = time.time()
        cluster.kill(LOST)
        subprocess.run("sync; echo 3 > /proc/sys/vm/drop_caches", shell=True, check=False)
        print(f"[{mode}] host {LOST} killed; page cache dropped", flush=True)
        pattern = re.compile(r"(restored step (\d+) from memory in ([\d.]+)s.*)|"
                             r"(resume: step (\d+) from the disk checkpoint \S+ in ([\d.]+)s)|"
                             r"(restored step (\d+) from the disk checkpoint \S+ in ([\d.]+)s)")

        def restored():
            for h in HOSTS + SPARES:
                if h != LOST and (m := pattern.search(_read(logs[h]))):
                    return m
            return None

        line = _wait(restored, 1200, "the restore line", poll_s=0.02)
        after = _rx_bytes(cluster)
        step = int(line.group(2) or line.group(5) or line.group(8))
        restore_s = float(line.group(3) or line.group(6) or line.group(9))
        first = _wait(lambda: next((r for r in _steps(out) if r["step"] == step + 1 and r["time"] > killed_at), None),
                      1200, "the first step after the restore")
        codes = {h: p.wait(timeout=1800) for h, p in agents.items() if h != LOST}
    if any(codes.values()):
        raise SystemExit(f"[{mode}] agents failed: {codes}; logs in {work}")
    return {"mode": mode, "restored_step": step, "restore_s": restore_s,
            "end_to_end_s": first["time"] - first["step_time_s"] - killed_at,
            "rx_mib": {h: (after[h] - before[h]) / 2 ** 20 for h in HOSTS + SPARES if h != LOST},
            "rebuilt": (re.search(r"rebuilt (\d+) rank", line.group(0)) or [None, "0"])[1]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--state-gib", type=float, default=1.0, help="per-rank state to reach (default 1.0)")
    p.add_argument("--settle-s", type=float, default=5.0, help="wait after step 3 before the kill")
    p.add_argument("--work", default=None, help="directory for runs and logs (default: a new one under /var/tmp)")
    a = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_recovery: needs root (network namespaces, drop_caches)", file=sys.stderr)
        return 2
    from loomtrain.data.prepare import prepare
    from loomtrain.trainer.config import DataConfig

    work = a.work or tempfile.mkdtemp(prefix="bench-recovery-", dir="/var/tmp")  # on disk, not a tmpfs
    corpus = os.path.join(work, "corpus")
    prepare(DataConfig(corpus="stdlib", max_documents=200, valid_fraction=0.05), out_prefix=corpus, writer="builtin")
    sets, params = model_sets(a.state_gib, len(HOSTS))
    sets += [f"data.prepared={corpus}", f"parallel.dp_shard={len(HOSTS)}", "train.steps=5",
             "train.global_batch_size=3", "train.log_every=1", "train.progress=false", "train.eval_every=0",
             "train.threads=1", "checkpoint.at_end=false", "optim.warmup_steps=1", "faulttol.ranks_per_node=1",
             "faulttol.ec_parity=1", "faulttol.hang_timeout_s=1800", "faulttol.snapshot.timeout_s=600"]
    state_gib = params * 12 / len(HOSTS) / 2 ** 30
    print(f"model: {params / 1e6:.0f}M parameters, {state_gib:.2f} GiB of state per rank; work in {work}", flush=True)
    results = [run(mode, sets, work, a.settle_s) for mode in ("memory", "disk")]
    mem, disk = results
    print("\n| from | restored step | restore (s) | kill → training again (s) | MiB received per host until the "
          "restore line | ranks rebuilt from parity |\n|---|---|---|---|---|---|")
    for r in results:
        rx = ", ".join(f"{h} {v:.0f}" for h, v in r["rx_mib"].items())
        print(f"| {r['mode']} | {r['restored_step']} | {r['restore_s']:.2f} | {r['end_to_end_s']:.1f} | {rx} | "
              f"{r['rebuilt']} |")
    print(f"\ndisk / memory: restore {disk['restore_s'] / mem['restore_s']:.1f}x, end to end "
          f"{disk['end_to_end_s'] / mem['end_to_end_s']:.2f}x  ({state_gib:.2f} GiB per rank, {len(HOSTS)} hosts + "
          f"{len(SPARES)} spare, k=2 m=1)")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
