"""Choosing a level of an OME-Zarr multiscale image: in the path or with --level."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from emrun.cli import app
from emrun.io import VolumeError, choose_level, open_volume
from emrun.io.levels import parse_level
from emrun.io.write import write_volume


def multiscale(tmp_path: Path, names: tuple[str, str] = ("s0", "s1")) -> tuple[Path, list]:
    """vol.zarr/raw, an OME-Zarr 0.5 image group of two levels (40,4,4 and 40,8,8 nm)."""
    root = zarr.open_group(tmp_path / "vol.zarr", mode="w")
    group = root.create_group("raw")
    rng = np.random.default_rng(0)
    levels = [rng.integers(0, 255, (6, 16, 16), dtype=np.uint8),
              rng.integers(0, 255, (6, 8, 8), dtype=np.uint8)]
    axes = [{"name": a, "type": "space", "unit": "nanometer"} for a in "zyx"]
    datasets = [{"path": name, "coordinateTransformations": [{"type": "scale", "scale": s}]}
                for name, s in zip(names, ([40, 4, 4], [40, 8, 8]), strict=True)]
    group.attrs["ome"] = {"version": "0.5", "multiscales": [{"axes": axes,
                                                             "datasets": datasets}]}
    for name, data in zip(names, levels, strict=True):
        group.create_array(name, shape=data.shape, dtype=data.dtype, chunks=(3, 8, 8))[...] = data
    return tmp_path / "vol.zarr", levels


@pytest.mark.parametrize("names", [("s0", "s1"), ("0", "1")])
def test_a_path_names_a_level_inside_an_image_group(tmp_path, names):
    store, levels = multiscale(tmp_path, names)
    whole = open_volume(f"{store}/raw")  # the group: its first level
    assert whole.shape == (6, 16, 16) and whole.voxel_size == (40.0, 4.0, 4.0)
    second = open_volume(f"{store}/raw/{names[1]}")
    assert second.voxel_size == (40.0, 8.0, 8.0)
    np.testing.assert_array_equal(second.read(), levels[1])
    assert [(lv.name, lv.voxel_size) for lv in whole.levels()] == [
        (names[0], (40.0, 4.0, 4.0)), (names[1], (40.0, 8.0, 8.0))]
    assert second.levels() == whole.levels()


def test_choose_level_by_name_or_voxel_size(tmp_path):
    store, levels = multiscale(tmp_path)
    assert choose_level(f"{store}/raw", "s1") == f"{store}/raw/s1"
    assert choose_level(f"{store}/raw", "40,8,8") == f"{store}/raw/s1"
    assert choose_level(f"{store}/raw/s1", "40,4,4.0") == f"{store}/raw/s0"
    with pytest.raises(VolumeError, match=r"no level s5; levels: s0 \(40,4,4 nm\), s1 "
                                          r"\(40,8,8 nm\)"):
        choose_level(f"{store}/raw", "s5")
    with pytest.raises(VolumeError, match="no level 8,8,40"):  # x,y,z order is not emrun's
        choose_level(f"{store}/raw", "8,8,40")
    write_volume(tmp_path / "one.zarr", "plain", levels[0])
    plain = zarr.open_group(tmp_path / "flat.zarr", mode="w")
    plain.create_array("a", shape=(2, 2, 2), dtype="uint8")
    for path in (tmp_path / "one.zarr/plain", tmp_path / "flat.zarr/a"):
        with pytest.raises(VolumeError, match=r"no level|not a multiscale"):
            choose_level(path, "s1")


@pytest.mark.parametrize("text", ["", "8,8", "a,b,c", "8,0,8", "8,8,inf"])
def test_bad_level_syntax_is_a_volume_error(text):
    with pytest.raises(VolumeError, match="--level"):
        parse_level(text)


def test_level_option_on_the_commands(tmp_path):
    store, levels = multiscale(tmp_path)
    runner = CliRunner()
    result = runner.invoke(app, ["data", "convert", f"{store}/raw", str(tmp_path / "out.zarr"),
                                 "--level", "40,8,8", "--name", "image"])
    assert result.exit_code == 0, result.output
    converted = open_volume(tmp_path / "out.zarr/image")
    assert converted.voxel_size == (40.0, 8.0, 8.0)
    np.testing.assert_array_equal(converted.read(), levels[1])
    for args in (["segment", f"{store}/raw", str(tmp_path / "seg.zarr")],
                 ["infer", "--checkpoint", str(tmp_path / "c.pt"), "--input", f"{store}/raw",
                  "--output", str(tmp_path / "pred.zarr")]):
        result = runner.invoke(app, [*args, "--level", "s7"])
        assert result.exit_code == 2, result.output
        assert "--level s7: " in result.stderr  # the option named
        assert "has no level s7; levels: s0 (40,4,4 nm), s1 (40,8,8 nm)" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
