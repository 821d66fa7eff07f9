"""The boxes blockwise segmentation needs beyond `emrun.geometry`: where a voxel's affinity
partner (v + offset) lies relative to a block and its surroundings."""

from __future__ import annotations

from collections.abc import Sequence

from ..geometry import Coordinate, Roi

__all__ = ["crossing", "shifted_inside"]


def shifted_inside(box: Roi, region: Roi, offset: Sequence[int]) -> Roi | None:
    """The voxels v of ``box`` with v + offset inside ``region``; None if there are none."""
    part = box.intersect(region.shift(-Coordinate(offset)))
    return None if part.empty else part


def crossing(core: Roi, offset: Sequence[int], total: Roi) -> list[Roi]:
    """Disjoint boxes covering the voxels v of ``core`` whose partner v + offset lies outside
    ``core`` but inside ``total`` (the volume).

    Along each axis with a non-zero offset component, the slab whose partners leave the core
    through that axis's face; earlier axes are restricted to their other part, so a voxel
    whose partner leaves through two faces is counted once.
    """
    pieces = []
    begin, end = list(core.begin), list(core.end)
    for axis, d in enumerate(offset):
        if d == 0:
            continue
        start, stop = begin[axis], end[axis]
        if d < 0:
            cut = min(stop, start - d)
            slab, rest = (start, cut), (cut, stop)
        else:
            cut = max(start, stop - d)
            slab, rest = (cut, stop), (start, cut)
        low, high = list(begin), list(end)
        low[axis], high[axis] = slab
        pieces.append(Roi(low, Coordinate(high) - Coordinate(low)))
        begin[axis], end[axis] = rest
    return [part for piece in pieces
            if (part := shifted_inside(piece, total, offset)) is not None]
