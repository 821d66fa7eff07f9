"""TIFF volumes: one multi-page file, or a folder of per-section files.

Shape and dtype come from TIFF headers only. Reads touch only the pages (z sections) in
the ROI. Files are opened per read, so no file offset is shared across a fork.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import tifffile

from emrun.geometry import Roi, slices
from emrun.io.metadata import unit_to_nm
from emrun.io.volume import TIFF_SUFFIXES, Volume, VolumeError, one_line


@dataclass(frozen=True, kw_only=True)
class TiffVolume(Volume):
    """A multi-page TIFF; page i is section z=i when pages are 2-d."""

    def _read(self, roi: Roi) -> np.ndarray:
        with tifffile.TiffFile(self.path) as tif:
            series = tif.series[0]
            pages = series.pages
            if (
                self.ndim >= 3
                and len(pages) == self.shape[0]
                and pages[0] is not None
                and tuple(pages[0].shape) == self.shape[1:]
            ):
                rest = slices(roi)[1:]
                out = np.empty(roi.shape, dtype=self.dtype)
                for i, index in enumerate(range(roi.begin[0], roi.end[0])):
                    out[i] = pages[index].asarray()[rest]
                return out
            # Pages don't map to z sections (ImageJ hyperstack, single page): read all.
            return np.asarray(series.asarray())[slices(roi)]


@dataclass(frozen=True, kw_only=True)
class TiffStackVolume(Volume):
    """A folder of 2-d sections, one file per z, in natural order of file names."""

    files: tuple[str, ...]

    def _read(self, roi: Roi) -> np.ndarray:
        rest = slices(roi)[1:]
        out = np.empty(roi.shape, dtype=self.dtype)
        for i, index in enumerate(range(roi.begin[0], roi.end[0])):
            name = self.files[index]
            try:
                section = tifffile.imread(os.path.join(self.path, name))
            except Exception as exc:
                raise VolumeError(f"{self}: cannot read section {name}: {one_line(exc)}") from exc
            if section.shape != self.shape[1:] or section.dtype != self.dtype:
                raise VolumeError(
                    f"{self}: section {name} is {section.dtype} {section.shape}, but the first "
                    f"section is {self.dtype} {self.shape[1:]}; all sections must match"
                )
            out[i] = section[rest]
        return out


def open_tiff(path: str) -> TiffVolume:
    """Header-only inspection of a TIFF file's first series."""
    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        shape = tuple(int(n) for n in series.shape)
        return TiffVolume(
            path=path,
            dataset=None,
            shape=shape,
            dtype=np.dtype(series.dtype),
            voxel_size=_imagej_voxel_size(tif, len(shape)),
        )


def open_tiff_stack(path: str) -> TiffStackVolume:
    """A folder of sections; the first file sets shape and dtype (checked again on read)."""
    files = tiff_files(path)
    with tifffile.TiffFile(os.path.join(path, files[0])) as tif:
        series = tif.series[0]
        section = tuple(int(n) for n in series.shape)
        dtype = np.dtype(series.dtype)
    return TiffStackVolume(
        path=path.rstrip("/") or path,
        dataset=None,
        shape=(len(files), *section),
        dtype=dtype,
        files=tuple(files),
    )


def has_tiffs(path: str) -> bool:
    return bool(tiff_files(path))


def tiff_files(path: str) -> list[str]:
    """TIFF file names in a folder, naturally sorted (section_2 before section_10)."""
    names = [
        n
        for n in os.listdir(path)
        if n.lower().endswith(TIFF_SUFFIXES)
        and not n.startswith(".")
        and os.path.isfile(os.path.join(path, n))
    ]
    return sorted(names, key=natural_key)


def natural_key(name: str) -> tuple[Any, ...]:
    """Sort key treating digit runs as numbers; text parts and numbers alternate."""
    return tuple(
        int(part) if i % 2 else part.lower() for i, part in enumerate(re.split(r"(\d+)", name))
    )


def _imagej_voxel_size(tif: tifffile.TiffFile, ndim: int) -> tuple[float, ...] | None:
    """zyx nm from ImageJ 'spacing'/'unit' plus X/YResolution, only when all are present."""
    meta = tif.imagej_metadata or {}
    if ndim != 3 or "spacing" not in meta or "unit" not in meta:
        return None
    tags = tif.pages[0].tags
    xres, yres = tags.get("XResolution"), tags.get("YResolution")
    if xres is None or yres is None:
        return None
    try:
        factor = unit_to_nm(tif.filename, meta["unit"])
    except VolumeError:
        return None  # e.g. "pixel": no physical size to report
    sizes = [float(meta["spacing"])]
    for tag in (yres, xres):
        num, den = tag.value  # pixels per unit, as a rational
        if not num:
            return None
        sizes.append(den / num)
    return tuple(round(s * factor, 6) for s in sizes)
