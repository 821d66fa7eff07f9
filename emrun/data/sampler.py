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
from ..geometry import BlockGrid, Coordinate, Roi, Zyx, slices, zyx
from ..io import Volume
from ..io.masks import inside
from .sources import Source

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


def read_crop(source: Source, roi: Roi, semantic: frozenset[str] | None = None) -> Crop:
    """The volumes of ``source`` over ``roi`` (must lie inside the volume): every one, or
    of its semantic volumes only those named in ``semantic`` (when given)."""
    image = source.image.read(roi)
    if image.ndim == 4:  # a channel axis: the pipeline works on one channel
        image = image[0]
    return Crop(
        source=source.name,
        corner=zyx(roi.offset),
        image=image,
        labels=source.labels.read(roi) if source.labels is not None else None,
        mask=source.mask.read(roi) if source.mask is not None else None,
        semantic={k: v.read(roi) for k, v in source.semantic.items()
                  if semantic is None or k in semantic},
    )


class MaskIndex:
    """Masked-voxel counts of the box's blocks that hold any (built once per process).

    Drawing a block with probability proportional to its count, then a masked voxel inside
    it uniformly, draws uniformly over all masked voxels without an index of voxels. Drawn
    within a box (the centres a patch fits around), only the blocks that meet it take
    part, and a block the box cuts is kept with the share of its masked voxels inside (or,
    where the box cuts few, weighed by it: `_blocks_meeting`): still uniform, and a patch
    nearly the source's size no longer fails most draws (all 500 tries, a third of the time,
    for 25 centres of 12,800 masked voxels; nine times in ten for the one centre of a patch
    the source's size).
    """

    def __init__(self, mask: Volume, box: Roi) -> None:
        self.mask = mask
        self.grid = BlockGrid(box, BLOCK)
        _, ny, nx = self.grid.counts
        found, counts = [], []
        # one slab of blocks at a time: memory of one slab
        for gz, slab_box in enumerate(BlockGrid(box, (BLOCK[0], *box.shape[1:])).boxes()):
            slab = inside(self.mask.read(slab_box))
            slab = np.pad(slab, [(0, -n % b) for n, b in zip(slab.shape, BLOCK, strict=True)])
            count = slab.reshape(BLOCK[0], ny, BLOCK[1], nx, BLOCK[2]).sum(axis=(0, 2, 4))
            for gy, gx in zip(*np.nonzero(count), strict=True):
                found.append((gz, int(gy), int(gx)))
                counts.append(int(count[gy, gx]))
        self.blocks = np.asarray(found, dtype=np.int32).reshape(-1, 3)
        self.counts = np.asarray(counts, dtype=np.int64)
        self.cumulative = np.cumsum(self.counts)
        self._within: dict[tuple[Zyx, Zyx], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def draw(self, rng: np.random.Generator, within: Roi | None = None) -> Zyx | None:
        """A masked voxel (inside ``within`` when given), uniformly over all of them; None
        when there are none, or (within a box) when this try found none: try again."""
        chosen, weights, cumulative = self._blocks_meeting(within)
        if len(chosen) == 0 or cumulative[-1] == 0:
            return None
        pick = int(rng.integers(cumulative[-1]))
        at = int(np.searchsorted(cumulative, pick, side="right"))
        index = int(chosen[at])
        box = self.grid.box(self.blocks[index])
        region = inside(self.mask.read(box))  # NaN in a float mask is outside
        if within is not None:
            region &= _inside_box(box, within)
            kept, weight = int(np.count_nonzero(region)), int(weights[at])
            if kept < weight and rng.random() * weight >= kept:  # drawn for all its count
                return None
        masked = np.flatnonzero(region)
        local = np.unravel_index(int(masked[int(rng.integers(len(masked)))]), region.shape)
        return zyx(box.offset + Coordinate(local))

    def _blocks_meeting(self, within: Roi | None
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The numbers of the blocks that meet ``within`` (all: None), their weights and
        cumulative weights, kept per box (a few shapes of augmented read). A block's weight
        is its count; where the box cuts few blocks (`EXACT_CUT_BLOCKS`), each of those is
        weighed by its count inside, read once: a box that cut every block it met (a patch
        the source's size fits at one centre) kept its block once in 4,096 draws and failed
        all 500 tries nine times in ten. The weights depend on the box alone, so batch k
        stays a function of (seed, rank, k) whatever was drawn before (a resumed run)."""
        if within is None:
            return np.arange(len(self.blocks)), self.counts, self.cumulative
        key = (zyx(within.offset), zyx(within.shape))
        if key not in self._within:
            block = np.asarray(BLOCK)
            low = self.blocks * block + np.asarray(self.grid.total.offset)
            high = low + block
            begin, end = np.asarray(within.begin), np.asarray(within.end)
            meets = np.all((low < end) & (high > begin), axis=1)
            chosen = np.flatnonzero(meets)
            weights = self.counts[chosen].copy()
            cut = np.flatnonzero(~np.all((low[chosen] >= begin) & (high[chosen] <= end), axis=1))
            if len(cut) <= EXACT_CUT_BLOCKS:
                for at in cut:
                    box = self.grid.box(self.blocks[chosen[at]])
                    weights[at] = np.count_nonzero(inside(self.mask.read(box))
                                                   & _inside_box(box, within))
            if len(self._within) >= KEPT_BOXES:
                self._within.pop(next(iter(self._within)))
            self._within[key] = (chosen, weights, np.cumsum(weights))
        return self._within[key]


EXACT_CUT_BLOCKS = 64
"""Blocks cut by a box that are counted inside it when it is first drawn in (64 reads of
4x32x32 mask voxels, once per box shape); more are kept by rejection (`MaskIndex.draw`)."""


KEPT_BOXES = 16
"""Boxes a `MaskIndex` keeps its blocks for (one per shape of augmented read)."""


def _inside_box(box: Roi, within: Roi) -> np.ndarray:
    """A boolean of ``box``'s shape: which of its voxels lie inside ``within``."""
    axes = [(np.arange(b, b + n) >= lo) & (np.arange(b, b + n) < hi) for b, n, lo, hi in zip(
        box.offset, box.shape, within.begin, within.end, strict=True)]
    return axes[0][:, None, None] & axes[1][None, :, None] & axes[2][None, None, :]


def _core(in_shape: Zyx, out_shape: Zyx) -> Roi:
    """The centre of a crop that ``min_labelled`` is checked on: per axis the output's size,
    or the crop's where it is smaller. A y/x transpose of a non-square patch reads (z, x, y):
    the output's box would stick out of the crop, and numpy read a negative start from the
    end (a strip of the crop, or nothing), so good crops were refused or bad ones taken."""
    size = Coordinate(min(i, o) for i, o in zip(in_shape, out_shape, strict=True))
    return Roi((Coordinate(in_shape) - size) // 2, size)


class PatchSampler:
    """Draws crops from a weighted mixture of sources."""

    def __init__(self, sources: list[Source], weights: np.ndarray) -> None:
        self.sources, self.weights = sources, weights
        self._masks: dict[str, MaskIndex] = {}

    def _mask_index(self, source: Source) -> MaskIndex:
        if source.name not in self._masks:
            assert source.mask is not None
            self._masks[source.name] = MaskIndex(source.mask, source.box)
        return self._masks[source.name]

    def pick(self, rng: np.random.Generator) -> Source:
        """A source, by mixture weight."""
        return self.sources[int(rng.choice(len(self.sources), p=self.weights))]

    def draw(self, rng: np.random.Generator, in_shape: Zyx, out_shape: Zyx,
             source: Source | None = None, semantic: frozenset[str] | None = None) -> Crop:
        """One crop of ``in_shape`` whose centre (``_core``) passes the source's tests,
        from ``source`` (default: one picked by weight); ``semantic``: see `read_crop`."""
        source = source or self.pick(rng)
        room = source.box.shape - Coordinate(in_shape)
        if min(room) < 0:
            raise UserError(f"source {source.name!r}: its box {list(source.box.shape)} is "
                            f"smaller than the patch read for augmentation {list(in_shape)}")
        core = _core(in_shape, out_shape)
        for _ in range(MAX_TRIES):
            corner = self._corner(rng, source, in_shape, room)
            if corner is None:
                continue
            crop = read_crop(source, Roi(corner, in_shape), semantic)
            if source.min_labelled > 0 and crop.labels is not None:
                labels = crop.labels[slices(core)]
                if np.count_nonzero(labels) < source.min_labelled * labels.size:
                    continue
            return crop
        raise UserError(
            f"data.sources.{source.name}: no acceptable patch in {MAX_TRIES} tries; its mask "
            f"or min_labelled ({source.min_labelled:g}) leaves (almost) nothing to sample: "
            f"lower data.sources.{source.name}.min_labelled, or check its labels and mask")

    def _corner(self, rng: np.random.Generator, source: Source, in_shape: Zyx,
                room: Coordinate) -> Zyx | None:
        box_offset = source.box.offset
        if source.mask is None:
            return zyx(o + int(rng.integers(r + 1)) for o, r in zip(box_offset, room, strict=True))
        half = Coordinate(s // 2 for s in in_shape)
        centres = Roi(box_offset + half, room + 1)  # where the patch fits around a centre
        centre = self._mask_index(source).draw(rng, centres)
        if centre is None:
            return None
        corner = zyx(c - s // 2 for c, s in zip(centre, in_shape, strict=True))
        if any(not o <= c <= o + r for c, o, r in zip(corner, box_offset, room, strict=True)):
            return None
        return corner
