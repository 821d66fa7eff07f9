"""`emrun data convert/synth`, `emrun bench codecs` and the validate summary probed with
what a lab's files and typing produce: names, units, channels, Ctrl-C, markup in text."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import yaml
from conftest import MINIMAL
from rich.console import Console
from typer.testing import CliRunner

import emrun.io.convert as convert_module
from emrun.cli import app
from emrun.io import open_volume
from emrun.io.volume import VolumeError

runner = CliRunner()


def npy(tmp_path: Path, name: str, array: np.ndarray) -> str:
    """Save ``array`` as ``tmp_path/name`` and return its path as the CLI takes it."""
    path = tmp_path / name
    np.save(path, array)
    return str(path)


def convert(*args: str):
    return runner.invoke(app, ["data", "convert", *args])


def test_labels_flag_names_a_uint8_segmentation_labels_and_leaves_image_free(tmp_path):
    """--labels on a uint8 segmentation (under 256 ids) named it "image", against --help
    ("labels for a segmentation"); the raw image then could not be converted as "image"."""
    seg = npy(tmp_path, "seg.npy", np.arange(4 * 8 * 8, dtype=np.uint8).reshape(4, 8, 8))
    raw = npy(tmp_path, "raw.npy", np.full((4, 8, 8), 7, np.uint8))
    out = tmp_path / "vol.zarr"
    labels = convert(seg, str(out), "--labels")
    assert labels.exit_code == 0, labels.output
    assert f"{out}/labels:" in labels.stdout
    image = convert(raw, str(out))
    assert image.exit_code == 0, image.output
    assert open_volume(f"{out}/labels").segmentation
    assert not open_volume(f"{out}/image").segmentation
    assert open_volume(f"{out}/image").read()[0, 0, 0] == 7


def test_a_16_bit_image_with_channels_converts_without_a_name(tmp_path):
    """A 4-d uint16 source was guessed "labels" and refused as the store's OME labels group
    ("give the image another name"), though nothing was asked of the user."""
    source = npy(tmp_path, "channels.npy", np.ones((2, 3, 8, 8), np.uint16))
    result = convert(source, str(tmp_path / "c.zarr"))
    assert result.exit_code == 0, result.output
    volume = open_volume(f"{tmp_path}/c.zarr/image")
    assert volume.shape == (2, 3, 8, 8) and volume.dtype == np.uint16


@pytest.mark.parametrize("command", [
    ["data", "convert", "SOURCE", "OUT", "--voxel-size", "4e-8", "4e-9", "4e-9"],
    ["data", "synth", "OUT", "--shape", "2", "8", "8", "--voxel-size", "4e-8", "4e-9", "4e-9"],
    ["data", "synth", "OUT", "--shape", "2", "8", "8", "--voxel-size", "1e300", "1e300",
     "1e300"],
])
def test_a_voxel_size_not_in_nm_is_refused_in_one_line_before_writing(tmp_path, command):
    """Metres (4e-9) were written whole, then refused as "OUT/image.partial: multiscales
    scale [0.0, 0.0, 0.0] must be positive" (the stores keep 6 decimals); 1e300 made a
    store no reader could use at coarser levels."""
    source = npy(tmp_path, "raw.npy", np.zeros((2, 8, 8), np.uint8))
    out = tmp_path / "out.zarr"
    args = [source if a == "SOURCE" else str(out) if a == "OUT" else a for a in command]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "--voxel-size" in result.stderr and "in nm" in result.stderr
    assert "partial" not in result.stderr and "Traceback" not in result.output
    assert not out.exists()


def test_convert_refuses_a_voxel_size_it_cannot_store_before_writing(tmp_path, monkeypatch):
    """The library call too: refused before the (hours long) conversion, not after it."""
    source = npy(tmp_path, "raw.npy", np.zeros((2, 8, 8), np.uint8))

    def no_writing(*args, **kwargs):
        raise AssertionError("the volume was being written")

    monkeypatch.setattr(convert_module, "staged_volume", no_writing)
    with pytest.raises(VolumeError, match="in nm from"):
        convert_module.convert(source, tmp_path / "o.zarr", voxel_size=(4e-9, 4e-9, 4e-9),
                               progress=False)


def test_chunks_of_a_byte_for_a_large_volume_are_refused_before_writing(tmp_path,
                                                                        monkeypatch):
    """--chunks 1 1 1 on a 128 x 1024 x 1024 volume set out to write 134 million one-byte
    files; here 160,000 (the limit is 100,000 files under a filesystem block each)."""
    source = npy(tmp_path, "wide.npy", np.zeros((1, 400, 400), np.uint8))

    def no_writing(*args, **kwargs):
        raise AssertionError("the volume was being written")

    monkeypatch.setattr(convert_module, "staged_volume", no_writing)
    result = convert(source, str(tmp_path / "o.zarr"), "--chunks", "1", "1", "1")
    assert result.exit_code == 2, result.output
    assert "160,000 chunks" in result.stderr and "--chunks" in result.stderr
    small = npy(tmp_path, "small.npy", np.zeros((2, 8, 8), np.uint8))  # 128 files: taken
    monkeypatch.undo()
    assert convert(small, str(tmp_path / "s.zarr"), "--chunks", "1", "1", "1").exit_code == 0


def test_an_implausible_metadata_voxel_size_is_refused_and_a_given_one_wins(tmp_path):
    path = tmp_path / "far.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("raw", data=np.zeros((2, 8, 8), np.uint8)).attrs["resolution"] = [
            4e8, 4e8, 4e8]
    out = str(tmp_path / "o.zarr")
    refused = convert(f"{path}/raw", out)
    assert refused.exit_code == 2 and "its metadata's" in refused.stderr
    given = convert(f"{path}/raw", out, "--voxel-size", "40", "4", "4")
    assert given.exit_code == 0, given.output
    assert open_volume(f"{out}/image").voxel_size == (40.0, 4.0, 4.0)


def test_ctrl_c_in_a_convert_keeps_the_old_volume_and_leaves_no_new_store(tmp_path,
                                                                          monkeypatch):
    """SIGINT mid-way (as KeyboardInterrupt at the second slab): exit 130; an --overwrite
    leaves the old volume whole, a new store is not left half-made."""
    source = npy(tmp_path, "raw.npy", np.full((4, 8, 8), 3, np.uint8))
    kept = tmp_path / "kept.zarr"
    assert convert(npy(tmp_path, "old.npy", np.ones((2, 8, 8), np.uint8)), str(kept)).exit_code \
        == 0
    real, calls = convert_module.write_by_chunk, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(*args, **kwargs)

    monkeypatch.setattr(convert_module, "write_by_chunk", interrupted)
    for out, extra in ((kept, ["--overwrite"]), (tmp_path / "new.zarr", [])):
        calls.clear()
        result = convert(source, str(out), "--chunks", "1", "8", "8", *extra)
        assert result.exit_code == 130, result.output
    np.testing.assert_array_equal(open_volume(f"{kept}/image").read(), 1)
    assert sorted(p.name for p in kept.iterdir()) == ["image", "zarr.json"]
    assert not (tmp_path / "new.zarr").exists()


def test_model_line_of_the_summary_shows_markup_like_text_as_written(monkeypatch):
    """A plugin model's summary lists its fields' values: "[/x]" raised MarkupError (an
    internal error in validate) and "[v2]" vanished from the line."""
    from emrun.recipe import Recipe
    from emrun.summary import print_summary

    recipe = Recipe.model_validate(yaml.safe_load(MINIMAL))
    monkeypatch.setattr(type(recipe.model), "summary",
                        lambda self: "weights runs/[v2]/w.pt, note [/x]")
    console = Console(record=True, width=300)
    facts = SimpleNamespace(params=10, flops_per_voxel=296.0, receptive_field=None,
                            divisor=(1, 8, 8))  # ModelFacts' fields, without importing torch
    print_summary(console, recipe, None, "r.yaml", facts)
    assert "weights runs/[v2]/w.pt, note [/x];" in console.export_text()


def test_bench_codecs_on_a_float_volume_with_nan_is_lossless(tmp_path):
    image = np.random.default_rng(0).random((4, 16, 16)).astype(np.float32)
    image[1, 2, 3] = np.nan  # a masked-out voxel, as exported by many tools
    result = runner.invoke(app, ["bench", "codecs", npy(tmp_path, "nan.npy", image),
                                 "--passes", "1", "--codec", "zstd-1", "--sample-mb", "0.01",
                                 "--max-mb", "0.01", "--workdir", str(tmp_path / "w")])
    assert result.exit_code == 0, result.output


def test_an_output_store_inside_a_volume_is_refused(tmp_path):
    source = npy(tmp_path, "raw.npy", np.zeros((2, 8, 8), np.uint8))
    outer = tmp_path / "outer.zarr"
    assert convert(source, str(outer)).exit_code == 0
    inner = convert(source, str(outer / "image" / "inner.zarr"))
    assert inner.exit_code == 2, inner.output  # `convert ... outer.zarr --overwrite` removed it


def test_a_metadata_voxel_size_in_metres_is_named_as_stored(tmp_path):
    path = tmp_path / "metres.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("raw", data=np.zeros((2, 8, 8), np.uint8)).attrs["resolution"] = [
            4e-8, 4e-9, 4e-9]
    result = convert(f"{path}/raw", str(tmp_path / "o.zarr"))
    assert result.exit_code == 2 and "4e-08" in result.stderr, result.output


def test_lossless_means_the_same_bits_in_any_byte_order() -> None:
    """NaN round-trips as itself, a store's little-endian copy of big-endian data is no loss,
    and a -0.0 that came back as 0.0 is one."""
    from emrun.bench.codecs import same_bits

    data = np.array([1.5, np.nan, -0.0], ">f4")
    assert same_bits(data.astype("<f4"), data)
    assert not same_bits(np.array([1.5, np.nan, 0.0], "<f4"), data)
    assert not same_bits(data.astype("<f8"), data)
