"""Facts about a built model: parameters, FLOPs per voxel, receptive field, accepted sizes.

Receptive field
---------------
The receptive field is the extent, in input voxels per axis (z, y, x), of the input region
that can influence one output voxel, maximised over the output voxel's position (outputs at
different offsets to the pooling grids see slightly different extents). Every layer reads
a box of its input, so the region is a box and each axis is computed on its own.

:func:`receptive_field` computes it from the spec by *exact interval propagation*: start from
one output index ``[o, o]`` and walk the network backwards, mapping the interval of indices a
layer's outputs need to the interval of its inputs they read:

- stride-1 conv, kernel ``k`` ('same' padding, ``(k-1)//2`` before): ``[lo - (k-1)//2,
  hi + k-1 - (k-1)//2]``;
- max / average pool by ``f`` (coarse -> fine): ``[lo * f, hi * f + f - 1]``;
- trilinear upsampling by ``f`` (align_corners=False; fine -> coarse): fine voxel ``o`` reads
  coarse ``floor(c)`` and ``ceil(c)`` with ``c = (o + 1/2)/f - 1/2`` (exact fractions);
- transposed conv with kernel = stride = ``f`` (fine -> coarse): ``[lo // f, hi // f]``;
- 1x1x1 convs, norms, activations and heads: unchanged; a skip sum: the hull of both branches.

The result is ``hi - lo + 1`` at the input (away from the volume border, where zero padding
and clamping only shrink it), maximised over ``o`` in one period of the total
pooling factor. (The textbook sum ``1 + sum (k - 1) * jump`` with linear upsampling counted as
a 2-tap kernel at the coarse jump slightly underestimates a U-Net with two or more interpolating
levels, because the upsampled intervals do not align with the coarse grid: 202 instead of the
exact 204 in y and x for a 4-level (1,2,2)-pooled RSUNet.) For a 2-level, 3x3x3 RSUNet with
(1,2,2) pooling, in y: the decoder block (4 convs) needs 9 fine voxels, which interpolate from 6
coarse ones; the level-1 block widens that to 14, the pool to 28 fine voxels, the level-0 block
to 36 and the 1x5x5 input conv to 40; in z (no pooling): 1 + 12 convs * 2 = 25.

:func:`empirical_receptive_field` measures the same thing by autograd on a structural twin of
the model (same class and code path, one channel per level, no norms, activations replaced by
identity, max pools by average pools, all weights positive, float64), so that a non-zero
gradient marks exactly the voxels some path connects, with no cancellation, dead ReLUs or
max-pool ties (which make the gradient of the real model on one input an underestimate). It
runs on thin inputs (long along one axis only), so it takes well under a second even for deep
models; the tests check that both agree.

FLOPs
-----
:func:`flops_per_voxel` counts the FLOPs of one forward pass with
``torch.utils.flop_counter.FlopCounterMode`` on meta tensors (no memory, no compute) and divides
by the number of output voxels. FlopCounterMode counts a multiply-add as 2 FLOPs and counts
convolutions, transposed convolutions and matrix products only; norms, activations, pooling,
interpolation and sums (all O(channels) per voxel, small next to the convs) are not counted.
For a fixed architecture the count per voxel does not depend on the patch size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

from ..geometry import Zyx
from ..recipe.model import ModelBase, RSUNetBase, UpDown
from ..registry import models
from .rsunet import parameter_count


@dataclass(frozen=True)
class ModelFacts:
    """What a built model costs and sees.

    ``params``: trainable parameters; ``flops_per_voxel``: forward FLOPs per output voxel
    (multiply-add = 2); ``receptive_field``: input voxels per axis that can influence one
    output voxel, z, y, x; ``divisor``: every input size must be a multiple of it, per axis.
    """

    params: int
    flops_per_voxel: float
    receptive_field: Zyx
    divisor: Zyx

    def accepts(self, shape: Sequence[int]) -> bool:
        """Whether the model takes a (z, y, x) input of this size (the last 3 of ``shape``)."""
        return accepts(self.divisor, shape)


def accepts(divisor: Sequence[int], shape: Sequence[int]) -> bool:
    """Whether every size in the last 3 entries of ``shape`` is a positive multiple of
    ``divisor``."""
    size = tuple(shape)[-3:]
    if len(size) != 3:
        return False
    return all(int(s) > 0 and int(s) % int(d) == 0 for s, d in zip(size, divisor, strict=True))


Interval = tuple[int, int]


def _conv_back(iv: Interval, k: int) -> Interval:
    """Input indices read by a stride-1 'same' conv's outputs ``iv`` (PyTorch pads
    ``(k - 1) // 2`` before and the rest after)."""
    before = (k - 1) // 2
    return (iv[0] - before, iv[1] + (k - 1 - before))


