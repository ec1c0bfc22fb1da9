"""NIC-aware placement on real sockets: two pods of two hosts, a fast bridge inside each pod, a shaped core.

Four network namespaces are the hosts a1, b1, a2, b2 (node-rank order interleaves the pods, as a launcher
that sorts by hostname would). Each host has two veths: one to its pod's bridge (unshaped) and one to the
core bridge that joins the pods (token-bucket shaped to --rate, each direction). One rank per host,
parallel.pp=2 x dp_shard=2 (FSDP), Llama-style model on the standard-library corpus.

- ``naive``: placement none: ranks fill the mesh in rank order, every group on the core interface.
- ``placed``: ``parallel.placement: fabric`` with the cluster description: data-parallel groups inside a
  pod on the pod interface, pipeline groups across the core.
- ``placed_fast``: the same with the core unshaped (every link fast).

Per run: median step time; bytes per interface (kernel ``tx_bytes`` inside each namespace, TCP/IP
included) against loomtrain's transport counts per purpose and the plan's prediction of pipeline bytes.
Needs root. Every namespace is removed at the end, also on failure.

    python scripts/bench_placement.py --steps 30 --rate 200mbit
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HOSTS = [("a1", 0), ("b1", 1), ("a2", 0), ("b2", 1)]  # (name, pod): node-rank order interleaves the pods
CORE, POD = "10.79.0", "10.78.{pod}"
PORT = 29811
# Parameters heavy, activations light (a wide model, short rows): what makes data-parallel traffic the one
# worth keeping off the slow link, as at scale.
MODEL = ["model.dim=256", "model.n_layers=8", "model.n_heads=8", "model.n_kv_heads=4", "data.seq_len=64",
         "train.global_batch_size=8", "train.microbatches=4", "optim.warmup_steps=5", "train.threads=1",
         "train.progress=false", "train.log_every=1", "train.eval_every=0", "checkpoint.at_end=false",
         "parallel.pp=2", "parallel.dp_shard=2"]


def sh(cmd: str, check: bool = True) -> None:
    subprocess.run(cmd, shell=True, check=check, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


class Pods:
    """Namespaces lp-<host>, bridges in lp-sw: br-p0, br-p1 (pods) and br-core."""

    def __enter__(self):
        self.down()
        sh("ip netns add lp-sw && ip netns exec lp-sw ip link set lo up")
        for br in ("br-p0", "br-p1", "br-core"):
            sh(f"ip netns exec lp-sw ip link add {br} type bridge && ip netns exec lp-sw ip link set {br} up")
        for i, (host, pod) in enumerate(HOSTS):
            ns = f"lp-{host}"
            sh(f"ip netns add {ns} && ip netns exec {ns} ip link set lo up")
            for kind, bridge, addr in (("p", f"br-p{pod}", f"{POD.format(pod=pod)}.{i + 1}"),
                                       ("c", "br-core", f"{CORE}.{i + 1}")):
                a, b = f"{kind}{i}a", f"{kind}{i}b"
                sh(f"ip link add {a} type veth peer name {b} && ip link set {a} netns {ns} && ip link set {b} netns lp-sw"
                   f" && ip netns exec {ns} ip addr add {addr}/24 dev {a} && ip netns exec {ns} ip link set {a} up"
                   f" && ip netns exec lp-sw ip link set {b} master {bridge} && ip netns exec lp-sw ip link set {b} up")
        return self

    @staticmethod
    def shape(rate: str | None) -> None:
        for i, (host, _) in enumerate(HOSTS):
            for ns, dev in ((f"lp-{host}", f"c{i}a"), ("lp-sw", f"c{i}b")):
                sh(f"ip netns exec {ns} tc qdisc del dev {dev} root", check=False)
                if rate:
                    sh(f"ip netns exec {ns} tc qdisc add dev {dev} root tbf rate {rate} burst 256kb latency 200ms")

    @staticmethod
    def tx(i: int, kind: str) -> int:
        host = HOSTS[i][0]
        return int(subprocess.run(["ip", "netns", "exec", f"lp-{host}", "cat",
                                   f"/sys/class/net/{kind}{i}a/statistics/tx_bytes"],
                                  check=True, capture_output=True, text=True).stdout)

    @staticmethod
    def down() -> None:
        for host, _ in HOSTS:
            sh(f"ip netns del lp-{host}", check=False)
        sh("ip netns del lp-sw", check=False)

    def __exit__(self, *exc):
        self.down()


def cluster_file(path: str, rate_gbps: float) -> None:
    import yaml

    hosts = [{"name": h, "fabric": f"pod{p}", "devices": 1, "interface": f"p{i}a", "between_interface": f"c{i}a"}
             for i, (h, p) in enumerate(HOSTS)]
    with open(path, "w") as f:
        yaml.safe_dump({"fabrics": {"pod0": {"kind": "ethernet", "gbps": 10}, "pod1": {"kind": "ethernet", "gbps": 10},
                                    "core": {"kind": "ethernet", "gbps": rate_gbps}},
                        "between": "core", "intra_host_gbps": 100, "hosts": hosts}, f)


def run(name: str, extra: list[str], out: str, prepared: str, port: int, log) -> dict:
    run_dir = os.path.join(out, name)
    sets = MODEL + extra + [f"data.prepared={prepared}", f"train.output_dir={run_dir}"]
    before = {(i, k): Pods.tx(i, k) for i in range(len(HOSTS)) for k in "pc"}
    procs = []
    for i, (host, _) in enumerate(HOSTS):
        env = os.environ | {"RANK": str(i), "WORLD_SIZE": str(len(HOSTS)), "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                            "MASTER_ADDR": f"{CORE}.1", "MASTER_PORT": str(port), "GLOO_SOCKET_IFNAME": f"c{i}a",
                            "LOOMTRAIN_HOST_ID": host, "LOOMTRAIN_RUN_ID": f"bench-{name}-{port}"}
        cmd = ["ip", "netns", "exec", f"lp-{host}", sys.executable, "-m", "loomtrain.launch.cli", "train", "tiny"]
        for s in sets:
            cmd += ["--set", s]
        procs.append(subprocess.Popen(cmd, env=env, stdout=log if i == 0 else subprocess.DEVNULL, stderr=log))
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"{name}: ranks exited with {codes} (log: {log.name})")
    tx = {f"{HOSTS[i][0]}/{'pod' if k == 'p' else 'core'}": Pods.tx(i, k) - before[(i, k)]
          for i in range(len(HOSTS)) for k in "pc"}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    steps = [r["step_time_s"] for r in records if "step_time_s" in r][2:]  # the first steps build the schedule
    last = records[-1]
    return {"name": name, "step_s": statistics.median(steps), "tx": tx,
            "core_tx": sum(v for k, v in tx.items() if k.endswith("/core")),
            "pod_tx": sum(v for k, v in tx.items() if k.endswith("/pod")),
            "counted": {k[len("bytes_"):]: v for k, v in last.items()
                        if k.startswith("bytes_") and not k.startswith("bytes_max_rank_")}}


def predicted_pp_bytes(steps: int) -> float:
    from loomtrain.launch.plan import traffic_per_step
    from loomtrain.parallel.mesh import ParallelDims
    from loomtrain.trainer.config import load_config
    from loomtrain.trainer.models.llama.model import ModelArgs

    exp = load_config("tiny", MODEL)
    args = ModelArgs.from_config(exp.model, 320, exp.data.seq_len)
    return traffic_per_step(exp, args, ParallelDims(pp=2, dp_shard=2, world_size=4))["pp"] * 4 * steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rate", default="200mbit")
    ap.add_argument("--out", default="runs/bench_placement")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench_placement: needs root (network namespaces and tc)")
    os.makedirs(args.out, exist_ok=True)
    from loomtrain.data.prepare import prepare
    from loomtrain.trainer.config import load_config

    prepared = prepare(load_config("tiny", MODEL).data, progress=True).train_prefix[:-len("_train")]
    rate_gbps = float(args.rate.removesuffix("mbit")) / 1000 if args.rate.endswith("mbit") else 1.0
    cluster = os.path.join(tempfile.mkdtemp(prefix="lt-cluster-"), "cluster.yaml")
    cluster_file(cluster, rate_gbps)
    common = [f"train.steps={args.steps}"]
    placed = ["parallel.placement=fabric", f"parallel.cluster={cluster}"]
    results = []
    with Pods() as pods, open(os.path.join(args.out, "train.log"), "w") as log:
        for i, (name, extra, rate) in enumerate((("naive", [], args.rate), ("placed", placed, args.rate),
                                                 ("placed_fast", placed, None))):
            pods.shape(rate)
            print(f"{name} ...", flush=True)
            t0 = time.time()
            r = run(name, common + extra, args.out, prepared, PORT + i, log)
            print(f"  median step {r['step_s'] * 1e3:.0f} ms, core tx {r['core_tx'] / 1e6:.2f} MB, pod tx "
                  f"{r['pod_tx'] / 1e6:.2f} MB ({time.time() - t0:.0f} s)", flush=True)
            results.append(r)
    pp = predicted_pp_bytes(args.steps)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"results": results, "predicted_pp_bytes": pp}, f, indent=1)
    naive, placed_r, fast = results
    print("\n| run | median step ms | core tx MB (all hosts) | pod tx MB | counted pp MB | counted fsdp MB |\n"
          "|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['name']} | {r['step_s'] * 1e3:.0f} | {r['core_tx'] / 1e6:.2f} | {r['pod_tx'] / 1e6:.2f} | "
              f"{r['counted']['pp'] / 1e6:.2f} | {r['counted']['fsdp'] / 1e6:.2f} |")
    print(f"\npredicted pipeline bytes {pp / 1e6:.2f} MB; counted {placed_r['counted']['pp'] / 1e6:.2f} MB "
          f"({100 * (placed_r['counted']['pp'] / pp - 1):+.1f}%); placed core tx {placed_r['core_tx'] / 1e6:.2f} MB "
          f"({100 * (placed_r['core_tx'] / pp - 1):+.1f}% over the prediction: TCP/IP, ACKs, control)")
    print(f"placed vs naive: {naive['step_s'] / placed_r['step_s']:.2f}x faster; placed vs every link fast: "
          f"{placed_r['step_s'] / fast['step_s']:.2f}x")


if __name__ == "__main__":
    main()
