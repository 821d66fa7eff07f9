"""`mednext`: a U-Net of MedNeXt blocks (Roy et al. 2023), ConvNeXt's design in 3D.

A block is a large-kernel depthwise conv, a norm, a 1x1x1 expansion (``expansion`` times the
channels), GELU and a 1x1x1 compression, added to its input: large receptive fields for few
parameters, and the widening happens where it is cheap (pointwise). The layout is documented
in :mod:`emrun.recipe.unets`. ``forward(x)`` takes ``(b, in_channels, z, y, x)`` with every
size a multiple of ``spec.divisor()`` and returns ``{task: (b, channels_t, z, y, x)}``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..geometry import Zyx
from ..recipe.unets import MedNeXt
from ..registry import models
from .blocks import make_norm, same_padding, task_heads
from .rsunet import check_input, total_factor


def _zyx(v: Sequence[int]) -> Zyx:
    return (int(v[0]), int(v[1]), int(v[2]))


class MedNeXtBlock(nn.Module):
    """``depthwise conv -> norm -> 1x1x1 expand -> GELU -> 1x1x1 compress`` plus a residual.

    ``mode`` ``same`` keeps size and channels (identity residual); ``down`` strides the
    depthwise conv by ``factor`` and takes a strided 1x1x1 conv as residual; ``up`` makes the
    depthwise conv transposed (``factor`` times larger) with a transposed 1x1x1 residual.
    """

    def __init__(self, c_in: int, c_out: int, kernel: Sequence[int], *, expansion: int,
                 norm: str, groups: int, mode: str = "same",
                 factor: Sequence[int] = (1, 1, 1)) -> None:
        super().__init__()
        k, s, pad = _zyx(kernel), _zyx(factor), same_padding(kernel)
        self.mode = mode
        if mode == "up":
            self.depthwise: nn.Module = nn.ConvTranspose3d(
                c_in, c_in, k, stride=s, padding=pad, output_padding=tuple(a - 1 for a in s),
                groups=c_in)
            self.residual: nn.Module | None = nn.ConvTranspose3d(
                c_in, c_out, 1, stride=s, output_padding=tuple(a - 1 for a in s))
        else:
            self.depthwise = nn.Conv3d(c_in, c_in, k, stride=s, padding=pad, groups=c_in)
            self.residual = nn.Conv3d(c_in, c_out, 1, stride=s) if mode == "down" else None
        self.norm = make_norm(norm, c_in, groups)
        self.expand = nn.Conv3d(c_in, expansion * c_in, 1)
        self.act = nn.GELU()
        self.compress = nn.Conv3d(expansion * c_in, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.compress(self.act(self.expand(self.norm(self.depthwise(x)))))
        return y + (x if self.residual is None else self.residual(x))  # type: ignore[no-any-return]


class MedNeXtModel(nn.Module):
    """MedNeXt U-Net with one 1x1x1 head per task (see the module docstring)."""

    def __init__(self, spec: MedNeXt, head_channels: Mapping[str, int]) -> None:
        super().__init__()
        widths = [int(w) for w in spec.widths]
        opts: dict[str, Any] = {"expansion": int(spec.expansion), "norm": spec.norm,
                                "groups": spec.groups}
        factors = spec.factors()
        self.in_channels = int(spec.in_channels)
        self.divisor: Zyx = total_factor(factors)
        self.stem = nn.Conv3d(self.in_channels, widths[0], 1)

        def stage(level: int) -> nn.Sequential:
            w, k = widths[level], spec.level_kernel(level)
            return nn.Sequential(*(MedNeXtBlock(w, w, k, **opts)
                                   for _ in range(int(spec.level_blocks()[level]))))

        self.downs = nn.ModuleList(
            MedNeXtBlock(widths[i], widths[i + 1], spec.level_kernel(i + 1), mode="down",
                         factor=f, **opts) for i, f in enumerate(factors))
        self.encoders = nn.ModuleList(stage(i) for i in range(len(widths)))
        self.ups = nn.ModuleList(
            MedNeXtBlock(widths[i + 1], widths[i], spec.level_kernel(i + 1), mode="up",
                         factor=f, **opts) for i, f in enumerate(factors))
        self.decoders = nn.ModuleList(stage(i) for i in range(len(factors)))
        self.heads = task_heads(head_channels, widths[0])
        # PyTorch's default init (as MedNeXt's): He-normal weights (``init_weights``) make
        # every pre-norm residual branch add about the stream's size, so outputs grow with
        # depth (std ~1e5 for the default model with batch norm in eval, against ~0.2 here).

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The top level's features (``w_0`` channels) at the input's size."""
        x = self.encoders[0](self.stem(x))
        skips = [x]
        for down, encoder in zip(self.downs, self.encoders[1:], strict=True):
            x = encoder(down(x))
            skips.append(x)
        skips.pop()
        for i in reversed(range(len(skips))):
            x = self.decoders[i](self.ups[i](x) + skips[i])
        return x

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        check_input(x, self.in_channels, self.divisor, "mednext")
        features = self.features(x)
        return {task: head(features) for task, head in self.heads.items()}


@models.implement("mednext")
def build_mednext(spec: MedNeXt, *, head_channels: Mapping[str, int],
                  **context: Any) -> nn.Module:
    """Build a :class:`MedNeXtModel` from its spec and the tasks' output channels."""
    return MedNeXtModel(spec, head_channels)
