"""The `data` section: named training and validation sources and how to read them."""

from __future__ import annotations

import os
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, model_validator

from ..geometry import Roi
from ..registry import Spec, sources
from .errors import KeyedValueError
from .types import IndexZyx, Name, Nanometres, Positive, Probability, Seed, Zyx

VolumePath = Annotated[str, AfterValidator(os.path.expanduser)]
"""A volume inside a container, as on the command line: ``vol.zarr/image``, ``raw.h5/volumes/raw``,
``stack.tif``, a folder of TIFF sections, or ``x.npy``; with the remote extra ``vol.n5/raw``,
a precomputed folder or a URL. A level of a multiscale image is named in the path
(``vol.zarr/image/s1``). Relative paths are relative to the working directory; a leading
``~`` is the home folder, as a shell reads it (a recipe is read by none: ``~/data`` was
refused as missing)."""

SYNTHETIC_SEMANTIC = ("mito", "synapse")
"""Semantic volumes a synthetic source generates alongside image and labels."""


class RoiSpec(Spec):
    """A box in voxels: where inside the volume a source may be sampled."""

    offset: IndexZyx = Field((0, 0, 0), description="First voxel of the box, z, y, x.")
    shape: Zyx = Field(description="Size of the box in voxels, z, y, x (each > 0).")

    def to_roi(self) -> Roi:
        """The box as the geometry speaks it (built from validated values only)."""
        return Roi(self.offset, self.shape)


class Intensity(Spec):
    """Global intensity normalisation: raw values in [low, high] map linearly to [0, 1]."""

    low: float = Field(0.0, allow_inf_nan=False, description="Raw value that maps to 0.")
    high: float = Field(255.0, allow_inf_nan=False, description="Raw value that maps to 1.")

    @model_validator(mode="after")
    def _ordered(self) -> Intensity:
        if self.high <= self.low:
            raise ValueError(f"high ({self.high}) must be greater than low ({self.low})")
        return self


class SourceBase(Spec):
    """What every source has: a mixture weight, an optional ROI and a voxel size."""

    weight: Positive | None = Field(
        None,
        description="Relative sampling weight in the mixture; default: proportional to the "
        "number of labelled voxels (counted in 8 evenly spaced sections).",
    )
    roi: RoiSpec | None = Field(None, description="Restrict sampling to this box (voxels).")
    voxel_size: Nanometres | None = Field(
        None, description="Voxel size in nm, z, y, x; default: from the volume's metadata."
    )
    min_labelled: Probability = Field(
        0.0,
        description="Redraw patches whose fraction of labelled (non-zero) voxels is below "
        "this; a bounded number of tries, then an error.",
    )

    def semantic_names(self) -> set[str]:
        """Names of the semantic volumes (e.g. mito) this source provides."""
        return set()

    def volume_paths(self) -> list[str]:
        """The volume files this source reads (none for a generated source)."""
        return []


sources.require(SourceBase)


@sources.register("volume")
class VolumeSource(SourceBase):
    """Image and labels (plus optional mask and semantic volumes) read from files."""

    type: Literal["volume"] = "volume"
    image: VolumePath = Field(description="The EM image, e.g. `data/snemi3d.zarr/image`.")
    labels: VolumePath | None = Field(
        None, description="Dense neuron ids (0 = unlabelled/boundary), same shape as the image."
    )
    mask: VolumePath | None = Field(
        None, description="Non-zero where samples may be centred and losses counted."
    )
    semantic: dict[Name, VolumePath] = Field(
        default_factory=dict,
        description="Named semantic volumes (e.g. mito, synapse) for binary and synapse tasks.",
    )
    intensity: Intensity | None = Field(
        None,
        description="Map raw values to [0, 1]; default: by dtype (uint8 / 255, uint16 / 65535, "
        "signed types over their whole range; float images must already be in [0, 1]).",
    )

    def semantic_names(self) -> set[str]:
        return set(self.semantic)

    def volume_paths(self) -> list[str]:
        named = [self.image, self.labels, self.mask, *self.semantic.values()]
        return [path for path in named if path]


@sources.register("synthetic")
class SyntheticSource(SourceBase):
    """A synthetic EM-like volume with dense labels, generated from a seed: no files needed."""

    type: Literal["synthetic"] = "synthetic"
    shape: Zyx = Field((64, 256, 256), description="Volume size in voxels, z, y, x.")
    seed: Seed = Field(0, description="Generator seed; the same seed gives the same volume.")
    voxel_size: Nanometres | None = Field(
        (30.0, 6.0, 6.0), description="Voxel size in nm, z, y, x (ssEM-like by default; null: "
        "that default too)."
    )

    @property
    def made_at(self) -> tuple[float, float, float]:
        """The voxel size the volume is generated at, and reported with: null is the
        default (it was generated at it, but told no voxel size, and an lsd or distance
        recipe refused the source)."""
        size = self.voxel_size if self.voxel_size is not None else (30.0, 6.0, 6.0)
        return (float(size[0]), float(size[1]), float(size[2]))

    @model_validator(mode="after")
    def _generable(self) -> SyntheticSource:
        """Voxel sizes the generator takes (it refused them with a ValueError, an internal
        error at training's start, after `validate` had passed the recipe)."""
        from ..synth import MAX_ANISOTROPY

        if self.voxel_size is not None and \
                max(self.voxel_size) > MAX_ANISOTROPY * min(self.voxel_size):
            raise KeyedValueError("voxel_size", f"voxel_size {list(self.voxel_size)}: sizes "
                                  f"more than {MAX_ANISOTROPY:g} times apart cannot be "
                                  "generated")
        return self

    def semantic_names(self) -> set[str]:
        return set(SYNTHETIC_SEMANTIC)


