"""N5, neuroglancer precomputed and remote stores (over a local HTTP server), through
tensorstore: values, axes, voxel size, offset, levels, end to end, and the bad inputs."""

from __future__ import annotations

import functools
import http.server
import pickle
import socket
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from emrun.cli import app
from emrun.geometry import Roi
from emrun.io import VolumeError, choose_level, forks_safely, open_volume

RNG = np.random.default_rng(0)
IMAGE = RNG.integers(0, 255, (6, 10, 14), dtype=np.uint8)  # z, y, x


def tensorstore():
    return pytest.importorskip("tensorstore")


def write_n5(folder: Path, data: np.ndarray, attrs: dict) -> None:
    """An N5 dataset written by tensorstore (dimensions x, y, z), with extra attributes."""
    import json

    ts = tensorstore()
    store = ts.open({"driver": "n5", "kvstore": {"driver": "file", "path": str(folder)},
                     "metadata": {"dimensions": list(data.shape[::-1]), "blockSize": [8, 4, 4],
                                  "dataType": str(data.dtype), "compression": {"type": "gzip"}},
                     "create": True}).result()
    store[...] = data.T
    path = folder / "attributes.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **attrs}))


def write_precomputed(folder: Path, levels: list[np.ndarray], channels: int = 1,
                      kind: str = "image") -> None:
    """A precomputed volume (`kind` image or segmentation) written by tensorstore: one scale
    per array (z, y, x, or c, z, y, x with channels), resolutions 4,4,40 then 8,8,40 nm
    (x, y, z), offset 3,2,1 voxels."""
    ts = tensorstore()
    for i, data in enumerate(levels):
        resolution = [4 * 2**i, 4 * 2**i, 40]
        store = ts.open({
            "driver": "neuroglancer_precomputed",
            "kvstore": {"driver": "file", "path": str(folder)},
            "multiscale_metadata": {"type": kind, "data_type": str(data.dtype),
                                    "num_channels": channels},
            "scale_metadata": {"size": list(data.shape[-3:][::-1]), "resolution": resolution,
                               "voxel_offset": [3, 2, 1], "chunk_size": [8, 8, 4],
                               "encoding": "raw"},
            "create": True}).result()
        xyzc = data.T if channels > 1 else data.T[..., None]
        store[ts.d[:].translate_to[0]][...] = xyzc


def two_levels(tmp_path: Path) -> Path:
    write_precomputed(tmp_path / "pc", [IMAGE, IMAGE[:, ::2, ::2].copy()])
    return tmp_path / "pc"


