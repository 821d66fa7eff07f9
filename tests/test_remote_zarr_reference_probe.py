"""Reference probe: zarr v2 and v3 stores served over HTTP (a local server) against numpy and
against the same store opened locally.

References: the numpy arrays the stores were written from (whole volume, random windows
across chunk edges and the volume's end), and each OME level's voxel size, offset and
half-voxel shift worked out here in exact fractions from its multiscales transforms
(dataset scale and translation, then the multiscale's own). Errors (missing level, missing
dataset, 404, 403) and `emrun data convert` of a URL are held to what the local open of the
same store does.

The server answers Range requests (as object stores do: sharded v3 reads its shard index by
a suffix range) and listens with a long queue (tensorstore opens many connections at once;
with the default queue of 5 a dropped SYN cost a second per read).
"""

from __future__ import annotations

import functools
import http.server
import io
import json
import os
import pickle
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from emrun.cli import app
from emrun.geometry import Roi
from emrun.io import VolumeError, choose_level, open_volume
from emrun.io.write import write_volume

pytest.importorskip("tensorstore")

RNG = np.random.default_rng(20240611)
BASE = RNG.integers(0, 255, (8, 12, 16), dtype=np.uint8)
LEVELS = [BASE, BASE[:, ::2, ::2].copy(), BASE[::2, ::4, ::4].copy()]


# --------------------------------------------------------------------------- the server


class Server(http.server.ThreadingHTTPServer):
    request_queue_size = 256
    daemon_threads = True


