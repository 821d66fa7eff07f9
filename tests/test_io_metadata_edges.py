"""Volume metadata at its edges: voxel-size metadata that cannot be read gives way to a size
the user states (and is one clear error without one); COSEM's N5 `transform` and
BigDataViewer's ViewRegistrations place a volume."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from n5_writing import n5_attrs, n5_dataset, voxel_0_at
from typer.testing import CliRunner

from emrun.cli import app
from emrun.io import VolumeError, open_volume
from emrun.io.convert import convert
from emrun.io.metadata import MetadataIgnored, stated_voxel_size

RNG = np.random.default_rng(11)
IMAGE = RNG.integers(0, 255, (4, 8, 8), dtype=np.uint8)  # z, y, x
COARSE = IMAGE[:, ::2, ::2].copy()
STATED = (30.0, 6.0, 6.0)


# ============================================ 1. HDF5 element_size_um that cannot be read


def _h5(tmp_path: Path, **attrs: Any) -> str:
    path = tmp_path / "fiji.h5"
    with h5py.File(path, "w") as f:
        node = f.create_dataset("raw", data=IMAGE)
        for key, value in attrs.items():
            node.attrs[key] = value
    return f"{path}/raw"


BAD_ELEMENT_SIZES = [
    pytest.param([0.03, 0.006], id="two values"),
    pytest.param([0.03, 0.006, 0.006, 1.0], id="four values"),
    pytest.param("0.03 0.006 0.006", id="a string"),
    pytest.param([math.nan, 0.006, 0.006], id="NaN"),
    pytest.param([0.0, 0.006, 0.006], id="zero"),
    pytest.param([0.03, -0.006, 0.006], id="negative"),
]


@pytest.mark.parametrize("value", BAD_ELEMENT_SIZES)
def test_a_bad_element_size_is_one_error_that_names_the_override(tmp_path: Path,
                                                                 value: Any) -> None:
    """The volume, the attribute, what is wrong, and that --voxel-size overrides it."""
    path = _h5(tmp_path, element_size_um=value)
    with pytest.raises(VolumeError, match=r"fiji\.h5/raw: attribute element_size_um .* is not "
                                          r"three positive numbers.*--voxel-size Z Y X \(nm\), "
                                          r"which overrides it") as caught:
        open_volume(path)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("value", BAD_ELEMENT_SIZES)
def test_a_stated_voxel_size_replaces_a_bad_element_size(tmp_path: Path, value: Any) -> None:
    """It made the volume unopenable even where the user gave its size."""
    path = _h5(tmp_path, element_size_um=value)
    with pytest.warns(MetadataIgnored, match=r"fiji\.h5/raw: attribute element_size_um .*: "
                                             r"ignored, the stated voxel size \[30, 6, 6\]"):
        volume = open_volume(path, voxel_size=STATED)
    assert volume.voxel_size == STATED
    np.testing.assert_array_equal(volume.read(), IMAGE)


def test_a_stated_voxel_size_places_a_funlib_offset_in_nm(tmp_path: Path) -> None:
    path = _h5(tmp_path, element_size_um="bad", offset=[60, 12, 18])
    with pytest.warns(MetadataIgnored), stated_voxel_size(STATED):
        assert open_volume(path).offset == (2, 2, 3)


def test_a_stated_voxel_size_leaves_readable_metadata_alone(tmp_path: Path,
                                                            recwarn: pytest.WarningsRecorder
                                                            ) -> None:
    path = _h5(tmp_path, element_size_um=np.array([0.04, 0.004, 0.004], np.float32))
    assert open_volume(path, voxel_size=STATED).voxel_size == (40.0, 4.0, 4.0)
    assert not [w for w in recwarn if issubclass(w.category, MetadataIgnored)]


def test_the_cli_reports_a_bad_element_size_as_a_user_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["data", "convert", _h5(tmp_path, element_size_um="x"),
                                      str(tmp_path / "out.zarr")])
    assert result.exit_code == 2
    assert "element_size_um" in result.stderr and "--voxel-size" in result.stderr


def test_data_convert_with_a_voxel_size_converts_a_bad_element_size(tmp_path: Path) -> None:
    """`data convert --voxel-size` was refused by the very metadata the size overrides."""
    out = tmp_path / "out.zarr"
    result = CliRunner().invoke(app, ["data", "convert", _h5(tmp_path, element_size_um="x"),
                                      str(out), "--voxel-size", "30", "6", "6"])
    assert result.exit_code == 0, result.output
    assert "element_size_um" in result.stderr
    converted = open_volume(f"{out}/{result.stdout.split(f'{out}/')[1].split(':')[0]}")
    assert converted.voxel_size == STATED
    np.testing.assert_array_equal(converted.read(), IMAGE)


def test_convert_with_a_voxel_size_reads_past_a_bad_element_size(tmp_path: Path) -> None:
    result = convert(_h5(tmp_path, element_size_um="x"), tmp_path / "out.zarr",
                     voxel_size=STATED, progress=False)
    assert result.voxel_size == STATED


# ============================================ 2. COSEM's N5 `transform`


def _transform(scale: list[float], translate: list[float], axes: str = "zyx",
               unit: str = "nm", **extra: Any) -> dict[str, Any]:
    return {"axes": list(axes), "scale": scale, "translate": translate,
            "units": [unit] * len(axes), **extra}


def _cosem(tmp_path: Path, transforms: list[dict[str, Any]], *, on_levels: bool = True
           ) -> Path:
    """A COSEM multiscale group (OpenOrganelle's): s0, s1 with their transforms, listed in
    the group's `multiscales` too, and no other voxel size anywhere."""
    group = tmp_path / "cosem.n5" / "em" / "fibsem-uint8"
    for index, (data, transform) in enumerate(zip((IMAGE, COARSE), transforms, strict=True)):
        extra = {"transform": transform} if on_levels else {}
        n5_dataset(group / f"s{index}", data, **extra)
    n5_attrs(group, multiscales=[{"name": "fibsem-uint8", "datasets": [
        {"path": f"s{i}", "transform": t} for i, t in enumerate(transforms)]}])
    return group


LEVEL_0 = _transform([30.0, 4.0, 4.0], [60.0, 8.0, 12.0])
LEVEL_1 = _transform([30.0, 8.0, 8.0], [60.0, 10.0, 14.0])  # the half-voxel shift


@pytest.mark.parametrize("on_levels", [True, False], ids=["on the levels", "listed only"])
def test_a_cosem_transform_gives_each_levels_size_and_place(tmp_path: Path,
                                                            on_levels: bool) -> None:
    """It was not read: the size was unknown and the volume lay at the origin."""
    group = _cosem(tmp_path, [LEVEL_0, LEVEL_1], on_levels=on_levels)
    whole = open_volume(group)
    assert whole.voxel_size == (30.0, 4.0, 4.0)
    assert whole.offset == (2, 2, 3)
    assert [level.voxel_size for level in whole.levels()] == [(30.0, 4.0, 4.0),
                                                                (30.0, 8.0, 8.0)]
    assert voxel_0_at(str(group / "s1")) == pytest.approx((60.0, 10.0, 14.0))
    np.testing.assert_array_equal(open_volume(group / "s1").read(), COARSE)


def test_a_cosem_transform_in_x_y_z_order_and_micrometres(tmp_path: Path) -> None:
    """N5 tools list the axes x, y, z (order F); the names say which value is z."""
    group = _cosem(tmp_path, [
        _transform([0.004, 0.004, 0.03], [0.012, 0.008, 0.06], "xyz", "um", order="F"),
        _transform([0.008, 0.008, 0.03], [0.014, 0.010, 0.06], "xyz", "micrometer",
                   order="F")])
    volume = open_volume(group)
    assert volume.voxel_size == pytest.approx((30.0, 4.0, 4.0))
    assert volume.offset == (2, 2, 3)
    assert voxel_0_at(str(group / "s1")) == pytest.approx((60.0, 10.0, 14.0))


def test_a_finest_level_between_voxels_is_refused(tmp_path: Path) -> None:
    group = _cosem(tmp_path, [_transform([30.0, 4.0, 4.0], [0.0, 2.0, 0.0]), LEVEL_1])
    with pytest.raises(VolumeError, match=r"fibsem-uint8: transform translate .* not a whole "
                                          r"number"):
        open_volume(group)


def test_a_cosem_transform_that_cannot_be_read_names_the_override(tmp_path: Path) -> None:
    group = _cosem(tmp_path, [_transform([30.0, 4.0, 4.0], [0.0, 0.0, 0.0], unit="furlong"),
                              LEVEL_1])
    with pytest.raises(VolumeError, match=r"fibsem-uint8: attribute transform has unknown unit "
                                          r"'furlong'.*"
                                          r"--voxel-size"):
        open_volume(group)
    with pytest.warns(MetadataIgnored, match="attribute transform"):
        assert open_volume(group, voxel_size=STATED).voxel_size == STATED


# ============================================ 3. BigDataViewer's ViewRegistrations


FACTORS = [[1, 1, 1], [2, 2, 1]]  # x, y, z


def _bdv(tmp_path: Path, unit: str, size: str, transforms: list[str]) -> Path:
    """A BigDataViewer N5 export (the voxel size in the XML only) whose setup 0, timepoint 0
    is registered by `transforms` (affines, first listed applied last)."""
    container = tmp_path / "dataset.n5"
    for index, data in enumerate((IMAGE, COARSE)):
        n5_dataset(container / "setup0" / "timepoint0" / f"s{index}", data)
    n5_attrs(container / "setup0", downsamplingFactors=FACTORS, dataType="uint8")
    views = "".join(f'<ViewTransform type="affine"><Name>t{i}</Name><affine>{affine}</affine>'
                    "</ViewTransform>" for i, affine in enumerate(transforms))
    (tmp_path / "dataset.xml").write_text(
        '<?xml version="1.0" encoding="UTF-8"?>\n<SpimData version="0.2">'
        '<BasePath type="relative">.</BasePath><SequenceDescription>'
        '<ImageLoader format="bdv.n5" version="1.0"><n5 type="relative">dataset.n5</n5>'
        "</ImageLoader><ViewSetups><ViewSetup><id>0</id><name>0</name><size>8 8 4</size>"
        f"<voxelSize><unit>{unit}</unit><size>{size}</size></voxelSize></ViewSetup>"
        "</ViewSetups></SequenceDescription><ViewRegistrations>"
        '<ViewRegistration timepoint="0" setup="1"><ViewTransform type="affine">'
        "<affine>1 0 0 99 0 1 0 99 0 0 1 99</affine></ViewTransform></ViewRegistration>"
        f'<ViewRegistration timepoint="0" setup="0">{views}</ViewRegistration>'
        "</ViewRegistrations></SpimData>\n", encoding="utf-8")
    return container / "setup0" / "timepoint0"


CALIBRATION = "4 0 0 0 0 4 0 0 0 0 30 0"
TRANSLATION = "1 0 0 8 0 1 0 12 0 0 1 60"  # world units: x 2, y 3, z 2 voxels


def test_a_registration_places_the_view_as_bigdataviewer_does(tmp_path: Path) -> None:
    """Its translation (applied after the calibration listed below it) was not read; the
    view's coarser level lies half a voxel per factor on."""
    group = _bdv(tmp_path, "nm", "4 4 30", [TRANSLATION, CALIBRATION])
    volume = open_volume(group)
    assert volume.voxel_size == (30.0, 4.0, 4.0)
    assert volume.offset == (2, 3, 2)
    assert voxel_0_at(str(group / "s1")) == pytest.approx((60.0, 14.0, 10.0))


def test_bigstitchers_world_in_pixel_widths_gives_the_same_place(tmp_path: Path) -> None:
    """BigStitcher's world unit is a pixel's width (calibration 1, 1, z/x): the offset is
    the translation over the scale, the size voxelSize's."""
    group = _bdv(tmp_path, "µm", "0.004 0.004 0.03", ["1 0 0 2 0 1 0 3 0 0 7.5 15"])
    volume = open_volume(group)
    assert volume.voxel_size == pytest.approx((30.0, 4.0, 4.0))
    assert volume.offset == (2, 3, 2)


@pytest.mark.parametrize("affine, why", [
    ("0 -4 0 0 4 0 0 0 0 0 30 0", "rotates, shears or flips"),
    ("4 0 0 2 0 4 0 0 0 0 30 0", "not whole voxels"),
])
def test_a_registration_emrun_cannot_represent_is_ignored_with_a_warning(
        tmp_path: Path, affine: str, why: str) -> None:
    group = _bdv(tmp_path, "nm", "4 4 30", [affine])
    with pytest.warns(MetadataIgnored, match=why):
        volume = open_volume(group)
    assert volume.voxel_size == (30.0, 4.0, 4.0)
    assert volume.offset in (None, (0, 0, 0))


def test_an_unknown_bdv_unit_names_the_volume_and_the_override(tmp_path: Path) -> None:
    """It was "unknown spatial unit", naming the XML only, and nothing could open it."""
    group = _bdv(tmp_path, "furlong", "4 4 30", [CALIBRATION])
    with pytest.raises(VolumeError, match=r"dataset\.n5/setup0/timepoint0: .*dataset\.xml: "
                                          r"ViewSetup 0's voxelSize: unit 'furlong' .*"
                                          r"--voxel-size"):
        open_volume(group)
    with pytest.warns(MetadataIgnored, match="furlong"):
        volume = open_volume(group, voxel_size=STATED)
    assert volume.voxel_size == STATED
    assert [level.voxel_size for level in volume.levels()] == [STATED, (30.0, 12.0, 12.0)]
