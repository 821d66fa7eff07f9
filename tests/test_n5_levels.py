"""N5 multiscale pyramids (n5-viewer, BigDataViewer/BigStitcher, paintera) as levels: the
group opens at its finest level, lists every level, and `--level` picks one of them."""

from __future__ import annotations

from pathlib import Path

import n5_writing
import numpy as np
import pytest
from n5_writing import n5_attrs, n5_dataset, voxel_0_at
from typer.testing import CliRunner

from emrun.cli import app
from emrun.io import VolumeError, choose_level, open_volume
from emrun.io.convert import convert

RNG = np.random.default_rng(3)
IMAGE = RNG.integers(0, 255, (8, 16, 16), dtype=np.uint8)  # z, y, x
LEVELS = (IMAGE, IMAGE[:, ::2, ::2].copy(), IMAGE[::2, ::4, ::4].copy())
FACTORS = ([1, 1, 1], [2, 2, 1], [4, 4, 2])  # x, y, z, as N5 lists them


def n5_viewer(tmp_path: Path) -> Path:
    """An n5-viewer pyramid: every level its factors and level 0's pixelResolution."""
    return n5_writing.n5_viewer(tmp_path, LEVELS, FACTORS)


def bdv_export(tmp_path: Path) -> Path:
    """BigStitcher's export: factors listed on the setup, `multiScale` and `resolution` on
    the timepoint, the levels with no voxel size or factors of their own."""
    group = tmp_path / "bdv.n5" / "setup0" / "timepoint0"
    for index, data in enumerate(LEVELS):
        n5_dataset(group / f"s{index}", data)
    n5_attrs(group.parent, downsamplingFactors=list(FACTORS), dataType="uint8")
    n5_attrs(group, multiScale=True, resolution=[4.0, 4.0, 30.0])
    return group


def test_an_n5_viewer_group_opens_at_level_0_and_lists_its_levels(tmp_path: Path) -> None:
    """It said 'is an N5 group, not a dataset', and --level 'not a multiscale image'."""
    group = n5_viewer(tmp_path)
    whole = open_volume(group)
    assert whole.shape == (8, 16, 16) and whole.voxel_size == (30.0, 4.0, 4.0)
    assert whole.shift_nm is None
    np.testing.assert_array_equal(whole.read(), IMAGE)
    assert [(lv.name, lv.voxel_size, lv.path) for lv in whole.levels()] == [
        ("s0", (30.0, 4.0, 4.0), f"{group}/s0"), ("s1", (30.0, 8.0, 8.0), f"{group}/s1"),
        ("s2", (60.0, 16.0, 16.0), f"{group}/s2")]
    second = open_volume(f"{group}/s1")  # named directly, as before
    assert second.voxel_size == (30.0, 8.0, 8.0) and second.levels() == whole.levels()
    np.testing.assert_array_equal(second.read(), LEVELS[1])


@pytest.mark.parametrize("level", ["s1", "1", "30,8,8"])
def test_level_picks_a_level_of_an_n5_pyramid_by_name_number_or_voxel_size(
        tmp_path: Path, level: str) -> None:
    group = n5_viewer(tmp_path)
    path = choose_level(str(group), level)
    assert path == f"{group}/s1"
    picked = open_volume(path)
    assert picked.voxel_size == (30.0, 8.0, 8.0) and picked.shift_nm == (0.0, 2.0, 2.0)
    np.testing.assert_array_equal(picked.read(), LEVELS[1])
    assert choose_level(f"{group}/s2", "0") == f"{group}/s0"


def test_a_level_not_there_lists_the_n5_levels(tmp_path: Path) -> None:
    group = n5_viewer(tmp_path)
    with pytest.raises(VolumeError, match=r"no level s5; levels: s0 \(30,4,4 nm\), s1 "
                                          r"\(30,8,8 nm\), s2 \(60,16,16 nm\)"):
        choose_level(str(group), "s5")


def test_a_bigdataviewer_export_takes_the_timepoint_resolution_and_setup_factors(
        tmp_path: Path) -> None:
    """No level carries a voxel size or factors: the timepoint's `resolution` is level 0's,
    the setup's `downsamplingFactors` list scales it; a level named directly agrees."""
    group = bdv_export(tmp_path)
    whole = open_volume(group)
    assert whole.voxel_size == (30.0, 4.0, 4.0)
    assert [lv.voxel_size for lv in whole.levels()] == [
        (30.0, 4.0, 4.0), (30.0, 8.0, 8.0), (60.0, 16.0, 16.0)]
    coarse = open_volume(choose_level(str(group), "60,16,16"))
    assert coarse.voxel_size == (60.0, 16.0, 16.0) and coarse.shift_nm == (15.0, 6.0, 6.0)
    np.testing.assert_array_equal(coarse.read(), LEVELS[2])


def test_a_paintera_group_with_scales_and_multiscale_flag(tmp_path: Path) -> None:
    """Factors from the group's `scales` list, `resolution` in um with its `units`."""
    group = tmp_path / "p.n5" / "volumes" / "raw"
    for index, data in enumerate(LEVELS[:2]):
        n5_dataset(group / f"s{index}", data)
    n5_attrs(group, multiScale=True, scales=[[1, 1, 1], [2, 2, 1]],
           resolution=[0.004, 0.004, 0.03], units=["um", "um", "um"])
    assert [lv.voxel_size for lv in open_volume(group).levels()] == [
        pytest.approx((30.0, 4.0, 4.0)), pytest.approx((30.0, 8.0, 8.0))]
    assert open_volume(choose_level(str(group), "1")).voxel_size == pytest.approx(
        (30.0, 8.0, 8.0))


