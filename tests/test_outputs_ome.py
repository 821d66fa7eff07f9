"""Outputs that OME-Zarr tools open: every kind validated with ome-zarr-models, labels and
pyramids read with ome-zarr-py's Reader, pyramid levels against numpy, bounded reads, the
root layout, funlib attributes, and --levels mistakes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from emrun.cli import app
from emrun.io import open_volume
from emrun.io.pyramid import downsample, level_factors, write_level
from emrun.io.write import build_pyramid, write_volume

ome_zarr_models = pytest.importorskip("ome_zarr_models")
ome_zarr_reader = pytest.importorskip("ome_zarr.reader")
ome_zarr_io = pytest.importorskip("ome_zarr.io")

runner = CliRunner()


def validate(path: Path) -> str:
    """The ome-zarr-models class `path` validates as (raises when it is no OME-Zarr)."""
    return type(ome_zarr_models.open_ome_zarr(str(path))).__name__


def read_nodes(path: Path) -> list[tuple[str, str, list[tuple[int, ...]]]]:
    """What ome-zarr-py's Reader finds from `path`: (name, kind, level shapes) per node."""
    reader = ome_zarr_reader.Reader(ome_zarr_io.parse_url(str(path)))
    found = []
    for node in reader():
        kind = ("label" if node.load(ome_zarr_reader.Label)
                else "image" if node.load(ome_zarr_reader.Multiscales) else "group")
        found.append((Path(str(node.zarr).split(" ")[0]).name, kind,
                      [tuple(d.shape) for d in node.data]))
    return found


# --- numpy references, written independently of emrun.io.pyramid -------------------------


