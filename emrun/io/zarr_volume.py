"""Zarr v2 and v3 directory stores, through the zarr 3 API (3.1 and later).

A path may name an array (`vol.zarr/raw/s0`, or a bare array store) or an OME-Zarr image
group (`vol.zarr/image`, the layout emrun writes: the group carries `multiscales`, level 0
is the array inside it); a group is opened at its first multiscale dataset and keeps the
group's name (`str(volume) == "vol.zarr/image"`). A segmentation in the store's labels group
opens by its name and its levels by NAME/LEVEL (`seg.zarr/segmentation/1`), as an image's.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from emrun.geometry import Roi, slices
from emrun.io.layout import LABELS, PARTIAL_SUFFIX
from emrun.io.metadata import (
    LevelFactor,
    check_dimension_names,
    is_label_image,
    is_label_level,
    multiscale_dataset,
    multiscale_levels,
    ome_levels,
    ome_shift,
    shape_factor,
    spatial_metadata,
    time_axis,
)
from emrun.io.volume import (
    MAX_LISTED,
    METADATA_ERRORS,
    ZARR_MARKERS,
    Level,
    Volume,
    VolumeError,
    format_names,
    metadata_error,
)


@dataclass(frozen=True, kw_only=True)
class ZarrVolume(Volume):
    """An array in a zarr store; the zarr handle is opened once per process, on first read.

    `array_path` is where the array lies inside the store when `dataset` names an OME-Zarr
    image group rather than the array itself (e.g. dataset "image", array_path "image/0").
    """

    array_path: str | None = None
    time_point: bool = False  # the array's first axis is an OME time axis of length 1, dropped
    time_points: int = 1  # its length: more than 1 only opened by `first_time_point`

    @cached_property
    def _array(self) -> Any:
        node = zarr.open(self.path, mode="r")
        inner = self.array_path or self.dataset
        return node[inner] if inner else node

    def _read(self, roi: Roi) -> np.ndarray:
        index = slices(roi)
        return np.asarray(self._array[(0, *index) if self.time_point else index])

    @property
    def chunks(self) -> tuple[int, ...] | None:
        try:
            chunks = self._array.chunks  # the handle each read uses, opened once
        except METADATA_ERRORS as exc:
            raise metadata_error(self, "chunks", exc) from None
        if chunks and self.time_point:
            chunks = chunks[1:]
        return tuple(int(c) for c in chunks) if chunks else None

    def attributes(self) -> dict[str, Any]:
        inner = self.array_path or self.dataset
        holder = inner.rpartition("/")[0] if inner else None
        try:
            root = zarr.open(self.path, mode="r")
            group = dict(root[holder].attrs) if holder else (
                dict(root.attrs) if inner and isinstance(root, zarr.Group) else {})
            return {**group, **dict(self._array.attrs)}
        except METADATA_ERRORS as exc:
            raise metadata_error(self, "attributes", exc) from None

    def container_attributes(self) -> dict[str, Any]:
        try:
            return dict(zarr.open(self.path, mode="r").attrs)
        except METADATA_ERRORS as exc:
            raise metadata_error(self, "container's attributes", exc) from None

    def levels(self) -> list[Level]:
        """The levels of the OME-Zarr image group holding the array, if it is in one."""
        inner = self.array_path or self.dataset
        if not inner:
            return []  # a bare array store: no group around it
        holder = inner.rpartition("/")[0]
        try:
            root = zarr.open(self.path, mode="r")
            group = root[holder] if holder else root
            attrs = dict(group.attrs)
        except METADATA_ERRORS as exc:
            raise metadata_error(self, "multiscale levels", exc) from None
        base = f"{self.path}/{holder}".rstrip("/")
        return [Level(level, voxel, f"{base}/{level}")
                for level, voxel in ome_levels(str(self), self.ndim + self.time_point, attrs,
                                               level_factor(group))]


def open_zarr(path: str, dataset: str | None) -> ZarrVolume:
    """Open a group + array path or a bare array, with clear errors for wrong paths."""
    try:
        node = zarr.open(path, mode="r")
    except FileNotFoundError:  # zarr's "no group/array found" errors subclass it
        if dataset and (inner := _inner_node(path, dataset)) is not None:
            return open_zarr(*inner)
        if nodes := _nodes_in(path):  # zarr nodes in a folder that is none itself
            inside = format_names([f"{path}/{node}" for node in nodes])
            raise VolumeError(f"{path} has no array {dataset!r}; zarr nodes in it: {inside}"
                              if dataset else f"{path} has no zarr metadata of its own; "
                              f"name a zarr node inside it: {inside}") from None
        raise VolumeError(
            f"{path}: not a zarr store (no zarr.json, .zarray or .zgroup metadata)"
        ) from None

    if not isinstance(node, zarr.Group):
        if dataset:
            raise VolumeError(f"{path}: is a single zarr array, it has no array {dataset!r}")
        return _volume(path, None, node, None, None)

    if not dataset:
        level = multiscale_dataset(dict(node.attrs))
        if level is not None and "/" not in level:  # an emrun store's root names a volume's
            # levels by path (emrun.io.layout): the store, not a volume of it
            return _open_image_group(path, None, node, level)
        raise VolumeError(
            f"{path}: is a zarr group; name an array inside it ({path}/NAME); "
            f"arrays: {list_arrays(node)}"
        )
    try:
        array = node[dataset]
    except KeyError:
        array = None
    if array is None or (isinstance(array, zarr.Group)
                         and multiscale_dataset(dict(array.attrs)) is None):
        head, _, rest = dataset.partition("/")
        label = _label(node, head)  # `STORE/NAME` of a segmentation in STORE/labels/NAME
        if label is not None and not rest:
            return _open_image_group(path, dataset, label, multiscale_dataset(
                dict(label.attrs)) or "0", array_path=f"{LABELS}/{dataset}")
        if label is not None:  # `STORE/NAME/LEVEL`, as an image's levels are named
            _check_level(path, dataset, head, rest, label, "segmentation")
            return open_zarr(path, f"{LABELS}/{dataset}")
        if array is None and rest and head in node and isinstance(node[head], zarr.Group):
            _check_level(path, dataset, head, rest, node[head], "image")
    if array is None or (isinstance(array, zarr.Group) and "labels" in array.attrs.get("ome", {})):
        if array is None and (cut := _cut_short(Path(path), dataset)) is not None:
            raise VolumeError(f"{path} has no array {dataset!r}: its write was cut short "
                              f"(killed?), leaving {cut}; run the command that writes it "
                              "again")
        if dataset == LABELS and array is not None:  # the folder is there: say what it is
            raise VolumeError(f"{path} has no array {dataset!r} ({path}/{dataset} is the "
                              "store's OME-Zarr labels group, whose segmentations open by "
                              f"name); arrays: {list_arrays(node, prefix=f'{path}/')}")
        raise VolumeError(f"{path} has no array {dataset!r}; arrays: {list_arrays(node)}")
    if isinstance(array, zarr.Group):
        level = multiscale_dataset(dict(array.attrs))
        if level is not None:
            return _open_image_group(path, dataset, array, level)
        raise VolumeError(
            f"{path}/{dataset} is a zarr group without OME-Zarr multiscales, not an array; "
            f"arrays in it: {list_arrays(array, prefix=f'{path}/{dataset}/')}"
        )
    parent_path, _, array_name = dataset.rpartition("/")
    parent = node[parent_path] if parent_path else node
    return _volume(path, dataset, array, dict(parent.attrs), array_name, group=parent)


def _inner_node(path: str, dataset: str) -> tuple[str, str | None] | None:
    """The first zarr node inside a local folder without root metadata, as (its path, the
    rest of `dataset`): a zarr v2 array written at `vol.zarr/raw` with no `.zgroup` above it
    (tools that write arrays one by one leave it out) opens as the bare array it is."""
    parts = [p for p in dataset.split("/") if p]
    for i in range(1, len(parts) + 1):
        if _is_node(Path(path, *parts[:i])):
            return f"{path}/{'/'.join(parts[:i])}", "/".join(parts[i:]) or None
    return None


def _nodes_in(path: str) -> list[str]:
    """The zarr arrays and groups directly in a local folder that is no zarr node itself."""
    folder = Path(path)
    if not folder.is_dir():
        return []
    return sorted(child.name for child in folder.iterdir() if _is_node(child))


def _is_node(folder: Path) -> bool:
    """Whether a local folder holds zarr metadata of its own (v2 or v3)."""
    return any((folder / marker).is_file() for marker in ZARR_MARKERS)


def _check_level(path: str, dataset: str, head: str, level: str, group: Any,
                 kind: str) -> None:
    """Refuse `STORE/NAME/LEVEL` naming no level of image group NAME in the words the user
    used, with the levels there are (a segmentation's was "no array 'labels/seg/7'", an
    inner path the user never gave)."""
    levels = multiscale_levels(dict(group.attrs))
    if not levels or level in levels or level in group:
        return
    raise VolumeError(f"{path}/{dataset}: {kind} {head!r} has no level {level!r} (no array "
                      f"of that name); its levels: {', '.join(levels)} (e.g. "
                      f"{path}/{head}/{levels[0]})")


def _cut_short(store: Path, dataset: str) -> Path | None:
    """The half-written volume (`NAME.partial`, as an image or a segmentation) that a write
    of ``dataset`` killed outright left in a local store, if any."""
    for where in (store / f"{dataset}{PARTIAL_SUFFIX}",
                  store / LABELS / f"{dataset}{PARTIAL_SUFFIX}"):
        if where.is_dir():
            return where
    return None


def _label(store: Any, name: str) -> Any:
    """The image group of segmentation `name` in the store's OME labels group, or None."""
    if "/" in name or LABELS not in store:
        return None
    labels = store[LABELS]
    if not isinstance(labels, zarr.Group) or name.endswith(PARTIAL_SUFFIX) or \
            name not in labels:
        return None  # listed or not: the list leaves out labels of another level count
    found = labels[name]
    return found if isinstance(found, zarr.Group) and is_label_image(dict(found.attrs)) \
        else None


