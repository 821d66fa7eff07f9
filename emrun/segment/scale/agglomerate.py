"""Hierarchical agglomeration of the whole region graph, as waterz does on voxels: the pair
of regions with the lowest score (1 - their mean affinity, or 1 - its 85th percentile) merges
first; the merged region's edges to a common neighbour are summed (affinities, counts,
histograms) and re-scored; merging goes on while the lowest score is below the threshold.

Scores change as regions grow, so the merges do not come in increasing order of score:
the segmentation at a threshold t is the merges done until the first one scoring t or more.
One pass up to the largest threshold therefore gives every threshold's segmentation (as
waterz's sequence of thresholds does). Ties break by edge order, so runs are deterministic.

Blockwise, each block agglomerates the graph around it to the end and records, for each edge
it owns, its join level: the largest score of the merges up to the one that joined the
edge's ends (infinite if none did). A threshold's segments are then the connected components
of the edges whose level is below it (`segments_from_levels`): with one block holding the
whole graph, exactly the segments of the global agglomeration, and with many, one pass over
an edge list instead of the whole graph in one process's memory.
"""

from __future__ import annotations

import functools
import heapq
from collections.abc import Sequence
from dataclasses import dataclass

import numba
import numpy as np

from ..graph import Edges, merge_small, union
from .abandon import abandonable
from .graphdb import GraphData
from .rag import BINS, row_quantile

__all__ = ["QUANTILE", "Merges", "agglomerate", "join_levels", "merge_sequence",
           "segments_from_levels"]

QUANTILE = 0.85
"""The quantile the ``p85`` scoring reads from the edge histograms."""

STOP_EVERY = 4096
"""The compiled merge loop reads its stop flag once per this many edges popped."""


def agglomerate(graph: GraphData, thresholds: Sequence[float], scoring: str,
                min_size: int = 0) -> list[np.ndarray]:
    """For each threshold, the segment (1..K) of every node of ``graph`` (in its id order)."""
    n = graph.ids.size
    merges = merge_sequence(graph, max(thresholds), scoring)
    results = []
    for threshold in thresholds:
        above = np.flatnonzero(merges.score >= threshold)
        k = int(above[0]) if above.size else len(merges)
        parent = np.arange(n, dtype=np.int64)
        parent[merges.gone[:k]] = merges.kept[:k]
        while True:  # pointer jumping to the roots
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                break
            parent = jumped
        results.append(_numbered(parent, graph, min_size))
    return results


def segments_from_levels(graph: GraphData, u: np.ndarray, v: np.ndarray, level: np.ndarray,
                         thresholds: Sequence[float], min_size: int = 0) -> list[np.ndarray]:
    """For each threshold, the segment (1..K) of every node of ``graph`` (its ids and sizes;
    its edges only if ``min_size`` > 1): the components of the edges ``u``-``v`` (node
    positions) whose join ``level`` is below the threshold."""
    n = graph.ids.size
    results = []
    for threshold in thresholds:
        below = level < threshold
        roots = union(max(n - 1, 0), u[below], v[below])[:n]
        results.append(_numbered(roots, graph, min_size))
    return results


def _numbered(roots: np.ndarray, graph: GraphData, min_size: int) -> np.ndarray:
    """Segments 1..K from each node's root, after small segments merge into neighbours.
    Each segment is first named by its smallest node, whichever node the agglomeration kept
    as its root: `merge_small` breaks ties by that name, and the global agglomeration (the
    node a merge kept) and the blockwise one (the smallest node) named a segment apart, so
    one block gave another result than global where mean affinities tie (uint8)."""
    if roots.size:
        smallest = np.full(roots.size, roots.size, np.int64)
        np.minimum.at(smallest, roots, np.arange(roots.size, dtype=np.int64))
        roots = smallest[roots]
    if min_size > 1 and roots.size:
        roots = _merge_small(roots, graph, min_size)
    _, segment = np.unique(roots, return_inverse=True)
    return segment.reshape(-1).astype(np.int64) + 1


