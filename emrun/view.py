"""`emrun view`: look at volumes in neuroglancer, served from this machine.

The named OME-Zarr volumes (what emrun writes: images, affinities, segmentations) are served
read-only over HTTP, with the CORS headers a browser needs, by a small threaded server (each
store under its own prefix, so volumes from several folders can be shown together). A
neuroglancer state puts one layer per volume: an image layer for images, an RGB image layer
over the first three channels for affinities and other channel volumes, a segmentation layer
for integer labels. The neuroglancer client itself comes from the `neuroglancer` package (the
`view` extra), which serves it from this machine too, so nothing needs the internet; or, with
``client``, the state is put into a link to any neuroglancer client (e.g. a public one).

A time series (an OME t axis longer than 1, which emrun's other commands refuse) is shown
whole: neuroglancer reads the t axis from the OME metadata and gives it a slider of its own
(t in seconds where the axis has a time unit); emrun reads only the first time point's
geometry to choose the layer, and the state opens at that time point (`position`), where
the axis's OME translation and scale put it (`time_origin`).

N5 (a dataset, or a multiscale group: n5-viewer, BigDataViewer, paintera) is served the same
way as an `n5://` source, a group as one layer with its levels (`n5_layer`). N5 at a URL
(http(s), s3, gs) is not served: neuroglancer reads it from its URL itself.
"""

from __future__ import annotations

import http.server
import io
import json
import math
import os
import posixpath
import socket
import threading
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from .errors import UserError
from .io import open_volume
from .io.completion import how_to_finish
from .io.locations import is_url
from .io.metadata import (
    finest_first,
    first_time_point,
    multiscale_levels,
    ome_levels,
    ome_time_step,
)
from .io.tensorstore_volume import TensorstoreVolume
from .io.volume import Volume
from .io.zarr_volume import ZarrVolume

if TYPE_CHECKING:
    from .io.n5_volume import Pyramid

LayerKind = Literal["image", "channels", "segmentation"]

CHANNELS_SHADER = """#uicontrol invlerp normalized
void main() {
  emitRGB(vec3(toNormalized(getDataValue(0)), toNormalized(getDataValue(1)),
               toNormalized(getDataValue(2))));
}
"""
"""The first three channels as red, green and blue (z, y, x affinities for emrun's offsets)."""
N5_CODECS = ("raw", "gzip", "blosc", "zstd")
"""The N5 compressions neuroglancer decodes."""
N5_TYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "float32")
"""The N5 data types neuroglancer reads (int64 is served as uint64, `n5_metadata`)."""


@dataclass(frozen=True)
class Layer:
    """One volume as neuroglancer will show it."""

    name: str
    kind: LayerKind
    store: Path | str  # the store served; a URL (str): read by neuroglancer itself
    inner: str  # the OME-Zarr image group inside it ("" for the store's root)
    channels: int  # 0 without a channel axis
    voxel_size: tuple[float, float, float]  # nm, z, y, x
    unfinished: str | None = None  # how to finish it, while its writer has not
    time_points: int = 1  # an OME t axis's length (neuroglancer shows more than 1 with t)
    time_axis: tuple[str, float, str] | None = None  # t's name, neuroglancer scale and unit
    time_origin: float = 0.0  # where time point 0 starts, in steps (OME's t translation)
    bounds_nm: tuple[tuple[float, ...], tuple[float, ...]] | None = None  # z, y, x corners
    driver: Literal["zarr", "n5"] = "zarr"  # how neuroglancer reads it
    offset: tuple[float, ...] | None = None  # N5: level 0's (voxels, z, y, x), not read by ng
    served: tuple[tuple[str, bytes], ...] = ()  # files served other than stored (path, body)


