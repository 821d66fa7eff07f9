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
import tifffile
import zarr
from n5_writing import n5_attrs, n5_dataset, voxel_0_at
from typer.testing import CliRunner

from emrun.cli import app
from emrun.data.checks import check_data
from emrun.data.sources import open_volume_source
from emrun.io import VolumeError, open_volume
from emrun.io.convert import convert
from emrun.io.metadata import MetadataIgnored, stated_voxel_size
from emrun.recipe import load_recipe
from emrun.recipe.data import VolumeSource

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


# ============================================ 4. funlib voxel_size / resolution that cannot be read


def _zarr(tmp_path: Path, **attrs: Any) -> str:
    root = zarr.open_group(tmp_path / "f.zarr", mode="w")
    array = root.create_array("raw", shape=IMAGE.shape, dtype=IMAGE.dtype)
    array[...] = IMAGE
    array.attrs.update(attrs)
    return f"{tmp_path / 'f.zarr'}/raw"


BAD_FUNLIB_SIZES = [
    pytest.param("30,6,6", "must be a list of numbers", id="a string"),
    pytest.param([30, 6, 6, 6, 6], "has 5 values for a 3-d array", id="five values"),
    pytest.param([30, 0, 6], r"\[30.0, 0.0, 6.0\] must be positive", id="zero"),
    pytest.param([30, -6, 6], "must be positive", id="negative"),
    pytest.param([30, "six", 6], "contains a non-number 'six'", id="a word"),
    pytest.param([3e-8, 6e-9, 6e-9], "is not in nm", id="metres"),
]


@pytest.mark.parametrize("value, says", BAD_FUNLIB_SIZES)
@pytest.mark.parametrize("key", ["voxel_size", "resolution"])
def test_a_bad_funlib_voxel_size_is_one_error_that_names_the_override(
        tmp_path: Path, key: str, value: Any, says: str) -> None:
    """It was refused without a word of --voxel-size, which could not override it."""
    with pytest.raises(VolumeError, match=rf"f\.zarr/raw: attribute {key} .*{says}.*"
                                          r"--voxel-size Z Y X \(nm\), which overrides it"
                       ) as caught:
        open_volume(_zarr(tmp_path, **{key: value}))
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("value, says", BAD_FUNLIB_SIZES)
def test_a_stated_voxel_size_replaces_a_bad_funlib_voxel_size(tmp_path: Path, value: Any,
                                                               says: str) -> None:
    """The stated size wins with a warning, and places the funlib offset (nm)."""
    path = _zarr(tmp_path, voxel_size=value, offset=[60, 12, 18])
    with pytest.warns(MetadataIgnored, match=r"attribute voxel_size .*: ignored, the stated "
                                             r"voxel size \[30, 6, 6\] nm is used"):
        volume = open_volume(path, voxel_size=STATED)
    assert (volume.voxel_size, volume.offset) == (STATED, (2, 2, 3))
    np.testing.assert_array_equal(volume.read(), IMAGE)


def test_a_nan_hdf5_resolution_gives_way_to_a_stated_size(tmp_path: Path) -> None:
    path = _h5(tmp_path, resolution=np.array([np.nan, 6.0, 6.0]))
    with pytest.raises(VolumeError, match=r"attribute resolution contains a non-finite value "
                                          r"nan.*--voxel-size"):
        open_volume(path)
    with pytest.warns(MetadataIgnored, match="attribute resolution"):
        assert open_volume(path, voxel_size=STATED).voxel_size == STATED


def test_a_stated_size_leaves_a_readable_funlib_size_alone(
        tmp_path: Path, recwarn: pytest.WarningsRecorder) -> None:
    """A stated size replaces only metadata that cannot be read."""
    path = _zarr(tmp_path, voxel_size=[40, 4, 4], offset=[80, 8, 8])
    volume = open_volume(path, voxel_size=STATED)
    assert (volume.voxel_size, volume.offset) == ((40.0, 4.0, 4.0), (2, 2, 2))
    assert not [w for w in recwarn if issubclass(w.category, MetadataIgnored)]


def test_the_warning_is_said_once_per_opening(tmp_path: Path) -> None:
    path = _zarr(tmp_path, voxel_size="bad")
    with pytest.warns(MetadataIgnored) as said, stated_voxel_size(STATED):
        open_volume(path)
        open_volume(path)
    assert len([w for w in said if issubclass(w.category, MetadataIgnored)]) == 1


