"""Reference probe of `emrun view` (the neuroglancer state it builds, the files its server
hands neuroglancer) and of `emrun demo` (its metrics.json, test volume and figure).

References: the geometry read here from the zarr attributes with the zarr package; where
neuroglancer places a voxel, from its own sources (the client the `neuroglancer` package
serves, src/datasource/zarr/ome.ts and n5/frontend.ts): an OME-Zarr translation is the
*centre* of voxel 0 (ome.ts moves every axis, t included, by half a voxel: voxel k of an axis
of scale s and translation T covers [T/s - 0.5 + k, T/s + 0.5 + k) in steps of s), an N5
voxel k covers [k, k + 1) and a source transform's matrix moves that; neuroglancer reads
zarr (v2 and v3) of uint8, int8, uint16, int16, uint32, int32, uint64 and float32 only.
The demo's scores are recomputed from its written segmentation and truth with brute-force
pair counting and entropies.
"""

from __future__ import annotations

import json
import math
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import zarr

from emrun.errors import UserError
from emrun.io import write_volume
from emrun.view import layer_for, neuroglancer_state, view

CLIENT = "https://neuroglancer.example.org/"
NM = {"nanometer": 1.0, "micrometer": 1000.0, "angstrom": 0.1}
NEUROGLANCER_ZARR_TYPES = {"uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64",
                           "float32"}
OFFSETS = [[-1, 0, 0], [0, -1, 0], [0, 0, -1]]


# --------------------------------------------------------------------------- references

def ome_reference(group_path: Path) -> dict:
    """The finest level's spatial scale and translation (nm, z, y, x) and the t axis, read
    here from the OME attributes (0.5 under "ome", 0.4 at the top), multiscale-wide
    transforms applied after the dataset's own."""
    attrs = dict(zarr.open_group(group_path, mode="r").attrs)
    ms = (attrs.get("ome") or attrs)["multiscales"][0]
    axes = ms["axes"]
    rank = len(axes)
    scale, trans = [1.0] * rank, [0.0] * rank
    for transforms in (ms["datasets"][0].get("coordinateTransformations", []),
                       ms.get("coordinateTransformations", [])):
        for t in transforms:
            if t["type"] == "scale":
                scale = [a * b for a, b in zip(scale, t["scale"], strict=True)]
                trans = [a * b for a, b in zip(trans, t["scale"], strict=True)]
            else:
                trans = [a + b for a, b in zip(trans, t["translation"], strict=True)]
    space = [i for i, a in enumerate(axes) if a.get("type") == "space"]
    factor = [NM[axes[i]["unit"]] for i in space]
    ref = {"scale_nm": [scale[i] * f for i, f in zip(space, factor, strict=True)],
           "translation_nm": [trans[i] * f for i, f in zip(space, factor, strict=True)],
           "axes": [a["name"] + ("'" if a.get("type") == "channel" else "") for a in axes]}
    if axes[0].get("type") == "time":
        ref["t_scale"], ref["t_translation"] = scale[0], trans[0]
    return ref


