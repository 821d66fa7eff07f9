"""Graphs over segment ids: compact relabelling, union of id pairs, region adjacency with the
affinity between neighbours, and merging of small segments.

These work on ids, not voxels, so the same code serves a whole volume in memory and a
volume processed block by block (where ids from all blocks meet only here).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

__all__ = ["Edges", "compact", "compact_lut", "merge_small", "union"]


@dataclass(frozen=True)
class Edges:
    """Id pairs ``u < v`` with a summed weight and a count per pair (aggregated: unique)."""

    u: np.ndarray
    v: np.ndarray
    total: np.ndarray
    count: np.ndarray

    @staticmethod
    def empty() -> Edges:
        ids = np.zeros(0, np.int64)
        return Edges(ids, ids, np.zeros(0, np.float64), ids)

    @staticmethod
    def aggregate(u: np.ndarray, v: np.ndarray, weight: np.ndarray,
                  count: np.ndarray | None = None) -> Edges:
        """Sum ``weight`` (and ``count``, default 1 each) over equal unordered pairs; pairs
        with ``u == v`` are dropped."""
        u = np.asarray(u, np.int64)
        v = np.asarray(v, np.int64)
        keep = u != v
        lo, hi = np.minimum(u, v)[keep], np.maximum(u, v)[keep]
        weight = np.asarray(weight, np.float64)[keep]
        count = np.ones(lo.size, np.int64) if count is None else np.asarray(count)[keep]
        if lo.size == 0:
            return Edges.empty()
        width = int(hi.max()) + 1
        if _compiled_pays(lo.size, width) and count.dtype.kind in "iub" and lo.min() >= 0:
            from .compiled import aggregate_pairs

            return Edges(*aggregate_pairs(lo, hi, weight, count.astype(np.int64), width))
        if width < 3_000_000_000:  # one int64 key per pair: much faster than rows
            keys, inverse = np.unique(lo * width + hi, return_inverse=True)
            first, second = keys // width, keys % width
        else:
            pairs, inverse = np.unique(np.stack([lo, hi], axis=1), axis=0,
                                       return_inverse=True)
            first, second = pairs[:, 0], pairs[:, 1]
        inverse = inverse.reshape(-1)
        total = np.bincount(inverse, weights=weight, minlength=first.size)
        counts = np.bincount(inverse, weights=count, minlength=first.size).astype(np.int64)
        return Edges(first, second, total, counts)

    @staticmethod
    def concat(parts: Sequence[Edges]) -> Edges:
        """All parts as one, re-aggregated (a pair may come from several blocks)."""
        parts = [p for p in parts if p.u.size]
        if not parts:
            return Edges.empty()
        return Edges.aggregate(np.concatenate([p.u for p in parts]),
                               np.concatenate([p.v for p in parts]),
                               np.concatenate([p.total for p in parts]),
                               np.concatenate([p.count for p in parts]))

    def mapped(self, lut: np.ndarray) -> Edges:
        """The same edges between ``lut[u]`` and ``lut[v]``, re-aggregated."""
        return Edges.aggregate(lut[self.u], lut[self.v], self.total, self.count)

    @property
    def mean(self) -> np.ndarray:
        return self.total / np.maximum(self.count, 1)


def compact_lut(ids: np.ndarray, top: int) -> np.ndarray:
    """A lookup table mapping each id in ``ids`` (0..top) to 1..K in increasing id order, and
    0 to 0."""
    present = np.zeros(top + 1, bool)
    present[ids] = True
    present[0] = False
    lut = np.cumsum(present, dtype=np.int64)
    lut[~present] = 0
    return lut


def compact(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Labels renumbered 1..K in increasing order of the old ids (0 stays 0), as uint64,
    and K. Deterministic, so equal inputs give equal ids."""
    if labels.size == 0:
        return labels.astype(np.uint64), 0
    top = int(labels.max())
    if top <= 4 * labels.size + 2**20:  # a lookup table is cheaper than sorting
        lut = compact_lut(labels.ravel(), top).astype(np.uint64)
        return lut[labels], int(lut.max())
    ids, inverse = np.unique(labels, return_inverse=True)
    start = 0 if ids[0] == 0 else 1
    return (inverse.reshape(labels.shape) + start).astype(np.uint64), int(ids.size - (1 - start))


