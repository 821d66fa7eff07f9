"""N5 pyramid levels placed from their group's attributes: a group's offset (paintera's, level
0's) puts a coarser level half a level-0 voxel per factor on, in whole voxels of that level
plus a sub-voxel shift; n5-viewer's root attributes give every channel group its voxel size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from n5_writing import n5_attrs, n5_dataset, voxel_0_at

from emrun.io import open_volume
from emrun.io.volume import VolumeError

IMAGE = np.arange(16 * 16 * 16, dtype=np.uint8).reshape(16, 16, 16)  # z, y, x


def _paintera(tmp_path: Path, offset: list[float]) -> Path:
    """A paintera-like group: `resolution` [4, 4, 4] nm and `offset` (x, y, z) on the group
    only, levels s0..s2 with their own downsamplingFactors."""
    group = tmp_path / "p.n5" / "raw" / "data"
    n5_attrs(tmp_path / "p.n5", n5="2.0.0")
    n5_attrs(group, multiScale=True, resolution=[4, 4, 4], offset=offset)
    n5_dataset(group / "s0", IMAGE)
    n5_dataset(group / "s1", IMAGE[::2, ::2, ::2].copy(), downsamplingFactors=[2, 2, 2])
    n5_dataset(group / "s2", IMAGE[::4, ::4, ::4].copy(), downsamplingFactors=[4, 4, 4])
    return group


def test_every_level_of_a_group_with_an_offset_opens_at_the_size_it_is_listed(
        tmp_path: Path) -> None:
    """The level list (what --level picks from) and opening each level agree: s1 and s2
    were listed at 8 and 16 nm and then refused for the group's 40 nm offset."""
    group = _paintera(tmp_path, [40, 40, 40])
    levels = open_volume(str(group)).levels()
    assert [level.voxel_size for level in levels] == [(4.0,) * 3, (8.0,) * 3, (16.0,) * 3]
    for level in levels:
        volume = open_volume(level.path)
        assert volume.voxel_size == level.voxel_size
    assert open_volume(levels[0].path).offset == (10, 10, 10)  # level 0 is unmoved
    assert open_volume(levels[0].path).shift_nm is None


def test_a_level_takes_whole_voxels_of_its_own_and_a_shift_under_half_a_voxel(
        tmp_path: Path) -> None:
    """Offset (x, y, z) [40, 0, 400] nm: s2 (16 nm) lies 6 nm on, at 46, 6 and 406 nm: 3, 0
    and 25 voxels of s2 and shifts of -2, 6 and 6 nm (z, y, x order reverses them)."""
    group = _paintera(tmp_path, [40, 0, 400])
    volume = open_volume(str(group / "s2"))
    assert volume.offset == (25, 0, 3)
    assert volume.shift_nm == pytest.approx((6.0, 6.0, -2.0))
    assert voxel_0_at(str(group / "s2")) == pytest.approx((406.0, 6.0, 46.0))


def test_an_n5_viewer_group_offset_in_micrometres_places_anisotropic_levels(
        tmp_path: Path) -> None:
    """pixelResolution in um with the offset in its unit, factors [2, 2, 1] (x, y, z): s1
    lies half a level-0 voxel on in x and y only, where z was not downsampled."""
    group = tmp_path / "v.n5" / "c0"
    n5_attrs(tmp_path / "v.n5", n5="2.0.0")
    n5_attrs(group, scales=[[1, 1, 1], [2, 2, 1]], offset=[0.012, 0.008, 0.08],
           pixelResolution={"unit": "um", "dimensions": [0.004, 0.004, 0.04]})
    n5_dataset(group / "s0", IMAGE)
    n5_dataset(group / "s1", IMAGE[:, ::2, ::2].copy())
    s1 = open_volume(str(group / "s1"))
    assert s1.voxel_size == pytest.approx((40.0, 8.0, 8.0))
    assert voxel_0_at(str(group / "s1")) == pytest.approx((80.0, 10.0, 14.0))
    assert s1.shift_nm is not None and s1.shift_nm[0] == 0.0  # z: factor 1, no shift


