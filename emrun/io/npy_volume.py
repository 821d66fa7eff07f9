"""NumPy .npy files, memory-mapped so only the ROI's pages are touched."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from emrun.geometry import Roi, slices
from emrun.io.volume import Volume, VolumeError


@dataclass(frozen=True, kw_only=True)
class NpyVolume(Volume):
    """A .npy array; re-mapped per read (cheap), so nothing is held open."""

    def _read(self, roi: Roi) -> np.ndarray:
        """A C-ordered copy, as every other format reads: a Fortran-ordered file's box came
        back Fortran-ordered, which torch's `view` and buffer consumers refuse."""
        mapped = np.load(self.path, mmap_mode="r", allow_pickle=False)
        return np.array(mapped[slices(roi)], order="C")  # a copy: no map outlives the read


def open_npy(path: str) -> NpyVolume:
    """Only the header is parsed; object arrays (pickles) are refused."""
    with open(path, "rb") as f:
        if f.read(6) != b"\x93NUMPY":
            raise VolumeError(f"{path}: not a .npy file (bad magic bytes)")
    array = np.load(path, mmap_mode="r", allow_pickle=False)
    if not isinstance(array, np.ndarray):
        raise ValueError("not a single array")
    return NpyVolume(path=path, dataset=None, shape=tuple(array.shape), dtype=np.dtype(array.dtype))
