"""HDF5 datasets through h5py.

The file is opened per read and closed again: no handle outlives a call, so volumes
pickle into worker processes and never share an HDF5 handle across a fork.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np

from emrun.geometry import Roi, slices
from emrun.io.metadata import spatial_metadata
from emrun.io.volume import (
    MAX_LISTED,
    METADATA_ERRORS,
    Volume,
    VolumeError,
    format_names,
    metadata_error,
)


@dataclass(frozen=True, kw_only=True)
class Hdf5Volume(Volume):
    """A dataset in an HDF5 file."""

    def _read(self, roi: Roi) -> np.ndarray:
        with h5py.File(self.path, "r") as f:
            return np.asarray(f[self.dataset][slices(roi)])

    @property
    def chunks(self) -> tuple[int, ...] | None:
        try:
            with h5py.File(self.path, "r") as f:
                chunks = f[self.dataset].chunks  # None: stored contiguously
        except METADATA_ERRORS as exc:
            raise metadata_error(self, "chunks", exc) from None
        return tuple(int(c) for c in chunks) if chunks else None

    def attributes(self) -> dict[str, Any]:
        try:
            with h5py.File(self.path, "r") as f:
                node = f[self.dataset]
                return {**_plain_attrs(node.parent), **_plain_attrs(node)}
        except METADATA_ERRORS as exc:
            raise metadata_error(self, "attributes", exc) from None

    def container_attributes(self) -> dict[str, Any]:
        try:
            with h5py.File(self.path, "r") as f:
                return _plain_attrs(f)
        except METADATA_ERRORS as exc:
            raise metadata_error(self, "file's attributes", exc) from None


def open_hdf5(path: str, dataset: str | None) -> Hdf5Volume:
    """Read shape, dtype and metadata of `dataset`; list the datasets there when it's wrong."""
    if not h5py.is_hdf5(path):
        raise VolumeError(f"{path}: not an HDF5 file")
    with h5py.File(path, "r") as f:
        if not dataset:
            raise VolumeError(
                f"{path}: name a dataset inside the file ({path}/NAME); "
                f"datasets: {list_datasets(f)}"
            )
        node = f.get(dataset)
        if node is None:
            raise VolumeError(f"{path} has no dataset {dataset!r}; datasets: {list_datasets(f)}")
        if not isinstance(node, h5py.Dataset):
            raise VolumeError(
                f"{path}/{dataset} is an HDF5 group, not a dataset; datasets in it: "
                f"{list_datasets(node)}"
            )
        shape = tuple(int(n) for n in node.shape)
        voxel_size, offset = spatial_metadata(f"{path}/{dataset}", len(shape),
                                              _plain_attrs(node))
        return Hdf5Volume(
            path=path,
            dataset=dataset,
            shape=shape,
            dtype=np.dtype(node.dtype),
            voxel_size=voxel_size,
            offset=offset,
        )


def list_datasets(group: h5py.Group) -> str:
    """Comma-separated dataset paths under `group`, relative to the file root."""
    names: list[str] = []

    def visit(name: str, obj: Any) -> bool | None:
        if isinstance(obj, h5py.Dataset):
            names.append(obj.name.lstrip("/"))
        return True if len(names) > 10 * MAX_LISTED else None  # True stops the walk

    group.visititems(visit)
    return format_names(names)


def _plain_attrs(node: h5py.HLObject) -> dict[str, Any]:
    """A node's attributes as plain Python values."""
    return {k: _plain(v) for k, v in node.attrs.items()}


def _plain(value: Any) -> Any:
    """HDF5 attributes come back as numpy values; the metadata parser wants plain Python."""
    return value.tolist() if isinstance(value, np.ndarray | np.generic) else value
