"""OME-Zarr multiscale metadata, read and written: stores written by ome-zarr-py and by hand
(NGFF 0.4 `.zattrs`, 0.5 `zarr.json`) read with the right voxel size (nm), offset, axes and
levels; emrun's own pyramids (scale, the half-voxel translation of each coarser level, label
levels by mode) validated with ome-zarr-models, read by ome-zarr-py and reopened by emrun;
bad metadata refused in one line with exit code 2, naming the volume.

Tests marked xfail(strict=True) show a bug in a file this probe does not own (the reason
says which)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from test_formats_roundtrip import units_of
from typer.testing import CliRunner

from emrun.cli import app
from emrun.geometry import Roi
from emrun.io import VolumeError, choose_level, open_volume, write_volume

ome_zarr_models = pytest.importorskip("ome_zarr_models")
ome_writer = pytest.importorskip("ome_zarr.writer")
ome_format = pytest.importorskip("ome_zarr.format")
ome_io = pytest.importorskip("ome_zarr.io")
ome_reader = pytest.importorskip("ome_zarr.reader")

# ome-zarr-py warns that `coordinate_transformations` will go; it is what writes translations
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ome_zarr")

runner = CliRunner()
RNG = np.random.default_rng(0)
KINDS = {"t": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}


def axes(names: str, unit: str | None = "nanometer") -> list[dict[str, Any]]:
    """OME axes for `names`; the spatial ones with `unit` (None: none)."""
    return [{"name": n, "type": KINDS[n], **({"unit": unit} if unit and KINDS[n] == "space"
                                              else {})} for n in names]


def scale(*values: float) -> list[dict[str, Any]]:
    return [{"type": "scale", "scale": list(values)}]


def placed(values: list[float], translation: list[float]) -> list[dict[str, Any]]:
    """A scale, then a translation (the order OME-NGFF prescribes)."""
    return [*scale(*values), {"type": "translation", "translation": translation}]


def hand_written(store: Path, data: np.ndarray, ome_axes: Any, transforms: list[list[Any]],
                 version: str = "0.5", top: list[Any] | None = None,
                 paths: tuple[str, ...] = ("s0", "s1", "s2")) -> Path:
    """An image at a store's root, written without ome-zarr-py: one level per transform
    list (level k is `data` strided by 2**k in y and x), 0.4 as a zarr v2 `.zattrs`, 0.5
    under "ome" in a v3 `zarr.json`."""
    v2 = version == "0.4"
    group = zarr.open_group(store, mode="w", zarr_format=2 if v2 else 3)
    datasets = []
    for k, ct in enumerate(transforms):
        level = data[..., :: 2**k, :: 2**k]
        group.create_array(paths[k], shape=level.shape, dtype=level.dtype,
                           chunks=level.shape)[...] = level
        datasets.append({"path": paths[k], "coordinateTransformations": ct})
    multiscale: dict[str, Any] = {"axes": ome_axes, "datasets": datasets}
    if top is not None:
        multiscale["coordinateTransformations"] = top
    if v2:
        group.attrs["multiscales"] = [{"version": "0.4", **multiscale}]
    else:
        group.attrs["ome"] = {"version": "0.5", "multiscales": [multiscale]}
    return store


def ome_of(group: Path) -> dict[str, Any]:
    return json.loads((group / "zarr.json").read_text())["attributes"]["ome"]


def transforms_of(group: Path, level: int) -> tuple[list[float], list[float]]:
    """(scale, translation) of a level of an emrun image group, as written."""
    found: dict[str, list[float]] = {}
    for t in ome_of(group)["multiscales"][0]["datasets"][level]["coordinateTransformations"]:
        found[t["type"]] = [float(v) for v in t[t["type"]]]
    return found["scale"], found.get("translation", [0.0] * len(found["scale"]))


def refused(args: list[str]) -> str:
    """The one line a refused command prints (exit code 2)."""
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    return lines[0]


# ==================================================== reading what other tools write


@pytest.mark.parametrize("version", ["0.4", "0.5"])
@pytest.mark.parametrize(("names", "shape"), [("zyx", (4, 32, 32)), ("czyx", (2, 4, 32, 32)),
                                              ("tczyx", (1, 2, 4, 32, 32))])
def test_ome_zarr_py_stores_read_with_voxel_size_in_nm_and_levels(
        tmp_path: Path, version: str, names: str, shape: tuple[int, ...]) -> None:
    """ome-zarr-py's writer, micrometre scales with translations: nm, whole voxels, the one
    time point dropped, every level's size, a level by name or size, its labels."""
    fmt = ome_format.FormatV04() if version == "0.4" else ome_format.FormatV05()
    store = tmp_path / "v.zarr"
    data = RNG.integers(0, 255, shape).astype(np.uint8)
    lead = [1.0] * (len(names) - 3)
    ct = [[{"type": "scale", "scale": [*lead, 0.03, 0.004 * 2**k, 0.004 * 2**k]},
           {"type": "translation", "translation": [*[0.0] * len(lead), 0.09, 0.008,
                                                   0.002 * (2**k - 1)]}] for k in range(2)]
    root = zarr.group(store=ome_io.parse_url(str(store), mode="w", fmt=fmt).store)
    ome_writer.write_multiscale([data, data[..., ::2, ::2]], root, fmt=fmt,
                                axes=axes(names, "micrometer"), coordinate_transformations=ct,
                                **units_of(axes(names, "micrometer")))
    ids = (data.reshape(-1, *shape[-3:])[0] // 64).astype(np.uint32)
    spatial = [[{"type": t["type"], t["type"]: t[t["type"]][-3:]} for t in c] for c in ct]
    ome_writer.write_multiscale_labels([ids, ids[:, ::2, ::2]], root, name="cells",
                                       axes=axes("zyx", "micrometer"), fmt=fmt,
                                       coordinate_transformations=spatial,
                                       **units_of(axes("zyx", "micrometer")))
    whole = open_volume(store)
    assert whole.shape == (shape[-4:] if "c" in names else shape[-3:])
    assert (whole.voxel_size, whole.offset) == ((30.0, 4.0, 4.0), (3, 2, 0))
    assert [(lv.name, lv.voxel_size) for lv in whole.levels()] == [
        ("s0", (30.0, 4.0, 4.0)), ("s1", (30.0, 8.0, 8.0))]
    coarse = open_volume(choose_level(store, "30,8,8"))
    np.testing.assert_array_equal(coarse.read().reshape(-1), data[..., ::2, ::2].reshape(-1))
    assert coarse.offset == (3, 1, 0)  # 8 nm of 8 nm voxels; 2 nm half-voxel shift aside
    assert coarse.shift_nm == (0.0, 0.0, 2.0)
    cells = open_volume(f"{store}/labels/cells")
    assert cells.segmentation and cells.voxel_size == (30.0, 4.0, 4.0)


@pytest.mark.parametrize(("unit", "values", "nm"), [
    ("micrometer", (0.03, 0.006), (30.0, 6.0)), ("angstrom", (300, 60), (30.0, 6.0)),
    ("nanometer", (30, 6), (30.0, 6.0)), ("\u00b5m", (0.03, 0.006), (30.0, 6.0)),
    ("\u03bcm", (0.03, 0.006), (30.0, 6.0))])
def test_units_become_nm(tmp_path: Path, unit: str, values: tuple[float, float],
                         nm: tuple[float, float]) -> None:
    """OME's length units, and micro written with the Greek mu (U+03BC), which was an
    "unknown spatial unit"."""
    store = hand_written(tmp_path / "u.zarr", np.zeros((2, 4, 4), np.uint8), axes("zyx", unit),
                         [scale(values[0], values[1], values[1])])
    assert open_volume(store).voxel_size == (nm[0], nm[1], nm[1])


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_multiscale_transforms_apply_after_each_dataset_s(tmp_path: Path, version: str) -> None:
    """The multiscale's own coordinateTransformations (0.4+) scale each dataset's."""
    store = hand_written(
        tmp_path / "t.zarr", np.zeros((2, 8, 8), np.uint8), axes("zyx", "micrometer"),
        [placed([1, 1, 1], [2, 1, 0]), placed([1, 2, 2], [2, 1.5, 0.5])],
        version=version, top=scale(0.03, 0.006, 0.006))
    first = open_volume(store)
    assert (first.voxel_size, first.offset) == ((30.0, 6.0, 6.0), (2, 1, 0))
    level1 = open_volume(f"{store}/s1")
    assert (level1.voxel_size, level1.offset, level1.shift_nm) == (
        (30.0, 12.0, 12.0), (2, 1, 0), (0.0, -3.0, 3.0))


@pytest.mark.parametrize("unit", [None, "none"])
def test_no_unit_or_no_scale_is_an_unknown_size_not_1_nm(tmp_path: Path,
                                                         unit: str | None) -> None:
    store = hand_written(tmp_path / "n.zarr", np.zeros((2, 4, 4), np.uint8),
                         [{"name": n, "type": "space"} for n in "zyx"] if unit is None
                         else axes("zyx", None), [scale(30, 6, 6)])
    assert open_volume(store).voxel_size is None
    hand_written(tmp_path / "m.zarr", np.zeros((2, 4, 4), np.uint8), axes("zyx"), [[]])
    assert open_volume(tmp_path / "m.zarr").voxel_size is None


def test_ome_04_labels_by_hand_are_a_segmentation_with_the_image_s_geometry(
        tmp_path: Path) -> None:
    ids = RNG.integers(0, 4, (2, 8, 8)).astype(np.uint16)
    store = hand_written(tmp_path / "h.zarr", ids.astype(np.uint8), axes("zyx", "micrometer"),
                         [scale(0.03, 0.006, 0.006)], version="0.4")
    zarr.open_group(store / "labels", mode="w", zarr_format=2).attrs["labels"] = ["cells"]
    hand_written(store / "labels/cells", ids, axes("zyx", "micrometer"),
                 [scale(0.03, 0.006, 0.006), scale(0.03, 0.012, 0.012)], version="0.4")
    zarr.open_group(store / "labels/cells", mode="r+").attrs["image-label"] = {
        "version": "0.4", "source": {"image": "../../"}}
    for path in (f"{store}/labels/cells", f"{store}/cells"):
        cells = open_volume(path)
        assert cells.segmentation and cells.voxel_size == (30.0, 6.0, 6.0)
        np.testing.assert_array_equal(cells.read(), ids)
    assert open_volume(f"{store}/labels/cells/s1").segmentation


def test_multiscales_under_ome_win_over_a_stale_top_level_copy(tmp_path: Path) -> None:
    """A 0.5 group that still carries 0.4's top-level multiscales (from before an upgrade)
    is read by its "ome" metadata, as its image-label and labels already were."""
    store = hand_written(tmp_path / "s.zarr", np.zeros((2, 4, 4), np.uint8), axes("zyx"),
                         [scale(30, 6, 6)])
    group = zarr.open_group(store, mode="r+")
    group.attrs["multiscales"] = [{"version": "0.4", "axes": axes("zyx"), "datasets": [
        {"path": "s0", "coordinateTransformations": scale(1, 1, 1)}]}]
    assert open_volume(store).voxel_size == (30.0, 6.0, 6.0)


# ============================================================= bad metadata, one line


@pytest.mark.parametrize(("names", "shape", "values", "says"), [
    ("zyx", (1, 2, 4, 4), (1, 30, 6, 6), r"axes \(z, y, x\) are 3 for an array of 4 dim"),
    ("czyx", (2, 4, 4), (30, 6, 6), r"axes \(c, z, y, x\) are 4 for an array of 3 dim"),
    ("zyx", (2, 4, 4), (0, 6, 6), r"scale \[0, 6, 6\] must be positive"),
    ("zyx", (2, 4, 4), (30, -6, 6), r"scale \[30, -6, 6\] must be positive"),
    ("zyx", (2, 4, 4), (30, 6), r"scale \[30, 6\] does not have one value per axis \(3\)"),
])
def test_bad_axes_or_scale_is_one_line_exit_2_naming_the_volume(
        tmp_path: Path, names: str, shape: tuple[int, ...], values: tuple[float, ...],
        says: str) -> None:
    """Axes that are not one per dimension came out as "IndexError: list index out of
    range" (3 axes, 4-d) or were read as if right (4 axes, 3-d: the c axis taken for z)."""
    import re

    store = hand_written(tmp_path / "b.zarr", np.zeros(shape, np.uint8), axes(names),
                         [scale(*values)])
    line = refused(["data", "convert", str(store), str(tmp_path / "o.zarr")])
    assert str(store) in line and re.search(says, line.replace(".0", "")), line
    assert not (tmp_path / "o.zarr").exists()


def test_unknown_or_partial_units_are_one_line_exit_2(tmp_path: Path) -> None:
    """A unit on some spatial axes and none on others: the latter were taken as nm (a
    0.006 um voxel came out 0.006 nm in y)."""
    store = hand_written(tmp_path / "u.zarr", np.zeros((2, 4, 4), np.uint8),
                         axes("zyx", "furlong"), [scale(30, 6, 6)])
    assert "unknown spatial unit 'furlong'" in refused(
        ["data", "convert", str(store), str(tmp_path / "o.zarr")])
    partial = axes("zyx", "micrometer")
    del partial[1]["unit"]
    store = hand_written(tmp_path / "p.zarr", np.zeros((2, 4, 4), np.uint8), partial,
                         [scale(0.03, 0.006, 0.006)])
    line = refused(["data", "convert", str(store), str(tmp_path / "o.zarr")])
    assert f"{store}: its OME-Zarr axes give a unit for z, x but none for y" in line


def test_a_pixel_unit_is_an_unknown_voxel_size_as_in_tiff(tmp_path: Path) -> None:
    """Unit "pixel" (some writers put it) was refused as an unknown unit, where TIFF's
    "pixel" resolution unit reads as an unknown voxel size."""
    store = hand_written(tmp_path / "px.zarr", np.zeros((2, 4, 4), np.uint8),
                         axes("zyx", "pixel"), [scale(1, 1, 1)])
    volume = open_volume(store)
    assert volume.voxel_size is None and volume.offset == (0, 0, 0)
    mixed = axes("zyx", "nanometer")
    mixed[0]["unit"] = "pixel"
    store = hand_written(tmp_path / "mix.zarr", np.zeros((2, 4, 4), np.uint8), mixed,
                         [scale(1, 6, 6)])
    line = refused(["data", "convert", str(store), str(tmp_path / "o.zarr")])
    assert "give a unit for y, x but none for z" in line


@pytest.mark.parametrize("names", ["cyx", "tcyx"])
def test_a_2d_image_with_channels_is_refused_not_read_as_z(tmp_path: Path, names: str) -> None:
    """c, y, x was read as z, y, x: three colour channels became three sections."""
    shape = (1, 3, 8, 8)[-len(names):]
    store = hand_written(tmp_path / "c.zarr", np.zeros(shape, np.uint8), axes(names),
                         [scale(*[1] * (len(names) - 2), 6, 6)])
    line = refused(["data", "convert", str(store), str(tmp_path / "o.zarr")])
    assert f"{store}: its OME-Zarr axes are {', '.join(names)}, a 2-d image with channels" \
        in line
    with pytest.raises(VolumeError, match="2-d image with channels"):
        open_volume(store)


def test_a_bad_level_is_named_when_the_levels_are_listed(tmp_path: Path) -> None:
    """--level s0 of an image whose s1 has a negative scale blamed the image, not s1."""
    store = hand_written(tmp_path / "l.zarr", np.zeros((2, 8, 8), np.uint8), axes("zyx"),
                         [scale(30, 6, 6), scale(30, 12, -12)])
    line = refused(["data", "convert", str(store), str(tmp_path / "o.zarr"), "--level", "s0"])
    assert f"{store} (level s1): multiscales scale" in line


def test_a_voxel_size_level_of_a_2d_image_is_no_internal_error(tmp_path: Path) -> None:
    """--level with three sizes on a 2-d (y, x) image whose y and x matched raised zip()'s
    ValueError (an internal error, exit 1), not "no level"."""
    store = hand_written(tmp_path / "yx.zarr", np.zeros((8, 8), np.uint8), axes("yx"),
                         [scale(6, 6), scale(12, 12)])
    with pytest.raises(VolumeError, match=r"has no level 6,6,1; levels: s0 \(6,6 nm\)"):
        choose_level(store, "6,6,1")


# ========================================================= what emrun writes, reopened


def test_levels_scale_translation_and_reopened_geometry(tmp_path: Path) -> None:
    """Anisotropic (z kept until y and x catch up), odd shapes, an offset: every level's
    scale is the voxel size times its factor and its translation the centre of its window
    (OME pixel centres); emrun reopens each level at the same place, ome-zarr-models
    validates it, ome-zarr-py reads the same scales."""
    image = RNG.integers(0, 256, (5, 37, 21)).astype(np.uint8)
    write_volume(tmp_path / "o.zarr", "image", image, voxel_size=(16, 4, 4), offset=(1, 3, 2),
                 levels=4)
    group = tmp_path / "o.zarr/image"
    factors = [(1, 1, 1), (1, 2, 2), (1, 4, 4), (2, 8, 8)]  # z 16 nm: halved at y = 16
    for level, factor in enumerate(factors):
        got_scale, got_translation = transforms_of(group, level)
        assert got_scale == [v * f for v, f in zip((16, 4, 4), factor, strict=True)]
        assert got_translation == [(o + (f - 1) / 2) * v for o, f, v in
                                   zip((1, 3, 2), factor, (16, 4, 4), strict=True)]
        reopened = open_volume(f"{group}/{level}")
        assert reopened.shape == tuple(-(-n // f) for n, f in
                                       zip(image.shape, factor, strict=True))
        assert reopened.voxel_size == tuple(float(s) for s in got_scale)
        corner = [o * s + (sh or 0) for o, s, sh in
                  zip(reopened.offset, got_scale, reopened.shift_nm or (0, 0, 0), strict=True)]
        assert corner == got_translation  # offset and shift put it where it was written
    ome_zarr_models.open_ome_zarr(str(group))
    node = next(iter(ome_reader.Reader(ome_io.parse_url(str(group)))()))
    assert [t[0]["scale"] for t in node.metadata["coordinateTransformations"]] == [
        [16.0, 4.0, 4.0], [16.0, 8.0, 8.0], [16.0, 16.0, 16.0], [32.0, 32.0, 32.0]]


def test_one_voxel_axes_and_float_levels(tmp_path: Path) -> None:
    """A one-section, one-row volume keeps its single z and y; x alone halves (the levels
    it can have); float data are averaged in their own dtype."""
    data = RNG.random((1, 1, 9)).astype(np.float32)
    write_volume(tmp_path / "o.zarr", "f", data, voxel_size=(8, 8, 8), levels=1)
    with pytest.raises(VolumeError, match="has at most 1 levels"):
        write_volume(tmp_path / "o.zarr", "g", data, voxel_size=(8, 8, 8), levels=2)
    data = RNG.random((1, 2, 9)).astype(np.float32)
    write_volume(tmp_path / "o.zarr", "h", data, voxel_size=(8, 8, 8), levels=2)
    level1 = zarr.open_array(tmp_path / "o.zarr/h/1", mode="r")
    assert level1.shape == (1, 1, 5) and level1.dtype == np.float32
    np.testing.assert_allclose(level1[0, 0, :4], data[0, :, :8].reshape(2, 4, 2).mean(axis=(0, 2)),
                               rtol=1e-6)
    np.testing.assert_allclose(level1[0, 0, 4], data[0, :, 8].mean(), rtol=1e-6)
    assert transforms_of(tmp_path / "o.zarr/h", 1) == ([8.0, 16.0, 16.0], [0.0, 4.0, 4.0])
    ome_zarr_models.open_ome_zarr(str(tmp_path / "o.zarr/h"))


def test_label_levels_hold_only_ids_of_the_level_before(tmp_path: Path) -> None:
    """A uint8 segmentation (label=True) is downsampled by mode, never averaged: a 0/200
    checkerboard has no 100 anywhere; ome-zarr-models validates it as a label image."""
    ids = np.zeros((2, 16, 16), np.uint8)
    ids[:, ::2, ::2] = 200
    ids[:, 1::2, 1::2] = 200
    write_volume(tmp_path / "o.zarr", "seg", ids, voxel_size=(30, 6, 6), label=True, levels=3)
    group = tmp_path / "o.zarr/labels/seg"
    for level in (1, 2):
        assert set(np.unique(zarr.open_array(group / str(level), mode="r")[...])) <= {0, 200}
        assert open_volume(f"{group}/{level}").segmentation
    assert type(ome_zarr_models.open_ome_zarr(str(group))).__name__ == "ImageLabel"


def test_a_segmentation_s_level_opens_by_its_short_name(tmp_path: Path) -> None:
    """`STORE/NAME` opens a segmentation in STORE/labels/NAME; its levels `STORE/NAME/1`,
    as an image's do, were "no array 'seg/1'"."""
    ids = RNG.integers(1, 5, (2, 8, 8)).astype(np.uint32)
    write_volume(tmp_path / "s.zarr", "seg", ids, voxel_size=(30, 6, 6), levels=2)
    level1 = open_volume(f"{tmp_path}/s.zarr/seg/1")
    assert level1.segmentation and level1.voxel_size == (30.0, 12.0, 12.0)
    np.testing.assert_array_equal(
        level1.read(), zarr.open_array(tmp_path / "s.zarr/labels/seg/1", mode="r")[...])
    with pytest.raises(VolumeError, match="no array"):
        open_volume(f"{tmp_path}/s.zarr/seg/7")


def test_a_voxel_size_with_more_decimals_than_written_reopens_at_its_offset(
        tmp_path: Path) -> None:
    """6.6666667 nm is written as 6.666667; the translation was made from the size as
    given, so an offset of 100000 voxels read back 0.005 voxels off and the write itself
    failed (its pyramid reopens level 0)."""
    write_volume(tmp_path / "o.zarr", "img", np.ones((2, 8, 8), np.uint8),
                 voxel_size=(30, 6.6666667, 6.6666667), offset=(0, 100000, 3), levels=2)
    reopened = open_volume(tmp_path / "o.zarr/img")
    assert (reopened.voxel_size, reopened.offset) == ((30.0, 6.666667, 6.666667),
                                                      (0, 100000, 3))
    attrs = zarr.open_array(tmp_path / "o.zarr/img/0", mode="r").attrs
    assert attrs["offset"][1] / attrs["voxel_size"][1] == pytest.approx(100000, abs=1e-6)


def test_emrun_reads_its_output_of_a_foreign_level_where_ome_zarr_py_puts_it(
        tmp_path: Path) -> None:
    """Converting level s1 of a hand-written 0.4 store keeps its physical place: the output's
    translation (nm) is the source's (um) in nm, in emrun and in ome-zarr-py's reading."""
    store = hand_written(
        tmp_path / "h.zarr", RNG.integers(0, 255, (2, 16, 16)).astype(np.uint8),
        axes("zyx", "micrometer"),
        [placed([0.03, 0.006, 0.006], [0.06, 0.012, 0]),
         placed([0.03, 0.012, 0.012], [0.06, 0.015, 0.003])], version="0.4")
    result = runner.invoke(app, ["data", "convert", str(store), str(tmp_path / "o.zarr"),
                                 "--level", "s1", "--levels", "1"])
    assert result.exit_code == 0, result.output
    assert transforms_of(tmp_path / "o.zarr/image", 0) == ([30.0, 12.0, 12.0],
                                                           [60.0, 15.0, 3.0])
    node = next(iter(ome_reader.Reader(ome_io.parse_url(str(tmp_path / "o.zarr/image")))()))
    assert node.metadata["coordinateTransformations"][0][1]["translation"] == [60.0, 15.0, 3.0]
    out = open_volume(tmp_path / "o.zarr/image")
    np.testing.assert_array_equal(out.read(Roi((0, 1, 2), (2, 3, 4))),
                                  open_volume(f"{store}/s1").read(Roi((0, 1, 2), (2, 3, 4))))


# ============================================================== files others own


def test_view_serves_a_bioformats2raw_store(tmp_path: Path) -> None:
    """view.py passed volume.ndim (the time point dropped) to ome_levels for a t, c, z, y, x
    store, whose metadata names 5 axes: emrun view refused stores that emrun reads."""
    from emrun.view import layer_for

    store = hand_written(tmp_path / "b.zarr", np.zeros((1, 1, 2, 8, 8), np.uint8),
                         axes("tczyx"), [scale(1, 1, 30, 6, 6)], paths=("0",))
    assert layer_for(str(store), set()).voxel_size == (30.0, 6.0, 6.0)


def test_a_served_segmentation_s_level_opens_by_its_short_name(tmp_path: Path) -> None:
    """A served store's `URL/STORE/seg/1` (a segmentation's level by its short name) was
    'no zarr array or group there', where the local store opens it."""
    from test_remote_volumes import served, tensorstore

    tensorstore()
    ids = RNG.integers(1, 5, (2, 8, 8)).astype(np.uint32)
    write_volume(tmp_path / "s.zarr", "seg", ids, voxel_size=(30, 6, 6), levels=2)
    with served(tmp_path) as url:
        level1 = open_volume(f"{url}/s.zarr/seg/1")
        assert level1.segmentation and level1.voxel_size == (30.0, 12.0, 12.0)


def test_an_offset_just_off_whole_voxels_shows_how_far_off(tmp_path: Path) -> None:
    """The message said 'puts it [0, 100000, 0] voxels from the origin, not a whole number'
    for 99999.9955 voxels (numbers shown to six digits)."""
    store = hand_written(tmp_path / "t.zarr", np.zeros((2, 4, 4), np.uint8), axes("zyx"),
                         [placed([30, 6.666667, 6.666667], [0, 666666.67, 0])])
    with pytest.raises(VolumeError, match=r"puts it \[0, 99999\.99\d*, 0\] voxels from the "
                                          r"origin, not a whole number"):
        open_volume(store)


def test_mixed_length_units_each_become_nm(tmp_path: Path) -> None:
    store = hand_written(tmp_path / "m.zarr", np.zeros((2, 4, 4), np.uint8),
                         [{"name": "z", "type": "space", "unit": "micrometer"},
                          *axes("yx", "nanometer")], [placed([0.03, 6, 6], [0.06, 12, 0])])
    assert (open_volume(store).voxel_size, open_volume(store).offset) == ((30.0, 6.0, 6.0),
                                                                          (2, 2, 0))