def layer_for(path: str, taken: set[str]) -> Layer:
    """The layer that shows the volume at ``path`` (named after its group, made unique)."""
    with first_time_point():  # a time series: shown whole, its first point read here
        volume = open_volume(path, unfinished=True)  # a run in progress may be watched
    if isinstance(volume, TensorstoreVolume) and volume.spec.get("driver") == "n5":
        return n5_layer(volume, taken)
    if not isinstance(volume, ZarrVolume):
        raise UserError(_not_shown(volume))
    _check_float(volume)
    attrs = volume.attributes()
    if not multiscale_levels(attrs):
        raise UserError(f"{volume}: not an OME-Zarr image group (no multiscales metadata), "
                        "which neuroglancer needs for its geometry; convert it first (emrun "
                        "data convert)")
    channels, kind = layer_kind(volume)
    array = volume.array_path or volume.dataset or ""  # the level array read
    inner = array.rpartition("/")[0]  # the OME-Zarr image group holding it
    unique = unique_name(inner.rpartition("/")[2] or Path(volume.path).stem, taken)
    # neuroglancer reads the whole image group, at its finest level's scale, also when a
    # coarser level was named (pred.zarr/affinity/1)
    finest = ome_levels(str(volume), volume.ndim + volume.time_point, attrs)[0][1]
    voxel = tuple(float(v) for v in (finest or (1.0, 1.0, 1.0))[-3:])
    found = ome_time_step(attrs) if volume.time_point else None
    time = None if found is None else (found[0], *time_dimension(found[1], found[2]))
    origin = 0.0 if found is None else time_origin(attrs, found[1])
    return Layer(unique, kind, Path(volume.path).resolve(), inner, channels,
                 voxel, how_to_finish(volume),  # type: ignore[arg-type]
                 time_points=volume.time_points, time_axis=time, time_origin=origin,
                 bounds_nm=bounds_nm(volume))


def time_origin(attrs: dict[str, Any], step: float) -> float:
    """Where time point 0 of an OME-Zarr image's t axis starts, in steps of ``step`` (the
    axis's scale, `ome_time_step`): its finest level's t translation, scaled and moved by the
    multiscale's own, as neuroglancer places it. 0 where none is given (or it is no number):
    a series whose t starts at 120 s opened at 0, outside it."""
    ome = attrs.get("ome")
    found = ome.get("multiscales") if isinstance(ome, dict) else None
    multiscales = found if found is not None else attrs.get("multiscales")
    first = multiscales[0] if isinstance(multiscales, list) and multiscales else None
    if not isinstance(first, dict) or not step or not math.isfinite(step):
        return 0.0
    datasets = finest_first(first)
    origin = 0.0
    for transforms in (datasets[0].get("coordinateTransformations") if datasets else None,
                       first.get("coordinateTransformations")):
        for t in transforms if isinstance(transforms, list) else ():
            origin = origin * _first_value(t, "scale", 1.0) + _first_value(t, "translation", 0.0)
    return origin / step


def _first_value(transform: Any, key: str, default: float) -> float:
    """A transform's value on the first (t) axis for ``key`` (scale or translation)."""
    values = transform.get(key) if isinstance(transform, dict) else None
    if isinstance(values, list) and values and isinstance(values[0], int | float) and \
            not isinstance(values[0], bool) and math.isfinite(values[0]):
        return float(values[0])
    return default


def _not_shown(volume: Volume) -> str:
    """Why a volume is not shown, and what to do: a remote zarr store is OME-Zarr, yet
    emrun view serves local ones only (and N5, local or remote)."""
    if isinstance(volume, TensorstoreVolume) and is_url(volume.path):
        return (f"{volume}: emrun view shows local OME-Zarr volumes and N5 (local or at a "
                "URL); open a remote zarr's URL in neuroglancer itself (zarr://URL), or "
                "convert it here first (emrun data convert)")
    return (f"{volume}: emrun view serves OME-Zarr volumes and N5; convert it first (emrun "
            "data convert)")


def _check_float(volume: Volume) -> None:
    if volume.dtype.kind == "f" and volume.dtype != "float32":  # float16, float64
        raise UserError(f"{volume}: neuroglancer reads float32, not {volume.dtype}; write it "
                        "as float32 (or integers) to view it")


def layer_kind(volume: Volume) -> tuple[int, LayerKind]:
    """The volume's channel count (0 without a channel axis) and how it is shown."""
    channels = int(volume.shape[0]) if volume.ndim == 4 else 0  # emrun's: channels first
    if channels:
        return channels, "channels" if channels >= 3 else "image"
    if volume.segmentation or (volume.dtype.kind in "ui" and volume.dtype.itemsize >= 4):
        return 0, "segmentation"
    return 0, "image"


