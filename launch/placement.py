"""NIC-aware placement (Holmes, arXiv 2312.03549): which rank fills which place of the mesh.

The mesh is filled in its canonical order (pp outermost, then dp_replicate, dp_shard, cp, tp innermost),
so consecutive places form tensor-parallel groups, then cp and data-parallel groups, and pipeline stages
are the largest blocks. Megatron's default fills it with ranks in node-rank order: when the launcher
numbers hosts of two pods alternately, every data-parallel group straddles the slow link between pods.
:func:`fabric_order` fills it host by host, hosts grouped by fabric instead: tensor parallelism stays in a
host (when the host's devices are a multiple of tp), data- and context-parallel groups stay in one fabric
whenever the fabric's ranks are a multiple of a pipeline stage's, and only pipeline sends cross between
fabrics. :func:`describe` names every group's hosts and link, the bytes each fabric carries per step and
the modelled step time; a heavy group that must cross a slow link is reported with its cost.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

from loomtrain.comms import traffic
from loomtrain.launch.env import device_backend
from loomtrain.launch.topology import Cluster
from loomtrain.log import say
from loomtrain.parallel.mesh import MESH_DIMS, ParallelDims

HEAVY = ("tp", "cp", "dp_shard", "dp_replicate")  # pp is the one meant to cross slow links


def naive_order(cluster: Cluster) -> list[int]:
    """Megatron's default: mesh places filled by ranks in node-rank order."""
    return list(range(cluster.world_size))


def fabric_order(cluster: Cluster) -> list[int]:
    """Hosts grouped by fabric (fabrics in order of first appearance, hosts in node-rank order inside)."""
    fabrics = list(dict.fromkeys(h.fabric for h in cluster.hosts))
    hosts = sorted(range(len(cluster.hosts)), key=lambda i: (fabrics.index(cluster.hosts[i].fabric), i))
    return [cluster.first_rank[i] + d for i in hosts for d in range(cluster.hosts[i].devices)]


@dataclass
class Group:
    dim: str
    ranks: list[int]
    hosts: list[str]
    link: str  # "host", a fabric's name, or the between-fabrics link
    gbps: float
    crosses: bool = False  # its hosts sit on more than one fabric


def placed_dims(dims: ParallelDims, order: list[int]) -> ParallelDims:
    """``dims`` with the mesh's places (canonical order) filled by ``order``."""
    return ParallelDims(dims.pp, dims.dp_replicate, dims.dp_shard, dims.cp, dims.tp, dims.world_size, MESH_DIMS,
                        local_updates=dims.local_updates, placement=tuple(order))


def groups(cluster: Cluster, dims: ParallelDims, order: list[int]) -> dict[str, list[Group]]:
    """Every group of every dimension (and of FSDP's dp_shard x cp), with its hosts and the link it uses."""
    placed = placed_dims(dims, order)
    out = {}
    for dim in (*MESH_DIMS, "dp_shard_cp"):
        found = []
        for ranks in placed.groups(dim):
            link, gbps = cluster.link(ranks)
            hosts = list(dict.fromkeys(cluster.hosts[cluster.host_of(r)].name for r in ranks))
            fabrics = {cluster.hosts[cluster.host_of(r)].fabric for r in ranks}
            found.append(Group(dim, ranks, hosts, link, gbps, len(fabrics) > 1))
        out[dim] = found
    return out


