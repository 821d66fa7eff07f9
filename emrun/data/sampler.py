"""Where the next training patch comes from: a source by mixture weight, then a location.

A location is drawn uniformly over the corners at which the (augmentation-enlarged) patch
fits inside the source's box; it is kept when the patch centre lies in the mask and the
output region has enough labelled voxels. Rejection sampling keeps memory constant in the
volume size (no index of valid voxels), with a bounded number of tries.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import UserError
from .sources import Source

MAX_TRIES = 200


@dataclass(frozen=True)
class Crop:
    """Raw arrays of one patch as read from a source (before normalisation/augmentation)."""

    source: str
    corner: tuple[int, int, int]
    image: np.ndarray
    labels: np.ndarray | None
    mask: np.ndarray | None
    semantic: dict[str, np.ndarray]


def _slices(corner: tuple[int, ...], shape: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(c, c + s) for c, s in zip(corner, shape, strict=True))


def read_crop(source: Source, corner: tuple[int, int, int], shape: tuple[int, int, int]) -> Crop:
    """Every volume of ``source`` at ``corner`` with ``shape`` (must lie inside the volume)."""
    roi = _slices(corner, shape)
    image = source.image.read(roi)
    if image.ndim == 4:  # a channel axis: the pipeline works on one channel
        image = image[0]
    return Crop(
        source=source.name,
        corner=corner,
        image=image,
        labels=source.labels.read(roi) if source.labels is not None else None,
        mask=source.mask.read(roi) if source.mask is not None else None,
        semantic={k: v.read(roi) for k, v in source.semantic.items()},
    )


def sample_crop(rng: np.random.Generator, sources: list[Source], weights: np.ndarray,
                in_shape: tuple[int, int, int], out_shape: tuple[int, int, int]) -> Crop:
    """Draw one crop of ``in_shape`` whose central ``out_shape`` passes the source's tests."""
    index = int(rng.choice(len(sources), p=weights))
    source = sources[index]
    (oz, oy, ox), box_shape = source.box
    room = [b - s for b, s in zip(box_shape, in_shape, strict=True)]
    if min(room) < 0:
        raise UserError(f"source {source.name!r}: its box {list(box_shape)} is smaller than the "
                        f"patch read for augmentation {list(in_shape)}")
    margin = [(i - o) // 2 for i, o in zip(in_shape, out_shape, strict=True)]
    for _ in range(MAX_TRIES):
        corner = (oz + int(rng.integers(room[0] + 1)), oy + int(rng.integers(room[1] + 1)),
                  ox + int(rng.integers(room[2] + 1)))
        if source.mask is not None:
            centre = tuple(c + s // 2 for c, s in zip(corner, in_shape, strict=True))
            if not source.mask.read(_slices(centre, (1, 1, 1))).any():
                continue
        crop = read_crop(source, corner, in_shape)
        if source.min_labelled > 0 and crop.labels is not None:
            core = crop.labels[_slices(tuple(margin), out_shape)]
            if np.count_nonzero(core) < source.min_labelled * core.size:
                continue
        return crop
    raise UserError(
        f"source {source.name!r}: no acceptable patch in {MAX_TRIES} tries (mask centre "
        f"and min_labelled {source.min_labelled:g}); the mask or labels select (almost) nothing"
    )
