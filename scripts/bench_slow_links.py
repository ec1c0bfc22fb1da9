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
import statistics
import time
from dataclasses import dataclass

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


@dataclass
class Run:
    """One training run of a phase: ``link`` is unshaped or shaped; ``workers`` ranks, one per namespace;
    ``steps`` (and the lr schedule's length) the phase's unless set."""

    name: str
    overrides: list[str]
    link: str = "unshaped"
    workers: int = WORKERS
    steps: int | None = None


def train(run: Run, out: str, prepared: str, port: int, log, steps: int) -> dict:
    """One run, resumed from its newest checkpoint when an earlier invocation was interrupted; returns its
    metrics (each step's last record), its wall-clock segments and the wire bytes of this invocation."""
    run_dir = os.path.join(out, f"{run.link}-{run.name}")
    sets = MODEL + run.overrides + [f"parallel.dp_replicate={run.workers}", "parallel.dp_shard=1",
                                    f"data.prepared={prepared}", f"train.output_dir={run_dir}"]
    segments_path = os.path.join(run_dir, "segments.json")
    segments = json.load(open(segments_path)) if os.path.exists(segments_path) else []
    from loomtrain.trainer.checkpoint import latest_checkpoint

    # a complete checkpoint only (an interrupted save leaves a step_*.tmp folder that --resume cannot load)
    resume = bool(segments) and latest_checkpoint(os.path.join(run_dir, "checkpoints")) is not None
    os.makedirs(run_dir, exist_ok=True)
    before = [Network.tx_bytes(r) for r in range(run.workers)]
    start = time.time()
    _write_json(segments_path, segments + [{"start": start}])
    procs = []
    for r in range(run.workers):
        env = os.environ | {"RANK": str(r), "WORLD_SIZE": str(run.workers), "LOCAL_RANK": "0",
                            "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": f"{SUBNET}.1", "MASTER_PORT": str(port),
                            "GLOO_SOCKET_IFNAME": f"lt{r}a", "LOOMTRAIN_RUN_ID": f"bench-{run.name}-{port}"}
        cmd = ["ip", "netns", "exec", f"lt-h{r}", sys.executable, "-m", "loomtrain.launch.cli", "train", "tiny"]
        cmd += ["--resume", "latest"] if resume else []
        for s in sets:
            cmd += ["--set", s]
        procs.append(subprocess.Popen(cmd, env=env, stdout=log if r == 0 else subprocess.DEVNULL, stderr=log))
    loads: list[float] = []
    codes = _wait_all(procs, loads)
    wire = [Network.tx_bytes(r) - b for r, b in zip(range(run.workers), before)]
    records = _last_records(os.path.join(run_dir, "metrics.jsonl"))
    finished = any(r.get("step") == steps and "val_loss" in r for r in records)
    if not finished:  # failed, or stopped early on a signal (the ranks save a checkpoint and exit 0)
        raise SystemExit(f"{run.name}: ranks exited with {codes} before step {steps} (log: {log.name}); "
                         "run again to resume it")
    if any(codes):  # seen once: a gloo rank aborting in its exit path after the run had finished and logged
        print(f"  warning: {run.name}: ranks exited with {codes} after finishing every step (log: {log.name})",
              flush=True)
    return {"name": run.name, "segments": segments + [{"start": start, "wire": wire, "load": loads}], "records": records,
            "workers": run.workers}


def _wait_all(procs: list, loads: list, grace_s: float = 60.0) -> list[int]:
    """Every rank's exit code; once one rank has failed, the others get ``grace_s`` to finish (a finished run's
    ranks exit together) and are then stopped, rather than waiting out gloo's timeout for the dead one. Appends
    the machine's 1-minute load every 10 s to ``loads``: a run's wall clock is only comparable at equal load."""
    failed_at, tick = None, 0
    while any(p.poll() is None for p in procs):
        tick += 1
        if tick % 10 == 0:
            loads.append(os.getloadavg()[0])
        if failed_at is None and any(p.poll() not in (None, 0) for p in procs):
            failed_at = time.time()
        if failed_at is not None and time.time() - failed_at > grace_s:
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            break
        time.sleep(1.0)
    return [p.wait() for p in procs]


def _write_json(path: str, obj) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f)
    os.replace(path + ".tmp", path)


