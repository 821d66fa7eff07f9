"""The `augment` section: an ordered list of augmentation specs, or the name of a preset.

Only the parameters live here; the implementations register themselves with
``emrun.registry.augmentations`` in the data layer. Every spec has a probability ``p`` and can
say which patch sizes it cannot work on (``patch_problems``), so a recipe whose patch is too
small for its augmentations fails at validation time rather than inside a loader worker.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, model_validator

from ..registry import Spec, augmentations
from .types import NonNegative, Positive, Probability, Size

PxRange = tuple[Annotated[int, Field(ge=0, le=10_000)], Annotated[int, Field(ge=0, le=10_000)]]


def _ordered(pair: tuple[float, float], what: str) -> None:
    if pair[0] > pair[1]:
        raise ValueError(f"{what}: the first value must not exceed the second (got {list(pair)})")


class AugmentBase(Spec):
    """Fields every augmentation has."""

    p: Probability = Field(1.0, description="Probability of applying it to a sample.")

    def patch_problems(self, patch: tuple[int, int, int]) -> list[str]:
        """Reasons this augmentation cannot produce ``patch`` (z, y, x); empty when it can."""
        return []


augmentations.require(AugmentBase)

if TYPE_CHECKING:
    AugmentSpec = AugmentBase  # at run time: the union of every registered spec (recipe.py)


@augmentations.register("flip_rotate")
class FlipRotate(AugmentBase):
    """Random flips of z, y, x and the y/x transpose (16 variants)."""

    type: Literal["flip_rotate"] = "flip_rotate"
    isotropic: bool = Field(
        False, description="Also transpose z with y and x (for isotropic data only)."
    )


@augmentations.register("warp")
class Warp(AugmentBase):
    """In-plane elastic/affine deformation: rotation, shear, scale, perspective, twist."""

    type: Literal["warp"] = "warp"
    rot_max: float = Field(45.0, ge=0, le=180, description="Largest rotation, degrees.")
    shear_max: float = Field(0.1, ge=0, le=1, description="Largest shear factor.")
    scale: tuple[Positive, Positive] = Field(
        (0.9, 1.1), description="Range of the scale factor drawn per sample."
    )
    stretch_max: float = Field(
        0.1, ge=0, le=0.5, description="Largest perspective stretch (fraction of the size)."
    )
    twist_max: float = Field(
        0.0, ge=0, le=180, description="Largest rotation change from top to bottom section, deg."
    )

    @model_validator(mode="after")
    def _check(self) -> Warp:
        _ordered(self.scale, "scale")
        return self


class MisalignBase(AugmentBase):
    displacement: PxRange = Field(
        (3, 15), description="Range of the in-plane shift in pixels (min, max)."
    )
    voxel_reference: float | None = Field(
        None, gt=0, le=10_000,
        description="In-plane voxel size (nm) the displacement pixels refer to; they are "
        "scaled to each source's voxel size. None: pixels as given.",
    )

    @model_validator(mode="after")
    def _check(self) -> Any:
        _ordered(self.displacement, "displacement")
        return self

    def patch_problems(self, patch: tuple[int, int, int]) -> list[str]:
        problems = []
        if patch[0] < 2:
            problems.append(f"{self.type} needs a patch of at least 2 sections (got {patch[0]})")
        if self.displacement[1] >= min(patch[1], patch[2]):
            problems.append(
                f"{self.type}: displacement up to {self.displacement[1]} px is not smaller than "
                f"the patch ({patch[1]}x{patch[2]} in y, x)"
            )
        return problems


@augmentations.register("misalign")
class Misalign(MisalignBase):
    """Translational misalignment: a step (all sections above shift) or a slip (one shifts)."""

    type: Literal["misalign"] = "misalign"
    mode: Literal["step", "slip", "both"] = Field(
        "both", description="Step, slip, or either with equal chance."
    )
    interp: bool = Field(
        False, description="Keep labels in place so the network must infer continuity."
    )


@augmentations.register("misalign_missing")
class MisalignMissing(MisalignBase):
    """Misalignment plus one or two missing sections at the interface."""

    type: Literal["misalign_missing"] = "misalign_missing"
    missing_max: Literal[1, 2] = Field(2, description="Most sections missing at the interface.")

    def patch_problems(self, patch: tuple[int, int, int]) -> list[str]:
        problems = super().patch_problems(patch)
        if patch[0] < self.missing_max + 2:
            problems.append(
                f"misalign_missing needs a patch of at least {self.missing_max + 2} sections "
                f"(got {patch[0]})"
            )
        return problems


@augmentations.register("lost_section")
class LostSection(AugmentBase):
    """Removes consecutive sections so the content jumps (the patch is read taller)."""

    type: Literal["lost_section"] = "lost_section"
    max_sections: Size = Field(1, le=16, description="Most consecutive sections lost.")


class SectionAugment(AugmentBase):
    max_sections: Size = Field(7, le=1000, description="Most sections affected per sample.")
    partial: bool = Field(False, description="Sometimes affect only part of a section.")

    def patch_problems(self, patch: tuple[int, int, int]) -> list[str]:
        if self.max_sections > patch[0]:
            return [f"{self.type}: max_sections {self.max_sections} exceeds the patch's "
                    f"{patch[0]} sections"]
        return []


@augmentations.register("missing_section")
class MissingSection(SectionAugment):
    """Fills whole or partial sections with a constant or random value."""

    type: Literal["missing_section"] = "missing_section"
    consecutive: bool = Field(False, description="Missing sections come in one run.")
    fill: Literal["constant", "random"] = Field("constant", description="What fills them.")
    value: Probability = Field(0.0, description="The constant fill value (image is in [0, 1]).")


@augmentations.register("blurry_section")
class BlurrySection(SectionAugment):
    """Per-section Gaussian blur."""

    type: Literal["blurry_section"] = "blurry_section"
    sigma_max: float = Field(5.0, gt=0, le=100, description="Largest blur sigma, pixels.")


@augmentations.register("grayscale")
class Grayscale(AugmentBase):
    """Contrast, brightness and gamma, per section (2d), whole patch (3d) or either (mix)."""

    type: Literal["grayscale"] = "grayscale"
    contrast: NonNegative = Field(0.5, le=10, description="Contrast change amplitude.")
    brightness: NonNegative = Field(0.5, le=10, description="Brightness change amplitude.")
    gamma: NonNegative = Field(
        1.0, le=4, description="Largest |log2 gamma|: gamma is drawn from [2^-g, 2^g]."
    )
    mode: Literal["2d", "3d", "mix"] = Field("mix", description="Per section, patch, or either.")
    partial: bool = Field(False, description="Sometimes apply to one quadrant only.")


@augmentations.register("box")
class Box(AugmentBase):
    """Boxes filled with a value, noise or blur, added until a density is reached."""

    type: Literal["box"] = "box"
    density: Probability = Field(0.3, description="Fraction of the patch volume to cover.")
    size: PxRange = Field((5, 25), description="Range of the box side in pixels (y, x).")
    z_size: PxRange = Field((1, 5), description="Range of the box depth in sections.")
    modes: list[Literal["fill", "noise", "blur"]] = Field(
        ["fill", "noise"], min_length=1, description="Kinds of box, chosen at random."
    )

    @model_validator(mode="after")
    def _check(self) -> Box:
        _ordered(self.size, "size")
        _ordered(self.z_size, "z_size")
        if self.size[0] < 1 or self.z_size[0] < 1:
            raise ValueError("box sizes must be at least 1")
        return self

    def patch_problems(self, patch: tuple[int, int, int]) -> list[str]:
        if self.size[1] > min(patch[1], patch[2]):
            return [f"box: size up to {self.size[1]} px exceeds the patch "
                    f"({patch[1]}x{patch[2]} in y, x)"]
        return []


@augmentations.register("noise")
class Noise(AugmentBase):
    """Additive Gaussian and Poisson noise."""

    type: Literal["noise"] = "noise"
    sigma_max: float = Field(0.05, ge=0, le=1, description="Largest Gaussian sigma (image units).")
    poisson: bool = Field(False, description="Also apply Poisson (shot) noise.")


@augmentations.register("contrast_compression")
class ContrastCompression(AugmentBase):
    """Compresses the intensity range towards its mean, as in faint sections."""

    type: Literal["contrast_compression"] = "contrast_compression"
    factor: tuple[Positive, Positive] = Field(
        (0.5, 1.0), description="Range of the compression factor (1 = unchanged)."
    )

    @model_validator(mode="after")
    def _check(self) -> ContrastCompression:
        _ordered(self.factor, "factor")
        return self


@augmentations.register("one_of")
class OneOf(AugmentBase):
    """Exactly one of several augmentations, or none: `probs` need not sum to 1."""

    type: Literal["one_of"] = "one_of"
    of: list[AugmentSpec] = Field(min_length=1, description="The alternatives.")
    probs: list[Probability] | None = Field(
        None, description="Chance of each alternative; the rest is 'nothing'. Default: equal."
    )

    @model_validator(mode="after")
    def _check(self) -> OneOf:
        if self.probs is not None:
            if len(self.probs) != len(self.of):
                raise ValueError(
                    f"probs has {len(self.probs)} values for {len(self.of)} alternatives"
                )
            if sum(self.probs) > 1 + 1e-9:
                raise ValueError(f"probs sum to {sum(self.probs):g}, more than 1")
        return self

    def patch_problems(self, patch: tuple[int, int, int]) -> list[str]:
        return [p for a in self.of for p in a.patch_problems(patch)]


@augmentations.register("compose")
class Compose(AugmentBase):
    """Several augmentations in order, applied together with probability `p`."""

    type: Literal["compose"] = "compose"
    of: list[AugmentSpec] = Field(min_length=1, description="The augmentations, in order.")

    def patch_problems(self, patch: tuple[int, int, int]) -> list[str]:
        return [p for a in self.of for p in a.patch_problems(patch)]


PRESETS: dict[str, list[dict[str, Any]]] = {
    # DeepEM's modern stack (flyem/pinky mip1 defaults); displacements are mip1 (8 nm) pixels.
    "deepem": [
        {
            "type": "one_of",
            "of": [
                {"type": "misalign", "mode": "both", "displacement": [5, 25],
                 "voxel_reference": 8.0},
                {"type": "misalign_missing", "displacement": [3, 15], "voxel_reference": 8.0},
                {"type": "missing_section", "max_sections": 7, "partial": True},
                {"type": "lost_section", "max_sections": 1},
            ],
        },
        {"type": "warp", "p": 0.7, "rot_max": 45.0},
        # photometric after the warp: they then work on the output size, not the larger input
        {"type": "grayscale", "p": 0.7, "contrast": 0.5, "brightness": 0.5, "mode": "mix"},
        {"type": "blurry_section", "max_sections": 7, "sigma_max": 5.0, "partial": True},
        {"type": "box", "p": 0.9, "density": 0.3, "size": [5, 25], "modes": ["fill", "noise"]},
        {"type": "flip_rotate", "p": 1.0},
    ],
    "none": [],
}
"""Named augmentation stacks; a recipe may write `augment: deepem` instead of a list."""
