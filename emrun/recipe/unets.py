"""Specs of the staged U-Nets `resenc` (nnU-Net ResEnc) and `mednext` (MedNeXt).

Both share the rsunet conventions: ``widths`` per level (top to bottom), ``downsample`` one
factor per level below the top (z, y, x), ``kernel`` with ``anisotropic_levels`` using an
in-plane kernel (``1 x k_y x k_x``) and odd kernels padded by ``k // 2``, so every input that
is a multiple of ``divisor()`` is kept at its size. Their default downsampling suits 30x6x6 nm
ssEM the way nnU-Net's planner would: in-plane twice (6 -> 24 nm, now close to 30 nm), then
isotropic.

``resenc`` (Isensee et al. 2024): a stem conv (``w_0``, norm, act); encoder level ``i`` is
``blocks[i]`` residual blocks ``conv-norm-act-conv-norm (+ shortcut) -> act``, the first block
of level ``i > 0`` striding by ``downsample[i-1]`` (shortcut: average pool by the stride and a
1x1x1 conv + norm, used whenever the stride or the channels change); decoder level ``i``:
upsample level ``i+1`` (transposed conv ``w_{i+1} -> w_i`` with kernel = stride, or trilinear
and a 1x1x1 conv), concatenate the level-``i`` skip, one conv-norm-act ``2 w_i -> w_i``; a
1x1x1 head per task.

``mednext`` (Roy et al. 2023): a 1x1x1 stem; a MedNeXt block is ``x + compress(GELU(
expand(norm(depthwise_conv_k(x)))))`` with 1x1x1 ``expand`` to ``expansion * c`` channels;
level ``i > 0`` starts with a down block (the same with a strided depthwise conv and a strided
1x1x1 conv as residual, ``w_{i-1} -> w_i``); each decoder level starts with an up block (a
depthwise transposed conv by the factor, a transposed 1x1x1 residual, ``w_{i+1} -> w_i``), adds
the skip, then runs ``blocks[i]`` blocks; a 1x1x1 head per task. The down and up blocks between
levels ``i`` and ``i+1`` use level ``i+1``'s kernel, which must be at least the factor per axis
(a transposed conv with a smaller kernel leaves holes).
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from ..registry import models
from .errors import KeyedValueError
from .model import (
    MAX_KERNEL,
    MAX_WIDTH,
    Activation,
    Factor,
    Kernel,
    ModelBase,
    Norm,
    Width,
    check_levels,
    check_odd,
    check_parameters,
    conv_parameters,
    first_one_voxel_level,
    kernel_text,
    norm_parameters,
    sampling_text,
    total_factor,
)
from .receptive_field_unets import mednext_receptive_field, resenc_receptive_field
from .types import Size, items_schema

BlockCount = Annotated[int, Field(ge=1, le=16, strict=True)]

EM_DOWNSAMPLE = [(1, 2, 2), (1, 2, 2)]  # then (2, 2, 2): see the module docstring


class StagedUNetBase(ModelBase):
    """What resenc and mednext share: levels, their widths, blocks, kernels and pooling."""

    widths: list[Width] = Field([32, 64, 128, 256], min_length=1, max_length=8,
                                description="Channels per level, top to bottom; at most "
                                f"{MAX_WIDTH} each.")
    blocks: list[BlockCount] | None = Field(None, min_length=1, max_length=8,
                                            description="Blocks per level, top to bottom.")
    downsample: list[Factor] | None = Field(
        None,
        description="Downsampling factor between consecutive levels, z, y, x; one per level "
        "below the top. Default (1, 2, 2) for the first two, then (2, 2, 2) (30x6x6 nm ssEM).",
    )
    kernel: Kernel = Field((3, 3, 3), description="Convolution kernel, z, y, x (odd sizes, "
                           f"at most {MAX_KERNEL}).")
    anisotropic_levels: list[int] = Field(
        [], json_schema_extra=items_schema(minimum=0),
        description="Levels (0 = top) whose kernels are in-plane: 1 x kernel_y x kernel_x.")
    in_channels: Size = Field(1, le=64, description="Input image channels.")
    norm: Norm = Field("instance", description="Normalisation.")
    groups: Size = Field(8, le=1024, description="Groups for `norm: group`.")

    @model_validator(mode="after")
    def _check_levels(self) -> StagedUNetBase:
        levels = len(self.widths)
        check_odd("kernel", self.kernel)
        if self.blocks is not None and len(self.blocks) != levels:
            raise KeyedValueError("blocks", f"blocks needs one count per level: {levels} "
                                  f"for {levels} widths (got {len(self.blocks)})")
        check_levels(self.widths, self.downsample, self.anisotropic_levels, self.norm,
                     self.groups, self.model_fields_set)
        check_parameters(self.parameter_count([]), self.model_fields_set)
        return self

    def factors(self) -> list[tuple[int, int, int]]:
        """Downsampling factor between each pair of consecutive levels."""
        if self.downsample is not None:
            return [(int(f[0]), int(f[1]), int(f[2])) for f in self.downsample]
        n = len(self.widths) - 1
        return (EM_DOWNSAMPLE + [(2, 2, 2)] * n)[:n]

    def level_blocks(self) -> list[int]:
        """Blocks per level: ``blocks``, or the model's default pattern cut to the levels."""
        if self.blocks is not None:
            return [int(b) for b in self.blocks]
        return self.default_blocks(len(self.widths))

    def default_blocks(self, levels: int) -> list[int]:
        return [2] * levels

    def divisor(self) -> tuple[int, int, int]:
        return total_factor(self.factors())

    def level_kernel(self, level: int) -> tuple[int, int, int]:
        k = (int(self.kernel[0]), int(self.kernel[1]), int(self.kernel[2]))
        return (1, k[1], k[2]) if level in self.anisotropic_levels else k

    def input_channels(self) -> int:
        return int(self.in_channels)

    def title(self) -> str:
        return f"{self.type} with {len(self.widths)} levels"  # type: ignore[attr-defined]

    def kernels_text(self) -> str:
        """The kernel, and the in-plane one of the anisotropic levels, for summaries."""
        return kernel_text(self.kernel, self.anisotropic_levels,
                           (1, self.kernel[1], self.kernel[2]))

    def parameter_count(self, head_channels: list[int]) -> int:
        """Exact number of trainable parameters, heads of ``head_channels`` included
        (from the spec alone; the tests check it against the built model)."""
        raise NotImplementedError


