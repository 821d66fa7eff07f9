"""Zarr v2 and v3 at a URL (`https://host/vol.zarr/image`, `gs://`, `s3://`), through
tensorstore.

As for a local store, a path names an array or an OME-Zarr image group (opened at its first
multiscale level, or at the level the path or `--level` names). A remote store cannot be
listed, so the metadata files are read by name: zarr.json (v3), .zarray/.zgroup/.zattrs
(v2); an object store answers 403 for a missing key where listing is not allowed, so a
refused key is taken as missing while another answers (`Probe`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from emrun.io.layout import LABELS, PARTIAL_SUFFIX
from emrun.io.metadata import (
    LevelFactor,
    check_dimension_names,
    is_label_image,
    is_label_level,
    multiscale_levels,
    ome_levels,
    ome_shift,
    shape_factor,
    spatial_metadata,
    time_axis,
)
from emrun.io.tensorstore_volume import (
    MetadataReader,
    TensorstoreVolume,
    forbidden,
    kvstore,
    opened_volume,
)
from emrun.io.volume import Level, VolumeError


@dataclass(frozen=True)
class Node:
    """A zarr node's kind ("array" or "group"), format (2 or 3), attributes and (a v3
    array's) dimension names."""

    kind: str
    zarr_format: int
    attrs: dict[str, Any]
    dimension_names: tuple[Any, ...] | None = None
    shape: tuple[int, ...] | None = None  # an array's, as its metadata states it


@dataclass
class Probe:
    """Reads a store's metadata keys by name. S3 and other object stores answer a missing
    key with HTTP 403 where the reader may not list the bucket, so a refused key counts as
    absent (and is remembered): the next key may answer (a v2 store's .zarray after its
    missing zarr.json), and only when none does is the refusal reported."""

    reader: MetadataReader
    refused: list[str] = field(default_factory=list)

    def json(self, key: str) -> dict[str, Any] | None:
        try:
            return self.reader.json(key)
        except VolumeError as exc:
            if not forbidden(exc):
                raise
            self.refused.append(key)
            return None

    def missing(self, name: str) -> VolumeError:
        """The one line for a node that no key answered: a refusal if there was one."""
        if not self.refused:
            return VolumeError(f"{name}: no zarr array or group there (no zarr.json, .zarray "
                               "or .zgroup)")
        keys = ", ".join(dict.fromkeys(self.refused))
        return VolumeError(
            f"{name}: permission denied (HTTP 403) reading {keys}, and no other metadata "
            "key answered: nothing is there (an object store answers 403 for a missing key "
            "when listing is not allowed) or these credentials may not read it; check the "
            "path and your access to the bucket")


def open_remote_zarr(url: str, dataset: str | None) -> TensorstoreVolume:
    probe = Probe(MetadataReader(url))
    name = f"{url}/{dataset}" if dataset else url
    node = read_node(probe, dataset or "")
    asked = list(probe.refused)  # the keys of the node named (others are probed below)
    if node is None and dataset:  # `STORE/NAME` of a segmentation in STORE/labels/NAME,
        head, _, level = dataset.partition("/")  # and `STORE/NAME/LEVEL` of its levels
        label = _label(probe, head)
        if label is not None:
            dataset = f"{LABELS}/{dataset}"
            node = read_node(probe, dataset) if level else label
            if node is None:
                _no_level(name, url, head, level, label, "segmentation")
        elif level:
            image = read_node(probe, head)
            if image is not None and image.kind == "group":
                _no_level(name, url, head, level, image, "image")
    if node is None:
        probe.refused[:] = asked  # a label's or the image's keys said nothing of this node
        raise probe.missing(name)
    if node.kind == "group":
        levels = multiscale_levels(node.attrs)
        if not levels:
            raise VolumeError(f"{name} is a zarr group, not an array or an OME-Zarr image; "
                              f"name an array inside it ({name}/NAME)")
        if not dataset and "/" in levels[0]:  # an emrun store's root names a volume's levels
            primary = levels[0].rpartition("/")[0]  # by path: the store, not a volume of it
            raise VolumeError(f"{name}: is a zarr group; name an array inside it ({name}/NAME,"
                              f" e.g. {name}/{primary}), as for a store on disk")
        group_path, array_name, group_attrs = dataset or "", levels[0], node.attrs
        array_path = f"{group_path}/{array_name}".strip("/")
        probe.refused.clear()  # what the keys of other nodes answered says nothing here
        array = read_node(probe, array_path)
        if array is None and probe.refused:
            raise probe.missing(f"{url}/{array_path}")
        if array is None or array.kind != "array":
            raise VolumeError(f"{name}: OME-Zarr multiscales name dataset {array_name!r}, but "
                              "there is no such array")
    else:
        array, array_path = node, dataset or ""
        group_path, _, array_name = array_path.rpartition("/")
        parent = read_node(probe, group_path) if array_path else None  # none: no group
        group_attrs = parent.attrs if parent is not None else {}
    reader = probe.reader
    driver = "zarr3" if array.zarr_format == 3 else "zarr"
    spec = {"driver": driver, "kvstore": kvstore(reader.ts, f"{reader.location}/{array_path}")}
    view = reader.open(spec, lambda store: store)
    ndim = len(view.shape)
    factor = level_factor(probe, group_path, group_attrs)
    voxel_size, offset = spatial_metadata(name, ndim, array.attrs, group_attrs, array_name,
                                          factor)
    check_dimension_names(name, array.dimension_names, group_attrs, array_name)
    if time_axis(name, view.shape, group_attrs, array_name):
        view = view[0]  # the one time point (t, c, z, y, x as bioformats2raw writes)
    base = f"{url}/{group_path}".rstrip("/")
    levels = tuple(Level(level, voxel, f"{base}/{level}")
                   for level, voxel in ome_levels(name, ndim, group_attrs, factor))
    root = node if not dataset else read_node(probe, "")
    return opened_volume(view, path=url, dataset=dataset or None, voxel_size=voxel_size,
                         offset=offset, attrs={**group_attrs, **array.attrs}, level_list=levels,
                         root_attrs=root.attrs if root is not None and root.kind == "group"
                         else {},
                         segmentation=is_label_level(group_attrs, array_name),
                         shift_nm=ome_shift(name, ndim, group_attrs, array_name)
                         if array_name else None)


