"""The links ``parallel.cp_impl: auto`` chooses on, read from a cluster description (``parallel.cluster``).

Without a description ``auto`` is told the links (``parallel.cp_link_gbps`` between cp peers, optionally
``cp_inner_link_gbps`` inside groups of consecutive cp ranks) and assumes every Ulysses group size U sits on the
inner one. A description knows better: which tier each real cp group of the mesh spans, as the ranks fill it
(fabric order under ``parallel.placement: fabric``, rank order otherwise). So:

- the link **across** is the slowest tier any cp group spans (the outer ring waits for its slowest hop);
- a two-dimensional split with Ulysses groups of U (1 < U < cp, dividing cp) is weighed only when every block of
  U consecutive cp ranks of every cp group sits on a tier faster than that (one host, or one fabric when the
  groups cross fabrics), its all-to-all costed on the slowest such block's tier. A cluster whose hosts hold 2
  devices never offers U = 4 on the host link.

Precedence (``links_declared``): link numbers the user set win. The description is read only while
``parallel.cp_link_gbps`` and ``parallel.cp_inner_link_gbps`` are both at their defaults (100 and 0: a value equal
to the default counts as unset); setting either one makes ``auto`` use the declared numbers, as without a cluster.
Everything here is a pure function of the experiment and the file, so every rank (and ``plan``) decides alike.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields

from loomtrain.log import say


@dataclass(frozen=True)
class CpLinks:
    """Where one run's cp groups talk: ``across`` (tier, Gbit/s per device) for the whole group, and per usable
    Ulysses group size U the (tier, Gbit/s) inside its groups."""

    across: tuple[str, float]
    inner: dict[int, tuple[str, float]]

    def bandwidths(self) -> tuple[float, dict[int, float]]:
        """(bytes/s across, {U: bytes/s inside}) for ``parallel.cp.choose``."""
        return self.across[1] * 1e9 / 8, {u: g * 1e9 / 8 for u, (_, g) in self.inner.items()}

    def describe(self) -> str:
        inside = "; ".join(f"U={u} inside {t} ({g:g} Gbit/s)" for u, (t, g) in sorted(self.inner.items()))
        return (f"cp links from the cluster: across {self.across[0]} ({self.across[1]:g} Gbit/s)"
                + (f"; {inside}" if inside else "; no Ulysses group size sits on a faster tier"))


def from_cluster(cluster, dims, order=None) -> CpLinks:
    """The links of ``dims``' cp groups on ``cluster`` with the mesh filled by ``order`` (None: rank order)."""
    from loomtrain.launch.placement import placed_dims

    groups = (placed_dims(dims, order) if order is not None else dims).groups("cp")
    across = min((cluster.link(g) for g in groups), key=lambda link: link[1])
    inner = {}
    for u in (u for u in range(2, dims.cp) if dims.cp % u == 0):
        slowest = min((cluster.link(g[i:i + u]) for g in groups for i in range(0, len(g), u)), key=lambda x: x[1])
        if slowest[1] > across[1]:
            inner[u] = slowest
    return CpLinks(across, inner)


def links_declared(par) -> bool:
    """Whether the user set ``parallel.cp_link_gbps`` or ``cp_inner_link_gbps`` (either differs from its
    default): then ``auto`` decides on those numbers, cluster or not."""
    defaults = {f.name: f.default for f in fields(type(par))}
    return any(getattr(par, k) != defaults[k] for k in ("cp_link_gbps", "cp_inner_link_gbps"))


def for_plan(exp, dims, cluster, order) -> CpLinks | None:
    """What :func:`cluster_links` gives a run on ``cluster`` with the mesh filled by ``order`` (``plan
    --cluster``'s rows), None when ``auto`` does not read the cluster."""
    par = exp.parallel
    if dims.cp < 2 or par.cp_impl != "auto" or links_declared(par):
        return None
    return from_cluster(cluster, dims, order)


def cluster_links(exp, dims) -> CpLinks | None:
    """The run's cp links from ``parallel.cluster`` (placed as ``parallel.placement`` places), or None when
    ``auto`` uses the declared numbers (module docstring), as it also does (saying so once) when the file lists more
    or fewer devices than the run has: placement then picks the job's hosts out of it, and which of the file's
    hosts those are is known only after the rendezvous, while the choice must be the same on every rank and in
    ``plan``."""
    par = exp.parallel
    if dims.cp < 2 or par.cp_impl != "auto" or not par.cluster or links_declared(par):
        return None
    from loomtrain.launch.placement import fabric_order
    from loomtrain.launch.topology import load_cluster

    cluster = load_cluster(par.cluster)
    if cluster.world_size != dims.world_size:
        if os.environ.get("RANK", "0") == "0":
            say(f"loomtrain: parallel.cluster lists {cluster.world_size} devices, the run has {dims.world_size}: "
                f"cp_impl=auto decides on parallel.cp_link_gbps ({par.cp_link_gbps:g}) and cp_inner_link_gbps "
                f"({par.cp_inner_link_gbps:g}), not the file (list the job's hosts, or set them)")
        return None
    return from_cluster(cluster, dims, fabric_order(cluster) if par.placement == "fabric" else None)
