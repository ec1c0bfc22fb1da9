"""Heterogeneity-adaptive sequence parallelism: each step's sequences on groups sized to their lengths.

``plan_groups`` cuts a pool of ranks into disjoint groups of any size (1 included, not only powers
of two) and gives every sequence of the step to one group, so that the step's makespan (the
busiest group's summed sequence times) is as small as it can find. The search is deterministic
(no time-limited incumbents), so every rank computes the same plan from the same lengths:

1. **Target search.** For a target makespan M each sequence takes the smallest group size that
   holds it (``ceil(L/d) <= capacity``) and runs within M; sequences are packed into groups of their
   size (least-loaded first, slack in larger groups used too). The smallest M on a geometric grid
   (0.5% steps from the work lower bound) whose groups fit the pool wins.
2. **Improvement.** Idle ranks widen or split the busiest group, sequences move off it while that
   lowers the makespan (bounded number of moves).
3. **Exact refinement on small steps.** With few sequences and slots, a MILP (HiGHS, through
   ``scipy.optimize.milp``) over every (size, copy) slot, bounded by a node limit (deterministic, unlike
   a time limit), improves on step 2 when it can; ``time_limit_s`` is only a safety net, and a search it
   cuts short is discarded.

Groups are then placed on contiguous ranks; with ``ranks_per_node`` a group never straddles a node
unless it is made of whole nodes (sizes above a node must be multiples of it).
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

from loomtrain.errors import ConfigError

GRID_STEP = 1.005  # target makespans tried: lower bound x 1.005^k
MAX_MOVES = 256  # improvement moves per plan
EXACT_MAX_SEQS = 10  # the MILP refinement runs at or below these sizes
EXACT_MAX_SLOTS = 64
EXACT_NODE_LIMIT = 5000


@dataclass
class Plan:
    """``groups``: (ranks, sequence indices run one after another) pairs; ``makespan``: the busiest group's time."""

    groups: list[tuple[tuple[int, ...], list[int]]]
    makespan: float
    method: str = "greedy"
    crosses_nodes: bool = False
    lengths: list[int] = field(default_factory=list, repr=False)

    def group_of(self, rank: int):
        """(ranks, seqs) of the group holding ``rank``, or None when it is idle this step."""
        for ranks, seqs in self.groups:
            if rank in ranks:
                return ranks, seqs
        return None

    def degrees(self) -> list[int]:
        """The group size each sequence runs on, by sequence index."""
        out = [0] * len(self.lengths)
        for ranks, seqs in self.groups:
            for i in seqs:
                out[i] = len(ranks)
        return out


class _Times:
    """Memoised ``time_fn`` (the search asks for the same (length, degree) many times)."""

    def __init__(self, time_fn):
        self.fn, self.cache = time_fn, {}

    def __call__(self, length: int, degree: int) -> float:
        key = (length, degree)
        t = self.cache.get(key)
        if t is None:
            t = self.cache[key] = float(self.fn(length, degree))
        return t


def _allowed_degrees(world: int, degrees, ranks_per_node: int | None) -> list[int]:
    ds = sorted({int(d) for d in (degrees if degrees is not None else range(1, world + 1)) if 1 <= int(d) <= world})
    if ranks_per_node:
        ds = [d for d in ds if d <= ranks_per_node or d % ranks_per_node == 0]
    if not ds:
        raise ConfigError(f"adaptive sp: no allowed group size fits a pool of {world} ranks")
    return ds


def _group_time(lengths, seqs, degree, T) -> float:
    return sum(T(lengths[i], degree) for i in seqs)


