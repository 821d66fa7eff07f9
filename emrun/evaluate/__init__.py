"""Evaluation: segmentation scores (adapted Rand error, VOI split/merge, CREMI score, split
and merge counts) from a sparse contingency table, and binary foreground scores (precision,
recall, F1, IoU), in memory or streamed over volumes on disk.

`score` / `score_volumes` and `binary_scores` / `binary_scores_volumes` are the entry
points; `emrun.evaluate.metrics` and `emrun.evaluate.binary` state the conventions. Volumes
are scored in one process, or in blocks by worker processes or daisy (`Parallel`).
"""

from __future__ import annotations

from emrun.evaluate.binary import BinaryScores, binary_scores
from emrun.evaluate.checks import EvaluationError
from emrun.evaluate.contingency import ContingencyTable, count_pairs, merge_tables
from emrun.evaluate.metrics import MIN_OVERLAP, Scores, score, scores_from_table
from emrun.evaluate.schedule import Parallel
from emrun.evaluate.volumes import binary_scores_volumes, score_volumes

__all__ = [
    "MIN_OVERLAP",
    "BinaryScores",
    "ContingencyTable",
    "EvaluationError",
    "Parallel",
    "Scores",
    "binary_scores",
    "binary_scores_volumes",
    "count_pairs",
    "merge_tables",
    "score",
    "score_volumes",
    "scores_from_table",
]
