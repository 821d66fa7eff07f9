"""Writing and converting: OME-Zarr 0.5 image groups, lossless streamed conversion, safety."""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
import zarr
from volume_files import WRITERS, write_hdf5, write_npy, write_tiff

from emrun.geometry import Roi
from emrun.io import (
    ConvertResult,
    VolumeError,
    convert_volume,
    create_volume,
    default_chunks,
    guess_name,
    open_volume,
    write_volume,
)
from emrun.io.convert import convert, slabs
from emrun.io.volume import Volume
from emrun.io.zarr_volume import ZarrVolume

SHAPE = (11, 20, 24)  # 11 = two whole z-chunks of 4 and a partial one
CHUNKS = (4, 8, 8)
SNEMI = Path(__file__).resolve().parents[2] / "shared/data/snemi3d"


def make(dtype: str, shape: tuple[int, ...] = SHAPE, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    info = np.iinfo(dtype)
    data = rng.integers(0, min(int(info.max), 2**62) + 1, shape, dtype=np.uint64)
    data = data.astype(dtype)
    if dtype == "uint64":
        data[0, 0, :4] = [2**32 + 1, 2**63 + 5, 2**64 - 1, 0]  # ids beyond 32 bits
    return data


SAVERS: dict[str, Callable[[Path, np.ndarray], str]] = {
    name: WRITERS[name] for name in ("tiff", "tiff-folder", "hdf5", "npy", "zarr3")
}


def ome(path: Path) -> dict:
    return json.loads((path / "zarr.json").read_text())["attributes"]["ome"]


# --- conversion round trips -------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "uint32", "uint64"])
@pytest.mark.parametrize("fmt", list(SAVERS))
def test_convert_round_trip_is_exact(tmp_path: Path, fmt: str, dtype: str) -> None:
    data = make(dtype)
    source = SAVERS[fmt](tmp_path, data)
    result = convert(source, tmp_path / "out.zarr", chunks=CHUNKS, progress=False)
    expected_name = "image" if dtype == "uint8" else "labels"
    assert result == ConvertResult(
        name=expected_name,
        shape=SHAPE,
        dtype=np.dtype(dtype),
        voxel_size=None,
        chunks=CHUNKS,
        path=f"{tmp_path}/out.zarr/{expected_name}",
        offset=None,
        source=str(open_volume(source)),
    )
    vol = open_volume(result.path)
    assert (vol.shape, vol.dtype, vol.voxel_size) == (SHAPE, np.dtype(dtype), None)
    assert str(vol) == f"{tmp_path}/out.zarr/{expected_name}"
    np.testing.assert_array_equal(vol.read(), data)
    folder = "labels/labels" if expected_name == "labels" else expected_name  # OME labels
    array = zarr.open_array(tmp_path / "out.zarr" / folder / "0", mode="r")
    assert array.chunks == CHUNKS and array.dtype == np.dtype(dtype)


def test_bool_big_endian_float_and_channels(tmp_path: Path) -> None:
    out = tmp_path / "out.zarr"
    mask = make("uint8") > 128
    np.save(tmp_path / "mask.npy", mask)
    r = convert(tmp_path / "mask.npy", out, progress=False)
    assert (r.name, r.dtype) == ("mask", np.uint8)
    np.testing.assert_array_equal(open_volume(r.path).read(), mask.astype(np.uint8))

    big = make("uint16").astype(">u2")
    np.save(tmp_path / "big.npy", big)
    r = convert(tmp_path / "big.npy", out, name="big", progress=False)
    assert r.dtype == np.dtype("<u2")
    np.testing.assert_array_equal(open_volume(r.path).read(), big)

    prob = np.random.default_rng(1).random(SHAPE, dtype=np.float32)
    np.save(tmp_path / "prob.npy", prob)
    assert convert(tmp_path / "prob.npy", out, name=None, progress=False).name == "image"
    np.testing.assert_array_equal(open_volume(out / "image").read(), prob)

    aff = make("uint8", (3, *SHAPE))
    np.save(tmp_path / "aff.npy", aff)
    r = convert(tmp_path / "aff.npy", out, name="aff", voxel_size=(40, 4, 4), progress=False)
    assert r.chunks == (3, 11, 20, 24)
    vol = open_volume(r.path)
    assert vol.shape == (3, *SHAPE) and vol.voxel_size == (40.0, 4.0, 4.0)
    np.testing.assert_array_equal(vol.read(), aff)
    axes = ome(out / "aff")["multiscales"][0]["axes"]
    assert axes[0] == {"name": "c", "type": "channel"}
    # spatial chunks for a channel volume (what `data convert --chunks Z Y X` passes)
    r = convert(tmp_path / "aff.npy", out, name="aff4", chunks=(4, 8, 8), progress=False)
    assert r.chunks == (3, 4, 8, 8)
    np.testing.assert_array_equal(open_volume(r.path).read(), aff)


def test_guess_name() -> None:
    assert [guess_name(np.dtype(t)) for t in ("uint8", "int8", "float32", "bool")] == [
        "image",
        "image",
        "image",
        "mask",
    ]
    assert {guess_name(np.dtype(t)) for t in ("uint16", "int32", "uint64")} == {"labels"}


# --- metadata ---------------------------------------------------------------------------


def test_ome_attributes_and_voxel_size(tmp_path: Path) -> None:
    source = write_npy(tmp_path, make("uint8"))
    out = tmp_path / "out.zarr"
    r = convert(source, out, voxel_size=(30, 6, 6), progress=False)
    assert r.voxel_size == (30.0, 6.0, 6.0)
    assert open_volume(out / "image").voxel_size == (30.0, 6.0, 6.0)
    space = {"type": "space", "unit": "nanometer"}
    assert ome(out / "image") == {
        "version": "0.5",
        "multiscales": [
            {
                "axes": [{"name": n, **space} for n in "zyx"],
                "datasets": [
                    {
                        "path": "0",
                        "coordinateTransformations": [{"type": "scale", "scale": [30.0, 6.0, 6.0]}],
                    }
                ],
                "name": "image",
            }
        ],
    }
    root = json.loads((out / "zarr.json").read_text())
    assert (root["zarr_format"], root["node_type"]) == (3, "group")
    meta = json.loads((out / "image/0/zarr.json").read_text())
    assert meta["dimension_names"] == ["z", "y", "x"]
    assert meta["codecs"][-1] == {"name": "zstd", "configuration": {"level": 1,
                                                                     "checksum": False}}
    labels = tmp_path / "labels.zarr"  # wider types keep blosc's byte shuffle (label runs)
    write_volume(labels, "seg", np.arange(8, dtype=np.uint64).reshape(2, 2, 2))
    codec = json.loads((labels / "labels/seg/0/zarr.json").read_text())["codecs"][-1]
    assert codec["name"] == "blosc" and codec["configuration"]["shuffle"] == "shuffle"


def test_source_metadata_is_kept(tmp_path: Path) -> None:
    data = make("uint32")
    with h5py.File(tmp_path / "f.h5", "w") as f:
        d = f.create_dataset("labels", data=data)
        d.attrs["resolution"] = [40, 8, 8]
        d.attrs["offset"] = [80, 16, 0]
    out = tmp_path / "out.zarr"
    r = convert(tmp_path / "f.h5/labels", out, progress=False)
    assert (r.voxel_size, r.offset) == ((40.0, 8.0, 8.0), (2, 2, 0))
    vol = open_volume(out / "labels")
    assert (vol.voxel_size, vol.offset) == ((40.0, 8.0, 8.0), (2, 2, 0))
    datasets = ome(out / "labels/labels")["multiscales"][0]["datasets"]
    transforms = datasets[0]["coordinateTransformations"]
    assert transforms[1] == {"type": "translation", "translation": [80.0, 16.0, 0.0]}
    # an explicit voxel size wins over the source's
    r = convert(tmp_path / "f.h5/labels", out, name="l2", voxel_size=(30, 6, 6), progress=False)
    assert open_volume(r.path).voxel_size == (30.0, 6.0, 6.0)

    tifffile.imwrite(
        tmp_path / "ij.tif",
        make("uint8"),
        imagej=True,
        resolution=(1 / 4, 1 / 4),
        metadata={"spacing": 40, "unit": "nm", "axes": "ZYX"},
    )
    r = convert(tmp_path / "ij.tif", out, progress=False)
    assert open_volume(r.path).voxel_size == (40.0, 4.0, 4.0)


def test_unknown_voxel_size_reads_back_as_unknown(tmp_path: Path) -> None:
    write_volume(tmp_path / "o.zarr", "image", make("uint8"), offset=(1, 2, 3))
    axes = ome(tmp_path / "o.zarr/image")["multiscales"][0]["axes"]
    assert all("unit" not in a for a in axes)
    vol = open_volume(tmp_path / "o.zarr/image")
    assert vol.voxel_size is None and vol.offset == (1, 2, 3)


def test_several_volumes_in_one_store(tmp_path: Path) -> None:
    out = tmp_path / "vol.zarr"
    image, labels, mito = make("uint8"), make("uint64"), make("uint8", seed=2) > 200
    convert(write_tiff(tmp_path, image), out, voxel_size=(30, 6, 6), progress=False)
    convert(write_hdf5(tmp_path, labels), out, voxel_size=(30, 6, 6), progress=False)
    write_volume(out, "mito", mito, voxel_size=(30, 6, 6))
    for name, data in (("image", image), ("labels", labels), ("mito", mito)):
        vol = open_volume(f"{out}/{name}")
        assert vol.voxel_size == (30.0, 6.0, 6.0)
        np.testing.assert_array_equal(vol.read(), data)
    with pytest.raises(VolumeError, match=r"arrays: image, labels, mito$"):
        open_volume(out)
    with pytest.raises(VolumeError, match=r"has no array 'lables'; arrays: image, labels, mito"):
        open_volume(out / "lables")


# --- create_volume / write_volume -------------------------------------------------------


def test_create_volume(tmp_path: Path) -> None:
    out = tmp_path / "pred.zarr"
    a = create_volume(
        out, "aff", (3, 40, 300, 500), "uint8", channel_axis=True, attrs={"model": "rsunet"}
    )
    assert a.chunks == (3, 16, 256, 256) == default_chunks((3, 40, 300, 500), True)
    a[:, :8] = 7
    vol = open_volume(out / "aff")
    assert vol.shape == (3, 40, 300, 500) and vol.voxel_size is None
    assert vol.read(Roi((6, 0, 0), (4, 1, 1))).ravel().tolist() == (
        [7, 7, 0, 0] * 3
    )
    attrs = json.loads((out / "aff/zarr.json").read_text())["attributes"]
    assert attrs["model"] == "rsunet" and attrs["ome"]["version"] == "0.5"
    assert default_chunks((5, 40, 300)) == (5, 40, 256)
    with pytest.raises(VolumeError, match=r"aff: already exists; not replaced: give another "
                       r"output store$"):
        create_volume(out, "aff", (4, 4, 4), "uint8")
    b = create_volume(out, "aff", (4, 4, 4), "uint64", voxel_size=(8, 8, 8), overwrite=True)
    assert b.shape == (4, 4, 4) and open_volume(out / "aff").dtype == np.uint64


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"shape": (4, 4)}, "not a 3-d"),
        ({"shape": (4, 4, 4, 4)}, "not a 3-d"),
        ({"voxel_size": (4, 4)}, "voxel size"),
        ({"voxel_size": (4, 0, 4)}, "voxel size"),
        ({"offset": (1.5, 0, 0)}, "offset must be integers"),
        ({"chunks": (4, 4)}, "chunks"),
        ({"dtype": "U4"}, "unsupported dtype"),
        ({"name": "a/b"}, "bad volume name"),
        ({"name": "x.partial"}, "reserved"),
        ({"name": ""}, "bad volume name"),
    ],
)
def test_create_volume_refuses_bad_arguments(tmp_path: Path, kwargs: dict, match: str) -> None:
    args = {"name": "v", "shape": (4, 4, 4), "dtype": "uint8", **kwargs}
    with pytest.raises(VolumeError, match=match):
        create_volume(tmp_path / "o.zarr", **args)
    assert not (tmp_path / "o.zarr").exists()  # checked before anything is written