def unique_name(name: str, taken: set[str]) -> str:
    """`name` (or "volume"), numbered past the names already taken, and taken."""
    name = name or "volume"
    unique, count = name, 1
    while unique in taken:
        count += 1
        unique = f"{name}_{count}"
    taken.add(unique)
    return unique


def n5_layer(volume: TensorstoreVolume, taken: set[str]) -> Layer:
    """The layer of an N5 dataset, or of the multiscale group a level of it names: served
    as N5, neuroglancer reads a group's levels itself (`n5://` of the group).

    Its geometry is level 0's as emrun reads it, put in the source's transform: neuroglancer
    takes a voxel size only from the group's attributes (not a level's `pixelResolution`,
    nor BigDataViewer's XML) and no `offset`. A coarser level needs nothing added: its voxel
    covers its factors' voxels of level 0 from the same corner, which puts its centre the
    half voxel per factor past level 0's that emrun reads (`level_shift`)."""
    from .io.n5_volume import BDV_GROUP, n5_pyramid

    container = volume.path
    remote = is_url(container)
    levels = volume.levels()
    inner = (posixpath.dirname(levels[0].path[len(container):].strip("/")) if levels
             else (volume.dataset or "").strip("/"))
    pyramid = n5_pyramid(container, inner) if levels else None
    if remote and pyramid is not None and not _lists_scales(pyramid):
        inner, pyramid = pyramid.path(0), None  # level 0 alone: see `_lists_scales`
    arrays = [attrs for _, attrs in pyramid.levels] if pyramid is not None else [
        _remote_json(container, inner) if remote else
        _json_file(Path(container, inner, "attributes.json"))]
    _check_n5(volume, arrays)
    if remote and volume.dtype == "int64":
        raise UserError(f"{volume}: holds int64, which neuroglancer does not read from N5 "
                        "(emrun view serves a local container's as uint64); copy it here or "
                        "convert it (emrun data convert)")
    base = open_volume(levels[0].path, unfinished=True) if levels else volume
    channels, kind = layer_kind(volume)
    if kind == "channels" and (volume.chunks or (channels,))[0] < channels:
        kind = "image"  # neuroglancer reads channels together only from one chunk
    store: Path | str = container.rstrip("/") if remote else Path(container).resolve()
    stem = Path(urllib.parse.urlsplit(container).path if remote else store).stem
    bdv = BDV_GROUP.fullmatch(inner)
    name = f"{stem}_setup{bdv.group(1)}" if bdv else inner.rpartition("/")[2]
    offset = tuple(float(o) for o in base.offset) if base.offset and any(base.offset) else None
    served = () if pyramid is None or isinstance(store, str) else (
        (str((store / inner / "attributes.json").resolve()),
         _n5_group_attributes(store / inner, pyramid)),)
    return Layer(unique_name(name or stem, taken), kind, store, inner, channels,
                 tuple(float(v) for v in (base.voxel_size or (1.0, 1.0, 1.0))[-3:]),  # type: ignore[arg-type]
                 how_to_finish(volume), bounds_nm=bounds_nm(base), driver="n5", offset=offset,
                 served=served)


def _lists_scales(pyramid: Pyramid) -> bool:
    """Whether neuroglancer finds every level of a remote N5 group: from the group's own
    `scales` list (a local group's is served with it, `_n5_group_attributes`); without it,
    it lists the folder, which a web server does not answer, so the layer shows level 0."""
    scales = pyramid.attrs.get("scales")
    return isinstance(scales, list) and len(scales) >= len(pyramid.levels) and all(
        isinstance(f, list) and f == pyramid.factors(i)
        for i, f in enumerate(scales[:len(pyramid.levels)]))


def _remote_json(container: str, inner: str) -> dict[str, Any]:
    """A remote N5 node's attributes ({} where it has none)."""
    from .io.tensorstore_volume import MetadataReader

    key = f"{inner}/attributes.json" if inner else "attributes.json"
    return MetadataReader(container).json(key) or {}


