"""One read-only, lazy interface over the volume formats EM data comes in.

A `Volume` knows its shape, dtype, chunks and physical metadata and reads regions on demand;
each format implements it in its own module (``zarr_volume``, ``hdf5_volume``, ...), and
``open`` picks the format for a path. Volumes hold paths, not open handles, so they pickle
into data-loader worker processes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from emrun.errors import UserError
from emrun.geometry import Roi, box_of, clip

CONTAINER_SUFFIXES = (".zarr", ".n5", ".h5", ".hdf5", ".hdf")
HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf")
TIFF_SUFFIXES = (".tif", ".tiff")
ZARR_MARKERS = ("zarr.json", ".zarray", ".zgroup")
MAX_LISTED = 12  # names shown when listing what a container does hold
SUPPORTED = (".zarr, .h5/.hdf5/.hdf, .tif/.tiff (a file or a folder of sections), .npy; with "
             "emrun[remote]: .n5, neuroglancer precomputed (a folder with an info file) and "
             "http(s)://, gs://, s3:// URLs of these")


class VolumeError(UserError):
    """A user-facing problem with a volume (missing, unreadable, unsupported, inconsistent).

    The message names the volume and what is wrong, in one line; as a UserError the CLI
    prints it as is and exits with code 2.
    """


DUMPS = ("[http_response_body=", "[tensorstore_spec=")
"""Where tensorstore's errors quote what they were about: the body of an HTTP answer (a
server's error page, escaped HTML) and the spec as JSON, which buried the reason before
them."""


def one_line(exc: BaseException) -> str:
    """Condense a library exception to one line, with its type, for a VolumeError message."""
    text = str(exc)
    cuts = [i for i in (text.find(dump) for dump in DUMPS) if i >= 0]
    text = " ".join((text[:min(cuts)] if cuts else text).split())
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def native_dtype(dtype: Any) -> np.dtype:
    """The same dtype in native byte order and canonical form (e.g. numpy's 'Q' -> 'L' for
    uint64 on Linux: tifffile returns the former, zarr only knows the latter)."""
    dtype = np.dtype(dtype).newbyteorder("=")
    return np.dtype(dtype.str) if dtype.kind in "biufc" else dtype


@dataclass(frozen=True)
class Level:
    """One level of a multiscale image: its name (its path inside the image, e.g. "s1"),
    its voxel size (nm, z, y, x; None when unknown) and the path `open_volume` takes for it."""

    name: str
    voxel_size: tuple[float, ...] | None
    path: str


@dataclass(frozen=True, kw_only=True)
class Volume(ABC):
    """A read-only n-d array on disk; axes z, y, x (channel first when present).

    Subclasses implement `_read` for one format; `read` normalises the ROI and turns
    library errors into `VolumeError`. The dtype is reported, and data read, in native byte
    order whatever the file stores (zarr v2 from Java tools, some HDF5 and .npy files are
    big-endian): torch and the training pipeline take native byte order only, so every
    consumer gets it here, once, rather than each converting (or failing) on its own.
    """

    path: str
    dataset: str | None
    shape: tuple[int, ...]
    dtype: np.dtype
    voxel_size: tuple[float, ...] | None = None
    offset: tuple[int, ...] | None = None
    segmentation: bool = False  # its metadata says it holds object ids (OME image-label)
    # nm (z, y, x) its OME translation lies off ``offset`` whole voxels: a coarser pyramid
    # level's half-voxel shift, which outputs made from it keep (None: none)
    shift_nm: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", native_dtype(self.dtype))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __str__(self) -> str:
        return f"{self.path}/{self.dataset}" if self.dataset else self.path

    def location(self) -> str:
        """Where the volume is, whatever the working folder: the resolved path (or the URL)
        with its dataset. A worker elsewhere opens it by this; the same volume named from
        two folders has one location."""
        where = self.path if "://" in self.path else str(Path(self.path).resolve())
        return f"{where}/{self.dataset}" if self.dataset else where

    def read(self, roi: Roi | None = None) -> np.ndarray:
        """Read a box into a new array; None reads the whole volume.

        ``roi`` spans the volume's last ``roi.dims`` axes (z, y, x for a spatial box); axes
        before them (channels) are read whole. The box is clipped to the volume, as numpy
        clips a slice. Only the data needed for the box is read from disk.
        """
        box = self.normalise_roi(roi)
        try:
            data = self._read(box)
        except VolumeError:
            raise
        except Exception as exc:
            raise VolumeError(
                f"{self}: reading {format_roi(box)} failed: {one_line(exc)}"
            ) from exc
        data = np.asarray(data)
        if not data.dtype.isnative:
            data = data.astype(native_dtype(data.dtype))
        return np.ascontiguousarray(data)  # every format C-ordered: a zarr v2 order-F array,
        # an ilastik (z, y, x, c) HDF5 and a 4-d TIFF's box came back strided, which
        # torch.from_numpy(...).view refused

    def normalise_roi(self, roi: Roi | None) -> Roi:
        """The box over every axis of the volume (leading axes whole), clipped to it."""
        whole = box_of(self.shape)
        if roi is None:
            return whole
        if not isinstance(roi, Roi):
            raise TypeError(f"{self}: a read takes a Roi, got {roi!r}")
        if roi.dims > self.ndim:
            raise IndexError(f"{self}: ROI has {roi.dims} axes, volume has {self.ndim}")
        lead = self.ndim - roi.dims
        return clip(Roi((*whole.offset[:lead], *roi.offset), (*whole.shape[:lead], *roi.shape)),
                    whole)

    @abstractmethod
    def _read(self, roi: Roi) -> np.ndarray:
        """Read a normalised ROI (every axis, inside the volume); may raise any library
        exception."""

    def __getstate__(self) -> dict[str, Any]:
        # Drop cached handles (names starting with "_"); they are re-opened on demand.
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    @property
    def chunks(self) -> tuple[int, ...] | None:
        """The storage chunk shape (reading whole chunks decodes each once); None for a
        format that stores no chunks."""
        return None

    def attributes(self) -> dict[str, Any]:
        """The volume's metadata attributes: the array's, over those of the group holding it
        (for an OME-Zarr image group, the layout emrun writes, the group's); plain Python
        values; empty for a format without attributes."""
        return {}

    def container_attributes(self) -> dict[str, Any]:
        """The attributes at the top of the file or store the volume lies in (an `emrun
        infer` output records its recipe there); empty for a format without attributes."""
        return {}

    def levels(self) -> list[Level]:
        """The levels of the multiscale image this volume is one level of, finest first as
        the metadata lists them; empty for a volume that is not part of one."""
        return []


METADATA_ERRORS = (OSError, KeyError, ValueError, TypeError)
"""What zarr and h5py raise when metadata an opened volume had can no longer be read (the
store changed or went away, a value does not parse)."""


def metadata_error(volume: Volume, what: str, exc: BaseException) -> VolumeError:
    """A one-line VolumeError naming the volume and the metadata that could not be read."""
    return VolumeError(f"{volume}: reading its {what} failed: {one_line(exc)}")


def format_names(names: list[str]) -> str:
    """Sorted, comma-separated names for an error message, capped at MAX_LISTED."""
    if not names:
        return "(none)"
    names = sorted(names)
    shown = ", ".join(names[:MAX_LISTED])
    return shown + (", ..." if len(names) > MAX_LISTED else "")


def format_roi(roi: Roi) -> str:
    return "[" + ", ".join(f"{b}:{e}" for b, e in zip(roi.begin, roi.end, strict=True)) + "]"
