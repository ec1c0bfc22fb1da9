"""Training over slow links, on real shaped sockets: DDP vs DiLoCo vs Streaming DiLoCo (fp4) vs CO2.

Four workers (``parallel.dp_replicate=4``, one rank each), every rank in its own Linux network namespace
with a veth to a bridge in a further namespace (``../shared/design/TESTING.md``); with ``--rate`` each
rank's upload and download are shaped by a token-bucket qdisc. A Llama-style model trained on the
standard-library corpus, the same steps and tokens for every method. Per run: validation loss against
tokens and wall clock, bytes each worker sent (counted by loomtrain at the transport, per purpose, and by
the kernel: ``tx_bytes`` of the rank's interface, TCP/IP included). Needs root (namespaces, tc).

    pip install -e '.[bench]'                      # matplotlib, for the plot
    python scripts/bench_slow_links.py --steps 480 --rate 100mbit --sync-every 120 --sweep 30,60 --out BENCH_DIR
    python scripts/bench_slow_links.py --report BENCH_DIR   # table (Markdown) and the PNG again

Every namespace is removed at the end, also on failure or Ctrl-C. Runs already in ``--out``'s results.json
(an interrupted invocation) are kept and skipped.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

WORKERS = 4
SUBNET = "10.77.0"
PORT = 29711
MODEL = ["model.dim=128", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=2", "data.seq_len=128",
         "train.global_batch_size=32", "optim.lr=3e-3", "optim.warmup_steps=20", "train.threads=1",
         "train.progress=false", "train.log_every=1", "train.eval_batches=8", "checkpoint.at_end=false"]


def methods(sync_every: int, co2_every: int) -> dict[str, list[str]]:
    h = sync_every
    return {
        "ddp": ["parallel.dp_sync=every_step"],
        "diloco": ["parallel.dp_sync=diloco", f"dp_sync.diloco.sync_every={h}", "dp_sync.diloco.fragments=1"],
        "streaming_diloco_fp4": ["parallel.dp_sync=diloco", f"dp_sync.diloco.sync_every={h}",
                                 "dp_sync.diloco.fragments=4", f"dp_sync.diloco.fragment_sync_delay={max(1, h // 16)}",
                                 "dp_sync.diloco.fragment_update_alpha=0.5", "dp_sync.diloco.quantize=fp4"],
        "co2": ["parallel.dp_sync=co2", f"dp_sync.co2.sync_every={co2_every}"],
    }


def sh(cmd: str, check: bool = True) -> None:
    subprocess.run(cmd, shell=True, check=check, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


class Network:
    """Namespaces lt-h0..3 and a bridge in lt-sw; ``shape(rate)`` sets (or clears) every veth's tbf."""

    def __init__(self):
        self.built = False

    def __enter__(self):
        self.down()
        sh("ip netns add lt-sw && ip netns exec lt-sw ip link add br0 type bridge && "
           "ip netns exec lt-sw ip link set br0 up && ip netns exec lt-sw ip link set lo up")
        for r in range(WORKERS):
            sh(f"ip netns add lt-h{r} && ip link add lt{r}a type veth peer name lt{r}b && "
               f"ip link set lt{r}a netns lt-h{r} && ip link set lt{r}b netns lt-sw && "
               f"ip netns exec lt-h{r} ip addr add {SUBNET}.{r + 1}/24 dev lt{r}a && "
               f"ip netns exec lt-h{r} ip link set lt{r}a up && ip netns exec lt-h{r} ip link set lo up && "
               f"ip netns exec lt-sw ip link set lt{r}b master br0 && ip netns exec lt-sw ip link set lt{r}b up")
        self.built = True
        return self

    def shape(self, rate: str | None) -> None:
        for r in range(WORKERS):
            for ns, dev in ((f"lt-h{r}", f"lt{r}a"), ("lt-sw", f"lt{r}b")):  # the rank's upload, its download
                sh(f"ip netns exec {ns} tc qdisc del dev {dev} root", check=False)
                if rate:
                    sh(f"ip netns exec {ns} tc qdisc add dev {dev} root tbf rate {rate} burst 256kb latency 200ms")

    @staticmethod
    def tx_bytes(r: int) -> int:
        out = subprocess.run(["ip", "netns", "exec", f"lt-h{r}", "cat", f"/sys/class/net/lt{r}a/statistics/tx_bytes"],
                             check=True, capture_output=True, text=True).stdout
        return int(out)

    @staticmethod
    def down() -> None:
        for r in range(WORKERS):
            sh(f"ip netns del lt-h{r}", check=False)
        sh("ip netns del lt-sw", check=False)

    def __exit__(self, *exc):
        self.down()