def _open_image_group(path: str, dataset: str | None, group: Any, level: str,
                      array_path: str | None = None) -> ZarrVolume:
    """Open an OME-Zarr image group at `level`, its first multiscale dataset; `array_path`:
    where the group lies in the store when not at `dataset`."""
    name = f"{path}/{dataset}" if dataset else path
    try:
        array = group[level]
    except KeyError:
        raise VolumeError(
            f"{name}: OME-Zarr multiscales name dataset {level!r}, but the group has no such "
            f"array; arrays in it: {list_arrays(group)}"
        ) from None
    if isinstance(array, zarr.Group):
        raise VolumeError(f"{name}: OME-Zarr dataset {level!r} is a group, not an array")
    where = array_path or dataset
    inner = f"{where}/{level}" if where else level
    return _volume(path, dataset, array, dict(group.attrs), level, array_path=inner,
                   group=group)


def _volume(
    path: str,
    dataset: str | None,
    array: Any,
    group_attrs: dict[str, Any] | None,
    array_name: str | None,
    array_path: str | None = None,
    group: Any = None,
) -> ZarrVolume:
    name = f"{path}/{dataset}" if dataset else path
    shape = tuple(int(n) for n in array.shape)
    voxel_size, offset = spatial_metadata(
        name, len(shape), dict(array.attrs), group_attrs, array_name,
        level_factor(group) if group is not None else None)
    check_dimension_names(name, getattr(array.metadata, "dimension_names", None),
                          group_attrs, array_name)
    time_point = time_axis(name, shape, group_attrs, array_name)
    return ZarrVolume(
        path=path,
        dataset=dataset,
        shape=shape[1:] if time_point else shape,
        time_point=time_point,
        time_points=shape[0] if time_point else 1,
        dtype=numpy_dtype(array.dtype),
        voxel_size=voxel_size,
        offset=offset,
        segmentation=is_label_level(group_attrs, array_name),
        array_path=array_path,
        shift_nm=ome_shift(name, len(shape), group_attrs, array_name)
        if group_attrs is not None and array_name is not None else None,
    )


