"""Voxel-wise scores of a binary (semantic) prediction: precision, recall, F1, IoU.

For semantic tasks (mitochondria, synapses, myelin) the prediction is a foreground map,
not ids. Which voxels count as predicted foreground depends on the dtype:

- bool: as is;
- uint8: probabilities stored as 0..255 (what `emrun infer` writes): value > threshold * 255;
- float: probabilities: value > threshold (NaN is background; values outside [0, 1] are
  logits, refused);
- other integers (uint16, int32, uint64, ...): ids or a 0/1 mask: value != 0.

A uint8 0/1 mask is therefore read as probabilities (all below 0.5); store such a mask as
bool, or pass threshold 0. The truth's foreground is always truth != 0 (NaN excluded).
Voxels where the mask is 0 (or NaN) are not counted.

A ratio whose denominator is 0 is undefined, and reported as None (null in JSON, "n/a" in
the text), never as a number that could be averaged with real ones: precision when nothing
is predicted (tp + fp = 0), recall when the truth has no foreground (tp + fn = 0), F1 and
IoU when neither has any (tp + fp + fn = 0). So a prediction of foreground where the truth
has none scores precision 0, F1 0, IoU 0 and no recall (there was nothing to recall),
and an empty prediction of an empty truth scores none of the four.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from emrun.errors import UserError
from emrun.evaluate.checks import EvaluationError, check_inputs, one_channel_dropped
from emrun.io.intensity import outside_unit
from emrun.io.masks import inside


@dataclass(frozen=True)
class BinaryCounts:
    """Confusion counts over the scored voxels; they add up across blocks."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    def __add__(self, other: BinaryCounts) -> BinaryCounts:
        return BinaryCounts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn,
                            self.tn + other.tn)


@dataclass(frozen=True)
class BinaryScores:
    """Precision, recall, F1 and IoU of the foreground, with the counts behind them."""

    precision: float | None  # None: undefined (a denominator of 0; module docstring)
    recall: float | None
    f1: float | None
    iou: float | None
    tp: int
    fp: int
    fn: int
    tn: int
    voxels: int
    threshold: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def foreground(pred: np.ndarray, threshold: float = 0.5, name: str = "the prediction"
               ) -> np.ndarray:
    """The predicted foreground of a block, by the dtype rules in the module docstring;
    ``name``: the prediction's volume, for the error a float outside [0, 1] is."""
    if pred.dtype == np.bool_:
        return pred
    if pred.dtype == np.uint8:
        return pred > threshold * 255
    if pred.dtype.kind == "f":
        known = pred[~np.isnan(pred)]  # NaN is background; an infinity is a logit's
        if known.size and outside_unit(float(known.min()), float(known.max())):
            raise UserError(f"{name}: the prediction holds values in [{float(known.min()):.4g}, "
                            f"{float(known.max()):.4g}], outside [0, 1]: a float prediction "
                            "is a probability (apply a sigmoid to logits), or give a bool or "
                            "integer mask")
        return pred > threshold
    return pred != 0


def thresholded(dtype: np.dtype) -> bool:
    """Whether a prediction of ``dtype`` is cut at a threshold (probabilities: float, uint8)
    rather than taken where non-zero (bool, the other integers)."""
    return dtype == np.uint8 or dtype.kind == "f"


def foreground_rule(dtype: np.dtype, threshold: float) -> str:
    """Which voxels of a ``dtype`` prediction are its foreground, in words (the text said
    'above 0.9' of an integer prediction taken where non-zero)."""
    if not thresholded(dtype):
        return "non-zero"
    return f"above {threshold:g}" + (" x 255" if dtype == np.uint8 else "")


def check_threshold_used(name: str, dtype: np.dtype) -> None:
    """Refuse a threshold given for a prediction that is taken where non-zero: it would be
    ignored without a word (a 0/1 or id map of uint16, say, or bool)."""
    if not thresholded(np.dtype(dtype)):
        raise UserError(f"{name}: --threshold is for probabilities (float or uint8), but this "
                        f"prediction is {np.dtype(dtype)}, whose foreground is its non-zero "
                        "voxels: drop --threshold")


def truth_foreground(truth: np.ndarray) -> np.ndarray:
    """The truth's foreground: non-zero, NaN not (as in a prediction)."""
    if truth.dtype.kind == "f":
        return np.nan_to_num(truth, nan=0.0) != 0
    return truth != 0


def count_binary(
    pred: np.ndarray, truth: np.ndarray, mask: np.ndarray | None = None, threshold: float = 0.5,
    name: str = "the prediction",
) -> BinaryCounts:
    """Confusion counts of one block (``name``: the prediction's, for `foreground`)."""
    p = np.ravel(foreground(pred, threshold, name))
    t = np.ravel(truth_foreground(truth))
    if mask is not None:
        keep = np.ravel(inside(mask))
        p, t = p[keep], t[keep]
    tp = int(np.count_nonzero(p & t))
    predicted, true = int(np.count_nonzero(p)), int(np.count_nonzero(t))
    return BinaryCounts(tp=tp, fp=predicted - tp, fn=true - tp,
                        tn=int(p.size) - predicted - true + tp)


def scores_from_counts(counts: BinaryCounts, threshold: float = 0.5) -> BinaryScores:
    """The ratios, None where undefined (module docstring)."""
    tp, fp, fn, tn = counts.tp, counts.fp, counts.fn, counts.tn
    return BinaryScores(
        precision=_ratio(tp, tp + fp),
        recall=_ratio(tp, tp + fn),
        f1=_ratio(2 * tp, 2 * tp + fp + fn),
        iou=_ratio(tp, tp + fp + fn),
        tp=tp,
        fp=fp,
        fn=fn,
        tn=tn,
        voxels=tp + fp + fn + tn,
        threshold=float(threshold),
    )


def binary_scores(
    pred: np.ndarray, truth: np.ndarray, mask: np.ndarray | None = None, threshold: float = 0.5
) -> BinaryScores:
    """Score an in-memory foreground prediction against its truth."""
    pred, truth = one_channel_dropped(pred), one_channel_dropped(truth)
    mask = None if mask is None else one_channel_dropped(mask)
    named = [("prediction", "pred", pred.shape, pred.dtype),
             ("truth", "truth", truth.shape, truth.dtype)]
    if mask is not None:
        named.append(("mask", "mask", mask.shape, mask.dtype))
    check_inputs(named, binary=True)
    counts = count_binary(pred, truth, mask, threshold)
    if counts == BinaryCounts():  # only an all-0 mask leaves no voxel
        raise EvaluationError("mask: the mask is 0 everywhere (or NaN); nothing to score")
    return scores_from_counts(counts, threshold)


def _ratio(numerator: int, denominator: int) -> float | None:
    """numerator / denominator; None (undefined) when the denominator is 0."""
    return numerator / denominator if denominator else None
