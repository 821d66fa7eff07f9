"""Fragments of one block: small pieces that never cross a boundary, for the agglomeration to
join. Ids are unique across blocks by construction (block number x block voxels + local id),
so no block waits for another and a rerun of a block gives the same ids.

``watershed`` (default): the boundary map is 1 - the lowest nearest-neighbour affinity
touching a voxel; seeds are the plateaus of maximal distance to the boundary (Euclidean
distance transform by `edt`, maxima over a (3, 7, 7) window, labelled by `cc3d`), grown
along the nearest-neighbour edges in decreasing affinity (a watershed on the edges: the
minimum spanning forest rooted at the seeds, compiled with numba); every piece of object
gets a seed, and every voxel inside the mask a fragment.
``mws``: the mutex watershed of the block (every channel, long-range ones included). Both
see the block with a context around it (``HALO``).
"""

from __future__ import annotations

from collections.abc import Sequence

import cc3d
import edt
import numba
import numpy as np
from scipy import ndimage

from ...unionfind import find
from ..affinities import Offset, edge_slices, nearest_axes
from ..pipeline import provisional

__all__ = ["FRAGMENT_METHODS", "block_fragments", "watershed_fragments"]

FRAGMENT_METHODS = ("watershed", "mws")
SEED_WINDOW = (3, 7, 7)
"""Seeds are distance maxima over this window (z, y, x): larger gives fewer fragments."""
HALO = (2, 8, 8)
"""Context (z, y, x) read around a block for its fragments, then cropped."""
FOREGROUND = 0.5
"""Voxels whose mean nearest-neighbour affinity is above this lie inside an object."""


def boundary_map(affs: np.ndarray, offsets: Sequence[Offset]) -> np.ndarray:
    """1 - the lowest affinity of the nearest-neighbour edges touching each voxel (both
    directions), float32 in [0, 1]: both voxels beside a boundary face count as boundary,
    so objects that touch are still apart in the seeds' distance map."""
    lowest = np.ones(affs.shape[1:], np.float32)
    for axis in nearest_axes(offsets):
        for c in axis:
            np.minimum(lowest, affs[c], out=lowest)
            pair = edge_slices(lowest.shape, offsets[c])
            if pair is not None:  # the edge at v links v + offset too
                here, there = pair
                np.minimum(lowest[there], affs[c][here], out=lowest[there])
    return 1.0 - lowest


def watershed_fragments(affs: np.ndarray, offsets: Sequence[Offset],
                        mask: np.ndarray | None = None) -> np.ndarray:
    """Local fragment ids 1..K of one block (uint64), 0 exactly outside ``mask``."""
    boundary = boundary_map(affs, offsets)
    inside = boundary < 1.0 - FOREGROUND
    if mask is not None:
        inside &= mask
    distance = edt.edt(inside, parallel=1)
    peaks = (distance == ndimage.maximum_filter(distance, size=SEED_WINDOW)) & inside
    seeds = cc3d.connected_components(peaks, connectivity=26).astype(np.uint64)
    pieces, count = cc3d.connected_components(inside, connectivity=6, return_N=True)
    if count:  # a piece of object beside a larger one may hold no window maximum: seed it
        seeded = np.zeros(count + 1, bool)
        seeded[pieces[seeds != 0]] = True
        lonely = np.flatnonzero(~seeded[1:]) + 1
        if lonely.size:
            top = int(seeds.max())
            at = ndimage.maximum_position(distance, pieces, lonely)
            seeds[tuple(np.array(at, np.int64).reshape(-1, 3).T)] = np.arange(
                top + 1, top + 1 + lonely.size, dtype=np.uint64)
    if not seeds.any():  # all boundary: the block's least boundary voxel seeds one fragment
        allowed = np.where(mask, boundary, np.inf) if mask is not None else boundary
        if not np.isfinite(allowed).any():
            return np.zeros(boundary.shape, np.uint64)
        seeds.flat[int(np.argmin(allowed))] = 1
    return _flood(affs, offsets, seeds, mask)


