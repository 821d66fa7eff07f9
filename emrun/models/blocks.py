"""Building blocks of the residual symmetric U-Net: norms, activations, pre-activated convs.

Every convolution after the input convolution is *pre-activated*: norm -> activation -> conv
(with bias). A level block ``c -> w`` is one such conv ``c -> w``, a residual unit (two convs
``w -> w`` whose result is added to the unit's input) and one more conv ``w -> w``.
Convolutions use 'same' padding (``kernel // 2`` per axis), so a block keeps the spatial size.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

Kernel = tuple[int, int, int]


def make_norm(kind: str, channels: int, groups: int = 8) -> nn.Module:
    """An affine normalisation over ``channels`` (``none``: identity, no parameters)."""
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    if kind == "group":
        return nn.GroupNorm(groups, channels)
    if kind == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r} (known: batch, group, instance, none)")


def make_activation(kind: str) -> nn.Module:
    """A fresh activation module (never in place: a residual unit still needs its input)."""
    if kind == "relu":
        return nn.ReLU()
    if kind == "elu":
        return nn.ELU()
    if kind == "leaky_relu":
        return nn.LeakyReLU(0.01)
    if kind == "gelu":
        return nn.GELU()
    raise ValueError(f"unknown activation {kind!r} (known: relu, elu, leaky_relu, gelu)")


def same_padding(kernel: Sequence[int]) -> tuple[int, int, int]:
    """Padding that keeps the size: ``k // 2`` per axis (the recipe allows odd kernels only)."""
    if any(k % 2 == 0 for k in kernel):
        raise ValueError(f"kernel sizes must be odd (got {list(kernel)})")
    return (kernel[0] // 2, kernel[1] // 2, kernel[2] // 2)


def conv3d(c_in: int, c_out: int, kernel: Sequence[int]) -> nn.Conv3d:
    """A stride-1, size-keeping 3D convolution with bias."""
    k = (int(kernel[0]), int(kernel[1]), int(kernel[2]))
    return nn.Conv3d(c_in, c_out, k, padding=same_padding(k), bias=True)


class PreActConv(nn.Sequential):
    """norm(c_in) -> activation -> conv ``c_in -> c_out`` (with bias, 'same' padding)."""

    def __init__(self, c_in: int, c_out: int, kernel: Kernel, *, norm: str, activation: str,
                 groups: int = 8) -> None:
        super().__init__()
        self.norm = make_norm(norm, c_in, groups)
        self.act = make_activation(activation)
        self.conv = conv3d(c_in, c_out, kernel)


class ResidualUnit(nn.Module):
    """Two pre-activated convs ``w -> w`` whose output is added to the unit's input."""

    def __init__(self, width: int, kernel: Kernel, *, norm: str, activation: str,
                 groups: int = 8) -> None:
        super().__init__()
        self.conv1 = PreActConv(width, width, kernel, norm=norm, activation=activation,
                                groups=groups)
        self.conv2 = PreActConv(width, width, kernel, norm=norm, activation=activation,
                                groups=groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.conv1(x))


class LevelBlock(nn.Sequential):
    """One level's block ``c -> w``: a conv ``c -> w``, a residual unit, one more conv."""

    def __init__(self, c_in: int, width: int, kernel: Kernel, *, norm: str, activation: str,
                 groups: int = 8) -> None:
        super().__init__()
        opts = {"norm": norm, "activation": activation, "groups": groups}
        self.pre = PreActConv(c_in, width, kernel, **opts)  # type: ignore[arg-type]
        self.residual = ResidualUnit(width, kernel, **opts)  # type: ignore[arg-type]
        self.post = PreActConv(width, width, kernel, **opts)  # type: ignore[arg-type]


class Upsample(nn.Module):
    """Upsampling between levels: trilinear interpolation (no parameters) or a transposed
    conv ``c -> c`` with kernel = stride = the factor (with bias).

    ``forward(x, size)`` returns ``x`` resized to the spatial ``size`` (the skip's size,
    always ``factor`` times ``x``'s size for accepted inputs).
    """

    def __init__(self, channels: int, factor: Kernel, mode: str) -> None:
        super().__init__()
        self.factor = factor
        self.mode = mode
        if mode == "transpose":
            self.conv: nn.Module | None = nn.ConvTranspose3d(
                channels, channels, factor, stride=factor, bias=True)
        elif mode == "interp":
            self.conv = None
        else:
            raise ValueError(f"unknown upsample mode {mode!r} (known: interp, transpose)")

    def forward(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        if self.conv is not None:
            return self.conv(x)  # type: ignore[no-any-return]
        if self.factor == (1, 1, 1):
            return x
        return F.interpolate(x, size=tuple(size), mode="trilinear", align_corners=False)

    def extra_repr(self) -> str:
        return f"factor={self.factor}, mode={self.mode!r}"


class TaskHeads(nn.ModuleDict):
    """A ModuleDict that takes any task name a recipe allows as a key.

    ``nn.ModuleDict`` refuses a key that is one of its own attributes (``train``, ``type``,
    ``values``, ``float``, ``update``...): a recipe with such a task passed validation and
    then failed to build with a KeyError. The heads are entered by name into the module
    table itself, so state-dict keys stay ``heads.<task>.weight`` and ``heads[task]`` works;
    only attribute access (``heads.train``) still means the method, and ``training`` the
    mode flag.
    """

    def add_module(self, name: str, module: nn.Module | None) -> None:
        if not isinstance(name, str) or not name or "." in name:
            raise KeyError(f"a task head needs a non-empty name without '.' (got {name!r})")
        self._modules[name] = module

    def __setattr__(self, name: str, value: object) -> None:
        if name == "training":  # the mode flag, even beside a head named 'training'
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)


def task_heads(head_channels: Mapping[str, int], width: int) -> nn.ModuleDict:
    """One 1x1x1 conv ``width -> channels`` (with bias) per task, in ``head_channels`` order."""
    if not head_channels:
        raise ValueError("a model needs at least one task head (head_channels is empty)")
    heads = TaskHeads()
    for task, channels in head_channels.items():
        heads[task] = nn.Conv3d(width, int(channels), 1, bias=True)
    return heads


def transposed_fan_in(conv: nn.ConvTranspose3d) -> float:
    """Inputs summed into one output voxel of a transposed conv, on average: its input
    channels per group times ``prod(kernel / stride)`` (``c_in`` for kernel = stride).

    torch's ``fan_in`` of a transposed conv's weight ``(c_in, c_out / groups, *kernel)`` is
    ``c_out / groups * prod(kernel)``, the operation's fan-out: He init by it scaled the
    upsampled path's variance by ``c_in / (c_out * prod(kernel))`` (a quarter for ``c -> c``
    by (1, 2, 2))."""
    kernel = conv.weight.shape[2:]
    taps = math.prod(k / s for k, s in zip(kernel, conv.stride, strict=True))
    return conv.in_channels / conv.groups * max(taps, 1.0)


def init_weights(module: nn.Module) -> None:
    """He (Kaiming) normal weights by the true fan-in (ReLU gain, std ``sqrt(2 / fan_in)``)
    for every conv and transposed conv; zero biases."""
    for m in module.modules():
        if isinstance(m, nn.ConvTranspose3d):
            nn.init.normal_(m.weight, std=math.sqrt(2.0 / transposed_fan_in(m)))
        elif isinstance(m, nn.Conv3d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
        else:
            continue
        if m.bias is not None:
            nn.init.zeros_(m.bias)