def stage_split(exp, args, dims: ParallelDims, cluster: Cluster, order: list[int], peak_flops: float) -> list[int]:
    """``parallel.pp_split: auto``: layers per stage inversely proportional to a layer's time on that stage's
    ranks: its compute, or its data-parallel traffic over the stage's slowest link when that is longer (the
    FSDP all-gathers and reduce-scatters overlap compute). Stages on equal fabrics get equal layers."""
    from loomtrain.launch.plan import traffic_per_step
    from loomtrain.trainer.checks import tokens_per_step

    stages = dims.pp * exp.parallel.pp_virtual_stages
    found = groups(cluster, dims, order)
    per_layer_bytes = traffic_per_step(exp, args, dims)["dp_shard_cp"] / max(1, args.n_layers / dims.pp)
    compute = tokens_per_step(exp) * args.flops_per_token(exp.data.seq_len) / args.n_layers / (
        dims.world_size / dims.pp * peak_flops)
    placed = placed_dims(dims, order)
    stage_of_rank = {r: i for i, g in enumerate(zip(*placed.groups("pp"))) for r in g}  # pp coordinate
    times = []
    for stage in range(stages):
        pp_rank = stage % dims.pp
        gbps = min([g.gbps for g in found["dp_shard_cp"] if stage_of_rank[g.ranks[0]] == pp_rank
                    and len(g.ranks) > 1] or [cluster.intra_host_gbps])
        times.append(max(compute, per_layer_bytes / (gbps * 1e9 / 8)))
    weights = [1 / t for t in times]
    raw = [args.n_layers * w / sum(weights) for w in weights]
    counts = [max(1, int(x)) for x in raw]
    while sum(counts) > args.n_layers:
        counts[max((i for i in range(stages) if counts[i] > 1), key=lambda i: counts[i] - raw[i])] -= 1
    while sum(counts) < args.n_layers:
        counts[max(range(stages), key=lambda i: raw[i] - counts[i])] += 1
    return counts


@dataclass
class Placement:
    """What ``place_ranks`` decided: who fills the mesh (``dims.placement``), each dimension's interface, and
    this rank's number (changed when the fabric order could not be expressed under the launcher's)."""

    override: dict
    env: object  # the rank's DistEnv: renumbered when the placement needs it
    cluster: Cluster | None = None
    order: list[int] | None = None
    cp_links: object = None  # launch/cp_links.py::CpLinks for cp_impl=auto, read from parallel.cluster (or None)

    def pp_split(self, exp, args, dims: ParallelDims, peak_flops: float) -> str:
        """``parallel.pp_split`` resolved: ``auto`` by the stages' fabrics when placed, else as configured."""
        if exp.parallel.pp_split != "auto" or self.cluster is None or dims.pp == 1:
            return exp.parallel.pp_split
        return ",".join(map(str, stage_split(exp, args, dims, self.cluster, self.order, peak_flops)))


def link_function(found: dict[str, list[Group]]):
    """``link(dim)`` for ``plan.step_estimate``: bytes/s of the dimension's slowest group."""
    def link(dim):
        return min(g.gbps for g in found[dim]) * 1e9 / 8
    return link


def bytes_per_fabric(found: dict[str, list[Group]], sent: dict[str, float]) -> dict[str, float]:
    """Bytes per step each link carries (all ranks' sends): ``sent`` is one rank's bytes per dimension."""
    out: dict[str, float] = {}
    for dim, per_rank in sent.items():
        for g in found[dim]:
            if len(g.ranks) > 1:
                out[g.link] = out.get(g.link, 0.0) + per_rank * len(g.ranks)
    return out


def crossings(found: dict[str, list[Group]], cluster: Cluster, sent: dict[str, float]) -> list[str]:
    """Heavy groups that leave their fabric (or tp that leaves its host), with what that costs per step."""
    lines = []
    for dim in (*HEAVY, "dp_shard_cp"):
        bad = [g for g in found[dim] if len(g.ranks) > 1 and (g.crosses or (dim == "tp" and g.link != "host"))]
        if bad and sent.get(dim, 0.0):
            t = sent[dim] / (bad[0].gbps * 1e9 / 8)
            lines.append(f"{dim}: {len(bad)} of {len(found[dim])} groups cross {bad[0].link} ({bad[0].gbps:g} Gbit/s), "
                         f"e.g. hosts {','.join(bad[0].hosts)}: {sent[dim] / 1e9:.3f} GB per rank per step, "
                         f"{t:.3f} s at that rate")
    return lines


