"""A (1, z, y, x) volume read as (z, y, x).

Inference writes single-channel tasks (mito, boundary) with their channel axis, and
bioformats2raw writes EM images as (c, z, y, x) with one channel; scoring the former and
predicting the latter should not need a conversion first.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..geometry import Roi
from .volume import Volume


@dataclass(frozen=True, kw_only=True)
class OneChannel(Volume):
    """The only channel of ``inner``, with its spatial metadata."""

    inner: Volume

    @classmethod
    def of(cls, volume: Volume) -> OneChannel:
        spatial = volume.voxel_size[-3:] if volume.voxel_size is not None else None
        offset = volume.offset[-3:] if volume.offset is not None else None
        shift = volume.shift_nm[-3:] if volume.shift_nm is not None else None  # a coarser
        return cls(inner=volume, path=volume.path, dataset=volume.dataset,  # level's
                   shape=tuple(volume.shape[1:]), dtype=volume.dtype, voxel_size=spatial,
                   offset=offset, shift_nm=shift, segmentation=volume.segmentation)

    def _read(self, roi: Roi) -> np.ndarray:
        return self.inner.read(roi)[0]

    @property
    def chunks(self) -> tuple[int, ...] | None:
        inner = self.inner.chunks
        return inner[1:] if inner else None

    def attributes(self) -> dict:
        return self.inner.attributes()

    def container_attributes(self) -> dict:
        return self.inner.container_attributes()


def single_channel(volume: Volume) -> Volume:
    """``volume`` as (z, y, x) when it is (1, z, y, x); any other volume as it is."""
    return OneChannel.of(volume) if volume.ndim == 4 and volume.shape[0] == 1 else volume
