"""The receptive field of an RSUNet or UpDown, from its spec alone (no torch).

The receptive field is the extent, in input voxels per axis (z, y, x), of the input region
that can influence one output voxel, maximised over the output voxel's position (outputs at
different offsets to the pooling grids see slightly different extents). Every layer reads
a box of its input, so the region is a box and each axis is computed on its own.

:func:`rsunet_receptive_field` computes it from an RSUNet or UpDown spec by *exact interval
propagation*: start from one output index ``[o, o]`` and walk the network backwards, mapping
the interval of indices a layer's outputs need to the interval of its inputs they read:

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

``emrun.models.facts.empirical_receptive_field`` measures the same on the built model; the
tests check that both agree.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .model import RSUNetBase

Zyx = tuple[int, int, int]
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


def _axis_receptive_field(spec: RSUNetBase, outer_factor: Zyx, axis: int) -> int:
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

    outer = int(outer_factor[axis])
    period = outer * math.prod(factors)
    best = 0
    for o in range(period * 64, period * 65):  # every alignment to the pooling grids
        iv = _interp_back((o, o), outer)
        lo, hi = _pool_back(decoder_out(0, iv), outer)
        best = max(best, hi - lo + 1)
    return best


def rsunet_receptive_field(spec: RSUNetBase, outer_factor: Zyx = (1, 1, 1)) -> Zyx:
    """The receptive field, z, y, x, of an RSUNet behind average pooling by ``outer_factor``
    (UpDown's; 1 for a plain RSUNet), by exact interval propagation (see the module
    docstring)."""
    z, y, x = (_axis_receptive_field(spec, outer_factor, axis) for axis in range(3))
    return (z, y, x)