def _flood(affs: np.ndarray, offsets: Sequence[Offset], seeds: np.ndarray,
           mask: np.ndarray | None) -> np.ndarray:
    """The seeded watershed on the edges: the minimum spanning forest rooted at the seeds of
    the nearest-neighbour edge graph weighted by 1 - affinity (Cousty et al.'s watershed
    cuts). Kruskal's algorithm with one change gives it: edges in decreasing affinity join
    two trees unless both hold a seed. Working on edges, not voxels, it cuts exactly where
    the affinities drop, where a voxel watershed must give each two-voxel-thick boundary to
    one side or the other. Each tree holds seed voxels of one id and takes it; voxels no
    seed reaches (cut off by the mask) get 0. Affinities are ranked at 16 bits (ties in
    edge order), so one counting sort orders the edges."""
    shape = seeds.shape
    n = int(np.prod(shape))
    index = np.arange(n, dtype=np.int32).reshape(shape)
    inside = np.ones(shape, bool) if mask is None else mask
    rows, cols, ranks = [], [], []
    for axis in nearest_axes(offsets):
        for c in axis:
            pair = edge_slices(shape, offsets[c])
            if pair is None:
                continue
            here, there = pair
            rank = (np.clip(affs[c][here], 0.0, 1.0) * RANKS + 0.5).astype(np.uint16)
            if mask is None:
                rows.append(index[here].ravel())
                cols.append(index[there].ravel())
                ranks.append(rank.ravel())
                continue
            keep = inside[here] & inside[there]
            rows.append(index[here][keep])
            cols.append(index[there][keep])
            ranks.append(rank[keep])
    order = _strongest_first(np.concatenate(ranks))
    u, w = np.concatenate(rows)[order], np.concatenate(cols)[order]
    start = np.where(inside, seeds, 0).astype(np.uint64).ravel()
    return _seeded_forest(u, w, start).reshape(shape)


RANKS = 65535
"""Affinities are ranked at this resolution (exact for affinities stored as uint8)."""


@numba.njit(cache=True, nogil=True)
def _strongest_first(rank: np.ndarray) -> np.ndarray:  # pragma: no cover - compiled
    """Indices of ``rank`` (uint16) from the largest down, ties in index order: a counting
    sort, linear in the edges."""
    count = np.zeros(RANKS + 2, np.int64)
    for r in rank:
        count[RANKS - r + 1] += 1
    for k in range(1, RANKS + 2):
        count[k] += count[k - 1]
    order = np.empty(rank.shape[0], np.int64)
    for i in range(rank.shape[0]):
        slot = RANKS - rank[i]
        order[count[slot]] = i
        count[slot] += 1
    return order


@numba.njit(cache=True, nogil=True)
def _seeded_forest(u: np.ndarray, w: np.ndarray, seed: np.ndarray
                   ) -> np.ndarray:  # pragma: no cover - compiled
    """Kruskal over the edges u[k]-w[k] in the order given, skipping edges between two
    seeded trees (union-find with path halving); each voxel's tree's seed id, or 0."""
    n = seed.shape[0]
    parent = np.arange(n)
    label = seed.copy()  # per root: its tree's seed id
    for k in range(u.shape[0]):
        a = find(parent, u[k])
        b = find(parent, w[k])
        if a == b or (label[a] != 0 and label[b] != 0):
            continue
        if label[a] == 0:
            a, b = b, a
        parent[b] = a  # the seeded root (if any) stays root
    out = np.empty(n, np.uint64)
    for v in range(n):
        r = v
        while parent[r] != r:
            r = parent[r]
        out[v] = label[r]
    return out


def block_fragments(affs: np.ndarray, offsets: Sequence[Offset], mask: np.ndarray | None,
                    method: str, first_id: int, core: tuple[slice, ...]
                    ) -> tuple[np.ndarray, int]:
    """A block's fragments with ids ``first_id + 1 ...`` (0 outside the mask), and their
    count. ``affs`` (and ``mask``) cover the block and a context around it (``HALO``), so
    that a sliver of an object at the block's face is flooded from its own seed in the
    context, not from a neighbour's; ``core`` cuts the block out of them."""
    if method == "mws":
        from ...recipe.run import MutexWatershed
        from ..mws import MutexSegmenter

        local = MutexSegmenter(MutexWatershed()).fragments(affs, offsets, mask)  # bias 0.5
    else:
        local = watershed_fragments(affs, offsets, mask)
    inner = None if mask is None else mask[core]
    labels, count = provisional(local[core], inner)  # ids 1..K; unassigned: one each
    nonzero = labels != 0
    labels[nonzero] += np.uint64(first_id)
    return labels, count
