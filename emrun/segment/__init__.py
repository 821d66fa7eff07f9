"""Affinities -> segments: mutex watershed (`mws`, the default), waterz agglomeration
(`waterz`, optional extra) and connected components (`cc`), in memory or block by block.

Importing this package registers the builders of the `segmenters` registry, whose specs
live in emrun.recipe.run: ``segmenters.build(spec)`` returns a :class:`Segmenter`. Layers:

- affinities: offsets, channel conventions, uint8/float input;
- mws, waterz, cc: the methods (fragments of one region, and how blocks stitch);
- graph: id tables, region adjacency, small-segment merging;
- pipeline: one region in memory (`segment_array`); blockwise (with boxes): volumes on
  disk, block by block;
- sweep: one segmentation per parameter value, scored against truth, best by adapted Rand;
- request: what `emrun segment` is asked (one checked value); job: the command's work
  (files in, OME-Zarr out).
"""

from __future__ import annotations

from . import cc, mws, waterz
from .base import Segmenter
from .blockwise import BlockwiseResult, segment_into
from .pipeline import segment_array, segment_values
from .sweep import SweepResult, sweep

__all__ = ["BlockwiseResult", "Segmenter", "SweepResult", "cc", "mws", "segment_array",
           "segment_into", "segment_values", "sweep", "waterz"]