def _last_records(path: str) -> list[dict]:
    """metrics.jsonl's records, each step's last (a resumed run logs again the steps after its checkpoint)."""
    if not os.path.exists(path):
        return []
    by_step: dict[int, dict] = {}
    for line in open(path):
        rec = json.loads(line)
        by_step[rec["step"]] = by_step.get(rec["step"], {}) | rec if "time" not in rec else rec
    return [by_step[s] for s in sorted(by_step)]


def _segment(starts: list[float], t: float) -> int:
    """The index of the invocation (segment, by start time) that logged a record at time ``t``."""
    return max(i for i, start in enumerate(starts) if start <= t)


def _wall_clock(records: list[dict], segments: list[dict]) -> list[float]:
    """Each record's seconds of training since the run began, across resumed segments: a segment counts up
    to its last kept record (the work redone after a resume is counted once, in the later segment)."""
    starts = [s["start"] for s in segments]
    seg_of = [_segment(starts, r["time"]) for r in records]
    ends = {i: max(r["time"] for r, j in zip(records, seg_of) if j == i) for i in set(seg_of)}
    before = {i: sum(ends.get(j, starts[j]) - starts[j] for j in range(i)) for i in range(len(starts))}
    return [before[i] + r["time"] - starts[i] for r, i in zip(records, seg_of)]


