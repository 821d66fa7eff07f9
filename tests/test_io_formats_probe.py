"""Reading volumes as other tools write them: big-endian data, bioformats2raw's 5-d
OME-Zarr, OME axes in another order, offsets between voxels, a TIFF folder with a missing
section, OME metadata without a scale, HDF5 compressed with a filter HDF5 lacks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import tifffile
import zarr

from emrun.geometry import Roi
from emrun.io import VolumeError, convert_volume, open_volume, write_volume
from emrun.io.n5_volume import n5_spatial

SHAPE = (6, 10, 12)
DATA = np.arange(np.prod(SHAPE), dtype=np.uint16).reshape(SHAPE) * 7


# --- big-endian volumes: the dtype is reported, and data read, in native byte order -------


def _big_zarr2(tmp: Path) -> str:
    g = zarr.open_group(tmp / "v2.zarr", mode="w", zarr_format=2)
    g.create_array("be", shape=SHAPE, dtype=">u2", chunks=(3, 5, 6))[:] = DATA.astype(">u2")
    return str(tmp / "v2.zarr/be")


def _big_npy(tmp: Path) -> str:
    np.save(tmp / "be.npy", DATA.astype(">u2"))
    return str(tmp / "be.npy")


def _big_hdf5(tmp: Path) -> str:
    with h5py.File(tmp / "be.h5", "w") as f:
        f.create_dataset("raw", data=DATA.astype(">u2"), chunks=(3, 5, 6))
    return str(tmp / "be.h5/raw")


@pytest.mark.parametrize("write", [_big_zarr2, _big_npy, _big_hdf5])
def test_big_endian_volumes_read_in_native_byte_order(tmp_path: Path, write: Any) -> None:
    volume = open_volume(write(tmp_path))
    assert volume.dtype == np.dtype("=u2") and volume.dtype.isnative
    whole, box = volume.read(), volume.read(Roi((1, 2, 3), (4, 5, 6)))
    assert whole.dtype.isnative and box.dtype.isnative  # torch.from_numpy needs native
    np.testing.assert_array_equal(whole, DATA)
    np.testing.assert_array_equal(box, DATA[1:5, 2:7, 3:9])


def test_big_endian_float_npy(tmp_path: Path) -> None:
    np.save(tmp_path / "f.npy", (DATA / 1000).astype(">f4"))
    volume = open_volume(tmp_path / "f.npy")
    assert volume.dtype == np.float32 and volume.read().dtype.isnative
    np.testing.assert_array_equal(volume.read(), DATA.astype(np.float32) / 1000)


# --- OME-Zarr axes: bioformats2raw's t, c, z, y, x; other orders refused ------------------


def _ome_image(tmp: Path, axes: list[tuple[str, str | None]], data: np.ndarray,
               scale: list[float] | None = None, name: str = "img.zarr") -> str:
    """An OME-Zarr 0.5 image at a store's root, level "0", with the given axes."""
    g = zarr.open_group(tmp / name, mode="w")
    g.create_array("0", shape=data.shape, dtype=data.dtype, chunks=data.shape)[:] = data
    unit = {"space": "micrometer"}
    entries = [{"name": n, **({"type": t} if t else {}),
                **({"unit": unit[t]} if t in unit else {})} for n, t in axes]
    transforms = [{"type": "scale", "scale": scale or [1.0] * data.ndim}]
    g.attrs["ome"] = {"version": "0.5", "multiscales": [{
        "axes": entries, "datasets": [{"path": "0", "coordinateTransformations": transforms}]}]}
    return str(tmp / name)


TCZYX = [("t", "time"), ("c", "channel"), ("z", "space"), ("y", "space"), ("x", "space")]


def test_bioformats2raw_tczyx_drops_the_single_time_point(tmp_path: Path) -> None:
    path = _ome_image(tmp_path, TCZYX, DATA[None, None], [1, 1, 0.03, 0.006, 0.006])
    for volume in (open_volume(path), open_volume(f"{path}/0")):
        assert volume.shape == (1, *SHAPE)  # c, z, y, x: a channel axis, as 4-d volumes
        assert volume.voxel_size == (30.0, 6.0, 6.0) and volume.chunks == (1, *SHAPE)
        np.testing.assert_array_equal(volume.read(), DATA[None])
        np.testing.assert_array_equal(volume.read(Roi((1, 2, 3), (2, 3, 4))),
                                      DATA[None, 1:3, 2:5, 3:7])
        assert [level.voxel_size for level in volume.levels()] == [(30.0, 6.0, 6.0)]
    result = convert_volume(path, tmp_path / "out.zarr", name="image", progress=False)
    assert result.shape == (1, *SHAPE) and result.voxel_size == (30.0, 6.0, 6.0)
    np.testing.assert_array_equal(open_volume(result.path).read(), DATA[None])


