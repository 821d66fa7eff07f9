"""Waterz (Funke et al. 2018): watershed fragments, then agglomeration by mean or
85th-percentile boundary affinity. Needs the optional `waterz` package (``emrun[waterz]``).

Thresholds keep waterz's own meaning: a region pair merges while its score ``1 - affinity``
(mean or 85th percentile over their boundary) is below the threshold, so a larger
threshold merges more. Several thresholds come out of one agglomeration, in one pass.
Waterz uses only the three nearest-neighbour channels, each linking v to v - 1 along its
axis (our (-1, 0, 0), (0, -1, 0), (0, 0, -1)); a (+1) channel is shifted into that form.
It runs on the whole volume in memory; blockwise segmentation is mws's or cc's job.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ..errors import UserError
from ..recipe.run import Waterz
from ..registry import segmenters
from .affinities import Offset, is_nearest, nearest_axes
from .base import Segmenter, edge_valid
from .graph import Edges

__all__ = ["SCORING", "WaterzSegmenter", "build_waterz"]

# waterz's scoring-function types for the spec's names (both ship precompiled).
SCORING = {
    "mean": "OneMinus<MeanAffinity<RegionGraphType, ScoreValue>>",
    "p85": "OneMinus<HistogramQuantileAffinity<RegionGraphType, 85, ScoreValue, 256, false>>",
}


def _waterz() -> Any:
    try:
        return importlib.import_module("waterz")
    except ImportError:
        raise UserError("segmenter waterz needs the waterz package: pip install "
                        "'emrun[waterz]' (or use --method mws or cc)") from None


@contextmanager
def _quiet() -> Iterator[None]:
    """Send what C++ code writes to file descriptor 1 to /dev/null meanwhile, so that
    stdout stays the command's (e.g. its final JSON line)."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def waterz_affinities(affs: np.ndarray, offsets: Sequence[Offset],
                      mask: np.ndarray | None) -> np.ndarray:
    """The three nearest-neighbour channels in waterz's layout (z, y, x; channel a at v
    links v and v - 1 along a), float32, C-contiguous, 0 on edges touching the mask. An
    axis without a channel (2-d affinities of one section: no z) gets 0, which is what
    waterz has there anyway: an axis one voxel long has no edge."""
    out = np.zeros((3, *affs.shape[1:]), np.float32)
    for axis, channels in enumerate(nearest_axes(offsets)):
        if not channels:
            continue
        back = [c for c in channels if offsets[c][axis] < 0]
        c = back[0] if back else channels[0]
        offset = offsets[c]
        src = [slice(None)] * 3
        dst = [slice(None)] * 3
        if offset[axis] > 0:  # p at v links v and v + 1: it is waterz's value at v + 1
            src[axis], dst[axis] = slice(0, -1), slice(1, None)
        out[(axis, *dst)] = affs[(c, *src)]
        if mask is not None and mask.shape[axis] > 1:  # one voxel thick: no edge to mask
            backward = tuple(-1 if a == axis else 0 for a in range(3))
            valid = edge_valid(mask, backward)  # over v with v - 1 inside: v >= 1
            inner = [slice(None)] * 3
            inner[axis] = slice(1, None)
            out[(axis, *inner)] *= valid
        first = [slice(None)] * 3
        first[axis] = slice(0, 1)
        out[(axis, *first)] = 0.0  # v - 1 is outside the region
    return out


@dataclass(frozen=True)
class WaterzSegmenter(Segmenter):
    """Watershed plus agglomeration (spec ``waterz``); in memory only."""

    spec: Waterz
    blockwise: ClassVar[bool] = False

    def channels(self, offsets: Sequence[Offset]) -> list[int]:
        return [c for c, offset in enumerate(offsets) if is_nearest(offset)]

    def fragments(self, affs: np.ndarray, offsets: Sequence[Offset],
                  mask: np.ndarray | None) -> np.ndarray:
        return next(self.fragments_for([self.value], affs, offsets, mask))

    def fragments_for(self, values: Sequence[float], affs: np.ndarray,
                      offsets: Sequence[Offset], mask: np.ndarray | None
                      ) -> Iterator[np.ndarray]:
        waterz = _waterz()
        prepared = waterz_affinities(affs, offsets, mask)
        wanted = [float(v) for v in values]
        order = sorted(set(wanted))
        runs = iter(waterz.agglomerate(prepared, order,
                                       scoring_function=SCORING[self.spec.scoring]))
        streamed = wanted == order  # increasing: hand each out as it comes
        results: dict[float, np.ndarray] = {}
        for threshold in order:
            with _quiet():  # waterz's C++ side reports progress on stdout
                labels = np.array(next(runs), copy=True)  # it refines one array in place
            if mask is not None:
                labels[~mask] = 0
            if streamed:
                yield labels
            else:
                results[threshold] = labels
        if not streamed:
            for value in wanted:
                yield results[value]

    def bytes_per_voxel(self, channels: int) -> int:
        return 4 * channels + 80

    def face_edges(self, u: np.ndarray, v: np.ndarray, p: np.ndarray,
                   offset: Offset) -> Edges:
        raise UserError("waterz segments in memory only; use --method mws or cc blockwise")

    def stitch(self, edges: Edges, count: int) -> np.ndarray:
        raise UserError("waterz segments in memory only; use --method mws or cc blockwise")


@segmenters.implement("waterz")
def build_waterz(spec: Waterz, **context: Any) -> WaterzSegmenter:
    _waterz()  # without the package, building says so (before any work is done)
    return WaterzSegmenter(spec)