def summarize(run: dict) -> dict:
    recs = [r for r in run["records"] if "time" in r]
    walls = _wall_clock(recs, run["segments"])
    steps = [r for r in recs if "loss" in r]
    evals = [(r["tokens"], w, r["val_loss"]) for r, w in zip(recs, walls) if "val_loss" in r]
    # transport counters restart with each process: a segment's bytes are its last kept record's
    seg_last: dict[int, dict] = {}
    starts = [s["start"] for s in run["segments"]]
    for r in steps:
        seg_last[_segment(starts, r["time"])] = r
    def bytes_of(pred):
        return sum(v for r in seg_last.values() for k, v in r.items() if pred(k)) / run["workers"]
    return {"name": run["name"], "final_val": evals[-1][2], "wall_s": walls[-1],
            "dp_sync_per_worker": bytes_of(lambda k: k == "bytes_dp_sync"),
            "all_per_worker": bytes_of(lambda k: k.startswith("bytes_") and not k.startswith("bytes_max_rank_")),
            # the kernel's counter is read around each invocation: an interrupted one's bytes are unknown (nan)
            "wire_per_worker": (sum(sum(s["wire"]) for s in run["segments"]) / run["workers"]
                                if all("wire" in s for s in run["segments"]) else float("nan")),
            "evals": evals, "step_time_s": sorted(r["step_time_s"] for r in steps)[len(steps) // 2],
            "workers": run["workers"], "segments": len(run["segments"]),
            "load": statistics.mean(x for s in run["segments"] for x in s.get("load", [])) if any(
                s.get("load") for s in run["segments"]) else float("nan")}


def report(out: str) -> str:
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    meta = results.pop("_phase", {"reference": "ddp"})
    ref_name = meta["reference"]
    rows, fast = [], results.get("unshaped", [])
    for link, runs in results.items():
        ref = next((s for s in runs if s["name"] == ref_name), None) or next(
            (s for s in fast if s["name"] == ref_name), runs[0])
        for s in runs:
            twin = next((t for t in fast if t["name"] == s["name"]), None)
            rows.append(f"| {link} | {s['name']} | {s['final_val']:.4f} | {100 * (s['final_val'] / ref['final_val'] - 1):+.2f}% "
                        f"| {_gaps(s, ref)} | {s['dp_sync_per_worker'] / 1e6:.3f} | {s['all_per_worker'] / 1e6:.3f} "
                        f"| {s['wire_per_worker'] / 1e6:.2f} | {_ratio(ref['dp_sync_per_worker'], s['dp_sync_per_worker'])} "
                        f"| {s['wall_s']:.1f}{_resumed(s)} | {s['wall_s'] / twin['wall_s'] if twin else float('nan'):.2f}x "
                        f"| {s['step_time_s'] * 1e3:.0f} | {s.get('load', float('nan')):.1f} |")
    head = (f"| link | method | final val loss | vs {ref_name} | gap at 1/4, 1/2, 3/4 of tokens | dp_sync MB/worker "
            "| all counted MB/worker | wire MB/worker | reference/this dp_sync bytes | wall s | wall vs unshaped "
            "| median step ms | load |\n|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    table = head + "\n" + "\n".join(rows) + _seed_lines(fast, ref_name) + _a0_line(out, fast)
    _plot(results, ref_name, os.path.join(out, "slow_links.png"))
    return table


def _resumed(s: dict) -> str:
    """A resumed run's wall clock includes each later segment's start-up: say how many there were."""
    return f" ({s['segments']} segments)" if s.get("segments", 1) > 1 else ""


def _ratio(ref_bytes: float, bytes_: float) -> str:
    return f"{ref_bytes / bytes_:.0f}x" if bytes_ else "-"  # one worker sends nothing


def _gaps(s: dict, ref: dict) -> str:
    """The loss gap to the reference at equal tokens, a quarter, half and three quarters through: does it
    shrink over the rounds?"""
    theirs = {t: v for t, _, v in ref["evals"]}
    common = [(t, v) for t, _, v in s["evals"] if t in theirs]
    if len(common) < 4:
        return ""
    picks = [common[len(common) * k // 4 - 1] for k in (1, 2, 3)]
    return ", ".join(f"{100 * (v / theirs[t] - 1):+.1f}%" for t, v in picks)


def _a0_line(out: str, runs: list[dict]) -> str:
    """Phase A's check: DiLoCo at H=1 with SGD, outer lr 1 and no momentum is DDP, to fp32 rounding: the
    training losses of the two runs step by step (from their metrics.jsonl), until rounding differences are
    amplified by the training itself (unstable SGD steps make two runs that differ in the last bit part)."""
    names = ("a0_ddp_sgd", "a0_diloco_h1_sgd")
    if not all(any(s["name"] == n for s in runs) for n in names):
        return ""
    a, b = ({r["step"]: r["loss"] for r in _last_records(os.path.join(out, f"unshaped-{n}", "metrics.jsonl"))
             if "loss" in r} for n in names)
    steps = sorted(set(a) & set(b))
    diff = {s: abs(a[s] - b[s]) for s in steps}
    parted = next((s for s in steps if diff[s] > 1e-5), None)
    equal = [s for s in steps if parted is None or s < parted]
    if not equal:
        return (f"\n\n- A0: DiLoCo (H=1, SGD, outer lr 1, no momentum) and DDP (SGD) differ by more than 1e-5 from the "
                f"first logged step ({steps[0]}: {diff[steps[0]]:.2e}): not the same computation")
    return (f"\n\n- A0: DiLoCo (H=1, SGD, outer lr 1, no momentum) vs DDP (SGD), training loss at {len(steps)} logged "
            f"steps: largest difference {max(diff[s] for s in equal):.1e} over steps {equal[0]}-{equal[-1]}"
            + (f"; from step {parted} on more than 1e-5 (largest {max(diff.values()):.2f}, final val "
               f"{next(s for s in runs if s['name'] == names[0])['final_val']:.4f} vs "
               f"{next(s for s in runs if s['name'] == names[1])['final_val']:.4f})" if parted else ""))


def _seed_lines(runs: list[dict], ref_name: str) -> str:
    """Mean and spread of the runs that differ only in their seed (names ``<group>_s<seed>``), and each one's
    gap to the reference's group at the same seed (the same initialisation and data order: a paired gap is
    less noisy than the seeds' spread)."""
    groups: dict[str, dict[str, float]] = {}
    for s in runs:
        g, _, seed = s["name"].rpartition("_s")
        if g and seed.isdigit():
            groups.setdefault(g, {})[seed] = s["final_val"]
    ref = groups.get(ref_name.rpartition("_s")[0], {})
    lines = []
    for g, v in groups.items():
        if len(v) < 2:
            continue
        line = (f"- {g}: mean final val loss {statistics.mean(v.values()):.4f} over {len(v)} seeds "
                f"(spread {max(v.values()) - min(v.values()):.4f})")
        paired = {k: 100 * (x / ref[k] - 1) for k, x in v.items() if k in ref} if v is not ref else {}
        if len(paired) > 1:
            line += ("; against the reference at the same seed: " + ", ".join(
                f"{x:+.2f}% (s{k})" for k, x in sorted(paired.items())) + f", mean {statistics.mean(paired.values()):+.2f}%")
        lines.append(line)
    return ("\n\n" + "\n".join(lines)) if lines else ""


def _plot(results: dict, ref_name: str, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no plot", file=sys.stderr)
        return
    fast = results.get("unshaped", [])
    why = [s for s in fast if s["name"].startswith("why_")]  # phase B's diagnoses: a panel of their own
    fig, axes = plt.subplots(1, 3 + bool(why), figsize=(17 + 5.5 * bool(why), 4.8))
    ref = next((s for s in fast if s["name"] == ref_name), None)
    names = list(dict.fromkeys(s["name"] for runs in results.values() for s in runs))
    colour = {n: plt.get_cmap("tab20")(i % 20) for i, n in enumerate(names)}  # one colour per run in every panel

    theirs = {t: v for t, _, v in ref["evals"]} if ref is not None else {}

    def gap(ax, s, style):
        pts = [(t, 100 * (v / theirs[t] - 1)) for t, _, v in s["evals"] if t in theirs]
        if pts:
            ax.plot(*zip(*pts), style, color=colour[s["name"]], marker="o", ms=2, label=s["name"])

    for link, style in (("unshaped", "-"), ("shaped", "--")):
        for s in results.get(link, []):
            if s in why:
                continue
            tokens, wall, val = zip(*s["evals"])
            c = colour[s["name"]]
            axes[0].plot(wall, val, style, color=c, marker="o", ms=2, label=f"{s['name']} ({link})")
            if link == "unshaped":
                axes[1].plot(tokens, val, style, color=c, marker="o", ms=2, label=s["name"])
                if ref is not None and s is not ref:
                    gap(axes[2], s, style)
    axes[0].set(xlabel="wall clock (s)", ylabel="validation loss", title="loss vs wall clock")
    axes[1].set(xlabel="tokens", ylabel="validation loss", title="loss vs tokens (unshaped)")
    axes[2].set(xlabel="tokens", ylabel=f"% above {ref_name}", title=f"gap to {ref_name} at equal tokens")
    if why and ref is not None:  # each why_ run beside the seed-0 DiLoCo runs it changes one thing of
        for s in [s for s in fast if s["name"].startswith(("diloco_", "streaming_")) and s["name"].endswith("_s0")] + why:
            gap(axes[3], s, "-" if s in why else ":")
        axes[3].set(xlabel="tokens", ylabel=f"% above {ref_name}", title="why_ runs (dotted: the runs they change)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[1].set_ylim(top=min(axes[1].get_ylim()[1], 3.0))
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=110)
    os.replace(path + ".tmp.png", path)
    print(f"wrote {path}")


def _sgd(lr: float) -> list[str]:
    return ["optim.name=sgd", "optim.momentum=0", f"optim.lr={lr}", "optim.grad_clip=0", "optim.weight_decay=0"]


def _diloco_h1() -> list[str]:
    return ["parallel.dp_sync=diloco", "dp_sync.diloco.sync_every=1", "dp_sync.diloco.fragments=1",
            "dp_sync.diloco.outer_lr=1", "dp_sync.diloco.outer_momentum=0", "dp_sync.diloco.nesterov=false"]


def phase_a(args) -> tuple[list[Run], str]:
    """480 steps: is DiLoCo at H=1 DDP (SGD: must be, to fp32 rounding), and what do separate AdamW states and a
    quarter of the batch per worker cost (AdamW: A1 at DDP's lr, A2 at twice it; A3 DDP on one worker's batch)."""
    lr = args.lr[0]
    sgd = _sgd(args.sgd_lr)
    return [Run("ddp", [f"optim.lr={lr}", "parallel.dp_sync=every_step"]),
            Run("a0_ddp_sgd", sgd + ["parallel.dp_sync=every_step"]),
            Run("a0_diloco_h1_sgd", sgd + _diloco_h1()),
            Run("a1_diloco_h1_adamw", [f"optim.lr={lr}"] + _diloco_h1()),
            Run("a2_diloco_h1_adamw_2lr", [f"optim.lr={2 * lr}"] + _diloco_h1()),
            Run("a3_ddp_one_worker_batch", [f"optim.lr={lr}", "parallel.dp_sync=every_step",
                                            f"train.global_batch_size={32 // WORKERS}"], workers=1)], "ddp"


def _better(done: dict, names: list[str]) -> int:
    """Index of the name with the lowest final validation loss among those finished (0 while none is)."""
    finished = [i for i, n in enumerate(names) if n in done]
    return min(finished, key=lambda i: done[names[i]]["final_val"], default=0)


def phase_b(args, results: dict) -> tuple[list[Run], str]:
    """About 19 tokens per parameter: DDP at two learning rates (the better one is the reference and gets a
    second seed); DiLoCo at two inner learning rates, ``--inner-lr-factors`` times DDP's better one (phase A:
    four workers' AdamW steps on a quarter of the batch each, averaged every step, matched DDP at twice its lr
    and not at its lr; with H = 32 and outer momentum that may differ), the better one gets a second seed and is
    the inner lr of Streaming DiLoCo (fp32 and fp4) and CO2; then the first ``why_`` runs that look for the causes
    of the gaps; then the 100 Mbit/s runs (wall clock only: their losses are the unshaped runs'); then the other
    ``why_`` runs. In priority order: the plan is made again after each run, and an interrupted invocation resumes
    where it stopped."""
    done = {s["name"]: s for s in results.get("unshaped", [])}
    seed = lambda s: [f"train.seed={1234 + s}"]  # noqa: E731
    ddps = [f"ddp_lr{lr:g}_s0" for lr in args.lr]
    best_lr = args.lr[_better(done, ddps)]
    best = f"ddp_lr{best_lr:g}"
    h = args.sync_every
    diloco = lambda lr, h=h: ["parallel.dp_sync=diloco", f"dp_sync.diloco.sync_every={h}",  # noqa: E731
                              "dp_sync.diloco.fragments=1", f"optim.lr={lr}"]
    inner_lrs = [f * best_lr for f in args.inner_lr_factors]
    dilocos = [f"diloco_lr{lr:g}_s0" for lr in inner_lrs]
    inner = inner_lrs[_better(done, dilocos)]
    streaming = ["parallel.dp_sync=diloco", f"dp_sync.diloco.sync_every={h}", "dp_sync.diloco.fragments=4",
                 f"dp_sync.diloco.fragment_sync_delay={args.delay}", "dp_sync.diloco.fragment_update_alpha=0.5",
                 f"optim.lr={inner}"] + seed(0)
    runs = {n: [f"optim.lr={lr}", "parallel.dp_sync=every_step"] + seed(0) for n, lr in zip(ddps, args.lr)}
    runs |= {n: diloco(lr) + seed(0) for n, lr in zip(dilocos, inner_lrs)}
    runs |= {f"streaming_fp4_lr{inner:g}_s0": streaming + ["dp_sync.diloco.quantize=fp4"],
             f"streaming_fp32_lr{inner:g}_s0": streaming,
             f"co2_lr{inner:g}_s0": ["parallel.dp_sync=co2", f"dp_sync.co2.sync_every={args.co2_every}",
                                     f"optim.lr={inner}"] + seed(0),
             f"{best}_s1": [f"optim.lr={best_lr}", "parallel.dp_sync=every_step"] + seed(1),
             f"diloco_lr{inner:g}_s1": diloco(inner) + seed(1)}
    shaped = [f"{best}_s0", f"streaming_fp4_lr{inner:g}_s0", f"diloco_lr{inner:g}_s0", f"co2_lr{inner:g}_s0"]
    # Why the local methods sit above DDP, most telling first (the order the session's results led to): one
    # worker with the whole batch (arXiv 2503.09799 finds a tuned M = 1 at or below DDP; alone, it gets both
    # cores; it ended +18.9%), the outer lr (0.4 and 0.2), M = 1 at outer lr 0.4 (+6.6%: the outer step, not the
    # quarter batch, holds most of the gap).
    olr = lambda o: [f"dp_sync.diloco.outer_lr={o}"]  # noqa: E731
    why = [Run(f"why_diloco_m1_lr{best_lr:g}_s0", diloco(best_lr) + seed(0) + ["train.threads=2"], workers=1),
           Run(f"why_diloco_olr0.4_lr{inner:g}_s0", diloco(inner) + seed(0) + olr(0.4)),
           Run(f"why_diloco_olr0.2_lr{inner:g}_s0", diloco(inner) + seed(0) + olr(0.2)),
           Run(f"why_diloco_m1_olr0.4_lr{best_lr:g}_s0", diloco(best_lr) + seed(0) + olr(0.4) + ["train.threads=2"],
               workers=1)]
    # After the 100 Mbit/s runs (the issue asks for those; these only probe causes): fp4 with error feedback
    # (fp4 ended 1.05% above fp32, the literature says within 0.5%; with feedback it ended 0.45% above),
    # Streaming's overlap and mix on one fragment (Streaming fp32 ended 2.3% below DiLoCo; this ended 0.09% from
    # Streaming: the mix is all of it), twice the rounds, outer lr 1.
    why_after_shaped = [
        Run(f"why_streaming_fp4_feedback_lr{inner:g}_s0",
            streaming + ["dp_sync.diloco.quantize=fp4", "dp_sync.diloco.error_feedback=true"]),
        Run(f"why_diloco_tau{args.delay}_alpha0.5_lr{inner:g}_s0",
            diloco(inner) + seed(0) + [f"dp_sync.diloco.fragment_sync_delay={args.delay}",
                                       "dp_sync.diloco.fragment_update_alpha=0.5"]),
        Run(f"why_diloco_h{h // 2}_lr{inner:g}_s0", diloco(inner, h // 2) + seed(0)),
        Run(f"why_diloco_olr1_lr{inner:g}_s0", diloco(inner) + seed(0) + olr(1.0))]
    # DDP at 100 Mbit/s on a schedule that ends when Streaming fp4 ended there: the fair DDP for a fixed wall
    # clock on a slow link (the 4,096-step one, read at that time, is mid-schedule). Planned once both ran.
    done_shaped = {s["name"]: s for s in results.get("shaped", [])}
    ddp_slow, fp4_slow = done_shaped.get(f"{best}_s0"), done_shaped.get(f"streaming_fp4_lr{inner:g}_s0")
    equal_wall = []
    if ddp_slow and fp4_slow:
        n = int(fp4_slow["wall_s"] / ddp_slow["wall_s"] * args.steps) // args.eval_every * args.eval_every
        equal_wall = [Run(f"{best}_{n}steps_s0", runs[f"{best}_s0"], link="shaped", steps=n)]
    return ([Run(n, ov) for n, ov in runs.items()] + why + [Run(n, runs[n], link="shaped") for n in shaped]
            + equal_wall + why_after_shaped,
            f"{best}_s0")


def phase_compare(args) -> tuple[list[Run], str]:
    """The first comparison (480 steps, H = --sync-every): each method on both links, a Streaming DiLoCo
    sync_every sweep and CO2 without outer momentum on the unshaped one."""
    chosen = {k: v for k, v in methods(args.sync_every, args.co2_every).items() if k in args.methods.split(",")}
    runs = [Run(n, ov, link) for link in args.links.split(",") for n, ov in chosen.items()]
    for h in filter(None, args.sweep.split(",")):
        runs.append(Run(f"streaming_diloco_fp4_h{h}", methods(int(h), args.co2_every)["streaming_diloco_fp4"]))
    runs.append(Run("co2_momentum0", methods(args.sync_every, args.co2_every)["co2"] + ["dp_sync.co2.outer_momentum=0"]))
    return runs, "ddp"


PHASES = {"compare": dict(steps=480, eval_every=60, eval_batches=8, warmup=20, log_every=1),
          "A": dict(steps=480, eval_every=60, eval_batches=32, warmup=20, log_every=4),
          "B": dict(steps=4096, eval_every=256, eval_batches=32, warmup=200, log_every=16)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phase", choices=sorted(PHASES), default="compare",
                    help="compare: the first 480-step table; A: the H=1 checks; B: the long runs")
    ap.add_argument("--steps", type=int, help="default: the phase's (compare and A 480, B 4096)")
    ap.add_argument("--sync-every", type=int, help="DiLoCo H (streaming: 4 fragments); default 120, B 32")
    ap.add_argument("--co2-every", type=int, default=12, help="CO2 tau")
    ap.add_argument("--delay", type=int, default=2, help="B: Streaming DiLoCo's fragment_sync_delay (tau)")
    ap.add_argument("--eval-every", type=int)
    ap.add_argument("--lr", type=lambda s: [float(x) for x in s.split(",")], default=[3e-3, 6e-3],
                    help="DDP's AdamW lr (B: two of them, the better is the reference; A: the first)")
    ap.add_argument("--inner-lr-factors", type=lambda s: [float(x) for x in s.split(",")], default=[1.0, 2.0],
                    help="B: DiLoCo's AdamW lrs as multiples of DDP's better lr (the better is the local methods')")
    ap.add_argument("--sgd-lr", type=float, default=0.5, help="A0: the SGD lr of both runs")
    ap.add_argument("--rate", default="100mbit", help="tbf rate of the shaped runs (each direction of each rank)")
    ap.add_argument("--methods", default="ddp,diloco,streaming_diloco_fp4,co2", help="compare: which methods")
    ap.add_argument("--sweep", default="32,64", help="compare: more sync_every values for Streaming DiLoCo (fp4, "
                                                     "multiples of its 4 fragments), on the unshaped link only, "
                                                     "and CO2 without outer momentum there too")
    ap.add_argument("--links", default="unshaped,shaped", help="compare: which links")
    ap.add_argument("--only", default="", help="run only these run names (comma-separated)")
    ap.add_argument("--out", default="runs/bench_slow_links")
    ap.add_argument("--report", metavar="DIR", help="only print the table (and redraw the plot) of a finished run")
    args = ap.parse_args()
    if args.report:
        print(report(args.report))
        return
    if os.geteuid() != 0:
        raise SystemExit("bench_slow_links: needs root (network namespaces and tc)")
    ph = PHASES[args.phase]
    steps = args.steps = args.steps or ph["steps"]  # resolved once: the phases' plans read them from args
    args.eval_every = args.eval_every or ph["eval_every"]
    if args.eval_every % ph["log_every"]:
        raise SystemExit(f"--eval-every: must be a multiple of phase {args.phase}'s log_every ({ph['log_every']}): "
                         "an evaluation is reported with its step's record")
    args.sync_every = args.sync_every or (32 if args.phase == "B" else 120)
    os.makedirs(args.out, exist_ok=True)
    from loomtrain.data.prepare import prepare
    from loomtrain.trainer.config import load_config

    exp = load_config("tiny", MODEL)
    prepared = prepare(exp.data, progress=True).train_prefix[:-len("_train")]
    common = lambda n: [f"train.steps={n}", f"train.eval_every={args.eval_every}",  # noqa: E731
                        f"train.eval_batches={ph['eval_batches']}", f"optim.warmup_steps={ph['warmup']}",
                        f"train.log_every={ph['log_every']}", f"checkpoint.every_steps={max(n // 8, 1)}",
                        "checkpoint.keep=1"]
    saved = os.path.join(args.out, "results.json")
    results: dict = json.load(open(saved)) if os.path.exists(saved) else {}
    port = PORT
    with Network() as net, open(os.path.join(args.out, "train.log"), "a") as log:
        while True:
            runs, reference = {"compare": lambda: phase_compare(args), "A": lambda: phase_a(args),
                               "B": lambda: phase_b(args, results)}[args.phase]()
            results["_phase"] = {"phase": args.phase, "reference": reference, "steps": steps}
            todo = [r for r in runs if not any(s["name"] == r.name for s in results.get(r.link, []))
                    and (not args.only or r.name in args.only.split(","))]
            if not todo:
                break
            run = todo[0]  # the plan is made again after each run: B's reference is the better DDP lr so far
            net.shape(args.rate if run.link == "shaped" else None)
            port += 1
            print(f"[{run.link}] {run.name} ({len(todo)} to go) ...", flush=True)
            n = run.steps or steps
            s = summarize(train(Run(run.name, run.overrides + common(n), run.link, run.workers), args.out, prepared,
                                port, log, n))
            results.setdefault(run.link, []).append(s)
            print(f"  val {s['final_val']:.4f}  wall {s['wall_s']:.1f}s  dp_sync {s['dp_sync_per_worker'] / 1e6:.3f} MB"
                  f"/worker  wire {s['wire_per_worker'] / 1e6:.2f} MB/worker", flush=True)
            _write_json(saved, results)
    _write_json(saved, results)
    print(report(args.out))


if __name__ == "__main__":
    main()
