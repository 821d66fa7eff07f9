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

import heapq
from collections.abc import Sequence

import numpy as np

from ..graph import Edges, merge_small, union
from .graphdb import GraphData
from .rag import histogram_quantile

__all__ = ["QUANTILE", "agglomerate", "join_levels", "merge_sequence", "segments_from_levels"]

QUANTILE = 0.85
"""The quantile the ``p85`` scoring reads from the edge histograms."""


def agglomerate(graph: GraphData, thresholds: Sequence[float], scoring: str,
                min_size: int = 0) -> list[np.ndarray]:
    """For each threshold, the segment (1..K) of every node of ``graph`` (in its id order)."""
    n = graph.ids.size
    merges = merge_sequence(graph, max(thresholds), scoring)
    scores = np.array([m[0] for m in merges], np.float64)
    kept = np.array([m[1] for m in merges], np.int64).reshape(-1)
    gone = np.array([m[2] for m in merges], np.int64).reshape(-1)
    results = []
    for threshold in thresholds:
        above = np.flatnonzero(scores >= threshold)
        k = int(above[0]) if above.size else len(merges)
        parent = np.arange(n, dtype=np.int64)
        parent[gone[:k]] = kept[:k]
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
    """Segments 1..K from each node's root, after small segments merge into neighbours."""
    if min_size > 1 and roots.size:
        roots = _merge_small(roots, graph, min_size)
    _, segment = np.unique(roots, return_inverse=True)
    return segment.reshape(-1).astype(np.int64) + 1


def join_levels(n: int, merges: Sequence[tuple[float, int, int]], u: np.ndarray,
                v: np.ndarray) -> np.ndarray:
    """For each edge ``u``-``v`` (node positions 0..n-1), the largest score of ``merges``
    (`merge_sequence`) up to the one that put its ends in one region; inf if none did.
    Regions are tracked as member lists, the smaller moving into the larger, so each node
    moves O(log n) times and each edge is looked at when one of its ends moves."""
    ends_u, ends_v = u.tolist(), v.tolist()
    touching: list[list[int]] = [[] for _ in range(n)]
    for e, (a, b) in enumerate(zip(ends_u, ends_v, strict=True)):
        touching[a].append(e)
        touching[b].append(e)
    level = [np.inf] * len(ends_u)
    region = list(range(n))
    members: list[list[int]] = [[i] for i in range(n)]
    running = -np.inf
    for score, kept, gone in merges:
        running = max(running, score)
        big, small = region[kept], region[gone]
        if len(members[big]) < len(members[small]):
            big, small = small, big
        for node in members[small]:
            for e in touching[node]:
                other = ends_v[e] if ends_u[e] == node else ends_u[e]
                if region[other] == big and level[e] == np.inf:
                    level[e] = running
        for node in members[small]:
            region[node] = big
        members[big].extend(members[small])
        members[small] = []
    return np.array(level, np.float64)


def _merge_small(roots: np.ndarray, graph: GraphData, min_size: int) -> np.ndarray:
    """Segments below ``min_size`` voxels merged into their best neighbour (by mean
    affinity), as every emrun segmenter does (emrun.segment.graph.merge_small)."""
    sizes = np.bincount(roots, weights=graph.sizes, minlength=roots.size).astype(np.int64)
    edges = Edges.aggregate(roots[graph.u], roots[graph.v], graph.total, graph.count)
    table = merge_small(sizes, edges, min_size)
    return table[roots]


def merge_sequence(graph: GraphData, top: float, scoring: str
                   ) -> list[tuple[float, int, int]]:
    """(score, kept region, merged region) of every merge until the first scoring ``top``
    or more, in order; a region is named by one of its nodes (its position in ``graph``)."""
    n = graph.ids.size
    ends_u, ends_v = graph.u.tolist(), graph.v.tolist()
    total, count = graph.total.tolist(), graph.count.tolist()
    hist = np.array(graph.hist, np.int64) if scoring != "mean" else None
    adjacent: list[dict[int, int]] = [{} for _ in range(n)]
    for e, (a, b) in enumerate(zip(ends_u, ends_v, strict=True)):
        adjacent[a][b] = e
        adjacent[b][a] = e

    def score(e: int) -> float:
        if hist is None:
            return 1.0 - total[e] / max(count[e], 1)
        return 1.0 - float(histogram_quantile(hist[e], QUANTILE))

    if hist is None:
        initial = (1.0 - graph.total / np.maximum(graph.count, 1)).tolist()
    else:
        initial = (1.0 - histogram_quantile(hist, QUANTILE)).tolist() if len(hist) else []
    version = [0] * len(initial)
    heap = [(s, 0, e) for e, s in enumerate(initial)]
    heapq.heapify(heap)
    alive = [True] * len(initial)
    merges: list[tuple[float, int, int]] = []
    while heap:
        s, ver, e = heapq.heappop(heap)
        if not alive[e] or ver != version[e]:
            continue
        if s >= top:
            break
        a, b = ends_u[e], ends_v[e]
        if len(adjacent[a]) < len(adjacent[b]):
            a, b = b, a  # the region with more neighbours stays: fewer edges move
        alive[e] = False
        del adjacent[a][b], adjacent[b][a]
        for w, f in adjacent[b].items():
            del adjacent[w][b]
            g = adjacent[a].get(w)
            if g is None:  # moves to a; its score does not change
                adjacent[a][w] = adjacent[w][a] = f
                ends_u[f], ends_v[f] = a, w
                continue
            total[g] += total[f]
            count[g] += count[f]
            if hist is not None:
                hist[g] += hist[f]
            alive[f] = False
            version[g] += 1
            heapq.heappush(heap, (score(g), version[g], g))
        adjacent[b] = {}
        merges.append((s, a, b))
    return merges