# ============================================ 5. N5 resolution / pixelResolution


@pytest.mark.parametrize("attrs, says", [
    ({"resolution": [6, 6, 0]}, r"attribute resolution .*must be positive"),
    ({"resolution": "6 6 30"}, "attribute resolution must be a list of numbers"),
    ({"pixelResolution": {"dimensions": [6, None, 30], "unit": "nm"}},
     "attribute pixelResolution contains a non-number None"),
    ({"resolution": [6, 6, 30, 1]}, "attribute resolution has 4 values for a 3-d array"),
    ({"pixelResolution": {"dimensions": [6, 6, 30], "unit": "furlong"}},
     "attribute pixelResolution 'furlong': not a length unit"),
    ({"resolution": [6, 6, 30], "units": ["nm", "nm", "furlong"]},
     "attribute units 'furlong': not a length unit"),
])
def test_a_bad_n5_resolution_names_the_override_and_gives_way_to_it(
        tmp_path: Path, attrs: dict[str, Any], says: str) -> None:
    """An unknown unit was "unknown spatial unit", a bad size refused: neither overridable."""
    path = tmp_path / "v.n5" / "raw"
    n5_dataset(path, IMAGE, **attrs)
    with pytest.raises(VolumeError, match=rf"v\.n5/raw: {says}.*--voxel-size"):
        open_volume(path)
    with pytest.warns(MetadataIgnored, match="ignored, the stated voxel size"):
        assert open_volume(path, voxel_size=STATED).voxel_size == STATED


def test_a_bad_n5_pixel_resolution_gives_each_level_the_stated_size_times_its_factors(
        tmp_path: Path) -> None:
    """The stated size is the finest level's, as a level's pixelResolution is."""
    group = tmp_path / "viewer.n5" / "raw"
    pixel = {"dimensions": [6, 6, 30], "unit": "furlong"}
    for index, (data, factors) in enumerate(((IMAGE, [1, 1, 1]), (COARSE, [2, 2, 1]))):
        n5_dataset(group / f"s{index}", data, downsamplingFactors=factors,
                   pixelResolution=pixel, offset=[12, 12, 60])
    with pytest.warns(MetadataIgnored), stated_voxel_size(STATED):
        volume = open_volume(group)
        assert [level.voxel_size for level in volume.levels()] == [STATED, (30.0, 12.0, 12.0)]
        assert volume.offset in (None, (0, 0, 0))  # in furlongs: not read
        assert open_volume(group / "s1").voxel_size == (30.0, 12.0, 12.0)


# ============================================ 6. OME-Zarr scales that cannot be read


def _ome(tmp_path: Path, scales: list[Any]) -> Path:
    """An OME-Zarr 0.5 image of levels s0 (IMAGE) and s1 (COARSE) with these scales."""
    store = tmp_path / "o.zarr"
    group = zarr.open_group(store, mode="w")
    for index, data in enumerate((IMAGE, COARSE)):
        group.create_array(f"s{index}", shape=data.shape, dtype=data.dtype)[...] = data
    group.attrs["ome"] = {"version": "0.5", "multiscales": [{
        "axes": [{"name": n, "type": "space", "unit": "nanometer"} for n in "zyx"],
        "datasets": [{"path": f"s{i}", "coordinateTransformations": [
            {"type": "scale", "scale": s}]} for i, s in enumerate(scales)]}]}
    return store


BAD_OME_SCALES = [
    pytest.param([30, 6], r"OME-Zarr scale \[30, 6\] does not have one value per axis \(3\)",
                 id="two values"),
    pytest.param([30, 0, 6], r"multiscales scale \[30.0, 0.0, 6.0\] must be positive",
                 id="zero"),
    pytest.param([30, -6, 6], "multiscales scale .* must be positive", id="negative"),
    pytest.param([30, "NaN", 6], "OME-Zarr scale contains a non-finite value 'NaN'",
                 id="NaN"),
    pytest.param([30, "6 nm", 6], "OME-Zarr scale contains a non-number '6 nm'",
                 id="a string"),
]


@pytest.mark.parametrize("bad, says", BAD_OME_SCALES)
def test_a_bad_ome_scale_is_one_error_that_names_the_override(tmp_path: Path, bad: Any,
                                                              says: str) -> None:
    store = _ome(tmp_path, [bad, [30, 12, 12]])
    with pytest.raises(VolumeError, match=rf"o\.zarr: {says}.*--voxel-size Z Y X \(nm\)"
                       ) as caught:
        open_volume(store)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("bad, says", BAD_OME_SCALES)