def test_a_group_offset_between_level_0_voxels_is_refused_on_every_level(
        tmp_path: Path) -> None:
    """The group's offset is level 0's: 2 nm at 4 nm voxels is refused on s0, and on s1 it
    is not quietly moved into a shift: the message says the offset is level 0's."""
    group = _paintera(tmp_path, [2, 0, 0])
    with pytest.raises(VolumeError, match="not a whole number of voxels"):
        open_volume(str(group / "s0"))
    for level in ("s1", "s2"):
        with pytest.raises(VolumeError, match=r"level 0's.*not a whole number of voxels"):
            open_volume(str(group / level))


def test_a_levels_own_offset_is_not_taken_for_level_0s(tmp_path: Path) -> None:
    """Only an inherited offset is level 0's: s1 with its own offset 16 nm keeps it as its
    voxel 0's (plus the half voxel per factor every n5-viewer level gets), as before."""
    group = _paintera(tmp_path, [40, 40, 40])
    n5_attrs(group / "s1", offset=[16, 16, 16])
    volume = open_volume(str(group / "s1"))
    assert volume.offset == (2, 2, 2)
    assert voxel_0_at(str(group / "s1")) == pytest.approx((18.0,) * 3)


def test_n5_viewer_root_defaults_reach_every_channel_and_its_level_list(
        tmp_path: Path) -> None:
    """The root's pixelResolution (n5-viewer's defaults) gives c0 and c1 their sizes, levels
    listed and opened alike; a channel's own pixelResolution wins over the root's."""
    root = tmp_path / "v.n5"
    n5_attrs(root, n5="2.0.0", scales=[[1, 1, 1], [2, 2, 1]],
           pixelResolution={"unit": "nm", "dimensions": [4, 4, 40]})
    for channel in ("c0", "c1"):
        n5_dataset(root / channel / "s0", IMAGE)
        n5_dataset(root / channel / "s1", IMAGE[:, ::2, ::2].copy())
    n5_attrs(root / "c1", pixelResolution={"unit": "nm", "dimensions": [5, 5, 50]})
    levels = open_volume(str(root / "c0")).levels()
    assert [level.voxel_size for level in levels] == [(40.0, 4.0, 4.0), (40.0, 8.0, 8.0)]
    assert [open_volume(level.path).voxel_size for level in levels] == [
        level.voxel_size for level in levels]
    assert open_volume(str(root / "c1" / "s1")).voxel_size == (50.0, 10.0, 10.0)


def test_a_roots_resolution_comes_with_its_units(tmp_path: Path) -> None:
    """A root `resolution` with `units` (neuroglancer's N5 convention) is taken together: the
    size in um read as nm (0.004 nm) would be a thousand times off."""
    root = tmp_path / "u.n5"
    n5_attrs(root, n5="2.0.0", resolution=[0.004, 0.004, 0.04], units=["um", "um", "um"])
    n5_dataset(root / "c0" / "s0", IMAGE)
    n5_dataset(root / "c0" / "s1", IMAGE[::2, ::2, ::2].copy(), downsamplingFactors=[2, 2, 2])
    assert open_volume(str(root / "c0")).voxel_size == pytest.approx((40.0, 4.0, 4.0))
    assert open_volume(str(root / "c0" / "s1")).voxel_size == pytest.approx((80.0, 8.0, 8.0))


def test_an_output_made_from_a_coarser_level_lies_where_the_level_lies(
        tmp_path: Path) -> None:
    """An output carries its input's offset and shift: made from s2 of a group offset by
    40 nm, it reopens at 46 nm (a negative shift, -2 nm, survives the OME round trip)."""
    from emrun.io.write import create_volume

    level = open_volume(str(_paintera(tmp_path, [40, 40, 40]) / "s2"))
    create_volume(tmp_path / "out.zarr", "pred", level.shape, "uint8",
                  voxel_size=level.voxel_size, offset=level.offset, shift_nm=level.shift_nm)
    assert voxel_0_at(str(tmp_path / "out.zarr" / "pred")) == pytest.approx((46.0,) * 3)