def _no_level(name: str, url: str, head: str, level: str, group: Node, kind: str) -> None:
    """Refuse `STORE/NAME/LEVEL` naming no level of image group NAME, in the user's words
    and with the levels there are (not as the inner `labels/NAME/LEVEL`)."""
    levels = multiscale_levels(group.attrs)
    if levels and level not in levels:
        raise VolumeError(f"{name}: {kind} {head!r} has no level {level!r} (no array of "
                          f"that name); its levels: {', '.join(levels)} (e.g. "
                          f"{url}/{head}/{levels[0]})")


def _label(probe: Probe, name: str) -> Node | None:
    """The OME label image `name` under the store's labels group, or None: a local store's
    segmentations open by their names (`seg.zarr/segmentation`, its levels
    `seg.zarr/segmentation/1`), so do a served store's."""
    if "/" in name or name.endswith(PARTIAL_SUFFIX):
        return None
    found = read_node(probe, f"{LABELS}/{name}")
    return found if found is not None and found.kind == "group" and \
        is_label_image(found.attrs) else None


def read_node(probe: Probe, path: str) -> Node | None:
    """The zarr node at `path` inside the store (v3 first, then v2), or None; a key the
    store refuses counts as absent (`Probe`), .zattrs (optional in v2) among them."""
    prefix = f"{path}/" if path else ""
    v3 = probe.json(f"{prefix}zarr.json")
    if v3 is not None:
        names = v3.get("dimension_names")
        return Node(str(v3.get("node_type", "array")), 3, dict(v3.get("attributes") or {}),
                    tuple(names) if isinstance(names, list) else None, _shape(v3))
    for marker, kind in ((".zarray", "array"), (".zgroup", "group")):
        if (found := probe.json(prefix + marker)) is not None:
            return Node(kind, 2, probe.json(f"{prefix}.zattrs") or {},
                        shape=_shape(found) if kind == "array" else None)
    return None


def _shape(metadata: dict[str, Any]) -> tuple[int, ...] | None:
    """An array's shape from its zarr.json or .zarray, or None where it states none."""
    shape = metadata.get("shape")
    if not isinstance(shape, list) or not all(isinstance(n, int) for n in shape):
        return None
    return tuple(shape)


def level_factor(probe: Probe, group_path: str, group_attrs: dict[str, Any]) -> LevelFactor:
    """A level's factor from the finest by the shapes its metadata states (the multiscale's
    first dataset and the level), as a local store's (`zarr_volume.level_factor`): a stated
    voxel size, the finest level's, in place of an unreadable OME scale is multiplied by it
    (a coarser level was given the finest level's size). Read only when asked."""
    prefix = f"{group_path}/" if group_path else ""

    def factor(level: str) -> tuple[float, ...] | None:
        levels = multiscale_levels(group_attrs)
        finest = read_node(probe, prefix + levels[0]) if levels else None
        own = read_node(probe, prefix + level)
        if finest is None or own is None or finest.shape is None or own.shape is None:
            return None
        return shape_factor(finest.shape, own.shape)

    return factor
