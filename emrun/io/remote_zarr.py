"""Zarr v2 and v3 at a URL (`https://host/vol.zarr/image`, `gs://`, `s3://`), through
tensorstore.

As for a local store, a path names an array or an OME-Zarr image group (opened at its first
multiscale level, or at the level the path or `--level` names). A remote store cannot be
listed, so the metadata files are read by name: zarr.json (v3), .zarray/.zgroup/.zattrs
(v2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from emrun.io.layout import LABELS, PARTIAL_SUFFIX
from emrun.io.metadata import (
    is_label_image,
    is_label_level,
    multiscale_levels,
    ome_levels,
    spatial_metadata,
    time_axis,
)
from emrun.io.tensorstore_volume import MetadataReader, TensorstoreVolume, kvstore, opened_volume
from emrun.io.volume import Level, VolumeError


@dataclass(frozen=True)
class Node:
    """A zarr node's kind ("array" or "group"), format (2 or 3) and attributes."""

    kind: str
    zarr_format: int
    attrs: dict[str, Any]


def open_remote_zarr(url: str, dataset: str | None) -> TensorstoreVolume:
    reader = MetadataReader(url)
    name = f"{url}/{dataset}" if dataset else url
    node = read_node(reader, dataset or "")
    if node is None and dataset:  # `STORE/NAME` of a segmentation in STORE/labels/NAME,
        head, _, level = dataset.partition("/")  # and `STORE/NAME/LEVEL` of its levels
        label = _label(reader, head)
        if label is not None:
            dataset = f"{LABELS}/{dataset}"
            node = read_node(reader, dataset) if level else label
    if node is None:
        raise VolumeError(f"{name}: no zarr array or group there (no zarr.json, .zarray or "
                          ".zgroup)")
    if node.kind == "group":
        levels = multiscale_levels(node.attrs)
        if not levels:
            raise VolumeError(f"{name} is a zarr group, not an array or an OME-Zarr image; "
                              f"name an array inside it ({name}/NAME)")
        group_path, array_name, group_attrs = dataset or "", levels[0], node.attrs
        array_path = f"{group_path}/{array_name}".strip("/")
        array = read_node(reader, array_path)
        if array is None or array.kind != "array":
            raise VolumeError(f"{name}: OME-Zarr multiscales name dataset {array_name!r}, but "
                              "there is no such array")
    else:
        array, array_path = node, dataset or ""
        group_path, _, array_name = array_path.rpartition("/")
        parent = read_node(reader, group_path) if array_path else None
        group_attrs = parent.attrs if parent is not None else {}
    driver = "zarr3" if array.zarr_format == 3 else "zarr"
    spec = {"driver": driver, "kvstore": kvstore(reader.ts, f"{reader.location}/{array_path}")}
    view = reader.open(spec, lambda store: store)
    ndim = len(view.shape)
    voxel_size, offset = spatial_metadata(name, ndim, array.attrs, group_attrs, array_name)
    if time_axis(name, view.shape, group_attrs, array_name):
        view = view[0]  # the one time point (t, c, z, y, x as bioformats2raw writes)
    base = f"{url}/{group_path}".rstrip("/")
    levels = tuple(Level(level, voxel, f"{base}/{level}")
                   for level, voxel in ome_levels(name, ndim, group_attrs))
    return opened_volume(view, path=url, dataset=dataset or None, voxel_size=voxel_size,
                         offset=offset, attrs={**group_attrs, **array.attrs}, level_list=levels,
                         segmentation=is_label_level(group_attrs, array_name))


def _label(reader: MetadataReader, name: str) -> Node | None:
    """The OME label image `name` under the store's labels group, or None: a local store's
    segmentations open by their names (`seg.zarr/segmentation`, its levels
    `seg.zarr/segmentation/1`), so do a served store's."""
    if "/" in name or name.endswith(PARTIAL_SUFFIX):
        return None
    found = read_node(reader, f"{LABELS}/{name}")
    return found if found is not None and found.kind == "group" and \
        is_label_image(found.attrs) else None


def read_node(reader: MetadataReader, path: str) -> Node | None:
    """The zarr node at `path` inside the store (v3 first, then v2), or None."""
    prefix = f"{path}/" if path else ""
    v3 = reader.json(f"{prefix}zarr.json")
    if v3 is not None:
        return Node(str(v3.get("node_type", "array")), 3, dict(v3.get("attributes") or {}))
    for marker, kind in ((".zarray", "array"), (".zgroup", "group")):
        if reader.json(prefix + marker) is not None:
            return Node(kind, 2, reader.json(f"{prefix}.zattrs") or {})
    return None
