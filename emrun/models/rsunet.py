"""RSUNet (residual symmetric U-Net, Lee et al. 2017) and UpDown, with multi-task heads.

The architecture is the one documented in :mod:`emrun.recipe.model` (whose
``parameter_count`` this implementation matches exactly):

- input conv ``in_channels -> w_0``, kernel ``input_kernel``, with bias;
- encoder: level 0 is a block ``w_0 -> w_0``; level ``i > 0`` max-pools by ``downsample[i-1]``
  and is a block ``w_{i-1} -> w_i`` (see :class:`~emrun.models.blocks.LevelBlock`);
- decoder, ``i = L-2 .. 0``: upsample by ``downsample[i]`` (trilinear, or a transposed conv),
  a 1x1x1 conv ``w_{i+1} -> w_i`` (bias), sum with the level-``i`` skip, a block ``w_i -> w_i``;
- a final norm(w_0) + activation, then one 1x1x1 conv head ``w_0 -> channels`` per task.

``forward(x)`` takes ``(b, in_channels, z, y, x)`` with every spatial size a multiple of
``spec.divisor()`` and returns ``{task: (b, channels_t, z, y, x)}``, in ``head_channels`` order,
at the input's spatial size.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..geometry import Zyx, zyx
from ..recipe.model import RSUNetBase, UpDown
from ..registry import models
from .blocks import (
    LevelBlock,
    Upsample,
    conv3d,
    init_weights,
    make_activation,
    make_norm,
    task_heads,
)


def total_factor(factors: Sequence[Sequence[int]]) -> Zyx:
    """Product of pooling factors per axis."""
    out = [1, 1, 1]
    for f in factors:
        out = [a * int(b) for a, b in zip(out, f, strict=True)]
    return (out[0], out[1], out[2])


def check_input(x: torch.Tensor, in_channels: int, divisor: Zyx, model: str) -> None:
    """Raise a ValueError naming the divisor when ``x`` is not an input the model accepts."""
    if x.dim() != 5:
        raise ValueError(f"{model} expects a 5D input (batch, channel, z, y, x), "
                         f"got shape {tuple(x.shape)}")
    if x.shape[1] != in_channels:
        raise ValueError(f"{model} expects {in_channels} input channel(s), "
                         f"got {x.shape[1]} (shape {tuple(x.shape)})")
    size = tuple(int(s) for s in x.shape[-3:])
    if any(s % d for s, d in zip(size, divisor, strict=True)):
        fit = tuple(max(d, s // d * d) for s, d in zip(size, divisor, strict=True))
        raise ValueError(
            f"{model} cannot take input size {size} (z, y, x): each size must be a multiple of "
            f"the divisor {divisor}; e.g. {fit} would fit")


class RSUNetModel(nn.Module):
    """Residual symmetric U-Net with one 1x1x1 output head per task (see module docstring)."""

    def __init__(self, spec: RSUNetBase, head_channels: Mapping[str, int]) -> None:
        super().__init__()
        widths = [int(w) for w in spec.widths]
        factors = spec.factors()
        opts: dict[str, Any] = {"norm": spec.norm, "activation": spec.activation,
                                "groups": spec.groups}
        self.in_channels = int(spec.in_channels)
        self.factors = [tuple(int(a) for a in f) for f in factors]
        self.divisor: Zyx = total_factor(factors)
        self.head_channels = {k: int(v) for k, v in head_channels.items()}

        self.input_conv = conv3d(self.in_channels, widths[0], spec.input_kernel)
        self.encoders = nn.ModuleList(
            LevelBlock(widths[max(i - 1, 0)], w, spec.level_kernel(i), **opts)
            for i, w in enumerate(widths))
        self.pools = nn.ModuleList(nn.MaxPool3d(f, stride=f) for f in self.factors)
        self.upsamples = nn.ModuleList(
            Upsample(widths[i + 1], f, spec.upsample)  # type: ignore[arg-type]
            for i, f in enumerate(self.factors))
        self.reduces = nn.ModuleList(
            nn.Conv3d(widths[i + 1], widths[i], 1, bias=True) for i in range(len(self.factors)))
        self.decoders = nn.ModuleList(
            LevelBlock(widths[i], widths[i], spec.level_kernel(i), **opts)
            for i in range(len(self.factors)))
        self.final = nn.Sequential(make_norm(spec.norm, widths[0], spec.groups),
                                   make_activation(spec.activation))
        self.heads = task_heads(head_channels, widths[0])
        init_weights(self)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The top level's activated features (``w_0`` channels) at the input's size."""
        x = self.encoders[0](self.input_conv(x))
        skips = [x]
        for pool, encoder in zip(self.pools, self.encoders[1:], strict=True):
            x = encoder(pool(x))
            skips.append(x)
        skips.pop()
        for i in reversed(range(len(skips))):
            skip = skips[i]
            x = self.upsamples[i](x, skip.shape[-3:])
            x = self.reduces[i](x) + skip
            x = self.decoders[i](x)
        return self.final(x)  # type: ignore[no-any-return]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        check_input(x, self.in_channels, self.divisor, "rsunet")
        features = self.features(x)
        return {task: head(features) for task, head in self.heads.items()}


class UpDownModel(nn.Module):
    """An RSUNet behind ``AvgPool3d(factor)``; every head is upsampled (trilinear) back to the
    input's size. Adds no parameters to the inner RSUNet."""

    def __init__(self, spec: UpDown, head_channels: Mapping[str, int]) -> None:
        super().__init__()
        self.factor: Zyx = (int(spec.factor[0]), int(spec.factor[1]), int(spec.factor[2]))
        self.in_channels = int(spec.in_channels)
        self.head_channels = {k: int(v) for k, v in head_channels.items()}
        self.pool = nn.AvgPool3d(self.factor, stride=self.factor)
        self.inner = RSUNetModel(spec, head_channels)
        self.divisor: Zyx = zyx(
            a * b for a, b in zip(self.inner.divisor, self.factor, strict=True))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        check_input(x, self.in_channels, self.divisor, "updown")
        if self.factor == (1, 1, 1):
            return self.inner(x)  # type: ignore[no-any-return]
        size = tuple(x.shape[-3:])
        outputs = self.inner(self.pool(x))
        return {task: F.interpolate(y, size=size, mode="trilinear", align_corners=False)
                for task, y in outputs.items()}


@models.implement("rsunet")
def build_rsunet(spec: RSUNetBase, *, head_channels: Mapping[str, int],
                 **context: Any) -> nn.Module:
    """Build an :class:`RSUNetModel` from its spec and the tasks' output channels."""
    return RSUNetModel(spec, head_channels)


@models.implement("updown")
def build_updown(spec: UpDown, *, head_channels: Mapping[str, int],
                 **context: Any) -> nn.Module:
    """Build an :class:`UpDownModel` from its spec and the tasks' output channels."""
    return UpDownModel(spec, head_channels)


def parameter_count(model: nn.Module) -> int:
    """Number of trainable parameters of a built model."""
    return sum(math.prod(p.shape) for p in model.parameters() if p.requires_grad)
