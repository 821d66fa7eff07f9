"""Validation by segmentation: the number that matters, not only the loss.

For every validation source with labels, the model predicts the validation box (the same
lattice and blending as ``emrun infer``; at most ``MAX_VOXELS``, centred), the recipe's
segmenter turns the first affinity task into segments for each value of its parameter
(``segment --sweep``'s code), and each is scored against the labels (adapted Rand error,
VOI; by default against each truth object's connected pieces inside the box,
``train.validate_connected_truth``). Scores are averaged over the sources per value and
the value with the lowest mean adapted Rand error is reported (the values: the segmenter
spec's ``validation_values``), so
``best.pt`` is the checkpoint that segments best at its best setting.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..data.sources import open_sources
from ..evaluate.pieces import connected_pieces
from ..geometry import Roi
from ..infer.array import predict_box
from ..infer.engine import Engine, quantise
from ..io.masks import inside
from ..io.one_channel import single_channel
from ..recipe import Recipe
from ..recipe.run import SegmenterBase
from ..recipe.tasks import AffinityTarget
from ..segment.affinities import nearest_axes
from ..segment.sweep import sweep

MAX_VOXELS = 4_000_000
"""Segmentation validation uses at most this many voxels per source, a crop centred in y and
x with every section: mutex watershed costs about 10 us and 1 KB per voxel with 12 offsets,
so a full CREMI validation box (39 M voxels) would take half an hour and 40 GB per value."""
SCORES = ("arand", "voi_split", "voi_merge", "cremi_score")


def affinity_task(recipe: Recipe) -> str | None:
    """The first task whose target is affinities (the one segmentation uses)."""
    return next((n for n, t in recipe.tasks.items() if isinstance(t.target, AffinityTarget)),
                None)


def central_crop(box: Roi, limit: int) -> Roi:
    """The box, or its centre in y and x (all sections) scaled down to at most ``limit``
    voxels."""
    (oz, oy, ox), (sz, sy, sx) = box.offset, box.shape
    scale = min(1.0, (limit / max(1, sz * sy * sx)) ** 0.5)
    cy, cx = max(1, int(sy * scale)), max(1, int(sx * scale))
    return Roi((oz, oy + (sy - cy) // 2, ox + (sx - cx) // 2), (sz, cy, cx))


@dataclass(frozen=True)
class SegmentationInput:
    """One validation source's predicted affinities (uint8, as `emrun infer` stores them),
    labels and mask: all a scorer needs, small enough to hand to another process."""

    affinities: np.ndarray
    truth: np.ndarray
    mask: np.ndarray | None
    offsets: tuple[tuple[int, int, int], ...]
    nonfinite: int = 0  # network outputs that were NaN or infinite, blended as 0


def predict_validation(recipe: Recipe, model: nn.Module,
                       device: torch.device) -> list[SegmentationInput]:
    """The model's affinities over each labelled validation box (centred crop of at most
    ``MAX_VOXELS``); empty when the recipe has no affinity task or no labelled source."""
    task = affinity_task(recipe)
    if task is None:
        return []
    target = recipe.tasks[task].target
    assert isinstance(target, AffinityTarget)
    engine = Engine(recipe, model, device, tta=1, compile=False)
    inputs = []
    for source in open_sources(recipe.data.validation):
        if source.labels is None:
            continue
        roi = central_crop(source.box, MAX_VOXELS)
        mask = None if source.mask is None else inside(source.mask.read(roi))
        # predicted in the image around it, as `emrun infer --roi` would predict the box
        predicted = predict_box(engine, single_channel(source.image), roi,
                                (source.low, source.high), source.mask)  # NaN outside: black
        truth = source.labels.read(roi)
        if recipe.train.validate_connected_truth:
            truth = connected_pieces(truth)
        inputs.append(SegmentationInput(
            quantise(torch.from_numpy(predicted[task]), "uint8").numpy(), truth, mask,
            tuple(tuple(o) for o in target.offsets),  # type: ignore[arg-type]
            predicted.nonfinite))
    return inputs


def unscorable_sources(recipe: Recipe) -> list[tuple[str, str]]:
    """(name, why) for each labelled validation source whose box (as `predict_validation`
    crops it) has nothing to score a segmentation against (no labelled voxel, or none in its
    mask): found before training, not at the first validation, which would stop the run."""
    task = affinity_task(recipe)
    if task is None:
        return []
    found = []
    for source in open_sources(recipe.data.validation):
        if source.labels is None:
            continue
        roi = central_crop(source.box, MAX_VOXELS)
        if (why_not := _unsegmentable(recipe, task, roi)) is not None:
            found.append((source.name, why_not))
            continue
        labelled = source.labels.read(roi) != 0
        mask = None if source.mask is None else inside(source.mask.read(roi))
        if not labelled.any():
            why = "all 0"
        elif mask is not None and not (labelled & mask).any():
            why = "none inside its mask"
        else:
            continue
        found.append((source.name, f"its labels have no labelled voxel ({why}) in the "
                      f"validation box {roi}: nothing to score a segmentation against; fix "
                      "them, or set train.validate_segmentation: false"))
    return found


def _unsegmentable(recipe: Recipe, task: str, roi: Roi) -> str | None:
    """Why the segmenter cannot take the task's affinities of ``roi``: no nearest-neighbour
    offset along an axis the box is longer than one voxel on (2-d offsets, say, and a box
    of several sections), which `emrun segment` refuses too; None when it can."""
    offsets = recipe.tasks[task].target.offsets  # type: ignore[union-attr]
    missing = [axis for axis, channels in enumerate(nearest_axes(offsets))
               if not channels and roi.shape[axis] > 1]
    if not missing:
        return None
    names = ", ".join("zyx"[a] for a in missing)
    units = ", ".join(str(tuple(-1 if a == m else 0 for a in range(3))) for m in missing)
    return (f"the validation box {roi} is longer than one voxel along {names}, and "
            f"tasks.{task}.target.offsets {[list(o) for o in offsets]} have no "
            f"nearest-neighbour affinity along it: its segmentation cannot be scored; add "
            f"{units}, or set train.validate_segmentation: false")


def score_validation(spec: SegmenterBase, inputs: Sequence[SegmentationInput],
                     values: Sequence[float] | None = None) -> dict[str, float] | None:
    """Segment each input for every value (``segment --sweep``'s function), score, average
    over the inputs per value; the mean scores at the best value and that value (as
    ``segment/<parameter>``). On the CPU; the values of a large enough input are segmented
    side by side in worker processes (``emrun.segment.parallel``)."""
    if not inputs:
        return None
    values = spec.validation_values if values is None else values
    rows = []
    parameter = ""
    for item in inputs:
        result = sweep(item.affinities, item.offsets, spec, values, item.truth, item.mask)
        parameter = result.parameter
        rows.append([dict(s) for s in result.scores])
    means = [{k: float(np.mean([r[i][k] for r in rows])) for k in SCORES}
             for i in range(len(values))]
    best = min(range(len(values)), key=lambda i: means[i]["arand"])
    return {**means[best], f"segment/{parameter}": float(values[best])}
