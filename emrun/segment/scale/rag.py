"""The region adjacency graph of one block, as arrays ready for the graph database.

Nodes: each fragment of the block, its voxel count and centre (voxels, z, y, x). Edges: each
pair of different fragments joined by a nearest-neighbour affinity edge whose first voxel v
lies in the block (its partner v + offset may lie in a neighbouring block: the block reads
a one-voxel margin of fragments around itself), with the sum and count of the affinities
and their histogram (``BINS`` bins over [0, 1]) from which quantiles are read. Every voxel
pair belongs to exactly one block, so summing the blocks' statistics of a pair gives the
whole volume's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ...geometry import Coordinate, Roi, local_slices
from ..affinities import Offset, is_nearest
from ..boxes import shifted_inside

__all__ = ["BINS", "BlockGraph", "block_graph", "histogram_quantile"]

BINS = 32
"""Histogram bins of an edge's affinities; a quantile is read to 1/BINS / 2 on average."""


@dataclass(frozen=True)
class BlockGraph:
    """One block's nodes and edges (edges ``u < v``, unique)."""

    ids: np.ndarray  # uint64
    sizes: np.ndarray  # int64
    centres: np.ndarray  # float64 (n, 3), voxels
    u: np.ndarray  # uint64
    v: np.ndarray  # uint64
    total: np.ndarray  # float64: summed affinity
    count: np.ndarray  # int64
    hist: np.ndarray  # uint32 (m, BINS)


def block_graph(labels: np.ndarray, region: Roi, core: Roi, affs: np.ndarray,
                offsets: Sequence[Offset]) -> BlockGraph:
    """The graph of ``core``: ``labels`` (fragment ids) cover ``region`` (the core and a
    margin), ``affs`` (float32, c, z, y, x) cover ``core``; ids 0 take no part."""
    inner = labels[local_slices(core, region.offset)]
    ids, inverse, sizes = np.unique(inner, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    grids = np.indices(inner.shape, dtype=np.float64).reshape(3, -1)
    sums = np.stack([np.bincount(inverse, weights=g, minlength=ids.size) for g in grids], 1)
    centres = sums / sizes[:, None] + np.asarray(core.offset, np.float64)
    keep = ids != 0
    ids, sizes, centres = ids[keep], sizes[keep].astype(np.int64), centres[keep]

    us, vs, ps = [], [], []
    for c, offset in enumerate(offsets):
        if not is_nearest(offset):
            continue
        box = shifted_inside(core, region, offset)
        if box is None:
            continue
        u = labels[local_slices(box, region.offset)]
        v = labels[local_slices(box.shift(Coordinate(offset)), region.offset)]
        p = affs[c][local_slices(box, core.offset)]
        pick = (u != v) & (u != 0) & (v != 0)
        us.append(u[pick])
        vs.append(v[pick])
        ps.append(p[pick])
    if not us or not sum(a.size for a in us):
        empty = np.zeros(0, np.uint64)
        return BlockGraph(ids, sizes, centres, empty, empty, np.zeros(0), np.zeros(0, np.int64),
                          np.zeros((0, BINS), np.uint32))
    u, v, p = np.concatenate(us), np.concatenate(vs), np.concatenate(ps).astype(np.float64)
    lo, hi = np.minimum(u, v), np.maximum(u, v)
    pairs, index = np.unique(np.stack([lo, hi], axis=1), axis=0, return_inverse=True)
    index = index.reshape(-1)
    total = np.bincount(index, weights=p, minlength=len(pairs))
    count = np.bincount(index, minlength=len(pairs)).astype(np.int64)
    bins = np.minimum((p * BINS).astype(np.int64), BINS - 1)
    hist = np.bincount(index * BINS + bins, minlength=len(pairs) * BINS)
    return BlockGraph(ids, sizes, centres, pairs[:, 0], pairs[:, 1], total, count,
                      hist.reshape(-1, BINS).astype(np.uint32))


def histogram_quantile(hist: np.ndarray, q: float) -> np.ndarray:
    """The ``q`` quantile (0..1) of the affinities each histogram row counts, interpolated
    linearly inside its bin."""
    hist = np.asarray(hist, np.float64)
    counts = hist.sum(axis=-1, keepdims=True)
    cumulative = np.cumsum(hist, axis=-1)
    target = q * counts
    bin_index = np.minimum((cumulative < target).sum(axis=-1), BINS - 1)
    below = np.take_along_axis(cumulative, bin_index[..., None], -1)[..., 0] - \
        np.take_along_axis(hist, bin_index[..., None], -1)[..., 0]
    inside = np.take_along_axis(hist, bin_index[..., None], -1)[..., 0]
    frac = np.where(inside > 0, (target[..., 0] - below) / np.maximum(inside, 1), 0.5)
    return (bin_index + np.clip(frac, 0, 1)) / BINS
