"""Multiscale levels against small, obviously correct references: each level's values (the
mean, rounded half up for integers, or the most frequent id, the smallest on ties, of each
window of the level before), exactly for 64-bit values beyond 2**53; a level built block
by block equals the one built from the whole array; where a level's voxels lie (OME scale
and translation, what `open_volume` reads back) against a ramp that stores each voxel's
own position; `data convert` from HDF5, N5, TIFF and .npy keeping values, dtype, axis order
and voxel size down the pyramid.

Tests marked xfail(strict=True) show a bug (the reason says where and with what numbers)."""

from __future__ import annotations

import json
import shutil
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import zarr
from n5_writing import n5_dataset, voxel_0_at
from typer.testing import CliRunner

from emrun.cli import app
from emrun.io import choose_level, open_volume, pyramid, write_volume
from emrun.io.levels import describe
from emrun.io.pyramid import downsample, level_factors, write_level
from emrun.io.write import build_pyramid

runner = CliRunner()
RNG = np.random.default_rng(20261207)


# --- references -------------------------------------------------------------------------


def windows(data: np.ndarray, step: tuple[int, int, int]):
    """Each output index (lead axes included) with the values of its window, as Python
    numbers (exact for any 64-bit value), the windows cut by the end holding what is there."""
    out_shape = tuple(-(-n // s) for n, s in zip(data.shape[-3:], step, strict=True))
    for lead in np.ndindex(*data.shape[:-3]):
        for index in np.ndindex(*out_shape):
            box = tuple(slice(i * s, (i + 1) * s) for i, s in zip(index, step, strict=True))
            yield lead + index, data[lead + box].ravel().tolist()


def out_shape_of(data: np.ndarray, step: tuple[int, int, int]) -> tuple[int, ...]:
    return data.shape[:-3] + tuple(-(-n // s) for n, s in zip(data.shape[-3:], step,
                                                                  strict=True))


def mean_reference(data: np.ndarray, step: tuple[int, int, int]) -> np.ndarray:
    """Integers: the exact mean rounded half up (floor(mean + 1/2)), with Fractions;
    floats: the mean in float64, cast back."""
    out = np.zeros(out_shape_of(data, step), data.dtype)
    for index, values in windows(data, step):
        if data.dtype.kind in "iu":
            mean = Fraction(sum(int(v) for v in values), len(values))
            out[index] = int((mean + Fraction(1, 2)).__floor__())
        else:
            out[index] = np.mean(np.asarray(values, np.float64))
    return out


def mode_reference(data: np.ndarray, step: tuple[int, int, int]) -> np.ndarray:
    """The most frequent value of each window, the smallest on ties (Python ints: exact)."""
    out = np.zeros(out_shape_of(data, step), data.dtype)
    for index, values in windows(data, step):
        counts: dict = {}
        for v in values:
            counts[v] = counts.get(v, 0) + 1
        best = max(counts.values())
        out[index] = min(v for v, c in counts.items() if c == best)
    return out


def extreme(dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Values spread over the whole range of `dtype`, with runs near both ends (where float
    rounding and overflow show)."""
    if np.dtype(dtype).kind == "f":
        return (RNG.standard_normal(shape) * 1000).astype(dtype)
    info = np.iinfo(dtype)
    spread = RNG.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
    top = RNG.integers(info.max - 3, info.max, shape, dtype=dtype, endpoint=True)
    bottom = RNG.integers(info.min, info.min + 3, shape, dtype=dtype, endpoint=True)
    pick = RNG.integers(0, 3, shape)
    return np.where(pick == 0, spread, np.where(pick == 1, top, bottom)).astype(dtype)


# --- downsample: each window against the reference ---------------------------------------


@pytest.mark.parametrize("step", [(1, 2, 2), (2, 2, 2)])
@pytest.mark.parametrize("dtype", ["uint8", "int8", "uint16", "int16", "uint32", "int32",
                                   "uint64", "int64", "float32", "float64"])
def test_downsample_is_the_exact_mean_and_mode_of_each_window(dtype: str, step) -> None:
    """Odd shapes (windows cut by the end), values at both ends of the dtype's range: the
    mean is exact and rounded half up (64-bit integers too: float64 would be hundreds off
    beyond 2**53), the dtype kept; the mode is the smallest of the most frequent ids."""
    data = extreme(dtype, (3, 5, 7))
    got = downsample(data, step, labels=False)
    expected = mean_reference(data, step)
    assert got.dtype == data.dtype and got.shape == expected.shape
    if data.dtype.kind == "f":
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-3)
    else:
        np.testing.assert_array_equal(got, expected)
    ids = downsample(data, step, labels=True)
    assert ids.dtype == data.dtype
    np.testing.assert_array_equal(ids, mode_reference(data, step))


def test_ids_beyond_2_53_tie_to_the_smallest_and_channels_average_apart() -> None:
    """Two ids one apart above 2**63 (equal as float64) each four times in a 2x2x2 window:
    the smaller wins; a channel axis is downsampled per channel, exactly."""
    ids = np.full((2, 2, 2), 2**63 + 7, np.uint64)
    ids[0] = 2**63 + 6
    assert downsample(ids, (2, 2, 2), labels=True).tolist() == [[[2**63 + 6]]]
    assert downsample(ids, (2, 2, 2), labels=False).tolist() == [[[2**63 + 7]]]  # 6.5 up
    lanes = RNG.integers(2**62, 2**64 - 1, (3, 3, 5, 4), dtype=np.uint64, endpoint=True)
    np.testing.assert_array_equal(downsample(lanes, (2, 2, 2), labels=False),
                                  mean_reference(lanes, (2, 2, 2)))
    np.testing.assert_array_equal(downsample(lanes, (1, 2, 2), labels=True),
                                  mode_reference(lanes, (1, 2, 2)))


# --- levels written: chained references, block by block = whole -----------------------------


def test_label_pyramid_of_wide_ids_is_the_chained_mode_anisotropic_then_isotropic(
        tmp_path: Path) -> None:
    """8 x 4 x 4 nm: level 1 halves y and x (1,2,2), level 2 all three (2,4,4); each level
    is the mode of the level before, ids beyond 2**53 kept exactly and none invented."""
    assert level_factors((7, 13, 11), (8, 4, 4), 3) == [(1, 1, 1), (1, 2, 2), (2, 4, 4)]
    base = np.uint64(2**53 + 1)
    ids = (RNG.integers(0, 4, (7, 13, 11)).astype(np.uint64) * np.uint64(2**40)) + base
    write_volume(tmp_path / "s.zarr", "seg", ids, voxel_size=(8, 4, 4), label=True, levels=3)
    expected = ids
    for level, step in ((1, (1, 2, 2)), (2, (2, 2, 2))):
        expected = mode_reference(expected, step)
        volume = open_volume(f"{tmp_path}/s.zarr/seg/{level}")
        got = volume.read()
        assert volume.segmentation and got.dtype == np.uint64
        np.testing.assert_array_equal(got, expected)
        assert set(np.unique(got).tolist()) <= set(np.unique(ids).tolist())


@pytest.mark.parametrize("labels", [False, True])
def test_a_level_written_block_by_block_equals_the_whole_array_s(tmp_path: Path,
                                                                 labels: bool) -> None:
    """Small output blocks (not dividing the odd shape), three threads, step (2,2,2): the
    level equals `downsample` of the whole finer array and the reference."""
    if labels:
        data = RNG.integers(0, 3, (11, 13, 15)).astype(np.uint64) + np.uint64(2**60 + 1)
    else:
        data = RNG.integers(0, 256, (11, 13, 15), dtype=np.uint8)
    source = zarr.create_array(str(tmp_path / "s.zarr"), shape=data.shape, dtype=data.dtype,
                               chunks=(3, 5, 4))
    source[...] = data
    target = zarr.create_array(str(tmp_path / "t.zarr"), shape=(6, 7, 8), dtype=data.dtype,
                               chunks=(2, 2, 3))
    write_level(source, target, (2, 2, 2), labels, block=(2, 2, 3), threads=3)
    whole = downsample(data, (2, 2, 2), labels)
    np.testing.assert_array_equal(target[...], whole)
    reference = mode_reference if labels else mean_reference
    np.testing.assert_array_equal(whole, reference(data, (2, 2, 2)))


def test_build_pyramid_in_small_blocks_equals_the_chained_reference(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`BLOCK_ZYX` shrunk to (2, 8, 8): many blocks per level, written by threads; each
    level equals the reference applied to the level before (an isotropic 8 nm volume:
    (2,2,2) at each level), whatever the blocks."""
    monkeypatch.setattr(pyramid, "BLOCK_ZYX", (2, 8, 8))
    image = RNG.integers(0, 2**16, (13, 37, 29), dtype=np.uint16)
    write_volume(tmp_path / "b.zarr", "image", image, voxel_size=(8, 8, 8), chunks=(2, 8, 8),
                 label=False, levels=3)
    group = tmp_path / "b.zarr/image"
    assert build_pyramid(group, 3, threads=3) == 3  # built again: nothing changed, kept
    expected = image
    for level in (1, 2):
        expected = mean_reference(expected, (2, 2, 2))
        np.testing.assert_array_equal(zarr.open_array(str(group / str(level)), mode="r")[...],
                                      expected)


# --- where a level's voxels lie ---------------------------------------------------------------


def transforms(group: Path, level: int) -> tuple[list[float], list[float]]:
    doc = json.loads((group / "zarr.json").read_text())
    dataset = doc["attributes"]["ome"]["multiscales"][0]["datasets"][level]
    found = {t["type"]: t[t["type"]] for t in dataset["coordinateTransformations"]}
    return found["scale"], found.get("translation", [0.0] * len(found["scale"]))


@pytest.mark.parametrize("offset", [(3, 5, 2), (-3, -5, -1), (0, 0, 0)])
def test_a_ramp_of_positions_lands_where_each_level_s_metadata_puts_it(
        tmp_path: Path, offset: tuple[int, int, int]) -> None:
    """Channel c of a float64 image holds the position (nm, OME pixel centres) of each voxel
    along axis c. A level's voxel is the mean of its window, so (whole windows) it holds
    that voxel's own position: it must equal translation + index * scale of the level's OME
    metadata, for (1,2,2) then (2,2,2) steps; `open_volume` of the level reads that array
    with scale as voxel size and offset * voxel size + shift = translation; --level by the
    voxel size picks it."""
    voxel, shape = (8.0, 4.0, 4.0), (9, 21, 19)
    ramp = np.stack(np.meshgrid(*[(np.arange(n) + o) * v for n, o, v in
                                  zip(shape, offset, voxel, strict=True)], indexing="ij"))
    write_volume(tmp_path / "r.zarr", "ramp", ramp, voxel_size=voxel, offset=offset,
                 channel_axis=True, levels=4)
    group = tmp_path / "r.zarr/ramp"
    factors = [(1, 1, 1), (1, 2, 2), (2, 4, 4), (4, 8, 8)]
    for level, factor in enumerate(factors):
        scale, translation = transforms(group, level)
        assert scale[1:] == [v * f for v, f in zip(voxel, factor, strict=True)]
        array = zarr.open_array(str(group / str(level)), mode="r")[...]
        for axis in range(3):
            whole = shape[axis] // factor[axis]  # windows not cut by the end
            along = np.moveaxis(array[axis], axis, 0)[:whole].reshape(whole, -1)
            where = translation[1 + axis] + np.arange(whole) * scale[1 + axis]
            np.testing.assert_allclose(along, where[:, None] * np.ones_like(along),
                                       rtol=0, atol=1e-9, err_msg=f"level {level} axis {axis}")
        volume = open_volume(f"{group}/{level}")
        assert volume.voxel_size == tuple(scale[1:])
        np.testing.assert_array_equal(volume.read(), array)
        assert voxel_0_at(f"{group}/{level}") == pytest.approx(tuple(translation[1:]))
        wanted = ",".join(f"{s:g}" for s in scale[1:])
        assert choose_level(group, wanted) == f"{group}/{level}"


def test_a_converted_coarser_level_grows_the_same_pyramid_in_the_same_place(
        tmp_path: Path) -> None:
    """`data convert` of level k and a pyramid on it: its level j has the values, voxel size
    and position (voxel 0, nm) of the source's level k + j."""
    image = RNG.integers(0, 256, (9, 26, 22), dtype=np.uint8)
    write_volume(tmp_path / "o.zarr", "image", image, voxel_size=(8, 4, 4), offset=(3, 5, 2),
                 levels=4)
    result = runner.invoke(app, ["data", "convert", f"{tmp_path}/o.zarr/image", str(tmp_path /
                                 "c.zarr"), "--level", "1", "--name", "from1", "--levels", "3"])
    assert result.exit_code == 0, result.output
    for j in (0, 1, 2):
        ours, theirs = f"{tmp_path}/c.zarr/from1/{j}", f"{tmp_path}/o.zarr/image/{j + 1}"
        a, b = open_volume(ours), open_volume(theirs)
        assert (a.shape, a.voxel_size, a.dtype) == (b.shape, b.voxel_size, b.dtype)
        assert voxel_0_at(ours) == pytest.approx(voxel_0_at(theirs))
        np.testing.assert_array_equal(a.read(), b.read())


# --- data convert: each format, values, dtype, axes, voxel size, levels -----------------------


def sources(tmp_path: Path, image: np.ndarray, ids: np.ndarray) -> dict[str, tuple[str, ...]]:
    """The same image and ids as HDF5 (funlib resolution), N5 (x, y, z resolution and
    offset), ImageJ TIFF (spacing and X/YResolution in microns) and .npy (no size: given)."""
    h5py = pytest.importorskip("h5py")
    tifffile = pytest.importorskip("tifffile")
    with h5py.File(tmp_path / "v.h5", "w") as f:
        raw = f.create_dataset("raw", data=image)
        raw.attrs["resolution"], raw.attrs["offset"] = [40, 5, 4], [80, 10, 12]
        f.create_dataset("ids", data=ids).attrs["resolution"] = [40, 5, 4]
    n5_dataset(tmp_path / "v.n5/raw", image, resolution=[4, 5, 40], offset=[12, 10, 80])
    n5_dataset(tmp_path / "v.n5/ids", ids, resolution=[4, 5, 40])
    tifffile.imwrite(tmp_path / "v.tif", image, imagej=True, resolution=(250, 200),
                     metadata={"spacing": 0.04, "unit": "micron"})
    np.save(tmp_path / "ids.npy", ids)
    return {"h5-raw": (f"{tmp_path}/v.h5/raw",), "h5-ids": (f"{tmp_path}/v.h5/ids",),
            "n5-raw": (f"{tmp_path}/v.n5/raw",), "n5-ids": (f"{tmp_path}/v.n5/ids",),
            "tif": (f"{tmp_path}/v.tif",),
            "npy": (f"{tmp_path}/ids.npy", "--voxel-size", "40", "5", "4")}


def test_convert_keeps_values_dtype_axes_voxel_size_and_each_level(tmp_path: Path) -> None:
    """A (6, 13, 22) volume (every axis another length: a transposed read shows) at 40 x 5 x
    4 nm, converted with --levels 3: level 0 is the source exactly, in its dtype and axis
    order, at its voxel size and offset; levels 1 and 2 (y and x halved, z kept: 40 nm) are
    the chained mean (uint8 image) or mode (uint64 ids beyond 2**53)."""
    pytest.importorskip("tensorstore")
    image = RNG.integers(0, 256, (6, 13, 22), dtype=np.uint8)
    ids = RNG.integers(0, 4, (6, 13, 22)).astype(np.uint64) + np.uint64(2**53 + 1)
    for name, argv in sources(tmp_path, image, ids).items():
        result = runner.invoke(app, ["data", "convert", *argv[:1], str(tmp_path / "o.zarr"),
                                     "--name", name, "--levels", "3", *argv[1:]])
        assert result.exit_code == 0, (name, result.output)
        data, labels = (image, False) if name in ("h5-raw", "n5-raw", "tif") else (ids, True)
        volume = open_volume(f"{tmp_path}/o.zarr/{name}")
        assert (volume.shape, volume.dtype, volume.voxel_size) == (
            data.shape, data.dtype, (40.0, 5.0, 4.0)), name
        assert (volume.offset or (0, 0, 0)) == ((2, 2, 3) if name != "tif" and not labels
                                                 else (0, 0, 0)), name
        np.testing.assert_array_equal(volume.read(), data, err_msg=name)
        expected = data
        for level in (1, 2):
            expected = (mode_reference if labels else mean_reference)(expected, (1, 2, 2))
            coarse = open_volume(f"{tmp_path}/o.zarr/{name}/{level}")
            assert coarse.voxel_size == (40.0, 5.0 * 2**level, 4.0 * 2**level), name
            assert coarse.segmentation == labels, name
            np.testing.assert_array_equal(coarse.read(), expected, err_msg=f"{name} {level}")


# --- what does not hold -------------------------------------------------------------------


def test_each_level_s_funlib_offset_is_whole_voxels_of_that_level(tmp_path: Path) -> None:
    """Every level array carries funlib's voxel_size and offset "so open_ds, gunpowder and
    daisy read its geometry" (write.py): funlib requires the offset to be a multiple of the
    voxel size, and emrun itself, opening a copy of the level array out of its group (funlib
    attributes only), refuses an offset between voxels."""
    image = RNG.integers(0, 256, (6, 13, 22), dtype=np.uint8)
    write_volume(tmp_path / "o.zarr", "image", image, voxel_size=(40, 5, 4), offset=(2, 2, 3),
                 levels=3)
    for level in (0, 1, 2):
        folder = tmp_path / "o.zarr/image" / str(level)
        attrs = json.loads((folder / "zarr.json").read_text())["attributes"]
        copy = tmp_path / f"copy{level}.zarr"
        copy.mkdir()
        (copy / "zarr.json").write_text(json.dumps(
            {"zarr_format": 3, "node_type": "group", "attributes": {}}))
        shutil.copytree(folder, copy / "level")
        assert all(o % v == 0 for o, v in zip(attrs["offset"], attrs["voxel_size"],
                                              strict=True)), (level, attrs)
        volume = open_volume(copy / "level")  # VolumeError: "not a whole number of voxels"
        assert volume.voxel_size == tuple(attrs["voxel_size"])


def test_levels_reach_one_voxel_from_any_size() -> None:
    """level_factors: "a count ... that would halve a y or x already of 1 voxel is a
    VolumeError", so a 7-voxel axis has 4 levels (7, 4, 2, 1), as a 4-voxel one has 3."""
    assert level_factors((1, 4, 4), None, 3)[-1] == (1, 4, 4)
    assert level_factors((1, 7, 7), None, 4)[-1] == (1, 8, 8)


def test_a_level_s_size_as_listed_picks_that_level(tmp_path: Path) -> None:
    """`describe` gives "a level's name and voxel size as --level takes them" (and the error
    for an unknown level lists them): each listed size must pick its level back."""
    write_volume(tmp_path / "o.zarr", "image", np.zeros((2, 16, 16), np.uint8),
                 voxel_size=(40, 6.6666667, 6.6666667), levels=3)
    group = tmp_path / "o.zarr/image"
    for level in open_volume(group).levels():
        listed = describe(level).split("(")[1].removesuffix(" nm)")
        assert choose_level(group, listed) == level.path, describe(level)
