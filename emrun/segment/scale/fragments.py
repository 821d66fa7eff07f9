"""Fragments of one block: small pieces that never cross a boundary, for the agglomeration to
join. Ids are unique across blocks by construction (block number x block voxels + local id),
so no block waits for another and a rerun of a block gives the same ids.

``watershed`` (default): the boundary map is 1 - the lowest nearest-neighbour affinity
touching a voxel; seeds are the plateaus of maximal distance to the boundary (Euclidean
distance transform by `edt`, maxima over a (3, 7, 7) window, labelled by `cc3d`), grown
along the nearest-neighbour edges in decreasing affinity (a watershed on the edges: the
minimum spanning forest rooted at the seeds, compiled with numba); every piece of object
gets a seed (a piece of object too thin for one gets its own once the edges above 0.5 are
in), and every voxel inside the mask a fragment.
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

from ..affinities import Offset, edge_slices, nearest_axes
from ..pipeline import connected_fragments, provisional

__all__ = ["FRAGMENT_METHODS", "MAX_VOXELS", "block_fragments", "watershed_fragments"]

FRAGMENT_METHODS = ("watershed", "mws")
SEED_WINDOW = (3, 7, 7)
"""Seeds are distance maxima over this window (z, y, x): larger gives fewer fragments."""
HALO = (2, 8, 8)
"""Context (z, y, x) read around a block for its fragments, then cropped."""
FOREGROUND = 0.5
"""Voxels whose lowest nearest-neighbour affinity is above this lie inside an object."""
MAX_VOXELS = 2**31 - 1
"""The most voxels a block with its context may hold: the watershed indexes them as int32."""


def boundary_map(affs: np.ndarray, offsets: Sequence[Offset]) -> np.ndarray:
    """1 - the lowest affinity of the nearest-neighbour edges touching each voxel (both
    directions), float32 in [0, 1]: both voxels beside a boundary face count as boundary,
    so objects that touch are still apart in the seeds' distance map."""
    lowest = np.ones(affs.shape[1:], np.float32)
    for axis in nearest_axes(offsets):
        for c in axis:
            pair = edge_slices(lowest.shape, offsets[c])
            if pair is None:
                continue
            # only edges with both ends in the array: the value at v whose v + offset lies
            # outside (section 0 for z) is no edge (0 in targets, anything in predictions),
            # and taken as one it made a one-section volume all boundary, one fragment
            here, there = pair
            np.minimum(lowest[here], affs[c][here], out=lowest[here])
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
    seeds = cc3d.connected_components(peaks, connectivity=26, out_dtype=np.uint64)
    pieces, count = cc3d.connected_components(inside, connectivity=6, return_N=True)
    if count:  # a piece of object beside a larger one may hold no window maximum: seed it
        _seed_unseeded(seeds.reshape(-1), pieces.reshape(-1), distance.reshape(-1), count)
    if not seeds.any():  # all boundary: the block's least boundary voxel seeds one fragment
        allowed = np.where(mask, boundary, np.inf) if mask is not None else boundary
        if not np.isfinite(allowed).any():
            return np.zeros(boundary.shape, np.uint64)
        seeds.flat[int(np.argmin(allowed))] = 1
    return _flood(affs, offsets, seeds, mask)


@numba.njit(cache=True, nogil=True)
def _seed_unseeded(seeds: np.ndarray, pieces: np.ndarray, distance: np.ndarray,
                   count: int) -> None:  # pragma: no cover - compiled
    """Give each piece (ids 1..count) that holds no seed one at its first voxel of largest
    distance, with new ids after the largest seed id, in piece order (in place, flat)."""
    seeded = np.zeros(count + 1, np.bool_)
    best = np.full(count + 1, -1.0, np.float64)
    at = np.full(count + 1, -1, np.int64)
    top = np.uint64(0)
    for v in range(seeds.shape[0]):
        if seeds[v] != 0:
            seeded[pieces[v]] = True
            top = max(top, seeds[v])
        elif pieces[v] != 0 and distance[v] > best[pieces[v]]:
            best[pieces[v]] = distance[v]
            at[pieces[v]] = v
    for piece in range(1, count + 1):
        if not seeded[piece]:
            top += np.uint64(1)
            seeds[at[piece]] = top


def _flood(affs: np.ndarray, offsets: Sequence[Offset], seeds: np.ndarray,
           mask: np.ndarray | None) -> np.ndarray:
    """The seeded watershed on the edges: the minimum spanning forest rooted at the seeds of
    the nearest-neighbour edge graph weighted by 1 - affinity (Cousty et al.'s watershed
    cuts). Kruskal's algorithm with one change gives it: edges in decreasing affinity join
    two trees unless both hold a seed. Working on edges, not voxels, it cuts exactly where
    the affinities drop, where a voxel watershed must give each two-voxel-thick boundary to
    one side or the other. Each tree holds seed voxels of one id and takes it; voxels no
    seed reaches (cut off by the mask) get 0. Affinities are ranked at 16 bits (ties in
    channel order, then voxel order), so one counting sort orders the edges; both passes
    over the edges and the forest are one compiled loop, with no edge list built in numpy."""
    shape = seeds.shape
    if int(np.prod(shape)) > MAX_VOXELS:  # the command refuses such blocks first
        raise ValueError(f"{shape}: more voxels than the watershed indexes ({MAX_VOXELS})")
    channels = [c for axis in nearest_axes(offsets) for c in axis]
    steps = np.array([offsets[c] for c in channels], np.int64).reshape(-1, 3)
    inside = np.ones(shape, bool) if mask is None else np.ascontiguousarray(mask)
    start = np.where(inside, seeds, 0).astype(np.int64)
    values = np.ascontiguousarray(affs, dtype=np.float32)
    return _seeded_forest(values, np.array(channels, np.int64), steps, start, inside)


