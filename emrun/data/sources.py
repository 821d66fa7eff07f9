"""Opened sources: the volumes of one recipe source, its sampling box and intensity scale.

A source holds Volumes (paths, or a seed for synthetic data), never voxel data, so it
pickles cheaply into data-loader worker processes; synthetic volumes are generated once per
process on first read.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

from ..errors import UserError
from ..geometry import Roi, box_of, slices
from ..io import Volume, open_volume
from ..io.intensity import default_intensity, exact_in_float32, scaled_in_float64
from ..io.masks import inside
from ..io.metadata import stated_voxel_size
from ..io.window import data_box, placed_in
from ..recipe.data import SourceBase, SyntheticSource, VolumeSource
from ..registry import sources


@dataclass(frozen=True, kw_only=True)
class SyntheticVolume(Volume):
    """One array (image, labels, mito or synapse) of a synthetic volume, generated on first
    read."""

    seed: int
    part: str

    def _read(self, roi: Roi) -> np.ndarray:
        return np.array(_synthetic(self.shape, self.seed, self.voxel_size)[self.part][slices(roi)])


@functools.lru_cache(maxsize=8)
def _synthetic(shape: tuple[int, ...], seed: int,
               voxel_size: tuple[float, ...] | None) -> dict[str, np.ndarray]:
    from ..synth import synthesize

    vol = synthesize(shape, seed, voxel_size=voxel_size or (30.0, 6.0, 6.0))  # type: ignore[arg-type]
    return {"image": vol.image, "labels": vol.labels, "mito": vol.mito, "synapse": vol.synapse}


@dataclass(frozen=True)
class Source:
    """A recipe source ready for sampling."""

    name: str
    image: Volume
    labels: Volume | None
    mask: Volume | None
    semantic: dict[str, Volume]
    box: Roi  # where patches may be drawn from
    low: float  # raw intensity that maps to 0
    high: float  # raw intensity that maps to 1
    weight: float | None
    min_labelled: float
    voxel_size: tuple[float, float, float] | None = field(default=None)
    scale_given: bool = False  # the recipe's `intensity`, not the dtype's default

    def normalise(self, raw: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """Raw image values to float32 in [0, 1] with this source's global scale. NaN or
        infinite values are 0 where ``mask`` (the crop's) excludes them, and refused where
        they would be trained on (clip keeps NaN: every loss would go NaN, steps skipped).
        Without a recipe scale, float values outside [0, 1] are refused (the default
        would clip them)."""
        if exact_in_float32(raw.dtype):
            image = raw.astype(np.float32)  # a new array: the same arithmetic, in place
            image -= np.float32(self.low)
            image /= np.float32(self.high - self.low)
        else:
            image = scaled_in_float64(raw, self.low, self.high)
        if raw.dtype.kind == "f" and not (finite := np.isfinite(image)).all():
            masked_out = mask is not None and mask.shape == image.shape
            bad = ~finite & inside(mask) if masked_out else ~finite
            if bad.any():
                raise UserError(f"source {self.name!r}: {self.image} holds NaN or infinite "
                                f"values ({int(bad.sum())} in one training patch); fix them, "
                                "or mask them out with the source's mask")
            image[~finite] = 0.0
        if raw.dtype.kind == "f" and not self.scale_given:  # a given scale clips
            lo, hi = float(image.min(initial=0.0)), float(image.max(initial=0.0))
            if lo < -1e-3 or hi > 1 + 1e-3:
                raise UserError(
                    f"source {self.name!r}: {self.image} is a float image with values in "
                    f"[{lo:g}, {hi:g}], outside [0, 1]; give `intensity: {{low, high}}` "
                    "in the recipe")
        return np.clip(image, 0.0, 1.0, out=image)


def _box(spec: SourceBase, shape: tuple[int, ...]) -> Roi:
    return box_of(shape[-3:]) if spec.roi is None else spec.roi.to_roi()


STATED_IN_RECIPE = "voxel_size: [z, y, x] (nm) in the recipe's source"
"""How a recipe states a voxel size: what the refusal of unreadable metadata advises."""


def open_in_source(ref: str, voxel_size: tuple[float, ...] | None) -> Volume:
    """A volume of a recipe source (training, and the checks before it), its `voxel_size`
    standing in for metadata that cannot be read (`emrun.io.metadata.stated_voxel_size`)."""
    with stated_voxel_size(voxel_size, how=STATED_IN_RECIPE):
        return open_volume(ref)


@sources.implement("volume")
def open_volume_source(spec: VolumeSource, name: str = "source") -> Source:
    """Open the volumes a `volume` source names (metadata only). The recipe's `voxel_size`
    is a size the user states: it takes the place of voxel-size metadata that cannot be
    read (`emrun.io.metadata.stated_voxel_size`), readable metadata keeps its own."""
    def opened(ref: str) -> Volume:
        return open_in_source(ref, spec.voxel_size)

    image = opened(spec.image)
    # labels (mask, semantic) of a part of the image, or of a region the image is a cutout
    # of, are read at their place in the image; patches are drawn where all hold data
    labels = placed_in(opened(spec.labels), image) if spec.labels else None
    mask = placed_in(opened(spec.mask), image) if spec.mask else None
    semantic = {key: placed_in(opened(ref), image) for key, ref in spec.semantic.items()}
    box = data_box([v for v in (labels, mask, *semantic.values()) if v is not None],
                   _box(spec, image.shape))
    low, high = ((spec.intensity.low, spec.intensity.high) if spec.intensity
                 else default_intensity(image.dtype))
    voxel = spec.voxel_size or (tuple(image.voxel_size[-3:]) if image.voxel_size else None)
    return Source(name, image, labels, mask, semantic, box, low, high,
                  spec.weight, spec.min_labelled, voxel,  # type: ignore[arg-type]
                  scale_given=spec.intensity is not None)


@sources.implement("synthetic")
def open_synthetic_source(spec: SyntheticSource, name: str = "source") -> Source:
    """A synthetic source: image, labels and `mito` and `synapse` semantic volumes from a
    seed."""
    def part(key: str, dtype: str) -> Volume:
        return SyntheticVolume(path=f"synthetic:{name}", dataset=key, shape=spec.shape,
                               dtype=np.dtype(dtype), voxel_size=spec.made_at,
                               seed=spec.seed, part=key)

    return Source(name, part("image", "uint8"), part("labels", "uint32"), None,
                  {"mito": part("mito", "uint32"), "synapse": part("synapse", "uint8")},
                  _box(spec, spec.shape), 0.0, 255.0,
                  spec.weight, spec.min_labelled, spec.made_at)


def open_sources(specs: dict[str, SourceBase]) -> list[Source]:
    """Every source of a recipe section, opened."""
    return [sources.build(spec, name=name) for name, spec in specs.items()]


def labelled_fraction(source: Source, sections: int = 8) -> float:
    """Fraction of the box's voxels that are labelled and inside the mask (the voxels
    trained on), estimated from a few evenly spaced sections; counted over every section
    when those hold none: labels in a few sections between them (a sparsely annotated
    volume) would weigh the source 0, never sampled, silently."""
    if source.labels is None and source.mask is None:
        return 1.0
    (oz, oy, ox), (sz, sy, sx) = source.box.offset, source.box.shape
    zs = np.unique(np.linspace(oz, oz + sz - 1, num=min(sections, sz)).round().astype(int))
    counted = sum(_trained_on(source, Roi((int(z), oy, ox), (1, sy, sx))) for z in zs)
    if counted:
        return counted / (len(zs) * sy * sx)
    depth = max(1, SCAN_VOXELS // max(sy * sx, 1))  # slabs of bounded memory
    counted = sum(_trained_on(source, Roi((z, oy, ox), (min(depth, oz + sz - z), sy, sx)))
                  for z in range(oz, oz + sz, depth))
    return counted / max(sz * sy * sx, 1)


SCAN_VOXELS = 2**24
"""Voxels read at once when counting every section."""


def _trained_on(source: Source, roi: Roi) -> int:
    """Voxels in ``roi`` that are labelled (when the source has labels) and masked in (when
    it has a mask)."""
    keep = None if source.labels is None else source.labels.read(roi) != 0
    if source.mask is not None:
        masked = inside(source.mask.read(roi))
        keep = masked if keep is None else keep & masked
    return int(np.count_nonzero(keep))


def mixture_weights(opened: list[Source]) -> np.ndarray:
    """Sampling probability per source: recipe weights, else proportional to labelled voxels
    inside the mask."""
    weights = []
    for src in opened:
        if src.weight is not None:
            weights.append(src.weight)
        else:
            weights.append(float(np.prod(src.box.shape)) * labelled_fraction(src))
    w = np.asarray(weights, dtype=np.float64)
    if not np.isfinite(w).all() or w.sum() <= 0:
        names = ", ".join(f"data.sources.{src.name}" for src in opened)
        raise UserError(f"{names}: no labelled voxels to sample from (labels 0 everywhere "
                        "sampled, or inside no mask); check their labels and masks")
    return w / w.sum()