def _pool_back(iv: Interval, f: int) -> Interval:
    """Fine indices read by a pool (kernel = stride = ``f``) for coarse outputs ``iv``."""
    return (iv[0] * f, iv[1] * f + f - 1)


def _interp_back(iv: Interval, f: int) -> Interval:
    """Coarse indices read by linear interpolation (align_corners=False) for fine ``iv``.

    Fine voxel ``o`` samples the coarse coordinate ``(o + 1/2) / f - 1/2``: its floor and, when
    that is not an integer, the next voxel (exact rational arithmetic; interior voxels).
    """
    if f == 1:
        return iv
    lo = Fraction(2 * iv[0] + 1, 2 * f) - Fraction(1, 2)
    hi = Fraction(2 * iv[1] + 1, 2 * f) - Fraction(1, 2)
    return (math.floor(lo), math.ceil(hi))


def _hull(a: Interval, b: Interval) -> Interval:
    return (min(a[0], b[0]), max(a[1], b[1]))


def _axis_receptive_field(spec: RSUNetBase, axis: int) -> int:
    factors = [int(f[axis]) for f in spec.factors()]
    kernels = [int(spec.level_kernel(i)[axis]) for i in range(len(spec.widths))]
    levels = len(kernels)
    transpose = spec.upsample == "transpose"

    def block_back(iv: Interval, level: int) -> Interval:
        for _ in range(4):  # a block is 4 convs: pre, two in the residual unit, post
            iv = _conv_back(iv, kernels[level])
        return iv

    def encoder_out(level: int, iv: Interval) -> Interval:
        iv = block_back(iv, level)
        if level == 0:
            return _conv_back(iv, int(spec.input_kernel[axis]))
        return encoder_out(level - 1, _pool_back(iv, factors[level - 1]))

    def decoder_out(level: int, iv: Interval) -> Interval:
        if level == levels - 1:
            return encoder_out(level, iv)
        iv = block_back(iv, level)  # at the sum of skip and upsampled deeper level
        f = factors[level]
        coarse = (iv[0] // f, iv[1] // f) if transpose else _interp_back(iv, f)
        return _hull(encoder_out(level, iv), decoder_out(level + 1, coarse))

    outer = int(spec.factor[axis]) if isinstance(spec, UpDown) else 1
    period = outer * math.prod(factors)
    best = 0
    for o in range(period * 64, period * 65):  # every alignment to the pooling grids
        iv = _interp_back((o, o), outer)
        lo, hi = _pool_back(decoder_out(0, iv), outer)
        best = max(best, hi - lo + 1)
    return best


def receptive_field(spec: ModelBase) -> Zyx:
    """The receptive field of an RSUNet or UpDown, z, y, x, computed from the spec by exact
    interval propagation (see the module docstring)."""
    if not isinstance(spec, RSUNetBase):
        raise TypeError(f"no receptive field formula for model type {spec.type!r}")
    z, y, x = (_axis_receptive_field(spec, axis) for axis in range(3))
    return (z, y, x)


def _structural_twin(spec: RSUNetBase) -> nn.Module:
    """The model's dependency structure: same layers, one channel, linear, positive weights."""
    thin = spec.model_copy(update={"widths": [1] * len(spec.widths), "in_channels": 1,
                                   "norm": "none"})
    twin = models.build(thin, head_channels={"rf": 1})

    def linearise(module: nn.Module) -> None:
        for name, child in module.named_children():
            if isinstance(child, nn.MaxPool3d):
                setattr(module, name, nn.AvgPool3d(child.kernel_size, stride=child.stride))
            elif isinstance(child, nn.ReLU | nn.ELU | nn.LeakyReLU | nn.GELU):
                setattr(module, name, nn.Identity())
            else:
                linearise(child)

    linearise(twin)
    with torch.no_grad():
        for m in twin.modules():
            if isinstance(m, nn.Conv3d | nn.ConvTranspose3d):
                m.weight.fill_(1.0 / math.prod(m.weight.shape[2:]))
                if m.bias is not None:
                    m.bias.zero_()
    return twin.double().eval()


def empirical_receptive_field(spec: ModelBase, *, start: int = 64) -> Zyx:
    """The receptive field measured by autograd on the model's structural twin (see the
    module docstring): per axis, the extent of the input voxels with a non-zero gradient of
    one output voxel, maximised over the output voxel's position within one divisor period.
    """
    if not isinstance(spec, RSUNetBase):
        raise TypeError(f"no structural twin for model type {spec.type!r}")
    twin = _structural_twin(spec)
    divisor = spec.divisor()
    rf = [1, 1, 1]
    for axis in range(3):
        d = divisor[axis]
        n = max(start, 4 * d) // d * d
        while True:
            size = list(divisor)
            size[axis] = n
            x = torch.zeros((1, 1, *size), dtype=torch.float64, requires_grad=True)
            out = twin(x)["rf"]
            centre = [s // 2 for s in size]
            centre[axis] = n // 2 // d * d
            extent, touches = 0, False
            for t in range(d):
                index = list(centre)
                index[axis] += t
                (grad,) = torch.autograd.grad(out[(0, 0, *index)], x, retain_graph=True)
                other = tuple(a for a in range(3) if a != axis)
                hit = torch.nonzero(grad[0, 0].abs().amax(dim=other) > 0).flatten()
                lo, hi = int(hit.min()), int(hit.max())
                touches = touches or lo == 0 or hi == n - 1
                extent = max(extent, hi - lo + 1)
            if not touches:
                break
            n *= 2
        rf[axis] = extent
    return (rf[0], rf[1], rf[2])


def flops_per_voxel(model: nn.Module, patch: Sequence[int], in_channels: int = 1) -> float:
    """Forward FLOPs (multiply-add = 2; convs and matmuls only) per output voxel at ``patch``.

    Runs one forward in eval mode on meta tensors: instant, and leaves the model (weights,
    buffers, device, train/eval mode) untouched.
    """
    patch = tuple(int(p) for p in patch)
    tensors = {name: torch.empty_like(t, device="meta")
               for name, t in [*model.named_parameters(), *model.named_buffers()]}
    x = torch.empty((1, in_channels, *patch), device="meta")
    counter = FlopCounterMode(display=False)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()  # the count does not depend on the mode; eval takes any accepted patch
    try:
        with torch.no_grad(), counter:
            functional_call(model, tensors, (x,))
    finally:
        for m, training in modes:
            m.training = training
    return counter.get_total_flops() / math.prod(patch)


def model_facts(model: nn.Module, spec: Any, patch: Sequence[int]) -> ModelFacts:
    """Parameters (counted from ``model``), FLOPs per output voxel at ``patch``, receptive
    field (analytic) and divisor of a built model and its spec.

    Raises ValueError (naming the divisor) when ``patch`` is not a size the model accepts.
    """
    divisor = tuple(int(d) for d in spec.divisor())
    if not accepts(divisor, patch):
        raise ValueError(f"patch {tuple(patch)} is not a multiple of the model's divisor "
                         f"{divisor} (z, y, x)")
    return ModelFacts(
        params=parameter_count(model),
        flops_per_voxel=flops_per_voxel(model, patch, int(spec.in_channels)),
        receptive_field=receptive_field(spec),
        divisor=(divisor[0], divisor[1], divisor[2]),
    )
