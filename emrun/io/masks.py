"""What a mask lets in, one rule for every command that reads one (training, inference,
segmentation, evaluation): a voxel is inside where the mask is non-zero and not NaN."""

from __future__ import annotations

import numpy as np


def inside(mask: np.ndarray) -> np.ndarray:
    """Where ``mask`` lets voxels in, as bools. A float mask resampled or registered from
    elsewhere holds NaN where it has no value: ``NaN != 0`` counted those voxels as inside
    (predicted, segmented, scored), while a prediction's NaN is background
    (`emrun.evaluate.binary`)."""
    if mask.dtype.kind == "f":
        return (mask != 0) & ~np.isnan(mask)
    return mask != 0
