"""`resenc`: a residual-encoder U-Net in the style of nnU-Net ResEnc (Isensee et al. 2024).

The layout is documented in :mod:`emrun.recipe.unets`: a stem conv, residual encoder stages
that downsample with strided convs, a light decoder (one conv-norm-act per level after
upsampling and concatenating the skip) and a 1x1x1 head per task. ``forward(x)`` takes
``(b, in_channels, z, y, x)`` with every size a multiple of ``spec.divisor()`` and returns
``{task: (b, channels_t, z, y, x)}`` at the input's size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..geometry import Zyx
from ..recipe.unets import ResEnc
from ..registry import models
from .blocks import init_weights, make_activation, make_norm, same_padding, task_heads
from .rsunet import check_input, total_factor


def conv(c_in: int, c_out: int, kernel: Sequence[int], stride: Sequence[int] = (1, 1, 1)
         ) -> nn.Conv3d:
    """A conv padded by ``k // 2``: keeps the size at stride 1, divides it by the stride."""
    k = (int(kernel[0]), int(kernel[1]), int(kernel[2]))
    s = (int(stride[0]), int(stride[1]), int(stride[2]))
    return nn.Conv3d(c_in, c_out, k, stride=s, padding=same_padding(k), bias=True)


class ConvNormAct(nn.Sequential):
    """conv -> norm -> activation (nnU-Net's post-activated order)."""

    def __init__(self, c_in: int, c_out: int, kernel: Sequence[int], *, norm: str,
                 activation: str, groups: int) -> None:
        super().__init__()
        self.conv = conv(c_in, c_out, kernel)
        self.norm = make_norm(norm, c_out, groups)
        self.act = make_activation(activation)


class ResidualBlock(nn.Module):
    """conv(stride) -> norm -> act -> conv -> norm, plus the input (average-pooled by the
    stride and projected by a 1x1x1 conv + norm when stride or channels change), -> act."""

    def __init__(self, c_in: int, c_out: int, kernel: Sequence[int], stride: Sequence[int], *,
                 norm: str, activation: str, groups: int) -> None:
        super().__init__()
        self.conv1 = conv(c_in, c_out, kernel, stride)
        self.norm1 = make_norm(norm, c_out, groups)
        self.act1 = make_activation(activation)
        self.conv2 = conv(c_out, c_out, kernel)
        self.norm2 = make_norm(norm, c_out, groups)
        self.act2 = make_activation(activation)
        stride = tuple(int(s) for s in stride)
        shortcut: list[nn.Module] = []
        if stride != (1, 1, 1):
            shortcut.append(nn.AvgPool3d(stride, stride=stride))
        if stride != (1, 1, 1) or c_in != c_out:
            shortcut += [nn.Conv3d(c_in, c_out, 1, bias=True), make_norm(norm, c_out, groups)]
        self.shortcut = nn.Sequential(*shortcut)  # empty: identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm2(self.conv2(self.act1(self.norm1(self.conv1(x)))))
        return self.act2(y + self.shortcut(x))  # type: ignore[no-any-return]


class UpConv(nn.Module):
    """Level ``i+1`` to level ``i``: a transposed conv ``c_in -> c_out`` with kernel = stride
    = the factor, or trilinear interpolation and a 1x1x1 conv."""

    def __init__(self, c_in: int, c_out: int, factor: Zyx, mode: str) -> None:
        super().__init__()
        self.factor, self.mode = factor, mode
        if mode == "transpose":
            self.conv: nn.Module = nn.ConvTranspose3d(c_in, c_out, factor, stride=factor)
        else:
            self.conv = nn.Conv3d(c_in, c_out, 1, bias=True)

    def forward(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        if self.mode == "transpose":
            return self.conv(x)  # type: ignore[no-any-return]
        if self.factor != (1, 1, 1):
            x = F.interpolate(x, size=tuple(size), mode="trilinear", align_corners=False)
        return self.conv(x)  # type: ignore[no-any-return]


class ResEncModel(nn.Module):
    """Residual-encoder U-Net with one 1x1x1 head per task (see the module docstring)."""

    def __init__(self, spec: ResEnc, head_channels: Mapping[str, int]) -> None:
        super().__init__()
        widths = [int(w) for w in spec.widths]
        opts: dict[str, Any] = {"norm": spec.norm, "activation": spec.activation,
                                "groups": spec.groups}
        factors = spec.factors()
        self.in_channels = int(spec.in_channels)
        self.divisor: Zyx = total_factor(factors)
        self.stem = ConvNormAct(self.in_channels, widths[0], spec.level_kernel(0), **opts)
        self.encoders = nn.ModuleList()
        for i, w in enumerate(widths):
            stride = factors[i - 1] if i > 0 else (1, 1, 1)
            c_in = widths[max(i - 1, 0)]
            self.encoders.append(nn.Sequential(*(
                ResidualBlock(c_in if b == 0 else w, w, spec.level_kernel(i),
                              stride if b == 0 else (1, 1, 1), **opts)
                for b in range(int(spec.level_blocks()[i])))))
        self.upsamples = nn.ModuleList(
            UpConv(widths[i + 1], widths[i], f, spec.upsample) for i, f in enumerate(factors))
        self.decoders = nn.ModuleList(
            ConvNormAct(2 * widths[i], widths[i], spec.level_kernel(i), **opts)
            for i in range(len(factors)))
        self.heads = task_heads(head_channels, widths[0])
        init_weights(self)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The top level's features (``w_0`` channels) at the input's size."""
        x = self.stem(x)
        skips = []
        for encoder in self.encoders:
            x = encoder(x)
            skips.append(x)
        skips.pop()
        for i in reversed(range(len(skips))):
            up = self.upsamples[i](x, skips[i].shape[-3:])
            x = self.decoders[i](torch.cat([skips[i], up], dim=1))
        return x

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        check_input(x, self.in_channels, self.divisor, "resenc")
        features = self.features(x)
        return {task: head(features) for task, head in self.heads.items()}


@models.implement("resenc")
def build_resenc(spec: ResEnc, *, head_channels: Mapping[str, int], **context: Any) -> nn.Module:
    """Build a :class:`ResEncModel` from its spec and the tasks' output channels."""
    return ResEncModel(spec, head_channels)
