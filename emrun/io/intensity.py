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


UNIT_SLACK = 1e-3
"""Float rounding around [0, 1] that values meant to lie there (intensities, probabilities)
may show."""


def outside_unit(low: float, high: float) -> bool:
    """Whether values from ``low`` to ``high`` leave [0, 1] by more than rounding: a float
    image in 0..255, logits given as probabilities."""
    return low < -UNIT_SLACK or high > 1 + UNIT_SLACK