def _merge_small(roots: np.ndarray, graph: GraphData, min_size: int) -> np.ndarray:
    """Segments below ``min_size`` voxels merged into their best neighbour (by mean
    affinity), as every emrun segmenter does (emrun.segment.graph.merge_small)."""
    sizes = np.bincount(roots, weights=graph.sizes, minlength=roots.size).astype(np.int64)
    edges = Edges.aggregate(roots[graph.u], roots[graph.v], graph.total, graph.count)
    table = merge_small(sizes, edges, min_size)
    return table[roots]


@dataclass(frozen=True)
class Merges:
    """The merges of an agglomeration in order: each one's score, the region that stays and
    the region merged into it (a region is named by one of its nodes, a position in the
    graph)."""

    score: np.ndarray  # float64
    kept: np.ndarray  # int64
    gone: np.ndarray  # int64

    def __len__(self) -> int:
        return int(self.score.size)


def merge_sequence(graph: GraphData, top: float, scoring: str) -> Merges:
    """Every merge until the first scoring ``top`` or more, in order. The compiled loop
    runs where a stop can leave it (`abandonable`: on a large graph it takes minutes, and
    a SIGTERM or Ctrl-C waited for it); a stop also tells it to end early."""
    quantile = scoring != "mean"
    hist = graph.hist if quantile else np.zeros((0, BINS), np.int64)
    stop = np.zeros(1, np.int64)
    score, kept, gone = abandonable(
        _merge_loop, int(graph.ids.size), np.asarray(graph.u, np.int64),
        np.asarray(graph.v, np.int64), np.array(graph.total, np.float64),
        np.array(graph.count, np.int64), np.array(hist, np.int64).reshape(-1, BINS),
        float(top), quantile, stop, on_abandon=functools.partial(stop.fill, 1))
    return Merges(score, kept, gone)


