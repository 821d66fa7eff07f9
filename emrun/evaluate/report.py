"""The human-readable summary `emrun evaluate` prints (rich markup), one fact per line."""

from __future__ import annotations

import numpy as np
from rich.markup import escape

from emrun.evaluate.binary import BinaryScores, foreground_rule
from emrun.evaluate.metrics import Scores


def score_lines(scores: Scores, seg: str, truth: str, mask: str | None,
                connected_truth: bool = False) -> list[str]:
    """Adapted Rand, VOI, CREMI score and split/merge counts, saying what was scored."""
    inside = f" inside {escape(mask)}" if mask else ""
    objects = "truth objects (their connected pieces)" if connected_truth else "truth objects"
    return [
        f"[bold]{escape(seg)}[/] against [bold]{escape(truth)}[/]: {scores.voxels:,} voxels "
        f"scored (truth != 0{inside}), {scores.truth_objects:,} {objects}, "
        f"{scores.segments:,} segments",
        f"  adapted Rand error  [bold]{scores.arand:.4f}[/]   (Rand split {scores.rand_split:.4f},"
        f" Rand merge {scores.rand_merge:.4f})",
        f"  VOI                 [bold]{scores.voi:.4f}[/] bits (split {scores.voi_split:.4f},"
        f" merge {scores.voi_merge:.4f})",
        f"  CREMI score         [bold]{scores.cremi_score:.4f}[/]",
        f"  {scores.splits:,} split truth objects, {scores.merges:,} merging segments "
        f"(overlaps of at least {scores.min_overlap:,} voxels)",
    ]


def binary_lines(scores: BinaryScores, pred: str, truth: str, mask: str | None,
                 dtype: np.dtype | None = None) -> list[str]:
    """Precision, recall, F1 and IoU with the confusion counts behind them; ``dtype``: the
    prediction's, which says what its foreground is (default: float, above the threshold)."""
    inside = f" inside {escape(mask)}" if mask else ""
    rule = foreground_rule(np.dtype(dtype or np.float32), scores.threshold)
    return [
        f"[bold]{escape(pred)}[/] against [bold]{escape(truth)}[/]: {scores.voxels:,} voxels "
        f"scored{inside}, foreground {rule}",
        f"  precision [bold]{_ratio(scores.precision)}[/]  recall "
        f"[bold]{_ratio(scores.recall)}[/]  F1 [bold]{_ratio(scores.f1)}[/]  IoU "
        f"[bold]{_ratio(scores.iou)}[/]",
        f"  true positives {scores.tp:,}, false positives {scores.fp:,}, "
        f"false negatives {scores.fn:,}",
        *_undefined(scores),
    ]


def _ratio(value: float | None) -> str:
    """A ratio as the JSON line has it: 4 decimals, or n/a where it is undefined (null)."""
    return "n/a" if value is None else f"{value:.4f}"


def _undefined(scores: BinaryScores) -> list[str]:
    """Why a ratio is n/a: which side has no foreground."""
    empty = [what for what, count in (("the prediction", scores.tp + scores.fp),
                                      ("the truth", scores.tp + scores.fn)) if count == 0]
    if not empty:
        return []
    return [f"  n/a: {' and '.join(empty)} {'has' if len(empty) == 1 else 'have'} no "
            "foreground among the scored voxels (0/0 is undefined)"]