def compare(exp, args, dims: ParallelDims, cluster: Cluster, peak_flops: float) -> dict:
    """The placed order against Megatron's default: groups, bytes per fabric, modelled step times (data)."""
    from loomtrain.launch.cp_links import for_plan
    from loomtrain.launch.plan import step_estimate, traffic_per_step
    from loomtrain.trainer.checks import cp_attention

    if cluster.world_size != dims.world_size:
        raise ValueError(f"--cluster: its hosts hold {cluster.world_size} ranks, the plan is for {dims.world_size}")
    out = {}
    for name, order in (("placed", fabric_order(cluster)), ("megatron_default", naive_order(cluster))):
        found = groups(cluster, dims, order)
        # cp_impl: auto decided on this order's cp groups, as train decides with parallel.cluster (cp_links.py)
        links = for_plan(exp, dims, cluster, order)
        impl = cp_attention(exp, args, dims, links) if dims.cp > 1 else None
        sent = traffic_per_step(exp, args, dims, impl)
        est = step_estimate(exp, args, dims, link_function(found), peak_flops, impl)
        est["cp_impl"] = None if impl is None else str(impl)
        out[name] = {"order": order, "step_s": est["step_s"], "estimate": est,
                     "cp_links": links.describe() if links else None,
                     "bytes_per_fabric": bytes_per_fabric(found, sent),
                     "crossings": crossings(found, cluster, sent),
                     "groups": {d: [{"ranks": g.ranks, "hosts": g.hosts, "link": g.link, "gbps": g.gbps}
                                    for g in gs] for d, gs in found.items()}}
    out["speedup"] = out["megatron_default"]["step_s"] / out["placed"]["step_s"]
    if dims.pp > 1:
        out["placed"]["pp_split_auto"] = stage_split(exp, args, dims, cluster, out["placed"]["order"], peak_flops)
    return out


def rank_list(ranks) -> str:
    """Ranks as runs: ``0-3,8-11``; a pair ``0,16`` stays a pair (``0..16`` read as seventeen ranks)."""
    runs, ranks = [], sorted(ranks)
    start = prev = ranks[0]
    for r in ranks[1:] + [None]:
        if r is not None and r == prev + 1:
            prev = r
            continue
        runs.append(str(start) if start == prev else f"{start},{prev}" if prev == start + 1 else f"{start}-{prev}")
        if r is not None:
            start = prev = r
    return ",".join(runs) if len(runs) <= 6 else ",".join(runs[:6]) + f",... ({len(ranks)} ranks)"


def describe(result: dict, max_groups: int = 4) -> list[str]:
    """``loomtrain plan --cluster`` lines: groups with hosts and links, bytes per fabric, step times."""
    lines = []
    for name in ("placed", "megatron_default"):
        r = result[name]
        lines.append(f"{'placement (hosts grouped by fabric)' if name == 'placed' else 'megatron default order'}: "
                     f"modelled step {r['step_s']:.3f} s")
        for dim, gs in r["groups"].items():
            if len(gs[0]["ranks"]) < 2:
                continue
            shown = "; ".join(f"ranks {rank_list(g['ranks'])} on {','.join(g['hosts'])} via {g['link']}"
                              for g in gs[:max_groups])
            more = f"; ... ({len(gs)} groups)" if len(gs) > max_groups else ""
            lines.append(f"  {dim:<13}{shown}{more}")
        if r["estimate"]["cp_impl"]:
            lines.append(f"  cp_impl      {r['estimate']['cp_impl']}" + (f" ({r['cp_links']})" if r["cp_links"] else ""))
        per = ", ".join(f"{link} {b / 1e9:.3f} GB" for link, b in sorted(r["bytes_per_fabric"].items()))
        lines.append(f"  bytes per step by link: {per or 'none'}")
        lines += [f"  warning: {c}" for c in r["crossings"]]
    if "pp_split_auto" in result["placed"]:
        lines.append(f"parallel.pp_split: auto -> {','.join(map(str, result['placed']['pp_split_auto']))} "
                     "(layers per stage, by each stage's fabric)")
    lines.append(f"placement vs megatron default: {result['speedup']:.2f}x (modelled)")
    return lines


