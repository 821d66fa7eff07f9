"""Where patches and blocks go: one global patch lattice, blocks of whole output chunks.

Patches start at ``origin + k * stride`` per axis, with ``origin = -((patch - stride) // 2)``
so that the volume's first voxels sit well inside the first patch, and continue until the
volume's end is covered. Every voxel's prediction is the weighted mean of the patches of this
one lattice that cover it, whichever block computes it: so the output does not depend on the
block size, and any block can be recomputed or resumed alone. A block writes a whole number
of output chunks, so concurrent writers never share a chunk.

Each patch is predicted once: it is *owned* by the block that holds its first voxel (the
first block for patches that start before the volume), so it reaches only into its owner and
blocks after it on each axis. A block's value is the sum of its owners' partial sums, taken
in block order (see ``engine``); blocks are grouped into *units* (``units``), boxes of blocks
that one worker predicts in order, handing partial sums forward in memory.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import cached_property, lru_cache
from typing import NamedTuple

import numpy as np

from ..geometry import BlockGrid, Roi, Zyx, box_of, zyx

SCHEME = 2
"""Bumped when the arithmetic of a block changes: done-markers of another scheme are not
resumed (its blocks would not match this scheme's bit for bit)."""


@dataclass(frozen=True)
class Layout:
    """The lattice and block grid of one inference job."""

    shape: Zyx  # the volume, z, y, x
    patch: Zyx
    stride: Zyx
    chunks: Zyx  # output chunk (spatial): the write unit, one file (a shard, job.output_chunks)
    block: Zyx  # write block (spatial), a multiple of chunks

    def __post_init__(self) -> None:
        if any(b % c for b, c in zip(self.block, self.chunks, strict=True)):
            raise ValueError(f"block {list(self.block)} is not a whole number of chunks "
                             f"{list(self.chunks)}")
        if any(s < 1 or s > p for s, p in zip(self.stride, self.patch, strict=True)):
            raise ValueError(f"stride {list(self.stride)} must be in 1..patch {list(self.patch)}")

    @cached_property
    def origin(self) -> Zyx:
        """The first lattice start per axis (kept: every start a block asks for needs it)."""
        return zyx(-((p - s) // 2) for p, s in zip(self.patch, self.stride, strict=True))

    def starts(self, axis: int) -> list[int]:
        """Lattice starts along ``axis`` whose patches are needed to cover the volume."""
        return list(self.starts_within(axis, -math.inf, math.inf))

    def starts_within(self, axis: int, low: float, high: float) -> range:
        """The lattice starts ``s`` along ``axis`` with ``low <= s < high``, found by
        arithmetic: filtering the whole axis's starts for each block cost every block time
        in proportion to the volume's length (the lattice of a long axis has thousands)."""
        o, p, s, n = self.origin[axis], self.patch[axis], self.stride[axis], self.shape[axis]
        last = max(0, math.ceil((n - o - p) / s))
        # s >= low for a whole s is s >= ceil(low) (int() cut 2.5 to 2, letting 2 in)
        first_k = 0 if low == -math.inf else max(0, -(-(math.ceil(low) - o) // s))
        last_k = last if high == math.inf else min(last, (math.ceil(high) - 1 - o) // s)
        return range(o + first_k * s, o + max(first_k, last_k + 1) * s, s)

    def covering(self, axis: int, begin: int, end: int) -> range:
        """The starts along ``axis`` of the patches that reach into [begin, end)."""
        return self.starts_within(axis, begin - self.patch[axis] + 1, end)

    def patch_count(self) -> int:
        """Patches in the lattice: what a job predicts when no patch is predicted twice."""
        return math.prod(len(self.starts(a)) for a in range(3))

    @cached_property
    def blocks(self) -> BlockGrid:
        """The write blocks over the volume (not part of the layout's identity: ``digest``
        hashes the fields)."""
        return BlockGrid(box_of(self.shape), self.block)

    def grid(self) -> Zyx:
        """Blocks per axis."""
        return zyx(self.blocks.counts)

    def block_grid(self) -> list[Zyx]:
        """Block indices, z-major."""
        return [zyx(index) for index in self.blocks.indices()]

    def write_box(self, block: Zyx) -> Roi:
        """The voxels this block writes, clipped to the volume."""
        return self.blocks.box(block)

    def patches(self, block: Zyx) -> list[Zyx]:
        """Starts of every lattice patch that covers a voxel of the block, in lattice order."""
        box = self.write_box(block)
        start, stop = box.begin, box.end
        return [zyx(p) for p in itertools.product(*(
            self.covering(a, start[a], stop[a]) for a in range(3)))]

    def read_box(self, block: Zyx) -> Roi:
        """The input the block's patches read (may reach outside the volume: the engine pads
        it by reflection about the volume's own borders): from the first covering patch's
        start to the last one's end, per axis."""
        begin, end = self.write_bounds(block)
        starts = [self.covering(a, begin[a], end[a]) for a in range(3)]
        return Roi([r[0] for r in starts],
                   [r[-1] - r[0] + p for r, p in zip(starts, self.patch, strict=True)])

    def write_bounds(self, block: Zyx) -> tuple[Zyx, Zyx]:
        """``write_box``'s begin and end as plain ints (the engine's per-block arithmetic)."""
        box = self.write_box(block)
        begin = zyx(box.offset)
        return begin, zyx(b + n for b, n in zip(begin, box.shape, strict=True))

    def owner(self, patch: Zyx) -> Zyx:
        """The block that predicts the patch: the one holding its first voxel."""
        return zyx(max(s, 0) // b for s, b in zip(patch, self.block, strict=True))

    def reach(self, patch: Zyx) -> Zyx:
        """The last block the patch covers, per axis (its owner is the first)."""
        return zyx((min(s + p, n) - 1) // b for s, p, n, b in zip(
            patch, self.patch, self.shape, self.block, strict=True))

    def owned_patches(self, block: Zyx) -> list[Zyx]:
        """The patches ``block`` owns, in lattice order."""
        return [zyx(p) for p in itertools.product(*self._owned_starts(block))]

    def owners(self, block: Zyx) -> list[Zyx]:
        """The blocks whose patches cover ``block``, in block order (``block`` itself last).
        A patch's owner is found axis by axis, so the owners are every combination of each
        axis's owners of the covering starts (not the owner of every covering patch)."""
        begin, end = self.write_bounds(block)
        per_axis = [sorted({max(s, 0) // self.block[a] for s in self.covering(a, begin[a], end[a])})
                    for a in range(3)]
        return [zyx(o) for o in itertools.product(*per_axis)]

    def reached(self, block: Zyx) -> list[Zyx]:
        """The other blocks the block's own patches cover (all after it, in block order)."""
        owned = self.owned_box(block)
        if owned is None:
            return []
        ranges = [range(a // b, (e - 1) // b + 1)
                  for a, e, b in zip(owned.begin, owned.end, self.block, strict=True)]
        return [b for b in map(zyx, itertools.product(*ranges)) if b != block]

    def owned_box(self, block: Zyx) -> Roi | None:
        """The voxels the block's own patches cover, clipped to the volume (None: it owns
        none, as a last block thinner than the stride may). Their starts are a range per
        axis, so the box is its first start to its last start's end (not the bounds of a
        list of every owned patch)."""
        starts = self._owned_starts(block)
        if any(len(r) == 0 for r in starts):
            return None
        low = [r[0] for r in starts]
        high = [r[-1] + p for r, p in zip(starts, self.patch, strict=True)]
        begin = [max(b, 0) for b in low]
        end = [min(e, n) for e, n in zip(high, self.shape, strict=True)]
        if any(b >= e for b, e in zip(begin, end, strict=True)):  # outside: as funlib has it
            return Roi(low, [e - b for b, e in zip(low, high, strict=True)]).intersect(
                box_of(self.shape))
        return Roi(begin, [e - b for b, e in zip(begin, end, strict=True)])

    def owned_count(self, block: Zyx) -> int:
        """How many patches ``block`` owns (`owned_patches`, without listing them)."""
        return math.prod(len(r) for r in self._owned_starts(block))

    def _owned_starts(self, block: Zyx) -> list[range]:
        """Per axis, the starts of the patches ``block`` owns."""
        return [self.starts_within(a, block[a] * self.block[a] if block[a] else -math.inf,
                                   (block[a] + 1) * self.block[a]) for a in range(3)]

    def batches(self, block: Zyx, batch_size: int) -> list[list[Zyx]]:
        """The block's own patches in the batches every worker predicts them in.

        Patches are grouped by the blocks they reach (then lattice order), so that a block
        that has to recompute another's contribution to it (a unit border, a resumed run)
        predicts few batches, and each patch always in the same company: a network's output
        for one patch can depend on the batch it is in, in the last bits."""
        owned = sorted(self.owned_patches(block),
                       key=lambda p: (_sub(self.reach(p), block), p))
        return [owned[i:i + batch_size] for i in range(0, len(owned), batch_size)]

    def digest(self) -> str:
        """A short hash of the layout: done-markers and resumption are keyed by it."""
        text = json.dumps({**asdict(self), "scheme": SCHEME}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Tiling:
    """How blocks are grouped for workers: units of ``unit`` blocks per axis, each predicted
    in the lexicographic order of ``order`` (axes, slowest first). Any such order predicts a
    block's owners before it; the one that keeps the fewest partial sums waiting is chosen."""

    unit: Zyx
    order: Zyx = (0, 1, 2)

    def key(self, block: Zyx) -> Zyx:
        return zyx(block[a] for a in self.order)


def units(layout: Layout, blocks: list[Zyx], tiling: Tiling) -> list[list[Zyx]]:
    """``blocks`` grouped by the unit they fall in, each unit's in the tiling's order."""
    groups: dict[Zyx, list[Zyx]] = {}
    for block in sorted(blocks, key=tiling.key):
        tile = zyx(i // u for i, u in zip(block, tiling.unit, strict=True))
        groups.setdefault(tile, []).append(block)
    return [groups[tile] for tile in sorted(groups, key=tiling.key)]


@lru_cache(maxsize=16)  # a job's plan is asked for by its scheduler and its report
def choose_tiling(layout: Layout, channels: int, workers: int, budget: int) -> Tiling:
    """The units that predict the fewest patches again at their borders (a patch is
    predicted once more for each other unit it reaches: `unit_spread`) while the partial
    sums a worker holds fit ``budget`` bytes, with at least ``workers`` units (each worker
    predicts whole units). With several workers a unit's length counts too: the slowest
    worker's share, a whole number of units, is at least the largest unit. Every box
    shape of whole units is weighed (per axis every length that gives another number of
    units); halving the longest axis until the sums fit, as this did before, kept thin
    columns where slabs repeated fewer patches (a teravolume of the SNEMI3D recipe in a
    GPU's budget: 51 % of the lattice predicted again, against 28 %). A grid of 250
    blocks per axis takes half a second (`_fits`)."""
    grid = layout.grid()
    total = math.prod(grid)
    want = min(workers, total)
    lengths = [_unit_lengths(g) for g in grid]
    spread = [{u: unit_spread(layout, a, u) for u in lengths[a]} for a in range(3)]
    best: tuple[float, int, Zyx] | None = None
    for u0 in lengths[0]:
        fits = len(lengths[2])  # the longest last-axis lengths that fit: fewer as u1 grows
        for u1 in lengths[1]:
            while fits and not _fits(layout, (u0, u1, lengths[2][fits - 1]), channels,
                                     budget):
                fits -= 1
            for u2 in lengths[2][:fits]:
                unit = zyx((u0, u1, u2))
                if _count(grid, unit) < want:
                    continue
                repeats = spread[0][u0] * spread[1][u1] * spread[2][u2]
                cost = repeats * max(total / workers, math.prod(unit)) if workers > 1 \
                    else repeats
                key = (round(cost, 9), -math.prod(unit), unit)
                if best is None or key < best:
                    best = key
    unit = best[2] if best is not None else zyx((1, 1, 1))
    return Tiling(unit, best_order(layout, unit))


def unit_spread(layout: Layout, axis: int, length: int) -> float:
    """Along ``axis``, with units ``length`` blocks long: the mean number of units a
    lattice patch reaches (1.0: no patch straddles a unit border). The lattice and units
    are products of their axes, so the patches a job predicts are the lattice's times the
    product of the three."""
    size, n = length * layout.block[axis], layout.shape[axis]
    starts = layout.starts(axis)
    reached = sum((min(s + layout.patch[axis], n) - 1) // size - max(s, 0) // size + 1
                  for s in starts)
    return reached / len(starts)


def repeated(layout: Layout, unit: Sequence[int]) -> float:
    """The share of the lattice predicted again with units of ``unit`` blocks: once more
    for each other unit a patch reaches (`unit_spread`)."""
    return math.prod(unit_spread(layout, a, unit[a]) for a in range(3)) - 1


def _unit_lengths(blocks: int) -> list[int]:
    """Unit lengths along an axis of ``blocks`` blocks, ascending: for each number of units
    the shortest length that gives it (longer ones only leave the last unit longer)."""
    return sorted({-(-blocks // k) for k in range(1, blocks + 1)})


def _fits(layout: Layout, unit: Zyx, channels: int, budget: int) -> bool:
    """Whether the unit's partial sums fit ``budget`` in its best order. Bounds that take
    microseconds (`_in_flight_bounds`) settle most units; the exact count, a thousand
    times dearer, only those between them (a grid of 250 blocks per axis: half a second
    rather than twenty)."""
    orders = list(itertools.permutations(range(3)))
    bounds = [_in_flight_bounds(layout, unit, channels, order) for order in orders]
    if any(high <= budget for _, high in bounds):
        return True
    return any(low <= budget and _in_flight(layout, unit, channels, order) <= budget
               for order, (low, _) in zip(orders, bounds, strict=True))


def best_order(layout: Layout, unit: Sequence[int]) -> Zyx:
    """The axis order (slowest first) that keeps the fewest partial sums waiting: the plane
    across the slowest axis waits longest, so that axis should have the most blocks."""
    return zyx(min(itertools.permutations(range(3)),
                    key=lambda order: (_in_flight(layout, unit, 1, order), order)))


def _in_flight(layout: Layout, unit: Sequence[int], channels: int, order: Sequence[int]
               ) -> int:
    """Bytes of float32 partial sums a worker holds at most while predicting a unit in
    ``order``. A block keeps one sum per later block of its unit that its own patches reach
    (a target ``d`` blocks on, per axis), from its prediction to the target's (both
    counted: the sum taken and the one being made). For each ``d``: the owners whose target
    is in the unit within the last ``steps(d) + 1`` blocks of the order, weighed by their
    size (`_weight_up_to`), which is the widest of any block's (`_reach_overlaps`) but for
    a unit's first block along an axis, which may be the volume's (its own patches start
    before the volume, so it covers more of itself): exact for the units of a volume whose
    later blocks are alike. That total is piecewise affine in the step's position, its pieces
    ending within a reach of the unit's faces, so its largest value is at one of those
    positions (`_steps_to_weigh`). Counting every owner as holding, and every block's sums
    as large as the first block's, as this did before, held SNEMI3D's teravolume units to
    half what a 10 GiB budget allowed."""
    n, overlaps, reach = _in_order(layout, unit, order)
    k, r, c = np.meshgrid(*(_steps_to_weigh(m, e) for m, e in zip(n, reach, strict=True)),
                          indexing="ij")
    here = ((k * n[1] + r) * n[2] + c).ravel()
    d = np.array([e for e in itertools.product(*map(range, reach)) if any(e)], np.int64)
    if not len(d):
        return 0
    steps = ((d[:, 0] * n[1] + d[:, 1]) * n[2] + d[:, 2])[:, None]
    weights = [(np.maximum(np.take(o.first, d[:, a]), np.take(o.later, d[:, a]))[:, None],
                np.take(o.later, d[:, a])[:, None], (n[a] - d[:, a])[:, None])
               for a, o in enumerate(overlaps)]  # one row per d
    voxels = _weight_up_to(here, n, weights) - _weight_up_to(here - steps - 1, n, weights)
    return 4 * channels * int(voxels.sum(axis=0).max())


def _in_flight_bounds(layout: Layout, unit: Sequence[int], channels: int,
                      order: Sequence[int]) -> tuple[int, int]:
    """Bounds on `_in_flight` from a sum over target offsets ``d`` alone. Above: every one
    of the ``steps(d) + 1`` blocks before a target holding a sum as large as any block's.
    Below (0 for a unit too thin to have one): the sums held at a step inside the unit,
    at least a reach from its faces, where each ``d``'s owners in that window are known
    in closed form (whole planes, whole rows, then a run along the fastest axis, of the
    owners whose target is in the unit), each at least a later block's size."""
    n, overlaps, reach = _in_order(layout, unit, order)
    inside = all(m >= 2 * e - 1 for m, e in zip(n, reach, strict=True))
    low = high = 0
    for d in itertools.product(*map(range, reach)):
        if any(d):
            steps = (d[0] * n[1] + d[1]) * n[2] + d[2]
            widest = math.prod(max(o.first[e], o.later[e]) for o, e in zip(overlaps, d,
                                                                            strict=True))
            high += min(steps + 1, math.prod(n)) * widest
            if inside:
                owners = (d[0] * (n[1] - d[1]) + d[1]) * (n[2] - d[2]) + d[2] + 1
                low += owners * math.prod(o.later[e] for o, e in zip(overlaps, d,
                                                                      strict=True))
    return 4 * channels * low, 4 * channels * high


def _in_order(layout: Layout, unit: Sequence[int], order: Sequence[int]
              ) -> tuple[list[int], list[Overlaps], list[int]]:
    """Per axis of ``order`` (slowest first): the unit's length, the overlaps of a block's
    patches (`_reach_overlaps`) and how many blocks they cover in the unit."""
    n = [unit[a] for a in order]
    overlaps = [_reach_overlaps(layout, a) for a in order]
    return n, overlaps, [min(len(o.first), m) for o, m in zip(overlaps, n, strict=True)]


def _steps_to_weigh(length: int, reach: int) -> np.ndarray:
    """Positions along an axis of ``length`` blocks where the sums held can peak, ``reach``
    being how many blocks a block's patches cover along it: within ``reach + 2`` of either
    end (between them the total is affine, so an end is as high)."""
    near = reach + 2
    return np.array(sorted(set(range(min(length, near))) |
                           set(range(max(0, length - near), length))), np.int64)


def _weight_up_to(position: np.ndarray, n: Sequence[int],
                  weights: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> np.ndarray:
    """The summed sizes of the owners that come at or before ``position`` in a unit of ``n``
    blocks (slowest axis first), an owner's size being the product over axes of its
    weight there: per axis (first, later, owners), ``first`` for the unit's first block,
    ``later`` for the others, of the first ``owners`` blocks (beyond them none has its
    target in the unit). Weights may be columns (one row per target offset)."""
    def before(i: np.ndarray | int, axis: int) -> np.ndarray:  # the weight of indices < i
        first, later, owners = weights[axis]
        i = np.minimum(i, owners)
        return (i >= 1) * first + np.maximum(i - 1, 0) * later

    def at(i: np.ndarray, axis: int) -> np.ndarray:
        first, later, owners = weights[axis]
        return np.where(i >= owners, 0, np.where(i == 0, first, later))

    plane, rest = np.divmod(position, n[1] * n[2])
    row, col = np.divmod(rest, n[2])
    total = before(plane, 0) * before(n[1], 1) * before(n[2], 2) + at(plane, 0) * (
        before(row, 1) * before(n[2], 2) + at(row, 1) * before(col + 1, 2))
    return np.where(position < 0, 0, total)


class Overlaps(NamedTuple):
    """Along an axis, for k = 0, 1, ...: the voxels a block's owned patches cover in the
    block k on (k = 0: the block itself), for the volume's first block (which also owns
    the patches that start before the volume) and the most for any later one."""

    first: tuple[int, ...]
    later: tuple[int, ...]


@lru_cache(maxsize=64)
def _reach_overlaps(layout: Layout, axis: int) -> Overlaps:
    """`Overlaps` along ``axis``, both as long as the farthest reach (0 past a block's)."""
    size, n = layout.block[axis], layout.shape[axis]
    widest: list[list[int]] = [[], []]
    for i in range(layout.grid()[axis]):
        starts = layout.starts_within(axis, i * size if i else -math.inf, (i + 1) * size)
        if not starts:
            continue
        begin, end = max(starts[0], 0), min(starts[-1] + layout.patch[axis], n)
        row, k = widest[min(i, 1)], 0
        while (lo := max(begin, (i + k) * size)) < (hi := min(end, (i + k + 1) * size, n)):
            if k == len(row):
                row.append(0)
            row[k] = max(row[k], hi - lo)
            k += 1
    length = max(map(len, widest))
    first, later = ([*row, *[0] * (length - len(row))] for row in widest)
    return Overlaps(tuple(first), tuple(later))


def _count(grid: Zyx, unit: Sequence[int]) -> int:
    return math.prod(math.ceil(g / u) for g, u in zip(grid, unit, strict=True))


def choose_chunks_and_block(shape: Zyx, patch: Zyx, stride: Zyx, chunks: Zyx | None,
                            block: Zyx | None) -> tuple[Zyx, Zyx]:
    """Default chunks tile the block; the default block is 4 strides per axis: patches are
    shared across blocks of a unit, so a block need not be large to waste nothing, and
    smaller blocks keep the device busy while the first read and the last write of a
    worker's run are in flight (a whole-volume block would hide neither). With the recipe's
    ``chunks`` the default block is rounded up to whole chunks (a volume thinner than four
    strides was refused as if the user had given a block that splits a chunk).

    Default chunks are the largest divisor of the block up to `CHUNK_LIMIT` when that
    gives few chunks; otherwise (a whole-axis block of 37 or 53 voxels had chunks of 1)
    the block is split into equal chunks and rounded up to them, the last chunk cut short
    at the volume's end. A user's block is rounded up only where it already spans the
    axis, so its blocks stay where the user put them. No chunk is longer than its axis
    (`_clamped`)."""
    given = block is not None
    if block is None:
        block = zyx(min(n, max(s * 4, p)) for n, s, p in zip(shape, stride, patch, strict=True))
        if chunks is not None:
            block = zyx(-(-b // c) * c for b, c in zip(block, chunks, strict=True))
    if chunks is None:
        pairs = [_axis_chunks(b, CHUNK_LIMIT[a], may_grow=not given or b >= n)
                 for a, (b, n) in enumerate(zip(block, shape, strict=True))]
        chunks, block = zyx(c for c, _ in pairs), zyx(b for _, b in pairs)
    return _clamped(shape, chunks, block)


def _clamped(shape: Zyx, chunks: Zyx, block: Zyx) -> tuple[Zyx, Zyx]:
    """Chunks and block with every chunk at most its axis: a chunk longer than the axis
    (a user's `--block 64 256 256` on 20 sections gave chunks of 32 in z) stores and reads
    voxels that are not there; that axis gets one chunk of the axis's length, and so does
    its block where it spans the axis (one that does not is no whole number of the recipe's
    chunks, and `Layout` says so)."""
    fits = [c <= n for c, n in zip(chunks, shape, strict=True)]
    return (zyx(c if ok else n for c, n, ok in zip(chunks, shape, fits, strict=True)),
            zyx(b if ok or b < n else n for b, n, ok in zip(block, shape, fits, strict=True)))


CHUNK_LIMIT: Zyx = (32, 256, 256)
"""The largest default output chunk per axis (z, y, x)."""


def _axis_chunks(block: int, limit: int, *, may_grow: bool) -> tuple[int, int]:
    """(chunk, block) along one axis: the largest divisor of ``block`` up to ``limit``
    unless that needs more than twice the fewest chunks the limit allows; then, where the
    block ``may_grow``, ``block`` split evenly into that fewest number, rounded up, and
    where it may not (a user's block), its largest divisor up to twice the limit."""
    divisor = _largest_divisor_at_most(block, limit)
    fewest = -(-block // limit)
    if block // divisor <= 2 * fewest:
        return divisor, block
    if not may_grow:
        return _largest_divisor_at_most(block, 2 * limit), block
    chunk = -(-block // fewest)
    return chunk, chunk * fewest


def _largest_divisor_at_most(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def _sub(a: Zyx, b: Zyx) -> Zyx:
    return (a[0] - b[0], a[1] - b[1], a[2] - b[2])
