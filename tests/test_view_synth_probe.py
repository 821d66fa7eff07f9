"""Probing `emrun data synth`, `emrun data convert` and `emrun view` with odd inputs: long
thin volumes and far-apart voxel sizes for the generator, dtypes neuroglancer cannot read, a
multi-page TIFF whose pages differ in shape."""

from __future__ import annotations

import json
import urllib.request

import numpy as np
import pytest
import tifffile
from typer.testing import CliRunner

import emrun.synth as synth
from emrun.cli import app
from emrun.errors import UserError
from emrun.io import write_volume
from emrun.view import view

runner = CliRunner()
CLIENT = "https://neuroglancer.example.org/"


# --- synth: the generator's work follows the volume, not its longest axis squared ---------


def test_the_curves_are_made_only_where_they_can_reach_the_volume(monkeypatch):
    """A 2048 x 4 x 4 volume stamped 740,000 curve points (16384 x 4 x 4 took 144 s; 100000
    x 1 x 1 hours): each curve ran the whole diagonal, mostly outside the volume."""
    points: list[int] = []
    stamp = synth._stamp
    monkeypatch.setattr(synth, "_stamp", lambda seeds, pts, r, v: (
        points.append(len(pts)), stamp(seeds, pts, r, v)))
    grid = synth._Grid((2048, 4, 4), (30.0, 6.0, 6.0), 24.0)
    seeds, _, _ = synth._seed_curves(np.random.default_rng(0), grid)
    assert seeds.any()
    assert sum(points) < 100_000  # was 742,253


def test_the_steps_kept_are_bitwise_numpys_arange(monkeypatch):
    """The curves, and so every synthetic volume, stay what they were for a seed."""
    rng = np.random.default_rng(1)
    for _ in range(500):
        s0, s1 = float(rng.uniform(-1e4, 0)), float(rng.uniform(0, 1e4))
        step = float(rng.uniform(0.1, 3.0))
        span = tuple(sorted(rng.uniform(-2e4, 2e4, 2)))
        whole = np.arange(s0, s1, step)
        expected = whole[(whole >= span[0]) & (whole <= span[1])]
        np.testing.assert_array_equal(synth._steps_within(s0, s1, step, span), expected)
    assert synth._steps_within(0.0, 10.0, 1.0, (20.0, 30.0)).size == 0


def test_synthesize_is_deterministic_per_seed_and_differs_across_seeds():
    one, again = synth.synthesize((4, 32, 32), 5), synth.synthesize((4, 32, 32), 5)
    other = synth.synthesize((4, 32, 32), 2**70)  # any non-negative int is a seed
    for name in ("image", "labels", "mito", "synapse"):
        np.testing.assert_array_equal(getattr(one, name), getattr(again, name))
    assert not np.array_equal(one.image, other.image)


def test_synth_memory_counts_the_smooth_fields_matrices():
    """100000 x 1 x 1 voxels passed the memory check (7 MB by voxels) and then asked numpy
    for 37 GiB: an internal error after a long wait, not the one-line refusal."""
    assert synth.peak_memory((100000, 1, 1)) > 40e9
    assert synth.peak_memory((64, 256, 256)) < 1e9  # the default: still allowed


def test_synth_of_a_volume_the_memory_cannot_hold_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr("emrun.devices.available_memory", lambda: 8 * 10**9)
    result = runner.invoke(app, ["data", "synth", str(tmp_path / "s.zarr"),
                                 "--shape", "100000", "1", "1"])
    assert result.exit_code == 2, result.output
    assert "memory" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "s.zarr" / "image").exists()


@pytest.mark.parametrize("size", [["1e308", "1e308", "1e-308"], ["100000", "1", "1"]])
def test_synth_voxel_sizes_far_apart_are_one_line(tmp_path, size):
    """1e308 1e308 1e-308 overflowed (ZeroDivisionError, exit 1); 100000 1 1 ran minutes."""
    result = runner.invoke(app, ["data", "synth", str(tmp_path / "s.zarr"), "--shape", "2",
                                 "16", "16", "--voxel-size", *size])
    assert result.exit_code == 2, result.output  # 1e308: no size in nm a store can keep
    assert ("times apart" in result.output or "give sizes in nm from" in result.output) and \
        len(result.output.strip().splitlines()) == 1
    with pytest.raises(ValueError, match="times apart"):
        synth.synthesize((2, 16, 16), voxel_size=tuple(float(v) for v in size))


def test_synth_of_huge_isotropic_voxels_works(tmp_path):
    """1e308 nm voxels overflowed the membrane's z width (exit 1). The command now refuses a
    size no store keeps (above 1e6 nm) before drawing; drawing itself still holds."""
    result = runner.invoke(app, ["data", "synth", str(tmp_path / "s.zarr"), "--shape", "2",
                                 "16", "16", "--voxel-size", "1e308", "1e308", "1e308"])
    assert result.exit_code == 2 and "give sizes in nm from" in result.output, result.output
    assert not (tmp_path / "s.zarr").exists()
    drawn = synth.synthesize((2, 16, 16), voxel_size=(1e308, 1e308, 1e308))
    assert drawn.labels.shape == (2, 16, 16)


