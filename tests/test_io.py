"""Volume layer: every format reads the same ROI identically, lazily, with clear errors."""

from __future__ import annotations

import multiprocessing
import os
import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
import zarr
from volume_files import (
    WRITERS,
    write_hdf5,
    write_npy,
    write_tiff,
    write_tiff_folder,
    write_zarr3,
    write_zarr_bare,
)

from emrun.geometry import Roi
from emrun.io import Volume, VolumeError, open_volume, split_volume_path

SHAPE = (12, 20, 24)  # 12 sections: folder names section_2 / section_10 test natural sort
ROI = Roi((3, 5, 2), (8, 12, 18))
AT = ROI.to_slices()


@pytest.fixture(scope="module")
def source() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, SHAPE, dtype=np.uint8)


@pytest.fixture(params=list(WRITERS))
def volume(request: pytest.FixtureRequest, tmp_path: Path, source: np.ndarray) -> Volume:
    return open_volume(WRITERS[request.param](tmp_path, source))


def test_shape_dtype_and_roi_match_source(volume: Volume, source: np.ndarray) -> None:
    assert volume.shape == SHAPE
    assert volume.dtype == np.uint8
    assert volume.voxel_size is None and volume.offset is None
    np.testing.assert_array_equal(volume.read(ROI), source[AT])
    np.testing.assert_array_equal(volume.read(), source)
    # a ROI of fewer axes spans the last ones (leading axes whole); boxes are clipped to the
    # volume on every side, as numpy clips a slice; an empty box keeps the other axes' sizes
    np.testing.assert_array_equal(volume.read(Roi((5, 2), (12, 18))), source[:, 5:17, 2:20])
    np.testing.assert_array_equal(volume.read(Roi((8, 0, 0), (91, 3, 99))), source[8:, :3])
    np.testing.assert_array_equal(volume.read(Roi((-2, -1, 20), (4, 3, 9))), source[:2, :2, 20:])
    assert volume.read(Roi((4, 0, 0), (0, 20, 24))).shape == (0, 20, 24)
    assert volume.read(Roi((30, 0, 0), (2, 20, 24))).shape == (0, 20, 24)


def test_volume_pickles_and_reads_after_unpickling(volume: Volume, source: np.ndarray) -> None:
    volume.read(ROI)  # populate any cached handle first; it must not travel
    clone = pickle.loads(pickle.dumps(volume))
    assert clone == volume and str(clone) == str(volume)
    np.testing.assert_array_equal(clone.read(ROI), source[AT])


_INHERITED: list[Volume] = []  # reaches a forked worker by inheritance, not by pickling


def _read_inherited() -> np.ndarray:
    return _INHERITED[0].read(ROI)


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_reads_in_forked_worker_after_parent_read(volume: Volume, source: np.ndarray) -> None:
    volume.read(ROI)  # the parent holds any cached handle when the worker forks (DataLoader)
    _INHERITED[:] = [volume]
    try:
        with multiprocessing.get_context("fork").Pool(1) as pool:
            np.testing.assert_array_equal(pool.apply(_read_inherited), source[AT])
    finally:
        _INHERITED.clear()


def test_bad_roi_is_a_programming_error(volume: Volume) -> None:
    with pytest.raises(TypeError, match="takes a Roi"):
        volume.read((slice(0, 10),))  # type: ignore[arg-type]
    with pytest.raises(IndexError):
        volume.read(Roi((0, 0, 0, 0), (1, 1, 1, 1)))


def test_zarr_open_and_read_are_lazy(tmp_path: Path, source: np.ndarray) -> None:
    spec = write_zarr3(tmp_path, source)
    chunk_dir = tmp_path / "v3.zarr/image/c"
    # Chunk grid (4, 8, 8): z chunks 0..2. Corrupt every chunk with z index 0.
    for chunk in (chunk_dir / "0").rglob("*"):
        if chunk.is_file():
            chunk.write_bytes(b"garbage")
    vol = open_volume(spec)
    assert vol.shape == SHAPE
    np.testing.assert_array_equal(vol.read(Roi((4, 0, 0), (8, 20, 24))), source[4:12])
    with pytest.raises(VolumeError, match="reading"):
        vol.read(Roi((0, 0, 0), (2, 20, 24)))