def test_time_axis_without_channels_gives_a_3d_volume(tmp_path: Path) -> None:
    axes = [TCZYX[0], *TCZYX[2:]]
    volume = open_volume(_ome_image(tmp_path, axes, DATA[None], [1, 30, 6, 6]))
    assert volume.shape == SHAPE
    np.testing.assert_array_equal(volume.read(), DATA)


def test_a_time_series_is_refused_in_one_line(tmp_path: Path) -> None:
    path = _ome_image(tmp_path, TCZYX, np.stack([DATA[None]] * 3))
    with pytest.raises(VolumeError, match=r"holds 3 time points \(OME-Zarr axes t, c, z, y, x\)"
                       r".*time point you want") as caught:
        open_volume(path)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("names", ["xyz", "zzx", "zyy"])
def test_spatial_axes_in_another_order_are_refused(tmp_path: Path, names: str) -> None:
    path = _ome_image(tmp_path, [(n, "space") for n in names], DATA, [30, 6, 6])
    shown = ", ".join(names)
    with pytest.raises(VolumeError, match=f"img.zarr: its OME-Zarr axes are {shown}; emrun "
                       r"reads the axes \(t,\) \(c,\) z, y, x in that order"):
        open_volume(path)


def test_channels_after_space_are_refused(tmp_path: Path) -> None:
    axes = [("z", "space"), ("y", "space"), ("x", "space"), ("c", "channel")]
    with pytest.raises(VolumeError, match="axes are z, y, x, c"):
        open_volume(_ome_image(tmp_path, axes, DATA[..., None]))


def test_axes_in_emrun_s_order_still_read(tmp_path: Path) -> None:
    czyx = _ome_image(tmp_path, TCZYX[1:], DATA[None], [1, 30, 6, 6], name="czyx.zarr")
    assert open_volume(czyx).shape == (1, *SHAPE)
    yx = _ome_image(tmp_path, [("y", "space"), ("x", "space")], DATA[0], name="yx.zarr")
    np.testing.assert_array_equal(open_volume(yx).read(), DATA[0])
    untyped = _ome_image(tmp_path, [("z", None), ("y", None), ("x", None)], DATA,
                         name="untyped.zarr")
    assert open_volume(untyped).shape == SHAPE


# --- offsets between voxels ---------------------------------------------------------------


def _ome_translated(tmp: Path, translation: list[float]) -> str:
    g = zarr.open_group(tmp / "t.zarr", mode="w")
    g.create_array("0", shape=SHAPE, dtype="uint8")
    g.attrs["ome"] = {"version": "0.5", "multiscales": [{
        "axes": [{"name": n, "type": "space", "unit": "nanometer"} for n in "zyx"],
        "datasets": [{"path": "0", "coordinateTransformations": [
            {"type": "scale", "scale": [30, 6, 6]},
            {"type": "translation", "translation": translation}]}]}]}
    return str(tmp / "t.zarr")


def test_ome_translation_between_voxels_is_refused(tmp_path: Path) -> None:
    with pytest.raises(VolumeError, match=r"t.zarr: OME-Zarr translation \[15, 3, 0\] with "
                       r"scale \[30, 6, 6\] \(z, y, x\) puts it \[0.5, 0.5, 0\] voxels from the "
                       r"origin, not a whole number of voxels.*translation \[0, 0, 0\]\)$"):
        open_volume(_ome_translated(tmp_path, [15, 3, 0]))
    assert open_volume(_ome_translated(tmp_path, [60, 0, 12])).offset == (2, 0, 2)
    # float noise of unit arithmetic is not a shift
    assert open_volume(_ome_translated(tmp_path, [90.0000001, 0, 0])).offset == (3, 0, 0)


def test_funlib_and_n5_offsets_between_voxels_are_refused(tmp_path: Path) -> None:
    g = zarr.open_group(tmp_path / "f.zarr", mode="w")
    g.create_array("a", shape=SHAPE, dtype="uint8").attrs.update(
        {"voxel_size": [30, 6, 6], "offset": [45, 0, 0]})
    with pytest.raises(VolumeError, match=r"offset \[45, 0, 0\] nm with voxel size "
                       r"\[30, 6, 6\] nm .*e\.g\. offset \[60, 0, 0\] nm\)$"):
        open_volume(tmp_path / "f.zarr/a")
    with pytest.raises(VolumeError, match="not a whole number of voxels"):
        n5_spatial("x.n5/raw", 3, {"resolution": [6, 6, 30], "offset": [3, 0, 0]})
    assert n5_spatial("x.n5/raw", 3, {"resolution": [6, 6, 30], "offset": [12, 0, 60]}) == (
        (30.0, 6.0, 6.0), (2, 0, 2))


