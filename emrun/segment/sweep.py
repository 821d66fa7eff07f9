"""Choose a segmenter's parameter on data with ground truth: segment once per value, score
each against the truth, keep the one with the lowest adapted Rand error.

Shared by `emrun segment --sweep` and the trainer's validation, so that the number a run
reports is the number the command reproduces. Runs in memory (validation-sized volumes), the
values side by side in worker processes when the volume is large enough to pay for them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import UserError
from ..io.masks import inside
from ..registry import Spec, segmenters
from .affinities import Offset, check_offsets, to_float
from .base import Segmenter
from .parallel import MIN_VOXELS, parallel_workers, shares_work, sweep_in_parallel
from .pipeline import segment_values

__all__ = ["SweepResult", "check_scorable", "sweep"]


@dataclass(frozen=True)
class SweepResult:
    """Every value's scores, and the best segmentation (lowest adapted Rand error; the
    first such value on ties)."""

    method: str
    parameter: str
    values: tuple[float, ...]
    scores: tuple[dict[str, Any], ...]
    best: int
    segmentation: np.ndarray

    @property
    def best_value(self) -> float:
        return self.values[self.best]

    @property
    def best_scores(self) -> dict[str, Any]:
        return self.scores[self.best]

    @property
    def at_edge(self) -> bool:
        """Whether the best value is the lowest or highest one tried (of several): a wider
        range may do better. Only when that edge alone scores best: when other values score
        as well (a sweep where every value scores 0, say), the first of them is chosen, an
        edge only by the order they were tried in, and the best lies inside the range too."""
        best = self.best_scores["arand"]
        tied = {v for v, s in zip(self.values, self.scores, strict=True) if s["arand"] == best}
        return len(set(self.values)) > 1 and tied in ({min(self.values)}, {max(self.values)})

    def table(self) -> list[dict[str, Any]]:
        """One row per value: the value under the parameter's name, then its scores."""
        return [{self.parameter: v, **s} for v, s in zip(self.values, self.scores, strict=True)]

    def summary(self) -> dict[str, Any]:
        """JSON-ready: method, parameter, chosen value, its scores, the whole table."""
        return {"method": self.method, "parameter": self.parameter,
                "chosen": self.best_value, "at_edge": self.at_edge, "best": self.best_scores,
                "table": self.table()}


def check_scorable(truth: np.ndarray, mask: np.ndarray | None, truth_name: str = "the truth",
                   mask_name: str = "the mask",
                   warn: Callable[[str], None] | None = None) -> None:
    """Refuse, before any value is segmented, a truth `emrun evaluate` would not score: not
    integer ids, or no labelled voxel where it is scored (all 0, or all 0 inside the mask,
    or a mask that is 0 or NaN everywhere: each said as what it is, an empty mask is not an
    empty truth). Negative ids are scored as objects, as evaluate does, with the same
    warning (``warn``; default: a line on stderr)."""
    if truth.dtype.kind not in "iu":
        hint = " (a foreground mask: score it with emrun evaluate --binary)" if (
            truth.dtype.kind in "bf") else ""
        raise UserError(f"{truth_name}: the truth has dtype {truth.dtype}, not integer ids; "
                        f"a sweep scores segmentations against integer labels{hint}")
    if mask is not None:
        mask = inside(mask)
    if mask is not None and not np.any(mask):
        raise UserError(f"{mask_name}: the mask is 0 everywhere; nothing to segment or score")
    if not np.any(truth):
        raise UserError(f"{truth_name}: the truth has no labelled voxel (all 0); nothing to "
                        "score the sweep against")
    if mask is not None and not np.any(np.logical_and(truth != 0, mask)):
        raise UserError(f"{truth_name}: the truth has no labelled voxel inside {mask_name} "
                        "(labelled voxels and mask do not overlap); nothing to score")
    if truth.dtype.kind == "i" and np.any(truth < 0):
        (warn or _to_stderr)(f"{truth_name} holds negative ids: each is scored as an object "
                             "(only 0 is unlabelled); map them to 0 first if they mean "
                             "unlabelled")