def train(name: str, overrides: list[str], out: str, prepared: str, port: int, log, steps: int) -> dict:
    """One run: four ranks, one per namespace; returns its metrics and wire bytes."""
    run_dir = os.path.join(out, name)
    sets = MODEL + overrides + [f"parallel.dp_replicate={WORKERS}", "parallel.dp_shard=1",
                                f"data.prepared={prepared}", f"train.output_dir={run_dir}"]
    before = [Network.tx_bytes(r) for r in range(WORKERS)]
    procs, start = [], time.time()
    for r in range(WORKERS):
        env = os.environ | {"RANK": str(r), "WORLD_SIZE": str(WORKERS), "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                            "MASTER_ADDR": f"{SUBNET}.1", "MASTER_PORT": str(port), "GLOO_SOCKET_IFNAME": f"lt{r}a",
                            "LOOMTRAIN_RUN_ID": f"bench-{name}-{port}"}
        cmd = ["ip", "netns", "exec", f"lt-h{r}", sys.executable, "-m", "loomtrain.launch.cli", "train", "tiny"]
        for s in sets:
            cmd += ["--set", s]
        procs.append(subprocess.Popen(cmd, env=env, stdout=log if r == 0 else subprocess.DEVNULL, stderr=log))
    codes = [p.wait() for p in procs]
    wall = time.time() - start
    wire = [Network.tx_bytes(r) - b for r, b in zip(range(WORKERS), before)]
    path = os.path.join(run_dir, "metrics.jsonl")
    records = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
    finished = any(r.get("step") == steps and "val_loss" in r for r in records)
    if any(codes) and not finished:
        raise SystemExit(f"{name}: ranks exited with {codes} (log: {log.name})")
    if any(codes):  # seen once: a gloo rank aborting in its exit path after the run had finished and logged
        print(f"  warning: {name}: ranks exited with {codes} after finishing every step (log: {log.name})",
              flush=True)
    return {"name": name, "wall_s": wall, "start": start, "records": records, "wire_bytes": wire}