@contextmanager
def served(folder: Path) -> Iterator[str]:
    """A local HTTP server on `folder` in a thread; yields its base URL."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    with serving(functools.partial(Quiet, directory=str(folder))) as url:
        yield url


class QueuedServer(http.server.ThreadingHTTPServer):
    """tensorstore reads chunks in parallel: the default listen queue of 5 dropped
    connections, and each read waited about a second for its retry."""

    request_queue_size = 256


@contextmanager
def serving(handler: Any) -> Iterator[str]:
    """A local HTTP server with request ``handler`` in a thread; yields its base URL."""
    server = QueuedServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_n5_reads_in_zyx_with_its_resolution_and_offset(tmp_path):
    write_n5(tmp_path / "vol.n5/raw", IMAGE,
             {"resolution": [4, 6, 40], "offset": [40, 60, 400], "note": "kept"})
    vol = open_volume(tmp_path / "vol.n5/raw")
    assert vol.shape == (6, 10, 14) and vol.dtype == np.uint8
    assert vol.voxel_size == (40.0, 6.0, 4.0) and vol.offset == (10, 10, 10)
    assert vol.chunks == (4, 4, 8) and vol.attributes()["note"] == "kept"
    np.testing.assert_array_equal(vol.read(), IMAGE)
    box = Roi((1, 2, 3), (4, 5, 6))
    again = pickle.loads(pickle.dumps(vol))  # as into a worker process: no open handle
    np.testing.assert_array_equal(again.read(box), IMAGE[1:5, 2:7, 3:9])
    write_n5(tmp_path / "vol.n5/um", IMAGE,
             {"pixelResolution": {"dimensions": [0.004, 0.004, 0.04], "unit": "um"}})
    assert open_volume(tmp_path / "vol.n5/um").voxel_size == (40.0, 4.0, 4.0)
    with pytest.raises(VolumeError, match=r"no dataset 'nope'; datasets: raw, um"):
        open_volume(tmp_path / "vol.n5/nope")
    with pytest.raises(VolumeError, match="name a dataset"):
        open_volume(tmp_path / "vol.n5")
    with pytest.raises(VolumeError, match="no such folder"):
        open_volume(tmp_path / "missing.n5/raw")


def test_precomputed_scales_are_levels(tmp_path):
    root = two_levels(tmp_path)
    vol = open_volume(root)
    assert vol.shape == (6, 10, 14) and vol.voxel_size == (40.0, 4.0, 4.0)
    assert vol.offset == (1, 2, 3) and vol.chunks == (4, 8, 8)
    np.testing.assert_array_equal(vol.read(), IMAGE)
    assert [(lv.name, lv.voxel_size) for lv in vol.levels()] == [
        ("4_4_40", (40.0, 4.0, 4.0)), ("8_8_40", (40.0, 8.0, 8.0))]
    coarse = open_volume(choose_level(root, "40,8,8"))
    assert str(coarse) == f"{root}/8_8_40" and coarse.shape == (6, 5, 7)
    np.testing.assert_array_equal(coarse.read(), IMAGE[:, ::2, ::2])
    prefixed = open_volume(f"precomputed://{root}/8_8_40")
    np.testing.assert_array_equal(prefixed.read(Roi((0, 1, 1), (2, 2, 2))),
                                  IMAGE[0:2, 2:6:2, 2:6:2])
    with pytest.raises(VolumeError, match=r"no level s9; levels: 4_4_40 .*8_8_40"):
        choose_level(root, "s9")
    with pytest.raises(VolumeError, match=r"has no scale '1_1_1'; scales: 4_4_40, 8_8_40"):
        open_volume(f"{root}/1_1_1")  # was "no such file or directory"
    (root / "info").write_text('{"scales": [')  # cut short
    with pytest.raises(VolumeError, match=r"its info file is not a neuroglancer precomputed"):
        open_volume(root)  # was "neither a zarr store nor a folder of TIFF sections"


def test_a_precomputed_segmentation_says_so(tmp_path):
    assert not open_volume(two_levels(tmp_path)).segmentation
    write_precomputed(tmp_path / "seg", [(IMAGE // 50).astype(np.uint32)], kind="segmentation")
    assert open_volume(tmp_path / "seg").segmentation


def test_precomputed_channels_come_first(tmp_path):
    data = RNG.random((2, 4, 6, 8)).astype(np.float32)
    write_precomputed(tmp_path / "affs", [data], channels=2)
    vol = open_volume(tmp_path / "affs")
    assert vol.shape == (2, 4, 6, 8)
    np.testing.assert_array_equal(vol.read(Roi((1, 1, 1), (2, 3, 4))), data[:, 1:3, 1:4, 1:5])


def test_remote_reads_over_http(tmp_path):
    two_levels(tmp_path)
    write_n5(tmp_path / "vol.n5/raw", IMAGE, {"resolution": [4, 4, 40]})
    root = zarr.open_group(tmp_path / "ome.zarr", mode="w")  # an OME-Zarr 0.5 image, zarr v3
    image = root.create_group("image")
    axes = [{"name": a, "type": "space", "unit": "nanometer"} for a in "zyx"]
    image.attrs["ome"] = {"version": "0.5", "multiscales": [{"axes": axes, "datasets": [
        {"path": p, "coordinateTransformations": [{"type": "scale", "scale": s},
                                                  {"type": "translation", "translation": t}]}
        for p, s, t in (("s0", [40, 4, 4], [40, 8, 4]), ("s1", [40, 8, 8], [40, 8, 8]))]}]}
    image.create_array("s0", shape=IMAGE.shape, dtype="uint8", chunks=(3, 5, 7))[...] = IMAGE
    image.create_array("s1", shape=(6, 5, 7), dtype="uint8")[...] = IMAGE[:, ::2, ::2]
    v2 = zarr.open_group(tmp_path / "v2.zarr", mode="w", zarr_format=2)
    v2.create_array("raw", shape=IMAGE.shape, dtype="uint8")[...] = IMAGE
    v2["raw"].attrs.update({"resolution": [40, 4, 4], "offset": [80, 8, 4]})
    with served(tmp_path) as url:
        pc = open_volume(f"{url}/pc")
        assert pc.voxel_size == (40.0, 4.0, 4.0) and pc.offset == (1, 2, 3)
        np.testing.assert_array_equal(pc.read(), IMAGE)
        np.testing.assert_array_equal(open_volume(f"{url}/pc/8_8_40").read(), IMAGE[:, ::2, ::2])
        n5 = open_volume(f"{url}/vol.n5/raw")
        assert n5.voxel_size == (40.0, 4.0, 4.0)
        np.testing.assert_array_equal(n5.read(), IMAGE)
        ome = open_volume(f"{url}/ome.zarr/image")
        assert ome.voxel_size == (40.0, 4.0, 4.0) and ome.offset == (1, 2, 1)
        assert ome.chunks == (3, 5, 7)
        np.testing.assert_array_equal(pickle.loads(pickle.dumps(ome)).read(), IMAGE)
        level = choose_level(f"{url}/ome.zarr/image", "s1")
        assert level == f"{url}/ome.zarr/image/s1"
        coarse = open_volume(level)
        assert coarse.voxel_size == (40.0, 8.0, 8.0) and coarse.offset == (1, 1, 1)
        np.testing.assert_array_equal(coarse.read(), IMAGE[:, ::2, ::2])
        plain = open_volume(f"{url}/v2.zarr/raw")
        assert plain.voxel_size == (40.0, 4.0, 4.0) and plain.offset == (2, 2, 1)
        np.testing.assert_array_equal(plain.read(), IMAGE)
        with pytest.raises(VolumeError, match="no zarr array or group there"):
            open_volume(f"{url}/ome.zarr/nope")
        with pytest.raises(VolumeError, match="no info file"):
            open_volume(f"{url}/nothing/here")
        with pytest.raises(VolumeError, match="no N5 dataset there"):
            open_volume(f"{url}/vol.n5/nope")


def test_infer_and_evaluate_read_a_served_precomputed_volume(tmp_path):
    """`emrun infer` predicts a scale of a precomputed volume read over HTTP (in spawned
    workers) exactly as the same image read from local zarr."""
    import yaml
    from test_infer import make_inputs, read, reference

    recipe, model, volume, tmp = make_inputs(tmp_path, shape=(6, 20, 24))
    write_precomputed(tmp / "pc", [np.zeros((6, 40, 48), np.uint8), volume])
    (tmp / "r.yaml").write_text(yaml.safe_dump(recipe.resolved()))
    runner = CliRunner()
    with served(tmp) as url:
        result = runner.invoke(app, ["infer", "--recipe", str(tmp / "r.yaml"), "--checkpoint",
                                     str(tmp / "c.pt"), "--input", f"{url}/pc", "--level",
                                     "40,8,8", "--output", str(tmp / "pred.zarr"),
                                     "--workers", "1"])
        assert result.exit_code == 0, result.output
        np.testing.assert_allclose(read(tmp / "pred.zarr"), reference(recipe, model, volume),
                                   atol=1e-5, rtol=0)
        assert open_volume(tmp / "pred.zarr/aff").voxel_size == (40.0, 8.0, 8.0)
        labels = (volume // 64).astype(np.uint32)
        write_precomputed(tmp / "labels", [labels])
        scored = runner.invoke(app, ["evaluate", f"{url}/labels", f"{url}/labels", "--json"])
        assert scored.exit_code == 0, scored.output
        assert '"arand": 0.0' in scored.stdout


def test_a_url_that_does_not_answer_is_one_line_exit_2(tmp_path):
    tensorstore()
    runner = CliRunner()
    port = closed_port()
    for url in (f"http://127.0.0.1:{port}/vol.zarr/image", f"http://127.0.0.1:{port}/pc",
                f"precomputed://http://127.0.0.1:{port}/pc", f"http://127.0.0.1:{port}/v.n5/a"):
        result = runner.invoke(app, ["data", "convert", url, str(tmp_path / "out.zarr")])
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output and f"127.0.0.1:{port}" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert "connect" in result.stderr.lower()
    assert not (tmp_path / "out.zarr").exists()


def test_without_the_extra_these_formats_name_it(tmp_path, monkeypatch):
    (tmp_path / "vol.n5").mkdir()
    (tmp_path / "pc").mkdir()
    (tmp_path / "pc/info").write_text('{"scales": [{"key": "s0"}]}')
    monkeypatch.setitem(sys.modules, "tensorstore", None)  # import tensorstore fails
    runner = CliRunner()
    for path in (f"{tmp_path}/vol.n5/raw", f"{tmp_path}/pc", "gs://bucket/vol.zarr/image",
                 "s3://bucket/vol", "https://example.org/vol.n5/raw"):
        with pytest.raises(VolumeError, match=r'pip install "emrun\[remote\]"'):
            open_volume(path)
        result = runner.invoke(app, ["data", "convert", path, str(tmp_path / "o.zarr")])
        assert result.exit_code == 2 and 'pip install "emrun[remote]"' in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_tensorstore_volumes_go_to_spawned_loader_workers(tmp_path, monkeypatch):
    """tensorstore aborts a forked process: the training loader spawns for its volumes."""
    from emrun.data import loader
    from emrun.recipe import Recipe

    write_precomputed(tmp_path / "pc", [IMAGE])
    assert not forks_safely(tmp_path / "pc") and not forks_safely("gs://b/v.zarr/image")
    assert not forks_safely(tmp_path / "vol.n5/raw") and forks_safely(tmp_path / "v.zarr/a")
    seen = {}
    monkeypatch.setattr(loader, "DataLoader", lambda *a, **kw: seen.update(kw) or [])
    for image, context in ((str(tmp_path / "pc"), "spawn"), ("v.zarr/image", None)):
        recipe = Recipe.model_validate({
            "name": "r", "data": {"sources": {"a": {"image": image, "labels": image}}},
            "model": {"type": "rsunet", "widths": [4, 8]},
            "tasks": {"aff": {"target": {"type": "affinity"}}},
            "train": {"patch": [4, 16, 16], "iterations": 1, "workers": 2}})
        list(loader.train_batches(recipe))
        assert seen["multiprocessing_context"] == context
