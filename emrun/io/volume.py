"""One read-only, lazy interface over the volume formats EM data comes in.

`open_volume` inspects a path (cheaply: metadata only, no pixel data) and returns a
`Volume` that knows its shape, dtype and physical metadata and reads regions on demand.
Volumes hold paths, not open handles, so they pickle into data-loader worker processes.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np

from emrun.errors import UserError
from emrun.geometry import Roi, box_of, clip
from emrun.paths import is_link_loop, not_a_file

CONTAINER_SUFFIXES = (".zarr", ".h5", ".hdf5", ".hdf")
HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf")
TIFF_SUFFIXES = (".tif", ".tiff")
ZARR_MARKERS = ("zarr.json", ".zarray", ".zgroup")
MAX_LISTED = 12  # names shown when listing what a container does hold
SUPPORTED = ".zarr, .h5/.hdf5/.hdf, .tif/.tiff (a file or a folder of sections), .npy"


class VolumeError(UserError):
    """A user-facing problem with a volume (missing, unreadable, unsupported, inconsistent).

    The message names the volume and what is wrong, in one line; as a UserError the CLI
    prints it as is and exits with code 2.
    """


def one_line(exc: BaseException) -> str:
    """Condense a library exception to one line, with its type, for a VolumeError message."""
    text = " ".join(str(exc).split())
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


@dataclass(frozen=True, kw_only=True)
class Volume(ABC):
    """A read-only n-d array on disk; axes z, y, x (channel first when present).

    Subclasses implement `_read` for one format; `read` normalises the ROI and turns
    library errors into `VolumeError`.
    """

    path: str
    dataset: str | None
    shape: tuple[int, ...]
    dtype: np.dtype
    voxel_size: tuple[float, ...] | None = None
    offset: tuple[int, ...] | None = None

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __str__(self) -> str:
        return f"{self.path}/{self.dataset}" if self.dataset else self.path

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
        return np.asarray(data)

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


def split_volume_path(spec: str | os.PathLike[str]) -> tuple[str, str | None]:
    """Split "a/vol.zarr/image" into ("a/vol.zarr", "image").

    The container ends at the first path component whose name ends in .zarr, .h5, .hdf5 or
    .hdf; anything after it is the array path inside. Other paths come back whole.
    """
    text = os.fspath(spec)
    if os.sep != "/":
        text = text.replace(os.sep, "/")
    parts = text.split("/")
    for i, part in enumerate(parts):
        if part.lower().endswith(CONTAINER_SUFFIXES):
            inner = "/".join(p for p in parts[i + 1 :] if p)
            return "/".join(parts[: i + 1]), inner or None
    return (text.rstrip("/") or text), None


def open_volume(path: str | os.PathLike[str], dataset: str | None = None) -> Volume:
    """Open a volume for lazy reading; reads metadata only.

    `path` may carry the dataset ("vol.zarr/image"); an explicit `dataset` is appended to
    whatever the path carries. Every problem comes out as a one-line `VolumeError`.
    """
    container, inner = split_volume_path(path)
    if dataset is not None and dataset.strip("/"):
        dataset = dataset.strip("/")
        dataset = f"{inner}/{dataset}" if inner else dataset
    else:
        dataset = inner
    name = f"{container}/{dataset}" if dataset else container

    if is_link_loop(container):
        raise VolumeError(f"{container} is a loop of symbolic links")
    if not os.path.exists(container):
        raise VolumeError(f"{container}: no such file or directory")
    if not os.path.isdir(container) and (why := not_a_file(container)) is not None:
        raise VolumeError(f"{container} {why}")
    opener, kind = _choose_opener(container)
    try:
        return opener(container, dataset)
    except VolumeError:
        raise
    except Exception as exc:
        raise VolumeError(f"{name}: cannot open as {kind}: {one_line(exc)}") from exc


def _choose_opener(container: str) -> tuple[Any, str]:
    """Pick a format from the path; backends are imported lazily to keep startup fast."""
    lower = container.lower().rstrip("/")
    if os.path.isdir(container):
        if lower.endswith(".zarr") or any(
            os.path.exists(os.path.join(container, m)) for m in ZARR_MARKERS
        ):
            from emrun.io.zarr_volume import open_zarr

            return open_zarr, "zarr"
        from emrun.io.tiff_volume import has_tiffs, open_tiff_stack

        if has_tiffs(container):
            return _no_dataset(open_tiff_stack), "a folder of TIFF sections"
        raise VolumeError(
            f"{container}: folder is neither a zarr store (no zarr.json, .zarray or .zgroup) "
            "nor a folder of .tif/.tiff sections"
        )
    if lower.endswith(HDF5_SUFFIXES):
        from emrun.io.hdf5_volume import open_hdf5

        return open_hdf5, "HDF5"
    if lower.endswith(TIFF_SUFFIXES):
        from emrun.io.tiff_volume import open_tiff

        return _no_dataset(open_tiff), "TIFF"
    if lower.endswith(".npy"):
        from emrun.io.npy_volume import open_npy

        return _no_dataset(open_npy), "numpy .npy"
    if lower.endswith(".zarr"):
        raise VolumeError(f"{container}: is a file, but a zarr store must be a folder")
    suffix = os.path.splitext(lower)[1] or "(no extension)"
    raise VolumeError(f"{container}: unsupported format {suffix}; supported: {SUPPORTED}")


def _no_dataset(opener: Any) -> Any:
    """Wrap a single-array format's opener so a stray inner path is a clear error."""

    def open_single(container: str, dataset: str | None) -> Volume:
        if dataset:
            raise VolumeError(
                f"{container}: holds a single array, there is no dataset {dataset!r} inside it"
            )
        return opener(container)

    return open_single
