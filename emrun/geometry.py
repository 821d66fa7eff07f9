"""emrun's one geometry: boxes are funlib.geometry ``Roi`` (offset + shape, voxels) and points
and sizes ``Coordinate`` (a tuple of ints with element-wise arithmetic), as in gunpowder and
daisy; this module adds only what emrun needs on top of them, written once.

funlib checks its arguments with ``assert``: user input (a recipe's or a command line's box)
is validated before a ``Roi`` is built from it. A ``Roi`` is not hashable; ``Coordinate`` is a
tuple (hashable, and equal to the plain tuple of its values) whose ``/`` divides integers.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence

from funlib.geometry import Coordinate, Roi

__all__ = ["BlockGrid", "Coordinate", "Roi", "Zyx", "box_of", "clip", "grow_within",
           "local_slices", "slices", "zyx"]

Zyx = tuple[int, int, int]
"""Three ints, z, y, x: a size, a point or a block index where a fixed-length tuple is wanted
(dataclass fields, dictionary keys, JSON)."""


def zyx(values: Iterable[int]) -> Zyx:
    """Three plain ints from a ``Coordinate`` or any three numbers."""
    z, y, x = values
    return (int(z), int(y), int(x))


def box_of(shape: Sequence[int]) -> Roi:
    """The box of an array of ``shape``: offset 0 on every axis."""
    return Roi((0,) * len(shape), tuple(int(n) for n in shape))


def clip(roi: Roi, total: Roi) -> Roi:
    """The part of ``roi`` inside ``total``, axis by axis; it keeps a position even when empty
    (``Roi.intersect`` forgets it), so an empty read still has the shape numpy would give."""
    begin, end = [], []
    for b, e, lo, hi in zip(*_bounds(roi), *_bounds(total), strict=True):
        start = min(max(b, lo), hi)
        begin.append(start)
        end.append(max(start, min(e, hi)))
    return Roi(begin, [e - b for b, e in zip(begin, end, strict=True)])


def _bounds(roi: Roi) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``roi``'s begin and end as plain ints: ``Roi.begin`` and ``Roi.end`` build a
    ``Coordinate`` each time (type checks per value), which was a large part of the
    inference engine's host time per block (boxes, slices, patch cuts)."""
    offset, shape = tuple(roi.offset), tuple(roi.shape)
    if None in offset or None in shape:  # unbounded: as funlib has it
        return tuple(roi.begin), tuple(roi.end)
    return offset, tuple(o + n for o, n in zip(offset, shape, strict=True))


def grow_within(roi: Roi, context: Sequence[int] | int, total: Roi) -> Roi:
    """``roi`` grown by ``context`` on both sides of every axis, clipped to ``total``."""
    return clip(roi.grow(context, context), total)


def slices(roi: Roi) -> tuple[slice, ...]:
    """Index of the box in an array whose first voxel lies at the origin; start and stop are
    explicit on every axis, an empty axis included (``Roi.to_slices`` leaves its start out)."""
    begin, end = _bounds(roi)
    return tuple(slice(b, e) for b, e in zip(begin, end, strict=True))


def local_slices(roi: Roi, origin: Sequence[int]) -> tuple[slice, ...]:
    """Index of ``roi`` in an array whose first voxel lies at ``origin``."""
    begin, end = _bounds(roi)
    return tuple(slice(None if b is None else b - o, None if e is None else e - o)
                 for b, e, o in zip(begin, end, origin, strict=True))


class BlockGrid:
    """Blocks of ``block`` voxels tiling ``total`` from its offset, in raster order (first axis
    slowest); the last block along an axis is cut short at the end of ``total``.

    The one block grid of emrun: inference writes its blocks, blockwise segmentation
    segments them (with a context around each), conversion and scoring stream slabs of it.
    """

    def __init__(self, total: Roi, block: Sequence[int]) -> None:
        if len(block) != total.dims or any(int(b) < 1 for b in block):
            raise ValueError(f"block {list(block)} must have {total.dims} sizes >= 1")
        self.total = total
        self.block = Coordinate(block)

    @property
    def counts(self) -> Coordinate:
        """Blocks per axis."""
        return Coordinate(math.ceil(n / b) for n, b in zip(self.total.shape, self.block,
                                                            strict=True))

    def __len__(self) -> int:
        return math.prod(self.counts)

    def indices(self) -> list[tuple[int, ...]]:
        """Every block's index (blocks per axis before it), in raster order."""
        return list(itertools.product(*(range(c) for c in self.counts)))

    def box(self, index: Sequence[int], context: Sequence[int] | int = 0) -> Roi:
        """The voxels of block ``index`` inside ``total``, grown by ``context`` on both sides
        of every axis and clipped to ``total`` again."""
        begin, end = _bounds(self.total)
        low = [o + i * b for o, i, b in zip(begin, index, self.block, strict=True)]
        high = [min(s + b, e) for s, b, e in zip(low, self.block, end, strict=True)]
        if any(s < b or s > e for s, b, e in zip(low, begin, end, strict=True)):  # outside
            core = clip(Roi(low, self.block), self.total)
        else:
            core = Roi(low, [e - s for s, e in zip(low, high, strict=True)])
        return grow_within(core, context, self.total) if context else core

    def boxes(self, context: Sequence[int] | int = 0) -> list[Roi]:
        """Every block's box (see ``box``), in raster order."""
        return [self.box(index, context) for index in self.indices()]
