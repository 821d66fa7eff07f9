"""N5 datasets (`vol.n5/raw`, local or at a URL), through tensorstore.

N5 lists axes fastest first (x, y, z); emrun reverses them to z, y, x. Voxel size and offset
come from the conventions N5 data carries: `resolution` (gunpowder/daisy) or
`pixelResolution` (n5-viewer, with a unit; a scale level's `downsamplingFactors` multiply
it, as n5-viewer and n5-spark's pyramids mean it, and such a level lies half a level-0
voxel per factor past level 0, `level_shift`), and `offset` in nm, all in x, y, z order.
N5 written before its 1.0 format names its codec in `compressionType` (a string), which
tensorstore does not read: such a dataset is opened from its structure, given the codec in
today's form.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from emrun.io.locations import is_url
from emrun.io.metadata import from_attrs, unit_to_nm
from emrun.io.tensorstore_volume import (
    MetadataReader,
    TensorstoreVolume,
    kvstore,
    opened_volume,
)
from emrun.io.volume import VolumeError, format_names

STRUCTURE_KEYS = ("dimensions", "blockSize", "dataType", "compression", "n5")
OLD_CODEC_KEY = "compressionType"
"""Where N5 before 1.0 named its codec ("raw", "gzip", "bzip2", "xz", "lz4")."""


def open_n5(container: str, dataset: str | None) -> TensorstoreVolume:
    """Open the dataset `dataset` of the N5 container `container`."""
    if not is_url(container) and not os.path.isdir(container):
        raise VolumeError(f"{container}: no such folder (an N5 container is a folder)")
    reader = MetadataReader(container)
    if not dataset:
        raise VolumeError(f"{container}: is an N5 container; name a dataset inside it "
                          f"({container}/NAME); datasets: {list_datasets(container)}")
    name = f"{container}/{dataset}"
    attrs = reader.json(f"{dataset}/attributes.json")
    if attrs is None:
        if is_url(container):  # a remote store cannot be listed
            raise VolumeError(f"{name}: no N5 dataset there (no attributes.json)")
        raise VolumeError(f"{container} has no dataset {dataset!r}; datasets: "
                          f"{list_datasets(container)}")
    if "dimensions" not in attrs:
        raise VolumeError(f"{name} is an N5 group, not a dataset; datasets in it: "
                          f"{list_datasets(container, dataset)}")
    spec: dict[str, Any] = {"driver": "n5",
                            "kvstore": kvstore(reader.ts, f"{reader.location}/{dataset}")}
    if _spatial_only(attrs) or _old_codec(attrs):
        spec |= {"metadata": _structure(attrs), "assume_metadata": True}
    view = reader.open(spec, lambda store: store[reader.ts.d[:].transpose[::-1]])
    voxel_size, offset = n5_spatial(name, len(view.shape), attrs)
    plain = {k: v for k, v in attrs.items() if k not in (*STRUCTURE_KEYS, OLD_CODEC_KEY)}
    return opened_volume(view, path=container, dataset=dataset, voxel_size=voxel_size,
                         offset=offset, attrs=plain, metadata=spec.get("metadata"),
                         shift_nm=level_shift(voxel_size, attrs.get("downsamplingFactors")))


def _spatial_only(attrs: Mapping[str, Any]) -> bool:
    """Whether `resolution` or `units` list three values for a dataset of more axes: funlib
    and daisy give them for z, y, x only on (c, z, y, x) arrays, which tensorstore's reading
    of those attributes refuses; such a dataset is opened from its structure alone."""
    rank = len(attrs.get("dimensions") or ())
    return rank > 3 and any(isinstance(attrs.get(key), list) and len(attrs[key]) == 3
                            for key in ("resolution", "units"))


def _old_codec(attrs: Mapping[str, Any]) -> bool:
    """Whether the dataset names its codec as N5 before 1.0 did (tensorstore refused it:
    'Error parsing object member "compression"')."""
    return "compression" not in attrs and isinstance(attrs.get(OLD_CODEC_KEY), str)


def _structure(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """The dataset's structure for tensorstore, an old `compressionType` in today's form."""
    found = {k: attrs[k] for k in STRUCTURE_KEYS if k in attrs}
    if _old_codec(attrs):
        found["compression"] = {"type": attrs[OLD_CODEC_KEY]}
    return found


def n5_spatial(name: str, ndim: int, attrs: Mapping[str, Any]) -> Any:
    """Voxel size (nm) and offset (voxels), z, y, x, from N5 attributes in x, y, z order."""
    zyx: dict[str, Any] = {}
    resolution = attrs.get("resolution")
    pixel = attrs.get("pixelResolution")
    factor = 1.0
    if resolution is None and isinstance(pixel, Mapping):
        resolution = _downsampled(pixel.get("dimensions"), attrs.get("downsamplingFactors"))
        factor = unit_to_nm(name, pixel.get("unit"))
    elif resolution is None and pixel is not None:
        resolution = _downsampled(pixel, attrs.get("downsamplingFactors"))
    factors = _unit_factors(name, attrs.get("units"), resolution, factor)
    if isinstance(resolution, list):
        zyx["voxel_size"] = [_scaled(v, f)
                             for v, f in zip(reversed(resolution), factors, strict=True)]
    elif resolution is not None:
        zyx["voxel_size"] = resolution  # not a list: from_attrs says what is wrong
    offset = attrs.get("offset")
    if isinstance(offset, list) and len(offset) == len(factors):  # in resolution's units
        zyx["offset"] = [_scaled(v, f) for v, f in zip(reversed(offset), factors, strict=True)]
    elif offset is not None:
        zyx["offset"] = list(reversed(offset)) if isinstance(offset, list) else offset
    return from_attrs(name, ndim, zyx)


def level_shift(voxel_size: tuple[float, ...] | None,
                factors: Any) -> tuple[float, ...] | None:
    """The half-voxel shift (nm, z, y, x) of an n5-viewer pyramid level: its voxels average
    `downsamplingFactors` (x, y, z) voxels of level 0, so its voxel 0's centre lies (f - 1) / 2
    level-0 voxels from level 0's, as an OME-Zarr level's translation says (it was placed at
    level 0's, so outputs made from s1 lay half a voxel off their input); None without a
    voxel size, without factors or at factors of 1."""
    if voxel_size is None or not isinstance(factors, list) or len(factors) != 3 or not all(
            isinstance(f, int | float) and not isinstance(f, bool) and f >= 1 for f in factors):
        return None
    shift = tuple(float(round((f - 1) / 2 * v / f, 6))
                  for f, v in zip(reversed(factors), voxel_size[-3:], strict=True))
    return shift if any(shift) else None


def _downsampled(resolution: Any, factors: Any) -> Any:
    """n5-viewer's `pixelResolution` of a pyramid's level: the full resolution's, which each
    level repeats, times the level's `downsamplingFactors` (s1 of 6 nm with [2, 2, 1] is
    12 nm; it was read as 6, so a recipe at 12 nm was refused and one at 6 nm took it)."""
    numbers = isinstance(factors, list) and all(
        isinstance(f, int | float) and not isinstance(f, bool) and f > 0 for f in factors)
    if not numbers or not isinstance(resolution, list) or len(resolution) != len(factors):
        return resolution
    return [_scaled(r, f) for r, f in zip(resolution, factors, strict=True)]


def _unit_factors(name: str, units: Any, resolution: Any, factor: float) -> list[float]:
    """nm per unit of each axis, z, y, x: `units` beside `resolution` (neuroglancer's N5
    convention, which tensorstore writes: "um" made 0.004 read as 0.004 nm), else
    ``factor`` (pixelResolution's unit, or nm)."""
    count = len(resolution) if isinstance(resolution, list) else 0
    if isinstance(units, list) and len(units) == count:
        return [unit_to_nm(name, unit) for unit in reversed(units)]
    return [factor] * count


def _scaled(value: Any, factor: float) -> Any:
    return value * factor if isinstance(value, int | float) and not isinstance(value, bool) \
        else value


def list_datasets(container: str, under: str | None = None) -> str:
    """The datasets of a local N5 container (folders whose attributes.json has dimensions);
    a remote store cannot be listed."""
    if is_url(container):
        return "(a remote store cannot be listed)"
    import json

    top = os.path.join(container, under) if under else container
    names: list[str] = []
    for folder, subfolders, files in os.walk(top):
        subfolders.sort()
        if "attributes.json" in files and folder != container:
            try:
                with open(os.path.join(folder, "attributes.json"), encoding="utf-8") as f:
                    if "dimensions" in json.load(f):
                        names.append(os.path.relpath(folder, container).replace(os.sep, "/"))
                        subfolders.clear()  # a dataset's folders are its chunks
            except (OSError, ValueError):
                continue
        if len(names) > 120:
            break
    return format_names(names)
