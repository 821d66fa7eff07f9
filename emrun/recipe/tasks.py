"""The `tasks` section: what the network predicts (targets), how it is scored (losses), and
how much each task weighs. The model gets one output head per task, with the target's
channel count."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, field_validator

from ..geometry import zyx
from ..registry import Spec, losses, targets
from .types import Flag, Offset, Positive, Size, items_schema

NEAREST = [(-1, 0, 0), (0, -1, 0), (0, 0, -1)]
"""Nearest-neighbour affinity offsets, z, y, x (DeepEM/waterz convention)."""


class TargetBase(Spec):
    """What every target says: how many output channels it needs, and the loss and
    activation a task gets when its recipe names neither (0/1 targets: bce and sigmoid;
    regression targets: mse on the raw output)."""

    default_loss: ClassVar[str] = "bce"
    default_activation: ClassVar[str] = "sigmoid"

    def channels(self) -> int:
        return 1

    def value_range(self) -> tuple[float, float]:
        """The values the target takes, lowest and highest (image panels map it to black
        and white)."""
        return 0.0, 1.0


targets.require(TargetBase)


def _distinct_nonzero_schema(schema: dict[str, Any]) -> None:
    """`_nonzero_distinct`, stated to the JSON Schema."""
    schema["uniqueItems"] = True
    items_schema(**{"not": {"const": [0, 0, 0]}})(schema)


@targets.register("affinity")
class AffinityTarget(TargetBase):
    """Affinities: 1 where a voxel and the voxel at +offset share a non-zero label, 0 where
    they differ, masked where either is unlabelled, outside the patch or outside the mask."""

    type: Literal["affinity"] = "affinity"
    offsets: list[Offset] = Field(
        default_factory=lambda: list(NEAREST),
        min_length=1,
        max_length=64,
        json_schema_extra=_distinct_nonzero_schema,
        description="One channel per offset, z, y, x; nearest neighbours are (-1,0,0), "
        "(0,-1,0), (0,0,-1); Lee 2017 adds z 2-4 and xy 3, 9, 27.",
    )
    zero: Literal["mask", "boundary"] = Field(
        "mask",
        description="What label 0 means: `mask` (unlabelled: pairs touching it are excluded) "
        "or `boundary` (membrane: pairs touching it count as 'different', as DeepEM does for "
        "data whose cells are separated by 0-labelled gaps, e.g. SNEMI3D).",
    )
    relabel: Flag = Field(
        True,
        description="Relabel connected components inside each patch first, so pieces of one id "
        "that the crop disconnected become different ids.",
    )

    @field_validator("offsets")
    @classmethod
    def _nonzero_distinct(cls, offsets: list[Offset]) -> list[Offset]:
        for i, off in enumerate(offsets):
            if off == (0, 0, 0):
                raise ValueError(f"offset {i} is (0, 0, 0); offsets must be non-zero")
        if len(set(offsets)) != len(offsets):
            raise ValueError("offsets contain duplicates")
        return offsets

    def channels(self) -> int:
        return len(self.offsets)

    def extent(self) -> tuple[int, int, int]:
        """Largest |offset| per axis: the patch must be larger than this."""
        return zyx(max(abs(o[a]) for o in self.offsets) for a in range(3))


@targets.register("boundary")
class BoundaryTarget(TargetBase):
    """1 on voxels whose label differs from a neighbour's (or is 0), else 0."""

    type: Literal["boundary"] = "boundary"
    width: Size = Field(1, le=16, description="Boundary thickness in voxels (in-plane).")


@targets.register("binary")
class BinaryTarget(TargetBase):
    """Foreground (non-zero) of a named semantic volume, e.g. mitochondria."""

    type: Literal["binary"] = "binary"
    volume: str = Field(description="Name of a semantic volume every training source provides.")


@targets.register("synapse")
class SynapseTarget(TargetBase):
    """Synaptic clefts as a binary target, optionally dilated in-plane."""

    type: Literal["synapse"] = "synapse"
    volume: str = Field("synapse", description="Name of the semantic volume with the clefts.")
    dilation: int = Field(0, ge=0, le=16, description="In-plane dilation in voxels.")


def _per_axis(value: float | tuple[float, float, float]) -> tuple[float, float, float]:
    """One number for every axis, or the z, y, x triple as given."""
    return (value, value, value) if isinstance(value, int | float) else tuple(value)  # type: ignore[return-value]