def test_refuses_unsuitable_output(tmp_path: Path) -> None:
    source = write_npy(tmp_path, make("uint8"))
    (tmp_path / "file.zarr").write_text("x")
    (tmp_path / "plain.zarr").mkdir()
    (tmp_path / "plain.zarr/notes.txt").write_text("x")
    zarr.open_group(tmp_path / "v2.zarr", mode="w", zarr_format=2)
    zarr.create_array(tmp_path / "arr.zarr", shape=(2,), dtype="uint8")
    for name, match in [
        ("file.zarr", "not a folder"),
        ("plain.zarr", "not a zarr store"),
        ("v2.zarr", "zarr v2"),
        ("arr.zarr", "zarr array, not a group"),
        ("out", r"must be a folder whose name ends in \.zarr"),
        ("file.zarr/deeper/inner.zarr", "file.zarr is a file, not a folder"),
    ]:
        with pytest.raises(VolumeError, match=match):
            convert(source, tmp_path / name, progress=False)
    (tmp_path / "empty.zarr").mkdir()  # an empty folder is fine
    assert convert(source, tmp_path / "empty.zarr", progress=False).name == "image"


@pytest.mark.parametrize("label", [False, True])
def test_overwrite_never_replaces_the_store_s_own_files(tmp_path: Path, label: bool) -> None:
    """`--name zarr.json --overwrite` moved the store's (or its labels group's) metadata
    aside for a volume folder: every volume in it stopped opening."""
    out = tmp_path / "out.zarr"
    data = make("uint8")
    write_volume(out, "image", data)
    write_volume(out, "seg", data, label=True)
    (out / "notes").mkdir()  # a user's folder in the store
    source = write_npy(tmp_path, data)
    for name, match in (("zarr.json", "names starting 'zarr.' are zarr's own"),
                        ("notes", "exists and is not a volume; not replaced")):
        with pytest.raises(VolumeError, match=match):
            convert(source, out, name=name, label=label and name != "notes", overwrite=True,
                    progress=False)
    np.testing.assert_array_equal(open_volume(out / "image").read(), data)
    np.testing.assert_array_equal(open_volume(out / "seg").read(), data)
    assert sorted(p.name for p in out.iterdir()) == ["image", "labels", "notes", "zarr.json"]


