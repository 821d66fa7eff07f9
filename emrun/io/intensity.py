"""The intensity range an image's dtype implies, for images whose recipe gives none.

Training (``data``) and inference (``infer``) must scale an image the same way, so the rule
lives here, below both.
"""

from __future__ import annotations

import numpy as np


def default_intensity(dtype: np.dtype) -> tuple[float, float]:
    """uint8 / 255, uint16 / 65535, ...; a signed dtype over its whole range (-128..127 for
    int8: from 0, the dark half of a signed image was clipped to black); float images are
    taken as already in [0, 1]."""
    if dtype.kind in "ui":
        info = np.iinfo(dtype)
        return float(info.min), float(info.max)
    return 0.0, 1.0


def exact_in_float32(dtype: np.dtype) -> bool:
    """Whether every value of ``dtype`` is a float32 as it is (8- and 16-bit types, float32).
    A wider one (uint32, int64, float64) is scaled in float64 first, by training and
    inference alike: cast to float32 before the scale's low end was taken off, values far
    from 0 lost the digits the scale keeps (2**24 + 1 read as 2**24)."""
    return np.dtype(dtype).itemsize <= 2 or np.dtype(dtype) == np.float32


def scaled_in_float64(raw: np.ndarray, low: float, high: float) -> np.ndarray:
    """``(raw - low) / (high - low)`` as float32, computed in float64 (not clipped; NaN
    kept): for the dtypes `exact_in_float32` does not cover."""
    return ((raw.astype(np.float64) - low) / (high - low)).astype(np.float32)


UNIT_SLACK = 1e-3
"""Float rounding around [0, 1] that values meant to lie there (intensities, probabilities)
may show."""


def outside_unit(low: float, high: float) -> bool:
    """Whether values from ``low`` to ``high`` leave [0, 1] by more than rounding: a float
    image in 0..255, logits given as probabilities."""
    return low < -UNIT_SLACK or high > 1 + UNIT_SLACK