def union(count: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Connected components of ids 0..count joined by the pairs (u, v): a table mapping each
    id to the smallest id of its component (so 0 stays 0 unless joined, which callers
    avoid)."""
    n = count + 1
    if u.size == 0:
        return np.arange(n, dtype=np.int64)
    graph = coo_matrix((np.ones(u.size, np.int8), (u, v)), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    smallest = np.full(component.max() + 1, n, dtype=np.int64)
    np.minimum.at(smallest, component, np.arange(n, dtype=np.int64))
    return smallest[component]


def merge_small(sizes: np.ndarray, edges: Edges, min_size: int,
                rank: np.ndarray | None = None) -> np.ndarray:
    """Merge every segment smaller than ``min_size`` into the neighbour it shares the highest
    mean affinity with, repeatedly, until none is small or a small one has no neighbour left.

    ``sizes[i]``: voxels of id i (index 0 unused); ``edges``: adjacent ids with summed
    nearest-neighbour affinity. Edges are taken in decreasing mean affinity and joined when
    either side is still small, like Kruskal's algorithm with a size condition; a small
    segment thus joins its most strongly connected neighbour, and chains of small ones grow
    until they reach ``min_size``. Ties (common with uint8 affinities) go by the pair's
    ``rank``s, lower first (default: the ids); a rank that does not depend on how ids were
    numbered, such as each segment's first voxel, makes the result the same for any
    numbering (in memory or block by block). Returns a table id -> representative.
    """
    n = sizes.size
    parent = np.arange(n, dtype=np.int64)
    if min_size <= 1 or edges.u.size == 0:
        return parent
    small = sizes < min_size
    keep = small[edges.u] | small[edges.v]
    u, v, mean = edges.u[keep], edges.v[keep], edges.mean[keep]
    key = np.arange(n, dtype=np.int64) if rank is None else np.asarray(rank, np.int64)
    low, high = np.minimum(key[u], key[v]), np.maximum(key[u], key[v])
    order = _by_mean_then_ranks(mean, low, high)
    if _compiled_pays(order.size, n):
        from .compiled import merge_loop

        table = merge_loop(u[order].astype(np.int64), v[order].astype(np.int64),
                           sizes.astype(np.int64), int(min_size))
    else:
        table = _merge_loop(u[order], v[order], sizes, min_size)
    while True:  # pointer jumping to the roots, vectorised
        jumped = table[table]
        if np.array_equal(jumped, table):
            return table
        table = jumped


def _by_mean_then_ranks(mean: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """``np.lexsort((high, low, -mean))``: the edges by decreasing mean, ties by (low,
    high), then by position. Two stable sorts (the rank pair packed into one int64 key
    where it fits) give the same order at a third to half of lexsort's time."""
    width = int(high.max(initial=0)) + 1
    if low.size == 0 or int(low.min()) < 0 or width > 3_037_000_499:  # width^2 >= 2^63
        return np.lexsort((high, low, -mean))
    by_ranks = np.argsort(low * width + high, kind="stable")
    return by_ranks[np.argsort(-mean[by_ranks], kind="stable")]


def _merge_loop(u: np.ndarray, v: np.ndarray, sizes: np.ndarray, min_size: int
                ) -> np.ndarray:
    """`merge_small`'s union loop in Python (`compiled.merge_loop` for large graphs):
    each id's parent."""
    n = sizes.size
    roots = list(range(n))
    size = sizes.astype(np.int64).tolist()

    def find(i: int) -> int:
        while roots[i] != i:
            roots[i] = roots[roots[i]]
            i = roots[i]
        return i

    for a, b in zip(u.tolist(), v.tolist(), strict=True):
        ra, rb = find(a), find(b)
        if ra == rb or (size[ra] >= min_size and size[rb] >= min_size):
            continue
        if size[ra] < size[rb] or (size[ra] == size[rb] and rb < ra):
            ra, rb = rb, ra
        roots[rb] = ra
        size[ra] += size[rb]
    return np.array(roots, dtype=np.int64)


COMPILED_FROM = 1_000_000
"""Edges from which the compiled loops (`emrun.segment.compiled`) take over, a tenth of
that once numba is loaded: they save 0.25 (sums) to 1 (merges) microseconds per edge,
and starting numba and loading them costs about 0.6 s once in a process."""


def _compiled_pays(edges: int, ids: int) -> bool:
    """Whether a graph of ``edges`` pairs over ids below ``ids`` goes to the compiled
    loops: large enough, and with ids dense enough for tables indexed by id."""
    start = COMPILED_FROM // 10 if "numba" in sys.modules else COMPILED_FROM
    return edges >= start and ids <= 4 * edges + 2**20
