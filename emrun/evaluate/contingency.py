"""The sparse contingency table between a segmentation and a truth volume.

Every segmentation metric here (adapted Rand, VOI, split/merge counts) is a function of
one table: how many voxels carry predicted id `s` and true id `t`, for each pair that
occurs. Volumes hold ~10^8 voxels but only ~10^5 distinct pairs, so the table is kept as
three aligned arrays (seg ids, truth ids, counts) sorted by (seg, truth), never as a
dense matrix, and ids of any integer dtype (uint64 ids above 2^60 included) are used as
they are, without relabelling to a dense range.

A table is built block by block (`count_pairs`) and the blocks' tables are merged
(`TableAccumulator`), so a volume is scored slab by slab with bounded memory and the
result does not depend on the slab size: merging sums counts exactly.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from ..io.masks import inside

REDUCE_EVERY = 4_000_000  # pending (seg, truth, count) rows that trigger a merge
LOW = 0xFFFF_FFFF  # ids up to here pack two to a uint64 key


@dataclass(frozen=True)
class ContingencyTable:
    """Voxel counts per (seg id, truth id) pair; rows sorted by (seg, truth), pairs unique.

    Ids are uint64 (see `as_ids`); `counts` are int64 and all positive. ``negative``: the
    scored voxels whose segmentation id, and whose truth id, was negative (signed ids, which
    `as_ids` reinterprets: each is then an object, while only 0 is unlabelled), counted
    where the voxels are read, so every way of scoring a volume can say so.
    """

    seg: np.ndarray
    truth: np.ndarray
    counts: np.ndarray
    negative: tuple[int, int] = (0, 0)

    @property
    def voxels(self) -> int:
        """Voxels the table counts (those scored)."""
        return int(self.counts.sum())

    def __len__(self) -> int:
        return int(self.counts.size)

    @classmethod
    def empty(cls) -> ContingencyTable:
        return cls(np.zeros(0, np.uint64), np.zeros(0, np.uint64), np.zeros(0, np.int64))


def as_ids(labels: np.ndarray) -> np.ndarray:
    """Integer labels as uint64 ids, one-to-one, 0 staying 0.

    Signed ids are reinterpreted (two's complement), not clipped: -1 becomes 2^64 - 1, so
    distinct labels stay distinct, which is all the metrics need.
    """
    if labels.dtype.kind == "i":
        return labels.astype(np.int64, copy=False).view(np.uint64)
    return labels.astype(np.uint64, copy=False)


def negative_voxels(labels: np.ndarray) -> int:
    """How many of ``labels`` are below 0 (none for unsigned or bool ids)."""
    if labels.dtype.kind != "i" or labels.size == 0:
        return 0
    return int(np.count_nonzero(labels < 0))


def reduce_pairs(seg: np.ndarray, truth: np.ndarray, weights: np.ndarray,
                 negative: tuple[int, int] = (0, 0)) -> ContingencyTable:
    """Sum `weights` over equal (seg, truth) pairs of uint64 ids; rows come out sorted, unique.
    ``negative`` is carried into the table (the voxels' counts of negative ids).

    The pair is packed into one uint64 key (seg in the high half) so that one vectorised
    sort does the work; ids of 2^32 and above are first replaced by their ranks, which
    keeps the order.
    """
    if seg.size == 0:  # no voxel, none negative
        return ContingencyTable.empty()
    seg_values = truth_values = None
    if seg.max() > LOW:
        seg_values, seg = np.unique(seg, return_inverse=True)
    if truth.max() > LOW:
        truth_values, truth = np.unique(truth, return_inverse=True)
    key = (seg.astype(np.uint64) << np.uint64(32)) | truth.astype(np.uint64)
    order = np.argsort(key, kind="stable")  # timsort: merging sorted tables is near linear
    key = key[order]
    starts = np.flatnonzero(np.concatenate(([True], key[1:] != key[:-1])))
    counts = np.add.reduceat(weights[order].astype(np.int64, copy=False), starts)
    key = key[starts]
    seg, truth = key >> np.uint64(32), key & np.uint64(LOW)
    if seg_values is not None:
        seg = seg_values[seg]
    if truth_values is not None:
        truth = truth_values[truth]
    return ContingencyTable(seg, truth, counts, (int(negative[0]), int(negative[1])))


def count_pairs(
    seg: np.ndarray, truth: np.ndarray, mask: np.ndarray | None = None, *,
    labelled: np.ndarray | None = None,
) -> ContingencyTable:
    """The table of one block; voxels with truth 0, or outside the mask (0 or NaN), are not
    counted. Negative ids among the counted voxels are counted too (``negative``), of the
    truth as ``labelled`` where ``truth`` holds ids made from it (its connected pieces,
    non-zero where it is).

    Neighbouring voxels mostly share their pair, so the flattened block is first cut into
    runs of equal pairs (linear time) and only the runs are sorted: a 1000^2 section of
    neurons has ~50x fewer runs than voxels.
    """
    seg = np.ravel(seg)
    truth = np.ravel(truth)
    signs = truth if labelled is None else np.ravel(labelled)
    keep = truth != 0
    if mask is not None:
        keep &= np.ravel(inside(mask))
    if not keep.all():
        seg, truth = seg[keep], truth[keep]
        if signs.dtype.kind == "i":  # unsigned ids have no sign to count
            signs = signs[keep]
    del keep
    if seg.size == 0:
        return ContingencyTable.empty()
    negative = (negative_voxels(seg), negative_voxels(signs))
    starts = _run_starts(seg, truth)
    lengths = np.diff(starts, append=seg.size)
    return reduce_pairs(as_ids(seg[starts]), as_ids(truth[starts]), lengths, negative)


def merge_tables(tables: Iterable[ContingencyTable]) -> ContingencyTable:
    """One table with the summed counts of several (e.g. one per slab)."""
    tables = [t for t in tables if len(t)]  # a table with no row scored no voxel
    if not tables:
        return ContingencyTable.empty()
    if len(tables) == 1:
        return tables[0]
    return reduce_pairs(
        np.concatenate([t.seg for t in tables]),
        np.concatenate([t.truth for t in tables]),
        np.concatenate([t.counts for t in tables]),
        (sum(t.negative[0] for t in tables), sum(t.negative[1] for t in tables)),
    )


class TableAccumulator:
    """Collects block tables and merges them when the rows pending since the last merge
    reach REDUCE_EVERY or the merged table's size, whichever is larger.

    Memory stays within about twice the final table (distinct pairs) plus REDUCE_EVERY rows,
    whatever the volume's size, and each row is merged O(log) times.
    """

    def __init__(self, reduce_every: int = REDUCE_EVERY) -> None:
        self._reduce_every = reduce_every
        self._merged = ContingencyTable.empty()
        self._tables: list[ContingencyTable] = []
        self._pending = 0

    def add(self, table: ContingencyTable) -> None:
        self._tables.append(table)
        self._pending += len(table)
        if self._pending >= max(self._reduce_every, len(self._merged)):
            self.result()

    def result(self) -> ContingencyTable:
        """The merged table of everything added so far."""
        if self._tables:
            self._merged = merge_tables([self._merged, *self._tables])
            self._tables, self._pending = [], 0
        return self._merged


def _run_starts(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Indices where the pair (a[i], b[i]) differs from the previous one (0 included)."""
    change = np.empty(a.size, bool)
    change[0] = True
    np.not_equal(a[1:], a[:-1], out=change[1:])
    change[1:] |= b[1:] != b[:-1]
    return np.flatnonzero(change)