@models.register("resenc")
class ResEnc(StagedUNetBase):
    """Residual-encoder U-Net (nnU-Net ResEnc, Isensee et al. 2024)."""

    type: Literal["resenc"] = "resenc"
    blocks: list[BlockCount] | None = Field(
        None, min_length=1, max_length=8,
        description="Residual blocks per encoder level, top to bottom. Default: ResEnc M's "
        "1, 3, 4, 6, 6, 6, 6, 6 cut to the levels.")
    anisotropic_levels: list[int] = Field(
        [0, 1], json_schema_extra=items_schema(minimum=0),
        description="Levels (0 = top) whose kernels are in-plane: 1 x kernel_y x "
        "kernel_x (default: the two levels still finer in-plane than in z at 30x6x6 nm).")
    activation: Activation = Field("leaky_relu", description="Activation after each norm.")
    upsample: Literal["interp", "transpose"] = Field(
        "transpose", description="Upsampling: transposed conv, or trilinear + 1x1x1 conv.")

    @model_validator(mode="before")
    @classmethod
    def _default_levels_that_exist(cls, data: Any) -> Any:
        """The default in-plane levels, 0 and 1, cut to the levels there are: a one-level
        ResEnc was refused for 'anisotropic_levels [1] outside 0..0', a key not written."""
        if isinstance(data, dict) and "anisotropic_levels" not in data and \
                isinstance(data.get("widths"), list) and len(data["widths"]) < 2:
            return {**data, "anisotropic_levels": list(range(len(data["widths"])))}
        return data

    def default_blocks(self, levels: int) -> list[int]:
        return [1, 3, 4, 6, 6, 6, 6, 6][:levels]

    def receptive_field(self) -> tuple[int, int, int]:
        """Exact, by interval propagation (``emrun.recipe.receptive_field_unets``)."""
        return resenc_receptive_field(self)

    def deepest_norm_widths(self) -> tuple[int, ...]:
        """The strided conv into each one-voxel level (`first_one_voxel_level`) and its
        blocks normalise their outputs."""
        return tuple(int(w) for w in self.widths[first_one_voxel_level(self.factors()):])

    def parameter_count(self, head_channels: list[int]) -> int:
        """Exact number of trainable parameters (layout in the module docstring)."""
        n, conv = norm_parameters(self.norm), conv_parameters
        w, factors = [int(a) for a in self.widths], self.factors()
        taps = [math.prod(self.level_kernel(i)) for i in range(len(w))]

        def block(a: int, b: int, k: int, strided: bool) -> int:
            total = conv(a, b, k) + conv(b, b, k) + 2 * n * b
            return total + (conv(a, b, 1) + n * b if strided or a != b else 0)

        total = conv(self.in_channels, w[0], taps[0]) + n * w[0]  # stem
        for i, count in enumerate(self.level_blocks()):
            total += block(w[max(i - 1, 0)], w[i], taps[i], i > 0 and factors[i - 1] != (1, 1, 1))
            total += (count - 1) * block(w[i], w[i], taps[i], False)
        for i, f in enumerate(factors):
            up = math.prod(f) if self.upsample == "transpose" else 1
            total += conv(w[i + 1], w[i], up) + conv(2 * w[i], w[i], taps[i]) + n * w[i]
        return total + sum(conv(w[0], c, 1) for c in head_channels)

    def summary(self) -> str:
        """Widths, blocks, the down- and upsampling per level, kernels, norm, activation."""
        up = ("transposed conv" if self.upsample == "transpose"
              else "trilinear interpolation and 1x1x1 conv")
        return (f"widths {list(self.widths)}, blocks {self.level_blocks()}, "
                f"{sampling_text(self.factors(), 'strided conv', up)}, {self.kernels_text()}, "
                f"norm {self.norm}, {self.activation}")


