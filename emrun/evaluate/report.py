"""The human-readable summary `emrun evaluate` prints (rich markup), one fact per line."""

from __future__ import annotations

from rich.markup import escape

from emrun.evaluate.binary import BinaryScores
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


def binary_lines(scores: BinaryScores, pred: str, truth: str, mask: str | None) -> list[str]:
    """Precision, recall, F1 and IoU with the confusion counts behind them."""
    inside = f" inside {escape(mask)}" if mask else ""
    return [
        f"[bold]{escape(pred)}[/] against [bold]{escape(truth)}[/]: {scores.voxels:,} voxels "
        f"scored{inside}, foreground above {scores.threshold:g}",
        f"  precision [bold]{scores.precision:.4f}[/]  recall [bold]{scores.recall:.4f}[/]  "
        f"F1 [bold]{scores.f1:.4f}[/]  IoU [bold]{scores.iou:.4f}[/]",
        f"  true positives {scores.tp:,}, false positives {scores.fp:,}, "
        f"false negatives {scores.fn:,}",
    ]
