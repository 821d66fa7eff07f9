"""A fingerprint of a volume's contents for the price of nine small reads.

Resumable jobs (inference, blockwise segmentation) record it when they start, so that a
resume can tell that the input was rewritten under the same name and shape (another volume
converted there, an edited copy) instead of finishing the output from two inputs. Changes
outside the nine boxes are not seen: it guards against a replaced volume, not an edit of a
few voxels.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator, Sequence

import numpy as np

from ..geometry import Roi
from .volume import Volume

SAMPLE_BOX = (4, 32, 32)
"""The size of each box read (z, y, x); channels are read whole."""


def sample_boxes(volume: Volume, offset: Sequence[int] | None = None,
                 shape: Sequence[int] | None = None) -> Iterator[np.ndarray]:
    """The boxes at the corners and the centre of the spatial box ``offset``, ``shape`` of
    ``volume`` (default: all of it), read."""
    shape = tuple(shape or volume.shape[-3:])
    offset = tuple(offset or (0,) * len(shape))
    size = [min(s, n) for s, n in zip(SAMPLE_BOX[-len(shape):], shape, strict=True)]
    corners = itertools.product(*[(0, n - s) for n, s in zip(shape, size, strict=True)])
    centre = tuple((n - s) // 2 for n, s in zip(shape, size, strict=True))
    for begin in dict.fromkeys([*corners, centre]):
        at = [o + b for o, b in zip(offset, begin, strict=True)]
        yield volume.read(Roi(at, size))


def contents_sample(volume: Volume, offset: Sequence[int] | None = None,
                    shape: Sequence[int] | None = None) -> str:
    """A digest of `sample_boxes`."""
    digest = hashlib.sha256()
    for box in sample_boxes(volume, offset, shape):
        digest.update(np.ascontiguousarray(box).tobytes())
    return digest.hexdigest()[:16]
