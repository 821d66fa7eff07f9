"""Prediction of a whole in-memory volume, on the same lattice and blending as ``emrun infer``.

Validation crops, the demo's test volume and benchmarks are small enough to hold in memory;
predicting them as one block of the same layout gives what blockwise inference would write
for them, without a zarr round trip: the same up to float32 rounding (another cut into
blocks adds each voxel's window-weighted predictions in another order: below 1e-5 before
quantisation; the weights, and any worker count or resumption of one layout, agree bit for
bit).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..geometry import Roi, box_of, slices, zyx
from ..io.volume import Volume
from .engine import Engine
from .plan import Layout

ORIGIN = (0, 0, 0)


@dataclass(frozen=True, kw_only=True)
class ArrayVolume(Volume):
    """A numpy array seen as a volume (reads are views copied by the caller's indexing)."""

    array: np.ndarray

    @classmethod
    def of(cls, array: np.ndarray) -> ArrayVolume:
        return cls(array=array, path="<memory>", dataset=None, shape=tuple(array.shape),
                   dtype=array.dtype)

    def _read(self, roi: Roi) -> np.ndarray:
        return self.array[slices(roi)]


class ArrayPrediction(dict[str, np.ndarray]):
    """Blended float32 predictions per task, (c, z, y, x), and ``nonfinite``: how many of
    the network's output values were NaN or infinite, blended as 0 (in an affinity, a
    boundary; nothing in the arrays shows it, so a caller that cares warns)."""

    def __init__(self, values: dict[str, np.ndarray], nonfinite: int = 0) -> None:
        super().__init__(values)
        self.nonfinite = nonfinite


def predict_array(engine: Engine, image: np.ndarray,
                  scale: tuple[float, float]) -> ArrayPrediction:
    """Blended float32 predictions, (c, z, y, x) per task, of a (z, y, x) ``image``, with
    the count of non-finite network outputs (`ArrayPrediction`; none for a blank image,
    which is not predicted: all zeros, as `emrun infer` leaves a blank block)."""
    return predict_box(engine, ArrayVolume.of(image), box_of(image.shape), scale)


def predict_box(engine: Engine, volume: Volume, box: Roi,
                scale: tuple[float, float], mask: Volume | None = None) -> ArrayPrediction:
    """`predict_array` of the part ``box`` of a (z, y, x) ``volume``, as `emrun infer --roi`
    predicts it: the patches at the box's faces see the volume around it (reflected only at
    the volume's own borders), which a copy of the box alone would replace by its mirror.
    Non-finite voxels outside ``mask`` (of the volume's shape) read as black, as `emrun
    infer --mask` reads them."""
    shape = zyx(box.shape)
    layout = Layout(shape, engine.patch, engine.stride, shape, shape)
    raw = engine.read_input(volume, layout, ORIGIN, origin=zyx(box.offset), low=scale[0],
                            mask=mask)
    if raw is None:
        channels = engine.recipe.head_channels()
        return ArrayPrediction({n: np.zeros((channels[n], *shape), np.float32)
                                for n in engine.tasks})
    prediction = engine.predict(raw, layout, ORIGIN, scale)
    return ArrayPrediction({n: t.cpu().numpy() for n, t in prediction.values.items()},
                           int(prediction.nonfinite))
