"""``loomtrain`` command line: train, plan, slurm, export, eval, data prepare.

Every user error (config, degrees, paths) is reported as one line ``error: <field>: <what is
valid>`` with exit code 2, before any process group or worker starts.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from loomtrain.trainer.config import ConfigError, Experiment, load_config, resolve_config_path

DEFAULT_CONFIG = "tiny"


def _common(p: argparse.ArgumentParser, config_required: bool = False) -> None:
    p.add_argument("config", nargs=None if config_required else "?", default=DEFAULT_CONFIG,
                   help="YAML experiment file, or the name of a shipped config (default: tiny)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable; wins over the file)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loomtrain", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train an experiment (one process, or --nproc local ranks)")
    _common(t)
    t.add_argument("--nproc", type=int, default=1, help="local ranks to start (torch elastic launcher)")
    t.add_argument("--max-restarts", type=int, default=0, help="restarts of the whole group after a failure")
    t.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                   help="continue from a checkpoint: a path, 'latest' (default; the newest under "
                        "train.output_dir/checkpoints, which must exist) or 'auto' (the newest if any)")

    p = sub.add_parser("plan", help="print mesh, parameters, FLOPs and memory for a world size, without running")
    _common(p)
    p.add_argument("--world-size", type=int, default=None, help="ranks (default: the --cluster hosts' devices)")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--cluster", default=None, metavar="FILE",
                   help="a cluster description (hosts, fabrics, rates; launch/topology.py): also place ranks on "
                        "fabrics and compare with Megatron's default order")
    p.add_argument("--json", action="store_true", help="with --cluster: print the placement as JSON")
    p.add_argument("--device-memory-gb", type=float, default=80.0)
    p.add_argument("--memory-gib", type=float, default=0.0, metavar="G",
                   help="also print the longest sequence per rank whose estimated peak fits in G GiB, per "
                        "activation_checkpoint mode")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="per-device peak (default: logging.peak_tflops, else H100 dense: 989 bf16 / 494 fp32)")
    p.add_argument("--intra-node-gbps", type=float, default=3600.0, help="per-device bandwidth inside a node")
    p.add_argument("--inter-node-gbps", type=float, default=400.0, help="per-device bandwidth between nodes")

    s = sub.add_parser("slurm", help="write an sbatch script that runs one torchrun per node")
    _common(s)
    s.add_argument("--nodes", type=int, required=True)
    s.add_argument("--gpus-per-node", type=int, required=True)
    s.add_argument("--spare-nodes", type=int, default=0,
                   help="more nodes that wait to replace a lost one; the job goes on from memory (default 0)")
    s.add_argument("--output", default=None, help="script path (default: <train.output_dir>/launch.sbatch)")
    s.add_argument("--partition", default=None)
    s.add_argument("--time", default="24:00:00")
    s.add_argument("--job-name", default="loomtrain")
    s.add_argument("--cpus-per-task", type=int, default=None, help="CPUs per node's task (default: 8 per GPU)")
    s.add_argument("--mem", default=None, help="memory per node, as sbatch takes it (e.g. 400G; default: Slurm's)")
    s.add_argument("--max-restarts", type=int, default=3, help="torchrun restarts of a node's ranks after a failure")
    s.add_argument("--preempt-lead-s", type=int, default=None,
                   help="seconds of warning before the time limit (default: estimated from the model's save time)")
    s.add_argument("--no-requeue", dest="requeue", action="store_false",
                   help="after checkpointing on the pre-emption warning, end instead of requeueing the job")
    s.add_argument("--exclude-after", type=int, default=2,
                   help="requeue without a host once its own ranks hung this many times in the job")
    s.add_argument("--failure-requeues", type=int, default=3,
                   help="requeue a job that failed on a newly excluded host at most this many times")
    s.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                   help="any other #SBATCH line, e.g. --sbatch-arg=--account=proj (repeatable)")

    e = sub.add_parser("export", help="write a checkpoint (any layout) as a Hugging Face model directory")
    e.add_argument("checkpoint", help="a checkpoint directory, e.g. runs/tiny/checkpoints/step_00000100")
    e.add_argument("--hf", required=True, metavar="OUT_DIR", help="where to write config.json, model.safetensors "
                                                                   "and the tokenizer")
    e.add_argument("--config", default=None, help="the run's config (default: <run>/config.yaml two levels up)")

    v = sub.add_parser("eval", help="long-context evaluation of a checkpoint or a Hugging Face directory: loss by "
                                    "position, passkey retrieval (docs/evaluation.md)")
    v.add_argument("source", nargs="?", default=None, metavar="SOURCE",
                   help="a checkpoint directory (e.g. runs/tiny/checkpoints/step_00000100) or a Hugging Face model "
                        "directory (config.json, safetensors, tokenizer.json)")
    v.add_argument("--config", default=None, help="the run's config (default for a checkpoint: <run>/config.yaml two "
                                                  "levels up; for a Hugging Face directory: optional)")
    v.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable)")
    text = v.add_mutually_exclusive_group()
    text.add_argument("--text", default=None, metavar="FILE", help="evaluate on this text file (one document)")
    text.add_argument("--corpus", default=None, metavar="CORPUS", help="on the documents of this corpus, in order "
                                                                       "(as data.corpus; default: the run's data.corpus)")
    v.add_argument("--seq-len", type=int, default=None, metavar="N",
                   help="tokens evaluated (default: the model's max_seq_len, or all the text has if fewer)")
    v.add_argument("--bucket", type=int, default=0, metavar="B", help="first position bucket [0, B); then doubling "
                                                                      "(default: 1024, less for short sequences)")
    v.add_argument("--passkey-lengths", type=int, nargs="+", default=[], metavar="L",
                   help="passkey retrieval at these prompt lengths in tokens (default: none)")
    v.add_argument("--passkey-depths", type=float, nargs="+", default=None, metavar="D",
                   help="where the key sits in the filler, 0 (start) to 1 (end) (default: 0 0.25 0.5 0.75 1)")
    v.add_argument("--passkey-trials", type=int, default=5, help="keys per length and depth (default 5)")
    v.add_argument("--seed", type=int, default=0, help="draws the passkeys (default 0)")
    v.add_argument("--cp", type=int, default=1, help="context-parallel ranks splitting each sequence (default 1)")
    v.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (default 1)")
    v.add_argument("--json", action="store_true", help="print one JSON object instead of tables")

    d = sub.add_parser("data", help="data tools")
    dsub = d.add_subparsers(dest="data_command", required=True)
    dp = dsub.add_parser("prepare", help="tokenize a corpus into Megatron .bin/.idx files")
    _common(dp)
    dp.add_argument("--output", default=None, help="output prefix (default: the cache under data.cache_dir)")
    dp.add_argument("--writer", choices=("builtin", "megatron"), default="builtin",
                    help="builtin: streaming, byte-identical to megatron-core's builder; megatron: the builder itself")
    dp.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: data.workers, else cores)")
    return parser


def preflight(exp: Experiment, world_size: int, local_world_size: int | None = None,
              device_type: str | None = None) -> None:
    """The experiment's checks (the ones ``train`` and ``plan`` run) for ``device_type`` (``None``: this
    machine's), then this machine's data paths."""
    from loomtrain.data.corpus import corpus_files
    from loomtrain.data.prepare import data_vocab
    from loomtrain.trainer.checks import check_experiment, check_vocab

    dims = check_experiment(exp, world_size, local_world_size, device_type)
    if dims.cp > 1:  # cp_impl=auto reading a cluster file: it loads (or one line), before any work
        from loomtrain.launch.cp_links import cluster_links

        cluster_links(exp, dims)
    if exp.data.tokenizer != "byte" and not os.path.isfile(exp.data.tokenizer):
        raise ConfigError(f"data.tokenizer: '{exp.data.tokenizer}' is neither 'byte' nor an existing tokenizer.json")
    if not exp.data.prepared and not exp.data.sources:
        corpus_files(exp.data.corpus, exp.data.file_glob)
    # reads data.prepared once (a blend: checks every source)
    vocab, source = data_vocab(exp.data, need_valid=bool(exp.train.eval_every))
    if exp.model.vocab_size:
        check_vocab(exp.model.vocab_size, vocab, dims.tp, source)


def cmd_train(args) -> int:
    exp = load_config(args.config, args.overrides)
    if args.nproc < 1:
        raise ConfigError(f"--nproc: must be >= 1, got {args.nproc}")
    if args.max_restarts < 0:
        raise ConfigError(f"--max-restarts: must be >= 0, got {args.max_restarts}")
    if args.resume not in (None, "latest", "auto") and not any(
            os.path.isfile(os.path.join(args.resume, *parts, ".metadata")) for parts in ((), ("worker000",))):
        raise ConfigError(f"--resume: '{args.resume}' is not a complete checkpoint directory (no .metadata)")
    from loomtrain.launch.env import read_env

    _, world, _, local_world, _ = read_env()
    if args.nproc > 1:
        world = local_world = args.nproc
    preflight(exp, world, local_world)
    if args.nproc > 1:
        from loomtrain.launch.elastic import launch_local

        return launch_local(exp, resolve_config_path(args.config), args.overrides, args.nproc, args.max_restarts,
                            args.resume)
    from loomtrain.launch.train import run

    run(exp, resume=args.resume)
    return 0


def _at_least_one(**values) -> None:
    for flag, v in values.items():
        if v < 1:
            raise ConfigError(f"--{flag.replace('_', '-')}: must be >= 1, got {v}")


def cmd_plan(args) -> int:
    from loomtrain.launch.plan import plan, plan_cluster

    cluster = None
    if args.cluster:
        from loomtrain.launch.topology import load_cluster

        cluster = load_cluster(args.cluster)
        if args.world_size is None:
            args.world_size = cluster.world_size
        elif args.world_size != cluster.world_size:
            raise ConfigError(f"--world-size: {args.world_size}, but the --cluster hosts hold {cluster.world_size} "
                              "ranks")
        args.gpus_per_node = max(h.devices for h in cluster.hosts)
    elif args.json:
        raise ConfigError("--json: needs --cluster")
    if args.world_size is None:
        raise ConfigError("--world-size: required without --cluster")
    _at_least_one(world_size=args.world_size, gpus_per_node=args.gpus_per_node)
    if args.memory_gib < 0:
        raise ConfigError(f"--memory-gib: must be >= 0 (0: no table), got {args.memory_gib}")
    for flag in ("device_memory_gb", "intra_node_gbps", "inter_node_gbps"):
        if getattr(args, flag) <= 0:
            raise ConfigError(f"--{flag.replace('_', '-')}: must be > 0, got {getattr(args, flag)}")
    if args.peak_tflops < 0:
        raise ConfigError(f"--peak-tflops: must be >= 0, got {args.peak_tflops}")
    exp = load_config(args.config, args.overrides)
    if cluster is not None and exp.parallel.cluster and (
            os.path.realpath(exp.parallel.cluster) != os.path.realpath(args.cluster)):
        raise ConfigError(f"--cluster: {args.cluster}, but parallel.cluster is {exp.parallel.cluster}; plan the "
                          "cluster the run uses (give one of them)")
    if cluster is not None and args.json:
        print(json.dumps(plan_cluster(exp, cluster, args.peak_tflops), indent=1))
        return 0
    print(plan(exp, args.world_size, args.gpus_per_node, args.device_memory_gb, args.peak_tflops,
               args.intra_node_gbps, args.inter_node_gbps, cluster_file=args.cluster, memory_gib=args.memory_gib))
    if cluster is not None:
        from loomtrain.launch.placement import describe

        print()
        print("\n".join(describe(plan_cluster(exp, cluster, args.peak_tflops))))
    return 0


def cmd_slurm(args) -> int:
    from loomtrain.launch.slurm import write_sbatch

    if args.max_restarts < 0:
        raise ConfigError(f"--max-restarts: must be >= 0, got {args.max_restarts}")
    if args.spare_nodes < 0:
        raise ConfigError(f"--spare-nodes: must be >= 0, got {args.spare_nodes}")
    if args.failure_requeues < 0:
        raise ConfigError(f"--failure-requeues: must be >= 0, got {args.failure_requeues}")
    _at_least_one(nodes=args.nodes, gpus_per_node=args.gpus_per_node, exclude_after=args.exclude_after,
                  **{k: v for k, v in (("cpus_per_task", args.cpus_per_task), ("preempt_lead_s", args.preempt_lead_s))
                     if v is not None})
    exp = load_config(args.config, args.overrides)
    from loomtrain.device import job_device_type

    # checked for the job's nodes (GPUs unless the config says cpu), not for the login node writing the script
    preflight(exp, args.nodes * args.gpus_per_node, args.gpus_per_node, job_device_type(exp.parallel.device))
    path = write_sbatch(exp, resolve_config_path(args.config), args.overrides, args.nodes, args.gpus_per_node,
                        args.output, args.partition, args.time, args.job_name, max_restarts=args.max_restarts,
                        cpus_per_task=args.cpus_per_task, mem=args.mem, preempt_lead_s=args.preempt_lead_s,
                        requeue=args.requeue, sbatch_args=args.sbatch_arg, exclude_after=args.exclude_after,
                        failure_requeues=args.failure_requeues, spare_nodes=args.spare_nodes)
    print(f"wrote {path}  (submit with: sbatch {path})")
    return 0


def cmd_data(args) -> int:
    from loomtrain.data.blend import prepare_sources

    exp = load_config(args.config, args.overrides)
    if exp.data.sources:
        if args.output:
            raise ConfigError("--output: data.sources prepares each source into data.cache_dir; leave --output out")
        for source in prepare_sources(exp.data, writer=args.writer, progress=True, workers=args.workers).sources:
            print(f"source {source.name} (weight {source.weight:.3g}):")
            _summary(source.data, blended=True)
        return 0
    from loomtrain.data.prepare import prepare

    _summary(prepare(exp.data, out_prefix=args.output, writer=args.writer, progress=True, workers=args.workers))
    return 0


def _summary(prepared, blended: bool = False) -> None:
    m = prepared.meta
    if prepared.valid_prefix is None or "valid_documents" not in m:
        print(f"data.prepared is already a Megatron dataset: {m['train_documents']:,} documents, "
              f"{m['train_tokens']:,} tokens at {prepared.train_prefix}.bin/.idx; nothing to prepare")
        return
    print(f"train: {m['train_documents']:,} documents, {m['train_tokens']:,} tokens -> {prepared.train_prefix}.bin/.idx")
    print(f"valid: {m['valid_documents']:,} documents, {m['valid_tokens']:,} tokens -> {prepared.valid_prefix}.bin/.idx")
    if not blended:
        print(f"use it with: --set data.prepared={prepared.train_prefix[:-len('_train')]}")


def cmd_export(args) -> int:
    from loomtrain.trainer.hf_export import export_hf

    checkpoint = args.checkpoint.rstrip("/")
    config = args.config or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(checkpoint))), "config.yaml")
    if not os.path.isfile(config):
        raise ConfigError(f"--config: '{config}' does not exist (pass the run's config.yaml)")
    summary = export_hf(checkpoint, args.hf, load_config(config))
    print(f"wrote {summary['out_dir']}: {summary['parameters'] / 1e6:.2f}M parameters in {summary['tensors']} tensors "
          f"({summary['architecture']}), tokenizer.json (load with transformers' AutoModelForCausalLM / AutoTokenizer)")
    return 0


def cmd_eval(args) -> int:
    from loomtrain.launch.env import read_env
    from loomtrain.launch.eval import run
    from loomtrain.trainer.evaluate import DEFAULT_DEPTHS, EvalRequest, format_report

    req = EvalRequest(args.source, args.config, args.overrides, args.text, args.corpus, args.seq_len, args.bucket,
                      args.passkey_lengths, list(DEFAULT_DEPTHS if args.passkey_depths is None else args.passkey_depths),
                      args.passkey_trials, args.seed, args.cp, args.tp)
    result = run(req)
    if read_env()[0] == 0:
        print(json.dumps(result) if args.json else format_report(result), flush=True)
    return 0


COMMANDS = {"train": cmd_train, "plan": cmd_plan, "slurm": cmd_slurm, "export": cmd_export, "eval": cmd_eval,
            "data": cmd_data}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
