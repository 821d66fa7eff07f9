"""The `model` section: network architecture specs and the facts that follow from them.

Every model spec answers, without being built, for the sizes it accepts (``divisor``), its
input channels, its receptive field (None when unknown) and its summary line; what can be
measured on the built module (parameters, FLOPs) is measured there (``emrun.models.facts``).
A new model is a spec subclassing :class:`ModelBase`, registered with ``models.register``,
and its builder (``models.implement``).

RSUNet's parameter count is also computed from the spec alone (no torch); the model
implementation is tested to match this formula.

RSUNet layout (``L = len(widths)`` levels, ``w_i`` the width of level ``i``):

- input conv ``in_channels -> w_0``, kernel ``input_kernel`` (1x5x5), with bias;
- every conv after that is *pre-activated*: norm(c_in) -> activation -> conv with bias;
- a level block ``c -> w``: conv ``c -> w``; a residual unit (two convs ``w -> w`` added to
  their input); one more conv ``w -> w``. Kernel ``kernel`` (3x3x3), or 1x3x3 on
  ``anisotropic_levels``;
- encoder: level 0 is a block ``w_0 -> w_0``; level ``i > 0`` max-pools by ``downsample[i-1]``
  and is a block ``w_{i-1} -> w_i``;
- decoder, for ``i = L-2 .. 0``: upsample by ``downsample[i]`` (interpolation, no parameters,
  or a transposed conv ``w_{i+1} -> w_{i+1}`` with kernel = stride = the factor), a 1x1x1 conv
  ``w_{i+1} -> w_i``, sum with the level-``i`` skip, then a block ``w_i -> w_i``;
- a final norm(w_0) and activation, then one 1x1x1 conv head ``w_0 -> channels`` per task.

The decoder's 1x1x1 conv after upsampling is a plain conv (no norm, no activation). Kernels
are odd, padded by k // 2, so every accepted input size is kept.

Norms are affine (2 parameters per channel; ``none`` has 0). So, with ``k`` the kernel volume
of a level and ``n(c) = 2c`` (or 0 without norm)::

    conv(a, b, k)  = a*b*k + b
    block(a, w, k) = n(a) + conv(a, w, k) + 3 * (n(w) + conv(w, w, k))
    params = conv(in, w_0, k_in) + sum_i block(in_i, w_i, k_i)            # encoder
           + sum_{i<L-1} [up_i + conv(w_{i+1}, w_i, 1) + block(w_i, w_i, k_i)]  # decoder
           + n(w_0) + sum_tasks conv(w_0, channels_t, 1)

with ``up_i = conv(w_{i+1}, w_{i+1}, prod(downsample[i]))`` for transposed convs, 0 otherwise.
``updown`` adds no parameters.

Every U-Net spec (here and in :mod:`emrun.recipe.unets`) bounds a level's width by
``MAX_WIDTH``, a kernel size by ``MAX_KERNEL`` and the whole network by ``MAX_PARAMETERS``,
counted from the spec: a typo is a located recipe error, not an out-of-memory failure later.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from ..registry import Spec, models
from .errors import KeyedValueError
from .receptive_field import rsunet_receptive_field
from .types import Size, items_schema

Norm = Literal["batch", "group", "instance", "none"]
Activation = Literal["relu", "elu", "leaky_relu", "gelu"]
Factor = tuple[
    Literal[1, 2, 3, 4], Literal[1, 2, 3, 4], Literal[1, 2, 3, 4]
]  # pooling factors per axis, z, y, x

MAX_WIDTH = 4096
"""Channels of one level at most. The widest 3D segmentation U-Nets we know of stop at about
1,024 (nnU-Net caps at 320, MedNeXt-L and Swin UNETR at 512-768, STU-Net-H at 1,024); one
3x3x3 conv of 4,096 -> 4,096 channels alone has 453 million parameters (1.8 GB of float32
weights). A wider level is a typo (an extra 0), which used to pass validation and fail as an
out-of-memory error or a huge allocation."""

MAX_KERNEL = 15
"""Convolution kernel size per axis at most: 3D networks use 3 to 7 (MedNeXt and 3D UX-Net's
large kernels are 5 and 7); a 15x15x15 kernel already has 3,375 taps per channel pair."""

MAX_PARAMETERS = 2**31
"""Trainable parameters a model may have (2.1 billion): 8.6 GB of float32 weights, four times
that (34 GB) to train with Adam (weights, gradients, two moments) before any activation.
The largest 3D segmentation network we know of (STU-Net-H) has about 1.4 billion; the widths and
kernel bounds alone still allow trillions (8 levels of 4,096 channels)."""

Width = Annotated[int, Field(gt=0, le=MAX_WIDTH, strict=True)]
KernelSize = Annotated[int, Field(ge=1, le=MAX_KERNEL, strict=True,
                                  json_schema_extra={"not": {"multipleOf": 2}})]  # odd
Kernel = tuple[KernelSize, KernelSize, KernelSize]


class ModelBase(Spec):
    """What every model spec tells without being built; the defaults suit a model that
    takes any size of a one-channel image and says nothing more about itself."""

    def divisor(self) -> tuple[int, int, int]:
        """Each input size must be a multiple of this, per axis."""
        return (1, 1, 1)

    def input_channels(self) -> int:
        """Channels of the input image."""
        return 1

    def receptive_field(self) -> tuple[int, int, int] | None:
        """Input voxels per axis, z, y, x, that can influence one output voxel; None when
        the model does not know (reported as unknown)."""
        return None

    def title(self) -> str:
        """The model in a few words, for messages (e.g. 'rsunet with 4 levels')."""
        return str(self.type)  # type: ignore[attr-defined]

    def deepest_norm_widths(self) -> tuple[int, ...]:
        """Channels of the normalisations at the deepest level, where a patch equal to the
        divisor leaves one voxel: group norm with one channel per group has no statistics
        there (empty: the model does not say, and nothing is checked)."""
        return ()

    def summary(self) -> str:
        """Its parameters in one line, for `emrun validate` (default: every field but type)."""
        fields = self.model_dump(exclude={"type"})
        return ", ".join(f"{k} {v}" for k, v in fields.items()) or "no parameters"


models.require(ModelBase)


def first_one_voxel_level(factors: Sequence[Sequence[int]]) -> int:
    """The first level that a patch equal to the divisor leaves one voxel: the one after
    the last factor that is not (1, 1, 1) (the levels below it, reached by (1, 1, 1),
    have one voxel too)."""
    return max((i + 1 for i, f in enumerate(factors) if tuple(int(a) for a in f) != (1, 1, 1)),
               default=0)


def total_factor(factors: Sequence[Sequence[int]]) -> tuple[int, int, int]:
    """The product of a U-Net's per-level downsampling factors, per axis: what every input
    size must be a multiple of."""
    total = [1, 1, 1]
    for f in factors:
        total = [t * int(a) for t, a in zip(total, f, strict=True)]
    return (total[0], total[1], total[2])


def check_odd(key: str, sizes: Sequence[int]) -> None:
    """Kernel sizes must be odd: only then does a padded convolution keep the size."""
    if any(k % 2 == 0 for k in sizes):
        raise KeyedValueError(key, f"{key} sizes must be odd so convolutions keep the size "
                              f"(got {list(sizes)})")


def check_levels(widths: Sequence[int], downsample: Sequence[Any] | None,
                 anisotropic_levels: Sequence[int], norm: str, groups: int,
                 written: set[str]) -> None:
    """What every U-Net spec checks of its levels: one downsampling factor per level below
    the top, anisotropic levels that exist, widths that group norm can split (said at
    ``groups`` when the recipe wrote it, else at ``widths``)."""
    levels = len(widths)
    if downsample is not None and len(downsample) != levels - 1:
        raise KeyedValueError("downsample", "downsample needs one factor per level below the "
                              f"top: {levels - 1} for {levels} widths (got {len(downsample)})")
    bad = [lv for lv in anisotropic_levels if not 0 <= lv < levels]
    if bad:
        raise KeyedValueError("anisotropic_levels",
                              f"anisotropic_levels {bad} outside 0..{levels - 1}")
    if norm == "group":
        odd = [w for w in widths if w % groups]
        if odd:
            raise KeyedValueError("groups" if "groups" in written else "widths",
                                  f"widths {odd} are not divisible by groups={groups}: "
                                  "change widths, or groups to a divisor of every width")


def check_parameters(count: int, written: set[str]) -> None:
    """Refuse a network too large for any machine (``MAX_PARAMETERS``), stating its size,
    at the key that made it so: ``widths`` when the recipe wrote them, else ``kernel``."""
    if count <= MAX_PARAMETERS:
        return
    key = "widths" if "widths" in written or "kernel" not in written else "kernel"
    gib = count * 4 / 2**30
    raise KeyedValueError(
        key, f"the network would have {count:,} parameters ({gib:,.0f} GiB of float32 "
        f"weights, about {4 * gib:,.0f} GiB to train with Adam), more than the "
        f"{MAX_PARAMETERS:,} allowed; reduce widths or kernel")


def norm_parameters(norm: str) -> int:
    """Parameters per channel of a normalisation: affine scale and shift, none for none."""
    return 0 if norm == "none" else 2


def conv_parameters(c_in: int, c_out: int, taps: int) -> int:
    """Parameters of a conv (or a transposed conv) with bias: weights and one bias each."""
    return c_in * c_out * taps + c_out


def zyx_text(values: Sequence[int]) -> str:
    """A size or factor per axis as '1x2x2'."""
    return "x".join(str(int(v)) for v in values)


def sampling_text(factors: Sequence[Sequence[int]], down: str, up: str) -> str:
    """The down- and upsampling between levels, factor per level top to bottom, and how
    each is done: what makes two networks of the same widths see different scales."""
    if not factors:
        return "one level (no down- or upsampling)"
    listed = ", ".join(zyx_text(f) for f in factors)
    return f"down [{listed}] by {down}, up [{listed}] by {up}"


def kernel_text(kernel: Sequence[int], anisotropic: Sequence[int],
                in_plane: Sequence[int]) -> str:
    """The level kernel and the one the anisotropic levels use instead."""
    text = f"kernel {zyx_text(kernel)}"
    if anisotropic:
        text += f" ({zyx_text(in_plane)} at levels {sorted(set(anisotropic))})"
    return text


class RSUNetBase(ModelBase):
    """Residual symmetric U-Net parameters (DeepEM / Lee et al. 2017)."""

    widths: list[Width] = Field(
        [16, 32, 64, 128],
        min_length=1,
        max_length=8,
        description="Channels per level, top to bottom (Lee 2017: [24, 32, 48, 72, 104]); "
        f"at most {MAX_WIDTH} each.",
    )
    downsample: list[Factor] | None = Field(
        None,
        description="Pooling factor between consecutive levels, z, y, x; one per level below "
        "the top. Default (1, 2, 2) everywhere (anisotropic ssEM); use (2, 2, 2) for "
        "isotropic data.",
    )
    kernel: Kernel = Field(
        (3, 3, 3), description="Convolution kernel of the level blocks, z, y, x (odd sizes, "
        f"at most {MAX_KERNEL}); levels in `anisotropic_levels` use 1x3x3 instead, whatever "
        "this says.")
    anisotropic_levels: list[int] = Field(
        [], json_schema_extra=items_schema(minimum=0),
        description="Levels (0 = top) whose blocks use a fixed 1x3x3 kernel instead of "
        "`kernel` (always 1x3x3, even when `kernel` is larger in-plane; resenc and mednext "
        "use 1 x kernel_y x kernel_x there instead)."
    )
    input_kernel: Kernel = Field(
        (1, 5, 5), description=f"Kernel of the input convolution (odd sizes, at most "
        f"{MAX_KERNEL}).")
    in_channels: Size = Field(1, le=64, description="Input image channels.")
    norm: Norm = Field("batch", description="Normalisation before each convolution.")
    groups: Size = Field(8, le=1024, description="Groups for `norm: group`.")
    activation: Activation = Field("elu", description="Activation after each normalisation.")
    upsample: Literal["interp", "transpose"] = Field(
        "interp", description="Upsampling: (tri/bi)linear interpolation or transposed conv."
    )

    @model_validator(mode="after")
    def _check(self) -> RSUNetBase:
        for name in ("kernel", "input_kernel"):
            check_odd(name, getattr(self, name))
        check_levels(self.widths, self.downsample, self.anisotropic_levels, self.norm,
                     self.groups, self.model_fields_set)
        check_parameters(self.parameter_count([]), self.model_fields_set)
        return self

    def factors(self) -> list[tuple[int, int, int]]:
        """Pooling factor between each pair of consecutive levels."""
        if self.downsample is not None:
            return [tuple(f) for f in self.downsample]  # type: ignore[misc]
        return [(1, 2, 2)] * (len(self.widths) - 1)

    def divisor(self) -> tuple[int, int, int]:
        """Each input size must be a multiple of this, per axis, for the model to accept it."""
        return total_factor(self.factors())

    def level_kernel(self, level: int) -> tuple[int, int, int]:
        return (1, 3, 3) if level in self.anisotropic_levels else self.kernel

    def input_channels(self) -> int:
        return int(self.in_channels)

    def receptive_field(self) -> tuple[int, int, int]:
        """Exact, by interval propagation (``emrun.recipe.receptive_field``)."""
        return rsunet_receptive_field(self)

    def title(self) -> str:
        return f"{self.type} with {len(self.widths)} levels"  # type: ignore[attr-defined]

    def deepest_norm_widths(self) -> tuple[int, ...]:
        """Each one-voxel level's block normalises its input (the level above's width,
        after pooling) and its own width (pre-activated convs): the deepest level's, and
        those of levels above it reached by (1, 1, 1) (`first_one_voxel_level`)."""
        first = first_one_voxel_level(self.factors())
        return tuple(int(w) for w in self.widths[max(first - 1, 0):])

    def summary(self) -> str:
        """Widths, the pooling and upsampling per level, kernels, norm and activation."""
        up = "transposed conv" if self.upsample == "transpose" else "trilinear interpolation"
        return (f"widths {list(self.widths)}, {sampling_text(self.factors(), 'max pool', up)}, "
                f"{kernel_text(self.kernel, self.anisotropic_levels, (1, 3, 3))}, "
                f"norm {self.norm}, {self.activation}")

    def parameter_count(self, head_channels: list[int]) -> int:
        """Exact number of trainable parameters (see the module docstring for the formula)."""
        norm = norm_parameters(self.norm)
        conv = conv_parameters

        def block(a: int, w: int, k: int) -> int:
            return norm * a + conv(a, w, k) + 3 * (norm * w + conv(w, w, k))

        w = self.widths
        kvol = [math.prod(self.level_kernel(i)) for i in range(len(w))]
        total = conv(self.in_channels, w[0], math.prod(self.input_kernel))
        for i in range(len(w)):
            total += block(w[max(i - 1, 0)], w[i], kvol[i])
        for i, factor in enumerate(self.factors()):
            if self.upsample == "transpose":
                total += conv(w[i + 1], w[i + 1], math.prod(factor))
            total += conv(w[i + 1], w[i], 1) + block(w[i], w[i], kvol[i])
        total += norm * w[0] + sum(conv(w[0], c, 1) for c in head_channels)
        return total


@models.register("rsunet")
class RSUNet(RSUNetBase):
    """Residual symmetric U-Net."""

    type: Literal["rsunet"] = "rsunet"


@models.register("updown")
class UpDown(RSUNetBase):
    """An RSUNet behind average pooling, with heads upsampled back to the input resolution:
    runs a network trained at half resolution on full-resolution data."""

    type: Literal["updown"] = "updown"
    factor: Factor = Field((1, 2, 2), description="Pooling in front of the RSUNet, z, y, x.")

    def divisor(self) -> tuple[int, int, int]:
        inner = super().divisor()
        return (inner[0] * self.factor[0], inner[1] * self.factor[1], inner[2] * self.factor[2])

    def receptive_field(self) -> tuple[int, int, int]:
        factor = (int(self.factor[0]), int(self.factor[1]), int(self.factor[2]))
        return rsunet_receptive_field(self, factor)

    def summary(self) -> str:
        """RSUNet's line and the pooling in front: the resolution the network runs at."""
        return (f"{super().summary()}, factor {list(self.factor)} (down by average pool in "
                "front, up by trilinear interpolation after)")


