"""Truth objects cut into their connected pieces inside the scored volume.

A validation box is usually a crop of a larger annotation: an object that leaves the crop
and comes back (a neurite curving out through section 59 and in again) is one id in the
truth but two disconnected pieces inside the crop, and nothing a segmentation of the crop
sees can join them. Scored as labelled, such pieces count as split errors that no method
can avoid: on SNEMI3D sections 60-69 the truth's own pieces score adapted Rand error 0.107
against the truth as labelled. Scoring each piece as an object (``--connected-truth``)
measures the segmentation instead of the crop.

Pieces are 6-connected (face neighbours) components of equal non-zero truth ids (``cc3d``).
On disk they are found slab by slab with the scoring itself, in bounded memory: each slab's
pieces get their own ids, pieces touching across a slab face with the same truth id are
joined at the end, and the contingency table's truth ids are mapped to the joined pieces.
(`emrun.evaluate.blockwise` does the same for blocks scored by separate workers.)

Whole pieces are numbered 1..K in the order of their first voxel in raster order (z, then
y, then x), as cc3d numbers the pieces of a whole volume: the table of the joined pieces is
then the same array for any slab or block size, and equal to the in-memory one.
"""

from __future__ import annotations

import numpy as np

from emrun.components import components
from emrun.evaluate.contingency import ContingencyTable, as_ids, reduce_pairs
from emrun.geometry import Roi

__all__ = ["PieceLabeller", "connected_pieces", "first_voxels", "label_pieces",
           "number_in_order"]


def connected_pieces(truth: np.ndarray) -> np.ndarray:
    """Ids 1..K (uint64) for the 6-connected pieces of each non-zero truth id; 0 stays 0."""
    return label_pieces(truth, connectivity=6)


def label_pieces(labels: np.ndarray, connectivity: int) -> np.ndarray:
    """cc3d's connected components of equal non-zero ids (2-d: 4 or 8, 3-d: 6, 18 or 26),
    numbered 1..K in the order of their first voxels, for any id (`emrun.components`)."""
    ids = as_ids(np.ascontiguousarray(labels))
    return components(ids, connectivity=connectivity, out_dtype=np.uint64)


def first_voxels(labels: np.ndarray) -> np.ndarray:
    """Flat index of the first voxel (raster order) of each label 1..K of ``labels`` (ids
    1..K, 0 for none, as `connected_pieces` gives them), in label order.

    cc3d numbers pieces in the order their first voxel comes, so the first voxels are
    where the running maximum of the flat labels rises (linear time); anything else falls
    back to a sort.
    """
    flat = labels.ravel()
    if flat.size == 0:
        return np.zeros(0, np.int64)
    rises = np.maximum.accumulate(flat)
    starts = np.flatnonzero(rises[1:] != rises[:-1]) + 1
    if flat[0] != 0:
        starts = np.concatenate(([0], starts))
    if np.array_equal(flat[starts], np.arange(1, starts.size + 1, dtype=flat.dtype)):
        return starts
    values, index = np.unique(flat, return_index=True)
    return index[values != 0]


def number_in_order(component: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Ids 1..K for the components (``component[i]``: the component of piece i), numbered in
    the order in which their first piece comes in ``order`` (piece indices, e.g. sorted by
    first voxel); components with no piece get 0. Indexed by component."""
    seen = component[order]
    _, first = np.unique(seen, return_index=True)
    ids = np.zeros(int(component.max(initial=0)) + 1, np.uint64)
    ids[seen[np.sort(first)]] = np.arange(1, first.size + 1, dtype=np.uint64)
    return ids


class PieceLabeller:
    """Labels the slabs of one volume in the order given (z-slabs of y-bands, whole x, as
    `emrun.evaluate.volumes.slabs` makes them) and remembers which pieces touch across the
    slab faces; `join` then maps a table built on the slab pieces to whole-volume pieces.

    Memory: one section of the previous z-slab's last plane and one row band, besides the
    slab itself and the list of touching pairs.
    """

    def __init__(self) -> None:
        self._count = 0
        self._firsts: list[np.ndarray] = []  # per slab: each piece's first voxel, (pieces, axes)
        self._links: list[np.ndarray] = []
        self._below: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        self._above: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        self._z: int | None = None
        self._band: tuple[int, np.ndarray, np.ndarray] | None = None

    def label(self, roi: Roi, truth: np.ndarray) -> np.ndarray:
        """The slab's pieces, with ids unique across all slabs labelled so far."""
        z0, y0, y1 = roi.begin[0], roi.begin[1], roi.end[1]
        truth = as_ids(truth)
        pieces = connected_pieces(truth)
        first = np.unravel_index(first_voxels(pieces), pieces.shape)
        self._firsts.append(np.stack([f + b for f, b in zip(first, roi.begin, strict=True)],
                                     axis=1))
        labelled = pieces != 0
        pieces[labelled] += np.uint64(self._count)
        if labelled.any():
            self._count = int(pieces.max())
        if self._z != z0:  # a new z-slab: the last one's top planes face this one
            self._below, self._above, self._z, self._band = self._above, {}, z0, None
        face = self._below.get((y0, y1))
        if face is not None:
            self._link(face[0], face[1], truth[0], pieces[0])
        if self._band is not None and self._band[0] == y0:
            self._link(self._band[1], self._band[2], truth[:, 0], pieces[:, 0])
        self._above[(y0, y1)] = (truth[-1].copy(), pieces[-1].copy())
        self._band = (y1, truth[:, -1].copy(), pieces[:, -1].copy())
        return pieces

    def _link(self, truth_a: np.ndarray, pieces_a: np.ndarray, truth_b: np.ndarray,
              pieces_b: np.ndarray) -> None:
        same = (truth_a == truth_b) & (truth_a != 0)
        if same.any():
            pairs = np.stack([pieces_a[same], pieces_b[same]], axis=1)
            self._links.append(np.unique(pairs, axis=0))

    def join(self, table: ContingencyTable) -> ContingencyTable:
        """The table with each slab piece replaced by its whole-volume piece (ids 1..K, in
        the order of their first voxels)."""
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components

        nodes = self._count + 1
        pairs = np.concatenate(self._links) if self._links else np.zeros((0, 2), np.uint64)
        graph = coo_matrix((np.ones(len(pairs), np.int8),
                            (pairs[:, 0].astype(np.int64), pairs[:, 1].astype(np.int64))),
                           shape=(nodes, nodes))
        _, component = connected_components(graph, directed=False)
        firsts = np.concatenate(self._firsts) if self._firsts else np.zeros((0, 1), np.int64)
        order = np.lexsort(firsts.T[::-1])  # pieces by first voxel, first axis slowest
        whole = number_in_order(component[1:], order)[component]
        return reduce_pairs(table.seg, whole[table.truth.astype(np.int64)], table.counts,
                            table.negative)
