"""Where the next training patch comes from: a source by mixture weight, then a location.

Without a mask, a corner is drawn uniformly over the positions at which the
(augmentation-enlarged) patch fits inside the source's box. With a mask, the patch centre is drawn
uniformly over masked voxels through a coarse index (a count per non-empty 4x32x32 block,
not an index of voxels: a few bytes per block) and kept if the patch fits. A minimum
labelled fraction redraws, a bounded number of times.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import UserError
from ..io import Volume
from .sources import Source

Zyx = tuple[int, int, int]
MAX_TRIES = 500
BLOCK = (4, 32, 32)


@dataclass(frozen=True)
class Crop:
    """Raw arrays of one patch as read from a source (before normalisation/augmentation)."""

    source: str
    corner: Zyx
    image: np.ndarray
    labels: np.ndarray | None
    mask: np.ndarray | None
    semantic: dict[str, np.ndarray]


def _slices(corner: tuple[int, ...], shape: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(c, c + s) for c, s in zip(corner, shape, strict=True))


def read_crop(source: Source, corner: Zyx, shape: Zyx) -> Crop:
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


class MaskIndex:
    """Masked-voxel counts of the box's blocks that hold any (built once per process).

    Drawing a block with probability proportional to its count, then a masked voxel inside
    it uniformly, draws uniformly over all masked voxels without an index of voxels.
    """

    def __init__(self, mask: Volume, offset: Zyx, shape: Zyx) -> None:
        self.mask, self.offset, self.shape = mask, offset, shape
        grid = [-(-s // b) for s, b in zip(shape, BLOCK, strict=True)]
        found, counts = [], []
        for gz in range(grid[0]):  # one slab of blocks at a time: memory of one slab
            z0 = offset[0] + gz * BLOCK[0]
            z1 = min(z0 + BLOCK[0], offset[0] + shape[0])
            slab = self.mask.read((slice(z0, z1), slice(offset[1], offset[1] + shape[1]),
                                   slice(offset[2], offset[2] + shape[2]))) != 0
            slab = np.pad(slab, [(0, -n % b) for n, b in zip(slab.shape, BLOCK, strict=True)])
            count = slab.reshape(BLOCK[0], grid[1], BLOCK[1], grid[2], BLOCK[2]).sum(axis=(0, 2, 4))
            for gy, gx in zip(*np.nonzero(count), strict=True):
                found.append((gz, int(gy), int(gx)))
                counts.append(int(count[gy, gx]))
        self.blocks = np.asarray(found, dtype=np.int32).reshape(-1, 3)
        self.cumulative = np.cumsum(np.asarray(counts, dtype=np.int64))

    def draw(self, rng: np.random.Generator) -> Zyx | None:
        """A masked voxel, uniformly over all masked voxels; None when there are none."""
        if len(self.blocks) == 0:
            return None
        pick = int(rng.integers(self.cumulative[-1]))
        block = self.blocks[int(np.searchsorted(self.cumulative, pick, side="right"))]
        start = [o + int(b) * s for o, b, s in zip(self.offset, block, BLOCK, strict=True)]
        stop = [min(a + s, o + n) for a, s, o, n in
                zip(start, BLOCK, self.offset, self.shape, strict=True)]
        region = self.mask.read(tuple(slice(a, b) for a, b in zip(start, stop, strict=True)))
        masked = np.flatnonzero(region)
        local = np.unravel_index(int(masked[int(rng.integers(len(masked)))]), region.shape)
        return tuple(a + int(i) for a, i in zip(start, local, strict=True))  # type: ignore[return-value]


class PatchSampler:
    """Draws crops from a weighted mixture of sources."""

    def __init__(self, sources: list[Source], weights: np.ndarray) -> None:
        self.sources, self.weights = sources, weights
        self._masks: dict[str, MaskIndex] = {}

    def _mask_index(self, source: Source) -> MaskIndex:
        if source.name not in self._masks:
            assert source.mask is not None
            self._masks[source.name] = MaskIndex(source.mask, *source.box)
        return self._masks[source.name]

    def pick(self, rng: np.random.Generator) -> Source:
        """A source, by mixture weight."""
        return self.sources[int(rng.choice(len(self.sources), p=self.weights))]

    def draw(self, rng: np.random.Generator, in_shape: Zyx, out_shape: Zyx,
             source: Source | None = None) -> Crop:
        """One crop of ``in_shape`` whose central ``out_shape`` passes the source's tests,
        from ``source`` (default: one picked by weight)."""
        source = source or self.pick(rng)
        box_shape = source.box[1]
        room = [b - s for b, s in zip(box_shape, in_shape, strict=True)]
        if min(room) < 0:
            raise UserError(f"source {source.name!r}: its box {list(box_shape)} is smaller than "
                            f"the patch read for augmentation {list(in_shape)}")
        margin = tuple((i - o) // 2 for i, o in zip(in_shape, out_shape, strict=True))
        for _ in range(MAX_TRIES):
            corner = self._corner(rng, source, in_shape, room)
            if corner is None:
                continue
            crop = read_crop(source, corner, in_shape)
            if source.min_labelled > 0 and crop.labels is not None:
                core = crop.labels[_slices(margin, out_shape)]
                if np.count_nonzero(core) < source.min_labelled * core.size:
                    continue
            return crop
        raise UserError(
            f"source {source.name!r}: no acceptable patch in {MAX_TRIES} tries; the mask or "
            f"min_labelled ({source.min_labelled:g}) leaves (almost) nothing to sample")

    def _corner(self, rng: np.random.Generator, source: Source, in_shape: Zyx,
                room: list[int]) -> Zyx | None:
        box_offset = source.box[0]
        if source.mask is None:
            return tuple(o + int(rng.integers(r + 1))  # type: ignore[return-value]
                         for o, r in zip(box_offset, room, strict=True))
        centre = self._mask_index(source).draw(rng)
        if centre is None:
            return None
        corner = tuple(c - s // 2 for c, s in zip(centre, in_shape, strict=True))
        if any(not o <= c <= o + r for c, o, r in zip(corner, box_offset, room, strict=True)):
            return None
        return corner  # type: ignore[return-value]