def test_a_first_write_cut_short_leaves_a_store_the_rerun_takes(tmp_path: Path) -> None:
    """An interrupt can end a first write while zarr's IO thread still writes chunks: they
    land in `NAME.partial` after the cleanup removed the store's metadata, and the rerun
    refused the folder as 'not a zarr store'. Only such leftovers are cleared."""
    out = tmp_path / "out.zarr"
    (out / "labels/seg.partial/0/c/0/0").mkdir(parents=True)
    (out / "labels/seg.partial/0/c/0/0/1").write_bytes(b"chunk")
    (out / "image.partial/0/c/0").mkdir(parents=True)
    data = make("uint8")
    write_volume(out, "image", data)
    assert sorted(p.name for p in out.iterdir()) == ["image", "zarr.json"]
    np.testing.assert_array_equal(open_volume(out / "image").read(), data)
    mixed = tmp_path / "mixed.zarr"
    (mixed / "image.partial").mkdir(parents=True)
    (mixed / "notes.txt").write_text("mine")
    with pytest.raises(VolumeError, match="not a zarr store"):
        write_volume(mixed, "image", data)
    assert (mixed / "notes.txt").read_text() == "mine"


def test_refuses_to_overwrite_unless_asked(tmp_path: Path) -> None:
    out = tmp_path / "out.zarr"
    first, second = make("uint8"), make("uint8", seed=5)
    convert(write_npy(tmp_path, first), out, progress=False)
    np.save(tmp_path / "second.npy", second)
    with pytest.raises(VolumeError, match=r"out\.zarr/image: already exists"):
        convert(tmp_path / "second.npy", out, progress=False)
    np.testing.assert_array_equal(open_volume(out / "image").read(), first)
    convert(tmp_path / "second.npy", out, overwrite=True, progress=False)
    np.testing.assert_array_equal(open_volume(out / "image").read(), second)
    assert sorted(p.name for p in out.iterdir()) == ["image", "zarr.json"]


