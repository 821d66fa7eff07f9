"""Box arithmetic for blockwise work: boxes are tuples of slices in volume coordinates
(z, y, x, start and stop explicit, step 1)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from .affinities import Box

__all__ = ["crossing", "grid", "grow", "local", "shift", "shifted_inside"]


def grid(shape: Sequence[int], block: Sequence[int]) -> list[Box]:
    """The blocks covering ``shape`` in raster order (the last ones cut short)."""
    starts = [range(0, n, b) for n, b in zip(shape, block, strict=True)]
    return [tuple(slice(s, min(s + b, n)) for s, b, n in zip(corner, block, shape, strict=True))
            for corner in itertools.product(*starts)]  # type: ignore[misc]


def grow(box: Box, margin: Sequence[int], shape: Sequence[int]) -> Box:
    """``box`` grown by ``margin`` on both sides of every axis, clipped to ``shape``."""
    return tuple(slice(max(0, s.start - m), min(n, s.stop + m))  # type: ignore[return-value]
                 for s, m, n in zip(box, margin, shape, strict=True))


def shift(box: Box, offset: Sequence[int]) -> Box:
    """``box`` moved by ``offset``."""
    return tuple(slice(s.start + d, s.stop + d)  # type: ignore[return-value]
                 for s, d in zip(box, offset, strict=True))


def local(box: Box, within: Box) -> Box:
    """``box`` in the coordinates of ``within`` (which contains it)."""
    return tuple(slice(s.start - w.start, s.stop - w.start)  # type: ignore[return-value]
                 for s, w in zip(box, within, strict=True))


def shifted_inside(box: Box, region: Box, offset: Sequence[int]) -> Box | None:
    """The voxels v of ``box`` with v + offset inside ``region``; None if there are none."""
    out = []
    for s, r, d in zip(box, region, offset, strict=True):
        lo, hi = max(s.start, r.start - d), min(s.stop, r.stop - d)
        if lo >= hi:
            return None
        out.append(slice(lo, hi))
    return tuple(out)  # type: ignore[return-value]


def crossing(core: Box, offset: Sequence[int], shape: Sequence[int]) -> list[Box]:
    """Disjoint boxes covering the voxels v of ``core`` whose partner v + offset lies outside
    ``core`` but inside the volume ``shape``.

    Along each axis with a non-zero offset component, the slab whose partners leave the core
    through that axis's face; earlier axes are restricted to their other part, so a voxel
    whose partner leaves through two faces is counted once.
    """
    pieces = []
    inner = list(core)
    for axis, d in enumerate(offset):
        if d == 0:
            continue
        s = inner[axis]
        if d < 0:
            cut = min(s.stop, s.start - d)
            slab, rest = slice(s.start, cut), slice(cut, s.stop)
        else:
            cut = max(s.start, s.stop - d)
            slab, rest = slice(cut, s.stop), slice(s.start, cut)
        piece = list(inner)
        piece[axis] = slab
        pieces.append(tuple(piece))
        inner[axis] = rest
    volume = tuple(slice(0, n) for n in shape)
    out = []
    for piece in pieces:
        clipped = shifted_inside(piece, volume, offset)  # type: ignore[arg-type]
        if clipped is not None:
            out.append(clipped)
    return out
