"""Prediction of a whole in-memory volume, on the same lattice and blending as ``emrun infer``.

Validation crops, the demo's test volume and benchmarks are small enough to hold in memory;
predicting them as one block of the same layout gives exactly what blockwise inference
would write for them (the output does not depend on the block size), without a zarr round
trip.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..geometry import Roi, slices, zyx
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


def predict_array(engine: Engine, image: np.ndarray,
                  scale: tuple[float, float]) -> dict[str, np.ndarray]:
    """Blended float32 predictions, (c, z, y, x) per task, of a (z, y, x) ``image``."""
    shape = zyx(image.shape)
    layout = Layout(shape, engine.patch, engine.stride, shape, shape)
    raw = engine.read_input(ArrayVolume.of(image), layout, ORIGIN, low=scale[0])
    if raw is None:
        channels = engine.recipe.head_channels()
        return {n: np.zeros((channels[n], *shape), np.float32) for n in engine.tasks}
    predictions = engine.predict(raw, layout, ORIGIN, scale).values
    return {n: t.cpu().numpy() for n, t in predictions.items()}