# --- atomicity --------------------------------------------------------------------------


class Boom(RuntimeError):
    pass


def fail_after(monkeypatch: pytest.MonkeyPatch, reads: int) -> None:
    original = Volume.read
    count = [0]

    def read(self: Volume, roi: object = None) -> np.ndarray:
        count[0] += 1
        if count[0] > reads:
            raise Boom("disk on fire")
        return original(self, roi)

    monkeypatch.setattr(Volume, "read", read)


def test_failed_conversion_leaves_nothing_that_looks_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out.zarr"
    source = write_npy(tmp_path, make("uint16"))
    fail_after(monkeypatch, reads=1)
    with pytest.raises(Boom):
        convert(source, out, chunks=CHUNKS, progress=False)
    assert not out.exists()  # the store was made for this volume: an empty one is not left
    # into a store that holds other volumes, the failed one leaves no trace and the rest stays
    write_volume(out, "image", make("uint8"))
    with pytest.raises(Boom):
        convert(source, out, chunks=CHUNKS, progress=False)
    assert not (out / "labels/labels").exists()  # the segmentation: labels/NAME
    assert not (out / "labels/labels.partial").exists()
    with pytest.raises(VolumeError, match="has no array 'labels'"):
        open_volume(out / "labels")
    assert open_volume(out / "image").shape == make("uint8").shape