RANKS = 65535
"""Affinities are ranked at this resolution (exact for affinities stored as uint8)."""
STRONG_SLOTS = RANKS - int(FOREGROUND * RANKS + 0.5)
"""Edges ranked in the slots before this one are above ``FOREGROUND`` (at the ranking's
resolution: 0.5 itself is not): they join voxels of one object."""


@numba.njit(cache=True, nogil=True)
def _ranked_edges(affs: np.ndarray, channels: np.ndarray, steps: np.ndarray,
                  inside: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:  # pragma: no cover
    """The edges v - (v + step) of each channel with both ends inside, as flat voxel indices
    (u, w) from the strongest affinity down (a counting sort on 16-bit ranks; ties in
    channel order, then voxel order), and how many of them come first as strong
    (`STRONG_SLOTS`)."""
    nz, ny, nx = inside.shape
    count = np.zeros(RANKS + 2, np.int64)
    for sweep in range(2):  # the first counts each rank, the second places each edge
        if sweep == 1:
            for k in range(1, RANKS + 2):
                count[k] += count[k - 1]
            strong = count[STRONG_SLOTS]  # edges in slots before it
            u = np.empty(count[RANKS + 1], np.int32)
            w = np.empty(count[RANKS + 1], np.int32)
        for i in range(channels.shape[0]):
            dz, dy, dx = steps[i, 0], steps[i, 1], steps[i, 2]
            shift = (dz * ny + dy) * nx + dx
            for z in range(max(0, -dz), nz - max(0, dz)):
                for y in range(max(0, -dy), ny - max(0, dy)):
                    for x in range(max(0, -dx), nx - max(0, dx)):
                        if not (inside[z, y, x] and inside[z + dz, y + dy, x + dx]):
                            continue
                        a = min(max(affs[channels[i], z, y, x], np.float32(0.0)),
                                np.float32(1.0))
                        slot = RANKS - np.int64(a * RANKS + 0.5)
                        if sweep == 0:
                            count[slot + 1] += 1
                        else:
                            v = (z * ny + y) * nx + x
                            u[count[slot]] = v
                            w[count[slot]] = v + shift
                            count[slot] += 1
    return u, w, strong


@numba.njit(cache=True, nogil=True, inline="always")
def _root(tree: np.ndarray, v: int) -> int:  # pragma: no cover - compiled
    """The root of ``v`` in a forest whose roots hold -1 - their seed id (path halving)."""
    while True:
        up = tree[v]
        if up < 0:
            return v
        above = tree[up]
        if above < 0:
            return up
        tree[v] = above
        v = above


@numba.njit(cache=True, nogil=True)
def _seeded_forest(affs: np.ndarray, channels: np.ndarray, steps: np.ndarray,
                   seeds: np.ndarray, inside: np.ndarray) -> np.ndarray:  # pragma: no cover
    """Kruskal over the ranked edges, skipping edges between two seeded trees; each voxel's
    tree's seed id, or 0. One int32 per voxel: a parent, or at a root -1 - the seed id, so
    that the loop touches one array (half the memory of parents and labels apart).

    Once the strong edges (above ``FOREGROUND``) are in, every tree they built without a
    seed gets one of its own (ids after the largest seed, in order of each tree's first
    voxel): an
    object without a voxel whose every edge is strong (two voxels thick, a sliver in z) had
    no distance seed, and its tree was flooded into a neighbour's across an edge of
    affinity 0, a fragment across a boundary that no agglomeration undoes."""
    u, w, strong = _ranked_edges(affs, channels, steps, inside)
    tree = np.empty(seeds.size, np.int32)
    flat = seeds.reshape(-1)
    top = 0
    for v in range(flat.shape[0]):
        tree[v] = -1 - flat[v]
        top = max(top, np.int64(flat[v]))
    joined = np.zeros(seeds.size, np.bool_)  # a root whose tree holds more than itself
    for k in range(u.shape[0]):
        if k == strong:
            for v in range(tree.shape[0]):
                r = _root(tree, v)
                if tree[r] == -1 and joined[r]:
                    top += 1
                    tree[r] = -1 - top
        a = _root(tree, u[k])
        b = _root(tree, w[k])
        if a == b:
            continue
        if tree[a] == -1:  # a holds no seed: it joins b's tree
            tree[a] = b
            joined[b] = True
        elif tree[b] == -1:
            tree[b] = a
            joined[a] = True
    out = np.empty(seeds.shape, np.uint64)
    labels = out.reshape(-1)
    for v in range(flat.shape[0]):
        labels[v] = -1 - tree[_root(tree, v)]
    return out


def block_fragments(affs: np.ndarray, offsets: Sequence[Offset], mask: np.ndarray | None,
                    method: str, first_id: int, core: tuple[slice, ...]
                    ) -> tuple[np.ndarray, int]:
    """A block's fragments with ids ``first_id + 1 ...`` (0 outside the mask), and their
    count. ``affs`` (and ``mask``) cover the block and a context around it (``HALO``), so
    that a sliver of an object at the block's face is flooded from its own seed in the
    context, not from a neighbour's; ``core`` cuts the block out of them, and each
    fragment the cut leaves in pieces becomes one fragment per 6-connected piece."""
    if method == "mws":
        from ...recipe.run import MutexWatershed
        from ..mws import MutexSegmenter

        local = MutexSegmenter(MutexWatershed()).fragments(affs, offsets, mask)  # bias 0.5
    else:
        local = watershed_fragments(affs, offsets, mask)
    inner = None if mask is None else mask[core]
    labels, count = provisional(connected_fragments(local[core]), inner)  # ids 1..K
    nonzero = labels != 0
    labels[nonzero] += np.uint64(first_id)
    return labels, count
