"""Segmenting volumes larger than memory, block by block, into an output array on disk.

Three passes over a grid of blocks (memory is bounded by one block plus its halo):

1. Segment: each block is read with the segmenter's halo (context), segmented, cropped to
   the block (a fragment the crop cut into pieces becomes one fragment per piece), given
   provisional ids unique across blocks, and written to the output.
2. Edges: for each block, the provisional ids of the block and a margin around it (as deep
   as the longest offset) are read back with the block's affinities. Affinity edges that
   cross the block's faces go to the segmenter's stitching rule; nearest-neighbour edges
   between different ids (inside and across faces) form the region graph for merging small
   segments. Both are reduced to id pairs per block, so only ids travel between blocks.
3. Relabel: stitching joins ids across blocks (connected components: exact, cc's rule,
   or a mutex watershed on the block graph: mws's approximation), small segments are merged
   on the region graph of the stitched ids, ids are numbered 1..K, and each block of the
   output is rewritten through that table.

Every pair crosses a face exactly once (it belongs to the block of its first voxel), so no
pair is counted twice. See emrun.segment.cc and emrun.segment.mws for the stitching rules.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import UserError
from ..geometry import BlockGrid, Coordinate, Roi, box_of, local_slices, slices, zyx
from .affinities import Offset, check_offsets, to_float
from .base import Segmenter
from .boxes import crossing
from .graph import Edges, compact_lut, merge_small
from .pipeline import (
    connected_fragments,
    first_voxel_ranks,
    provisional,
    region_edges,
    region_mask,
)

__all__ = ["BlockwiseResult", "segment_into"]


@dataclass(frozen=True)
class BlockwiseResult:
    """What a blockwise run did: grid, fragments before and segments after stitching."""

    block: tuple[int, int, int]
    halo: tuple[int, int, int]
    blocks: int
    fragments: int
    segments: int


class _Source:
    """Reads float32 affinities (and a bool mask) of a box from arrays or volumes."""

    def __init__(self, affs: Any, mask: Any | None) -> None:
        self.affs, self.mask = affs, mask
        # a Volume's name for its values' problems (an array is "affinities")
        self.name = str(affs) if hasattr(affs, "read") else "affinities"

    def read(self, box: Roi, with_mask: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        affs = to_float(np.asarray(_read(self.affs, box)), self.name)
        if self.mask is None or not with_mask:
            return affs, None
        return affs, region_mask(_read(self.mask, box), affs.shape[1:])


def _read(array: Any, box: Roi) -> np.ndarray:
    """A spatial box of a Volume or an array, leading (channel) axes whole."""
    return array.read(box) if hasattr(array, "read") else array[(..., *slices(box))]


def segment_into(out: Any, affs: Any, offsets: Sequence[Offset], segmenter: Segmenter, *,
                 mask: Any | None = None, block: tuple[int, int, int],
                 on_block: Callable[[str, int, int], None] | None = None) -> BlockwiseResult:
    """Segment ``affs`` (c, z, y, x; an array or a Volume, uint8 or float) block by block
    into ``out`` (z, y, x uint64; a numpy or zarr array, written in place).

    ``mask`` (z, y, x or 1, z, y, x; non-zero and not NaN inside; array or Volume) or
    None. ``on_block(pass, done, total)`` reports progress.
    """
    shape = tuple(int(n) for n in affs.shape[1:])
    source = _Source(affs, mask)
    check_offsets(offsets, int(affs.shape[0]), source.name, shape)
    _check_mask(mask, shape)
    block = zyx(max(1, min(int(b), n)) for b, n in zip(block, shape, strict=True))
    grid = BlockGrid(box_of(shape), block)
    blocks = grid.indices()
    if len(blocks) > 1 and not segmenter.blockwise:
        raise UserError(f"segmenter {segmenter.spec.type} runs in memory only; this volume "
                        f"needs {len(blocks)} blocks of {list(block)}: use mws or cc")
    halo = segmenter.halo(offsets) if len(blocks) > 1 else (0, 0, 0)

    sizes = [np.zeros(1, np.int64)]
    firsts = [np.full(1, -1, np.int64)]  # each fragment's first voxel in the volume
    count = 0
    for i, index in enumerate(blocks):
        core, ext = grid.box(index), grid.box(index, context=halo)
        block_affs, block_mask = source.read(ext)
        raw = segmenter.fragments(block_affs, offsets, block_mask)
        crop = local_slices(core, ext.offset)
        cut = connected_fragments(raw[crop]) if ext != core else raw[crop]
        labels, k = provisional(cut, None if block_mask is None else block_mask[crop])
        sizes.append(np.bincount(labels.ravel().astype(np.int64), minlength=k + 1)[1:])
        if segmenter.min_size > 1:
            firsts.append(first_voxel_ranks(labels, core, shape)[1:])
        labels[labels != 0] += np.uint64(count)
        out[slices(core)] = labels
        count += k
        _report(on_block, "segment", i + 1, len(blocks))
    fragments = count
    size = np.concatenate(sizes)

    graph = segmenter.min_size > 1
    faces = len(blocks) > 1
    region_parts: list[Edges] = []
    face_parts: list[Edges] = []
    apart_parts: list[Edges] = []  # ids adjacent inside one block (segmenter.keeps_apart)
    if graph or faces:
        margin = tuple(max(abs(o[a]) for o in offsets) for a in range(3))
        for i, index in enumerate(blocks):
            core, region = grid.box(index), grid.box(index, context=margin)
            labels = np.asarray(out[slices(region)])
            block_affs, _ = source.read(core, with_mask=False)
            if graph:
                region_parts.append(region_edges(labels, region, core, block_affs, offsets))
            if faces:
                face_parts.extend(_face_edges(segmenter, labels, region, core, block_affs,
                                              offsets, grid.total))
            if faces and segmenter.keeps_apart:
                inside = labels[local_slices(core, region.offset)]
                apart_parts.append(region_edges(inside, core, core, block_affs, offsets))
            _report(on_block, "edges", i + 1, len(blocks))

    if not faces:
        table = np.arange(count + 1, dtype=np.int64)
    elif segmenter.keeps_apart:
        table = segmenter.stitch(Edges.concat(face_parts), count,
                                 apart=Edges.concat(apart_parts))
    else:
        table = segmenter.stitch(Edges.concat(face_parts), count)
    if graph:
        root_sizes = np.bincount(table, weights=size, minlength=count + 1).astype(np.int64)
        rank = np.full(count + 1, np.iinfo(np.int64).max, np.int64)
        np.minimum.at(rank, table, np.concatenate(firsts))  # a segment's: its fragments' first
        merged = merge_small(root_sizes, Edges.concat(region_parts).mapped(table),
                             segmenter.min_size, rank=rank)
        table = merged[table]
    final = compact_lut(table[1:], count)[table].astype(np.uint64)
    for i, core in enumerate(grid.boxes()):
        out[slices(core)] = final[np.asarray(out[slices(core)])]
        _report(on_block, "relabel", i + 1, len(blocks))
    return BlockwiseResult(block=block, halo=halo, blocks=len(blocks),
                           fragments=fragments, segments=int(final.max(initial=0)))


def _check_mask(mask: Any | None, shape: tuple[int, ...]) -> None:
    """A mask of the affinities' volume (a leading axis of 1 allowed): blocks of another
    shape's mask would be read from other places, or cut short."""
    if mask is None:
        return
    have = tuple(int(n) for n in mask.shape)
    if have != shape and have != (1, *shape):
        raise UserError(f"mask has shape {list(have)} but the affinities' volume is "
                        f"{list(shape)}")


def _report(on_block: Callable[[str, int, int], None] | None, stage: str, done: int,
            total: int) -> None:
    if on_block is not None:
        on_block(stage, done, total)


def _face_edges(segmenter: Segmenter, labels: np.ndarray, region: Roi, core: Roi,
                affs: np.ndarray, offsets: Sequence[Offset], total: Roi) -> list[Edges]:
    """The segmenter's reduction of the affinity edges leaving ``core`` through its faces."""
    parts = []
    for c, offset in enumerate(offsets):
        for piece in crossing(core, offset, total):
            u = labels[local_slices(piece, region.offset)].ravel()
            v = labels[local_slices(piece.shift(Coordinate(offset)), region.offset)].ravel()
            p = affs[c][local_slices(piece, core.offset)].ravel()
            keep = (u != 0) & (v != 0)
            if keep.any():
                parts.append(segmenter.face_edges(u[keep], v[keep], p[keep], offset))
    return parts