def _check_n5(volume: Volume, arrays: list[dict[str, Any]]) -> None:
    """Refuse what neuroglancer cannot read from N5: its data type, its compression."""
    _check_float(volume)
    if volume.dtype.name not in (*N5_TYPES, "int64"):
        raise UserError(f"{volume}: neuroglancer reads N5 of {', '.join(N5_TYPES)}, not "
                        f"{volume.dtype}; convert it first (emrun data convert)")
    for attrs in arrays:
        codec = attrs.get("compression", {}).get("type") if isinstance(
            attrs.get("compression"), dict) else attrs.get("compressionType", "raw")
        if codec not in N5_CODECS:
            raise UserError(f"{volume}: compressed with {codec}, which neuroglancer does not "
                            f"decode (it reads N5 compressed with {', '.join(N5_CODECS)}); "
                            "convert it first (emrun data convert)")


def _json_file(path: Path) -> dict[str, Any]:
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def _n5_group_attributes(group: Path, pyramid: Pyramid) -> bytes:
    """The group's attributes.json as served: with every level's factors in `scales`, which
    neuroglancer reads before the levels' own (without a list it lists the folder, which this
    server refuses, and found no levels in an n5-viewer group), as emrun reads them."""
    factors = []
    for index in range(len(pyramid.levels)):
        found = pyramid.factors(index)
        if found is None:
            break
        factors.append(found)
    return json.dumps(_json_file(group / "attributes.json") | {"scales": factors}).encode()


def bounds_nm(volume: Volume) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The corners (z, y, x; nm, or voxels where the size is unknown) of the box the volume
    covers, as its OME translation and scale place it."""
    voxel = volume.voxel_size[-3:] if volume.voxel_size is not None else (1.0, 1.0, 1.0)
    offset = volume.offset or (0, 0, 0)
    shift = volume.shift_nm or (0.0, 0.0, 0.0)
    low = tuple(o * v + s for o, v, s in zip(offset, voxel, shift, strict=True))
    return low, tuple(a + n * v for a, n, v in zip(low, volume.shape[-3:], voxel, strict=True))


TIME_UNITS = {"": None, "second": 1.0, "s": 1.0, "millisecond": 1e-3, "ms": 1e-3,
              "microsecond": 1e-6, "nanosecond": 1e-9, "picosecond": 1e-12,
              "minute": 60.0, "hour": 3600.0, "day": 86400.0}
"""OME time units in seconds, neuroglancer's one time unit (None: no unit)."""


def time_dimension(step: float, unit: str) -> tuple[float, str]:
    """neuroglancer's [scale, unit] of an OME t axis of `step` in `unit` (unitless if the
    unit is none or one neuroglancer has no conversion for here)."""
    factor = TIME_UNITS.get(unit)
    return (step * factor, "s") if factor is not None else (step, "")


def neuroglancer_state(layers: list[Layer], sources: dict[str, str]) -> dict[str, Any]:
    """A neuroglancer viewer state (JSON) with one layer per volume; ``sources`` maps a
    layer's name to the URL of its OME-Zarr group (or N5 group or dataset)."""
    out: list[dict[str, Any]] = []
    for layer in layers:
        if layer.driver == "n5":
            out.append(n5_layer_spec(layer, sources[layer.name]))
            continue
        spec: dict[str, Any] = {"name": layer.name, "source": f"zarr://{sources[layer.name]}"}
        if layer.kind == "segmentation":
            spec["type"] = "segmentation"
        else:
            spec["type"] = "image"
            if layer.kind == "channels":
                spec["shader"] = CHANNELS_SHADER
                # OME's channel axis becomes neuroglancer's local "c'"; renamed "c^" the
                # shader reads channels with getDataValue(i) (they are one chunk in emrun's
                # outputs, which neuroglancer needs for that)
                # a time series' t axis comes first, as in its OME axes
                dims: dict[str, list[Any]] = {} if layer.time_axis is None else {
                    layer.time_axis[0]: list(layer.time_axis[1:])}
                dims["c^"] = [1, ""]
                for axis, nm in zip("zyx", layer.voxel_size, strict=True):
                    dims[axis] = [nm * 1e-9, "m"]
                spec["source"] = {"url": spec["source"],
                                  "transform": {"outputDimensions": dims}}
        out.append(spec)
    state: dict[str, Any] = {"layers": out, "layout": "4panel", "selectedLayer": {
        "layer": layers[-1].name, "visible": True} if layers else {}}
    return state | first_time_point_position(layers)


