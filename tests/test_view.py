"""`emrun view`: the volumes are served over HTTP as neuroglancer reads them (metadata, chunks,
CORS, 404 for what is absent, nothing outside the stores), and the state names the layers."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from emrun.errors import UserError
from emrun.io import write_volume
from emrun.view import view

CLIENT = "https://neuroglancer.example.org/"


@pytest.fixture
def volumes(tmp_path: Path) -> list[str]:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (8, 32, 32), dtype=np.uint8)
    write_volume(tmp_path / "vol.zarr", "image", image, voxel_size=(30, 6, 6))
    affs = rng.integers(0, 255, (3, 8, 32, 32), dtype=np.uint8)
    write_volume(tmp_path / "pred.zarr", "affinity", affs, voxel_size=(30, 6, 6),
                 channel_axis=True, chunks=(3, 8, 16, 16),
                 attrs={"offsets": [[-1, 0, 0], [0, -1, 0], [0, 0, -1]]})
    seg = np.arange(8 * 32 * 32, dtype=np.uint64).reshape(8, 32, 32) // 100
    write_volume(tmp_path / "seg.zarr", "segmentation", seg, voxel_size=(30, 6, 6))
    return [str(tmp_path / "vol.zarr/image"), str(tmp_path / "pred.zarr/affinity"),
            str(tmp_path / "seg.zarr/segmentation")]


def get(url: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), b""


def test_the_state_names_a_layer_per_volume_of_the_right_kind(volumes, tmp_path):
    mito = np.zeros((8, 32, 32), np.uint8)  # a uint8 OME label: ids, not intensities
    mito[2:5, 4:9, 4:9] = 1
    write_volume(tmp_path / "vol.zarr", "mito", mito, label=True)
    shown = view([*volumes, str(tmp_path / "vol.zarr/mito")], client=CLIENT)
    try:
        assert [(layer.name, layer.kind) for layer in shown.layers] == [
            ("image", "image"), ("affinity", "channels"), ("segmentation", "segmentation"),
            ("mito", "segmentation")]
        layers = {layer["name"]: layer for layer in shown.state["layers"]}
        assert [layers[n]["type"] for n in ("image", "affinity", "segmentation")] == [
            "image", "image", "segmentation"]
        affinity = layers["affinity"]
        assert "getDataValue(2)" in affinity["shader"]
        dims = affinity["source"]["transform"]["outputDimensions"]
        assert dims["c^"] == [1, ""] and dims["z"] == [pytest.approx(30e-9), "m"]
        assert affinity["source"]["url"] == f"zarr://{shown.server.url}/1/affinity"
        assert layers["image"]["source"] == f"zarr://{shown.server.url}/0/image"
        # a segmentation is an OME label of its store; its old path still finds it
        assert layers["segmentation"]["source"] == \
            f"zarr://{shown.server.url}/2/labels/segmentation"
        prefix = CLIENT.rstrip("/") + "/#!"
        assert shown.link.startswith(prefix)
        assert json.loads(urllib.parse.unquote(shown.link[len(prefix):])) == shown.state
    finally:
        shown.close()


def test_the_server_answers_the_reads_neuroglancer_makes(volumes, tmp_path):
    shown = view(volumes, client=CLIENT)
    try:
        base = shown.state["layers"][1]["source"]["url"].removeprefix("zarr://")
        status, headers, body = get(f"{base}/zarr.json")
        assert status == 200 and headers["Access-Control-Allow-Origin"] == "*"
        assert json.loads(body)["attributes"]["ome"]["multiscales"][0]["datasets"][0]["path"]
        store = tmp_path / "pred.zarr"
        chunk = next(p for p in (store / "affinity").rglob("*")
                     if p.is_file() and p.name != "zarr.json")
        key = chunk.relative_to(store).as_posix()
        status, _, body = get(f"{shown.server.url}/1/{key}")
        assert status == 200 and body == chunk.read_bytes()
        assert get(f"{base}/0/c/9/9/9/9")[0] == 404  # an absent chunk: the fill value
        status, headers, _ = get(f"{base}/zarr.json", method="OPTIONS")
        assert status == 204 and "GET" in headers["Access-Control-Allow-Methods"]
        assert get(f"{shown.server.url}/1/")[0] == 404  # no listings
        assert get(f"{shown.server.url}/1/%2e%2e/vol.zarr/zarr.json")[0] == 404
        assert get(f"{shown.server.url}/7/zarr.json")[0] == 404
    finally:
        shown.close()


def test_the_neuroglancer_package_serves_the_client(volumes):
    neuroglancer = pytest.importorskip("neuroglancer")
    shown = view(volumes)
    try:
        assert isinstance(shown.viewer, neuroglancer.Viewer)
        assert [layer.name for layer in shown.viewer.state.layers] == [
            "image", "affinity", "segmentation"]
        status, _, page = get(shown.link)
        assert status == 200 and b"<html" in page.lower()
    finally:
        shown.close()


def test_two_volumes_of_one_name_get_two_layers(volumes):
    shown = view([volumes[0], volumes[0] + "/0"], client=CLIENT)  # a group, a level of it
    try:
        assert [layer.name for layer in shown.layers] == ["image", "image_2"]
        assert {layer["source"].rpartition("/")[2] for layer in shown.state["layers"]} == {
            "image"}  # neuroglancer opens the image group, with its levels and voxel size
    finally:
        shown.close()


def test_volumes_without_ome_metadata_are_refused(tmp_path):
    import tifffile
    import zarr

    tifffile.imwrite(tmp_path / "stack.tif", np.zeros((4, 8, 8), np.uint8),
                     photometric="minisblack")
    with pytest.raises(UserError, match="serves OME-Zarr volumes"):
        view([str(tmp_path / "stack.tif")], client=CLIENT)
    zarr.create_array(tmp_path / "plain.zarr", shape=(4, 8, 8), dtype="uint8")
    with pytest.raises(UserError, match="not an OME-Zarr image group"):
        view([str(tmp_path / "plain.zarr")], client=CLIENT)


@pytest.mark.parametrize("client", ["not a url", "javascript:alert(1)", "file:///tmp/x"])
def test_a_client_that_is_no_web_address_is_refused(volumes, client):
    """Anything was accepted and made a link no browser opens."""
    with pytest.raises(UserError, match="give the http\\(s\\) URL of a neuroglancer client"):
        view(volumes, client=client)


def test_the_command_serves_until_stopped_and_names_an_unfinished_volume(volumes, tmp_path):
    import zarr

    from emrun.io.completion import unfinished

    group = zarr.open_group(str(tmp_path / "pred.zarr/affinity"), mode="r+")
    group.attrs["emrun"] = unfinished("emrun infer ... --resume finishes it")
    process = subprocess.Popen([sys.executable, "-m", "emrun", "view", *volumes,
                                "--client", CLIENT, "--json"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        while not line.startswith("{"):
            line = process.stdout.readline()
            assert line, process.stderr.read()
        started = json.loads(line)
        assert [layer["name"] for layer in started["state"]["layers"]] == [
            "image", "affinity", "segmentation"]
        assert get(f"{started['data']}/2/labels/segmentation/zarr.json")[0] == 200
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0 and "stopped serving" in stderr
    warned = [line for line in stderr.splitlines() if "unfinished" in line]
    assert warned == ["warning: affinity is unfinished (its blocks not yet written read as "
                      "zeros): emrun infer ... --resume finishes it"]


def test_a_path_that_is_not_a_volume_is_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "emrun", "view", str(tmp_path / "no.zarr"),
                           "--client", CLIENT], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "no such file" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_coarser_level_named_shows_the_group_at_its_finest_scale(tmp_path):
    """neuroglancer serves the whole image group at its finest level's scale; the channel
    layer's dimensions took the named level's (12 nm), drawing it twice too large."""
    affs = np.random.default_rng(0).integers(0, 255, (3, 8, 32, 32), dtype=np.uint8)
    write_volume(tmp_path / "pred.zarr", "affinity", affs, voxel_size=(30, 6, 6),
                 channel_axis=True, levels=2)
    shown = view([str(tmp_path / "pred.zarr/affinity/1")], client=CLIENT)
    try:
        (layer,) = shown.state["layers"]
        dims = layer["source"]["transform"]["outputDimensions"]
        assert [dims[a][0] for a in "zyx"] == [pytest.approx(v * 1e-9) for v in (30, 6, 6)]
        assert layer["source"]["url"] == f"zarr://{shown.server.url}/0/affinity"
    finally:
        shown.close()
