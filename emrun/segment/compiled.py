"""Compiled (numba) forms of the per-edge loops in `emrun.segment.graph`, for large graphs.

Each gives bit for bit what its numpy or Python original gives: the same pairs in the same
order, sums added in the same order (so float totals round alike), the same merges. They
live apart so that importing the segmenters does not import numba; `graph` imports this
module only once a graph is large enough for the compiled loop to pay for numba's start.
"""

from __future__ import annotations

import numba
import numpy as np

from ..unionfind import find

__all__ = ["aggregate_pairs", "distinct_partners", "merge_loop"]


@numba.njit(cache=True, nogil=True, inline="always")
def _sort_small(values: np.ndarray, begin: int, end: int) -> None:  # pragma: no cover
    """Sort ``values[begin:end]`` in place: by insertion when short (most buckets hold a
    few partners; np.sort allocated for each), else np.sort."""
    if end - begin > 32:
        values[begin:end] = np.sort(values[begin:end])
        return
    for i in range(begin + 1, end):
        item = values[i]
        j = i - 1
        while j >= begin and values[j] > item:
            values[j + 1] = values[j]
            j -= 1
        values[j + 1] = item


@numba.njit(cache=True, nogil=True)
def distinct_partners(start: np.ndarray, partner: np.ndarray, width: int
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # pragma: no cover
    """Each bucket's distinct partners, sorted: bucket ``a`` holds ``partner[start[a]:
    start[a + 1]]`` (ids below ``width``), its distinct ones come back as
    ``second[first[a]:first[a + 1]]``; found through one scratch slot per id, returned
    (all -1) for the caller's next pass over the pairs."""
    slot = np.full(width, -1, np.int64)
    second = np.empty(partner.shape[0], np.int64)
    first = np.zeros(width + 1, np.int64)
    for a in range(width):
        pairs = first[a]
        for k in range(start[a], start[a + 1]):
            if slot[partner[k]] < 0:
                slot[partner[k]] = 0
                second[pairs] = partner[k]
                pairs += 1
        _sort_small(second, first[a], pairs)
        for j in range(first[a], pairs):
            slot[second[j]] = -1
        first[a + 1] = pairs
    return second, first, slot


@numba.njit(cache=True, nogil=True)
def aggregate_pairs(lo: np.ndarray, hi: np.ndarray, weight: np.ndarray, count: np.ndarray,
                    width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                         np.ndarray]:  # pragma: no cover - compiled
    """The distinct pairs (``lo < hi``, ids below ``width``) sorted by (lo, hi), with the
    summed ``weight`` and ``count`` of each. Pairs are bucketed by ``lo`` (a counting sort
    that keeps their order), so each sum adds its terms in input order, as numpy's
    bincount over the pairs' ranks does; each bucket's distinct partners are found through
    one scratch slot per id and sorted: linear but for the small sorts."""
    m = lo.shape[0]
    start = np.zeros(width + 1, np.int64)
    for k in range(m):
        start[lo[k] + 1] += 1
    for a in range(width):
        start[a + 1] += start[a]
    fill = start[:width].copy()
    partner = np.empty(m, np.int64)
    order = np.empty(m, np.int64)  # the input position of each bucketed pair
    for k in range(m):
        j = fill[lo[k]]
        partner[j] = hi[k]
        order[j] = k
        fill[lo[k]] += 1
    second, first, slot = distinct_partners(start, partner, width)
    n = first[width]
    low = np.empty(n, np.int64)
    total = np.zeros(n, np.float64)
    counts = np.zeros(n, np.int64)
    for a in range(width):
        for j in range(first[a], first[a + 1]):
            low[j] = a
            slot[second[j]] = j
        for k in range(start[a], start[a + 1]):
            j = slot[partner[k]]
            total[j] += weight[order[k]]
            counts[j] += count[order[k]]
        for j in range(first[a], first[a + 1]):
            slot[second[j]] = -1
    return low, second[:n].copy(), total, counts


@numba.njit(cache=True, nogil=True)
def merge_loop(u: np.ndarray, v: np.ndarray, size: np.ndarray,
               min_size: int) -> np.ndarray:  # pragma: no cover - compiled
    """`emrun.segment.graph.merge_small`'s union loop over the edges in their order: each
    pair joins when either side is below ``min_size``, the larger side's root (the lower
    id on a tie) staying. ``size`` is updated in place; returns each id's parent."""
    roots = np.arange(size.shape[0], dtype=np.int64)
    for k in range(u.shape[0]):
        ra = find(roots, u[k])
        rb = find(roots, v[k])
        if ra == rb or (size[ra] >= min_size and size[rb] >= min_size):
            continue
        if size[ra] < size[rb] or (size[ra] == size[rb] and rb < ra):
            ra, rb = rb, ra
        roots[rb] = ra
        size[ra] += size[rb]
    return roots