def test_tiff_folder_natural_order_and_lazy(tmp_path: Path, source: np.ndarray) -> None:
    folder = Path(write_tiff_folder(tmp_path, source))
    (folder / "section_11.tif").write_bytes(b"not a tiff")  # outside the ROI below
    vol = open_volume(folder)
    assert vol.shape == SHAPE
    np.testing.assert_array_equal(vol.read(Roi((1, 0, 0), (10, 20, 24))), source[1:11])
    with pytest.raises(VolumeError, match="section_11"):
        vol.read()


def test_tiff_folder_mismatched_section(tmp_path: Path, source: np.ndarray) -> None:
    folder = Path(write_tiff_folder(tmp_path, source))
    tifffile.imwrite(folder / "section_5.tif", source[5, :10])
    vol = open_volume(folder)
    with pytest.raises(VolumeError, match=r"section_5\.tif.*all sections must match"):
        vol.read(Roi((4, 0, 0), (2, 20, 24)))


def test_multipage_tiff_reads_only_roi_pages(
    tmp_path: Path, source: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    vol = open_volume(write_tiff(tmp_path, source))
    read_pages: list[int] = []
    original = tifffile.TiffPage.asarray

    def spy(self: tifffile.TiffPage, *args: object, **kwargs: object) -> np.ndarray:
        read_pages.append(self.index)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(tifffile.TiffPage, "asarray", spy)
    np.testing.assert_array_equal(vol.read(ROI), source[AT])
    assert read_pages == list(range(3, 11))


# --- metadata ---------------------------------------------------------------------------


def ome_multiscales(ndim: int, scale: list[float], translation: list[float]) -> list[dict]:
    names = ["c", "z", "y", "x"][-ndim:]
    axes = [
        {"name": n, "type": "channel"} if n == "c" else {"name": n, "type": "space", "unit": "nm"}
        for n in names
    ]
    return [
        {
            "version": "0.4",
            "axes": axes,
            "datasets": [
                {
                    "path": "s0",
                    "coordinateTransformations": [
                        {"type": "scale", "scale": scale},
                        {"type": "translation", "translation": translation},
                    ],
                },
                {
                    "path": "s1",
                    "coordinateTransformations": [
                        {"type": "scale", "scale": [2 * s for s in scale]},
                    ],
                },
            ],
        }
    ]


def test_ome_zarr_04(tmp_path: Path) -> None:
    g = zarr.open_group(tmp_path / "ome.zarr", mode="w", zarr_format=2)
    raw = g.create_group("raw")
    raw.attrs["multiscales"] = ome_multiscales(3, [40, 4, 4], [400, 40, 8])
    raw.create_array("s0", shape=(10, 10, 10), dtype="uint8")
    raw.create_array("s1", shape=(5, 5, 5), dtype="uint8")
    vol = open_volume(tmp_path / "ome.zarr/raw/s0")
    assert vol.voxel_size == (40.0, 4.0, 4.0)
    assert vol.offset == (10, 10, 2)
    s1 = open_volume(tmp_path / "ome.zarr", "raw/s1")
    assert s1.voxel_size == (80.0, 8.0, 8.0) and s1.offset == (0, 0, 0)


def test_ome_zarr_05_with_channel_axis(tmp_path: Path) -> None:
    g = zarr.open_group(tmp_path / "pred.zarr", mode="w")
    g.attrs["ome"] = {
        "version": "0.5",
        "multiscales": ome_multiscales(4, [1, 8, 8, 8], [0, 80, 16, 0]),
    }
    g.create_array("s0", shape=(3, 10, 10, 10), dtype="uint8")
    vol = open_volume(tmp_path / "pred.zarr/s0")
    assert vol.shape == (3, 10, 10, 10)
    assert vol.voxel_size == (8.0, 8.0, 8.0)
    assert vol.offset == (10, 2, 0)


def test_ome_units_are_converted_to_nm(tmp_path: Path) -> None:
    g = zarr.open_group(tmp_path / "um.zarr", mode="w")
    ms = ome_multiscales(3, [0.04, 0.004, 0.004], [0.4, 0, 0])
    for axis in ms[0]["axes"]:
        axis["unit"] = "micrometer"
    g.attrs["multiscales"] = ms
    g.create_array("s0", shape=(4, 4, 4), dtype="uint8")
    vol = open_volume(tmp_path / "um.zarr/s0")
    assert vol.voxel_size == (40.0, 4.0, 4.0) and vol.offset == (10, 0, 0)


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_funlib_attributes_zarr(tmp_path: Path, zarr_format: int) -> None:
    g = zarr.open_group(tmp_path / "f.zarr", mode="w", zarr_format=zarr_format)
    a = g.create_array("labels", shape=(4, 4, 4), dtype="uint64")
    a.attrs.update({"resolution": [40, 4, 4], "offset": [400, 80, 40]})
    vol = open_volume(tmp_path / "f.zarr/labels")
    assert vol.voxel_size == (40.0, 4.0, 4.0) and vol.offset == (10, 20, 10)
    assert vol.dtype == np.uint64


def test_funlib_attributes_hdf5(tmp_path: Path) -> None:
    with h5py.File(tmp_path / "f.hdf", "w") as f:
        d = f.create_dataset("volumes/labels", data=np.zeros((4, 4, 4), np.uint32))
        d.attrs["voxel_size"] = np.array([8, 8, 8])
        d.attrs["offset"] = np.array([16, 0, 8])
    vol = open_volume(tmp_path / "f.hdf/volumes/labels")
    assert vol.voxel_size == (8.0, 8.0, 8.0) and vol.offset == (2, 0, 1)


def test_inconsistent_metadata_is_an_error(tmp_path: Path) -> None:
    g = zarr.open_group(tmp_path / "bad.zarr", mode="w")
    g.create_array("a", shape=(4, 4, 4), dtype="uint8").attrs["voxel_size"] = [4, 4, 4, 4, 4]
    g.create_array("b", shape=(4, 4, 4), dtype="uint8").attrs["voxel_size"] = [40, 0, 4]
    with pytest.raises(VolumeError, match=r"bad\.zarr/a: attribute voxel_size has 5 values"):
        open_volume(tmp_path / "bad.zarr/a")
    with pytest.raises(VolumeError, match="must be positive"):
        open_volume(tmp_path / "bad.zarr/b")


def test_imagej_tiff_voxel_size(tmp_path: Path) -> None:
    data = np.zeros((5, 8, 9), np.uint8)
    path = tmp_path / "ij.tif"
    tifffile.imwrite(
        path,
        data,
        imagej=True,
        resolution=(1 / 4, 1 / 4),
        metadata={"spacing": 40, "unit": "nm", "axes": "ZYX"},
    )
    assert open_volume(path).voxel_size == (40.0, 4.0, 4.0)


# --- errors -----------------------------------------------------------------------------


def test_missing_zarr_array_lists_alternatives(tmp_path: Path) -> None:
    g = zarr.open_group(tmp_path / "vol.zarr", mode="w")
    g.create_array("image", shape=(2, 2, 2), dtype="uint8")
    g.create_array("labels", shape=(2, 2, 2), dtype="uint8")
    g.create_group("masks").create_array("mito", shape=(2, 2, 2), dtype="uint8")
    with pytest.raises(
        VolumeError, match=r"has no array 'imgae'; arrays: image, labels, masks/mito"
    ):
        open_volume(tmp_path / "vol.zarr/imgae")
    with pytest.raises(VolumeError, match=r"vol\.zarr/masks is a zarr group.*masks/mito"):
        open_volume(tmp_path / "vol.zarr/masks")
    with pytest.raises(VolumeError, match="is a zarr group; name an array"):
        open_volume(tmp_path / "vol.zarr")


def test_bare_zarr_array_has_no_datasets(tmp_path: Path, source: np.ndarray) -> None:
    path = write_zarr_bare(tmp_path, source)
    with pytest.raises(VolumeError, match="single zarr array"):
        open_volume(path, "image")


def test_missing_hdf5_dataset_lists_alternatives(tmp_path: Path, source: np.ndarray) -> None:
    write_hdf5(tmp_path, source)
    with pytest.raises(VolumeError, match=r"has no dataset 'volumes/raww'; datasets: volumes/raw"):
        open_volume(tmp_path / "f.h5/volumes/raww")
    with pytest.raises(VolumeError, match=r"HDF5 group, not a dataset.*volumes/raw"):
        open_volume(tmp_path / "f.h5", "volumes")
    with pytest.raises(VolumeError, match="name a dataset"):
        open_volume(tmp_path / "f.h5")


@pytest.mark.parametrize("name", ["missing.zarr/image", "missing.h5/raw", "missing.tif", "nope"])
def test_missing_path(tmp_path: Path, name: str) -> None:
    with pytest.raises(VolumeError, match="no such file or directory"):
        open_volume(tmp_path / name)


@pytest.mark.parametrize("name", ["g.h5", "g.tif", "g.npy"])
def test_garbage_file(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_bytes(os.urandom(300))
    with pytest.raises(VolumeError, match=rf"{name}") as info:
        open_volume(tmp_path / name)
    assert "\n" not in str(info.value)


def test_garbage_and_empty_directories(tmp_path: Path) -> None:
    (tmp_path / "empty.zarr").mkdir()
    with pytest.raises(VolumeError, match=r"empty\.zarr: not a zarr store"):
        open_volume(tmp_path / "empty.zarr/image")
    (tmp_path / "junk.zarr").mkdir()
    (tmp_path / "junk.zarr/zarr.json").write_bytes(b"\x00\xff garbage")
    with pytest.raises(VolumeError, match=r"junk\.zarr"):
        open_volume(tmp_path / "junk.zarr")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain/readme.txt").write_text("hi")
    with pytest.raises(VolumeError, match=r"neither a zarr store .* nor a folder of \.tif"):
        open_volume(tmp_path / "plain")


def test_unsupported_extension(tmp_path: Path) -> None:
    (tmp_path / "vol.mrc").write_bytes(b"\x00" * 64)
    with pytest.raises(VolumeError, match=r"vol\.mrc: unsupported format \.mrc; supported"):
        open_volume(tmp_path / "vol.mrc")


def test_single_array_formats_refuse_a_dataset(tmp_path: Path, source: np.ndarray) -> None:
    with pytest.raises(VolumeError, match="single array"):
        open_volume(write_npy(tmp_path, source), "raw")


def test_open_volume_combines_path_and_dataset(tmp_path: Path, source: np.ndarray) -> None:
    write_hdf5(tmp_path, source)
    vol = open_volume(tmp_path / "f.h5/volumes", "raw")
    assert (vol.path, vol.dataset) == (str(tmp_path / "f.h5"), "volumes/raw")
    assert str(vol) == f"{tmp_path}/f.h5/volumes/raw"


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("a/vol.zarr/image", ("a/vol.zarr", "image")),
        ("f.h5/volumes/raw", ("f.h5", "volumes/raw")),
        ("/abs/f.hdf5/raw/", ("/abs/f.hdf5", "raw")),
        ("g.HDF//x", ("g.HDF", "x")),
        ("vol.zarr", ("vol.zarr", None)),
        ("vol.zarr/", ("vol.zarr", None)),
        ("outer.zarr/inner.zarr/a", ("outer.zarr", "inner.zarr/a")),
        ("x.tif", ("x.tif", None)),
        ("dir_of_tiffs/", ("dir_of_tiffs", None)),
        ("a.npy", ("a.npy", None)),
        ("/", ("/", None)),
    ],
)
def test_split_volume_path(spec: str, expected: tuple[str, str | None]) -> None:
    assert split_volume_path(spec) == expected
    assert split_volume_path(Path(spec)) == expected
