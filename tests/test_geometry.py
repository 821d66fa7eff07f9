"""emrun.geometry: the one block grid (inference, blockwise segmentation, slabs) and the
helpers around funlib's Roi."""

from __future__ import annotations

import numpy as np
import pytest

from emrun.geometry import (
    BlockGrid,
    Coordinate,
    Roi,
    box_of,
    clip,
    grow_within,
    local_slices,
    slices,
    zyx,
)


@pytest.mark.parametrize(("offset", "shape", "block"), [
    ((0, 0, 0), (10, 7, 12), (4, 3, 12)),
    ((5, -2, 3), (9, 8, 1), (3, 3, 2)),
    ((0, 0, 0), (4, 4, 4), (8, 8, 8)),  # one block larger than the total
])
def test_blocks_cover_the_total_exactly_once(offset, shape, block):
    total = Roi(offset, shape)
    grid = BlockGrid(total, block)
    covered = np.zeros(shape, int)
    for box in grid.boxes():
        assert total.contains(box) and not box.empty
        covered[local_slices(box, offset)] += 1
    assert (covered == 1).all()
    assert len(grid) == len(grid.boxes()) == np.prod(grid.counts)


def test_blocks_are_in_raster_order_and_cut_short_at_the_end():
    grid = BlockGrid(Roi((0, 10), (5, 7)), (2, 4))
    assert grid.counts == (3, 2)
    assert grid.indices() == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    assert [(tuple(b.offset), tuple(b.shape)) for b in grid.boxes()] == [
        ((0, 10), (2, 4)), ((0, 14), (2, 3)), ((2, 10), (2, 4)), ((2, 14), (2, 3)),
        ((4, 10), (1, 4)), ((4, 14), (1, 3))]


def test_context_grows_each_block_and_is_clipped_to_the_total():
    grid = BlockGrid(box_of((10, 10, 10)), (4, 4, 4))
    assert grid.box((0, 1, 2), context=(1, 2, 3)) == Roi((0, 2, 5), (5, 8, 5))
    assert grid.box((1, 1, 1), context=1) == Roi((3, 3, 3), (6, 6, 6))
    assert grid.boxes(context=2)[0] == Roi((0, 0, 0), (6, 6, 6))
    with pytest.raises(ValueError, match="sizes >= 1"):
        BlockGrid(box_of((4, 4)), (0, 2))


def test_clip_keeps_the_position_of_an_empty_part():
    total = box_of((12, 20, 24))
    assert clip(Roi((8, -3, 0), (91, 5, 24)), total) == Roi((8, 0, 0), (4, 2, 24))
    empty = clip(Roi((30, 0, 0), (2, 20, 24)), total)
    assert tuple(empty.offset) == (12, 0, 0) and tuple(empty.shape) == (0, 20, 24)
    assert slices(empty) == (slice(12, 12), slice(0, 20), slice(0, 24))
    assert grow_within(Roi((1, 1), (2, 2)), 3, box_of((5, 4))) == Roi((0, 0), (5, 4))


def test_slices_and_plain_triples():
    roi = Roi((3, 10, 5), (6, 20, 33))
    assert slices(roi) == (slice(3, 9), slice(10, 30), slice(5, 38))
    assert local_slices(roi, (3, 0, 5)) == (slice(0, 6), slice(10, 30), slice(0, 33))
    assert zyx(Coordinate(1, 2, 3)) == (1, 2, 3) and type(zyx(Coordinate(1, 2, 3))) is tuple