def test_coarser_levels_keep_their_half_voxel_shift(tmp_path: Path) -> None:
    data = np.zeros((8, 32, 32), np.uint8)
    write_volume(tmp_path / "p.zarr", "image", data, voxel_size=(8, 8, 8), offset=(3, 1, 0),
                 levels=2)
    fine, coarse = open_volume(tmp_path / "p.zarr/image").levels()
    assert open_volume(fine.path).offset == (3, 1, 0)
    assert open_volume(coarse.path).voxel_size == (16.0, 16.0, 16.0)  # opens, rounded


# --- a folder of TIFF sections with a missing number --------------------------------------


def _sections(tmp: Path, numbers: list[int], pattern: str = "section_{:03d}.tif") -> str:
    folder = tmp / "sections"
    folder.mkdir()
    for i, n in enumerate(numbers):
        tifffile.imwrite(folder / pattern.format(n), DATA[i % SHAPE[0]])
    return str(folder)


def test_tiff_folder_with_a_missing_section_is_refused(tmp_path: Path) -> None:
    folder = _sections(tmp_path, [n for n in range(16) if n != 7])
    with pytest.raises(VolumeError, match=r"sections: section number 7 of 0\.\.15 is missing"):
        open_volume(folder)


def test_tiff_folder_gaps_are_all_named(tmp_path: Path) -> None:
    folder = _sections(tmp_path, [1, 2, 5, 6, 9], "s{}.tiff")
    with pytest.raises(VolumeError, match=r"section numbers 3, 4, 7, 8 of 1\.\.9 are missing"):
        open_volume(folder)


def test_tiff_folder_numbered_by_a_step_or_twice(tmp_path: Path) -> None:
    stepped = _sections(tmp_path, [0, 30, 60, 90], "z{}nm.tif")  # numbered by depth
    assert open_volume(stepped).shape == (4, *SHAPE[1:])
    (tmp_path / "sections" / "z60nm.tif").unlink()
    with pytest.raises(VolumeError, match=r"section number 60 of 0\.\.90 is missing"):
        open_volume(stepped)
    twice = tmp_path / "twice"
    twice.mkdir()
    for name in ("s_1.tif", "s_01.tif", "s_2.tif"):
        tifffile.imwrite(twice / name, DATA[0])
    with pytest.raises(VolumeError, match="carry the same number 1"):
        open_volume(twice)


def test_tiff_folder_named_by_rounded_depth_is_stacked(tmp_path: Path) -> None:
    """FIB-SEM sections named by their depth in nm (8.33 nm apart) were refused as 37
    missing sections."""
    folder = _sections(tmp_path, [0, 8, 17, 25, 33, 42], "slice_z{}.tif")
    assert open_volume(folder).shape == (6, *SHAPE[1:])


