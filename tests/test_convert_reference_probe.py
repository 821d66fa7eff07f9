"""Reference probe of `open_volume` reads and `emrun data convert`.

Every volume is written here with the format's own library (numpy, tifffile, h5py, zarr,
tensorstore for N5), read back through emrun whole and by random boxes (touching the edges,
one voxel thin on an axis) and compared with numpy slicing of the array written; converted
volumes are compared level by level with a downsampling written as plain loops over
windows (mean with Fractions rounded half up for integers, most frequent id with the
smallest on ties for labels), and their metadata with what was given or what the source
says.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from fractions import Fraction
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
import zarr
from typer.testing import CliRunner

from emrun.cli import app
from emrun.geometry import Roi
from emrun.io import open_volume
from emrun.io.convert import convert

runner = CliRunner()


# ---------------------------------------------------------------- references


def ref_downsample(data: np.ndarray, step: tuple[int, int, int], labels: bool) -> np.ndarray:
    """Plain loops: each output voxel from the window of `step` voxels (cut by the end);
    leading axes (channels) one by one."""
    lead = data.shape[:-3]
    spatial = data.shape[-3:]
    out_shape = tuple(-(-n // s) for n, s in zip(spatial, step, strict=True))
    out = np.zeros(lead + out_shape, dtype=data.dtype)
    for index in np.ndindex(*lead) if lead else [()]:
        for oz in range(out_shape[0]):
            for oy in range(out_shape[1]):
                for ox in range(out_shape[2]):
                    window = [
                        data[(*index, z, y, x)]
                        for z in range(oz * step[0], min((oz + 1) * step[0], spatial[0]))
                        for y in range(oy * step[1], min((oy + 1) * step[1], spatial[1]))
                        for x in range(ox * step[2], min((ox + 1) * step[2], spatial[2]))
                    ]
                    out[(*index, oz, oy, ox)] = _reduce(window, data.dtype, labels)
    return out


def _reduce(window: list, dtype: np.dtype, labels: bool):
    if labels:
        counts = Counter(v.item() for v in window)
        best = max(counts.values())
        return min(v for v, c in counts.items() if c == best)
    if dtype.kind == "f":
        return sum(Fraction(float(v)) for v in window) / len(window)
    mean = Fraction(sum(int(v) for v in window), len(window))
    rounded = math.floor(mean + Fraction(1, 2))  # half up
    if dtype.kind == "b":
        return bool(rounded)
    info = np.iinfo(dtype)
    return min(max(rounded, int(info.min)), int(info.max))


def ref_step(spatial: tuple[int, ...], voxel: tuple[float, ...] | None,
             factor: tuple[int, int, int] = (1, 1, 1)) -> tuple[int, int, int]:
    """README: each level halves y and x; z only where its voxel size is at most half of
    y's at the new level (and z is longer than one voxel); unknown voxel size keeps z."""
    fz, fyx = factor[0], factor[1]
    halve_z = (voxel is not None and spatial[0] > fz
               and voxel[0] * fz <= (voxel[1] * fyx * 2) / 2)
    return (2 if halve_z else 1, 2, 2)


def random_boxes(shape: tuple[int, ...], rng: np.random.Generator, count: int = 12):
    """Boxes over the last three axes: random ones, ones touching each end, one voxel thin."""
    spatial = shape[-3:]
    boxes = [((0, 0, 0), spatial)]
    for _ in range(count):
        begin = [int(rng.integers(0, n)) for n in spatial]
        end = [int(rng.integers(b + 1, n + 1)) for b, n in zip(begin, spatial, strict=True)]
        boxes.append((tuple(begin), tuple(e - b for b, e in zip(begin, end, strict=True))))
    for axis in range(3):
        size = list(spatial)
        size[axis] = 1
        begin = [0, 0, 0]
        begin[axis] = spatial[axis] - 1  # the last section / row / column
        boxes.append((tuple(begin), tuple(size)))
        boxes.append(((0, 0, 0), tuple(size)))
    boxes.append(((spatial[0] - 1, spatial[1] - 1, spatial[2] - 1), (1, 1, 1)))
    boxes.append(((1, 1, 1), tuple(n - 1 for n in spatial)))  # to every end
    return boxes


def check_reads(volume, expected: np.ndarray, seed: int = 0) -> None:
    assert volume.shape == expected.shape
    assert volume.dtype == expected.dtype.newbyteorder("=")
    whole = volume.read()
    assert whole.dtype.isnative
    np.testing.assert_array_equal(whole, expected)
    rng = np.random.default_rng(seed)
    for begin, size in random_boxes(expected.shape, rng):
        got = volume.read(Roi(begin, size))
        want = expected[..., begin[0]:begin[0] + size[0], begin[1]:begin[1] + size[1],
                        begin[2]:begin[2] + size[2]]
        assert got.shape == want.shape, (begin, size)
        np.testing.assert_array_equal(got, want, err_msg=f"box {begin} + {size}")