@traffic.counted_as("other")
def place_ranks(exp, env, dims: ParallelDims, unlisted: str = "error") -> Placement:
    """Collective on the default group, before the mesh: with ``parallel.placement: fabric``, learn every
    rank's host (``LOOMTRAIN_HOST_ID`` or the hostname) and, without a cluster description, its NICs; set
    ``dims.placement``; return this rank's ``backend_override`` for ``ParallelDims.build_mesh``: each
    dimension's groups use the interface of the link they run on (gloo: a device bound to it; NCCL: the
    IB or Socket transport), never an environment change. Hosts missing from ``parallel.cluster``: an error,
    or with ``unlisted="unplaced"`` (``loomtrain eval`` of a checkpoint on other machines than it trained on)
    one line and no placement (``Placement.cluster`` None)."""
    import torch.distributed as dist

    from loomtrain.faulttol.manager import host_name
    from loomtrain.launch.topology import Host, cluster_from_nics, discover_nics, load_cluster

    par = exp.parallel
    if par.placement == "none":
        return Placement({}, env)
    every = [None] * env.world_size
    dist.all_gather_object(every, (host_name(), [] if par.cluster else discover_nics()))
    names = [n for n, _ in every]
    hosts = list(dict.fromkeys(names))
    if names != [h for h in hosts for _ in range(names.count(h))]:
        raise RuntimeError(f"parallel.placement: each host's ranks must be consecutive (ranks by host: {names})")
    if par.cluster:
        base = load_cluster(par.cluster)
        described = {h.name: h for h in base.hosts}
        missing = [h for h in hosts if h not in described]
        if missing and unlisted == "unplaced":
            if env.rank == 0:
                say(f"placement: hosts {missing} are not in {par.cluster}: ranks keep their launch order, "
                    "cp_impl=auto decides on parallel.cp_link_gbps / cp_inner_link_gbps")
            return Placement({}, env)
        if missing:
            raise RuntimeError(f"parallel.cluster: hosts {missing} of this job are not in {par.cluster} (hosts are "
                               "named by LOOMTRAIN_HOST_ID or the hostname)")
        cluster = Cluster(base.fabrics, [Host(h, described[h].fabric, names.count(h), described[h].interface,
                                                 described[h].between_interface) for h in hosts],
                          base.between, base.intra_host_gbps)
        if env.rank == 0 and dims.cp > 1 and par.cp_impl == "auto" and [(h.name, h.devices) for h in cluster.hosts] != [
                (h.name, h.devices) for h in base.hosts]:
            print(f"placement: warning: this job's hosts are not those of {par.cluster} in order; "
                  "cp_impl=auto read the cp links from the file's hosts (launch/cp_links.py)", flush=True)
    else:
        cluster = cluster_from_nics([(h, names.count(h), next(nics for n, nics in every if n == h)) for h in hosts])
    order = fabric_order(cluster)
    if unsorted_groups(dims, order):  # torch orders a group's ranks: number the ranks in mesh order instead
        if env.rank == 0:
            print(f"placement: hosts in rank order {', '.join(hosts)} cannot fill the mesh in fabric order under "
                  "their rank numbers; renumbering the ranks", flush=True)
        env = renumber(env, order.index(env.rank))
        by_fabric = list(dict.fromkeys(cluster.host_of(r) for r in order))
        cluster = Cluster(cluster.fabrics, [cluster.hosts[i] for i in by_fabric], cluster.between,
                          cluster.intra_host_gbps)
        order = fabric_order(cluster)  # now rank order
    dims.placement = tuple(order)
    override = {}
    for dim in (*MESH_DIMS, *ParallelDims.FLATTENED):
        # Decided from every group, the same on every rank: a dimension's groups are created by all ranks.
        mine = next(g for g in dims.groups(dim) if env.rank in g)
        if len(mine) > 1 and all(_interface(cluster, g, r) for g in dims.groups(dim) if len(g) > 1 for r in g):
            link, _ = cluster.link(mine)
            override[dim] = _bound(device_backend(env.backend, env.device.type), _interface(cluster, mine, env.rank), cluster.fabrics[link].kind)
    if env.rank == 0:
        found = groups(cluster, dims, order)
        placed_hosts = list(dict.fromkeys(cluster.hosts[cluster.host_of(r)].name for r in order))
        crossing = [line.split(":")[0] for line in crossings(found, cluster, {d: 1.0 for d in found})]
        print(f"placement: mesh filled by hosts {', '.join(placed_hosts)} (grouped by fabric)"
              + (f"; groups of {', '.join(crossing)} cross {cluster.between}" if crossing else ""), flush=True)
    return Placement(override, env, cluster, order)


