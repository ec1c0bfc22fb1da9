"""Waves for sharded adaptive pools (``parallel.sp_mode: adaptive_sharded``): every rank the same number of rows.

FSDP can reshard between passes only when every rank of the pool runs the same number of them. A step is
therefore cut into waves: in each wave the pool is partitioned into groups and every group runs exactly one row
(its sequences packed into what its ranks hold); a rank with no row in a wave runs an unlabelled two-token one.
A wave lasts about its slowest row (FSDP's collectives keep the pool in step), so a step lasts the sum over
waves, not the busiest group's total that ``planner.plan_groups`` minimises. ``plan_waves`` tries a few ways to
cut a step into waves and keeps the fastest (every rank computes the same, deterministically):

- **one plan**: the step's ``plan_groups`` plan, each group's rows slowest first, one per wave (the groups stay
  the same over the waves);
- **re-plan**: ``plan_groups`` over the sequences left, each group runs its slowest row, the rest go to the next
  wave, planned again over the whole pool; optionally the step's sequences are first cut, longest first, into
  chunks of ``fill`` x the pool's memory (world x capacity tokens), each re-planned that way (FlexSP's
  micro-batches).
"""
from __future__ import annotations

from dataclasses import dataclass

from loomtrain.parallel.cp.attention import zigzag_multiple
from loomtrain.parallel.sp.planner import plan_groups

FILLS = (None, 1.0, 0.5)  # re-plan candidates: the whole step, and chunks of the pool's memory


def padded_length(n: int, d: int, tp: int = 1) -> int:
    """``n`` tokens rounded up to a length d ranks (each then split over tp) can share."""
    m = zigzag_multiple(d, tp)
    return -(-n // m) * m


def pack_rows(items, d: int, capacity: int, tp: int = 1) -> list[list]:
    """``items`` ((key, tokens) pairs: a group's sequences) packed in order into rows its d ranks hold (d x
    capacity tokens at most, a longer single piece alone): one forward per row instead of per sequence, documents
    kept apart."""
    rows, total = [], 0
    for item in items:
        n = item[1]
        if rows and padded_length(total + n, d, tp) <= d * capacity:
            rows[-1].append(item)
            total += n
        else:
            rows.append([item])
            total = n
    return rows


def slowest_first(rows, d: int, time_fn) -> list:
    """A group of ``d`` ranks' rows ((key, tokens) lists) by their time, slowest first (stable for ties)."""
    return sorted(rows, key=lambda row: -sum(time_fn(k, d) for _, k in row))


@dataclass
class Waves:
    """``waves``: per wave, (ranks, sequence indices of the group's one row) pairs; ``time``: the sum over waves of
    the slowest row; ``groups``: every (ranks, row) of the step, wave after wave."""

    waves: list[list[tuple[tuple[int, ...], list[int]]]]
    time: float
    method: str

    @property
    def groups(self) -> list[tuple[tuple[int, ...], list[int]]]:
        return [g for wave in self.waves for g in wave]


def _row_time(row, d, time_fn) -> float:
    return sum(time_fn(n, d) for _, n in row)


def _one_plan(lengths, world, capacity, time_fn, tp, **kw) -> Waves:
    plan = plan_groups(lengths, world, capacity, time_fn, time_limit_s=None, **kw)
    waves: list[list] = []
    for ranks, seqs in plan.groups:
        d = len(ranks)
        for k, row in enumerate(slowest_first(pack_rows([(i, lengths[i]) for i in seqs], d, capacity, tp), d,
                                              time_fn)):
            if k == len(waves):
                waves.append([])
            waves[k].append((ranks, [i for i, _ in row]))
    return Waves(waves, _time(waves, lengths, time_fn), "one plan")


def _replan(lengths, chunk, world, capacity, time_fn, tp, **kw) -> list[list]:
    """Waves for the sequences ``chunk`` (indices into ``lengths``): each re-planned over the pool."""
    waves, left = [], list(chunk)
    while left:
        ls = [lengths[i] for i in left]
        plan = plan_groups(ls, world, capacity, time_fn, time_limit_s=None, exact=False, **kw)
        wave, taken = [], set()
        for ranks, seqs in plan.groups:
            d = len(ranks)
            row = slowest_first(pack_rows([(i, ls[i]) for i in seqs], d, capacity, tp), d, time_fn)[0]
            wave.append((ranks, [left[i] for i, _ in row]))
            taken.update(i for i, _ in row)
        waves.append(wave)
        left = [s for i, s in enumerate(left) if i not in taken]
    return waves


def _chunks(lengths, budget: float | None) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    if budget is None:
        return [order]
    out, total = [[]], 0
    for i in order:
        if out[-1] and total + lengths[i] > budget:
            out.append([])
            total = 0
        out[-1].append(i)
        total += lengths[i]
    return out


def _time(waves, lengths, time_fn) -> float:
    return sum(max(_row_time([(i, lengths[i]) for i in row], len(ranks), time_fn) for ranks, row in wave)
               for wave in waves)


def plan_waves(lengths, world: int, capacity: int, time_fn, *, tp: int = 1, degrees=None,
               ranks_per_node: int | None = None, fills=FILLS) -> Waves:
    """The fastest of the candidates in the module docstring (ties: the first)."""
    lengths = [int(x) for x in lengths]
    kw = dict(degrees=degrees, ranks_per_node=ranks_per_node)
    if not lengths:
        return Waves([], 0.0, "empty")
    best = _one_plan(lengths, world, capacity, time_fn, tp, **kw)
    for fill in fills:
        waves = [w for chunk in _chunks(lengths, None if fill is None else fill * world * capacity)
                 for w in _replan(lengths, chunk, world, capacity, time_fn, tp, **kw)]
        t = _time(waves, lengths, time_fn)
        if t < best.time - 1e-12:
            best = Waves(waves, t, "re-plan" + ("" if fill is None else f", chunks of {fill:g} x the pool"))
    return best
