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
geometry to choose the layer, and the state opens at that time point (`position`).
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
from typing import Any, ClassVar, Literal

from .errors import UserError
from .io import open_volume
from .io.completion import how_to_finish
from .io.metadata import first_time_point, multiscale_levels, ome_levels, ome_time_step
from .io.zarr_volume import ZarrVolume

LayerKind = Literal["image", "channels", "segmentation"]

CHANNELS_SHADER = """#uicontrol invlerp normalized
void main() {
  emitRGB(vec3(toNormalized(getDataValue(0)), toNormalized(getDataValue(1)),
               toNormalized(getDataValue(2))));
}
"""
"""The first three channels as red, green and blue (z, y, x affinities for emrun's offsets)."""


@dataclass(frozen=True)
class Layer:
    """One volume as neuroglancer will show it."""

    name: str
    kind: LayerKind
    store: Path  # the zarr store served
    inner: str  # the OME-Zarr image group inside it ("" for the store's root)
    channels: int  # 0 without a channel axis
    voxel_size: tuple[float, float, float]  # nm, z, y, x
    unfinished: str | None = None  # how to finish it, while its writer has not
    time_points: int = 1  # an OME t axis's length (neuroglancer shows more than 1 with t)
    time_axis: tuple[str, float, str] | None = None  # t's name, neuroglancer scale and unit
    bounds_nm: tuple[tuple[float, ...], tuple[float, ...]] | None = None  # z, y, x corners


def layer_for(path: str, taken: set[str]) -> Layer:
    """The layer that shows the volume at ``path`` (named after its group, made unique)."""
    with first_time_point():  # a time series: shown whole, its first point read here
        volume = open_volume(path, unfinished=True)  # a run in progress may be watched
    if not isinstance(volume, ZarrVolume):
        raise UserError(f"{volume}: emrun view serves OME-Zarr volumes; convert it first "
                        "(emrun data convert)")
    if volume.dtype.kind == "f" and volume.dtype != "float32":  # float16, float64
        raise UserError(f"{volume}: neuroglancer reads float32, not {volume.dtype}; write it "
                        "as float32 (or integers) to view it")
    attrs = volume.attributes()
    if not multiscale_levels(attrs):
        raise UserError(f"{volume}: not an OME-Zarr image group (no multiscales metadata), "
                        "which neuroglancer needs for its geometry; convert it first (emrun "
                        "data convert)")
    channels = int(volume.shape[0]) if volume.ndim == 4 else 0  # emrun's: channels first
    if channels:
        kind: LayerKind = "channels" if channels >= 3 else "image"
    elif volume.segmentation or (volume.dtype.kind in "ui" and volume.dtype.itemsize >= 4):
        kind = "segmentation"
    else:
        kind = "image"
    array = volume.array_path or volume.dataset or ""  # the level array read
    inner = array.rpartition("/")[0]  # the OME-Zarr image group holding it
    name = (inner.rpartition("/")[2] or Path(volume.path).stem) or "volume"
    unique, count = name, 1
    while unique in taken:
        count += 1
        unique = f"{name}_{count}"
    taken.add(unique)
    # neuroglancer reads the whole image group, at its finest level's scale, also when a
    # coarser level was named (pred.zarr/affinity/1)
    finest = ome_levels(str(volume), volume.ndim + volume.time_point, attrs)[0][1]
    voxel = tuple(float(v) for v in (finest or (1.0, 1.0, 1.0))[-3:])
    found = ome_time_step(attrs) if volume.time_point else None
    time = None if found is None else (found[0], *time_dimension(found[1], found[2]))
    return Layer(unique, kind, Path(volume.path).resolve(), inner, channels,
                 voxel, how_to_finish(volume),  # type: ignore[arg-type]
                 time_points=volume.time_points, time_axis=time, bounds_nm=bounds_nm(volume))


def bounds_nm(volume: ZarrVolume) -> tuple[tuple[float, ...], tuple[float, ...]]:
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
    layer's name to the URL of its OME-Zarr group."""
    out: list[dict[str, Any]] = []
    for layer in layers:
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


def first_time_point_position(layers: list[Layer]) -> dict[str, Any]:
    """Where a state with a time series opens: its first time point (emrun reads and reports
    that one), at the centre of the layers' box, shown in x, y and z. Without it neuroglancer
    opened a series at the middle of its t axis. Nothing for layers without time points
    (neuroglancer's own default, the centre, is right for them)."""
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
        position.append(math.floor((low[axis] + high[axis]) / 2 / nm) + 0.5)  # a voxel's centre
    dims[name] = [step, unit]
    position.append(0.5)  # the centre of time point 0
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
    meta["data_type"] = "uint64"
    if isinstance(meta.get("fill_value"), int):
        meta["fill_value"] %= 1 << 64
    return json.dumps(meta).encode()


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Files under the served stores only; GET, HEAD and the browser's OPTIONS preflight."""

    roots: ClassVar[dict[str, Path]] = {}

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
        """A zarr v3 array's metadata as neuroglancer reads it (`neuroglancer_metadata`); any
        other file as it is."""
        path = self.translate_path(self.path)
        if os.path.basename(path) == "zarr.json" and os.path.isfile(path):
            body = neuroglancer_metadata(Path(path).read_bytes())
            if body is not None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                return io.BytesIO(body)
        return super().send_head()

    def list_directory(self, path: str | os.PathLike[str]) -> None:
        self.send_error(404)  # a store is read by its keys, never listed
        return None

    def log_message(self, format: str, *args: Any) -> None:
        pass  # neuroglancer makes thousands of requests; a terminal full of them helps no one


class DataServer:
    """A threaded HTTP server of zarr stores: store k is at ``{url}/{k}/``."""

    def __init__(self, stores: list[Path], bind: str = "127.0.0.1", port: int = 0) -> None:
        self.prefixes = {store: str(k) for k, store in enumerate(dict.fromkeys(stores))}
        handler = type("Handler", (_Handler,),
                       {"roots": {p: s for s, p in self.prefixes.items()}})
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
        inner = f"/{layer.inner.strip('/')}" if layer.inner else ""
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
    server = DataServer([layer.store for layer in layers], bind, port)
    state = neuroglancer_state(layers, {layer.name: server.source(layer) for layer in layers})
    if viewer_module is None:
        fragment = urllib.parse.quote(json.dumps(state, separators=(",", ":")), safe="")
        return View(server, layers, state, f"{client.removesuffix('#!')}#!{fragment}")
    viewer_module.set_server_bind_address(bind, 0)
    viewer = viewer_module.Viewer()
    viewer.set_state(viewer_module.ViewerState(state))
    return View(server, layers, state, viewer.get_viewer_url(), viewer)
