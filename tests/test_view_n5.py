"""`emrun view` of N5: served as neuroglancer's `n5://` source (a pyramid group as one layer
with its levels), with the voxel size and offset emrun reads, and no shift added for a
coarser level (neuroglancer places levels by their factors itself)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import n5_writing
import numpy as np
import pytest
from n5_writing import n5_attrs, n5_dataset

from emrun.errors import UserError
from emrun.io import write_volume
from emrun.view import view

CLIENT = "https://neuroglancer.example.org/"
IMAGE = np.random.default_rng(7).integers(0, 255, (8, 16, 16), dtype=np.uint8)  # z, y, x
LEVELS = (IMAGE, IMAGE[:, ::2, ::2].copy(), IMAGE[::2, ::4, ::4].copy())
FACTORS = ([1, 1, 1], [2, 2, 1], [4, 4, 2])  # x, y, z


def n5_viewer(tmp_path: Path) -> Path:
    """n5-viewer's layout: each level its factors and pixelResolution, the group nothing."""
    return n5_writing.n5_viewer(tmp_path, LEVELS, FACTORS)


def get(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), b""


def dims(layer: dict) -> dict[str, list]:
    return layer["source"]["transform"]["outputDimensions"]


def test_an_n5_pyramid_is_one_n5_layer_served_with_its_levels(tmp_path: Path) -> None:
    """It was refused ('serves OME-Zarr volumes'); neuroglancer needs the group's factor
    list (it lists the folder otherwise, which the server refuses) and the voxel size, which
    an n5-viewer group keeps on its levels only, where neuroglancer does not look."""
    group = n5_viewer(tmp_path)
    shown = view([str(group)], client=CLIENT)
    try:
        (layer,) = shown.state["layers"]
        assert layer["name"] == "viewer_setup0" and layer["type"] == "image"
        url = f"{shown.server.url}/0/setup0/timepoint0"
        assert layer["source"]["url"] == f"n5://{url}"
        assert list(dims(layer).items()) == [("x", [pytest.approx(4e-9), "m"]),
                                             ("y", [pytest.approx(4e-9), "m"]),
                                             ("z", [pytest.approx(30e-9), "m"])]
        # half a voxel back: neuroglancer centres the OME-Zarr voxels this lines up with
        assert layer["source"]["transform"]["matrix"] == [
            [1, 0, 0, -0.5], [0, 1, 0, -0.5], [0, 0, 1, -0.5]]
        status, headers, body = get(f"{url}/attributes.json")
        assert status == 200 and headers["Access-Control-Allow-Origin"] == "*"
        assert json.loads(body)["scales"] == list(FACTORS)
        status, _, body = get(f"{url}/s1/attributes.json")
        assert status == 200 and json.loads(body)["dimensions"] == [8, 8, 8]
        chunk = group / "s2" / "0" / "0" / "0"
        assert get(f"{url}/s2/0/0/0")[2] == chunk.read_bytes()
        assert get(f"{shown.server.url}/0/setup0/")[0] == 404  # still no listings
    finally:
        shown.close()


def test_a_coarser_level_named_shows_the_group_without_a_second_shift(tmp_path: Path) -> None:
    """s1 lies half a level-0 voxel per factor past s0 (emrun's shift_nm), which is where
    neuroglancer puts it by its factors alone: its layer is the group's, nothing added."""
    group = n5_viewer(tmp_path)
    shown = view([str(group), f"{group}/s1", f"{group}/s2"], client=CLIENT)
    try:
        whole, *coarse = shown.state["layers"]
        assert [layer["name"] for layer in shown.state["layers"]] == [
            "viewer_setup0", "viewer_setup0_2", "viewer_setup0_3"]
        for layer in coarse:
            assert layer["source"] == whole["source"]
    finally:
        shown.close()


def test_a_bigdataviewer_export_shows_at_its_xml_voxel_size(tmp_path: Path) -> None:
    container = tmp_path / "dataset.n5"
    group = container / "setup0" / "timepoint0"
    for index, data in enumerate(LEVELS):
        n5_dataset(group / f"s{index}", data)
    n5_attrs(container / "setup0", downsamplingFactors=list(FACTORS), dataType="uint8")
    (tmp_path / "dataset.xml").write_text(
        '<SpimData version="0.2"><BasePath type="relative">.</BasePath><SequenceDescription>'
        '<ImageLoader format="bdv.n5" version="1.0"><n5 type="relative">dataset.n5</n5>'
        "</ImageLoader><ViewSetups><ViewSetup><id>0</id><voxelSize><unit>µm</unit>"
        "<size>0.006 0.006 0.04</size></voxelSize></ViewSetup></ViewSetups>"
        "</SequenceDescription></SpimData>", encoding="utf-8")
    shown = view([str(group)], client=CLIENT)
    try:
        (layer,) = shown.state["layers"]
        assert [dims(layer)[a][0] for a in "xyz"] == pytest.approx([6e-9, 6e-9, 40e-9])
        assert layer["name"] == "dataset_setup0"
        served = json.loads(get(f"{shown.server.url}/0/setup0/timepoint0/attributes.json")[2])
        assert served == {"scales": list(FACTORS)}
    finally:
        shown.close()


