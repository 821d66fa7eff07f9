"""Segmentation scores from a contingency table: adapted Rand, VOI, CREMI, split/merge counts.

Conventions (the SNEMI3D and CREMI challenges'), with n_st the voxels labelled s in the
segmentation and t in the truth, S_s and T_t the segment and truth object sizes, N the
voxels scored:

- Scored voxels: truth != 0, inside the mask (non-zero, not NaN: `emrun.io.masks`). Truth
  0 (unlabelled, boundary) is dropped entirely; every predicted id is an ordinary segment,
  predicted 0 included. (The original SNEMI3D script instead counts predicted 0 as one-voxel
  segments; for a segmentation with no 0 inside the labelled truth the two agree.)
- rand_split = sum n_st^2 / sum T_t^2: the fraction of same-object voxel pairs of the truth
  that the segmentation keeps together. It falls when true objects are split.
  rand_merge = sum n_st^2 / sum S_s^2: the fraction of same-segment pairs that are truly
  together. It falls when objects are merged. Pairs are ordered and include self-pairs,
  as in SNEMI3D (Arganda-Carreras et al. 2015). arand = 1 - harmonic mean of the two
  = 1 - 2 sum n^2 / (sum T^2 + sum S^2). scikit-image's adapted_rand_error excludes
  self-pairs and returns these two as (precision=rand_split-like, recall=rand_merge-like)
  with its own naming; CREMI's and SNEMI3D's scripts call rand_merge "precision" and
  rand_split "recall".
- voi_split = H(seg | truth), voi_merge = H(truth | seg), in bits: splitting a true object
  in two equal halves costs its share of the volume times one bit of voi_split.
- cremi_score = sqrt(arand * (voi_split + voi_merge)), CREMI's overall ranking score.
- splits: truth objects overlapping two or more segments significantly; merges: segments
  overlapping two or more truth objects significantly. An overlap is significant when it
  holds at least `min_overlap` voxels (default 100: about a 10 x 10 patch of one section,
  above what boundary jitter between two segmentations produces).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from emrun.evaluate.checks import (
    EvaluationError,
    check_inputs,
    negative_id_warnings,
    one_channel_dropped,
)
from emrun.evaluate.contingency import ContingencyTable, count_pairs
from emrun.evaluate.pieces import connected_pieces
from emrun.io.masks import inside

MIN_OVERLAP = 100
EXACT_VOXELS = 3_000_000_000  # up to here sums of squared counts fit int64 exactly


@dataclass(frozen=True)
class Scores:
    """A segmentation's scores against its truth; see the module docstring for definitions."""

    arand: float
    rand_split: float
    rand_merge: float
    voi_split: float
    voi_merge: float
    voi: float
    cremi_score: float
    splits: int
    merges: int
    min_overlap: int
    voxels: int
    truth_objects: int
    segments: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def scores_from_table(table: ContingencyTable, min_overlap: int = MIN_OVERLAP) -> Scores:
    """All scores from one table (rows sorted by seg, then truth, as tables are)."""
    if len(table) == 0:
        raise EvaluationError("nothing to score: the truth has no labelled voxel (all 0)")
    n = table.counts
    seg_start = _group_starts(table.seg)
    seg_sizes = np.add.reduceat(n, seg_start)
    seg_of_row = np.repeat(np.arange(seg_start.size), np.diff(seg_start, append=n.size))
    truth_ids, truth_of_row = np.unique(table.truth, return_inverse=True)
    truth_sizes = np.bincount(truth_of_row, weights=n).astype(np.int64)  # exact below 2^53

    total = int(n.sum())
    sum_n2, sum_s2, sum_t2 = (_sum_squares(x, total) for x in (n, seg_sizes, truth_sizes))
    rand_split = sum_n2 / sum_t2
    rand_merge = sum_n2 / sum_s2
    arand = 1.0 - 2.0 * sum_n2 / (sum_s2 + sum_t2)

    # H(seg|truth) = -sum p_st log2(p_st / p_t), H(truth|seg) = -sum p_st log2(p_st / p_s).
    weights = n / total
    voi_split = max(0.0, -float(weights @ np.log2(n / truth_sizes[truth_of_row])))
    voi_merge = max(0.0, -float(weights @ np.log2(n / seg_sizes[seg_of_row])))

    significant = n >= min_overlap
    splits = int(np.count_nonzero(np.bincount(truth_of_row[significant]) > 1))
    merges = int(np.count_nonzero(np.bincount(seg_of_row[significant]) > 1))
    return Scores(
        arand=float(arand),
        rand_split=float(rand_split),
        rand_merge=float(rand_merge),
        voi_split=voi_split,
        voi_merge=voi_merge,
        voi=voi_split + voi_merge,
        cremi_score=math.sqrt(max(0.0, arand) * (voi_split + voi_merge)),
        splits=splits,
        merges=merges,
        min_overlap=int(min_overlap),
        voxels=total,
        truth_objects=int(truth_ids.size),
        segments=int(seg_start.size),
    )


def score(
    seg: np.ndarray,
    truth: np.ndarray,
    mask: np.ndarray | None = None,
    min_overlap: int = MIN_OVERLAP,
    connected_truth: bool = False,
    warn: Callable[[str], None] | None = None,
) -> Scores:
    """Score an in-memory segmentation against its truth (voxels where mask is 0 ignored);
    with ``connected_truth``, against the truth's connected pieces (`emrun.evaluate.pieces`).
    ``warn`` takes a line for each volume with negative ids among the scored voxels."""
    seg, truth = one_channel_dropped(seg), one_channel_dropped(truth)
    mask = None if mask is None else one_channel_dropped(mask)
    named = [("segmentation", "seg", seg.shape, seg.dtype), ("truth", "truth", truth.shape,
                                                            truth.dtype)]
    if mask is not None:
        named.append(("mask", "mask", mask.shape, mask.dtype))
    check_inputs(named)
    labelled = truth
    if connected_truth:
        truth = connected_pieces(truth)
    table = count_pairs(seg, truth, mask, labelled=labelled)
    if len(table) == 0 and mask is not None:  # the mask's fault, not the truth's
        if not inside(mask).any():
            raise EvaluationError("mask: the mask is 0 everywhere (or NaN); nothing to score")
        raise EvaluationError("truth: the truth has no labelled voxel inside the mask (it is "
                              "0 wherever the mask is non-zero); nothing to score")
    if warn is not None:
        for line in negative_id_warnings(table.negative, "the segmentation", "the truth"):
            warn(line)
    return scores_from_table(table, min_overlap)


def _group_starts(sorted_ids: np.ndarray) -> np.ndarray:
    """Where each run of equal values begins in a sorted array."""
    return np.flatnonzero(np.concatenate(([True], sorted_ids[1:] != sorted_ids[:-1])))


def _sum_squares(x: np.ndarray, total: int) -> int | float:
    """sum x^2: an exact int while int64 cannot overflow (sum x^2 <= total^2 < 2^63), so
    ratios of these sums are correctly rounded (a perfect segmentation scores exactly 0)."""
    if total <= EXACT_VOXELS:
        return int(np.dot(x, x))
    x = x.astype(np.float64)
    return float(np.dot(x, x))
