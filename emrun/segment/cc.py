"""Connected components of the affinity graph: two face-adjacent voxels join when a
nearest-neighbour affinity between them exceeds the threshold.

Connectivity is decided by edges, not by a foreground map: two voxels can both lie inside
cells yet stay apart because the affinity between them is low. The edges go into cc3d's
voxel connectivity graph (one bit per direction per voxel), whose colouring is the
components. Block results stitch exactly: joining ids across block faces where the
affinity exceeds the threshold gives the whole-volume components, up to ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import cc3d
import numpy as np

from ..recipe.run import ConnectedComponents
from ..registry import segmenters
from .affinities import Offset, edge_slices, is_nearest
from .base import Segmenter, edge_valid
from .graph import Edges, union

__all__ = ["ComponentsSegmenter"]

# cc3d's 6-connected bit layout, numpy axis order: (+, -) direction bits for axes 0, 1, 2.
_BITS = ((1, 2), (4, 8), (16, 32))


@segmenters.implement("cc")
@dataclass(frozen=True)
class ComponentsSegmenter(Segmenter):
    """Thresholded nearest-neighbour affinities, then components (spec ``cc``)."""

    spec: ConnectedComponents
    exact_stitching: ClassVar[bool] = True

    def channels(self, offsets: Sequence[Offset]) -> list[int]:
        return [c for c, offset in enumerate(offsets) if is_nearest(offset)]

    def fragments(self, affs: np.ndarray, offsets: Sequence[Offset],
                  mask: np.ndarray | None) -> np.ndarray:
        shape = affs.shape[1:]
        graph = np.zeros(shape, np.uint8)
        for c, offset in enumerate(offsets):
            pair = edge_slices(shape, offset) if is_nearest(offset) else None
            if pair is None:
                continue
            here, there = pair
            joined = affs[c][here] > self.spec.threshold
            valid = edge_valid(mask, offset)
            if valid is not None:
                joined &= valid
            axis = int(np.flatnonzero(offset)[0])
            forward, backward = _BITS[axis]
            if offset[axis] < 0:  # v joins v - 1 along the axis: v goes back, v - 1 forward
                graph[here] |= joined * np.uint8(backward)
                graph[there] |= joined * np.uint8(forward)
            else:
                graph[here] |= joined * np.uint8(forward)
                graph[there] |= joined * np.uint8(backward)
        labels = cc3d.color_connectivity_graph(graph, connectivity=6)
        if mask is not None:
            labels[~mask] = 0
        return labels

    def face_edges(self, u: np.ndarray, v: np.ndarray, p: np.ndarray,
                   offset: Offset) -> Edges:
        if not is_nearest(offset):
            return Edges.empty()
        joined = p > self.spec.threshold
        return Edges.aggregate(u[joined], v[joined], np.ones(int(joined.sum())))

    def stitch(self, edges: Edges, count: int) -> np.ndarray:
        return union(count, edges.u, edges.v)
