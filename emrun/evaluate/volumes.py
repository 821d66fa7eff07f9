"""Scoring volumes on disk, streamed in slabs so memory is bounded by the slab, not the volume.

Slabs follow the storage chunks (a whole number of z-chunks deep, cut along y into bands of
whole y-chunks when a slab would exceed `slab_voxels`), so each chunk is decoded once.
Per-slab contingency tables (or confusion counts) are merged exactly, so the scores equal
the in-memory ones for any slab size.

With ``parallel`` the volume is scored in blocks instead, by worker processes or daisy
workers (`emrun.evaluate.blockwise`, `emrun.evaluate.schedule`), and the blocks' tables
merged the same way: the table, and so every score, is the same as in one process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np

from emrun.evaluate.binary import BinaryCounts, BinaryScores, count_binary, scores_from_counts
from emrun.evaluate.blockwise import prepare
from emrun.evaluate.checks import EvaluationError, check_inputs, negative_id_warnings
from emrun.evaluate.contingency import ContingencyTable, TableAccumulator, count_pairs
from emrun.evaluate.metrics import MIN_OVERLAP, Scores, scores_from_table
from emrun.evaluate.pieces import PieceLabeller
from emrun.evaluate.schedule import Parallel, score_blocks
from emrun.geometry import BlockGrid, Roi, box_of
from emrun.io.masks import inside
from emrun.io.one_channel import single_channel
from emrun.io.volume import Volume
from emrun.io.window import covered_part, off_grid

SLAB_VOXELS = 8_000_000  # ~0.1 GB of working memory for two uint32 volumes


def score_volumes(
    seg: Volume,
    truth: Volume,
    mask: Volume | None = None,
    min_overlap: int = MIN_OVERLAP,
    slab_voxels: int = SLAB_VOXELS,
    connected_truth: bool = False,
    on_slab: Callable[[int, int], None] | None = None,
    parallel: Parallel | None = None,
    warn: Callable[[str], None] | None = None,
) -> Scores:
    """Score a segmentation volume against its truth (see `emrun.evaluate.metrics`); with
    ``connected_truth``, against the truth's connected pieces inside the volume
    (`emrun.evaluate.pieces`). ``on_slab(done, total)`` follows the slabs read (with
    ``parallel``: the blocks scored). ``warn`` takes a line for each volume with negative
    ids among the scored voxels, found wherever they are (`negative_id_warnings`)."""
    volumes = _checked([("segmentation", seg), ("truth", truth), ("mask", mask)])
    if parallel is not None:
        work = prepare(volumes, parallel.block, connected_truth=connected_truth)
        result = score_blocks(work, parallel, on_slab)
        assert isinstance(result, ContingencyTable)
    else:
        result = _streamed_table(volumes, slab_voxels, connected_truth, on_slab)
    if len(result) == 0:
        raise EvaluationError(_nothing_scored(volumes))
    if warn is not None:
        for line in negative_id_warnings(result.negative, str(volumes[0]), str(volumes[1])):
            warn(line)
    return scores_from_table(result, min_overlap)


def _nothing_scored(volumes: Sequence[Volume]) -> str:
    """Why no voxel was scored, naming the volume at fault: an all-0 mask is not an all-0
    truth (an extra pass over the mask, on this error path only)."""
    truth = volumes[1]
    if len(volumes) < 3:
        return f"{truth}: the truth has no labelled voxel (all 0); nothing to score"
    mask = volumes[2]
    if not any(np.any(inside(mask.read(roi))) for roi in slabs([mask])):
        return (f"{mask}: the mask is 0 everywhere (or NaN), so no voxel is inside the mask; "
                "nothing to score")
    return (f"{truth}: the truth has no labelled voxel inside the mask {mask} (it is 0 "
            "wherever the mask is non-zero); nothing to score")


def _streamed_table(volumes: Sequence[Volume], slab_voxels: int, connected_truth: bool,
                    on_slab: Callable[[int, int], None] | None) -> ContingencyTable:
    """The volumes' table, slab by slab in this process."""
    table = TableAccumulator()
    pieces = PieceLabeller() if connected_truth else None
    rois = list(slabs(volumes, slab_voxels))
    for done, roi in enumerate(rois, 1):
        if on_slab is not None:
            on_slab(done, len(rois))
        arrays = [v.read(roi) for v in volumes]
        labelled = arrays[1]
        if pieces is not None:
            arrays[1] = pieces.label(roi, labelled)
        table.add(count_pairs(*arrays, labelled=labelled))
    result = table.result()
    return pieces.join(result) if pieces is not None else result