def test_a_stated_size_replaces_bad_ome_scales_at_every_level(tmp_path: Path, bad: Any,
                                                              says: str) -> None:
    """Every level's scale unreadable: the stated size is the finest level's, and a coarser
    level's is it times the factor its shape gives (y and x halved here)."""
    store = _ome(tmp_path, [bad, bad])
    with pytest.warns(MetadataIgnored, match=r"ignored, the stated voxel size \[30, 6, 6\]"), \
            stated_voxel_size(STATED):
        volume = open_volume(store)
        assert volume.voxel_size == STATED
        assert [level.voxel_size for level in volume.levels()] == [STATED, (30.0, 12.0, 12.0)]
        assert open_volume(f"{store}/s1").voxel_size == (30.0, 12.0, 12.0)
    np.testing.assert_array_equal(volume.read(), IMAGE)


def test_a_stated_size_leaves_readable_ome_scales_alone(
        tmp_path: Path, recwarn: pytest.WarningsRecorder) -> None:
    store = _ome(tmp_path, [[40, 4, 4], [40, 8, 8]])
    volume = open_volume(store, voxel_size=STATED)
    assert volume.voxel_size == (40.0, 4.0, 4.0)
    assert not [w for w in recwarn if issubclass(w.category, MetadataIgnored)]


# ============================================ 7. ImageJ TIFF metadata that cannot be read


def _imagej(tmp_path: Path, spacing: Any, unit: str,
            resolution: tuple[float, float] = (1 / 0.006, 1 / 0.006)) -> Path:
    path = tmp_path / "ij.tif"
    tifffile.imwrite(path, IMAGE, imagej=True, resolution=resolution,
                     metadata={"spacing": spacing, "unit": unit, "axes": "ZYX"})
    return path


@pytest.mark.parametrize("spacing, unit, says", [
    pytest.param(0.03, "furlong", "unit 'furlong' is not a length unit", id="unknown unit"),
    pytest.param("thick", "micron", "spacing 'thick' is not a positive number", id="a word"),
    pytest.param(-0.03, "micron", "spacing -0.03 is not a positive number", id="negative"),
    pytest.param(0, "micron", "spacing 0 is not a positive number", id="zero"),
])
def test_bad_imagej_metadata_names_the_override_and_gives_way_to_it(
        tmp_path: Path, spacing: Any, unit: str, says: str) -> None:
    """A spacing that is no number was a ValueError ("cannot open as TIFF: could not
    convert"); a zero or negative one a voxel size of 0 or less; an unknown unit unsaid."""
    path = _imagej(tmp_path, spacing, unit)
    with pytest.raises(VolumeError, match=rf"ij\.tif: ImageJ metadata {says}.*--voxel-size"):
        open_volume(path)
    with pytest.warns(MetadataIgnored, match="ImageJ metadata"):
        assert open_volume(path, voxel_size=STATED).voxel_size == STATED


def test_readable_imagej_metadata_is_read_as_before(tmp_path: Path) -> None:
    assert open_volume(_imagej(tmp_path, 0.03, "micron")).voxel_size == (30.0, 6.0, 6.0)
    assert open_volume(_imagej(tmp_path, 1, "pixel")).voxel_size is None


# ============================================ 8. a recipe source's voxel_size is stated


def test_a_recipe_voxel_size_opens_a_training_volume_with_bad_metadata(tmp_path: Path) -> None:
    """Its voxel_size is the user's statement of the size, as --voxel-size is."""
    image = _zarr(tmp_path, voxel_size="bad")
    spec = VolumeSource(image=image, labels=image, voxel_size=STATED)
    with pytest.raises(VolumeError, match=r"voxel_size: \[z, y, x\] \(nm\) in the recipe.s source"):
        open_volume_source(VolumeSource(image=image))
    with pytest.warns(MetadataIgnored):
        source = open_volume_source(spec)
    assert source.voxel_size == STATED and source.image.voxel_size == STATED


def test_a_recipe_voxel_size_leaves_readable_metadata_as_it_says(tmp_path: Path) -> None:
    """A disagreeing recipe size was and is the source's size; the image keeps its
    metadata's, and `emrun check` reports the disagreement."""
    image = _zarr(tmp_path, voxel_size=[40, 4, 4])
    source = open_volume_source(VolumeSource(image=image, voxel_size=STATED))
    assert source.voxel_size == STATED and source.image.voxel_size == (40.0, 4.0, 4.0)