def brute_scores(seg: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """ARAND (self-pairs included) and VOI split/merge in bits over voxels with truth != 0,
    from a contingency table counted voxel by voxel."""
    pairs: Counter = Counter()
    for s, t in zip(seg.ravel().tolist(), truth.ravel().tolist(), strict=True):
        if t != 0:
            pairs[(s, t)] += 1
    segs: Counter = Counter()
    objs: Counter = Counter()
    for (s, t), n in pairs.items():
        segs[s] += n
        objs[t] += n
    total = sum(pairs.values())
    sum_n2 = sum(n * n for n in pairs.values())
    arand = 1 - 2 * sum_n2 / (sum(v * v for v in objs.values()) +
                              sum(v * v for v in segs.values()))
    split = -sum(n / total * math.log2(n / objs[t]) for (s, t), n in pairs.items())  # H(S|T)
    merge = -sum(n / total * math.log2(n / segs[s]) for (s, t), n in pairs.items())  # H(T|S)
    return {"arand": arand, "voi_split": split, "voi_merge": merge,
            "cremi_score": math.sqrt(arand * (split + merge))}


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


# --------------------------------------------------------------------------- view

@pytest.fixture
def stores(tmp_path: Path) -> dict[str, str]:
    """An image, affinities and a segmentation with an offset and anisotropic voxels."""
    rng = np.random.default_rng(0)
    geometry = {"voxel_size": (40, 8, 4), "offset": (2, 3, 5)}
    write_volume(tmp_path / "vol.zarr", "image",
                 rng.integers(0, 255, (6, 16, 20), dtype=np.uint8), **geometry)
    write_volume(tmp_path / "pred.zarr", "affinity",
                 rng.random((3, 6, 16, 20), dtype=np.float32), channel_axis=True,
                 chunks=(3, 6, 16, 20), channel_names=[f"affinity {o}" for o in OFFSETS],
                 attrs={"offsets": OFFSETS}, **geometry)
    seg = (np.arange(6 * 16 * 20, dtype=np.int64).reshape(6, 16, 20) // 37)
    write_volume(tmp_path / "seg.zarr", "segmentation", seg, label=True, **geometry)
    return {"image": str(tmp_path / "vol.zarr/image"),
            "affinity": str(tmp_path / "pred.zarr/affinity"),
            "segmentation": str(tmp_path / "seg.zarr/segmentation")}


def test_layers_carry_the_geometry_the_zarr_attributes_state(stores, tmp_path):
    taken: set[str] = set()
    groups = {"image": tmp_path / "vol.zarr/image",
              "affinity": tmp_path / "pred.zarr/affinity",
              "segmentation": tmp_path / "seg.zarr/labels/segmentation"}
    shapes = {"image": (6, 16, 20), "affinity": (6, 16, 20), "segmentation": (6, 16, 20)}
    for name, path in stores.items():
        layer = layer_for(path, taken)
        ref = ome_reference(groups[name])
        assert ref["scale_nm"] == [40.0, 8.0, 4.0]
        assert ref["translation_nm"] == [80.0, 24.0, 20.0]  # offset x voxel size
        assert list(layer.voxel_size) == pytest.approx(ref["scale_nm"])
        low, high = layer.bounds_nm
        assert list(low) == pytest.approx(ref["translation_nm"])
        assert list(high) == pytest.approx([t + n * s for t, n, s in zip(
            ref["translation_nm"], shapes[name], ref["scale_nm"], strict=True)])
        assert layer.inner == groups[name].relative_to(Path(layer.store)).as_posix()


def test_the_state_has_the_documented_layer_types_and_channel_dimensions(stores, tmp_path):
    shown = view(list(stores.values()), client=CLIENT)
    try:
        layers = {layer["name"]: layer for layer in shown.state["layers"]}
        assert list(layers) == ["image", "affinity", "segmentation"]
        assert layers["image"]["type"] == "image" and "shader" not in layers["image"]
        assert layers["segmentation"]["type"] == "segmentation"
        aff = layers["affinity"]
        assert aff["type"] == "image"
        # RGB of the first three channels, in the stored order (z, y, x offsets)
        assert [f"getDataValue({i})" in aff["shader"] for i in range(4)] == [
            True, True, True, False]
        labels = [c["label"] for c in dict(zarr.open_group(
            tmp_path / "pred.zarr/affinity", mode="r").attrs)["ome"]["omero"]["channels"]]
        assert labels == [f"affinity {o}" for o in OFFSETS]
        # the transform's output dimensions follow the OME axes one for one (c renamed c^)
        ref = ome_reference(tmp_path / "pred.zarr/affinity")
        dims = aff["source"]["transform"]["outputDimensions"]
        assert list(dims) == ["c^", "z", "y", "x"] and ref["axes"] == ["c'", "z", "y", "x"]
        assert dims["c^"] == [1, ""]
        for axis, nm in zip("zyx", ref["scale_nm"], strict=True):
            assert dims[axis] == [pytest.approx(nm * 1e-9), "m"]
        assert "matrix" not in aff["source"]["transform"]  # the OME translation places it
    finally:
        shown.close()


def test_a_micrometre_store_written_elsewhere_is_shown_at_its_size_in_metres(tmp_path):
    group = zarr.open_group(tmp_path / "um.zarr", mode="w", zarr_format=3)
    data = np.random.default_rng(2).random((3, 4, 8, 8), dtype=np.float32)
    group.create_array("0", data=data, chunks=data.shape)
    group.attrs["ome"] = {"version": "0.5", "multiscales": [{
        "axes": [{"name": "c", "type": "channel"},
                 *({"name": a, "type": "space", "unit": "micrometer"} for a in "zyx")],
        "datasets": [{"path": "0", "coordinateTransformations": [
            {"type": "scale", "scale": [1.0, 0.015, 0.003, 0.002]}]}],
        "coordinateTransformations": [{"type": "scale", "scale": [1.0, 2.0, 2.0, 2.0]}]}]}
    layer = layer_for(str(tmp_path / "um.zarr"), set())
    ref = ome_reference(tmp_path / "um.zarr")
    assert ref["scale_nm"] == pytest.approx([30.0, 6.0, 4.0])
    assert list(layer.voxel_size) == pytest.approx(ref["scale_nm"])
    dims = neuroglancer_state([layer], {layer.name: "http://x/0"})["layers"][0]["source"][
        "transform"]["outputDimensions"]
    assert [dims[a][0] for a in "zyx"] == pytest.approx([v * 1e-9 for v in ref["scale_nm"]])


@pytest.mark.parametrize(("dtype", "label", "kind"), [
    (np.uint8, True, "segmentation"), (np.uint8, False, "image"),
    (np.uint16, False, "image"), (np.uint32, False, "segmentation"),
    (np.uint64, False, "segmentation"), (np.float32, False, "image"),
])
def test_the_layer_kind_follows_the_documented_rule(tmp_path, dtype, label, kind):
    data = (np.arange(4 * 8 * 8).reshape(4, 8, 8) % 7).astype(dtype)
    write_volume(tmp_path / "v.zarr", "vol", data, voxel_size=(30, 6, 6), label=label)
    path = str(tmp_path / "v.zarr/vol")
    layer = layer_for(path, set())
    assert layer.kind == kind and layer.channels == 0
    state = neuroglancer_state([layer], {layer.name: "http://x/0"})
    assert state["layers"][0]["type"] == ("segmentation" if kind == "segmentation" else "image")


def test_float64_is_refused_as_neuroglancer_reads_no_float64(tmp_path):
    write_volume(tmp_path / "v.zarr", "vol", np.zeros((4, 8, 8)), voxel_size=(30, 6, 6))
    with pytest.raises(UserError, match="float32"):
        layer_for(str(tmp_path / "v.zarr/vol"), set())


def test_an_int64_v3_segmentation_is_served_as_uint64_with_the_same_bytes(stores, tmp_path):
    shown = view([stores["segmentation"]], client=CLIENT)
    try:
        base = shown.state["layers"][0]["source"].removeprefix("zarr://")
        meta = json.loads(get(f"{base}/0/zarr.json"))
        assert meta["data_type"] in NEUROGLANCER_ZARR_TYPES and meta["data_type"] == "uint64"
        on_disk = json.loads((tmp_path / "seg.zarr/labels/segmentation/0/zarr.json")
                             .read_text())
        assert on_disk["data_type"] == "int64"  # only what is served says uint64
    finally:
        shown.close()


def _v2_int64_labels(tmp_path: Path) -> str:
    """An OME-Zarr 0.4 (zarr v2) int64 segmentation, as other tools write them."""
    group = zarr.open_group(tmp_path / "v2.zarr", mode="w", zarr_format=2)
    image = group.create_group("seg")
    image.create_array("0", data=(np.arange(256, dtype=np.int64).reshape(4, 8, 8) // 10),
                       chunks=(4, 8, 8))
    image.attrs["multiscales"] = [{"version": "0.4", "axes": [
        {"name": a, "type": "space", "unit": "nanometer"} for a in "zyx"],
        "datasets": [{"path": "0", "coordinateTransformations": [
            {"type": "scale", "scale": [30.0, 6.0, 6.0]}]}]}]
    return str(tmp_path / "v2.zarr/seg")


def test_an_int64_v2_segmentation_is_served_as_a_type_neuroglancer_reads(tmp_path):
    path = _v2_int64_labels(tmp_path)
    shown = view([path], client=CLIENT)
    try:
        assert shown.layers[0].kind == "segmentation"
        base = shown.state["layers"][0]["source"].removeprefix("zarr://")
        meta = json.loads(get(f"{base}/0/.zarray"))
        names = {"|u1": "uint8", "|i1": "int8", "<u2": "uint16", "<i2": "int16",
                 "<u4": "uint32", "<i4": "int32", "<u8": "uint64", "<i8": "int64",
                 "<f4": "float32"}
        assert names[meta["dtype"]] in NEUROGLANCER_ZARR_TYPES
    finally:
        shown.close()


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_short_unit_names_are_served_as_the_ome_names_neuroglancer_reads(tmp_path,
                                                                        zarr_format):
    """emrun reads `nm` and `um` in OME axes (stores written elsewhere); neuroglancer refuses
    them ("Unsupported unit"), so the served group metadata spells them out."""
    group = zarr.open_group(tmp_path / "u.zarr", mode="w", zarr_format=zarr_format)
    image = group.create_group("img")
    image.create_array("0", data=np.zeros((4, 8, 8), np.uint8), chunks=(4, 8, 8))
    axes = [{"name": "z", "type": "space", "unit": "um"},
            *({"name": a, "type": "space", "unit": "nm"} for a in "yx")]
    multiscales = [{"version": "0.4" if zarr_format == 2 else "0.5", "axes": axes,
                    "datasets": [{"path": "0", "coordinateTransformations": [
                        {"type": "scale", "scale": [0.03, 6.0, 6.0]}]}]}]
    if zarr_format == 2:
        image.attrs["multiscales"] = multiscales
    else:
        image.attrs["ome"] = {"version": "0.5", "multiscales": multiscales}
    shown = view([str(tmp_path / "u.zarr/img")], client=CLIENT)
    try:
        assert shown.layers[0].voxel_size == pytest.approx((30.0, 6.0, 6.0))
        base = shown.state["layers"][0]["source"].removeprefix("zarr://")
        meta = json.loads(get(f"{base}/{'.zattrs' if zarr_format == 2 else 'zarr.json'}"))
        attrs = meta if zarr_format == 2 else meta["attributes"]["ome"]
        units = [axis["unit"] for axis in attrs["multiscales"][0]["axes"]]
        assert units == ["micrometer", "nanometer", "nanometer"]
    finally:
        shown.close()


def _time_series(tmp_path: Path, t_scale: float, t_shift: float) -> Path:
    """An OME-Zarr 0.4 series of 4 time points, z, y, x offset 2, 3, 4 voxels."""
    group = zarr.open_group(tmp_path / "t.zarr", mode="w", zarr_format=2)
    group.create_array("0", data=np.zeros((4, 4, 8, 10), np.uint8), chunks=(1, 4, 8, 10))
    group.attrs["multiscales"] = [{"version": "0.4", "axes": [
        {"name": "t", "type": "time", "unit": "second"},
        *({"name": a, "type": "space", "unit": "nanometer"} for a in "zyx")],
        "datasets": [{"path": "0", "coordinateTransformations": [
            {"type": "scale", "scale": [t_scale, 30.0, 6.0, 6.0]},
            {"type": "translation", "translation": [t_shift, 60.0, 18.0, 24.0]}]}]}]
    return tmp_path / "t.zarr"


@pytest.mark.parametrize(("t_scale", "t_shift"), [(1.0, 0.0), (2.0, 10.0), (1.0, 120.0)])
def test_the_time_step_and_axis_follow_the_ome_t_axis(tmp_path, t_scale, t_shift):
    path = _time_series(tmp_path, t_scale, t_shift)
    layer = layer_for(str(path), set())
    ref = ome_reference(path)
    state = neuroglancer_state([layer], {layer.name: "http://x/0"})
    assert state["dimensions"]["t"] == [pytest.approx(ref["t_scale"]), "s"]
    assert layer.time_points == 4
    assert layer.time_origin == pytest.approx(ref["t_translation"] / ref["t_scale"])


@pytest.mark.parametrize(("t_scale", "t_shift"), [(1.0, 0.0), (2.0, 10.0)])
def test_a_time_series_opens_inside_its_first_time_point(tmp_path, t_scale, t_shift):
    path = _time_series(tmp_path, t_scale, t_shift)
    layer = layer_for(str(path), set())
    ref = ome_reference(path)
    t = neuroglancer_state([layer], {layer.name: "http://x/0"})["position"][3]
    centre = ref["t_translation"] / ref["t_scale"]  # time point k covers centre-0.5+k ...
    shown = math.floor(t - (centre - 0.5))  # the time point neuroglancer draws at t
    assert shown == 0
    assert t == pytest.approx(centre)


def test_a_time_series_opens_on_a_voxel_centre(tmp_path):
    path = _time_series(tmp_path, 1.0, 0.0)
    layer = layer_for(str(path), set())
    ref = ome_reference(path)
    x, y, z, _ = neuroglancer_state([layer], {layer.name: "http://x/0"})["position"]
    for value, t, s in zip((z, y, x), ref["translation_nm"], ref["scale_nm"], strict=True):
        assert (value - t / s) == pytest.approx(round(value - t / s))  # a voxel's centre


def test_an_n5_volume_and_its_ome_copy_lie_on_one_another(tmp_path):
    from n5_writing import n5_dataset

    from emrun.io import open_volume

    data = np.random.default_rng(3).integers(0, 255, (4, 8, 8), dtype=np.uint8)
    n5 = tmp_path / "a.n5" / "raw"
    n5_dataset(n5, data, resolution=[6, 6, 30], offset=[24, 18, 60])  # x, y, z nm
    write_volume(tmp_path / "a.zarr", "raw", data, voxel_size=(30, 6, 6), offset=(2, 3, 4))
    # emrun itself reads both at one place: voxel 0 at offset (2, 3, 4)
    assert open_volume(str(n5)).offset == open_volume(str(tmp_path / "a.zarr/raw")).offset
    shown = view([str(n5), str(tmp_path / "a.zarr/raw")], client=CLIENT)
    try:
        n5_spec, _ = shown.state["layers"]
        matrix = n5_spec["source"]["transform"]["matrix"]  # rows x, y, z: voxels
        n5_centre = [matrix[row][-1] + 0.5 for row in range(3)][::-1]  # z, y, x
        ref = ome_reference(tmp_path / "a.zarr/raw")
        ome_centre = [t / s for t, s in zip(ref["translation_nm"], ref["scale_nm"],
                                             strict=True)]
        assert n5_centre == pytest.approx(ome_centre)
    finally:
        shown.close()


# --------------------------------------------------------------------------- demo

TINY = ["train.iterations=2", "train.checkpoint_every=2", "train.validate_every=2",
        "train.log_every=1", "train.image_every=2",
        "data.sources.synth_a.shape=[16,64,64]", "data.sources.synth_b.shape=[16,64,64]",
        "data.validation.synth_val.shape=[12,64,64]", "model.widths=[4,8]",
        "train.patch=[8,32,32]", "infer.patch=[8,32,32]"]


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory) -> tuple[Path, dict]:
    from emrun.demo import run_demo

    out = tmp_path_factory.mktemp("demo") / "emrun-demo"
    metrics = run_demo(out, overrides=TINY)
    return out, metrics


def test_demo_metrics_are_the_scores_of_the_written_segmentations(demo_out):
    out, returned = demo_out
    written = json.loads((out / "metrics.json").read_text())
    assert written == returned and set(written) == {"trained", "untrained"}
    truth = np.asarray(zarr.open_array(out / "test.zarr/labels/labels/0", mode="r"))
    for tag in ("trained", "untrained"):
        seg = np.asarray(zarr.open_array(out / f"seg_{tag}.zarr/labels/segmentation/0",
                                         mode="r"))
        assert seg.shape == truth.shape
        ref = brute_scores(seg, truth)
        assert set(written[tag]) == set(ref)
        for key, value in ref.items():
            assert written[tag][key] == pytest.approx(value, abs=5.1e-5), (tag, key)


def test_demo_test_volume_predictions_and_figure(demo_out):
    out, _ = demo_out
    for name in ("image", "labels/labels"):
        ref = ome_reference(out / "test.zarr" / name)
        assert ref["scale_nm"] == [30.0, 6.0, 6.0] and ref["translation_nm"] == [0, 0, 0]
        shape = zarr.open_array(out / "test.zarr" / name / "0", mode="r").shape
        assert shape == (16, 64, 64)  # twice the inference patch
    for tag in ("trained", "untrained"):
        group = out / f"pred_{tag}.zarr/affinity"
        attrs = dict(zarr.open_group(group, mode="r").attrs)
        offsets = attrs["offsets"]
        labels = [c["label"] for c in attrs["ome"]["omero"]["channels"]]
        assert labels == ["affinity " + " ".join(str(v) for v in o) for o in offsets]
        assert offsets[:3] == OFFSETS  # the RGB layer's channels are z, y, x
        assert zarr.open_array(group / "0", mode="r").shape == (len(offsets), 16, 64, 64)
        layer = layer_for(str(group), set())
        assert layer.kind == "channels" and layer.voxel_size == (30.0, 6.0, 6.0)
    png = (out / "demo.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert (width, height) == (1600, 288)  # 20 x 3.6 inches at 80 dpi: six panels


def test_brute_force_reference_on_a_hand_case():
    """The reference itself: truth {1: 4 voxels}, {2: 2}; segments {a: 3 of 1}, {b: 1 of 1,
    2 of 2}; a truth-0 voxel is ignored."""
    truth = np.array([1, 1, 1, 1, 2, 2, 0])
    seg = np.array([5, 5, 5, 6, 6, 6, 5])
    ref = brute_scores(seg, truth)
    # sum n^2 = 9 + 1 + 4 = 14; T^2 = 16 + 4 = 20; S^2 = 9 + 9 = 18
    assert ref["arand"] == pytest.approx(1 - 28 / 38)
    # H(S|T) = 4/6 H(3/4, 1/4); H(T|S) = 3/6 H(1/3, 2/3)
    h = lambda *p: -sum(q * math.log2(q) for q in p)  # noqa: E731
    assert ref["voi_split"] == pytest.approx(4 / 6 * h(0.75, 0.25))
    assert ref["voi_merge"] == pytest.approx(3 / 6 * h(1 / 3, 2 / 3))