def _pack(lengths, order, smallest, degrees, M, world, T):
    """Groups [(degree, load, seqs)] for target ``M``, or None when the pool is too small."""
    groups = []  # (degree, load, seqs)
    heaps: dict[int, list] = {}  # degree -> heap of (load, group index)
    used = 0
    for i in order:
        L = lengths[i]
        d = next((d for d in degrees[smallest[i]:] if T(L, d) <= M), None)
        if d is None:
            return None
        t = T(L, d)
        placed = False
        for dg in sorted(heaps):  # the least-loaded group of each size at least d
            if dg < d or not heaps[dg]:
                continue
            load, g = heaps[dg][0]
            tg = T(L, dg)
            if load + tg <= M:
                heapq.heapreplace(heaps[dg], (load + tg, g))
                groups[g][1] += tg
                groups[g][2].append(i)
                placed = True
                break
        if not placed:
            used += d
            if used > world:
                return None
            groups.append([d, t, [i]])
            heapq.heappush(heaps.setdefault(d, []), (t, len(groups) - 1))
    return groups


def _greedy(lengths, world, degrees, smallest, T):
    n = len(lengths)
    # Lower bounds: the longest single sequence on its fastest group, and the work (rank-seconds
    # at each sequence's smallest group) spread over the pool.
    longest = max(range(n), key=lambda i: (lengths[i], -i))  # T grows with L at every size: its best is the bound
    fastest = min(T(lengths[longest], d) for d in degrees[smallest[longest]:])
    work = sum(T(lengths[i], degrees[smallest[i]]) * degrees[smallest[i]] for i in range(n)) / world
    lo = max(fastest, work, 1e-12)
    order = sorted(range(n), key=lambda i: (-lengths[i], i))
    hi_k = 1
    while _pack(lengths, order, smallest, degrees, lo * GRID_STEP ** hi_k, world, T) is None:
        hi_k *= 2
        if hi_k > 1 << 16:
            raise RuntimeError("adaptive sp: no feasible plan found (is time_fn increasing in length?)")
    lo_k = 0 if _pack(lengths, order, smallest, degrees, lo, world, T) is not None else None
    if lo_k == 0:
        hi_k = 0
    else:
        lo_k = hi_k // 2 if hi_k > 1 else 0
        while hi_k - lo_k > 1:  # smallest feasible grid point (feasibility is close to monotone)
            mid = (lo_k + hi_k) // 2
            if _pack(lengths, order, smallest, degrees, lo * GRID_STEP ** mid, world, T) is None:
                lo_k = mid
            else:
                hi_k = mid
    return _pack(lengths, order, smallest, degrees, lo * GRID_STEP ** hi_k, world, T)


def _improve(groups, lengths, world, degrees, smallest, T):
    """Bounded local search on [degree, load, seqs] groups: widen or split the busiest, move sequences off it."""
    fits = {i: set(degrees[smallest[i]:]) for i in range(len(lengths))}

    def load(d, seqs):
        return _group_time(lengths, seqs, d, T)

    for _ in range(MAX_MOVES):
        idle = world - sum(g[0] for g in groups)
        b = max(range(len(groups)), key=lambda g: (groups[g][1], -g))
        d, cur, seqs = groups[b]
        top = sorted(((g[1], j) for j, g in enumerate(groups) if j != b), reverse=True)[:2]
        others = top[0][0] if top else 0.0
        best = None  # (new makespan, action)
        # widen the busiest group with idle ranks
        for nd in degrees:
            if d < nd <= d + idle:
                t = load(nd, seqs)
                if max(t, others) < cur - 1e-12 and (best is None or max(t, others) < best[0]):
                    best = (max(t, others), ("widen", nd))
        # move one sequence to another group, or to a new group of idle ranks
        if len(seqs) > 1:
            for i in seqs:
                rest = cur - T(lengths[i], d)
                for j, (dj, lj, _) in enumerate(groups):
                    if j != b and dj in fits[i]:
                        third = next((t for t, k in top if k != j), 0.0)  # busiest group besides b and j
                        new = max(rest, lj + T(lengths[i], dj), third)
                        if new < cur - 1e-12 and (best is None or new < best[0]):
                            best = (new, ("move", i, j))
                for nd in degrees:
                    if nd <= idle and nd in fits[i]:
                        new = max(rest, T(lengths[i], nd), others)
                        if new < cur - 1e-12 and (best is None or new < best[0]):
                            best = (new, ("split", i, nd))
        if best is None:
            break
        action = best[1]
        if action[0] == "widen":
            groups[b] = [action[1], load(action[1], seqs), seqs]
        elif action[0] == "move":
            _, i, j = action
            seqs.remove(i)
            groups[b][1] = load(d, seqs)
            groups[j][2].append(i)
            groups[j][1] = load(groups[j][0], groups[j][2])
        else:
            _, i, nd = action
            seqs.remove(i)
            groups[b][1] = load(d, seqs)
            groups.append([nd, T(lengths[i], nd), [i]])
    return groups


