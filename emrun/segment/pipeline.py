"""One region in memory: fragments -> ids for every voxel -> small segments merged -> ids
1..K. Also the pieces the blockwise driver shares (provisional ids, region adjacency).

Output contract (both paths): uint64 ids, 0 exactly on masked voxels; every other voxel
carries an id; segments smaller than ``min_size`` are merged into the neighbour with the
highest mean nearest-neighbour affinity, and remain only where they have no neighbour at
all (e.g. enclosed by the mask). Ids are numbered 1..K deterministically.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import cc3d
import numpy as np

from ..errors import UserError
from ..geometry import Coordinate, Roi, box_of, local_slices
from ..io.masks import inside
from .affinities import Offset, check_offsets, is_nearest, to_float
from .base import Segmenter
from .boxes import shifted_inside
from .graph import Edges, compact, merge_small

__all__ = ["finish", "first_voxel_ranks", "nearest_pairs", "provisional", "region_edges",
           "region_mask", "segment_array", "segment_values"]


def connected_fragments(fragments: np.ndarray) -> np.ndarray:
    """``fragments`` cropped from a block segmented with context, each split into its
    6-connected pieces (0 stays 0): a fragment joined only through the context falls apart
    in the block, and kept as one id it stayed one segment (one graph node at scale)
    though its pieces need not touch."""
    return cc3d.connected_components(np.ascontiguousarray(fragments), connectivity=6)


def provisional(raw: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, int]:
    """Ids 1..K for every unmasked voxel: a segmenter's fragments, with each unassigned
    (0) voxel inside the mask made a segment of its own; masked voxels 0."""
    labels = raw.astype(np.uint64, copy=True)
    unassigned = labels == 0
    if mask is not None:
        unassigned &= mask
        labels[~mask] = 0
    n = int(unassigned.sum())
    if n:
        start = int(labels.max()) + 1
        labels[unassigned] = np.arange(start, start + n, dtype=np.uint64)
    return compact(labels)


def nearest_pairs(labels: np.ndarray, region: Roi, core: Roi, affs: np.ndarray,
                  offsets: Sequence[Offset]
                  ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(ids at v, ids at v + offset, affinity), one triple of arrays per nearest-neighbour
    channel, over the edges whose first voxel v lies in ``core`` and whose second lies in
    ``region``; ``labels`` cover ``region`` and ``affs`` cover ``core`` (volume
    coordinates, core inside region)."""
    for c, offset in enumerate(offsets):
        if not is_nearest(offset):
            continue
        box = shifted_inside(core, region, offset)
        if box is None:
            continue
        yield (labels[local_slices(box, region.offset)],
               labels[local_slices(box.shift(Coordinate(offset)), region.offset)],
               affs[c][local_slices(box, core.offset)])


def region_edges(labels: np.ndarray, region: Roi, core: Roi, affs: np.ndarray,
                 offsets: Sequence[Offset]) -> Edges:
    """Adjacent ids with their summed nearest-neighbour affinity, over the edges of
    `nearest_pairs`; ids 0 (masked) take no part."""
    parts = []
    for u, v, p in nearest_pairs(labels, region, core, affs, offsets):
        keep = (u != v) & (u != 0) & (v != 0)
        if keep.any():
            parts.append(Edges.aggregate(u[keep], v[keep], p[keep]))
    return Edges.concat(parts)


def finish(raw: np.ndarray, affs: np.ndarray, offsets: Sequence[Offset],
           mask: np.ndarray | None, min_size: int) -> np.ndarray:
    """The output contract (module docstring) from one region's fragments."""
    labels, count = provisional(raw, mask)
    if min_size <= 1 or count == 0:
        return labels
    sizes = np.bincount(labels.ravel().astype(np.int64), minlength=count + 1)
    whole = box_of(labels.shape)
    edges = region_edges(labels, whole, whole, affs, offsets)
    table = merge_small(sizes, edges, min_size, rank=first_voxel_ranks(labels))
    return compact(table[labels])[0]


def first_voxel_ranks(labels: np.ndarray, at: Roi | None = None,
                      shape: Sequence[int] | None = None) -> np.ndarray:
    """Per id 0..K of ``labels`` (ids 1..K all present, as `provisional` gives them) the flat
    index of its first voxel in raster order (index 0: -1); with ``at`` (the box ``labels``
    cover) and ``shape``, the index in the whole volume. `merge_small` breaks ties by it, so
    that in memory and block by block merge alike."""
    from ..evaluate.pieces import first_voxels

    local = first_voxels(labels)
    if at is not None and shape is not None:
        position = np.unravel_index(local, labels.shape)
        local = np.ravel_multi_index(
            tuple(p + o for p, o in zip(position, at.offset, strict=True)), tuple(shape))
    return np.concatenate(([-1], local)).astype(np.int64)


def region_mask(mask: np.ndarray | None, shape: Sequence[int]) -> np.ndarray | None:
    """``mask`` as the segmenters take it: bools, inside where non-zero and not NaN (the
    one rule, emrun.io.masks), a leading channel axis of 1 dropped. Segmenters index with
    it: a 0/1 uint8 mask was read as indices (255 = ~1) or failed in a bitwise and, so only
    bool masks worked in memory while block by block took any. Another shape: UserError."""
    if mask is None:
        return None
    mask = np.asarray(mask)
    if mask.ndim == len(shape) + 1 and mask.shape[0] == 1:
        mask = mask[0]
    if tuple(mask.shape) != tuple(shape):
        raise UserError(f"mask has shape {list(mask.shape)} but the affinities' volume is "
                        f"{list(shape)}")
    return inside(mask)


def segment_array(affs: np.ndarray, offsets: Sequence[Offset], segmenter: Segmenter,
                  mask: np.ndarray | None = None) -> np.ndarray:
    """Segment affinities (c, z, y, x; float, or uint8 with 255 = 1) in memory (block by
    block: ``blockwise.segment_into``) inside ``mask`` (z, y, x or 1, z, y, x; non-zero and
    not NaN inside)."""
    check_offsets(offsets, affs.shape[0], "affinities", affs.shape[1:])
    affs = to_float(np.asarray(affs))
    mask = region_mask(mask, affs.shape[1:])
    return finish(segmenter.fragments(affs, offsets, mask), affs, offsets, mask,
                  segmenter.min_size)


def segment_values(affs: np.ndarray, offsets: Sequence[Offset], segmenter: Segmenter,
                   values: Sequence[float], mask: np.ndarray | None = None
                   ) -> Iterator[np.ndarray]:
    """One in-memory segmentation per value of the segmenter's swept parameter."""
    check_offsets(offsets, affs.shape[0], "affinities", affs.shape[1:])
    affs = to_float(np.asarray(affs))
    mask = region_mask(mask, affs.shape[1:])
    for raw in segmenter.fragments_for(values, affs, offsets, mask):
        yield finish(raw, affs, offsets, mask, segmenter.min_size)