def n5_layer_spec(layer: Layer, url: str) -> dict[str, Any]:
    """The state's layer of an N5 volume: its `n5://` source with level 0's voxel size and
    offset as emrun reads them. The transform's output dimensions follow the source's, which
    neuroglancer names in N5's order (x, y, z, then the channel axis): it maps them in that
    order, whatever they are called."""
    dims = {axis: [nm * 1e-9, "m"] for axis, nm in zip("xyz", reversed(layer.voxel_size),
                                                         strict=True)}
    if layer.channels:  # the shader reads a channel dimension (c^); else one at a time (c')
        dims["c^" if layer.kind == "channels" else "c'"] = [1, ""]
    # in output units, voxels; half a voxel less than the offset: neuroglancer puts an N5
    # voxel's corner where an OME-Zarr voxel has its centre, and emrun reads both offsets
    # as voxel 0's place (an N5 volume and its converted copy lay half a voxel apart)
    offset = layer.offset if layer.offset is not None else (0, 0, 0)
    shift = [*(o - 0.5 for o in reversed(offset)), 0.0][:len(dims)]
    transform: dict[str, Any] = {"outputDimensions": dims, "matrix": [
        [1.0 if col == row else 0.0 for col in range(len(dims))] + [shift[row]]
        for row in range(len(dims))]}
    spec: dict[str, Any] = {"name": layer.name,
                            "source": {"url": f"n5://{url}", "transform": transform},
                            "type": "segmentation" if layer.kind == "segmentation" else "image"}
    if layer.kind == "channels":
        spec["shader"] = CHANNELS_SHADER
    return spec


def first_time_point_position(layers: list[Layer]) -> dict[str, Any]:
    """Where a state with a time series opens: its first time point (emrun reads and reports
    that one), at the centre of the layers' box, shown in x, y and z. Without it neuroglancer
    opened a series at the middle of its t axis. Nothing for layers without time points
    (neuroglancer's own default, the centre, is right for them). neuroglancer centres an
    OME voxel on its coordinates (voxel k of translation T covers T + k -+ 0.5, t included),
    so whole numbers are voxel centres: T + 0.5 fell between time points 0 and 1."""
    series = next((layer for layer in layers
                   if layer.time_axis is not None and layer.time_points > 1), None)
    if series is None or series.time_axis is None:
        return {}
    boxes = [layer.bounds_nm for layer in layers if layer.bounds_nm is not None]
    low = [min(box[0][a] for box in boxes) for a in range(3)] if boxes else [0.0] * 3
    high = [max(box[1][a] for box in boxes) for a in range(3)] if boxes else [0.0] * 3
    name, step, unit = series.time_axis
    dims: dict[str, list[Any]] = {}
    position: list[float] = []
    for axis in (2, 1, 0):  # x, y, z: neuroglancer shows the first three dimensions
        nm = series.voxel_size[axis]
        dims["zyx"[axis]] = [nm * 1e-9, "m"]
        position.append(math.floor((low[axis] + high[axis]) / 2 / nm))  # a voxel's centre
    dims[name] = [step, unit]
    position.append(series.time_origin)  # time point 0's centre, in t's steps
    return {"dimensions": dims, "displayDimensions": ["x", "y", "z"], "position": position}


def neuroglancer_metadata(raw: bytes) -> bytes | None:
    """A zarr v3 int64 array's zarr.json saying uint64 (None for any other file): neuroglancer
    reads no int64 from zarr v3 (labels that numpy made int64 failed in the browser), and the
    same eight bytes as uint64 are the same segments (a negative id shows as 2**64 - |id|)."""
    try:
        meta = json.loads(raw)
    except ValueError:
        return None
    if not (isinstance(meta, dict) and meta.get("node_type") == "array"
            and meta.get("data_type") == "int64"):
        return None
    return _as_uint64(meta, "data_type", "uint64")


NEUROGLANCER_UNITS = {"nm": "nanometer", "um": "micrometer", "\u00b5m": "micrometer",
                      "\u03bcm": "micrometer", "micron": "micrometer", "mm": "millimeter",
                      "cm": "centimeter", "m": "meter", "s": "second", "ms": "millisecond",
                      "us": "microsecond", "ns": "nanosecond"}
"""Unit spellings emrun reads in OME axes and neuroglancer refuses ("Unsupported unit"),
with the OME names it takes."""


