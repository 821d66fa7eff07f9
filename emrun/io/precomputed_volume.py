"""Neuroglancer precomputed volumes (a folder or URL with an `info` file), through
tensorstore.

The info lists scales, each a level named by its `key` (`vol/8_8_40`); a path without a key
opens the first scale. Axes are listed x, y, z (then channel): emrun presents z, y, x with a
channel axis first when there is more than one channel, the scale's `voxel_offset` as the
offset and its `resolution` (nm) as the voxel size; an info of `type` segmentation marks
the volume as one.
"""

from __future__ import annotations

from typing import Any

from emrun.io.locations import strip_precomputed
from emrun.io.tensorstore_volume import MetadataReader, TensorstoreVolume, kvstore, opened_volume
from emrun.io.volume import Level, VolumeError, format_names


def open_precomputed(root: str, key: str | None) -> TensorstoreVolume:
    """Open scale `key` (None: the first) of the precomputed volume whose info is at `root`."""
    reader = MetadataReader(strip_precomputed(root))
    info = reader.json("info")
    if info is None:
        raise VolumeError(f"{root}: no neuroglancer precomputed volume there (no info file)")
    scales = [s for s in info.get("scales") or () if isinstance(s, dict) and "key" in s]
    if not scales:
        raise VolumeError(f"{root}/info lists no scales")
    keys = [str(s["key"]).strip("/") for s in scales]
    if key is None:
        index = 0
    elif key.strip("/") in keys:
        index = keys.index(key.strip("/"))
    else:
        raise VolumeError(f"{root} has no scale {key!r}; scales: {format_names(keys)}")
    name = f"{root}/{key}" if key else root
    spec = {"driver": "neuroglancer_precomputed", "kvstore": kvstore(reader.ts, reader.location),
            "scale_index": index}
    channels = int(info.get("num_channels", 1))
    d = reader.ts.d

    def emrun_axes(store: Any) -> Any:
        if channels == 1:
            store = store[d["channel"][0]]
            order = ["z", "y", "x"]
        else:
            order = ["channel", "z", "y", "x"]
        return store[d[order].transpose[:]][d[:].translate_to[0]]

    view = reader.open(spec, emrun_axes)
    scale = scales[index]
    voxel_size = _zyx(name, scale, "resolution")
    return opened_volume(
        view, path=root, dataset=key or None, voxel_size=voxel_size,
        offset=tuple(int(v) for v in reversed(scale.get("voxel_offset") or (0, 0, 0))),
        shift_nm=_scale_shift(voxel_size, _zyx(f"{root}/{keys[0]}", scales[0], "resolution")),
        attrs={k: v for k, v in info.items() if k != "scales"},
        segmentation=info.get("type") == "segmentation",
        level_list=tuple(Level(k, _zyx(name, s, "resolution"), f"{root}/{k}")
                         for k, s in zip(keys, scales, strict=True)),
    )


def _scale_shift(voxel_size: tuple[float, ...], base: tuple[float, ...]
                 ) -> tuple[float, ...] | None:
    """The half-voxel shift (nm, z, y, x) of a coarser scale: precomputed scales share their
    voxels' corners (voxel_offset x resolution), so a scale of voxels f times scale 0's has
    its voxel 0's centre (f - 1) / 2 scale-0 voxels past scale 0's, as an OME-Zarr level's
    translation says (outputs made from a coarser scale lay half a voxel off); None at
    scale 0's resolution."""
    shift = tuple(float(round((v - b) / 2, 6)) for v, b in zip(voxel_size, base, strict=True))
    return shift if any(shift) else None


def _zyx(name: str, scale: dict[str, Any], key: str) -> tuple[float, ...]:
    values = scale.get(key)
    if not isinstance(values, list) or len(values) != 3:
        raise VolumeError(f"{name}: scale {key} {values!r} is not three numbers (x, y, z)")
    try:
        zyx = tuple(float(v) for v in reversed(values))
    except (TypeError, ValueError):
        raise VolumeError(f"{name}: scale {key} {values!r} is not three numbers") from None
    if any(v <= 0 for v in zyx):
        raise VolumeError(f"{name}: scale {key} {values!r} must be positive")
    return zyx