def summarize(run: dict) -> dict:
    recs = run["records"]
    steps = [r for r in recs if "loss" in r]
    evals = [(r["tokens"] if "tokens" in r else None, r["time"] - run["start"], r["val_loss"])
             for r in recs if "val_loss" in r]
    last = steps[-1]
    return {"name": run["name"], "final_val": evals[-1][2], "wall_s": run["wall_s"],
            "dp_sync_per_worker": last["bytes_dp_sync"] / WORKERS,
            "all_per_worker": sum(v for k, v in last.items() if k.startswith("bytes_") and
                                  not k.startswith("bytes_max_rank_")) / WORKERS,
            "wire_per_worker": sum(run["wire_bytes"]) / WORKERS, "evals": evals,
            "step_time_s": sorted(r["step_time_s"] for r in steps)[len(steps) // 2]}


def report(out: str) -> str:
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    rows = []
    base = {link: next(s for s in runs if s["name"] == "ddp") for link, runs in results.items()}
    fast = results.get("unshaped", [])
    for link, runs in results.items():
        for s in runs:
            ref = base[link]
            twin = next((t for t in fast if t["name"] == s["name"]), None)
            rows.append(f"| {link} | {s['name']} | {s['final_val']:.4f} | {100 * (s['final_val'] / ref['final_val'] - 1):+.2f}% "
                        f"| {s['dp_sync_per_worker'] / 1e6:.3f} | {s['all_per_worker'] / 1e6:.3f} "
                        f"| {s['wire_per_worker'] / 1e6:.2f} | {ref['dp_sync_per_worker'] / max(1, s['dp_sync_per_worker']):.0f}x "
                        f"| {s['wall_s']:.1f} | {s['wall_s'] / twin['wall_s'] if twin else float('nan'):.2f}x "
                        f"| {s['step_time_s'] * 1e3:.0f} |")
    head = ("| link | method | final val loss | vs DDP | dp_sync MB/worker | all counted MB/worker | wire MB/worker "
            "| DDP/this dp_sync bytes | wall s | wall vs unshaped | median step ms |\n"
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    table = head + "\n" + "\n".join(rows)
    _plot(results, os.path.join(out, "slow_links.png"))
    return table


def _plot(results: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no plot", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for link, style in (("unshaped", "-"), ("shaped", "--")):
        for s in results.get(link, []):
            tokens, wall, val = zip(*s["evals"])
            axes[0].plot(wall, val, style, marker="o", ms=3, label=f"{s['name']} ({link})")
            if link == "unshaped":
                axes[1].plot(tokens, val, style, marker="o", ms=3, label=s["name"])
    axes[0].set(xlabel="wall clock (s)", ylabel="validation loss", title="loss vs wall clock")
    axes[1].set(xlabel="tokens", ylabel="validation loss", title="loss vs tokens (unshaped)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=110)
    os.replace(path + ".tmp.png", path)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=480)
    ap.add_argument("--sync-every", type=int, default=120, help="DiLoCo H (fragments: 4 of them in the streaming run)")
    ap.add_argument("--co2-every", type=int, default=12, help="CO2 tau")
    ap.add_argument("--eval-every", type=int, default=60)
    ap.add_argument("--rate", default="100mbit", help="tbf rate of the shaped runs (each direction of each rank)")
    ap.add_argument("--methods", default="ddp,diloco,streaming_diloco_fp4,co2")
    ap.add_argument("--sweep", default="32,64", help="more sync_every values for Streaming DiLoCo (fp4, multiples of "
                                                     "its 4 fragments), on the unshaped link only: the bytes/quality "
                                                     "trade-off; CO2 without outer momentum there too")
    ap.add_argument("--links", default="unshaped,shaped")
    ap.add_argument("--out", default="runs/bench_slow_links")
    ap.add_argument("--report", metavar="DIR", help="only print the table (and redraw the plot) of a finished run")
    args = ap.parse_args()
    if args.report:
        print(report(args.report))
        return
    if os.geteuid() != 0:
        raise SystemExit("bench_slow_links: needs root (network namespaces and tc)")
    os.makedirs(args.out, exist_ok=True)
    from loomtrain.data.prepare import prepare
    from loomtrain.trainer.config import load_config

    exp = load_config("tiny", MODEL)
    prepared = prepare(exp.data, progress=True).train_prefix[:-len("_train")]
    chosen = {k: v for k, v in methods(args.sync_every, args.co2_every).items() if k in args.methods.split(",")}
    common = [f"train.steps={args.steps}", f"train.eval_every={args.eval_every}"]
    saved = os.path.join(args.out, "results.json")
    results: dict[str, list] = json.load(open(saved)) if os.path.exists(saved) else {}
    port = PORT
    with Network() as net, open(os.path.join(args.out, "train.log"), "w") as log:
        for link in args.links.split(","):
            net.shape(args.rate if link == "shaped" else None)
            runs = dict(chosen)
            if link == "unshaped" and args.sweep:
                for h in args.sweep.split(","):
                    runs[f"streaming_diloco_fp4_h{h}"] = methods(int(h), args.co2_every)["streaming_diloco_fp4"]
                runs["co2_momentum0"] = methods(args.sync_every, args.co2_every)["co2"] + ["dp_sync.co2.outer_momentum=0"]
            for name, ov in runs.items():
                port += 1
                if any(r["name"] == name for r in results.get(link, [])):
                    continue  # done by an earlier, interrupted invocation (--out is the same)
                print(f"[{link}] {name} ...", flush=True)
                run = train(f"{link}-{name}", ov + common, args.out, prepared, port, log, args.steps)
                s = summarize(run) | {"name": name}
                results.setdefault(link, []).append(s)
                print(f"  val {s['final_val']:.4f}  wall {s['wall_s']:.1f}s  dp_sync {s['dp_sync_per_worker'] / 1e6:.3f} MB"
                      f"/worker  wire {s['wire_per_worker'] / 1e6:.2f} MB/worker", flush=True)
                with open(os.path.join(args.out, "results.json.tmp"), "w") as f:
                    json.dump(results, f)
                os.replace(os.path.join(args.out, "results.json.tmp"), os.path.join(args.out, "results.json"))
    print(report(args.out))


if __name__ == "__main__":
    main()