def level_factor(group: Any) -> LevelFactor:
    """A level's factor from the finest by the shapes of the image group's arrays (the
    multiscale's first dataset and the level): a stated voxel size, the finest level's, in
    place of an unreadable OME scale is multiplied by it."""
    def factor(level: str) -> tuple[float, ...] | None:
        levels = multiscale_levels(dict(group.attrs))
        try:
            finest, own = group[levels[0]], group[level]
        except (KeyError, IndexError, *METADATA_ERRORS):
            return None
        if isinstance(finest, zarr.Group) or isinstance(own, zarr.Group):
            return None
        return shape_factor(finest.shape, own.shape)

    return factor


def list_arrays(group: Any, prefix: str = "") -> str:
    """Comma-separated volume paths under `group` (recursive, sorted, capped for messages).

    An OME-Zarr image group counts as one volume (its name, not its levels); conversions
    still in progress (`NAME.partial`) are left out.
    """
    names: list[str] = []
    _collect(group, "", names)
    return format_names([prefix + n for n in names])


def _collect(group: Any, prefix: str, out: list[str]) -> None:
    # arrays()/groups() exist throughout zarr 3.x; walked by hand to stay version-neutral.
    out.extend(prefix + name for name, _ in group.arrays())
    for name, child in group.groups():
        if len(out) > 10 * MAX_LISTED:  # enough to show; don't walk a huge store
            return
        if name.endswith(PARTIAL_SUFFIX):
            continue
        if name == LABELS:  # the store's segmentations open by their names
            found = [n for n, g in child.groups() if not n.endswith(PARTIAL_SUFFIX)
                     and is_label_image(dict(g.attrs))]
            if found:
                out.extend(prefix + n for n in sorted(found))
                continue
        if multiscale_dataset(dict(child.attrs)) is not None:
            out.append(prefix + name)
        else:
            _collect(child, f"{prefix}{name}/", out)


def numpy_dtype(dtype: Any) -> np.dtype:
    """zarr 3.1 returns numpy dtypes; accept its ZDType wrapper too, should that appear."""
    if not isinstance(dtype, np.dtype) and hasattr(dtype, "to_native_dtype"):
        dtype = dtype.to_native_dtype()
    return np.dtype(dtype)