def binary_scores_volumes(
    pred: Volume,
    truth: Volume,
    mask: Volume | None = None,
    threshold: float = 0.5,
    slab_voxels: int = SLAB_VOXELS,
    on_slab: Callable[[int, int], None] | None = None,
    parallel: Parallel | None = None,
) -> BinaryScores:
    """Precision, recall, F1, IoU of a foreground prediction (see `emrun.evaluate.binary`)."""
    volumes = _checked([("prediction", pred), ("truth", truth), ("mask", mask)], binary=True)
    if parallel is not None:
        work = prepare(volumes, parallel.block, binary=True, threshold=threshold)
        counts = score_blocks(work, parallel, on_slab)
        assert isinstance(counts, BinaryCounts)
    else:
        counts = BinaryCounts()
        for done, roi in enumerate(rois := list(slabs(volumes, slab_voxels)), 1):
            if on_slab is not None:
                on_slab(done, len(rois))
            counts += count_binary(*(v.read(roi) for v in volumes[:2]),
                                   volumes[2].read(roi) if mask is not None else None,
                                   threshold, str(volumes[0]))
    if counts == BinaryCounts():
        what = f"{mask}: the mask is 0 everywhere" if mask is not None else f"{pred}: no voxels"
        raise EvaluationError(f"{what}; nothing to score")
    return scores_from_counts(counts, threshold)


def slabs(volumes: Sequence[Volume], slab_voxels: int = SLAB_VOXELS) -> Iterator[Roi]:
    """ROIs covering the (common) shape, aligned to every volume's chunks where known."""
    shape = volumes[0].shape
    depth, band = 1, 1
    for volume in volumes:
        chunks = volume.chunks
        if chunks is not None:
            depth, band = max(depth, chunks[0]), max(band, chunks[1])
    section = int(np.prod(shape[1:]))
    row = int(np.prod(shape[2:]))
    depth = min(depth * max(1, slab_voxels // max(1, depth * section)), max(1, shape[0]))
    rows = max(band, slab_voxels // max(1, depth * row) // band * band)
    slab = (depth, rows, *(max(1, n) for n in shape[2:]))
    yield from BlockGrid(box_of(shape), slab).boxes()


def on_one_box(seg: Volume, truth: Volume, mask: Volume | None = None
               ) -> tuple[Volume, Volume, Volume | None]:
    """The volumes read on one box where their offsets place them: the segmentation where a
    truth of a sub-box lies (an annotated crop), the truth and the mask where the
    segmentation lies when they are larger; otherwise unchanged (the shape checks then
    speak). The command names the volumes by these, and the scores read them."""
    seg = covered_part(truth, seg)
    return seg, covered_part(seg, truth), None if mask is None else covered_part(seg, mask)


def _checked(
    roles: Sequence[tuple[str, Volume | None]], binary: bool = False
) -> list[Volume]:
    """The given volumes, after `check_inputs` on their shapes and dtypes."""
    given = [(role, single_channel(v)) for role, v in roles if v is not None]
    placed = on_one_box(*(v for _, v in given))
    given = [(role, v) for (role, _), v in zip(given, placed, strict=False)]
    reference = given[0][1]
    for role, volume in given[1:]:
        _check_placed_alike(role, volume, reference)
    check_inputs([(role, str(v), tuple(v.shape), np.dtype(v.dtype)) for role, v in given],
                 binary=binary, offsets=[None if v.offset is None else
                                         [int(o) for o in v.offset[-3:]] for _, v in given])
    return [v for _, v in given]


def _check_placed_alike(role: str, volume: Volume, reference: Volume) -> None:
    """Volumes whose offsets (voxels) place them at different boxes are not compared voxel
    by voxel: a truth that covers only part of the segmentation, or another part, would be
    scored against the wrong voxels. Nor are volumes on other grids (voxel sizes, where
    both state one): voxel i of one is not where voxel i of the other is."""
    problem = off_grid(volume, reference, role, "the segmentation",
                       hint=" (evaluate then scores that part)")
    if problem is not None:
        raise EvaluationError(problem)