def _to_stderr(line: str) -> None:
    """A warning where `emrun evaluate` prints its own (stderr; stdout keeps the results)."""
    print(f"warning: {line}", file=sys.stderr, flush=True)


def sweep(affs: np.ndarray, offsets: Sequence[Offset], spec: Spec | Segmenter,
          values: Sequence[float], truth: np.ndarray,
          mask: np.ndarray | None = None, workers: int | None = None,
          on_value: Callable[[int, dict[str, Any]], None] | None = None) -> SweepResult:
    """Segment affinities (c, z, y, x; float, or uint8 with 255 = 1) for each value of the
    method's swept parameter (its spec's ``value_name``) and score against
    ``truth`` (z, y, x ids, 0 unscored) inside ``mask``. ``spec``: a segmenter spec or a
    built segmenter. ``workers``: values segmented at once in worker processes (None: as
    many as cores and memory allow for volumes of a million voxels or more, else 1; worker
    processes are spawned, so a script calling this needs ``if __name__ == "__main__":``).
    ``on_value(i, scores)`` is called as each value's scores are in."""
    from ..evaluate import score

    segmenter = spec if isinstance(spec, Segmenter) else segmenters.build(spec)
    affs = to_float(np.asarray(affs))  # uint8 (255 = 1) as inference writes it, or float
    offsets = tuple(tuple(int(d) for d in o) for o in offsets)  # type: ignore[misc]
    check_offsets(offsets, affs.shape[0], "sweep affinities", affs.shape[1:])
    values = tuple(float(v) for v in values)
    if not values:
        raise UserError("a sweep needs at least one value")
    if truth.shape != affs.shape[1:]:
        raise UserError(f"truth has shape {list(truth.shape)} but the affinities' volume is "
                        f"{list(affs.shape[1:])}")
    if mask is not None and mask.shape != truth.shape:
        raise UserError(f"mask has shape {list(mask.shape)} but the affinities' volume is "
                        f"{list(affs.shape[1:])}")
    if mask is not None:
        mask = inside(mask)  # NaN is outside, as in emrun evaluate
    check_scorable(truth, mask, warn=lambda line: None)  # the caller warned (or a validation)
    if workers is not None and workers < 1:
        raise UserError(f"sweep workers must be at least 1 (got {workers})")
    if shares_work(segmenter) or len(values) == 1:
        workers = 1
    elif workers is None:
        voxels = int(np.prod(affs.shape[1:]))
        workers = 1 if voxels < MIN_VOXELS else parallel_workers(
            len(values), voxels, segmenter.bytes_per_voxel(affs.shape[0]))
    if workers > 1:
        results = sweep_in_parallel(affs, offsets, segmenter, values, truth, mask,
                                    min(workers, len(values)))
    else:
        results = ((score(seg, truth, mask).as_dict(), seg)
                   for seg in segment_values(affs, offsets, segmenter, values, mask))
    rows: list[dict[str, Any]] = []
    best, best_seg = -1, None
    for i, (scores, seg) in enumerate(results):
        rows.append(scores)
        if on_value is not None:  # a sweep takes minutes: each value as it is scored
            on_value(i, scores)
        if best < 0 or rows[-1]["arand"] < rows[best]["arand"]:
            best, best_seg = i, seg
    assert best_seg is not None
    return SweepResult(method=segmenter.spec.type, parameter=segmenter.value_name,
                       values=values, scores=tuple(rows), best=best, segmentation=best_seg)


def value_line(parameter: str, values: Sequence[float], i: int, scores: dict[str, Any]) -> str:
    """A progress line for the ``i``-th value of a sweep."""
    return (f"{parameter} {values[i]:g}: adapted Rand error {scores['arand']:.4f} "
            f"({i + 1} of {len(values)})")
