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
from ..affinities import Offset, is_nearest
from ..compiled import distinct_partners

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
    first made dense (`dense_ids`), so that the compiled loops index arrays by fragment."""
    inner = local_slices(core, region.offset)
    ids, dense = dense_ids(labels, labels[inner])
    sizes, sums = _node_moments(np.ascontiguousarray(dense[inner]), ids.size)
    present = (sizes > 0) & (ids != 0)
    centres = sums[present] / sizes[present, None] + np.asarray(core.offset, np.float64)
    channels = [c for c, offset in enumerate(offsets) if is_nearest(offset)]
    u, v, total, count, hist = _pair_statistics(
        np.ascontiguousarray(dense), np.array([s.start for s in inner], np.int64),
        np.ascontiguousarray(affs, dtype=np.float32), np.array(channels, np.int64),
        np.array([offsets[c] for c in channels], np.int64).reshape(-1, 3), ids != 0)
    return BlockGraph(ids[present], sizes[present], centres, ids[u], ids[v], total, count,
                      hist)


@numba.njit(cache=True, nogil=True)
def _node_moments(dense: np.ndarray, n: int
                  ) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover - compiled
    """Each dense id's voxel count in ``dense`` and the sums of its voxels' z, y, x."""
    sizes = np.zeros(n, np.int64)
    sums = np.zeros((n, 3), np.float64)
    for z in range(dense.shape[0]):
        for y in range(dense.shape[1]):
            for x in range(dense.shape[2]):
                d = dense[z, y, x]
                sizes[d] += 1
                sums[d, 0] += z
                sums[d, 1] += y
                sums[d, 2] += x
    return sizes, sums


@numba.njit(cache=True, nogil=True)
def _pair_statistics(dense: np.ndarray, low: np.ndarray, affs: np.ndarray,
                     channels: np.ndarray, steps: np.ndarray, real: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                                np.ndarray]:  # pragma: no cover - compiled
    """The pairs (u < v, dense ids, sorted) of different real fragments joined by an edge
    of one of ``channels`` (step ``steps[i]``) whose first voxel lies in the core (``affs``'
    box, at ``low`` in ``dense``) and whose second lies in ``dense``; per pair the summed
    affinity, the count and the histogram. Edges are bucketed by u (a counting sort that
    keeps their order, so each sum adds in the order numpy's bincount did), then each
    bucket's partners are gathered through one scratch slot per id: linear, no sort of
    the edges."""
    n = real.shape[0]
    shape, core = dense.shape, affs.shape[1:]
    start = np.zeros(n + 1, np.int64)
    for sweep in range(2):  # the first counts each u's edges, the second places them
        if sweep == 1:
            for k in range(n):
                start[k + 1] += start[k]
            partner = np.empty(start[n], np.int64)
            value = np.empty(start[n], np.float64)
            fill = start[:n].copy()
        for i in range(channels.shape[0]):
            lo, hi = np.empty(3, np.int64), np.empty(3, np.int64)
            for a in range(3):
                lo[a] = max(low[a], -steps[i, a])
                hi[a] = min(low[a] + core[a], shape[a] - steps[i, a])
            for z in range(lo[0], hi[0]):
                for y in range(lo[1], hi[1]):
                    for x in range(lo[2], hi[2]):
                        a = dense[z, y, x]
                        b = dense[z + steps[i, 0], y + steps[i, 1], x + steps[i, 2]]
                        if a == b or not (real[a] and real[b]):
                            continue
                        if b < a:
                            a, b = b, a
                        if sweep == 0:
                            start[a + 1] += 1
                        else:
                            partner[fill[a]] = b
                            value[fill[a]] = affs[channels[i], z - low[0], y - low[1],
                                                  x - low[2]]
                            fill[a] += 1
    v, first, slot = distinct_partners(start, partner, n)  # u's pairs: first[u]:first[u + 1]
    m = first[n]
    u = np.empty(m, np.int64)
    total, count = np.zeros(m, np.float64), np.zeros(m, np.int64)
    hist = np.zeros((m, BINS), np.uint32)
    for a in range(n):
        for j in range(first[a], first[a + 1]):
            u[j] = a
            slot[v[j]] = j
        for k in range(start[a], start[a + 1]):
            j = slot[partner[k]]
            total[j] += value[k]
            count[j] += 1
            hist[j, min(int(value[k] * BINS), BINS - 1)] += 1
        for j in range(first[a], first[a + 1]):
            slot[v[j]] = -1
    return u, v[:m].copy(), total, count, hist


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