def test_failed_overwrite_keeps_the_old_volume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out.zarr"
    old = make("uint8")
    write_volume(out, "image", old)
    source = write_npy(tmp_path, make("uint8", seed=3))
    fail_after(monkeypatch, reads=2)
    with pytest.raises(Boom):
        convert(source, out, chunks=CHUNKS, overwrite=True, progress=False)
    monkeypatch.undo()
    np.testing.assert_array_equal(open_volume(out / "image").read(), old)
    assert sorted(p.name for p in out.iterdir()) == ["image", "zarr.json"]


def test_partial_volume_is_invisible_and_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out.zarr"
    data = make("uint8")
    write_volume(out, "other", data)
    # a run killed outright leaves NAME.partial: not a volume, and cleared by the next run
    write_volume(out, "tmp", data[:2])
    (out / "tmp").rename(out / "image.partial")
    with pytest.raises(VolumeError, match=r"arrays: other$"):
        open_volume(out)
    with pytest.raises(VolumeError, match="has no array 'image'"):
        open_volume(out / "image")
    convert(write_npy(tmp_path, data), out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["image", "other", "zarr.json"]
    np.testing.assert_array_equal(open_volume(out / "image").read(), data)


# --- streaming --------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["tiff", "npy", "hdf5"])
def test_source_is_read_in_slabs_of_whole_z_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    data = make("uint16")
    source = SAVERS[fmt](tmp_path, data)
    rois: list[Roi] = []
    original = Volume.read

    def spy(self: Volume, roi: Roi | None = None) -> np.ndarray:
        rois.append(self.normalise_roi(roi))
        return original(self, roi)

    monkeypatch.setattr(Volume, "read", spy)
    r = convert(source, tmp_path / "out.zarr", chunks=CHUNKS, progress=False)
    assert [(s.begin[0], s.end[0]) for s in rois] == [(0, 4), (4, 8), (8, 11)]
    assert all(s.to_slices()[1:] == (slice(0, 20), slice(0, 24)) for s in rois)
    monkeypatch.setattr(Volume, "read", original)
    np.testing.assert_array_equal(open_volume(r.path).read(), data)


def test_wide_slabs_are_cut_along_y_at_chunk_boundaries() -> None:
    # uint16 slab of 4 sections x 20 rows x 24: 192 bytes per row; budget 1000 -> 1 chunk (8)
    blocks = [b.to_slices() for b in slabs(SHAPE, CHUNKS, 2, max_bytes=1000)]
    assert [(b[0].start, b[1].start, b[1].stop) for b in blocks[:3]] == [
        (0, 0, 8),
        (0, 8, 16),
        (0, 16, 20),
    ]
    assert len(blocks) == 9 and all(b[2] == slice(0, 24) for b in blocks)
    assert len(list(slabs(SHAPE, CHUNKS, 2, max_bytes=192 * 16))) == 6  # 2 chunks a band
    c = list(slabs((2, *SHAPE), (1, *CHUNKS), 1))
    assert len(c) == 3 and c[0] == Roi((0, 0, 0, 0), (2, 4, 20, 24))


def test_convert_with_tiny_slab_budget_is_exact(tmp_path: Path) -> None:
    data = make("uint64")
    r = convert(write_npy(tmp_path, data), tmp_path / "o.zarr", chunks=CHUNKS, max_slab_bytes=1)
    np.testing.assert_array_equal(open_volume(r.path).read(), data)


def test_progress_bar_off_a_terminal(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    r = convert_volume(write_npy(tmp_path, make("uint8")), tmp_path / "o.zarr", progress=True)
    captured = capsys.readouterr()
    assert captured.out == ""  # the bar goes to stderr
    assert r.name == "image"


# --- reading image groups ---------------------------------------------------------------


def test_image_group_reads_like_an_array(tmp_path: Path) -> None:
    data = make("uint8")
    write_volume(tmp_path / "v.zarr", "image", data, voxel_size=(40, 4, 4), offset=(1, 0, 2))
    vol = open_volume(tmp_path / "v.zarr", "image")
    assert isinstance(vol, ZarrVolume) and vol.array_path == "image/0"
    assert (vol.dataset, vol.voxel_size, vol.offset) == ("image", (40.0, 4.0, 4.0), (1, 0, 2))
    clone = pickle.loads(pickle.dumps(vol))
    np.testing.assert_array_equal(clone.read(Roi((2, 0, 0), (3, *data.shape[1:]))), data[2:5])
    level = open_volume(tmp_path / "v.zarr/image/0")  # the level array itself still opens
    assert level.voxel_size == (40.0, 4.0, 4.0) and str(level).endswith("v.zarr/image/0")


def test_ome_04_group_and_root_image_group(tmp_path: Path) -> None:
    g = zarr.open_group(tmp_path / "a.zarr", mode="w", zarr_format=2)
    raw = g.create_group("raw")
    raw.attrs["multiscales"] = [
        {
            "version": "0.4",
            "axes": [{"name": n, "type": "space", "unit": "nanometer"} for n in "zyx"],
            "datasets": [
                {"path": "s0", "coordinateTransformations": [{"type": "scale", "scale": [8] * 3}]},
                {"path": "s1", "coordinateTransformations": [{"type": "scale", "scale": [16] * 3}]},
            ],
        }
    ]
    raw.create_array("s0", shape=(6, 6, 6), dtype="uint8")[:] = 3
    raw.create_array("s1", shape=(3, 3, 3), dtype="uint8")
    vol = open_volume(tmp_path / "a.zarr/raw")
    assert vol.shape == (6, 6, 6) and vol.voxel_size == (8.0,) * 3 and vol.read().max() == 3

    root = zarr.open_group(tmp_path / "img.ome.zarr", mode="w")
    root.attrs["ome"] = {
        "version": "0.5",
        "multiscales": [{"axes": ["z", "y", "x"], "datasets": [{"path": "0"}]}],
    }
    root.create_array("0", shape=(2, 3, 4), dtype="uint16")
    vol = open_volume(tmp_path / "img.ome.zarr")
    assert vol.shape == (2, 3, 4) and str(vol) == str(tmp_path / "img.ome.zarr")

    bad = zarr.open_group(tmp_path / "bad.zarr", mode="w").create_group("image")
    bad.attrs["ome"] = {"version": "0.5", "multiscales": [{"datasets": [{"path": "0"}]}]}
    with pytest.raises(VolumeError, match="name dataset '0', but the group has no such array"):
        open_volume(tmp_path / "bad.zarr/image")


# --- real data --------------------------------------------------------------------------


@pytest.mark.skipif(not (SNEMI / "train-labels.tif").exists(), reason="SNEMI3D data absent")
def test_snemi3d_labels_convert_exactly(tmp_path: Path) -> None:
    source = SNEMI / "train-labels.tif"
    r = convert(source, tmp_path / "s.zarr", voxel_size=(30, 6, 6), progress=False)
    assert (r.name, r.shape, r.dtype) == ("labels", (70, 1024, 1024), np.uint16)
    vol = open_volume(r.path)
    roi = Roi((20, 100, 300), (16, 500, 724))
    np.testing.assert_array_equal(vol.read(roi), open_volume(source).read(roi))
