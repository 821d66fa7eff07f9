"""Scoring volumes block by block, each block by whichever worker takes it, and merging.

A worker scores one block of the volume (`score_block`) and writes what it found to a file
of its own in the work folder (`write_block`): the block's contingency table, or with
``--binary`` its confusion counts. The process that started the workers merges those files
(`merge_blocks`): tables are summed exactly (`TableAccumulator`), so the scores equal the
single-process ones for any block size and any number of workers. Blocks follow a
`BlockGrid` over the volume, whole storage chunks by default (`default_block`). Blocks
smaller than the chunks read them through `Regions`, in an order that keeps the blocks of a
chunk together (`Work.order`): each chunk is decoded once per worker, not once per block.

With ``--connected-truth`` (see `emrun.evaluate.pieces`) each block labels its own truth
pieces (cc3d, 6-connected, equal ids) and names each piece by its first voxel in the volume
(raster order), a name unique across blocks. Pieces of neighbouring blocks are joined
without either block seeing the other's labels: the plane of voxels just across a block's
face is cut into its 2-d pieces (4-connected, equal ids), which both blocks compute alike
from the truth alone and name by their first voxels. The block on the far side links each
2-d piece of its first plane to the block piece holding it; the block on the near side
reads that plane (one plane beyond each of its upper faces) and links each of its pieces
to the 2-d pieces it touches with the same truth id. The union of all links
(`join_pieces`) gives the whole pieces, numbered 1..K by first voxel as in memory; the
block tables' truth ids are mapped to them before merging.
"""

from __future__ import annotations

import functools
import math
import os
import pickle
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from emrun.capacity import check_block_count
from emrun.evaluate.binary import BinaryCounts, count_binary
from emrun.evaluate.contingency import (
    ContingencyTable,
    TableAccumulator,
    count_pairs,
    reduce_pairs,
)
from emrun.evaluate.pieces import (
    connected_pieces,
    first_voxels,
    label_pieces,
    number_in_order,
)
from emrun.geometry import BlockGrid, Roi, Zyx, box_of, local_slices, zyx
from emrun.io.volume import Volume

__all__ = ["BLOCK_VOXELS", "Work", "default_block", "join_pieces", "load_work", "merge_blocks",
           "prepare", "score_block", "write_block"]

BLOCK_VOXELS = 8_000_000  # a block's voxels by default: ~0.3 GB of working memory per worker
WORK_FILE = "work.pickle"


@dataclass(frozen=True, kw_only=True)
class Sections(Volume):
    """A 2-d (y, x) volume read as (1, y, x), so that every block is a 3-d box."""

    inner: Volume

    def _read(self, roi: Roi) -> np.ndarray:
        return self.inner.read(Roi(roi.offset[1:], roi.shape[1:]))[None]

    @property
    def chunks(self) -> tuple[int, ...] | None:
        inner = self.inner.chunks
        return (1, *inner) if inner else None