def neuroglancer_units(raw: bytes) -> bytes | None:
    """A zarr.json (v3) or .zattrs (v2) whose OME axes spell a unit as neuroglancer does not
    read it (`NEUROGLANCER_UNITS`), with the unit spelled out (None for any other file):
    stores written elsewhere with `nm` or `um` opened in emrun and failed in the browser."""
    try:
        meta = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(meta, dict):
        return None
    attrs = meta.get("attributes", {}) if "zarr_format" in meta else meta
    ome = attrs.get("ome", attrs) if isinstance(attrs, dict) else None
    multiscales = ome.get("multiscales") if isinstance(ome, dict) else None
    changed = False
    for multiscale in multiscales if isinstance(multiscales, list) else []:
        axes = multiscale.get("axes") if isinstance(multiscale, dict) else None
        for axis in axes if isinstance(axes, list) else []:
            unit = axis.get("unit") if isinstance(axis, dict) else None
            if isinstance(unit, str) and unit in NEUROGLANCER_UNITS:
                axis["unit"] = NEUROGLANCER_UNITS[unit]
                changed = True
    return json.dumps(meta).encode() if changed else None


def _zarr_json(raw: bytes) -> bytes | None:
    """A zarr.json as neuroglancer reads it: an array's int64, a group's OME units."""
    return neuroglancer_metadata(raw) or neuroglancer_units(raw)


def neuroglancer_v2_metadata(raw: bytes) -> bytes | None:
    """A zarr v2 int64 array's .zarray saying uint64 (None for any other file), as
    `neuroglancer_metadata` does for v3: OME-Zarr 0.4 labels are v2."""
    try:
        meta = json.loads(raw)
    except ValueError:
        return None
    dtype = meta.get("dtype") if isinstance(meta, dict) else None
    if not (isinstance(dtype, str) and len(dtype) == 3 and dtype[1:] == "i8"):
        return None
    return _as_uint64(meta, "dtype", dtype[0] + "u8")


def _as_uint64(meta: dict[str, Any], key: str, uint64: str) -> bytes:
    """Array metadata saying ``uint64`` under ``key``, its integer fill value taken modulo
    2**64 (the same eight bytes)."""
    meta[key] = uint64
    if isinstance(meta.get("fill_value"), int):
        meta["fill_value"] %= 1 << 64
    return json.dumps(meta).encode()


def n5_metadata(raw: bytes) -> bytes | None:
    """An N5 int64 dataset's attributes.json saying uint64 (None for any other): neuroglancer
    reads no int64 from N5 either, and the same eight bytes are the same segments."""
    try:
        meta = json.loads(raw)
    except ValueError:
        return None
    if not (isinstance(meta, dict) and meta.get("dataType") == "int64"):
        return None
    return json.dumps(meta | {"dataType": "uint64"}).encode()


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Files under the served stores only; GET, HEAD and the browser's OPTIONS preflight."""

    roots: ClassVar[dict[str, Path]] = {}
    served: ClassVar[dict[str, bytes]] = {}  # files served other than stored, by path

    def end_headers(self) -> None:
        self.send_header("Access-Control-Allow-Origin", "*")
        self.send_header("Access-Control-Allow-Headers", "range")
        self.send_header("Access-Control-Expose-Headers", "content-range")
        super().end_headers()

    def do_OPTIONS(self) -> None:
        self.send_response(204)
        self.send_header("Access-Control-Allow-Methods", "GET, HEAD, OPTIONS")
        self.end_headers()

    def translate_path(self, path: str) -> str:
        """URL path -> file path inside a served store; '' (a 404) for anything else."""
        clean = posixpath.normpath(urllib.parse.unquote(urllib.parse.urlsplit(path).path))
        prefix, _, rest = clean.lstrip("/").partition("/")
        root = self.roots.get(prefix)
        if root is None or rest.startswith("..") or rest.startswith("/"):
            return ""
        target = (root / rest).resolve()
        if target != root and root not in target.parents:
            return ""
        return str(target)

    def send_head(self) -> Any:
        """A zarr array's metadata as neuroglancer reads it (`neuroglancer_metadata`,
        `neuroglancer_v2_metadata`), an OME group's units (`neuroglancer_units`), an N5
        dataset's (`n5_metadata`), an N5 group's as the layer serves it; any other file as
        it is."""
        path = self.translate_path(self.path)
        body = self.served.get(path) if path else None
        rewrite = {"zarr.json": _zarr_json, ".zarray": neuroglancer_v2_metadata,
                   ".zattrs": neuroglancer_units,
                   "attributes.json": n5_metadata}.get(os.path.basename(path))
        if body is None and rewrite is not None and os.path.isfile(path):
            body = rewrite(Path(path).read_bytes())
        if body is None:
            return super().send_head()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        return io.BytesIO(body)

    def list_directory(self, path: str | os.PathLike[str]) -> None:
        self.send_error(404)  # a store is read by its keys, never listed
        return None

    def log_message(self, format: str, *args: Any) -> None:
        pass  # neuroglancer makes thousands of requests; a terminal full of them helps no one