def _exact(lengths, world, degrees, smallest, T, time_limit_s):
    """The optimum over every (size, copy) slot by MILP, or None (too big, scipy missing, not proven in time)."""
    n = len(lengths)
    slots = [(d, c) for d in degrees for c in range(min(world // d, n))]
    if n > EXACT_MAX_SEQS or len(slots) > EXACT_MAX_SLOTS:
        return None
    try:
        import numpy as np
        from scipy.optimize import Bounds, LinearConstraint, milp
    except ImportError:
        return None
    P = len(slots)
    nx = n * P  # x[i, p] at i * P + p, then u[p], then M
    nv = nx + P + 1
    c = np.zeros(nv)
    c[-1] = 1.0
    rows, lb, ub = [], [], []

    def row():
        r = np.zeros(nv)
        rows.append(r)
        return r

    upper = np.ones(nv)
    upper[-1] = np.inf
    for i in range(n):
        r = row()
        for p, (d, _) in enumerate(slots):
            if d in degrees[smallest[i]:]:
                r[i * P + p] = 1
            else:
                upper[i * P + p] = 0
        lb.append(1)
        ub.append(1)
        for p in range(P):
            r = row()
            r[i * P + p], r[nx + p] = 1, -1
            lb.append(-np.inf)
            ub.append(0)
    r = row()
    for p, (d, _) in enumerate(slots):
        r[nx + p] = d
    lb.append(-np.inf)
    ub.append(world)
    for p, (d, _) in enumerate(slots):
        r = row()
        for i in range(n):
            if upper[i * P + p]:
                r[i * P + p] = T(lengths[i], d)
        r[-1] = -1
        lb.append(-np.inf)
        ub.append(0)
    for p in range(1, P):  # symmetry: copies of one size are used in order
        if slots[p][0] == slots[p - 1][0]:
            r = row()
            r[nx + p - 1], r[nx + p] = 1, -1
            lb.append(0)
            ub.append(np.inf)
    integrality = np.ones(nv)
    integrality[-1] = 0
    # A node limit, not a time limit, bounds the search, so the result does not depend on the machine's speed
    # (HiGHS is deterministic). An incumbent the node limit stopped at is used (HiGHS reports it as
    # "Solution limit reached"); with an explicit ``time_limit_s`` a search the clock cut short is not.
    options = {"node_limit": EXACT_NODE_LIMIT, "mip_rel_gap": 1e-4}
    if time_limit_s is not None:
        options["time_limit"] = time_limit_s
    res = milp(c, constraints=LinearConstraint(np.array(rows), lb, ub), integrality=integrality,
               bounds=Bounds(np.zeros(nv), upper), options=options)
    if res.x is None or (res.status != 0 and "solution limit" not in str(res.message).lower()):
        return None
    x = res.x[:nx].reshape(n, P) > 0.5
    groups = []
    for p, (d, _) in enumerate(slots):
        seqs = [i for i in range(n) if x[i, p]]
        if seqs:
            groups.append([d, _group_time(lengths, seqs, d, T), seqs])
    return groups


def _place(groups, world: int, ranks_per_node: int | None):
    """Contiguous rank ranges for [degree, load, seqs] groups: (placed groups, crosses node boundaries)."""
    order = sorted(range(len(groups)), key=lambda g: (-groups[g][0], g))
    if ranks_per_node and world % ranks_per_node == 0:
        nodes = world // ranks_per_node
        free = [ranks_per_node] * nodes  # ranks left in each node, filled from its start
        start = {}
        next_whole = 0  # whole-node groups take nodes from the front
        ok = True
        for g in order:
            d = groups[g][0]
            if d >= ranks_per_node and d % ranks_per_node == 0:
                k = d // ranks_per_node
                while next_whole + k <= nodes and any(free[n] != ranks_per_node for n in range(next_whole,
                                                                                           next_whole + k)):
                    next_whole += 1
                if next_whole + k > nodes:
                    ok = False
                    break
                start[g] = next_whole * ranks_per_node
                for n in range(next_whole, next_whole + k):
                    free[n] = 0
                next_whole += k
            else:  # first node (from the back, away from whole-node groups) with room
                n = next((n for n in reversed(range(nodes)) if free[n] >= d), None)
                if n is None:
                    ok = False
                    break
                start[g] = n * ranks_per_node + (ranks_per_node - free[n])
                free[n] -= d
        if ok:
            return [(tuple(range(start[g], start[g] + groups[g][0])), sorted(groups[g][2])) for g in order], False
    at, placed = 0, []
    for g in order:
        d = groups[g][0]
        placed.append((tuple(range(at, at + d)), sorted(groups[g][2])))
        at += d
    crosses = bool(ranks_per_node) and any(r[0] // ranks_per_node != r[-1] // ranks_per_node for r, _ in placed)
    return placed, crosses


class PoolRanks:
    """The adaptive pool's members (data-parallel coordinates: one tensor-parallel group each) and their ranks.

    ``by_tp[t][m]`` is member m's rank of tensor-parallel coordinate t (``ParallelDims.groups("dp")``). A group
    of members runs context parallelism among the ranks of one coordinate, so every rank set the plans name
    exists once per coordinate. Members' ranks must ascend (a process group orders its ranks so, and a
    member's zigzag part is its place in the group).
    """

    def __init__(self, by_tp, rank: int):
        self.by_tp = [list(g) for g in by_tp]
        if any(g != sorted(g) for g in self.by_tp):
            raise ConfigError("parallel.sp_mode: adaptive needs data-parallel ranks in ascending order along each "
                              "tensor-parallel coordinate (parallel.mesh_order with dp_replicate before dp_shard, "
                              "as the default)")
        self.t = next(t for t, g in enumerate(self.by_tp) if rank in g)
        self.member = self.by_tp[self.t].index(rank)
        self.size, self.tp = len(self.by_tp[0]), len(self.by_tp)

    @classmethod
    def of(cls, world: int, rank: int) -> "PoolRanks":
        """A pool of single ranks (no tensor parallelism)."""
        return cls([list(range(world))], rank)

    def ranks(self, members, t: int | None = None) -> tuple[int, ...]:
        """The ranks of ``members`` at coordinate ``t`` (default: this rank's)."""
        row = self.by_tp[self.t if t is None else t]
        return tuple(row[m] for m in members)

    def every(self, member_sets) -> list[tuple[int, ...]]:
        """Each member set's ranks at every coordinate: what all ranks create together."""
        return [self.ranks(ms, t) for ms in member_sets for t in range(self.tp)]


def placeable_rank_sets(world: int, degrees=None, ranks_per_node: int | None = None) -> list[tuple[int, ...]]:
    """Every multi-rank set a plan can give a group (contiguous inside a node, or whole nodes from a node
    boundary; one pool without ``ranks_per_node``): what a trainer can create once, before the first step."""
    ds = [d for d in _allowed_degrees(world, degrees, ranks_per_node) if d > 1]
    rpn = ranks_per_node if ranks_per_node and world % ranks_per_node == 0 else world
    out = []
    for d in ds:
        if d <= rpn:
            starts = [n + o for n in range(0, world, rpn) for o in range(rpn - d + 1)]
        else:
            starts = range(0, world - d + 1, rpn)
        out += [tuple(range(a, a + d)) for a in starts]
    return out


def plan_groups(lengths, world: int, capacity: int, time_fn, *, degrees=None, time_limit_s: float | None = 10.0,
                ranks_per_node: int | None = None, exact: bool = True) -> Plan:
    """Groups of ranks and the sequences each runs, minimising the step's makespan (see the module docstring).

    ``capacity``: tokens one rank holds of one sequence (L fits d ranks when ceil(L/d) <= capacity);
    ``time_fn(length, degree)``: seconds of one sequence on one group; ``degrees``: allowed group sizes
    (default 1..world); ``exact=False`` skips the MILP refinement (for comparisons).
    """
    lengths = [int(x) for x in lengths]
    if world < 1 or capacity < 1:
        raise ConfigError(f"adaptive sp: world ({world}) and capacity ({capacity}) must be positive")
    if not lengths:
        return Plan([], 0.0, "empty", False, [])
    ds = _allowed_degrees(world, degrees, ranks_per_node)
    T = _Times(time_fn)
    smallest = []
    for i, L in enumerate(lengths):
        k = next((k for k, d in enumerate(ds) if math.ceil(L / d) <= capacity), None)
        if k is None or L < 1:
            raise ConfigError(f"adaptive sp: sequence {i} has {L} tokens; the largest group ({ds[-1]} ranks x "
                              f"{capacity} tokens) cannot hold it")
        smallest.append(k)
    groups = _improve(_greedy(lengths, world, ds, smallest, T), lengths, world, ds, smallest, T)
    method = "greedy"
    if exact:
        opt = _exact(lengths, world, ds, smallest, T, time_limit_s)
        if opt is not None and max(g[1] for g in opt) < max(g[1] for g in groups) - 1e-12:
            groups, method = opt, "milp"
    placed, crosses = _place(groups, world, ranks_per_node)
    makespan = max(_group_time(lengths, seqs, len(ranks), T) for ranks, seqs in placed)
    return Plan(placed, makespan, method, crosses, lengths)


def static_makespan(lengths, world: int, capacity: int, time_fn, degree: int) -> float:
    """The baseline: one fixed group size, world/degree groups, longest sequence first to the least-loaded
    group (inf when the degree does not divide the pool or a sequence does not fit)."""
    if world % degree or any(math.ceil(L / degree) > capacity for L in lengths):
        return math.inf
    heap = [(0.0, g) for g in range(world // degree)]
    for L in sorted(lengths, reverse=True):
        load, g = heapq.heappop(heap)
        heapq.heappush(heap, (load + time_fn(L, degree), g))
    return max(h[0] for h in heap)


def exact_makespan(lengths, world: int, capacity: int, time_fn, degrees=None) -> float:
    """The optimum by enumeration (every set partition of the sequences, every size per block): small
    instances only, for tests and ``scripts/bench_adaptive.py``."""
    from functools import lru_cache

    ds = _allowed_degrees(world, degrees, None)
    n = len(lengths)
    T = _Times(time_fn)
    block_time = {}

    def time_of(mask, d):
        key = (mask, d)
        if key not in block_time:
            total = 0.0
            for i in range(n):
                if mask >> i & 1:
                    if math.ceil(lengths[i] / d) > capacity:
                        block_time[key] = math.inf
                        return math.inf
                    total += T(lengths[i], d)
            block_time[key] = total
        return block_time[key]

    @lru_cache(maxsize=None)
    def best(mask, ranks):
        if mask == 0:
            return 0.0
        low = mask & -mask
        rest = mask ^ low
        out = math.inf
        sub = rest
        while True:
            block = sub | low
            for d in ds:
                if d > ranks:
                    break
                t = time_of(block, d)
                if t < out:
                    out = min(out, max(t, best(mask ^ block, ranks - d)))
            if sub == 0:
                break
            sub = (sub - 1) & rest
        return out

    return best((1 << n) - 1, world)


def sp_degrees(par, world: int) -> list[int] | None:
    """``parallel.sp_degrees`` as a list (None: any size), or ConfigError."""
    if not par.sp_degrees.strip():
        return None
    try:
        ds = sorted({int(x) for x in par.sp_degrees.split(",") if x.strip()})
    except ValueError:
        raise ConfigError(f"parallel.sp_degrees: expected group sizes like '1,2,4', got {par.sp_degrees!r}") from None
    if not ds or ds[0] < 1 or ds[-1] > world:
        raise ConfigError(f"parallel.sp_degrees: sizes must be in 1..{world} (the pool), got {par.sp_degrees!r}")
    return ds