def renumber(env, new_rank: int):
    """Start the default group again with this rank numbered ``new_rank`` (collective: every rank). The
    rendezvous store is reused under a new prefix; ``RANK`` and the heartbeat follow the new number."""
    import dataclasses

    import torch.distributed as dist

    from loomtrain.faulttol import heartbeat

    store = dist.distributed_c10d._get_default_store()
    backend = dist.get_backend()
    dist.barrier()  # nobody destroys the group while another still uses it
    dist.destroy_process_group()
    dist.init_process_group(backend, store=dist.PrefixStore("loomtrain/renumbered", store), rank=new_rank,
                            world_size=env.world_size, timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S),
                            device_id=env.device if env.device.type == "cuda" else None)
    os.environ["RANK"] = str(new_rank)
    heartbeat.renumber(new_rank)
    return dataclasses.replace(env, rank=new_rank)


def unsorted_groups(dims: ParallelDims, order: list[int]) -> list[list[int]]:
    """Groups whose ranks would not ascend along the mesh: torch sorts a group's ranks, so there a rank's
    place in its group (what FSDP, DCP and the pipeline use) would not be its place in the mesh."""
    placed = placed_dims(dims, order)
    return [g for dim in (*MESH_DIMS, *ParallelDims.FLATTENED) for g in placed.groups(dim) if g != sorted(g)]


def _interface(cluster: Cluster, group: list[int], rank: int) -> str | None:
    """The interface ``rank`` binds to for ``group``: its fabric's, or the one between fabrics."""
    link, _ = cluster.link(group)
    host = cluster.hosts[cluster.host_of(rank)]
    if link == "host":
        return None
    return host.interface if link == host.fabric else host.between_interface


BOUND_GLOO = "loomtrain_gloo"  # gloo whose groups bind to the interface their options name
GROUP_TIMEOUT_S = 600.0  # the default group's (launch/env.py init_distributed)


def _bound(backend: str, interface: str, kind: str):
    """(backend, options) whose groups talk over ``interface`` (gloo) or the fabric's transport (NCCL).

    ``new_group`` drops options for its built-in gloo, so gloo goes through a registered backend that
    builds ``ProcessGroupGloo`` with a device bound to the interface (no GLOO_SOCKET_IFNAME change)."""
    import torch.distributed as dist

    if backend == "nccl":  # the transport only: NCCL_SOCKET_IFNAME still picks the socket interface
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = datetime.timedelta(seconds=GROUP_TIMEOUT_S)
        options.config.net_name = "IB" if kind in ("ib", "roce") else "Socket"
        return "nccl", options
    if BOUND_GLOO.upper() not in dist.Backend._plugins:
        def create(opts, options):
            options._timeout = opts.timeout
            return dist.ProcessGroupGloo(opts.store, opts.group_rank, opts.group_size, options)

        dist.Backend.register_backend(BOUND_GLOO, create, extended_api=True, devices=["cpu", "cuda"])
    options = dist.ProcessGroupGloo._Options()
    options._timeout = datetime.timedelta(seconds=GROUP_TIMEOUT_S)  # else the options' default, not the job's
    options._devices = [dist.ProcessGroupGloo.create_device(interface=interface)]
    return BOUND_GLOO, options