class Files(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; answers `Range: bytes=a-b`, `a-` and `-n` with 206."""

    disable_nagle_algorithm = True

    def log_message(self, *args: object) -> None:
        pass

    def send_head(self) -> Any:
        header = self.headers.get("Range")
        path = self.translate_path(self.path)
        if not header or not os.path.isfile(path):
            return super().send_head()
        found = re.fullmatch(r"bytes=(\d*)-(\d*)", header.strip())
        assert found is not None, header
        data = Path(path).read_bytes()
        first, last = found.groups()
        if first == "":
            start, end = max(0, len(data) - int(last)), len(data) - 1
        else:
            start, end = int(first), min(len(data) - 1, int(last)) if last else len(data) - 1
        body = data[start:end + 1]
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        return io.BytesIO(body)


class Refusing(Files):
    """As S3 answers a reader that may not list the bucket: 403 for a key that is not there."""

    def send_head(self) -> Any:
        if not os.path.isfile(self.translate_path(self.path)):
            self.send_error(403)
            return None
        return super().send_head()


class AllForbidden(Files):
    """No read permission at all: 403 for everything."""

    def send_head(self) -> Any:
        self.send_error(403)
        return None


@contextmanager
def serving(folder: Path, handler: type = Files) -> Iterator[str]:
    server = Server(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


# --------------------------------------------------------------------------- the stores


def t(scale: list[Any], translation: list[Any] | None = None) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [{"type": "scale", "scale": scale}]
    if translation is not None:
        out.append({"type": "translation", "translation": translation})
    return out


def space(unit: str | None = "nanometer") -> list[dict[str, Any]]:
    return [{"name": a, "type": "space", **({"unit": unit} if unit else {})} for a in "zyx"]


TIME_CHANNEL = [{"name": "t", "type": "time"}, {"name": "c", "type": "channel"}]

# name: (axes, [(path, array, transforms)], the multiscale's own transforms). Scales and
# translations are given as strings so the reference reads them exactly.
IMAGES: dict[str, tuple[list[Any], list[tuple[str, np.ndarray, Any]], Any]] = {
    "img": (space(), [("s0", LEVELS[0], t(["40", "4", "4"], ["80", "12", "8"])),
                      ("s1", LEVELS[1], t(["40", "8", "8"], ["80", "14", "10"])),
                      ("s2", LEVELS[2], t(["80", "16", "16"], ["100", "18", "14"]))], None),
    "reversed": (space(), [("s2", LEVELS[2], t(["80", "16", "16"], ["100", "18", "14"])),
                           ("s1", LEVELS[1], t(["40", "8", "8"], ["80", "14", "10"])),
                           ("s0", LEVELS[0], t(["40", "4", "4"], ["80", "12", "8"]))], None),
    "micrometre": (space("micrometer"),
                   [("0", LEVELS[0], t(["0.04", "0.004", "0.004"], ["0.08", "0.012", "0.008"])),
                    ("1", LEVELS[1], t(["0.04", "0.008", "0.008"], ["0.08", "0.014", "0.01"]))],
                   None),
    "global": (space(), [("0", LEVELS[0], t(["1", "1", "1"], ["2", "3", "2"])),
                         ("1", LEVELS[1], t(["1", "2", "2"], ["2", "3.5", "2.5"]))],
               t(["40", "4", "4"], ["40", "8", "8"])),
    "tczyx": (TIME_CHANNEL + space(),
              [("0", LEVELS[0][None, None],
                t(["1", "1", "40", "4", "4"], ["0", "0", "40", "8", "4"])),
               ("1", LEVELS[1][None, None],
                t(["1", "1", "40", "8", "8"], ["0", "0", "40", "10", "6"]))],
              None),
    "unitless": (space(None), [("0", LEVELS[0], t(["40", "4", "4"], ["40", "8", "4"]))], None),
}
UNIT_NM = {"nanometer": Fraction(1), "micrometer": Fraction(1000)}


def numbers(values: list[Any]) -> list[Any]:
    return [float(v) for v in values]


def as_floats(transforms: Any) -> Any:
    if transforms is None:
        return None
    return [{k: numbers(v) if isinstance(v, list) else v for k, v in tr.items()}
            for tr in transforms]


def write_ome(store: Path, fmt: int, name: str) -> None:
    axes, datasets, own = IMAGES[name]
    group = zarr.open_group(store, mode="a", zarr_format=fmt).create_group(name)
    ms: dict[str, Any] = {"axes": axes, "datasets": [
        {"path": path, "coordinateTransformations": as_floats(tr)} for path, _, tr in datasets]}
    if own is not None:
        ms["coordinateTransformations"] = as_floats(own)
    if fmt == 2:
        group.attrs["multiscales"] = [{"version": "0.4", **ms}]
    else:
        group.attrs["ome"] = {"version": "0.5", "multiscales": [ms]}
    for path, data, _ in datasets:
        chunks = tuple(min(3, n) for n in data.shape)
        group.create_array(path, shape=data.shape, dtype=data.dtype, chunks=chunks)[...] = data


def plain_arrays(folder: Path) -> dict[str, np.ndarray]:
    """Arrays of many kinds in `s2.zarr` (v2) and `s3.zarr` (v3); their numpy values by path."""
    out: dict[str, np.ndarray] = {}
    v2 = zarr.open_group(folder / "s2.zarr", mode="w", zarr_format=2)
    v3 = zarr.open_group(folder / "s3.zarr", mode="w", zarr_format=3)
    shape = (7, 11, 13)
    for group, store in ((v2, "s2.zarr"), (v3, "s3.zarr")):
        dtypes = ["uint8", "int16", "uint16", "int32", "int64", "uint64", "float16", "float32",
                  "float64", "bool"] + ([">u2", ">f4", "<i4"] if store == "s2.zarr" else [])
        for dtype in dtypes:
            data = (RNG.random(shape) * 200 - (0 if dtype[-2:] in ("u1", "u2") or "uint" in dtype
                                               or dtype == "bool" else 100)).astype(dtype)
            name = "a_" + dtype.replace(">", "be_").replace("<", "le_")
            group.create_array(name, shape=shape, dtype=dtype, chunks=(3, 4, 5))[...] = data
            out[f"{store}/{name}"] = data
        sparse = np.full(shape, 9, np.uint16)
        sparse[3:6, 4:8, 5:10] = RNG.integers(0, 9, (3, 4, 5))
        group.create_array("sparse", shape=shape, dtype="uint16", chunks=(3, 4, 5),
                           fill_value=9)[3:6, 4:8, 5:10] = sparse[3:6, 4:8, 5:10]
        out[f"{store}/sparse"] = sparse
        channels = RNG.random((2, 5, 6, 7)).astype(np.float32)
        group.create_array("channels", shape=channels.shape, dtype="float32",
                           chunks=(1, 2, 4, 3))[...] = channels
        out[f"{store}/channels"] = channels
        nested = RNG.integers(0, 255, shape, dtype=np.uint8)
        group.create_array("nested", shape=shape, dtype="uint8", chunks=(3, 4, 5),
                           chunk_key_encoding={"name": "v2" if store == "s2.zarr" else "default",
                                               "separator": "/"})[...] = nested
        out[f"{store}/nested"] = nested
        dotted = RNG.integers(0, 255, shape, dtype=np.uint8)
        group.create_array("dotted", shape=shape, dtype="uint8", chunks=(3, 4, 5),
                           chunk_key_encoding={"name": "v2", "separator": "."})[...] = dotted
        out[f"{store}/dotted"] = dotted
        one = RNG.integers(0, 255, shape, dtype=np.uint8)  # one chunk bigger than the volume
        group.create_array("one_chunk", shape=shape, dtype="uint8", chunks=(8, 16, 16))[...] = one
        out[f"{store}/one_chunk"] = one
    forder = RNG.integers(-1000, 1000, shape).astype(np.int32)
    v2.create_array("forder", shape=shape, dtype="int32", chunks=(3, 4, 5), order="F")[...] = forder
    out["s2.zarr/forder"] = forder
    sharded = RNG.integers(0, 255, (8, 12, 16), dtype=np.uint8)
    v3.create_array("sharded", shape=sharded.shape, dtype="uint8", chunks=(2, 3, 4),
                    shards=(4, 6, 8))[...] = sharded
    out["s3.zarr/sharded"] = sharded
    v3_grp = v3.create_group("deep").create_group("er")
    deep = RNG.integers(0, 255, shape, dtype=np.uint8)
    v3_grp.create_array("raw", shape=shape, dtype="uint8", chunks=(3, 4, 5))[...] = deep
    out["s3.zarr/deep/er/raw"] = deep
    return out


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str, dict]]:
    folder = tmp_path_factory.mktemp("served")
    arrays = plain_arrays(folder)
    for fmt in (2, 3):
        zarr.open_group(folder / f"o{fmt}.zarr", mode="w", zarr_format=fmt)
        for name in IMAGES:
            write_ome(folder / f"o{fmt}.zarr", fmt, name)
    with serving(folder) as url:
        yield folder, url, arrays


def windows(shape: tuple[int, ...], count: int) -> list[Roi]:
    """Random boxes over the last three axes, some running past the volume's end."""
    spatial = shape[-3:]
    out = [Roi((0, 0, 0), spatial), Roi(tuple(n - 1 for n in spatial), (5, 5, 5))]
    for _ in range(count):
        begin = tuple(int(RNG.integers(0, n)) for n in spatial)
        size = tuple(int(RNG.integers(1, n + 3)) for n in spatial)
        out.append(Roi(begin, size))
    return out


def numpy_window(data: np.ndarray, roi: Roi) -> np.ndarray:
    lead = (slice(None),) * (data.ndim - 3)
    return data[lead + tuple(slice(b, b + s) for b, s in zip(roi.offset, roi.shape,
                                                               strict=True))]


# --------------------------------------------------------------------------- values


@pytest.mark.slow
def test_every_voxel_of_every_kind_of_array_reads_as_numpy(stores) -> None:
    folder, url, arrays = stores
    for path, data in arrays.items():
        volume = open_volume(f"{url}/{path}")
        assert volume.shape == data.shape, path
        assert volume.dtype == data.dtype.newbyteorder("="), path
        whole = volume.read()
        assert whole.dtype == volume.dtype and whole.flags.c_contiguous, path
        np.testing.assert_array_equal(whole, data, err_msg=path)
        for roi in windows(data.shape, 6):
            np.testing.assert_array_equal(volume.read(roi), numpy_window(data, roi),
                                          err_msg=f"{path} {roi}")
        local = open_volume(folder / path)
        assert (volume.shape, volume.dtype, volume.chunks, volume.voxel_size, volume.offset) == \
            (local.shape, local.dtype, local.chunks, local.voxel_size, local.offset), path


def test_a_pickled_remote_volume_reads_the_same_windows(stores) -> None:
    """Workers get the volume by pickle (spawn) and reopen its spec."""
    _, url, arrays = stores
    for path in ("s2.zarr/forder", "s3.zarr/sharded", "s2.zarr/a_be_u2"):
        volume = pickle.loads(pickle.dumps(open_volume(f"{url}/{path}")))
        for roi in windows(arrays[path].shape, 3):
            np.testing.assert_array_equal(volume.read(roi), numpy_window(arrays[path], roi))


# --------------------------------------------------------------------------- geometry


def reference_geometry(name: str, level: str) -> tuple[Any, tuple[int, ...], Any]:
    """(voxel size nm or None, offset in voxels, shift nm or None) of `level` of image `name`,
    from its transforms: scale and translation of the dataset, then the multiscale's."""
    axes, datasets, own = IMAGES[name]
    ndim = len(axes)
    spatial = [i for i, a in enumerate(axes) if a["type"] == "space"]
    unit = axes[spatial[0]].get("unit")

    def combine(transforms: Any) -> tuple[list[Fraction], list[Fraction]]:
        scale, shift = [Fraction(1)] * ndim, [Fraction(0)] * ndim
        for tr in transforms or ():
            if tr["type"] == "scale":
                scale = [s * Fraction(v) for s, v in zip(scale, tr["scale"], strict=True)]
                shift = [s * Fraction(v) for s, v in zip(shift, tr["scale"], strict=True)]
            else:
                shift = [s + Fraction(v) for s, v in zip(shift, tr["translation"], strict=True)]
        return scale, shift

    def volume_of(tr: Any) -> Fraction:
        scale = combine(tr)[0]
        out = Fraction(1)
        for i in spatial:
            out *= scale[i]
        return out

    finest = min(datasets, key=lambda d: volume_of(d[2]))[0]
    transforms = next(tr for path, _, tr in datasets if path == level)
    scale, translation = combine(transforms)
    g_scale, g_translation = combine(own)
    scale = [s * g for s, g in zip(scale, g_scale, strict=True)]
    translation = [tr * g + gt for tr, g, gt in zip(translation, g_scale, g_translation,
                                                   strict=True)]
    voxels = [translation[i] / scale[i] for i in spatial]
    if level == finest:
        assert all(v.denominator == 1 for v in voxels)
    offset = tuple(round(v) for v in voxels)
    nm = UNIT_NM[unit] if unit else Fraction(1)
    shift = tuple((translation[i] - o * scale[i]) * nm for i, o in zip(spatial, offset,
                                                                        strict=True))
    size = tuple(float(scale[i] * nm) for i in spatial) if unit else None
    return size, offset, None if not any(shift) or not unit else tuple(float(s) for s in shift)


@pytest.mark.parametrize("fmt", [2, 3])
def test_each_level_s_geometry_is_its_transforms(stores, fmt: int) -> None:
    folder, url, _ = stores
    for name, (axes, datasets, _own) in IMAGES.items():
        by_size = sorted(datasets, key=lambda d: d[1].size, reverse=True)
        finest = by_size[0]
        for path, data, _ in [(None, finest[1], None), *datasets]:
            where = f"o{fmt}.zarr/{name}" + (f"/{path}" if path else "")
            remote, local = open_volume(f"{url}/{where}"), open_volume(folder / where)
            voxel, offset, shift = reference_geometry(name, path or finest[0])
            expected = data[0] if axes[0]["type"] == "time" else data
            assert remote.shape == expected.shape, where
            assert remote.voxel_size == voxel, where
            assert remote.offset == offset, where
            assert remote.shift_nm == shift, where
            np.testing.assert_array_equal(remote.read(), expected, err_msg=where)
            assert (remote.voxel_size, remote.offset, remote.shift_nm, remote.chunks,
                    remote.segmentation) == (local.voxel_size, local.offset, local.shift_nm,
                                             local.chunks, local.segmentation), where
            levels = [(lv.name, lv.voxel_size, lv.path) for lv in remote.levels()]
            finest_first = sorted(datasets, key=lambda d: d[1].size, reverse=True)
            assert levels == [(p, reference_geometry(name, p)[0],
                               f"{url}/o{fmt}.zarr/{name}/{p}") for p, _, _ in finest_first]
            assert [(lv.name, lv.voxel_size) for lv in local.levels()] == \
                [(n, v) for n, v, _ in levels], where


@pytest.mark.parametrize("fmt", [2, 3])
def test_choose_level_by_name_and_by_size_over_http(stores, fmt: int) -> None:
    folder, url, _ = stores
    for level, expected in (("s1", "s1"), ("1", "s1"), ("40,8,8", "s1"), ("80,16,16", "s2"),
                            ("40,4,4", "s0"), ("s0", "s0")):
        assert choose_level(f"{url}/o{fmt}.zarr/img", level) == f"{url}/o{fmt}.zarr/img/{expected}"
        assert choose_level(folder / f"o{fmt}.zarr/img", level) == \
            f"{folder}/o{fmt}.zarr/img/{expected}"
    with pytest.raises(VolumeError) as remote:
        choose_level(f"{url}/o{fmt}.zarr/img", "7")
    with pytest.raises(VolumeError) as local:
        choose_level(str(folder / f"o{fmt}.zarr/img"), "7")
    assert str(remote.value).replace(url, "") == str(local.value).replace(str(folder), "")
    assert "s0 (40,4,4 nm), s1 (40,8,8 nm), s2 (80,16,16 nm)" in str(remote.value)


def test_an_emrun_store_reads_the_same_served(tmp_path: Path) -> None:
    """emrun's own writer: levels 0..2, an image and a segmentation (by its short name)."""
    image = RNG.integers(0, 255, (4, 32, 32), dtype=np.uint8)
    ids = (image // 64).astype(np.uint32)
    write_volume(tmp_path / "e.zarr", "image", image, voxel_size=(40, 4, 4), offset=(1, 2, 3),
                 levels=3)
    write_volume(tmp_path / "e.zarr", "seg", ids, voxel_size=(40, 4, 4), label=True, levels=2)
    with serving(tmp_path) as url:
        for path in ("e.zarr/image", "e.zarr/image/1", "e.zarr/image/2", "e.zarr/seg",
                     "e.zarr/seg/1", "e.zarr/labels/seg"):
            remote, local = open_volume(f"{url}/{path}"), open_volume(tmp_path / path)
            assert (remote.shape, remote.dtype, remote.voxel_size, remote.offset,
                    remote.shift_nm, remote.segmentation) == (
                local.shape, local.dtype, local.voxel_size, local.offset, local.shift_nm,
                local.segmentation), path
            np.testing.assert_array_equal(remote.read(), local.read(), err_msg=path)
            assert [(lv.name, lv.voxel_size) for lv in remote.levels()] == \
                [(lv.name, lv.voxel_size) for lv in local.levels()], path
        assert open_volume(f"{url}/e.zarr/image").offset == (1, 2, 3)
        np.testing.assert_array_equal(open_volume(f"{url}/e.zarr/image").read(), image)
        np.testing.assert_array_equal(open_volume(f"{url}/e.zarr/seg").read(), ids)


def test_an_unfinished_volume_is_refused_over_http_as_locally(tmp_path: Path) -> None:
    write_volume(tmp_path / "u.zarr", "image", BASE, voxel_size=(40, 4, 4), levels=1)
    group = zarr.open_group(tmp_path / "u.zarr/image", mode="r+")
    group.attrs["emrun"] = {"unfinished": "run `emrun infer ... --resume`"}
    with serving(tmp_path) as url:
        with pytest.raises(VolumeError, match=r"is unfinished: run `emrun infer"):
            open_volume(f"{url}/u.zarr/image")
        np.testing.assert_array_equal(open_volume(f"{url}/u.zarr/image", unfinished=True).read(),
                                      BASE)


# --------------------------------------------------------------------------- errors


def convert(source: str, out: Path) -> Any:
    return CliRunner().invoke(app, ["data", "convert", source, str(out), "--overwrite"])


def one_line_2(result: Any) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize("fmt", [2, 3])
def test_a_missing_level_says_so_as_the_local_open_does(stores, fmt: int) -> None:
    folder, url, _ = stores
    for inner in ("img/s9", "img/9", "img/s1/extra", "micrometre/2"):
        remote = one_line_2(convert(f"{url}/o{fmt}.zarr/{inner}", folder / "x.zarr"))
        local = one_line_2(convert(f"{folder}/o{fmt}.zarr/{inner}", folder / "x.zarr"))
        assert remote.replace(url, "B") == local.replace(str(folder), "B")
        assert "has no level" in remote and "its levels: " in remote
    assert not (folder / "x.zarr").exists()


@pytest.mark.parametrize("fmt", [2, 3])
def test_a_missing_dataset_or_404_is_one_line_exit_2(stores, fmt: int) -> None:
    folder, url, _ = stores
    for inner in ("nope", "nope/s1", "img/s1/deeper/still"):
        line = one_line_2(convert(f"{url}/o{fmt}.zarr/{inner}", folder / "x.zarr"))
        assert f"{url}/o{fmt}.zarr/{inner}" in line
    line = one_line_2(convert(f"{url}/none.zarr/raw", folder / "x.zarr"))
    assert "no zarr array or group there" in line
    line = one_line_2(convert(f"{url}/o{fmt}.zarr", folder / "x.zarr"))
    assert "name an array inside it" in line
    assert not (folder / "x.zarr").exists()


def test_a_level_the_multiscales_name_but_is_gone(tmp_path: Path) -> None:
    """The first level missing: the group does not open; a missing later level named."""
    for fmt in (2, 3):
        zarr.open_group(tmp_path / f"g{fmt}.zarr", mode="w", zarr_format=fmt)
        write_ome(tmp_path / f"g{fmt}.zarr", fmt, "img")
        for level in ("s0", "s2"):
            for item in (tmp_path / f"g{fmt}.zarr/img/{level}").iterdir():
                if item.is_file():
                    item.unlink()
                else:
                    for sub in sorted(item.rglob("*"), reverse=True):
                        sub.unlink() if sub.is_file() else sub.rmdir()
                    item.rmdir()
            (tmp_path / f"g{fmt}.zarr/img/{level}").rmdir()
    with serving(tmp_path) as url:
        for fmt in (2, 3):
            line = one_line_2(convert(f"{url}/g{fmt}.zarr/img", tmp_path / "x.zarr"))
            assert "'s0'" in line and "no such array" in line
            one_line_2(convert(f"{url}/g{fmt}.zarr/img/s2", tmp_path / "x.zarr"))
            np.testing.assert_array_equal(open_volume(f"{url}/g{fmt}.zarr/img/s1").read(),
                                          LEVELS[1])


def test_a_store_that_refuses_everything_is_one_permission_line(stores) -> None:
    folder, _, _ = stores
    with serving(folder, AllForbidden) as url:
        for path in ("o3.zarr/img", "o2.zarr/img/s1", "s3.zarr/a_uint8"):
            line = one_line_2(convert(f"{url}/{path}", folder / "x.zarr"))
            assert "permission denied (HTTP 403)" in line and f"{url}/{path}" in line
    assert not (folder / "x.zarr").exists()


def test_a_store_that_refuses_missing_keys_opens_what_is_there(stores) -> None:
    """S3 without list permission: the probed keys that are not there answer 403."""
    folder, _, arrays = stores
    with serving(folder, Refusing) as url:
        for path in ("s2.zarr/a_uint8", "s3.zarr/a_float32", "s3.zarr/deep/er/raw"):
            np.testing.assert_array_equal(open_volume(f"{url}/{path}").read(), arrays[path])
        for fmt in (2, 3):
            volume = open_volume(f"{url}/o{fmt}.zarr/img/s1")
            assert volume.voxel_size == (40.0, 8.0, 8.0) and volume.offset == (2, 2, 1)
            line = one_line_2(convert(f"{url}/o{fmt}.zarr/img/s7", folder / "x.zarr"))
            assert "has no level 's7'" in line


def test_a_sparse_array_on_a_store_that_refuses_missing_keys_says_why(stores) -> None:
    """A chunk never written (all fill value) on a store that answers 403 for missing keys
    (S3 without list permission) cannot be told from a refused one (tensorstore has no
    setting for it, and a refusal may hide data): the read says so, with what to do."""
    folder, _, arrays = stores
    with serving(folder, Refusing) as url:
        for path in ("s2.zarr/sparse", "s3.zarr/sparse"):
            with pytest.raises(VolumeError) as caught:
                open_volume(f"{url}/{path}").read()
            said = str(caught.value)
            assert "was refused (HTTP 403)" in said and "never wrote" in said, said
            assert "s3:ListBucket" in said and "\n" not in said
        served = {k: v for k, v in arrays.items() if k.endswith("sparse")}
        assert served  # the sparse arrays' written chunks still read where listed
    with serving(folder) as url:
        for path, array in served.items():
            np.testing.assert_array_equal(open_volume(f"{url}/{path}").read(), array)


# --------------------------------------------------------------------------- the CLI


def written(store: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Every zarr.json of a store (less where it came from and the pyramid's stamps) and
    every array's values."""
    meta: dict[str, Any] = {}
    values: dict[str, np.ndarray] = {}
    for path in sorted(store.rglob("zarr.json")):
        doc = json.loads(path.read_text())
        attrs = doc.get("attributes", {})
        attrs.pop("emrun-pyramid", None)
        if isinstance(attrs.get("emrun"), dict):
            attrs["emrun"].pop("converted_from", None)
        key = str(path.parent.relative_to(store))
        meta[key] = doc
        if doc.get("node_type") == "array":
            values[key] = np.asarray(zarr.open_array(path.parent, mode="r")[...])
    return meta, values


@pytest.mark.parametrize("inner", ["o2.zarr/img", "o3.zarr/img/s1", "o3.zarr/tczyx/1",
                                   "o2.zarr/global/1", "o3.zarr/micrometre",
                                   "s2.zarr/a_be_u2", "s3.zarr/channels"])
def test_data_convert_of_a_url_writes_and_prints_what_the_local_store_gives(
        stores, tmp_path: Path, inner: str) -> None:
    folder, url, _ = stores
    remote = convert(f"{url}/{inner}", tmp_path / "r.zarr")
    local = convert(f"{folder}/{inner}", tmp_path / "l.zarr")
    assert remote.exit_code == 0 and local.exit_code == 0, remote.output + local.output
    assert remote.stdout.replace(str(tmp_path / "r.zarr"), "OUT") == \
        local.stdout.replace(str(tmp_path / "l.zarr"), "OUT")
    (r_meta, r_values), (l_meta, l_values) = written(tmp_path / "r.zarr"), \
        written(tmp_path / "l.zarr")
    assert r_meta == l_meta
    assert r_values.keys() == l_values.keys()
    for key in r_values:
        np.testing.assert_array_equal(r_values[key], l_values[key], err_msg=key)


# --------------------------------------------------------------------------- found


def test_an_emrun_store_root_is_refused_over_http_as_locally(tmp_path: Path) -> None:
    write_volume(tmp_path / "e.zarr", "image", BASE, voxel_size=(40, 4, 4), levels=2)
    with pytest.raises(VolumeError, match="name an array inside it"):
        open_volume(tmp_path / "e.zarr")
    with serving(tmp_path) as url, pytest.raises(VolumeError, match="name an array inside it"):
        open_volume(f"{url}/e.zarr")


def test_a_remote_volume_s_container_attributes_are_its_store_root_s(tmp_path: Path) -> None:
    write_volume(tmp_path / "p.zarr", "affinity", RNG.random((3, 4, 8, 8)).astype(np.float32),
                 voxel_size=(40, 4, 4), channel_axis=True, levels=1)
    root = zarr.open_group(tmp_path / "p.zarr", mode="r+")
    root.attrs["emrun"] = {"recipe": {"name": "r", "segment": {"type": "waterz"}}}
    local = open_volume(tmp_path / "p.zarr/affinity")
    assert local.container_attributes()["emrun"]["recipe"]["segment"] == {"type": "waterz"}
    with serving(tmp_path) as url:
        remote = open_volume(f"{url}/p.zarr/affinity")
        assert remote.container_attributes() == local.container_attributes()


def test_a_refused_missing_node_names_only_its_own_keys(tmp_path: Path) -> None:
    """`g/x` under a plain v2 group on a store that answers 403 for missing keys: the
    refusal lists the keys of `g/x` alone (it listed the labels' and the group's v3 keys
    too, and said no other key answered while `g/.zgroup` had)."""
    root = zarr.open_group(tmp_path / "p.zarr", mode="w", zarr_format=2)
    root.create_group("g")
    with serving(tmp_path, Refusing) as url, pytest.raises(VolumeError) as caught:
        open_volume(f"{url}/p.zarr/g/x")
    said = str(caught.value)
    assert "permission denied (HTTP 403) reading g/x/zarr.json" in said, said
    assert "labels/" not in said and "g/zarr.json" not in said.replace("g/x/zarr.json", "")