@models.register("mednext")
class MedNeXt(StagedUNetBase):
    """MedNeXt U-Net (Roy et al. 2023): ConvNeXt-style depthwise blocks at every level."""

    type: Literal["mednext"] = "mednext"
    blocks: list[BlockCount] | None = Field(
        None, min_length=1, max_length=8,
        description="MedNeXt blocks per level, top to bottom, in the encoder and again in the "
        "decoder. Default: 2 per level (MedNeXt-S).")
    kernel: Kernel = Field((3, 5, 5), description="Depthwise kernel, z, y, x (odd sizes).")
    expansion: Annotated[int, Field(ge=1, le=8, strict=True)] = Field(
        2, description="Channel expansion of the 1x1x1 inverted bottleneck (MedNeXt-S: 2).")

    @model_validator(mode="after")
    def _check_kernels_cover_factors(self) -> MedNeXt:
        for i, factor in enumerate(self.factors()):
            k = self.level_kernel(i + 1)
            if any(a < f for a, f in zip(k, factor, strict=True)):
                # point at what the recipe wrote: the factor, else what made the kernel
                written = [key for key in ("downsample", "anisotropic_levels", "kernel")
                           if key in self.model_fields_set]
                raise KeyedValueError(
                    written[0] if written else "kernel",
                    f"level {i + 1}'s kernel {list(k)} is smaller than its downsample factor "
                    f"{list(factor)} on some axis; up blocks would leave holes")
        return self

    def deepest_norm_widths(self) -> tuple[int, ...]:
        """The down block into each one-voxel level (`first_one_voxel_level`) normalises
        its input's width after its strided depthwise conv; the level's blocks their own
        width."""
        first = first_one_voxel_level(self.factors())
        return tuple(int(w) for w in self.widths[max(first - 1, 0):])

    def receptive_field(self) -> tuple[int, int, int]:
        """Exact, by interval propagation (``emrun.recipe.receptive_field_unets``)."""
        return mednext_receptive_field(self)

    def parameter_count(self, head_channels: list[int]) -> int:
        """Exact number of trainable parameters (layout in the module docstring)."""
        n, conv, e = norm_parameters(self.norm), conv_parameters, int(self.expansion)
        w = [int(a) for a in self.widths]
        taps = [math.prod(self.level_kernel(i)) for i in range(len(w))]

        def block(a: int, b: int, k: int, resampling: bool) -> int:
            """Depthwise conv (a weight per channel and tap), norm, expand, compress, and
            the 1x1x1 (transposed) residual conv of a down or up block."""
            total = conv(1, a, k) + n * a + conv(a, e * a, 1) + conv(e * a, b, 1)
            return total + (conv(a, b, 1) if resampling else 0)

        blocks = self.level_blocks()
        total = conv(self.in_channels, w[0], 1)  # stem
        total += sum(blocks[i] * block(w[i], w[i], taps[i], False) for i in range(len(w)))
        for i in range(len(w) - 1):
            total += block(w[i], w[i + 1], taps[i + 1], True)  # down
            total += block(w[i + 1], w[i], taps[i + 1], True)  # up
            total += blocks[i] * block(w[i], w[i], taps[i], False)  # decoder
        return total + sum(conv(w[0], c, 1) for c in head_channels)

    def summary(self) -> str:
        """Widths, blocks, the down- and upsampling per level, kernels, expansion, norm."""
        sampling = sampling_text(self.factors(), "strided depthwise conv",
                                 "transposed depthwise conv")
        return (f"widths {list(self.widths)}, blocks {self.level_blocks()}, {sampling}, "
                f"{self.kernels_text()}, expansion {self.expansion}, norm {self.norm}")
