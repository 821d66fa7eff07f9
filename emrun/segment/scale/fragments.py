"""Fragments of one block: small pieces that never cross a boundary, for the agglomeration to
join. Ids are unique across blocks by construction (block number x block voxels + local id),
so no block waits for another and a rerun of a block gives the same ids.

``watershed`` (default): the boundary map is 1 - the lowest nearest-neighbour affinity
touching a voxel; seeds are the plateaus of maximal distance to the boundary (Euclidean
distance transform by `edt`, maxima over a (3, 7, 7) window, labelled by `cc3d`), grown
along the nearest-neighbour edges in decreasing affinity (a watershed on the edges: the
minimum spanning forest rooted at the seeds, by scipy); every piece of object gets a seed,
and every voxel inside the mask a fragment.
``mws``: the mutex watershed of the block (every channel, long-range ones included). Both
see the block with a context around it (``HALO``).
"""

from __future__ import annotations

from collections.abc import Sequence

import cc3d
import edt
import numpy as np
from scipy import ndimage

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
    the nearest-neighbour edge graph weighted by 1 - affinity (the MST of the graph plus a
    root joined to every seed voxel by the lightest edges, the root then removed: Cousty et
    al.'s watershed cuts), by scipy's compiled MST and components. Working on edges, not
    voxels, it cuts exactly where the affinities drop, where a voxel watershed must give
    each two-voxel-thick boundary to one side or the other. Each tree holds exactly one
    seed voxel and takes its seed's id; voxels no seed reaches (cut off by the mask) get 0."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components, minimum_spanning_tree

    shape = seeds.shape
    n = int(np.prod(shape))
    index = np.arange(n, dtype=np.int32).reshape(shape)
    inside = np.ones(shape, bool) if mask is None else mask
    rows, cols, weights = [], [], []
    for axis in nearest_axes(offsets):
        for c in axis:
            pair = edge_slices(shape, offsets[c])
            if pair is None:
                continue
            here, there = pair
            weight = 1.001 - affs[c][here]  # > 0: sparse graphs drop zeros
            if mask is None:
                rows.append(index[here].ravel())
                cols.append(index[there].ravel())
                weights.append(weight.ravel())
                continue
            keep = inside[here] & inside[there]
            rows.append(index[here][keep])
            cols.append(index[there][keep])
            weights.append(weight[keep])
    seeded = np.flatnonzero((seeds.ravel() != 0) & inside.ravel()).astype(np.int32)
    rows.append(np.full(seeded.size, n, np.int32))
    cols.append(seeded)
    weights.append(np.full(seeded.size, 1e-6, np.float32))
    graph = coo_matrix((np.concatenate(weights), (np.concatenate(rows), np.concatenate(cols))),
                       shape=(n + 1, n + 1)).tocsr()
    tree = minimum_spanning_tree(graph).tocoo()
    keep = (tree.row != n) & (tree.col != n)
    forest = coo_matrix((np.ones(int(keep.sum()), np.int8), (tree.row[keep], tree.col[keep])),
                        shape=(n, n))
    _, component = connected_components(forest, directed=False)
    label_of = np.zeros(int(component.max()) + 1, np.uint64)
    label_of[component[seeded]] = seeds.ravel()[seeded]
    labels = label_of[component].reshape(shape)
    labels[~inside] = 0
    return labels


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