def join_levels(n: int, merges: Merges, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """For each edge ``u``-``v`` (node positions 0..n-1), the largest score of ``merges``
    up to the one that put its ends in one region; inf if none did."""
    return _join_levels(n, merges.score, merges.kept, merges.gone,
                        np.asarray(u, np.int64), np.asarray(v, np.int64))


@numba.njit(cache=True, nogil=True, inline="always")
def _edge_score(e: int, total: np.ndarray, count: np.ndarray, hist: np.ndarray,
                quantile: bool) -> float:  # pragma: no cover - compiled
    if quantile:
        return 1.0 - row_quantile(hist[e], QUANTILE)
    return 1.0 - total[e] / max(count[e], 1)


@numba.njit(cache=True, nogil=True)
def _merge_loop(n: int, u: np.ndarray, v: np.ndarray, total: np.ndarray, count: np.ndarray,
                hist: np.ndarray, top: float, quantile: bool, stop: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # pragma: no cover - compiled
    """The merges, compiled. ``total``, ``count`` and ``hist`` are updated in place. It ends
    early, its merges unfinished, once ``stop[0]`` is set (by a stopped caller that left it).

    A region's edges are a linked list of edge ends (end 2e + side of edge e), so the
    merged region's list joins the kept one's without copying; a list keeps the ends of
    edges that died since (skipped and dropped when the list is next walked). The region
    with fewer live neighbours is the one merged and walked. ``between`` maps a pair of
    regions to their edge; entries of regions merged away are never asked for again, so
    they are left in place."""
    m = u.shape[0]
    ends_u, ends_v = u.copy(), v.copy()
    alive = np.ones(m, np.bool_)
    version = np.zeros(m, np.int64)
    degree = np.zeros(n, np.int64)
    head = np.full(n, -1, np.int64)
    tail = np.full(n, -1, np.int64)
    after = np.full(2 * m, -1, np.int64)
    between = numba.typed.Dict.empty(numba.types.int64, numba.types.int64)
    heap = [(0.0, 0, 0)]  # (score, edge, version): typed by its first item
    heap.pop()
    for e in range(m):
        for end, node in ((2 * e, ends_u[e]), (2 * e + 1, ends_v[e])):
            degree[node] += 1
            if head[node] == -1:
                head[node] = end
            else:
                after[tail[node]] = end
            tail[node] = end
        between[min(ends_u[e], ends_v[e]) * n + max(ends_u[e], ends_v[e])] = e
        heap.append((_edge_score(e, total, count, hist, quantile), e, 0))
    heapq.heapify(heap)
    size = max(n - 1, 0)
    scores = np.empty(size, np.float64)
    kept = np.empty(size, np.int64)
    gone = np.empty(size, np.int64)
    done = 0
    popped = 0
    while len(heap) > 0:
        popped += 1
        if popped % STOP_EVERY == 0 and stop[0] != 0:
            break
        s, e, ver = heapq.heappop(heap)
        if not alive[e] or ver != version[e]:
            continue
        if s >= top:
            break
        a, b = ends_u[e], ends_v[e]
        if degree[a] < degree[b]:
            a, b = b, a  # the region with more neighbours stays: fewer edges move
        alive[e] = False
        degree[a] -= 1
        degree[b] -= 1
        end = head[b]
        while end != -1:
            following = after[end]
            f = end >> 1
            if alive[f]:
                w = ends_u[f] + ends_v[f] - b
                key = min(a, w) * n + max(a, w)
                g = between.setdefault(key, f)
                if g == f:  # moves to a; its score does not change
                    ends_u[f], ends_v[f] = a, w
                    degree[a] += 1
                    after[end] = -1
                    after[tail[a]] = end
                    tail[a] = end
                else:  # a and b both touch w: one edge, summed and scored again
                    total[g] += total[f]
                    count[g] += count[f]
                    if quantile:
                        hist[g] += hist[f]
                    alive[f] = False
                    degree[w] -= 1
                    version[g] += 1
                    heapq.heappush(heap, (_edge_score(g, total, count, hist, quantile),
                                          g, version[g]))
            end = following
        head[b] = tail[b] = -1
        scores[done], kept[done], gone[done] = s, a, b
        done += 1
    return scores[:done], kept[:done], gone[:done]


@numba.njit(cache=True, nogil=True)
def _join_levels(n: int, score: np.ndarray, kept: np.ndarray, gone: np.ndarray, u: np.ndarray,
                 v: np.ndarray) -> np.ndarray:  # pragma: no cover - compiled
    """Regions are tracked as linked member lists, the smaller moving into the larger, so
    each node moves O(log n) times and each edge is looked at when one of its ends moves."""
    m = u.shape[0]
    start = np.zeros(n + 1, np.int64)  # each node's edges: touching[start[i]:start[i + 1]]
    for e in range(m):
        start[u[e] + 1] += 1
        start[v[e] + 1] += 1
    for i in range(n):
        start[i + 1] += start[i]
    fill = start[:-1].copy()
    touching = np.empty(2 * m, np.int64)
    for e in range(m):
        touching[fill[u[e]]] = e
        fill[u[e]] += 1
        touching[fill[v[e]]] = e
        fill[v[e]] += 1
    level = np.full(m, np.inf)
    region = np.arange(n)
    first = np.arange(n)  # each region's members: first, then following[...], to -1
    last = np.arange(n)
    following = np.full(n, -1, np.int64)
    members = np.ones(n, np.int64)
    running = -np.inf
    for i in range(score.shape[0]):
        running = max(running, score[i])
        big, small = region[kept[i]], region[gone[i]]
        if members[big] < members[small]:
            big, small = small, big
        node = first[small]
        while node != -1:
            for t in range(start[node], start[node + 1]):
                e = touching[t]
                other = v[e] if u[e] == node else u[e]
                if region[other] == big and level[e] == np.inf:
                    level[e] = running
            node = following[node]
        node = first[small]
        while node != -1:
            region[node] = big
            node = following[node]
        following[last[big]] = first[small]
        last[big] = last[small]
        members[big] += members[small]
        members[small] = 0
    return level
