"""Small volumes written in every format emrun reads, for the I/O and conversion tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import tifffile
import zarr


def write_zarr3(tmp: Path, data: np.ndarray) -> str:
    g = zarr.open_group(tmp / "v3.zarr", mode="w")
    g.create_array("image", shape=data.shape, chunks=(4, 8, 8), dtype=data.dtype)[:] = data
    return str(tmp / "v3.zarr/image")


def write_zarr2(tmp: Path, data: np.ndarray) -> str:
    g = zarr.open_group(tmp / "v2.zarr", mode="w", zarr_format=2)
    g.create_array("image", shape=data.shape, chunks=(4, 8, 8), dtype=data.dtype)[:] = data
    return str(tmp / "v2.zarr/image")


def write_zarr_bare(tmp: Path, data: np.ndarray) -> str:
    zarr.create_array(tmp / "bare.zarr", shape=data.shape, chunks=(4, 8, 8), dtype=data.dtype)[
        :
    ] = data
    return str(tmp / "bare.zarr")


def write_hdf5(tmp: Path, data: np.ndarray) -> str:
    with h5py.File(tmp / "f.h5", "w") as f:
        f.create_dataset("volumes/raw", data=data, chunks=(4, 8, 8))
    return str(tmp / "f.h5/volumes/raw")


def write_tiff(tmp: Path, data: np.ndarray) -> str:
    tifffile.imwrite(tmp / "stack.tif", data)
    return str(tmp / "stack.tif")


def write_tiff_folder(tmp: Path, data: np.ndarray) -> str:
    folder = tmp / "sections"
    folder.mkdir()
    for z, section in enumerate(data):
        tifffile.imwrite(folder / f"section_{z}.tif", section)
    return str(folder)


def write_npy(tmp: Path, data: np.ndarray) -> str:
    np.save(tmp / "a.npy", data)
    return str(tmp / "a.npy")


WRITERS: dict[str, Callable[[Path, np.ndarray], str]] = {
    "zarr3": write_zarr3,
    "zarr2": write_zarr2,
    "zarr-bare": write_zarr_bare,
    "hdf5": write_hdf5,
    "tiff": write_tiff,
    "tiff-folder": write_tiff_folder,
    "npy": write_npy,
}
