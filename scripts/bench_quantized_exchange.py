"""Bytes per parameter per worker of DiLoCo's quantized outer average, today's all-gather against the two-stage
reduce-scatter (``dp_sync.diloco.exchange``), counted at the transport (``comms/traffic.py``) over real gloo
process groups of M forked ranks, and the error of each against the exact fp32 mean.

    python scripts/bench_quantized_exchange.py --workers 2 4 8 --numel 1000000
    python scripts/bench_quantized_exchange.py --deltas real --workers 4

``--deltas synthetic`` (default): each worker's pseudo-gradient is one Gaussian component shared by all workers
plus one of its own, of equal variance (workers' pseudo-gradients agree in part, as real ones do). Printed: a
markdown table of the measured figures, then the formulas at larger M (computed, not run).

``--deltas real``: DiLoCo's own pseudo-gradients (anchor minus parameters after H inner AdamW steps, one per
worker, each on its rows of the global batch as the trainer shards them) of the slow-links benchmark's model and
corpus (``bench_slow_links.MODEL``). One process trains the M workers in turn, with the exact fp32 mean as the
outer gradient (outer Nesterov SGD, the ``dp_sync.diloco`` defaults), so every format is measured on the same
deltas; it records R consecutive rounds from the initialisation and R from ``--warm-step`` on, and the same
shapes of Gaussian deltas beside them. The deltas then cross M forked gloo ranks through ``PendingMean`` and
``PendingShardedMean`` with and without error feedback, as ``DiLoCo`` calls them (one tensor a parameter).
Printed: per kind and exchange, a worker payload's relative L2 error and its share of values decoded as 0, the
error of one round's mean, and of the sum of R rounds' means (the outer gradient the anchor integrates) with
and without error feedback.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

EXCHANGES = ("all_gather", "reduce_scatter")


def _deltas(rank: int, numel: int):
    import torch

    common = torch.randn(numel, generator=torch.Generator().manual_seed(0))
    own = torch.randn(numel, generator=torch.Generator().manual_seed(1 + rank))
    return common + own


def _rank(rank: int, world: int, numel: int, kinds):
    import torch.distributed as dist

    from loomtrain.comms import traffic
    from loomtrain.parallel.dp_sync.quantize import PendingMean
    from loomtrain.parallel.dp_sync.sharded import PendingShardedMean

    dist.init_process_group("gloo")
    try:
        traffic.install()
        exact = sum(_deltas(r, numel) for r in range(world)) / world
        mine = _deltas(rank, numel)
        rows = {}
        for kind in kinds:
            for exchange in EXCHANGES:
                traffic.reset()
                with traffic.counted_as("dp_sync"):
                    if exchange == "all_gather":
                        mean = PendingMean(mine, kind, dist.group.WORLD).wait()
                    else:
                        [part] = PendingShardedMean([mine], kind, dist.group.WORLD).parts()
                        mean = part.wait()
                rows[(kind, exchange)] = (traffic.counts()["dp_sync"] / numel,
                                          ((mean - exact).norm() / exact.norm()).item())
        return rows
    finally:
        dist.destroy_process_group()


def synthetic(args) -> None:
    from loomtrain.launch.forked import run_ranks
    from loomtrain.parallel.dp_sync.quantize import BLOCK, wire_bytes
    from loomtrain.parallel.dp_sync.sharded import bytes_per_value

    print("| M | kind | exchange | bytes/param/worker (measured) | bf16 ring 4(M-1)/M | fp32 ring 8(M-1)/M "
          "| rel. L2 error of the mean |")
    print("|---:|---|---|---:|---:|---:|---:|")
    for world in args.workers:
        rows = run_ranks(_rank, world, world, args.numel, args.kinds)[0]
        for (kind, exchange), (per_param, err) in rows.items():
            print(f"| {world} | {kind} | {exchange} | {per_param:.4f} | {4 * (world - 1) / world:.4f} | "
                  f"{8 * (world - 1) / world:.4f} | {err:.4f} |")
    q = wire_bytes(BLOCK, "fp4") / BLOCK
    print("\nFormulas (fp4, no padding): all_gather (M-1) * q, reduce_scatter 2 (M-1)/M * q, q = 0.5625\n")
    print("| M | all_gather | reduce_scatter | bf16 ring |")
    print("|---:|---:|---:|---:|")
    for world in (2, 4, 7, 8, 16, 64, 1024):
        print(f"| {world} | {(world - 1) * q:.4f} | {bytes_per_value('fp4', world):.4f} | "
              f"{4 * (world - 1) / world:.4f} |")


# ---- real pseudo-gradients

def pseudo_gradients(args) -> tuple[dict, list[str]]:
    """{point: [round][worker][tensor]} of DiLoCo pseudo-gradients (fp32), and lines describing the run.

    M workers (models and AdamW states of their own) start from the same seeded parameters; worker m trains
    on rows m*B/M .. (m+1)*B/M of each global batch of B rows (``TrainBatches`` with dp_rank m of M, as the
    trainer shards ``dp_replicate``); every H steps the anchor takes an outer Nesterov SGD step on the exact
    mean of anchor - parameters and every worker restarts from it (F = 1, no delay, alpha 0)."""
    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_slow_links import MODEL  # the slow-links benchmark's model, batch and inner lr

    from loomtrain.data.loader import PackedDataset, TrainBatches
    from loomtrain.data.prepare import prepare
    from loomtrain.trainer.config import DiLoCoConfig, load_config
    from loomtrain.trainer.loss import label_tokens, token_loss_sum
    from loomtrain.trainer.models import model_family
    from loomtrain.trainer.optim import build_optimizer, build_scheduler

    exp = load_config("tiny", MODEL + [f"optim.warmup_steps={args.warmup}"])
    outer_cfg = DiLoCoConfig()
    h, workers, rounds = args.sync_every, args.workers[0], args.rounds
    if args.warm_step % h:
        raise SystemExit(f"--warm-step: must be a multiple of --sync-every ({h}), got {args.warm_step}")
    prepared = prepare(exp.data)
    data = PackedDataset(prepared.train_prefix, exp.data.seq_len)
    family = model_family(exp.model.family)
    model_args = family.args(exp.model, prepared.vocab_size, exp.data.seq_len)
    models, opts, scheds, batches = [], [], [], []
    for m in range(workers):
        torch.manual_seed(exp.train.seed)
        model = family.build(model_args)
        model.init_weights(exp.train.seed)
        models.append(model)
        opts.append(build_optimizer(model.parameters(), exp.optim, torch.device("cpu")))
        scheds.append(build_scheduler(opts[-1], exp.optim, args.schedule_steps))
        batches.append(TrainBatches(data, exp.train.seed, exp.train.global_batch_size, 0, m, workers))
    anchor = [p.detach().clone() for p in models[0].parameters()]
    outer = torch.optim.SGD(anchor, lr=outer_cfg.outer_lr, momentum=outer_cfg.outer_momentum,
                            nesterov=outer_cfg.nesterov)
    record = {1 + r: "init" for r in range(rounds)} | {args.warm_step // h + 1 + r: "warm" for r in range(rounds)}
    points: dict = {"init": [], "warm": []}
    lines = []
    start = time.perf_counter()
    for rnd in range(1, max(record) + 1):
        losses = []
        for m, (model, opt, sched) in enumerate(zip(models, opts, scheds)):
            for _ in range(h):
                micro = batches[m].next_step()
                tokens = label_tokens(micro)
                loss = sum(token_loss_sum(model(b["input_ids"], b["position_ids"], b.get("doc_ids")), b["labels"])
                           for b in micro) / tokens
                loss.backward()
                if exp.optim.grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), exp.optim.grad_clip, foreach=True)
                opt.step()
                opt.zero_grad(set_to_none=True)
                sched.step()
                losses.append(loss.item())
        with torch.no_grad():
            deltas = [[g - p.detach() for g, p in zip(anchor, model.parameters())] for model in models]
            for g, *ds in zip(anchor, *deltas):
                g.grad = sum(ds) / workers
            outer.step()
            outer.zero_grad(set_to_none=True)
            for model in models:
                for g, p in zip(anchor, model.parameters()):
                    p.copy_(g)
        if rnd in record:
            points[record[rnd]].append(deltas)
        lines.append(f"round {rnd:3d} (steps {(rnd - 1) * h + 1}-{rnd * h}): inner loss {losses[0]:.3f} -> "
                     f"{losses[-1]:.3f} (worker 0 first, worker {workers - 1} last), lr "
                     f"{scheds[0].get_last_lr()[0]:.2e}{'  [' + record[rnd] + ']' if rnd in record else ''}")
        print(lines[-1], f"  {time.perf_counter() - start:.0f}s", file=sys.stderr, flush=True)
    numel = sum(g.numel() for g in anchor)
    lines.insert(0, f"{numel:,} parameters, {len(anchor)} tensors; M = {workers}, H = {h}, "
                    f"{exp.train.global_batch_size} rows x {exp.data.seq_len} tokens a step over the workers; "
                    f"AdamW lr {exp.optim.lr} (warmup {args.warmup}, cosine over {args.schedule_steps}); outer "
                    f"lr {outer_cfg.outer_lr}, momentum {outer_cfg.outer_momentum}, Nesterov; "
                    f"{time.perf_counter() - start:.0f}s")
    # Gaussian deltas of the same shapes: a shared component plus each worker's own, fresh each round
    gen = torch.Generator().manual_seed(0)
    gauss = []
    for _ in range(rounds):
        common = [torch.randn(g.shape, generator=gen) for g in anchor]
        gauss.append([[c + torch.randn(c.shape, generator=gen) for c in common] for _ in range(workers)])
    return {"gaussian": gauss} | points, lines


def _flat(tensors):
    import torch

    return torch.cat([t.flatten() for t in tensors])


def _rel(got, want) -> float:
    return ((_flat(got) - _flat(want)).norm() / _flat(want).norm()).item()


def _exchange_rounds(rounds, rank: int, kind: str, exchange: str, feedback: bool, group):
    """This worker's rounds through the exchange DiLoCo uses: (means per round, what it sent per round).

    With ``feedback`` the residuals are kept and added as ``DiLoCo.after_inner_step`` does."""
    import torch

    from loomtrain.parallel.dp_sync.quantize import PendingMean
    from loomtrain.parallel.dp_sync.sharded import PendingShardedMean

    shapes = rounds[0][rank]
    residual = [torch.zeros_like(t) for t in shapes] if feedback else None
    residual_mean = [torch.zeros_like(t) for t in shapes] if feedback and exchange == "reduce_scatter" else None
    means, sent = [], []
    for workers in rounds:
        deltas = [d.clone() for d in workers[rank]]
        if residual is not None:
            deltas = [d.add_(e) for d, e in zip(deltas, residual)]
        if exchange == "reduce_scatter":
            pending = PendingShardedMean(deltas, kind, group, shard_residual=residual_mean).parts()
        else:
            pending = [PendingMean(d, kind, group) for d in deltas]
        if residual is not None:
            for e, d, p in zip(residual, deltas, pending):
                torch.sub(d, p.sent, out=e)
        sent.append([p.sent for p in pending])
        means.append([p.wait() for p in pending])
    return means, sent


def _real_rank(rank: int, path: str, kinds):
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        points = torch.load(path)
        rows = {}
        for point, rounds in points.items():
            world = len(rounds[0])
            exact = [[sum(ts) / world for ts in zip(*workers)] for workers in rounds]
            exact_sum = [sum(ts) for ts in zip(*exact)]
            mine = rounds[0][rank]
            for kind in kinds:
                for exchange in EXCHANGES:
                    means, sent = _exchange_rounds(rounds, rank, kind, exchange, False, dist.group.WORLD)
                    fb_means, _ = _exchange_rounds(rounds, rank, kind, exchange, True, dist.group.WORLD)
                    zeros = (_flat(sent[0]) == 0).float().mean().item()
                    rows[(point, kind, exchange)] = dict(
                        worker=_rel(sent[0], mine), zeros=zeros, mean=_rel(means[0], exact[0]),
                        sum_plain=_rel([sum(ts) for ts in zip(*means)], exact_sum),
                        sum_feedback=_rel([sum(ts) for ts in zip(*fb_means)], exact_sum))
        return rows
    finally:
        dist.destroy_process_group()


def _describe(rounds) -> str:
    """How alike the workers' first-round deltas are and how heavy-tailed their 64-value blocks."""
    import torch

    from loomtrain.parallel.dp_sync.quantize import BLOCK

    flats = [_flat(w) for w in rounds[0]]
    cos = [torch.nn.functional.cosine_similarity(a, b, dim=0).item()
           for i, a in enumerate(flats) for b in flats[i + 1:]]
    blocks = flats[0][:flats[0].numel() // BLOCK * BLOCK].view(-1, BLOCK)
    ratio = (blocks.abs().amax(1) / blocks.pow(2).mean(1).sqrt().clamp_min(1e-30)).median().item()
    norm = sum(f.norm().item() for f in flats) / len(flats)
    return (f"mean pairwise cosine of the workers' deltas {sum(cos) / len(cos):.3f}; median block max/rms "
            f"{ratio:.2f}; |delta| {norm:.3g}")


def real(args) -> None:
    import torch

    from loomtrain.launch.forked import run_ranks

    torch.set_num_threads(args.threads)
    points, lines = pseudo_gradients(args)
    for line in lines:
        print(line)
    for point, rounds in points.items():
        print(f"{point}: {_describe(rounds)}")
    with tempfile.TemporaryDirectory(prefix="bench-qx-") as tmp:
        path = os.path.join(tmp, "deltas.pt")
        torch.save(points, path)
        world = args.workers[0]
        per_rank = run_ranks(_real_rank, world, path, args.kinds, timeout=3600)
    print(f"\n| deltas | kind | exchange | worker payload rel. L2 error | values sent as 0 | mean rel. L2 error "
          f"(1 round) | sum of {args.rounds} rounds' means, no feedback | with error feedback |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for key, first in per_rank[0].items():
        worker = sum(r[key]["worker"] for r in per_rank) / world  # each rank's own payload, averaged
        zeros = sum(r[key]["zeros"] for r in per_rank) / world
        print(f"| {key[0]} | {key[1]} | {key[2]} | {worker:.4f} | {zeros:.3f} | {first['mean']:.4f} | "
              f"{first['sum_plain']:.4f} | {first['sum_feedback']:.4f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--deltas", choices=("synthetic", "real"), default="synthetic")
    ap.add_argument("--workers", type=int, nargs="+", default=None,
                    help="worker counts (synthetic: default 2 4 8; real: one count, default 4)")
    ap.add_argument("--numel", type=int, default=1_000_000, help="synthetic: values a worker sends")
    ap.add_argument("--kinds", nargs="+", default=["fp4", "fp4_e3m0", "int8"])
    ap.add_argument("--sync-every", type=int, default=32, help="real: H, inner steps a round")
    ap.add_argument("--rounds", type=int, default=4, help="real: consecutive rounds recorded at each point")
    ap.add_argument("--warm-step", type=int, default=256, help="real: the warm point's rounds start after it")
    ap.add_argument("--schedule-steps", type=int, default=4096, help="real: the cosine schedule's length")
    ap.add_argument("--warmup", type=int, default=200, help="real: lr warm-up steps")
    ap.add_argument("--threads", type=int, default=1, help="real: torch threads of the training process")
    args = ap.parse_args()
    if args.deltas == "real":
        args.workers = args.workers or [4]
        if len(args.workers) != 1:
            raise SystemExit("--workers: one worker count with --deltas real")
        real(args)
    else:
        args.workers = args.workers or [2, 4, 8]
        synthetic(args)


if __name__ == "__main__":
    main()
