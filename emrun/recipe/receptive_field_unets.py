"""Receptive fields of `resenc` and `mednext` from their specs alone (no torch).

The same exact interval propagation as :mod:`emrun.recipe.receptive_field` (one output index,
walked backwards layer by layer, the hull where branches join, maximised over the output's
offset to the pooling grids), with two more layer kinds these networks use:

- a conv with kernel ``k``, stride ``s`` and padding ``k // 2``: output ``j`` reads
  ``[j*s - k//2, j*s - k//2 + k - 1]``;
- a transposed conv with kernel ``k``, stride ``s``, padding ``p``: output ``o`` receives
  input ``i`` when ``0 <= o + p - i*s < k``; a 1x1x1 one by ``s > 1`` reaches only every
  ``s``-th output, so an interval may be empty (None) and the hull skips it.

Norms are taken as pointwise, as for rsunet (instance and group norms' statistics are not
counted). ``emrun.models.facts.empirical_receptive_field`` measures the same on the built
model; the tests check that both agree.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from .receptive_field import _interp_back, _pool_back

if TYPE_CHECKING:
    from .unets import MedNeXt, ResEnc, StagedUNetBase

Zyx = tuple[int, int, int]
Interval = tuple[int, int] | None  # None: no voxel


def _conv(iv: Interval, k: int, s: int = 1) -> Interval:
    """Input indices read by a conv (kernel ``k``, stride ``s``, padding ``k // 2``)."""
    if iv is None:
        return None
    p = k // 2
    return (iv[0] * s - p, iv[1] * s - p + k - 1)


def _transposed(iv: Interval, k: int, s: int, p: int) -> Interval:
    """Input indices read by a transposed conv (kernel ``k``, stride ``s``, padding ``p``)."""
    if iv is None:
        return None
    lo, hi = -((-(iv[0] + p - k + 1)) // s), (iv[1] + p) // s
    return (lo, hi) if lo <= hi else None


def _pool(iv: Interval, s: int) -> Interval:
    return None if iv is None else _pool_back(iv, s)


def _hull(*ivs: Interval) -> Interval:
    real = [iv for iv in ivs if iv is not None]
    if not real:
        return None
    return (min(iv[0] for iv in real), max(iv[1] for iv in real))


def _maximise(spec: StagedUNetBase, axis: int, walk: Callable[[Interval], Interval]) -> int:
    """The largest input extent of one output voxel over one period of the pooling grids."""
    period = math.prod(f[axis] for f in spec.factors())
    best = 0
    for o in range(period * 64, period * 65):
        iv = walk((o, o))
        assert iv is not None
        best = max(best, iv[1] - iv[0] + 1)
    return best


def _resenc_axis(spec: ResEnc, axis: int) -> int:
    factors = [f[axis] for f in spec.factors()]
    kernels = [spec.level_kernel(i)[axis] for i in range(len(spec.widths))]
    levels = len(kernels)

    def encoder_out(level: int, iv: Interval) -> Interval:
        k = kernels[level]
        for b in reversed(range(spec.level_blocks()[level])):
            s = factors[level - 1] if b == 0 and level > 0 else 1
            iv = _hull(_conv(_conv(iv, k), k, s), _pool(iv, s))  # main path, shortcut
        if level == 0:
            return _conv(iv, k)  # stem
        return encoder_out(level - 1, iv)

    def decoder_out(level: int, iv: Interval) -> Interval:
        if level == levels - 1:
            return encoder_out(level, iv)
        iv = _conv(iv, kernels[level])  # the decoder conv, on skip and upsampled concatenated
        f = factors[level]
        coarse = _transposed(iv, f, f, 0) if spec.upsample == "transpose" else (
            None if iv is None else _interp_back(iv, f))
        return _hull(encoder_out(level, iv), decoder_out(level + 1, coarse))

    return _maximise(spec, axis, lambda iv: decoder_out(0, iv))


def _mednext_axis(spec: MedNeXt, axis: int) -> int:
    factors = [f[axis] for f in spec.factors()]
    kernels = [spec.level_kernel(i)[axis] for i in range(len(spec.widths))]
    levels = len(kernels)

    def run_blocks(level: int, iv: Interval) -> Interval:
        for _ in range(spec.level_blocks()[level]):
            iv = _hull(iv, _conv(iv, kernels[level]))  # residual + depthwise conv
        return iv

    def encoder_out(level: int, iv: Interval) -> Interval:
        iv = run_blocks(level, iv)
        if level == 0:
            return iv  # 1x1x1 stem
        k, s = kernels[level], factors[level - 1]
        return encoder_out(level - 1, _hull(_conv(iv, k, s), _conv(iv, 1, s)))  # down block

    def decoder_out(level: int, iv: Interval) -> Interval:
        if level == levels - 1:
            return encoder_out(level, iv)
        iv = run_blocks(level, iv)
        k, s = kernels[level + 1], factors[level]
        coarse = _hull(_transposed(iv, k, s, k // 2), _transposed(iv, 1, s, 0))  # up block
        return _hull(encoder_out(level, iv), decoder_out(level + 1, coarse))

    return _maximise(spec, axis, lambda iv: decoder_out(0, iv))


def resenc_receptive_field(spec: ResEnc) -> Zyx:
    """The receptive field of a resenc model, z, y, x (see the module docstring)."""
    z, y, x = (_resenc_axis(spec, a) for a in range(3))
    return (z, y, x)


def mednext_receptive_field(spec: MedNeXt) -> Zyx:
    """The receptive field of a mednext model, z, y, x (see the module docstring)."""
    z, y, x = (_mednext_axis(spec, a) for a in range(3))
    return (z, y, x)