def test_a_pyramid_at_the_container_root(tmp_path: Path) -> None:
    root = tmp_path / "root.n5"
    for index, (data, factors) in enumerate(zip(LEVELS[:2], FACTORS[:2], strict=True)):
        n5_dataset(root / f"s{index}", data, downsamplingFactors=factors, resolution=[4, 4, 30])
    assert open_volume(root).shape == (8, 16, 16)
    assert choose_level(str(root), "1") == f"{root}/s1"


def test_a_level_whose_factors_disagree_with_its_shape_is_named(tmp_path: Path) -> None:
    """s1 holds half of s0 in y and x but says [4, 4, 1]: read as 16 nm, it is 8 nm."""
    group = tmp_path / "bad.n5" / "g"
    pixel = {"dimensions": [4.0, 4.0, 30.0], "unit": "nm"}
    n5_dataset(group / "s0", LEVELS[0], downsamplingFactors=[1, 1, 1], pixelResolution=pixel)
    n5_dataset(group / "s1", LEVELS[1], downsamplingFactors=[4, 4, 1], pixelResolution=pixel)
    with pytest.raises(VolumeError, match=r"bad.n5/g/s1: N5 multiscale group g: level 's1' "
                                          r"has downsamplingFactors \[4, 4, 1\] .* should be "
                                          r"about 4x4x8"):
        open_volume(group / "s1")
    whole = open_volume(group)  # level 0 still opens; the bad level's size is not made up
    assert [(lv.name, lv.voxel_size) for lv in whole.levels()] == [
        ("s0", (30.0, 4.0, 4.0)), ("s1", None)]
    with pytest.raises(VolumeError, match="should be about 4x4x8"):
        open_volume(choose_level(str(group), "1"))


def test_an_n5_group_without_levels_is_refused_naming_its_datasets(tmp_path: Path) -> None:
    """A group folder without attributes.json read as "has no dataset 'g'"."""
    n5_dataset(tmp_path / "v.n5" / "g" / "raw", IMAGE, resolution=[4, 4, 30])
    with pytest.raises(VolumeError, match=r"is an N5 group, not a dataset; datasets in it: "
                                          r"g/raw"):
        open_volume(tmp_path / "v.n5" / "g")
    with pytest.raises(VolumeError, match="not a multiscale image"):
        choose_level(str(tmp_path / "v.n5" / "g" / "raw"), "1")


def test_a_level_picked_by_level_keeps_its_place_through_an_output(tmp_path: Path) -> None:
    """`data convert GROUP --level 2`: the written level lies where s2 lies (15, 6, 6 nm
    from level 0's voxel 0), not at level 0's place."""
    group = bdv_export(tmp_path)
    result = CliRunner().invoke(app, ["data", "convert", str(group), str(tmp_path / "o.zarr"),
                                      "--name", "coarse", "--level", "2", "--levels", "1"])
    assert result.exit_code == 0, result.output
    assert voxel_0_at(str(tmp_path / "o.zarr/coarse")) == pytest.approx((15.0, 6.0, 6.0))
    assert open_volume(tmp_path / "o.zarr/coarse").voxel_size == (60.0, 16.0, 16.0)
    convert(f"{group}/s1", tmp_path / "d.zarr", name="s1", progress=False, levels=1)
    assert voxel_0_at(str(tmp_path / "d.zarr/s1")) == pytest.approx((0.0, 2.0, 2.0))


def test_an_unknown_level_of_an_n5_pyramid_exits_2_listing_its_levels(
        tmp_path: Path) -> None:
    """The CLI's --level took no N5 group: 'not a multiscale image'."""
    group = n5_viewer(tmp_path)
    result = CliRunner().invoke(app, ["data", "convert", str(group), str(tmp_path / "o.zarr"),
                                      "--level", "s9"])
    assert result.exit_code == 2
    assert "no level s9; levels: s0 (30,4,4 nm), s1 (30,8,8 nm)" in result.output
    assert not (tmp_path / "o.zarr").exists()


def test_a_served_pyramid_on_a_store_that_answers_403_for_missing_keys(
        tmp_path: Path) -> None:
    """An object store refuses (403) the keys looked for past the last level and a group
    without attributes.json: they count as missing, not as 'permission denied'."""
    from test_ome_noticed import forbidding
    from test_remote_volumes import serving

    n5_viewer(tmp_path)
    with serving(forbidding(tmp_path)) as url:
        group = f"{url}/viewer.n5/setup0/timepoint0"
        assert [lv.voxel_size for lv in open_volume(group).levels()] == [
            (30.0, 4.0, 4.0), (30.0, 8.0, 8.0), (60.0, 16.0, 16.0)]
        picked = open_volume(choose_level(group, "1"))
        assert picked.shift_nm == (0.0, 2.0, 2.0)
        np.testing.assert_array_equal(picked.read(), LEVELS[1])
        with pytest.raises(VolumeError, match=r"nothing/attributes.json: cannot be read: "
                                              r".*PERMISSION_DENIED"):
            open_volume(f"{url}/viewer.n5/nothing")


def test_level_n_and_sn_name_the_same_level_in_any_store(tmp_path: Path) -> None:
    """emrun's stores name levels 0, 1; N5 and many OME-Zarr writers s0, s1: `--level s1`
    on the one and `--level 1` on the other said 'no level'. An exact name still wins."""
    from emrun.io.write import write_volume

    write_volume(tmp_path / "e.zarr", "image", IMAGE, voxel_size=(30, 4, 4), levels=2)
    assert choose_level(str(tmp_path / "e.zarr/image"), "s1") == f"{tmp_path}/e.zarr/image/1"
    with pytest.raises(VolumeError, match="no level s2; levels: 0 "):
        choose_level(str(tmp_path / "e.zarr/image"), "s2")
    with pytest.raises(VolumeError, match="no level x1"):
        choose_level(str(tmp_path / "e.zarr/image"), "x1")
