"""Sets of patch shapes as (n, 3) integer arrays, for the augmentation check.

A chain of many geometric steps after a step whose check cannot be bounded (a box, a
plugin's step) makes `augment.chain_inputs` carry thousands of shapes per step; walking them
one tuple at a time took seconds at validation. These give the same shapes, in the same
order, for whole arrays at once.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

import numpy as np

from ..geometry import Zyx

LARGEST = 2 ** 40
"""Sides up to this are held exactly by floats through the warp's arithmetic; a set with a
larger side is walked one tuple at a time (Python's ints do not overflow)."""

TABLE_CELLS = 2_000_000
"""Most cells of the prefix table `dominated` builds (16 MB)."""

PAIR_CELLS = 4_000_000
"""Most pair comparisons `dominated` makes in one numpy call."""

LONGEST_CHUNK = 2048
"""Past this many points a chunk (a set so large and spread that the table would need
longer ones), `dominated` sweeps one point at a time instead: slower, in bounded memory."""


def as_array(shapes: Sequence[Zyx] | np.ndarray) -> np.ndarray:
    """``shapes`` as an (n, 3) int64 array."""
    if isinstance(shapes, np.ndarray):
        return shapes
    return np.array(shapes, dtype=np.int64).reshape(-1, 3)


def as_list(shapes: Sequence[Zyx] | np.ndarray) -> list[Zyx]:
    """``shapes`` as a list of tuples of Python ints (messages print them)."""
    if isinstance(shapes, np.ndarray):
        return list(map(tuple, shapes.tolist()))  # type: ignore[arg-type]
    return list(shapes)


def fits(shapes: Sequence[Zyx] | np.ndarray) -> bool:
    """Whether every side is positive-or-zero and at most `LARGEST` (arrays hold it)."""
    if len(shapes) == 0:
        return True
    if isinstance(shapes, np.ndarray):
        return bool(shapes.min() >= 0 and shapes.max() <= LARGEST)
    return all(0 <= side <= LARGEST for shape in shapes for side in shape)


def smallest_array(shapes: np.ndarray) -> np.ndarray:
    """`augment.smallest_shapes` for an array: the distinct shapes no other one is smaller
    than or equal to on every axis, in the order first seen."""
    if len(shapes) == 0:
        return shapes.reshape(0, 3)
    order = _sorted_by(shapes, (0, 1, 2))  # stable: first seen first
    ordered = shapes[order]
    new = np.ones(len(order), dtype=bool)
    new[1:] = np.any(ordered[1:] != ordered[:-1], axis=1)
    points, first = ordered[new], order[new]
    for axis in range(3):  # cheap first passes, each dropping only dominated points
        alone = ~dominated_on_a_par(points, axis)
        points, first = points[alone], first[alone]
    kept = first[~dominated(points)]
    return shapes[np.sort(kept)]


def dominated_on_a_par(points: np.ndarray, axis: int) -> np.ndarray:
    """For distinct points: whether another one with the same side on ``axis`` is no larger
    on the other two (a running minimum per group of equal sides)."""
    if len(points) < 2:
        return np.zeros(len(points), dtype=bool)
    u, w = (a for a in range(3) if a != axis)
    order = _sorted_by(points, (axis, u, w), distinct=True)
    key, last = points[order, axis], points[order, w]
    start = np.ones(len(order), dtype=bool)
    start[1:] = key[1:] != key[:-1]
    group = np.cumsum(start) - 1
    span = int(last.max()) + 2
    if (int(group[-1]) + 1) * span >= 2 ** 62:
        return np.zeros(len(points), dtype=bool)
    lift = (group[-1] - group) * span  # earlier groups above every later value
    running = np.minimum.accumulate(last + lift)
    found = np.zeros(len(order), dtype=bool)
    found[1:] = (running[:-1] - lift[1:] <= last[1:]) & ~start[1:]
    out = np.zeros(len(points), dtype=bool)
    out[order] = found
    return out


def _sorted_by(points: np.ndarray, axes: tuple[int, int, int],
               distinct: bool = False) -> np.ndarray:
    """The stable order of ``points`` by the sides on ``axes``, first axis first: one key
    per point where the sides fit in 20 bits (faster than `np.lexsort`; no stable sort
    needed where the points are ``distinct``)."""
    if int(points.max()) < 2 ** 20 and int(points.min()) >= 0:
        a, b, c = (points[:, axis] for axis in axes)
        return np.argsort((a << 40) | (b << 20) | c, kind="quicksort" if distinct else "stable")
    return np.lexsort(tuple(points[:, axis] for axis in reversed(axes)))


def dominated(points: np.ndarray) -> np.ndarray:
    """For distinct points sorted by (z, y, x): whether an earlier one is no larger in y and
    x (so in z too). Earlier chunks through a prefix-minimum table over (chunk, y), the
    points of a chunk pair by pair."""
    n = len(points)
    y, x = points[:, 1], points[:, 2]
    values, rank = np.unique(y, return_inverse=True)
    chunk = max(32, math.isqrt(len(values)), -(-n * len(values) // TABLE_CELLS))
    if chunk > LONGEST_CHUNK:
        return _dominated_by_sweep(points)
    chunks = -(-n // chunk)
    cid = np.arange(n) // chunk
    table = np.full((chunks, len(values)), np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(table, (cid, rank), x)
    np.minimum.accumulate(table, axis=1, out=table)
    np.minimum.accumulate(table, axis=0, out=table)
    found = np.zeros(n, dtype=bool)
    later = cid > 0
    found[later] = table[cid[later] - 1, rank[later]] <= x[later]
    return found | _dominated_in_chunks(y, x, chunk)


def _dominated_by_sweep(points: np.ndarray) -> np.ndarray:
    """`dominated`, one point at a time over a staircase of the (y, x) seen so far (y
    ascending, x descending), as `augment.smallest_shapes` sweeps."""
    ys: list[int] = []
    xs: list[int] = []
    found = np.zeros(len(points), dtype=bool)
    for k, (_, y, x) in enumerate(points.tolist()):
        i = bisect.bisect_right(ys, y)
        if i and xs[i - 1] <= x:
            found[k] = True
            continue
        j = i
        while j < len(ys) and xs[j] >= x:
            j += 1
        ys[i:j], xs[i:j] = [y], [x]
    return found


def _dominated_in_chunks(y: np.ndarray, x: np.ndarray, chunk: int) -> np.ndarray:
    """Whether an earlier point of the same chunk is no larger in y and x."""
    n = len(y)
    chunks = -(-n // chunk)
    pad = chunks * chunk - n  # padding comes last: never earlier than a real point
    ys = np.concatenate([y, np.zeros(pad, dtype=y.dtype)]).reshape(chunks, chunk)
    xs = np.concatenate([x, np.zeros(pad, dtype=x.dtype)]).reshape(chunks, chunk)
    earlier = np.tri(chunk, k=-1, dtype=bool).T  # [j, i]: j before i
    found = np.zeros((chunks, chunk), dtype=bool)
    step = max(1, PAIR_CELLS // (chunk * chunk))
    for start in range(0, chunks, step):
        part = slice(start, start + step)
        yp, xp = ys[part], xs[part]
        below = (yp[:, :, None] <= yp[:, None, :]) & (xp[:, :, None] <= xp[:, None, :])
        found[part] = (below & earlier).any(axis=1)
    return found.reshape(-1)[:n]


def warp_reads(outs: np.ndarray, rotations: np.ndarray,
               coefficients: dict[float, list[tuple[float, float, float, float]]],
               scale: float, margin: int) -> np.ndarray | None:
    """The two reads (smallest in y, smallest in x) of every output shape, interleaved as
    `augment.Warp.input_shapes` lists them, with the same float arithmetic as
    `augment.warp_input_yx`. ``rotations`` gives each shape's largest rotation, a key of
    ``coefficients``: the (|sin|, |sin shear + cos|, |cos|, |cos shear - sin|) of every
    draw to try at that rotation. None where a read is too large for an int64."""
    if len(outs) == 0:
        return outs.reshape(0, 3)
    keys, group = np.unique(rotations, return_inverse=True)
    longest = max(len(coefficients[float(k)]) for k in keys)
    table = np.array([_padded(coefficients[float(k)], longest) for k in keys])
    coef = table[group]  # (n, draws, 4)
    half_w = ((outs[:, 2] - 1) / 2)[:, None]
    half_h = ((outs[:, 1] - 1) / 2)[:, None]
    ys = _read(coef[:, :, 0] * half_w + coef[:, :, 1] * half_h, scale, margin, outs[:, 1:2])
    xs = _read(coef[:, :, 2] * half_w + coef[:, :, 3] * half_h, scale, margin, outs[:, 2:3])
    if ys is None or xs is None:
        return None
    big = np.iinfo(np.int64).max
    least_y = ys.min(axis=1)
    x_at = np.where(ys == least_y[:, None], xs, big).min(axis=1)
    least_x = xs.min(axis=1)
    y_at = np.where(xs == least_x[:, None], ys, big).min(axis=1)
    z = outs[:, 0]
    by_y = np.stack([z, least_y, x_at], axis=1)
    by_x = np.stack([z, y_at, least_x], axis=1)
    return np.stack([by_y, by_x], axis=1).reshape(-1, 3)


def _padded(rows: list[tuple[float, float, float, float]], length: int) -> list[tuple[float, ...]]:
    return rows + [rows[0]] * (length - len(rows))


def _read(weighted: np.ndarray, scale: float, margin: int, out: np.ndarray) -> np.ndarray | None:
    """The sides read for reaches ``weighted / scale`` and outputs ``out`` long (as
    `augment.warp_read_side`: of the output's parity); None where one does not fit an
    int64."""
    sides = np.ceil(2 * (weighted / scale) - 1e-6)
    if not np.all(sides < 2.0 ** 62):
        return None
    sides = sides.astype(np.int64) + 1 + 2 * margin
    return sides + (sides - out) % 2