@dataclass(frozen=True, kw_only=True)
class Regions(Volume):
    """A volume read in regions of whole storage chunks, the last ``keep`` of them kept in
    this process: a block smaller than the chunks takes its voxels from the region holding
    it. Reading such a block straight from the volume decoded every chunk it touches, once
    per block (blocks of 16 x 64 x 64 in chunks of 64 x 256 x 256: each chunk decoded 64
    times, 30x slower than whole chunks). Region edges lie on multiples of ``unit`` (a
    chunk along an axis where blocks are thinner than the chunks, 1 where they are not)."""

    inner: Volume
    unit: Zyx
    keep: int = 1
    block: Zyx | None = None
    """The blocks' size: every block starting in a region reads that same region (a block
    reaching past its chunk's edge read a larger one, which evicted the region its run's
    other blocks needed: blocks of 3 x 10 x 12 in chunks of 8 x 32 x 32 decoded a chunk 8
    times per run)."""

    def _read(self, roi: Roi) -> np.ndarray:
        regions = self._regions()
        for key, (region, data) in regions.items():
            if region.contains(roi):
                regions.move_to_end(key)  # the most recent last
                return data[local_slices(roi, region.begin)].copy()  # the caller's to change
        region = self._region_of(roi)
        data = self.inner.read(region)
        while len(regions) >= self.keep:
            regions.popitem(last=False)
        regions[(tuple(region.begin), tuple(region.shape))] = (region, data)
        return data[local_slices(roi, region.begin)].copy()

    def _region_of(self, roi: Roi) -> Roi:
        """The box of whole units around ``roi``, within the volume; along an axis cut in
        units, as far as the last block that starts in ``roi``'s first unit reaches, so that
        all those blocks (a run: `Work.runs`) read one region."""
        begin, end = list(roi.begin), list(roi.end)
        for axis, (u, n) in enumerate(zip(self.unit, self.shape, strict=True)):
            if u == 1:
                continue
            begin[axis] = begin[axis] // u * u
            if self.block is not None:  # the last block that starts in this unit
                k = self.block[axis]
                end[axis] = max(end[axis], (begin[axis] + u - 1) // k * k + k)
            end[axis] = min(-(-end[axis] // u) * u, n)
        return Roi(begin, [e - b for b, e in zip(begin, end, strict=True)])

    def _regions(self) -> OrderedDict[tuple[Zyx, Zyx], tuple[Roi, np.ndarray]]:
        """This process's regions (dropped when the work is pickled for the workers)."""
        regions = self.__dict__.get("_kept")
        if regions is None:
            regions = OrderedDict()
            object.__setattr__(self, "_kept", regions)
        return regions

    @property
    def chunks(self) -> tuple[int, ...] | None:
        return self.inner.chunks


@dataclass(frozen=True)
class Work:
    """What every worker needs to score its blocks: the checked volumes (segmentation or
    prediction, truth, and the mask if any; 3-d), the block size and what to count."""

    volumes: tuple[Volume, ...]
    block: Zyx
    connected_truth: bool = False
    binary: bool = False
    threshold: float = 0.5
    region: Zyx = (1, 1, 1)
    """Where blocks share a region (`Regions`): the blocks whose begins lie in the same
    multiples of it per axis."""
    folder: str = field(default_factory=os.getcwd)
    """The working folder the volumes were named from (`load_work`)."""

    @property
    def shape(self) -> Zyx:
        return zyx(self.volumes[0].shape)

    @property
    def grid(self) -> BlockGrid:
        return BlockGrid(box_of(self.shape), self.block)

    def order(self) -> list[int]:
        """Every block's number, the blocks of each region together (raster order within
        and between regions): one worker taking them in turn decodes each region once."""
        return [index for run in self.runs() for index in run]

    def runs(self) -> list[list[int]]:
        """`order` cut where the region changes: the blocks to hand one worker together, so
        that no two workers decode the same region (handed out one by one, every worker
        took some blocks of each region and decoded it). One block per run where blocks
        share no region."""
        counts = tuple(self.grid.counts)
        where = np.indices(counts).reshape(3, -1)
        keys = [w * b // r for w, b, r in zip(where, self.block, self.region, strict=True)]
        order = np.lexsort((np.arange(where.shape[1]), *keys[::-1]))
        region = np.stack(keys)[:, order]
        cuts = np.flatnonzero(np.any(region[:, 1:] != region[:, :-1], axis=0)) + 1
        return [run.tolist() for run in np.split(order, cuts)]

    @property
    def run_box(self) -> Zyx:
        """The box whose blocks make one run (`runs`), on a grid from the volume's origin:
        the region where blocks share one, else the block (a run of one)."""
        return zyx(r if r > 1 else b for r, b in zip(self.region, self.block, strict=True))

    def run_at(self, roi: Roi) -> list[int]:
        """The numbers of the blocks that start inside ``roi`` (a box of the `run_box`
        grid, perhaps cut at the volume's end): one run, in raster order."""
        counts = tuple(self.grid.counts)
        ranges = [np.arange(-(-int(lo) // b), min(-(-int(hi) // b), n))
                  for lo, hi, b, n in zip(roi.begin, roi.end, self.block, counts, strict=True)]
        where = np.meshgrid(*ranges, indexing="ij")
        return np.ravel_multi_index(tuple(w.ravel() for w in where), counts).tolist()


def prepare(volumes: Sequence[Volume], block: Sequence[int] | None = None, *,
            connected_truth: bool = False, binary: bool = False, threshold: float = 0.5
            ) -> Work:
    """The work of scoring ``volumes`` (already checked: same shape, 2-d or 3-d) in blocks
    of ``block`` voxels (z, y, x; default `default_block`)."""
    volumes = tuple(Sections(inner=v, path=v.path, dataset=v.dataset, shape=(1, *v.shape),
                             dtype=v.dtype) if len(v.shape) == 2 else v for v in volumes)
    shape = zyx(volumes[0].shape)
    chosen = zyx(block) if block is not None else default_block(volumes)
    chosen = zyx(max(1, min(b, n)) for b, n in zip(chosen, shape, strict=True))
    if block is not None:  # the default grows with the volume; a user's may not
        check_block_count(shape, chosen)
    region = zyx(u if b < min(u, n) else 1
                 for b, u, n in zip(chosen, chunk_unit(volumes), shape, strict=True))
    if region != (1, 1, 1):  # blocks thinner than the chunks: each read in regions
        volumes = tuple(Regions(inner=v, path=v.path, dataset=v.dataset, shape=v.shape,
                                dtype=v.dtype, unit=region, block=chosen,
                                keep=FACE_REGIONS if i == 1 and connected_truth else 1)
                        for i, v in enumerate(volumes))
    return Work(volumes, chosen, connected_truth, binary, threshold, region)


FACE_REGIONS = 4
"""Regions of the truth a worker keeps with ``connected_truth``: its block's and those just
beyond the block's three upper faces (the planes read there, `_block_pieces`), which the
next regions' blocks then use."""


def chunk_unit(volumes: Sequence[Volume]) -> Zyx:
    """The largest storage chunk of the volumes per axis (z, y, x; 1 where none is known)."""
    unit = [1, 1, 1]
    for volume in volumes:
        chunks = volume.chunks
        if chunks is not None:
            unit = [max(u, int(c)) for u, c in zip(unit, chunks[-3:], strict=True)]
    return zyx(unit)


def default_block(volumes: Sequence[Volume], voxels: int = BLOCK_VOXELS) -> Zyx:
    """Whole storage chunks (the largest chunk of the volumes per axis), doubled along the
    axis where the block is thinnest until it holds about ``voxels``, within the volume."""
    shape = zyx(volumes[0].shape)
    unit = chunk_unit(volumes)
    block = [min(u, n) for u, n in zip(unit, shape, strict=True)]
    while math.prod(block) * 2 <= voxels:
        growable = [a for a in range(3) if block[a] < shape[a]]
        if not growable:
            break
        axis = min(growable, key=lambda a: block[a])
        block[axis] = min(block[axis] * 2, shape[axis])
    return zyx(block)


def score_block(work: Work, index: int) -> dict[str, np.ndarray]:
    """What block ``index`` (raster order) contributes, as arrays: ``counts`` (tp, fp, fn,
    tn) with ``binary``; else its table (``seg``, ``truth``, ``counts``), and with
    ``connected_truth`` its ``pieces`` (first voxels) and ``links`` (piece, face piece)."""
    roi = work.grid.box([int(i) for i in np.unravel_index(index, tuple(work.grid.counts))])
    mask = work.volumes[2].read(roi) if len(work.volumes) > 2 else None
    if work.binary:
        counts = count_binary(work.volumes[0].read(roi), work.volumes[1].read(roi), mask,
                              work.threshold, str(work.volumes[0]))
        return {"counts": np.array([counts.tp, counts.fp, counts.fn, counts.tn], np.int64)}
    seg, truth = work.volumes[0].read(roi), work.volumes[1].read(roi)
    if not work.connected_truth:
        table = count_pairs(seg, truth, mask)
        return {"seg": table.seg, "truth": table.truth, "counts": table.counts,
                "negative": np.array(table.negative, np.int64)}
    pieces, keys, links = _block_pieces(work, roi, truth)
    table = count_pairs(seg, pieces, mask, labelled=truth)
    table = reduce_pairs(table.seg, keys[table.truth.astype(np.int64) - 1], table.counts,
                         table.negative)
    return {"seg": table.seg, "truth": table.truth, "counts": table.counts,
            "negative": np.array(table.negative, np.int64), "pieces": keys, "links": links}


def write_block(folder: Path, work: Work, index: int) -> None:
    """Score block ``index`` and write its file, complete or not at all. The folder is not
    created: a worker outliving a run whose folder is gone writes nothing."""
    path = block_file(folder, index)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(partial, "xb") as handle:
            np.savez(handle, **score_block(work, index))
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def block_file(folder: Path, index: int) -> Path:
    return folder / f"block-{index}.npz"


def save_work(folder: Path, work: Work) -> Path:
    path = folder / WORK_FILE
    path.write_bytes(pickle.dumps(work))
    return path


@functools.cache
def load_work(folder: str) -> Work:
    """The work a run saved in its (private) work folder, read once per worker, which then
    works in the folder the volumes were named from: a worker `--launch` started elsewhere
    (ssh, a batch system's own folder) could not open `seg.zarr` given relatively."""
    work: Work = pickle.loads((Path(folder) / WORK_FILE).read_bytes())
    if work.folder != os.getcwd() and os.path.isdir(work.folder):
        os.chdir(work.folder)
    return work


def missing_blocks(folder: Path, work: Work) -> list[int]:
    """The blocks without a file, from one listing of the folder (not a stat per block:
    slow for 10^5 blocks on a shared file system)."""
    present = set(os.listdir(folder))
    return [i for i in range(len(work.grid)) if block_file(folder, i).name not in present]


def merge_blocks(folder: Path, work: Work) -> ContingencyTable | BinaryCounts:
    """The volume's table (or confusion counts) from every block's file."""
    count = len(work.grid)
    if work.binary:
        total = np.zeros(4, np.int64)
        for index in range(count):
            with np.load(block_file(folder, index)) as block:
                total += block["counts"]
        return BinaryCounts(*(int(n) for n in total))
    pieces = join_pieces(folder, count) if work.connected_truth else None
    table = TableAccumulator()
    for index in range(count):
        with np.load(block_file(folder, index)) as block:
            truth = block["truth"]
            if pieces is not None:
                keys, whole = pieces
                truth = whole[np.searchsorted(keys, truth)]
            table.add(reduce_pairs(block["seg"], truth, block["counts"],
                                   tuple(block["negative"].tolist())))
    return table.result()


def join_pieces(folder: Path, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Every block piece's name (first voxel, sorted) and its whole piece's id (1..K,
    numbered by first voxel), from the pieces and links of ``count`` block files."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    keys, links = [], []
    for index in range(count):
        with np.load(block_file(folder, index)) as block:
            keys.append(block["pieces"])
            links.append(block["links"])
    pieces = np.sort(np.concatenate(keys))  # first voxels: distinct across blocks
    pairs = np.concatenate(links)
    faces = np.unique(pairs[:, 1])
    nodes = pieces.size + faces.size
    edges = (np.searchsorted(pieces, pairs[:, 0]),
             pieces.size + np.searchsorted(faces, pairs[:, 1]))
    graph = coo_matrix((np.ones(len(pairs), np.int8), edges), shape=(nodes, nodes))
    _, component = connected_components(graph, directed=False)
    component = component[: pieces.size]  # sorted by first voxel: that order numbers them
    return pieces, number_in_order(component, np.arange(pieces.size))[component]


def _block_pieces(work: Work, roi: Roi, truth: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The block's pieces (ids 1..k), each piece's name (the flat index in the volume of its
    first voxel) and the block's links (piece name, face piece name) across its faces."""
    shape = work.shape
    voxels = math.prod(shape)
    pieces = connected_pieces(truth)
    keys = _names(np.unravel_index(first_voxels(pieces), pieces.shape), roi.begin, shape)
    links = []
    for axis in range(3):
        # Faces of different axes can share a first voxel: their names are kept apart.
        offset = np.uint64(voxels * (1 + axis))
        if roi.begin[axis] > 0:  # the first plane: its 2-d pieces lie in the block's pieces
            plane = _plane_roi(roi, axis, roi.begin[axis])
            labels, names = _face_pieces(np.take(truth, 0, axis), plane, axis, shape)
            first = first_voxels(labels)
            holder = np.take(pieces, 0, axis).ravel()[first]
            links.append(np.stack([keys[holder.astype(np.int64) - 1], names + offset], 1))
        if roi.end[axis] < shape[axis]:  # the next block's first plane, read from here
            plane = _plane_roi(roi, axis, roi.end[axis])
            across = np.take(work.volumes[1].read(plane), 0, axis)
            labels, names = _face_pieces(across, plane, axis, shape)
            mine = np.take(truth, -1, axis)
            touch = (mine == across) & (across != 0)
            if touch.any():
                near = keys[np.take(pieces, -1, axis)[touch].astype(np.int64) - 1]
                far = names[labels[touch].astype(np.int64) - 1] + offset
                links.append(np.unique(np.stack([near, far], 1), axis=0))
    links = [np.zeros((0, 2), np.uint64), *links]
    return pieces, keys, np.concatenate(links).astype(np.uint64)


def _face_pieces(plane: np.ndarray, roi: Roi, axis: int, shape: Zyx
                 ) -> tuple[np.ndarray, np.ndarray]:
    """A face plane's 2-d pieces (4-connected, equal ids; labels 1..k in its 2-d shape) and
    their names (flat index in the volume of their first voxels); ``roi``: the plane's box,
    one voxel thick along ``axis``."""
    labels = label_pieces(plane, connectivity=4)
    first = np.unravel_index(first_voxels(labels), labels.shape)
    local = (*first[:axis], np.zeros_like(first[0]), *first[axis:])
    return labels, _names(local, roi.begin, shape)


def _names(local: Sequence[np.ndarray], begin: Sequence[int], shape: Zyx) -> np.ndarray:
    """Flat indices in the volume of voxels at ``local`` (z, y, x index arrays) in a box
    starting at ``begin``."""
    where = tuple(np.asarray(i, np.int64) + int(b) for i, b in zip(local, begin, strict=True))
    return np.ravel_multi_index(where, shape).astype(np.uint64)


def _plane_roi(roi: Roi, axis: int, at: int) -> Roi:
    begin, shape = list(roi.begin), list(roi.shape)
    begin[axis], shape[axis] = at, 1
    return Roi(begin, shape)