def test_an_n5_dataset_keeps_its_offset_and_int64_labels_read_as_uint64(
        tmp_path: Path) -> None:
    """neuroglancer reads no `offset` from N5 (the layer lay at 0) and no int64 (a layer
    that never loads): the transform moves it, the metadata says uint64."""
    labels = (np.arange(8 * 16 * 16, dtype=np.int64).reshape(8, 16, 16) // 50)
    folder = tmp_path / "seg.n5" / "volumes" / "labels"
    n5_dataset(folder, labels, resolution=[4, 4, 30], offset=[40, 80, 300])  # x, y, z nm
    shown = view([str(folder)], client=CLIENT)
    try:
        (layer,) = shown.state["layers"]
        assert layer["type"] == "segmentation" and layer["name"] == "labels"
        assert layer["source"]["url"] == f"n5://{shown.server.url}/0/volumes/labels"
        assert layer["source"]["transform"]["matrix"] == [
            [1, 0, 0, 9.5], [0, 1, 0, 19.5], [0, 0, 1, 9.5]]  # voxels, x, y, z, centred
        meta = json.loads(get(f"{shown.server.url}/0/volumes/labels/attributes.json")[2])
        assert meta["dataType"] == "uint64" and meta["offset"] == [40, 80, 300]
    finally:
        shown.close()


@pytest.mark.parametrize(("block", "kind", "channel"), [([8, 8, 4, 3], "channels", "c^"),
                                                        ([8, 8, 4, 1], "image", "c'")])
def test_an_n5_channel_volume_shows_its_channels_as_they_are_chunked(
        tmp_path: Path, block: list[int], kind: str, channel: str) -> None:
    """N5's channel axis is its last (emrun's first): it is named after x, y, z; read by the
    shader only where one chunk holds every channel, else shown one at a time."""
    affs = np.random.default_rng(1).integers(0, 255, (3, 8, 16, 16), dtype=np.uint8)
    folder = tmp_path / "pred.n5" / "affs"
    n5_dataset(folder, affs, block=block, resolution=[6, 6, 40])
    shown = view([str(folder)], client=CLIENT)
    try:
        assert shown.layers[0].kind == kind
        (layer,) = shown.state["layers"]
        assert list(dims(layer)) == ["x", "y", "z", channel]
        assert ("shader" in layer) == (kind == "channels")
    finally:
        shown.close()


def test_the_neuroglancer_package_takes_the_n5_state(tmp_path: Path) -> None:
    neuroglancer = pytest.importorskip("neuroglancer")
    folder = tmp_path / "seg.n5" / "labels"
    n5_dataset(folder, IMAGE.astype(np.uint32), resolution=[4, 4, 30], offset=[4, 8, 30])
    write_volume(tmp_path / "vol.zarr", "image", IMAGE, voxel_size=(30, 4, 4))
    shown = view([str(folder), str(tmp_path / "vol.zarr/image")], client=CLIENT)
    try:
        state = neuroglancer.ViewerState(shown.state)
        source = state.layers["labels"].source[0]
        assert source.url.startswith("n5://") and list(
            source.transform.output_dimensions.names) == ["x", "y", "z"]
        assert shown.state["layers"][1]["source"].startswith(f"zarr://{shown.server.url}/1/")
    finally:
        shown.close()


@pytest.mark.parametrize(("data", "codec", "message"), [
    (IMAGE, "bzip2", "compressed with bzip2, which neuroglancer does not decode"),
    (IMAGE.astype(np.float64), "raw", "neuroglancer reads float32, not float64"),
])
def test_what_neuroglancer_cannot_read_from_n5_is_refused(
        tmp_path: Path, data: np.ndarray, codec: str, message: str) -> None:
    folder = tmp_path / "x.n5" / "raw"
    n5_dataset(folder, data, codec=codec)
    with pytest.raises(UserError, match=message):
        view([str(folder)], client=CLIENT)
