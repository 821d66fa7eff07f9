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

import numba
import numpy as np

from ...geometry import Roi, local_slices
from ..affinities import Offset
from ..pipeline import nearest_pairs

__all__ = ["BINS", "BlockGraph", "block_graph", "dense_ids", "histogram_quantile", "row_quantile"]

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
    margin), ``affs`` (float32, c, z, y, x) cover ``core``; ids 0 take no part. Ids are
    first made dense (`dense_ids`), so pairs are single int64 keys."""
    ids, dense = dense_ids(labels, labels[local_slices(core, region.offset)])
    n = ids.size
    inner = dense[local_slices(core, region.offset)].ravel()
    sizes = np.bincount(inner, minlength=n)
    centres = np.zeros((n, 3))
    for axis, grid in enumerate(np.indices(core.shape, dtype=np.int32)):
        centres[:, axis] = np.bincount(inner, weights=grid.ravel(), minlength=n)
    present = (sizes > 0) & (ids != 0)
    centres = centres[present] / sizes[present, None] + np.asarray(core.offset, np.float64)

    keys, values = [], []
    for u, v, p in nearest_pairs(dense, region, core, affs, offsets):
        pick = (u != v) & (ids[u] != 0) & (ids[v] != 0)
        u, v = u[pick], v[pick]
        keys.append(np.minimum(u, v) * n + np.maximum(u, v))
        values.append(p[pick])
    ids_out, sizes_out = ids[present], sizes[present].astype(np.int64)
    if not keys or not sum(k.size for k in keys):
        empty = np.zeros(0, np.uint64)
        return BlockGraph(ids_out, sizes_out, centres, empty, empty, np.zeros(0),
                          np.zeros(0, np.int64), np.zeros((0, BINS), np.uint32))
    pairs, index = np.unique(np.concatenate(keys), return_inverse=True)
    index = index.reshape(-1)
    p = np.concatenate(values).astype(np.float64)
    total = np.bincount(index, weights=p, minlength=pairs.size)
    count = np.bincount(index, minlength=pairs.size).astype(np.int64)
    bins = np.minimum((p * BINS).astype(np.int64), BINS - 1)
    hist = np.bincount(index * BINS + bins, minlength=pairs.size * BINS)
    return BlockGraph(ids_out, sizes_out, centres, ids[pairs // n], ids[pairs % n], total,
                      count, hist.reshape(-1, BINS).astype(np.uint32))


def dense_ids(labels: np.ndarray, core: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The ids of ``labels`` (sorted) and each voxel's position among them. A block's own
    fragments (``core``, a view into ``labels``) are numbered contiguously, so they map by
    a subtraction; only the margin's few other ids (and 0) are sorted: a full sort of the
    region was the graph step's largest cost."""
    found = core[core != 0]
    if found.size == 0:
        ids, inverse = np.unique(labels, return_inverse=True)
        return ids, inverse.reshape(labels.shape).astype(np.int64)
    low, high = found.min(), found.max()
    span = int(high - low) + 1
    if span > found.size or not np.bincount((found - low).astype(np.int64)).all():
        ids, inverse = np.unique(labels, return_inverse=True)  # not contiguous: sort all
        return ids, inverse.reshape(labels.shape).astype(np.int64)
    own = (labels >= low) & (labels <= high)
    others = np.unique(labels[~own])
    ids = np.concatenate([others, np.arange(low, high + 1, dtype=labels.dtype)])
    dense = np.empty(labels.shape, np.int64)
    dense[own] = (labels[own] - low).astype(np.int64) + others.size
    dense[~own] = np.searchsorted(others, labels[~own])
    order = np.argsort(ids, kind="stable")
    if np.any(order != np.arange(order.size)):  # margin ids above the block's: re-rank
        rank = np.empty_like(order)
        rank[order] = np.arange(order.size)
        ids, dense = ids[order], rank[dense]
    return ids, dense


def histogram_quantile(hist: np.ndarray, q: float) -> np.ndarray:
    """The ``q`` quantile (0..1) of the affinities each histogram row (last axis, ``BINS``
    counts) counts, interpolated linearly inside its bin."""
    hist = np.asarray(hist)
    rows = np.ascontiguousarray(hist.reshape(-1, BINS), np.int64)
    return _quantiles(rows, float(q)).reshape(hist.shape[:-1])


@numba.njit(cache=True, nogil=True)
def _quantiles(rows: np.ndarray, q: float) -> np.ndarray:  # pragma: no cover - compiled
    out = np.empty(rows.shape[0], np.float64)
    for i in range(rows.shape[0]):
        out[i] = row_quantile(rows[i], q)
    return out


@numba.njit(cache=True, nogil=True, inline="always")
def row_quantile(row: np.ndarray, q: float) -> float:  # pragma: no cover - compiled
    """One histogram's ``q`` quantile; compiled, so the agglomeration re-scores a merged edge
    without leaving its loop. The counts are integers, so every sum is exact."""
    total = 0.0
    for k in range(BINS):
        total += row[k]
    target = q * total
    index, below = 0, 0.0  # index: the first bin whose cumulative count reaches the target
    while index < BINS - 1 and below + row[index] < target:
        below += row[index]
        index += 1
    inside = float(row[index])
    frac = min(max((target - below) / inside, 0.0), 1.0) if inside > 0 else 0.5
    return (index + frac) / BINS