# ============================================ 9. COSEM levels at a stated size


def test_a_stated_size_for_a_bad_cosem_transform_scales_with_each_level(
        tmp_path: Path) -> None:
    """Every level reported the stated size; a coarser one is it times its factors (from
    the shapes here) and lies where COSEM puts it, half a voxel per factor on."""
    bad = _transform([30.0, 4.0, 4.0], [0.0, 0.0, 0.0], unit="furlong")
    group = _cosem(tmp_path, [bad, bad])
    with pytest.warns(MetadataIgnored), stated_voxel_size(STATED):
        volume = open_volume(group)
        assert [level.voxel_size for level in volume.levels()] == [STATED, (30.0, 12.0, 12.0)]
        assert voxel_0_at(str(group / "s0")) == (0.0, 0.0, 0.0)
        assert voxel_0_at(str(group / "s1")) == pytest.approx((0.0, 3.0, 3.0))
        assert "emrun_shape_factors" not in open_volume(group / "s1").attributes()


def test_a_cosem_levels_own_factors_scale_a_stated_size(tmp_path: Path) -> None:
    group = tmp_path / "c.n5" / "em"
    bad = _transform([30.0, 4.0, 4.0], [0.0, 0.0, 0.0], unit="furlong")
    n5_dataset(group / "s0", IMAGE, transform=bad)
    n5_dataset(group / "s1", COARSE, transform=bad, downsamplingFactors=[2, 2, 1])
    with pytest.warns(MetadataIgnored), stated_voxel_size(STATED):
        assert open_volume(group / "s1").voxel_size == (30.0, 12.0, 12.0)


def test_checking_a_recipe_takes_its_voxel_size_as_stated(tmp_path: Path) -> None:
    root = zarr.open_group(tmp_path / "t.zarr", mode="w")
    image = root.create_array("image", shape=(8, 32, 40), dtype="uint8")
    image[...] = RNG.integers(0, 255, (8, 32, 40), dtype=np.uint8)
    image.attrs["voxel_size"] = "bad"
    labels = root.create_array("labels", shape=(8, 32, 40), dtype="uint32")
    labels[...] = np.arange(8 * 32 * 40).reshape(8, 32, 40) // 40 + 1
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: t\ndata:\n  sources:\n    a: {image: " + f"{tmp_path}/t.zarr/image, labels: "
        f"{tmp_path}/t.zarr/labels, voxel_size: [30, 6, 6]}}\n"
        "model: {type: rsunet, widths: [4, 8]}\naugment: none\n"
        "tasks:\n  aff: {target: {type: affinity}}\n"
        "train: {patch: [4, 16, 16], iterations: 1, batch_size: 1, workers: 0}\n",
        encoding="utf-8")
    with pytest.warns(MetadataIgnored):
        found = [str(p) for p in check_data(load_recipe(recipe))[1]]
    assert not [p for p in found if "voxel_size" in p], found


def test_an_unknown_ome_unit_names_the_override_and_gives_way_to_it(tmp_path: Path) -> None:
    """It was "unknown spatial unit", which nothing could override."""
    store = _ome(tmp_path, [[30, 6, 6], [30, 12, 12]])
    group = zarr.open_group(store, mode="r+")
    ome = group.attrs["ome"]
    ome["multiscales"][0]["axes"][1]["unit"] = "furlong"
    group.attrs["ome"] = ome
    with pytest.raises(VolumeError, match=r"o\.zarr: OME-Zarr axis y: unknown spatial unit "
                                          r"'furlong'.*--voxel-size"):
        open_volume(store)
    with pytest.warns(MetadataIgnored, match="furlong"), stated_voxel_size(STATED):
        assert open_volume(store).voxel_size == STATED
        assert [level.voxel_size for level in open_volume(store).levels()] == [
            STATED, (30.0, 12.0, 12.0)]


def test_a_pyramids_levels_say_the_same_problem_once(tmp_path: Path) -> None:
    """Listing the levels read each one's scale again: the same warning, once per level."""
    store = _ome(tmp_path, [[30, "x", 6], [30, "x", 6]])
    with pytest.warns(MetadataIgnored) as said, stated_voxel_size(STATED):
        open_volume(store).levels()
    assert len([w for w in said if issubclass(w.category, MetadataIgnored)]) == 1