def test_tiff_folder_of_unrelated_names_is_stacked_as_before(tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    for name in ("a_1.tif", "b_5.tif", "c_9.tif"):
        tifffile.imwrite(folder / name, DATA[0])
    assert open_volume(folder).shape == (3, *SHAPE[1:])


# --- OME metadata without a scale: the voxel size is unknown ------------------------------


@pytest.mark.parametrize("transforms", [None, [{"type": "identity"}]])
def test_ome_without_a_scale_has_an_unknown_voxel_size(tmp_path: Path, transforms: Any) -> None:
    g = zarr.open_group(tmp_path / "n.zarr", mode="w")
    g.create_array("0", shape=SHAPE, dtype="uint8")
    dataset: dict[str, Any] = {"path": "0"}
    if transforms is not None:
        dataset["coordinateTransformations"] = transforms
    g.attrs["ome"] = {"version": "0.5", "multiscales": [{
        "axes": [{"name": n, "type": "space", "unit": "nanometer"} for n in "zyx"],
        "datasets": [dataset]}]}
    volume = open_volume(tmp_path / "n.zarr")
    assert volume.voxel_size is None and volume.offset == (0, 0, 0)
    assert [level.voxel_size for level in volume.levels()] == [None]


def test_ome_scale_of_one_with_a_unit_is_known(tmp_path: Path) -> None:
    g = zarr.open_group(tmp_path / "one.zarr", mode="w")
    g.create_array("0", shape=SHAPE, dtype="uint8")
    g.attrs["ome"] = {"version": "0.5", "multiscales": [{
        "axes": [{"name": n, "type": "space", "unit": "nanometer"} for n in "zyx"],
        "datasets": [{"path": "0", "coordinateTransformations": [
            {"type": "scale", "scale": [1, 1, 1]}]}]}]}
    assert open_volume(tmp_path / "one.zarr").voxel_size == (1.0, 1.0, 1.0)


# --- HDF5 compressed with a filter this HDF5 lacks ----------------------------------------


def _filtered(tmp: Path, code: int, written: tuple[int, int, int] = (0, 0, 0)) -> str:
    """A dataset declaring filter `code`, one chunk stored raw (HDF5 cannot decode it)."""
    with h5py.File(tmp / "filt.h5", "w") as f:
        d = f.create_dataset("img", shape=SHAPE, chunks=(3, 5, 6), dtype="uint16",
                             compression=code, allow_unknown_filter=True)
        d.id.write_direct_chunk(written, b"not what the filter wrote")
    return str(tmp / "filt.h5/img")


@pytest.mark.skipif(h5py.h5z.filter_avail(32001), reason="blosc is available here")
def test_hdf5_with_a_missing_filter_names_it_on_opening(tmp_path: Path) -> None:
    with pytest.raises(VolumeError, match=r"filt.h5/img: is compressed with HDF5 filter 32001 "
                       r"\(blosc\), which this Python's HDF5 cannot decode: pip install "
                       r"'emrun\[hdf5\]' \(hdf5plugin"):
        open_volume(_filtered(tmp_path, 32001))


def test_hdf5_missing_filter_found_where_chunk_0_is_unwritten(tmp_path: Path) -> None:
    path = _filtered(tmp_path, 32002, written=(3, 0, 0))  # chunk 0 reads as fill value
    with pytest.raises(VolumeError, match=r"HDF5 filter 32002 \(MAFISC\).*HDF5_PLUGIN_PATH"):
        open_volume(path)


# --- the same through tensorstore: a served OME-Zarr, a big-endian zarr v2, an N5 ----------


def test_remote_tczyx_and_big_endian_zarr(tmp_path: Path) -> None:
    pytest.importorskip("tensorstore")
    from test_remote_volumes import served

    _ome_image(tmp_path, TCZYX, DATA[None, None], [1, 1, 0.03, 0.006, 0.006])
    _big_zarr2(tmp_path)
    _ome_image(tmp_path, [(n, "space") for n in "xyz"], DATA, name="xyz.zarr")
    with served(tmp_path) as url:
        volume = open_volume(f"{url}/img.zarr")
        assert volume.shape == (1, *SHAPE) and volume.voxel_size == (30.0, 6.0, 6.0)
        assert volume.chunks == (1, *SHAPE)
        np.testing.assert_array_equal(volume.read(Roi((1, 2, 3), (2, 3, 4))),
                                      DATA[None, 1:3, 2:5, 3:7])
        big = open_volume(f"{url}/v2.zarr/be")
        assert big.dtype.isnative and big.read().dtype.isnative
        np.testing.assert_array_equal(big.read(), DATA)
        with pytest.raises(VolumeError, match="axes are x, y, z"):
            open_volume(f"{url}/xyz.zarr")


def test_n5_offset_between_voxels_is_refused(tmp_path: Path) -> None:
    pytest.importorskip("tensorstore")
    from test_remote_volumes import write_n5

    write_n5(tmp_path / "v.n5/raw", DATA.astype(np.uint8), {"resolution": [6, 6, 30],
                                                             "offset": [3, 0, 0]})
    with pytest.raises(VolumeError, match=r"v.n5/raw: offset \[0, 0, 3\] nm .*\(z, y, x\)"):
        open_volume(tmp_path / "v.n5/raw")


def test_a_tiff_holding_a_header_only_is_named_damaged(tmp_path: Path) -> None:
    """A TIFF header followed by garbage was "IndexError: list index out of range"."""
    (tmp_path / "bad.tif").write_bytes(b"II*\x00garbage")
    with pytest.raises(VolumeError, match=r"bad\.tif: no image can be read from this TIFF"):
        open_volume(str(tmp_path / "bad.tif"))


def test_a_group_without_multiscales_lists_its_arrays_by_their_paths(tmp_path: Path) -> None:
    """The arrays were listed from the group (`image/0`), not as paths to give."""
    import zarr

    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="w").create_group("image")
    group.create_array("0", shape=(2, 4, 4), dtype="uint8")
    with pytest.raises(VolumeError, match=r"without OME-Zarr multiscales.*arrays in it: "
                       rf"{tmp_path}/s\.zarr/image/0"):
        open_volume(str(tmp_path / "s.zarr/image"))