def values(shape: tuple[int, ...], dtype: str, seed: int = 0, low=None, high=None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return rng.normal(0, 10, shape).astype(dtype)
    if dtype.kind == "b":
        return rng.random(shape) > 0.5
    info = np.iinfo(dtype)
    lo = int(info.min) if low is None else low
    hi = int(info.max) if high is None else high
    return rng.integers(lo, hi, shape, endpoint=True, dtype=dtype.newbyteorder("="))\
        .astype(dtype)


# ---------------------------------------------------------------- writers


def write_npy(tmp: Path, data: np.ndarray, fortran: bool = False) -> str:
    path = tmp / "vol.npy"
    np.save(path, np.asfortranarray(data) if fortran else data)
    return str(path)


def write_tiff(tmp: Path, data: np.ndarray, **kwargs) -> str:
    path = tmp / "vol.tif"
    tifffile.imwrite(path, data, **kwargs)
    return str(path)


def write_tiff_pages(tmp: Path, data: np.ndarray) -> str:
    """Sections appended one call each (one series per page)."""
    path = tmp / "pages.tif"
    for z, section in enumerate(data):
        tifffile.imwrite(path, section, append=z > 0)
    return str(path)


def write_tiff_folder(tmp: Path, data: np.ndarray) -> str:
    folder = tmp / "sections"
    folder.mkdir()
    for z, section in enumerate(data):
        tifffile.imwrite(folder / f"s_{z}.tif", section)  # s_10 after s_9: natural order
    return str(folder)


def write_h5(tmp: Path, data: np.ndarray, chunks=None, **attrs) -> str:
    path = tmp / "vol.h5"
    if chunks is not None and len(chunks) < data.ndim:
        chunks = (*data.shape[: data.ndim - len(chunks)], *chunks)
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("volumes/raw", data=data, chunks=chunks)
        for key, value in attrs.items():
            ds.attrs[key] = value
    return f"{path}/volumes/raw"


def write_n5(tmp: Path, data: np.ndarray, block=None, **attrs) -> str:
    ts = pytest.importorskip("tensorstore")
    folder = tmp / "vol.n5" / "raw"
    store = ts.open({"driver": "n5", "kvstore": {"driver": "file", "path": str(folder)},
                     "metadata": {"dimensions": list(data.shape[::-1]),
                                  "blockSize": block or [5, 4, 3][: data.ndim] + [1] *
                                  max(0, data.ndim - 3),
                                  "dataType": str(data.dtype.newbyteorder("=")),
                                  "compression": {"type": "gzip"}},
                     "create": True}).result()
    store[...] = data.T
    if attrs:
        meta = json.loads((folder / "attributes.json").read_text())
        (folder / "attributes.json").write_text(json.dumps({**meta, **attrs}))
    return f"{tmp / 'vol.n5'}/raw"


def write_zarr2(tmp: Path, data: np.ndarray, chunks=(3, 4, 5), order="C", **attrs) -> str:
    root = zarr.open_group(str(tmp / "v2.zarr"), mode="w", zarr_format=2)
    chunks = tuple(chunks) if data.ndim == 3 else (data.shape[0], *chunks)
    array = root.create_array("group/raw", shape=data.shape, dtype=data.dtype, chunks=chunks,
                              order=order)
    array[...] = data
    array.attrs.update(attrs)
    return f"{tmp / 'v2.zarr'}/group/raw"


def write_zarr3(tmp: Path, data: np.ndarray, chunks=(3, 4, 5)) -> str:
    chunks = tuple(chunks) if data.ndim == 3 else (data.shape[0], *chunks)
    array = zarr.create_array(str(tmp / "v3.zarr"), shape=data.shape, dtype=data.dtype,
                              chunks=chunks)
    array[...] = data
    return str(tmp / "v3.zarr")


WRITERS = {
    "npy": write_npy,
    "npy-fortran": lambda tmp, d: write_npy(tmp, d, fortran=True),
    "tiff": write_tiff,
    "tiff-tiled-compressed": lambda tmp, d: write_tiff(tmp, d, tile=(16, 16),
                                                       compression="zlib"),
    "tiff-bigendian": lambda tmp, d: write_tiff(tmp, d, byteorder=">"),
    "tiff-pages": write_tiff_pages,
    "tiff-folder": write_tiff_folder,
    "hdf5": write_h5,
    "hdf5-chunked": lambda tmp, d: write_h5(tmp, d, chunks=(2, 3, 4)),
    "n5": write_n5,
    "zarr2": write_zarr2,
    "zarr2-fortran": lambda tmp, d: write_zarr2(tmp, d, order="F"),
    "zarr3": write_zarr3,
}

SHAPE = (11, 13, 17)  # odd, prime: no chunk or window divides an axis


# ---------------------------------------------------------------- reads


@pytest.mark.parametrize("fmt", sorted(WRITERS))
@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int16", "float32"])
def test_reads_equal_numpy_slicing(tmp_path, fmt, dtype):
    data = values(SHAPE, dtype, seed=len(fmt))
    path = WRITERS[fmt](tmp_path, data)
    check_reads(open_volume(path), data)


@pytest.mark.parametrize("fmt", ["npy", "hdf5-chunked", "zarr2", "zarr3", "n5"])
@pytest.mark.parametrize("dtype", ["uint64", "int64", "float64", "bool", ">u4", ">f4"])
def test_reads_of_wide_and_unusual_dtypes(tmp_path, fmt, dtype):
    if fmt == "n5" and dtype in ("bool", ">u4", ">f4"):
        pytest.skip("N5 has no bool; its byte order is its own")
    data = values((5, 7, 9), dtype, seed=3)
    if dtype == "uint64":
        data[0, 0, 0] = 2**64 - 1
        data[-1, -1, -1] = 2**53 + 1
    path = WRITERS[fmt](tmp_path, data)
    volume = open_volume(path)
    np.testing.assert_array_equal(volume.read(), data)
    check_reads(volume, data.astype(data.dtype.newbyteorder("=")))


@pytest.mark.parametrize("fmt", ["npy", "hdf5-chunked", "zarr2", "zarr3", "n5", "tiff"])
def test_channel_reads_take_spatial_and_full_boxes(tmp_path, fmt):
    data = values((3, 6, 7, 9), "uint8", seed=5)
    path = WRITERS[fmt](tmp_path, data)
    volume = open_volume(path)
    check_reads(volume, data)  # 3-d boxes: channels whole
    box = volume.read(Roi((1, 2, 3, 4), (1, 3, 1, 5)))
    np.testing.assert_array_equal(box, data[1:2, 2:5, 3:4, 4:9])


def test_box_past_the_end_is_clipped(tmp_path):
    data = values(SHAPE, "uint16", seed=9)
    volume = open_volume(write_h5(tmp_path, data, chunks=(4, 4, 4)))
    got = volume.read(Roi((9, 10, 15), (10, 10, 10)))
    np.testing.assert_array_equal(got, data[9:, 10:, 15:])


def test_hdf5_ilastik_axistags_read_as_czyx(tmp_path):
    data = values((6, 7, 8, 2), "uint8", seed=11)  # z, y, x, c as ilastik exports
    tags = json.dumps({"axes": [{"key": k, "typeFlags": 0} for k in "zyxc"]})
    path = write_h5(tmp_path, data, chunks=(2, 3, 4, 1), axistags=tags)
    check_reads(open_volume(path), np.moveaxis(data, -1, 0))


def test_hdf5_xyz_axistags_read_as_zyx(tmp_path):
    data = values((6, 7, 8), "uint16", seed=12)  # stored x, y, z
    tags = json.dumps({"axes": [{"key": k, "typeFlags": 0} for k in "xyz"]})
    path = write_h5(tmp_path, data, axistags=tags)
    check_reads(open_volume(path), data.transpose(2, 1, 0))


def test_dataset_argument_and_path_name_the_same_volume(tmp_path):
    data = values((4, 5, 6), "uint8", seed=13)
    path = write_h5(tmp_path, data)
    by_argument = open_volume(str(tmp_path / "vol.h5"), "volumes/raw")
    by_parts = open_volume(str(tmp_path / "vol.h5/volumes"), "raw")
    dotted = open_volume(str(tmp_path / "vol.h5/volumes/./x/../raw"))
    for volume in (by_argument, by_parts, dotted, open_volume(path)):
        np.testing.assert_array_equal(volume.read(), data)


# ---------------------------------------------------------------- metadata of sources


def test_hdf5_funlib_resolution_and_offset(tmp_path):
    data = values(SHAPE, "uint8", seed=1)
    path = write_h5(tmp_path, data, resolution=[40, 8, 4], offset=[80, 16, 12])
    volume = open_volume(path)
    assert volume.voxel_size == (40.0, 8.0, 4.0)
    assert volume.offset == (2, 2, 3)


def test_n5_resolution_and_offset_in_xyz(tmp_path):
    data = values(SHAPE, "uint8", seed=1)
    path = write_n5(tmp_path, data, resolution=[4, 8, 40], offset=[12, 16, 80])
    volume = open_volume(path)
    assert volume.voxel_size == (40.0, 8.0, 4.0)
    assert volume.offset == (2, 2, 3)
    check_reads(volume, data)


def test_imagej_tiff_voxel_size(tmp_path):
    data = values(SHAPE, "uint8", seed=1)
    path = write_tiff(tmp_path, data, imagej=True, resolution=(1 / 0.006, 1 / 0.005),
                      metadata={"spacing": 0.03, "unit": "um", "axes": "ZYX"})
    volume = open_volume(path)
    assert volume.voxel_size == pytest.approx((30.0, 5.0, 6.0))
    check_reads(volume, data)


# ---------------------------------------------------------------- convert


def run_convert(*args: str) -> str:
    result = runner.invoke(app, ["data", "convert", *args])
    assert result.exit_code == 0, result.output
    return result.stdout


def ome(group: Path) -> dict:
    return json.loads((group / "zarr.json").read_text())["attributes"]["ome"]


def transforms(group: Path, level: int) -> tuple[list[float], list[float]]:
    ds = ome(group)["multiscales"][0]["datasets"][level]
    found = {t["type"]: t[t["type"]] for t in ds["coordinateTransformations"]}
    return found["scale"], found.get("translation", [0.0] * len(found["scale"]))


def check_pyramid(group: Path, data: np.ndarray, voxel, labels: bool, levels: int) -> None:
    """Every level against `ref_downsample` of the one before (a level is made from the
    level before it)."""
    expected = data
    factor = (1, 1, 1)
    for level in range(levels):
        stored = zarr.open_array(str(group / str(level)), mode="r")[...]
        if level:
            step = ref_step(data.shape[-3:], voxel, factor)
            factor = tuple(f * s for f, s in zip(factor, step, strict=True))
            expected = ref_downsample(expected, step, labels)
        assert stored.shape == expected.shape, level
        assert stored.dtype == expected.dtype, level
        if expected.dtype.kind == "f":
            np.testing.assert_allclose(stored, expected, rtol=1e-6, atol=1e-6,
                                       err_msg=f"level {level}")
        else:
            np.testing.assert_array_equal(stored, expected, err_msg=f"level {level}")
        if voxel is not None:
            scale, _ = transforms(group, level)
            assert scale[-3:] == pytest.approx([v * f for v, f in zip(voxel, factor,
                                                                        strict=True)])


@pytest.mark.parametrize("fmt", ["npy", "tiff", "tiff-folder", "tiff-pages", "hdf5-chunked",
                                 "n5", "zarr2", "zarr3"])
def test_convert_image_level_0_and_1(tmp_path, fmt):
    data = values((9, 10, 14), "uint8", seed=2)
    source = WRITERS[fmt](tmp_path, data)
    out = tmp_path / "out.zarr"
    run_convert(source, str(out), "--voxel-size", "30", "6", "6", "--levels", "3",
                "--chunks", "4", "3", "5")
    check_pyramid(out / "image", data, (30, 6, 6), labels=False, levels=3)
    volume = open_volume(f"{out}/image")
    check_reads(volume, data)
    assert volume.voxel_size == (30.0, 6.0, 6.0)


@pytest.mark.parametrize("voxel", [None, (4, 4, 4), (8, 4, 4), (6, 6, 6), (3, 8, 8)])
def test_convert_image_pyramid_steps_follow_voxel_size(tmp_path, voxel):
    data = values((7, 12, 9), "uint16", seed=3, high=2000)
    source = write_npy(tmp_path, data)
    out = tmp_path / "out.zarr"
    size = [] if voxel is None else ["--voxel-size", *map(str, voxel)]
    run_convert(source, str(out), "--image", *size, "--levels", "3")
    check_pyramid(out / "image", data, voxel, labels=False, levels=3)


@pytest.mark.parametrize("dtype", ["int8", "int16", "uint32", "int64", "float32", "float64"])
def test_convert_image_mean_per_dtype(tmp_path, dtype):
    data = values((5, 7, 9), dtype, seed=4)
    if dtype == "int64":
        data[0, :2, :2] = [[2**62, 2**62 + 1], [2**62 + 3, -(2**63)]]
    out = tmp_path / "out.zarr"
    run_convert(write_npy(tmp_path, data), str(out), "--image", "--voxel-size", "4", "4", "4",
                "--levels", "3")
    check_pyramid(out / "image", data, (4, 4, 4), labels=False, levels=3)


def test_convert_rounding_half_up_on_ties(tmp_path):
    """Windows whose mean lies exactly between two integers (x.5) and a uint8 that must not
    wrap past 255."""
    data = np.zeros((2, 4, 4), np.uint8)
    data[:, 0:2, 0:2] = [[1, 2], [1, 2]]  # 1.5 -> 2
    data[:, 0:2, 2:4] = [[255, 255], [255, 254]]  # 254.75 -> 255
    data[:, 2:4, 0:2] = [[0, 1], [0, 0]]  # 0.25 -> 0
    data[:, 2:4, 2:4] = [[3, 4], [4, 3]]  # 3.5 -> 4
    out = tmp_path / "out.zarr"
    run_convert(write_npy(tmp_path, data), str(out), "--levels", "2")
    level1 = zarr.open_array(str(out / "image" / "1"), mode="r")[...]
    np.testing.assert_array_equal(level1, [[[2, 255], [0, 4]]] * 2)


@pytest.mark.parametrize("dtype", ["uint16", "uint32", "uint64", "int32"])
@pytest.mark.parametrize("voxel", [None, (5, 5, 5)])
def test_convert_labels_most_frequent(tmp_path, dtype, voxel):
    rng = np.random.default_rng(6)
    ids = np.array([0, 7, 9, 12, 300], dtype=dtype)
    if dtype == "uint64":
        ids = np.array([0, 2**63 + 5, 2**64 - 1, 2**53 + 1, 3], dtype=dtype)
    data = ids[rng.integers(0, len(ids), (7, 9, 11))]
    out = tmp_path / "out.zarr"
    size = [] if voxel is None else ["--voxel-size", *map(str, voxel)]
    run_convert(write_h5(tmp_path, data, chunks=(3, 3, 3)), str(out), *size, "--levels", "3")
    group = out / "labels" / "labels"
    assert "image-label" in ome(group)
    check_pyramid(group, data, voxel, labels=True, levels=3)
    np.testing.assert_array_equal(open_volume(f"{out}/labels").read(), data)


def test_convert_uint8_labels_are_not_averaged(tmp_path):
    data = np.zeros((2, 2, 2), np.uint8)
    data[0] = [[10, 10], [20, 30]]
    data[1] = [[20, 30], [40, 10]]
    out = tmp_path / "out.zarr"
    run_convert(write_npy(tmp_path, data), str(out), "--labels", "--voxel-size", "4", "4", "4",
                "--levels", "2")
    level1 = zarr.open_array(str(out / "labels" / "labels" / "1"), mode="r")[...]
    np.testing.assert_array_equal(level1, [[[10]]])  # 10 three times: the mode, not 20.0


def test_convert_mask_bool_becomes_uint8(tmp_path):
    data = values((5, 6, 7), "bool", seed=8)
    out = tmp_path / "out.zarr"
    printed = run_convert(write_npy(tmp_path, data), str(out), "--levels", "2")
    assert "out.zarr/mask" in printed
    volume = open_volume(f"{out}/mask")
    assert volume.dtype == np.uint8
    np.testing.assert_array_equal(volume.read(), data.astype(np.uint8))


@pytest.mark.parametrize("fmt", ["npy", "hdf5-chunked", "zarr2", "n5", "tiff"])
def test_convert_channels_survive(tmp_path, fmt):
    data = values((3, 5, 10, 12), "uint8", seed=10)
    out = tmp_path / "out.zarr"
    run_convert(WRITERS[fmt](tmp_path, data), str(out), "--voxel-size", "30", "6", "6",
                "--chunks", "2", "4", "5", "--levels", "3")
    group = out / "image"
    axes = ome(group)["multiscales"][0]["axes"]
    assert [a["type"] for a in axes] == ["channel", "space", "space", "space"]
    assert zarr.open_array(str(group / "0"), mode="r").chunks == (3, 2, 4, 5)
    check_pyramid(group, data, (30, 6, 6), labels=False, levels=3)
    check_reads(open_volume(f"{out}/image"), data)


@pytest.mark.parametrize("max_slab_bytes", [1, 50, 10_000])
def test_convert_in_y_bands_is_lossless(tmp_path, max_slab_bytes):
    """Slabs cut along y (very wide sections) stitch back to the source exactly."""
    data = values((7, 23, 19), "uint16", seed=12)
    source = write_h5(tmp_path, data, chunks=(2, 5, 5))
    result = convert(source, tmp_path / "out.zarr", name="image", chunks=(3, 4, 6),
                     progress=False, label=False, levels=1, max_slab_bytes=max_slab_bytes)
    check_reads(open_volume(result.path), data)
    channels = values((2, 5, 9, 8), "uint8", seed=13)
    result = convert(write_npy(tmp_path, channels), tmp_path / "c.zarr", chunks=(2, 2, 3),
                     progress=False, levels=1, max_slab_bytes=max_slab_bytes)
    check_reads(open_volume(result.path), channels)


def test_convert_keeps_hdf5_funlib_geometry(tmp_path):
    data = values((6, 10, 14), "uint8", seed=14)
    source = write_h5(tmp_path, data, resolution=[8, 4, 4], offset=[16, 8, 4])
    out = tmp_path / "out.zarr"
    printed = run_convert(source, str(out), "--levels", "3")
    assert "voxel 8 x 4 x 4 nm" in printed
    group = out / "image"
    volume = open_volume(f"{out}/image")
    assert volume.voxel_size == (8.0, 4.0, 4.0)
    assert volume.offset == (2, 2, 1)
    # level 0 at the offset; each coarser level's translation is its window's centre
    for level, factor in enumerate([(1, 1, 1), (1, 2, 2), (2, 4, 4)]):
        scale, translation = transforms(group, level)
        assert scale == pytest.approx([8 * factor[0], 4 * factor[1], 4 * factor[2]])
        want = [o * v + (f - 1) / 2 * v for o, v, f in zip((2, 2, 1), (8, 4, 4), factor,
                                                             strict=True)]
        assert translation == pytest.approx(want), level
    check_pyramid(group, data, (8, 4, 4), labels=False, levels=3)


def test_convert_keeps_n5_resolution_and_offset(tmp_path):
    data = values((6, 10, 14), "uint16", seed=15)
    source = write_n5(tmp_path, data, resolution=[4, 4, 8], offset=[4, 8, 16])
    out = tmp_path / "out.zarr"
    run_convert(source, str(out), "--image", "--levels", "2")
    volume = open_volume(f"{out}/image")
    assert volume.voxel_size == (8.0, 4.0, 4.0)
    assert volume.offset == (2, 2, 1)
    check_reads(volume, data)


def test_convert_voxel_size_given_overrides_source(tmp_path):
    data = values((6, 10, 14), "uint8", seed=16)
    source = write_h5(tmp_path, data, resolution=[8, 4, 4])
    out = tmp_path / "out.zarr"
    run_convert(source, str(out), "--voxel-size", "30", "6", "6", "--levels", "1")
    assert open_volume(f"{out}/image").voxel_size == (30.0, 6.0, 6.0)
    assert transforms(out / "image", 0)[0] == [30.0, 6.0, 6.0]


def test_convert_imagej_voxel_size(tmp_path):
    data = values((5, 8, 9), "uint8", seed=17)
    source = write_tiff(tmp_path, data, imagej=True, resolution=(1 / 0.006, 1 / 0.006),
                        metadata={"spacing": 0.03, "unit": "um", "axes": "ZYX"})
    out = tmp_path / "out.zarr"
    run_convert(source, str(out), "--levels", "1")
    assert open_volume(f"{out}/image").voxel_size == pytest.approx((30.0, 6.0, 6.0))


@pytest.mark.parametrize("dtype", [">u2", ">i4", ">f8"])
def test_convert_big_endian_sources_to_native(tmp_path, dtype):
    data = values((4, 5, 6), dtype, seed=18)
    out = tmp_path / "out.zarr"
    result = convert(write_npy(tmp_path, data), out, name="vol", progress=False, label=False,
                     levels=1)
    volume = open_volume(result.path)
    assert volume.dtype == np.dtype(dtype).newbyteorder("=")
    np.testing.assert_array_equal(volume.read(), data)


def test_convert_level_of_an_ome_source_keeps_its_geometry(tmp_path):
    """`--level 1` of a converted store converts that level: its values, its voxel size."""
    data = values((4, 12, 16), "uint8", seed=19)
    first = tmp_path / "a.zarr"
    run_convert(write_npy(tmp_path, data), str(first), "--voxel-size", "30", "6", "6",
                "--levels", "2")
    out = tmp_path / "b.zarr"
    run_convert(f"{first}/image", str(out), "--level", "1", "--levels", "1")
    volume = open_volume(f"{out}/image")
    np.testing.assert_array_equal(volume.read(), ref_downsample(data, (1, 2, 2), False))
    assert volume.voxel_size == (30.0, 12.0, 12.0)
    _, translation = transforms(out / "image", 0)
    assert translation == pytest.approx([0.0, 3.0, 3.0])  # level 1's half-voxel shift kept


@pytest.mark.parametrize("block", [(1, 2, 2), (2, 3, 5), (3, 4, 4)])
def test_pyramid_built_in_many_blocks_equals_reference(tmp_path, monkeypatch, block):
    """Coarser levels built in many small blocks (block edges inside the windows' rows) are
    the same as the reference of the whole level."""
    import emrun.io.pyramid as pyramid

    monkeypatch.setattr(pyramid, "BLOCK_ZYX", block)
    image = values((9, 13, 11), "uint8", seed=20)
    result = convert(write_npy(tmp_path, image), tmp_path / "a.zarr", progress=False,
                     levels=3, label=False, voxel_size=(4, 4, 4), chunks=(2, 3, 4))
    check_pyramid(tmp_path / "a.zarr" / "image", image, (4, 4, 4), labels=False, levels=3)
    assert result.chunks == (2, 3, 4)
    ids = values((9, 13, 11), "uint32", seed=21, high=4)
    labels = tmp_path / "ids.npy"
    np.save(labels, ids)
    convert(labels, tmp_path / "b.zarr", progress=False, levels=3, voxel_size=(30, 6, 6),
            chunks=(2, 3, 4))
    check_pyramid(tmp_path / "b.zarr" / "labels" / "labels", ids, (30, 6, 6), labels=True,
                  levels=3)


def test_anisotropic_z_is_halved_once_y_has_caught_up(tmp_path):
    """30 x 6 x 6 nm keeps its sections through level 3 and halves z at level 4 (README)."""
    data = values((4, 32, 20), "uint8", seed=22)
    out = tmp_path / "out.zarr"
    run_convert(write_npy(tmp_path, data), str(out), "--voxel-size", "30", "6", "6",
                "--levels", "5")
    check_pyramid(out / "image", data, (30, 6, 6), labels=False, levels=5)
    assert [transforms(out / "image", level)[0] for level in range(5)] == [
        [30, 6, 6], [30, 12, 12], [30, 24, 24], [30, 48, 48], [60, 96, 96]]


def test_default_levels_until_y_and_x_are_at_most_256(tmp_path):
    data = np.zeros((1, 520, 9), np.uint8)
    data[0, ::7, ::2] = 200
    out = tmp_path / "out.zarr"
    run_convert(write_npy(tmp_path, data), str(out))
    shapes = [zarr.open_array(str(out / "image" / str(level)), mode="r").shape
              for level in range(3)]
    assert shapes == [(1, 520, 9), (1, 260, 5), (1, 130, 3)]
    assert not (out / "image" / "3").exists()
    check_pyramid(out / "image", data, None, labels=False, levels=3)


def test_convert_chunks_larger_than_the_volume_are_clipped(tmp_path):
    data = values((3, 5, 7), "uint8", seed=23)
    out = tmp_path / "out.zarr"
    run_convert(write_npy(tmp_path, data), str(out), "--chunks", "100", "100", "100",
                "--levels", "1")
    assert zarr.open_array(str(out / "image" / "0"), mode="r").chunks == (3, 5, 7)
    check_reads(open_volume(f"{out}/image"), data)


def test_ome_04_sources_keep_geometry_and_labels(tmp_path):
    """A zarr v2 OME-Zarr 0.4 image keeps its scale and translation; a 0.4 label image
    (uint8) is written as labels, mode-downsampled."""
    image = values((4, 6, 8), "uint8", seed=24)
    ids = values((4, 6, 8), "uint8", seed=25, high=3)
    root = zarr.open_group(str(tmp_path / "ome.zarr"), mode="w", zarr_format=2)
    axes = [{"name": n, "type": "space", "unit": "nanometer"} for n in "zyx"]
    for name, data, extra in (("raw", image, {}),
                              ("labels/cells", ids, {"image-label": {"version": "0.4"}})):
        array = root.create_array(f"{name}/s0", shape=data.shape, dtype=data.dtype,
                                  chunks=(2, 3, 4))
        array[...] = data
        transform = [{"type": "scale", "scale": [8, 8, 8]},
                     {"type": "translation", "translation": [16, 8, 24]}]
        root[name].attrs.update({"multiscales": [{
            "version": "0.4", "axes": axes,
            "datasets": [{"path": "s0", "coordinateTransformations": transform}]}], **extra})
    out = tmp_path / "out.zarr"
    run_convert(f"{tmp_path / 'ome.zarr'}/raw", str(out), "--levels", "2")
    volume = open_volume(f"{out}/image")
    assert (volume.voxel_size, volume.offset) == ((8.0, 8.0, 8.0), (2, 1, 3))
    check_pyramid(out / "image", image, (8, 8, 8), labels=False, levels=2)
    printed = run_convert(f"{tmp_path / 'ome.zarr'}/labels/cells", str(out), "--levels", "2")
    assert "out.zarr/labels" in printed
    check_pyramid(out / "labels" / "labels", ids, (8, 8, 8), labels=True, levels=2)


def test_n5_pixel_resolution_and_hdf5_element_size(tmp_path):
    data = values((4, 5, 6), "uint16", seed=26)
    n5 = write_n5(tmp_path, data, pixelResolution={"dimensions": [0.004, 0.005, 0.03],
                                                   "unit": "um"})
    assert open_volume(n5).voxel_size == pytest.approx((30.0, 5.0, 4.0))
    h5 = write_h5(tmp_path, data, element_size_um=np.array([0.03, 0.006, 0.006], np.float32))
    assert open_volume(h5).voxel_size == pytest.approx((30.0, 6.0, 6.0))


def test_convert_keeps_affinity_offsets_of_4d_hdf5(tmp_path):
    data = values((3, 4, 6, 8), "float32", seed=27)
    offsets = np.array([[-1, 0, 0], [0, -1, 0], [0, 0, -1]])
    source = write_h5(tmp_path, data, offsets=offsets, resolution=[40, 8, 8],
                      offset=[80, 8, 16])
    result = convert(source, tmp_path / "out.zarr", name="affinity", progress=False, levels=1)
    volume = open_volume(result.path)
    assert volume.attributes()["offsets"] == offsets.tolist()
    assert (volume.voxel_size, volume.offset) == ((40.0, 8.0, 8.0), (2, 1, 2))
    check_reads(volume, data)


def test_overwrite_with_fewer_levels_leaves_no_stale_level(tmp_path):
    first = values((5, 8, 8), "uint8", seed=28)
    second = (first // 3).astype(np.uint8)
    out = tmp_path / "out.zarr"
    run_convert(write_npy(tmp_path, first), str(out), "--levels", "3")
    (tmp_path / "vol.npy").unlink()
    run_convert(write_npy(tmp_path, second), str(out), "--levels", "2", "--overwrite")
    assert sorted(p.name for p in (out / "image").iterdir() if p.name.isdigit()) == ["0", "1"]
    assert [d["path"] for d in ome(out / "image")["multiscales"][0]["datasets"]] == ["0", "1"]
    check_pyramid(out / "image", second, None, labels=False, levels=2)


# ---------------------------------------------------------------- found


@pytest.mark.parametrize("case", ["zarr2-fortran", "hdf5-axistags", "tiff-4d-box"])
def test_every_format_reads_c_ordered_arrays(tmp_path, case):
    """emrun.io.npy_volume: reads are C-ordered "as every other format reads" (a Fortran-
    ordered box was refused by torch's `view`; tests/test_io_noticed.py pins it for .npy)."""
    torch = pytest.importorskip("torch")
    if case == "zarr2-fortran":
        data = values((5, 6, 7), "uint16", seed=29)
        volume = open_volume(write_zarr2(tmp_path, data, order="F"))
        box, want = Roi((1, 1, 1), (3, 4, 5)), data[1:4, 1:5, 1:6]
    elif case == "hdf5-axistags":
        stored = values((5, 6, 7, 2), "uint16", seed=30)  # z, y, x, c (ilastik's export)
        tags = json.dumps({"axes": [{"key": k} for k in "zyxc"]})
        volume = open_volume(write_h5(tmp_path, stored, axistags=tags))
        data = np.moveaxis(stored, -1, 0)
        box, want = Roi((1, 1, 1), (3, 4, 5)), data[:, 1:4, 1:5, 1:6]
    else:
        data = values((2, 5, 6, 7), "uint16", seed=31)
        volume = open_volume(write_tiff(tmp_path, data))
        box, want = Roi((1, 1, 1), (3, 4, 5)), data[:, 1:4, 1:5, 1:6]
    for got, expected in ((volume.read(), data), (volume.read(box), want)):
        np.testing.assert_array_equal(got, expected)
        assert got.flags.c_contiguous
        torch.from_numpy(got).view(-1)


def test_tiff_time_series_is_not_read_as_channels(tmp_path):
    """HDF5 (axistags) and OME-Zarr refuse more than one time point ("emrun reads one");
    `tiff_volume._check_axes` refuses layouts "that would be read as the wrong axes", but
    T passes and becomes the channel axis: `data convert` writes time points as channels."""
    from emrun.io import VolumeError

    data = values((2, 3, 6, 8), "uint8", seed=32)
    path = write_tiff(tmp_path, data, imagej=True, metadata={"axes": "TZYX"})
    with tifffile.TiffFile(path) as tif:
        assert tif.series[0].axes == "TZYX"
    with pytest.raises(VolumeError):
        open_volume(path)


def test_tiff_frames_without_z_are_read_as_sections(tmp_path):
    """Fiji often labels a stack's sections as frames (TYX): those are read as z, and only
    time points of a z stack are refused."""
    data = values((3, 6, 8), "uint8", seed=33)
    path = write_tiff(tmp_path, data, imagej=True, metadata={"axes": "TYX"})
    with tifffile.TiffFile(path) as tif:
        assert tif.series[0].axes == "TYX"
    np.testing.assert_array_equal(open_volume(path).read(), data)


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_a_file_below_a_folder_named_like_a_container_opens_as_that_file(tmp_path, suffix):
    """`proj.zarr/exports/stack.tif` (a plain folder named .zarr) was opened as dataset
    `exports/stack.tif` of a store `proj.zarr`: 'not a zarr store'."""
    folder = tmp_path / f"proj{suffix}" / "exports"
    folder.mkdir(parents=True)
    data = values((2, 8, 8), "uint8", seed=34)
    tifffile.imwrite(folder / "stack.tif", data)
    np.save(folder / "a.npy", data)
    for name in ("stack.tif", "a.npy"):
        np.testing.assert_array_equal(open_volume(folder / name).read(), data)