def mean_reference(data: np.ndarray, step: tuple[int, int, int]) -> np.ndarray:
    """Each output voxel: the mean of its window's present voxels, integers rounded half up."""
    out_shape = tuple(-(-n // s) for n, s in zip(data.shape[-3:], step, strict=True))
    out = np.zeros(data.shape[:-3] + out_shape, np.float64)
    for z, y, x in np.ndindex(*out_shape):
        window = data[..., z * step[0]:(z + 1) * step[0], y * step[1]:(y + 1) * step[1],
                      x * step[2]:(x + 1) * step[2]]
        out[..., z, y, x] = window.reshape(*data.shape[:-3], -1).mean(axis=-1)
    if data.dtype.kind in "iu":
        out = np.floor(out + 0.5)
    return out.astype(data.dtype)


def mode_reference(data: np.ndarray, step: tuple[int, int, int]) -> np.ndarray:
    """Each output voxel: the most frequent id of its window, the smallest on ties."""
    out_shape = tuple(-(-n // s) for n, s in zip(data.shape, step, strict=True))
    out = np.zeros(out_shape, data.dtype)
    for z, y, x in np.ndindex(*out_shape):
        window = data[z * step[0]:(z + 1) * step[0], y * step[1]:(y + 1) * step[1],
                      x * step[2]:(x + 1) * step[2]].ravel()
        ids, counts = np.unique(window, return_counts=True)
        out[z, y, x] = ids[np.argmax(counts)]  # unique sorts: the first maximum is smallest
    return out


def cells(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """Blocky uint64 ids (runs of equal ids, like a segmentation) with some noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(1, 6, (shape[0], -(-shape[1] // 3), -(-shape[2] // 3)))
    ids = np.repeat(np.repeat(coarse, 3, axis=1), 3, axis=2)[:, :shape[1], :shape[2]]
    noise = rng.random(shape) < 0.2
    return np.where(noise, rng.integers(1, 6, shape), ids).astype(np.uint64)


# --- pyramids ------------------------------------------------------------------------------


def test_levels_equal_numpy_downsampling_of_level_0(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (5, 37, 43), dtype=np.uint8)  # odd sizes: cut windows
    affs = rng.random((3, 5, 37, 43)).astype(np.float32)
    labels = cells((5, 37, 43))
    out = tmp_path / "p.zarr"
    write_volume(out, "image", image, voxel_size=(30, 6, 6), levels=3, chunks=(2, 8, 8))
    write_volume(out, "affinity", affs, voxel_size=(30, 6, 6), levels=3, channel_axis=True)
    write_volume(out, "segmentation", labels, voxel_size=(30, 6, 6), levels=3, label=True)
    for name, data, reference in (("image", image, mean_reference),
                                  ("affinity", affs, mean_reference),
                                  ("labels/segmentation", labels, mode_reference)):
        expected = data
        for level in (1, 2):  # each level from the one before; y and x halved, z kept
            expected = reference(expected, (1, 2, 2))
            got = zarr.open_array(str(out / name / str(level)), mode="r")[...]
            assert got.dtype == data.dtype
            if got.dtype.kind == "f":
                np.testing.assert_allclose(got, expected, rtol=1e-6)
            else:
                np.testing.assert_array_equal(got, expected)
    assert set(np.unique(zarr.open_array(str(out / "labels/segmentation/2"))[...])) <= set(
        np.unique(labels))  # a label-preserving rule invents no id
    np.testing.assert_array_equal(open_volume(out / "image").read(), image)  # level 0 opens


def test_z_is_halved_only_where_anisotropy_allows() -> None:
    # 30 x 6 x 6 nm: y and x reach 48 nm (>= 30) before z is halved with them
    assert level_factors((64, 2048, 2048), (30, 6, 6), 6) == [
        (1, 1, 1), (1, 2, 2), (1, 4, 4), (1, 8, 8), (2, 16, 16), (4, 32, 32)]
    assert level_factors((64, 64, 64), (8, 8, 8), 3) == [(1, 1, 1), (2, 2, 2), (4, 4, 4)]
    assert level_factors((64, 64, 64), None, 3) == [(1, 1, 1), (1, 2, 2), (1, 4, 4)]
    # the default: until y and x are at most 256, at most 8 levels
    assert len(level_factors((16, 1024, 1000), (30, 6, 6), None)) == 3
    assert len(level_factors((16, 200, 200), (30, 6, 6), None)) == 1
    assert len(level_factors((16, 2**20, 2**20), (30, 6, 6), None)) == 8


def test_isotropic_levels_equal_2x2x2_downsampling() -> None:
    data = cells((9, 10, 11))
    np.testing.assert_array_equal(downsample(data, (2, 2, 2), labels=True),
                                  mode_reference(data, (2, 2, 2)))
    grey = np.random.default_rng(3).integers(0, 256, (9, 10, 11), dtype=np.uint8)
    np.testing.assert_array_equal(downsample(grey, (2, 2, 2), labels=False),
                                  mean_reference(grey, (2, 2, 2)))


def test_a_level_is_written_a_block_at_a_time(tmp_path: Path) -> None:
    """Memory stays bounded: every read of the finer level is one block's box (the output
    block times the step), whatever the volume's size, and together they cover it once."""
    data = np.random.default_rng(2).integers(0, 256, (2, 12, 100, 90), dtype=np.uint8)
    source = zarr.create_array(str(tmp_path / "s.zarr"), shape=data.shape, dtype=np.uint8,
                               chunks=(2, 4, 16, 16))
    source[...] = data
    target = zarr.create_array(str(tmp_path / "t.zarr"), shape=(2, 12, 50, 45),
                               dtype=np.uint8, chunks=(2, 4, 8, 8))
    reads: list[tuple[tuple[int, ...], tuple[int, ...]]] = []

    def spy(array, roi):
        reads.append((tuple(roi.offset), tuple(roi.shape)))
        return np.asarray(array[tuple(slice(o, o + n) for o, n in zip(roi.offset, roi.shape,
                                                                      strict=True))])

    write_level(source, target, (1, 2, 2), False, block=(4, 16, 16), threads=3, read=spy)
    assert reads and all(shape[0] == 2 and shape[1] <= 4 and shape[2] <= 32 and shape[3] <= 32
                         for _, shape in reads)
    assert sum(np.prod(shape) for _, shape in reads) == data.size  # each voxel read once
    np.testing.assert_array_equal(target[...], mean_reference(data, (1, 2, 2)))


def test_pyramid_rebuilt_whole_after_a_cut_short_build(tmp_path: Path) -> None:
    data = cells((4, 64, 64))
    write_volume(tmp_path / "r.zarr", "seg", data, label=True, levels=3)
    group = tmp_path / "r.zarr/labels/seg"
    want = zarr.open_array(str(group / "2"))[...]
    zarr.open_array(str(group / "2"), mode="r+")[...] = 0  # a build killed midway
    assert build_pyramid(group, 3) == 3
    np.testing.assert_array_equal(zarr.open_array(str(group / "2"))[...], want)
    assert build_pyramid(group, 1) == 1  # level 0 alone: the coarser levels go
    assert sorted(p.name for p in group.iterdir() if p.is_dir()) == ["0"]
    datasets = json.loads((group / "zarr.json").read_text())["attributes"]["ome"][
        "multiscales"][0]["datasets"]
    assert [d["path"] for d in datasets] == ["0"]


# --- layout: OME validation, readers, funlib ---------------------------------------------


def test_synth_store_validates_at_its_root_and_opens_labels(tmp_path: Path) -> None:
    out = tmp_path / "s.zarr"
    result = runner.invoke(app, ["data", "synth", str(out), "--shape", "8", "96", "80",
                                 "--levels", "2"])
    assert result.exit_code == 0, result.output
    assert validate(out) == "Image"
    assert validate(out / "image") == "Image"
    assert validate(out / "labels") == "Labels"
    for name in ("labels", "mito", "synapse"):
        assert validate(out / "labels" / name) == "ImageLabel"
        assert open_volume(out / name).shape == (8, 96, 80)  # the short path still opens
    nodes = read_nodes(out)
    assert nodes[0] == ("s.zarr", "image", [(8, 96, 80), (8, 48, 40)])
    labels = {name for name, kind, _ in nodes if kind == "label"}
    assert labels == {"labels", "mito", "synapse"}
    # a label names its image, and the image's reader brings it in first (hidden)
    from_label = read_nodes(out / "labels" / "mito")
    assert from_label[0][:2] == ("s.zarr", "image") and ("mito", "label") in [
        (n, k) for n, k, _ in from_label]
    # funlib.persistence's geometry on every level array
    level1 = dict(zarr.open_array(str(out / "image/1")).attrs)
    assert level1["voxel_size"] == [30.0, 12.0, 12.0] and level1["offset"] == [0.0, 0.0, 0.0]
    assert level1["axis_names"] == ["z", "y", "x"] and level1["units"] == ["nm"] * 3


def test_segmentation_store_and_prediction_store_validate(tmp_path: Path) -> None:
    offsets = [[-1, 0, 0], [0, -1, 0], [0, 0, -1]]
    affs = np.random.default_rng(4).random((3, 6, 64, 64)).astype(np.float32)
    write_volume(tmp_path / "pred.zarr", "affinity", affs, channel_axis=True,
                 voxel_size=(30, 6, 6), offset=(2, 0, 0), attrs={"offsets": offsets})
    result = runner.invoke(app, ["segment", str(tmp_path / "pred.zarr/affinity"),
                                 str(tmp_path / "seg.zarr"), "--method", "cc", "--levels", "3"])
    assert result.exit_code == 0, result.output
    seg = tmp_path / "seg.zarr"
    assert validate(seg) == "ImageLabel"  # a store of segmentations only: the root is one
    assert validate(seg / "labels/segmentation") == "ImageLabel"
    volume = open_volume(seg / "segmentation")
    assert volume.offset == (2, 0, 0) and volume.voxel_size == (30.0, 6.0, 6.0)
    assert next(shape for _, kind, shape in read_nodes(seg) if kind == "label") == [
        (6, 64, 64), (6, 32, 32), (6, 16, 16)]
    # the segmentation written beside the affinities: the root opens with both
    result = runner.invoke(app, ["segment", str(tmp_path / "pred.zarr/affinity"),
                                 str(tmp_path / "pred.zarr"), "--method", "cc"])
    assert result.exit_code == 0, result.output
    assert validate(tmp_path / "pred.zarr") == "Image"
    nodes = read_nodes(tmp_path / "pred.zarr")
    assert [(n, k) for n, k, _ in nodes] == [("pred.zarr", "image"), ("labels", "group"),
                                              ("segmentation", "label")]


def test_inference_output_validates_names_channels_and_resumes_to_a_full_pyramid(
        tmp_path: Path) -> None:
    from test_infer import make_inputs

    from emrun.infer.run import run_inference

    recipe, _, _, tmp = make_inputs(tmp_path, shape=(6, 40, 40))
    flat = tmp / "flat.zarr"
    run_inference(recipe, tmp / "c.pt", str(tmp / "in.zarr/image"), flat, block=(4, 16, 16),
                  levels=1)
    out = tmp / "out.zarr"

    class Stop(Exception):
        pass

    def stop(progress):
        if progress.done == 2:
            raise Stop

    with pytest.raises(Stop):
        run_inference(recipe, tmp / "c.pt", str(tmp / "in.zarr/image"), out,
                      block=(4, 16, 16), levels=3, on_block=stop)
    assert not (out / "aff" / "1").exists()  # no pyramid before the last block
    run_inference(recipe, tmp / "c.pt", str(tmp / "in.zarr/image"), out, block=(4, 16, 16),
                  levels=3, resume=True)
    for task in ("aff", "mito"):
        level0 = zarr.open_array(str(out / task / "0"))[...]
        np.testing.assert_array_equal(level0, zarr.open_array(str(flat / task / "0"))[...])
        level2 = zarr.open_array(str(out / task / "2"))[...]
        np.testing.assert_allclose(level2, mean_reference(mean_reference(level0, (1, 2, 2)),
                                                          (1, 2, 2)), rtol=1e-6)
        assert validate(out / task) == "Image"
    assert validate(out) == "Image"
    attrs = json.loads((out / "aff/zarr.json").read_text())["attributes"]
    labels = [c["label"] for c in attrs["ome"]["omero"]["channels"]]
    assert labels == ["aff -1 0 0", "aff 0 -1 0", "aff 0 0 -1", "aff 0 -5 0"]
    assert attrs["offsets"] == [[-1, 0, 0], [0, -1, 0], [0, 0, -1], [0, -5, 0]]
    assert not (flat / "aff" / "1").exists()  # --levels 1: level 0 only


@pytest.mark.parametrize("levels", ["0", "9"])
def test_bad_levels_is_one_line_exit_2(tmp_path: Path, levels: str) -> None:
    image = np.zeros((4, 64, 64), np.uint8)
    np.save(tmp_path / "v.npy", image)
    write_volume(tmp_path / "a.zarr", "affinity", np.zeros((3, 4, 64, 64), np.float32),
                 channel_axis=True, attrs={"offsets": [[-1, 0, 0], [0, -1, 0], [0, 0, -1]]})
    for args in (["data", "synth", str(tmp_path / "s.zarr"), "--shape", "4", "64", "64"],
                 ["data", "convert", str(tmp_path / "v.npy"), str(tmp_path / "c.zarr")],
                 ["segment", str(tmp_path / "a.zarr/affinity"), str(tmp_path / "g.zarr")]):
        result = runner.invoke(app, [*args, "--levels", levels])
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and "--levels" in lines[0], result.output
        assert not any(p.name in ("s.zarr", "c.zarr", "g.zarr") for p in tmp_path.iterdir())