# --- view: dtypes neuroglancer cannot read ---------------------------------------------------


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


@pytest.mark.parametrize("dtype", [np.float64, np.float16])
def test_view_refuses_floats_neuroglancer_cannot_read(tmp_path, dtype):
    """neuroglancer reads float32 only; a float64 image (what `data convert` keeps of a numpy
    array) gave a link whose layer failed in the browser."""
    write_volume(tmp_path / "v.zarr", "image", np.ones((2, 8, 8), dtype),
                 voxel_size=(30.0, 6.0, 6.0))
    with pytest.raises(UserError, match=f"not {np.dtype(dtype)}"):
        view([str(tmp_path / "v.zarr/image")], client=CLIENT)


def test_view_serves_int64_labels_as_uint64(tmp_path):
    """neuroglancer reads no int64 from zarr v3 (labels numpy made int64, converted as they
    are): the metadata served says uint64, and the chunks are the same bytes."""
    labels = np.arange(-64, 64, dtype=np.int64).reshape(2, 8, 8)
    write_volume(tmp_path / "v.zarr", "labels", labels, voxel_size=(30.0, 6.0, 6.0),
                 label=True)
    shown = view([str(tmp_path / "v.zarr/labels")], client=CLIENT)
    try:
        assert shown.layers[0].kind == "segmentation"
        base = shown.state["layers"][0]["source"].removeprefix("zarr://")
        meta = json.loads(_get(f"{base}/0/zarr.json"))
        assert meta["data_type"] == "uint64"
        group = json.loads(_get(f"{base}/zarr.json"))
        assert "ome" in group["attributes"]  # groups as they are
        store = tmp_path / "v.zarr"
        chunk = next(p for p in (store / "labels").rglob("*")
                     if p.is_file() and p.name != "zarr.json")
        key = chunk.relative_to(store).as_posix()
        assert _get(f"{shown.server.url}/0/{key}") == chunk.read_bytes()
    finally:
        shown.close()


def test_view_of_uint64_ids_beyond_2_53_is_a_segmentation(tmp_path):
    ids = (np.arange(128, dtype=np.uint64) + np.uint64(2**60)).reshape(2, 8, 8)
    write_volume(tmp_path / "v.zarr", "seg", ids, voxel_size=(30.0, 6.0, 6.0), label=True)
    shown = view([str(tmp_path / "v.zarr/seg")], client=CLIENT)
    try:
        assert shown.layers[0].kind == "segmentation"
        base = shown.state["layers"][0]["source"].removeprefix("zarr://")
        assert json.loads(_get(f"{base}/0/zarr.json"))["data_type"] == "uint64"
    finally:
        shown.close()


# --- convert: a multi-page TIFF whose pages differ --------------------------------------------


def test_convert_of_a_tiff_whose_pages_differ_in_shape_is_refused(tmp_path):
    with tifffile.TiffWriter(tmp_path / "m.tif") as tif:
        for z in range(3):
            tif.write(np.full((8, 8), z, np.uint8), contiguous=True)
        tif.write(np.ones((8, 9), np.uint8))
        tif.write(np.full((8, 8), 7, np.uint8))
    result = runner.invoke(app, ["data", "convert", str(tmp_path / "m.tif"),
                                 str(tmp_path / "o.zarr")])
    converted = (tmp_path / "o.zarr" / "image").exists()
    assert result.exit_code == 2 and not converted, result.output  # was: 3 of 5 sections
    assert "holds pages of different shapes (3 of [8, 8]; 1 of [8, 9]; 1 of [8, 8])" in \
        result.output


def test_a_tiff_written_one_section_per_call_reads_as_its_stack(tmp_path):
    """tifffile's default makes each `write` call its own series of one page: such a file
    was read as its first section and refused as 2-d."""
    from emrun.geometry import Roi
    from emrun.io import open_volume

    with tifffile.TiffWriter(tmp_path / "s.tif") as tif:
        for z in range(4):
            tif.write(np.full((8, 9), z, np.uint8))
    volume = open_volume(str(tmp_path / "s.tif"))
    assert volume.shape == (4, 8, 9)
    assert volume.read()[:, 3, 4].tolist() == [0, 1, 2, 3]
    assert volume.read(Roi((1, 2, 2), (2, 3, 3)))[:, 0, 0].tolist() == [1, 2]
    result = runner.invoke(app, ["data", "convert", str(tmp_path / "s.tif"),
                                 str(tmp_path / "o.zarr")])
    assert result.exit_code == 0, result.output
    assert open_volume(str(tmp_path / "o.zarr" / "image")).read()[:, 0, 0].tolist() == \
        [0, 1, 2, 3]


def test_sizes_beyond_petabytes_are_written_as_powers_of_ten():
    """synth's memory refusal said '70000000000000.0 PB'."""
    from emrun.capacity import size_text

    assert size_text(7e28) == "7e+28 bytes"
    assert (size_text(9.99e17), size_text(1.2e9), size_text(3.4e8)) == \
        ("999.0 PB", "1.2 GB", "340 MB")