class DataServer:
    """A threaded HTTP server of zarr stores and N5 containers: store k is at
    ``{url}/{k}/``; ``served``: files served other than stored (their path: their body)."""

    def __init__(self, stores: list[Path], bind: str = "127.0.0.1", port: int = 0,
                 served: dict[str, bytes] | None = None) -> None:
        self.prefixes = {store: str(k) for k, store in enumerate(dict.fromkeys(stores))}
        handler = type("Handler", (_Handler,),
                       {"roots": {p: s for s, p in self.prefixes.items()},
                        "served": dict(served or {})})
        try:
            self.httpd = http.server.ThreadingHTTPServer((bind, port), handler)
        except OSError as exc:
            raise UserError(f"cannot serve on {bind}:{port}: {exc.strerror or exc}") from None
        self.httpd.daemon_threads = True
        host, actual = self.httpd.server_address[:2]
        shown = socket.getfqdn() if host in ("0.0.0.0", "") else host  # other machines' view
        self.url = f"http://{shown}:{actual}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def source(self, layer: Layer) -> str:
        """The URL neuroglancer reads the layer from: here, or a remote store's own."""
        inner = f"/{layer.inner.strip('/')}" if layer.inner else ""
        if isinstance(layer.store, str):
            return f"{layer.store}{inner}"
        return f"{self.url}/{self.prefixes[layer.store]}{inner}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@dataclass
class View:
    """What `emrun view` started: the data server, the layers, the state and the link."""

    server: DataServer
    layers: list[Layer]
    state: dict[str, Any]
    link: str
    viewer: Any = None  # a neuroglancer.Viewer when the package serves the client

    def close(self) -> None:
        self.server.close()


def view(paths: list[str], *, bind: str = "127.0.0.1", port: int = 0,
         client: str | None = None) -> View:
    """Serve ``paths`` and make the link: to the neuroglancer client that the `neuroglancer`
    package serves here, or, with ``client``, to that client with the state in the link."""
    if not paths:
        raise UserError("name at least one volume to view (e.g. pred.zarr/affinity)")
    if client is not None and urllib.parse.urlsplit(client).scheme not in ("http", "https"):
        raise UserError(f"--client {client!r}: give the http(s) URL of a neuroglancer client, "
                        "e.g. https://neuroglancer-demo.appspot.com/")
    taken: set[str] = set()
    layers = [layer_for(path, taken) for path in paths]
    viewer_module = None
    if client is None:
        try:
            import neuroglancer as viewer_module
        except ImportError:
            raise UserError("emrun view serves the neuroglancer client with the neuroglancer "
                            "package: pip install 'emrun[view]' (or pass --client URL of a "
                            "neuroglancer client)") from None
    server = DataServer([layer.store for layer in layers if isinstance(layer.store, Path)],
                        bind, port,
                        {path: body for layer in layers for path, body in layer.served})
    state = neuroglancer_state(layers, {layer.name: server.source(layer) for layer in layers})
    if viewer_module is None:
        fragment = urllib.parse.quote(json.dumps(state, separators=(",", ":")), safe="")
        return View(server, layers, state, f"{client.removesuffix('#!')}#!{fragment}")
    viewer_module.set_server_bind_address(bind, 0)
    viewer = viewer_module.Viewer()
    viewer.set_state(viewer_module.ViewerState(state))
    return View(server, layers, state, viewer.get_viewer_url(), viewer)
