"""Blending windows: how much each voxel of a patch counts where patches overlap.

Both windows are positive at every voxel of the patch (voxel centres are half a voxel inside
the border), so every voxel of the volume gets a positive total weight.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..geometry import Zyx
from ..recipe.run import Bump, Gaussian
from ..registry import blends


def _outer(profiles: list[np.ndarray]) -> np.ndarray:
    return (profiles[0][:, None, None] * profiles[1][None, :, None]
            * profiles[2][None, None, :]).astype(np.float32)


@blends.implement("bump")
def bump(spec: Bump, *, patch: Zyx, **context: Any) -> np.ndarray:
    """DeepEM's bump: exp(-1 / (x (1 - x))) per axis, x the voxel centre in (0, 1)."""
    profiles = []
    for n in patch:
        x = (np.arange(n) + 0.5) / n
        profiles.append(np.exp(-1.0 / (x * (1.0 - x))))
    window = _outer(profiles)
    return window / window.max()


@blends.implement("gaussian")
def gaussian(spec: Gaussian, *, patch: Zyx, **context: Any) -> np.ndarray:
    """A Gaussian centred on the patch, sigma = spec.sigma x the patch size per axis."""
    profiles = []
    for n in patch:
        x = np.arange(n) + 0.5 - n / 2
        profiles.append(np.exp(-0.5 * (x / (spec.sigma * n)) ** 2))
    window = _outer(profiles)
    return window / window.max()