@targets.register("lsd")
class LSDTarget(TargetBase):
    """Local shape descriptors (Sheridan et al. 2022), 10 channels: the mean offset of the
    voxel's object within a Gaussian window (z, y, x), its variances (zz, yy, xx), its
    covariances (zy, zx, yx) and its size (the window fraction it fills), each in [0, 1].
    Label 0 is not an object: target 0 and masked there."""

    default_loss: ClassVar[str] = "mse"
    default_activation: ClassVar[str] = "none"

    type: Literal["lsd"] = "lsd"
    sigma: Positive | tuple[Positive, Positive, Positive] = Field(
        80.0,
        description="Gaussian window sigma in nm, one number or z, y, x; at least one voxel "
        "per axis, and 3 sigma at most half of train.patch.",
    )
    downsample: Annotated[int, Field(ge=1, le=16, strict=True)] | tuple[
        Annotated[int, Field(ge=1, le=16, strict=True)],
        Annotated[int, Field(ge=1, le=16, strict=True)],
        Annotated[int, Field(ge=1, le=16, strict=True)],
    ] | None = Field(
        None,
        description="Compute the window sums on blocks of this many voxels, one number or "
        "z, y, x (1 = exact); default: per axis the largest leaving 3 blocks per sigma.",
    )

    def channels(self) -> int:
        return 10

    def sigma_zyx(self) -> tuple[float, float, float]:
        """Sigma in nm per axis, z, y, x."""
        return _per_axis(self.sigma)

    def downsample_zyx(self) -> tuple[int, int, int] | None:
        """Block size per axis, z, y, x, or None (chosen from sigma and the voxel size)."""
        return None if self.downsample is None else _per_axis(self.downsample)  # type: ignore[return-value]


@targets.register("distance")
class DistanceTarget(TargetBase):
    """Distance of each voxel to the nearest boundary (a label change or label 0), in nm
    using the voxel size, clipped at `clip` and divided by it: [0, 1] inside objects and 0
    on label 0, or with `signed` also the distance of label-0 voxels to the nearest object,
    negated: [-1, 1]."""

    default_loss: ClassVar[str] = "mse"
    default_activation: ClassVar[str] = "none"

    type: Literal["distance"] = "distance"
    signed: Flag = Field(
        False, description="Also give label-0 voxels their (negative) distance to objects."
    )
    clip: Positive = Field(
        200.0, le=1e6, description="Distance in nm at which the target saturates (1 or -1)."
    )

    def value_range(self) -> tuple[float, float]:
        return (-1.0, 1.0) if self.signed else (0.0, 1.0)


@losses.register("bce")
class BCELoss(Spec):
    """Masked binary cross-entropy on logits with DeepEM margins and class balancing."""

    activation: ClassVar[str] = "sigmoid"  # what inference applies to what it trains

    type: Literal["bce"] = "bce"
    margin0: float = Field(0.0, ge=0, lt=0.5, description="Margin for negatives (target 0).")
    margin1: float = Field(0.0, ge=0, lt=0.5, description="Margin for positives (target 1).")
    margin_mode: Literal["mask", "inverse"] = Field(
        "mask",
        description="`mask`: drop voxels already right by the margin; `inverse`: soften "
        "targets to margin0 / 1 - margin1 instead.",
    )
    balance: Flag = Field(
        False, description="Weight positives n0/(n0+n1) and negatives n1/(n0+n1) per channel."
    )


@losses.register("mse")
class MSELoss(Spec):
    """Masked mean squared error of the raw output."""

    activation: ClassVar[str] = "none"  # the raw output is trained towards the target

    type: Literal["mse"] = "mse"




@losses.register("dice")
class DiceLoss(Spec):
    """Masked soft Dice on sigmoid outputs, for semantic (binary, synapse, boundary) tasks:
    ``1 - (2 sum(p t) + eps) / (sum(p) + sum(t) + eps)`` over the valid voxels of the batch."""

    activation: ClassVar[str] = "sigmoid"

    type: Literal["dice"] = "dice"
    eps: float = Field(1.0, gt=0, le=1e6, description="Smoothing added to both sides of the "
                       "ratio (keeps an empty target and prediction at loss 0).")


@losses.register("dice_bce")
class DiceBCELoss(Spec):
    """Masked BCE on logits plus `dice_weight` times the soft Dice loss."""

    activation: ClassVar[str] = "sigmoid"

    type: Literal["dice_bce"] = "dice_bce"
    eps: float = Field(1.0, gt=0, le=1e6, description="Smoothing of the Dice ratio.")
    dice_weight: float = Field(1.0, ge=0, le=1e6, description="Weight of the Dice term.")



@losses.register("malis")
class MalisLoss(Spec):
    """Constrained MALIS (Turaga 2009, Funke 2018) on the nearest-neighbour channels of an
    affinity task (its offsets must include (-1,0,0), (0,-1,0), (0,0,-1)), plus masked BCE
    weighted `long_range` on its other channels. Objects are the connected components of
    the target's positive nearest-neighbour edges inside each patch."""

    activation: ClassVar[str] = "sigmoid"

    type: Literal["malis"] = "malis"
    long_range: float = Field(1.0, ge=0, le=1e6, description="Weight of the plain masked "
                              "BCE on the channels that are not nearest neighbours.")
