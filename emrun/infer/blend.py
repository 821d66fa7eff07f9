"""Blending windows: how much each voxel of a patch counts where patches overlap.

Both windows are positive at every voxel of the patch (voxel centres are half a voxel inside
the border), so every voxel of the volume gets a positive total weight; in float32 only
because they are floored at ``FLOOR``. Unfloored, the bump at a 64-voxel patch's edge is
about e^-125 of its centre (0 in float32) and a narrow Gaussian's tails underflow even in
float64: voxels that only patch edges cover (abutting or barely overlapping patches) got a
total weight of 0 and a NaN output. The floor is too small to change a sum that any larger
weight enters (float32 keeps 24 bits), and large enough that a floored weight times a
prediction stays a normal number.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..geometry import Zyx
from ..recipe.run import Bump, Gaussian
from ..registry import blends

FLOOR = 1e-30
"""The smallest weight a window gives a voxel, relative to its largest (1)."""


def _outer(profiles: list[np.ndarray]) -> np.ndarray:
    """The window over the patch, 1 at its largest and at least ``FLOOR`` (float32). Each
    axis is scaled to 1 at its peak before the product: a narrow Gaussian's peak on an
    even patch (half a voxel off centre) is e^-351 at sigma 0.01, 0 in float32, and the
    window scaled after the cast was 0/0 everywhere."""
    z, y, x = (p / p.max() for p in profiles)
    window = (z[:, None, None] * y[None, :, None] * x[None, None, :]).astype(np.float32)
    return np.maximum(window, np.float32(FLOOR))


@blends.implement("bump")
def bump(spec: Bump, *, patch: Zyx, **context: Any) -> np.ndarray:
    """DeepEM's bump: exp(-1 / (x (1 - x))) per axis, x the voxel centre in (0, 1)."""
    profiles = []
    for n in patch:
        x = (np.arange(n) + 0.5) / n
        profiles.append(np.exp(-1.0 / (x * (1.0 - x))))
    return _outer(profiles)


@blends.implement("gaussian")
def gaussian(spec: Gaussian, *, patch: Zyx, **context: Any) -> np.ndarray:
    """A Gaussian centred on the patch, sigma = spec.sigma x the patch size per axis."""
    profiles = []
    for n in patch:
        x = np.arange(n) + 0.5 - n / 2
        profiles.append(np.exp(-0.5 * (x / (spec.sigma * n)) ** 2))
    return _outer(profiles)
