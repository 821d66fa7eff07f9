"""OME-Zarr as other writers make it: levels listed coarsest first, several scales in one
dataset, zarr dimension names against the OME axes, a missing level, a time series in
`emrun view`, and object stores that answer 403 for a missing key."""

from __future__ import annotations

import functools
import http.server
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from test_ome_probe import refused
from typer.testing import CliRunner

from emrun.cli import app
from emrun.io import VolumeError, choose_level, open_volume, write_volume

runner = CliRunner()
RNG = np.random.default_rng(3)
SPACE = [{"name": n, "type": "space", "unit": "nanometer"} for n in "zyx"]


def scaled(*values: float) -> list[dict[str, Any]]:
    return [{"type": "scale", "scale": list(values)}]


def image(group: Any, data: np.ndarray, datasets: list[dict[str, Any]],
          axes: list[dict[str, Any]] | None = None, label: bool = False,
          dimension_names: list[str] | None = None) -> None:
    """OME-Zarr 0.5 levels in `group`: each dataset's array is `data` strided by its y, x
    scale (relative to the finest), listed in the order given."""
    finest = min(ds["coordinateTransformations"][0]["scale"][-1] for ds in datasets)
    for ds in datasets:
        step = int(ds["coordinateTransformations"][0]["scale"][-1] // finest)
        level = np.ascontiguousarray(data[..., ::step, ::step])
        group.create_array(ds["path"], shape=level.shape, dtype=level.dtype, chunks=level.shape,
                           dimension_names=dimension_names)[...] = level
    ome: dict[str, Any] = {"version": "0.5", "multiscales": [
        {"axes": axes or SPACE, "datasets": datasets}]}
    if label:
        ome["image-label"] = {"version": "0.5"}
    group.attrs["ome"] = ome


COARSE_FIRST = [{"path": "s1", "coordinateTransformations": scaled(30, 12, 12)},
                {"path": "s0", "coordinateTransformations": scaled(30, 6, 6)}]


# ============================================ 1. levels listed coarsest first


def test_levels_listed_coarsest_first_open_at_the_finest(tmp_path: Path) -> None:
    """datasets [s1 (12 nm), s0 (6 nm)]: the store opened at s1 as if it were the full
    resolution; it opens at s0, lists s0 first, and each level keeps its name."""
    data = RNG.integers(0, 255, (2, 16, 16)).astype(np.uint8)
    store = tmp_path / "c.zarr"
    image(zarr.open_group(store, mode="w"), data, COARSE_FIRST)
    volume = open_volume(store)
    assert (volume.shape, volume.voxel_size) == ((2, 16, 16), (30.0, 6.0, 6.0))
    np.testing.assert_array_equal(volume.read(), data)
    assert [(lv.name, lv.voxel_size) for lv in volume.levels()] == [
        ("s0", (30.0, 6.0, 6.0)), ("s1", (30.0, 12.0, 12.0))]
    assert choose_level(store, "s1").endswith("/s1")
    assert choose_level(store, "30,6,6").endswith("/s0")
    assert open_volume(choose_level(store, "s1")).shape == (2, 8, 8)


def test_a_coarsest_first_label_opens_at_its_finest_level(tmp_path: Path) -> None:
    """A segmentation's levels are read the same way: `STORE/seg` is its finest level."""
    ids = RNG.integers(1, 9, (2, 16, 16)).astype(np.uint32)
    root = zarr.open_group(tmp_path / "s.zarr", mode="w")
    image(root.create_group("labels").create_group("seg"), ids, COARSE_FIRST, label=True)
    seg = open_volume(f"{tmp_path}/s.zarr/seg")
    assert seg.segmentation and seg.shape == (2, 16, 16)
    np.testing.assert_array_equal(seg.read(), ids)


def test_a_coarse_level_listed_first_is_not_held_to_whole_voxels(tmp_path: Path) -> None:
    """The finest level's translation must be whole voxels, a coarser one's carries the
    half-voxel shift of downsampling; listed first, the coarse level was held to the finest
    level's rule and the store refused."""
    data = np.zeros((2, 16, 16), np.uint8)
    datasets = [{"path": "s1", "coordinateTransformations": [
                    *scaled(30, 12, 12), {"type": "translation", "translation": [0, 3, 3]}]},
                {"path": "s0", "coordinateTransformations": scaled(30, 6, 6)}]
    image(zarr.open_group(tmp_path / "h.zarr", mode="w"), data, datasets)
    assert open_volume(tmp_path / "h.zarr").offset == (0, 0, 0)


# ============================================ 2. two scales in one dataset


def test_two_scales_in_one_dataset_are_refused_naming_it(tmp_path: Path) -> None:
    """[scale 30,6,6; scale 2,2,2] was read as a 60 x 12 x 12 nm voxel; OME-NGFF allows one
    scale, so which was meant is unknown: one line naming the store and the dataset."""
    datasets = [{"path": "s0", "coordinateTransformations": scaled(30, 6, 6) + scaled(2, 2, 2)}]
    image(zarr.open_group(tmp_path / "t.zarr", mode="w"), np.zeros((2, 8, 8), np.uint8),
          datasets)
    line = refused(["data", "convert", str(tmp_path / "t.zarr"), str(tmp_path / "o.zarr")])
    assert "t.zarr" in line and "'s0'" in line and "2 scale" in line


def test_two_translations_or_a_second_scale_in_a_coarser_level_are_refused(
        tmp_path: Path) -> None:
    datasets = [{"path": "s0", "coordinateTransformations": scaled(30, 6, 6)},
                {"path": "s1", "coordinateTransformations": [
                    *scaled(30, 12, 12), {"type": "translation", "translation": [0, 3, 3]},
                    {"type": "translation", "translation": [0, 3, 3]}]}]
    image(zarr.open_group(tmp_path / "t.zarr", mode="w"), np.zeros((2, 8, 8), np.uint8),
          datasets)
    with pytest.raises(VolumeError, match="dataset 's1' has 2 translation"):
        open_volume(tmp_path / "t.zarr")


# ============================================ 3. zarr dimension_names against OME axes


def test_dimension_names_that_disagree_with_the_ome_axes_are_refused(tmp_path: Path) -> None:
    """An array named x, y, z under OME axes z, y, x: one of the two is wrong, and the
    OME axes were taken unchecked."""
    image(zarr.open_group(tmp_path / "d.zarr", mode="w"), np.zeros((2, 8, 8), np.uint8),
          [{"path": "s0", "coordinateTransformations": scaled(30, 6, 6)}],
          dimension_names=["x", "y", "z"])
    line = refused(["data", "convert", str(tmp_path / "d.zarr"), str(tmp_path / "o.zarr")])
    assert "dimension_names (x, y, z)" in line and "axes (z, y, x)" in line


def test_a_served_store_s_dimension_names_are_checked_too(tmp_path: Path) -> None:
    from test_remote_volumes import served, tensorstore

    tensorstore()
    image(zarr.open_group(tmp_path / "d.zarr", mode="w"), np.zeros((2, 8, 8), np.uint8),
          [{"path": "s0", "coordinateTransformations": scaled(30, 6, 6)}],
          dimension_names=["x", "y", "z"])
    with served(tmp_path) as url, pytest.raises(VolumeError, match=r"dimension_names \(x"):
        open_volume(f"{url}/d.zarr")


def test_matching_or_unnamed_dimension_names_open(tmp_path: Path) -> None:
    for i, names in enumerate((["z", "y", "x"], [None, None, None])):
        store = tmp_path / f"d{i}.zarr"
        image(zarr.open_group(store, mode="w"), np.zeros((2, 8, 8), np.uint8),
              [{"path": "s0", "coordinateTransformations": scaled(30, 6, 6)}],
              dimension_names=names)  # type: ignore[arg-type]
        assert open_volume(store).voxel_size == (30.0, 6.0, 6.0)


# ============================================ 4. a level that is not there


def test_a_missing_segmentation_level_names_what_was_asked_and_the_levels(
        tmp_path: Path) -> None:
    """`s.zarr/seg/7` said "has no array 'labels/seg/7'", a path the user never gave."""
    ids = RNG.integers(1, 5, (2, 8, 8)).astype(np.uint32)
    write_volume(tmp_path / "s.zarr", "seg", ids, voxel_size=(30, 6, 6), levels=2)
    with pytest.raises(VolumeError) as caught:
        open_volume(f"{tmp_path}/s.zarr/seg/7")
    message = str(caught.value)
    assert "labels/seg" not in message
    assert "segmentation 'seg' has no level '7'" in message and "levels: 0, 1 (" in message
    write_volume(tmp_path / "i.zarr", "img", ids.astype(np.uint8), levels=2)
    with pytest.raises(VolumeError, match=r"image 'img' has no level '7' .*; its levels: 0, 1 "):
        open_volume(f"{tmp_path}/i.zarr/img/7")


def test_a_served_missing_segmentation_level_names_the_levels(tmp_path: Path) -> None:
    from test_remote_volumes import served, tensorstore

    tensorstore()
    ids = RNG.integers(1, 5, (2, 8, 8)).astype(np.uint32)
    write_volume(tmp_path / "s.zarr", "seg", ids, voxel_size=(30, 6, 6), levels=2)
    with served(tmp_path) as url, pytest.raises(VolumeError) as caught:
        open_volume(f"{url}/s.zarr/seg/7")
    assert "segmentation 'seg' has no level '7'" in str(caught.value)
    assert "its levels: 0, 1 (" in str(caught.value)


# ============================================ 5. emrun view and a time series


def test_view_shows_a_time_series_with_its_t_axis(tmp_path: Path) -> None:
    """A store of 3 time points (t, c, z, y, x) was refused by emrun view; neuroglancer
    shows a t axis, so the layer is made, the t axis in seconds beside the channels."""
    from emrun.view import layer_for, neuroglancer_state

    axes = [{"name": "t", "type": "time", "unit": "millisecond"},
            {"name": "c", "type": "channel"}, *SPACE]
    image(zarr.open_group(tmp_path / "t.zarr", mode="w"),
          np.zeros((3, 3, 2, 8, 8), np.float32),
          [{"path": "0", "coordinateTransformations": scaled(50, 1, 30, 6, 6)}], axes=axes)
    layer = layer_for(str(tmp_path / "t.zarr"), set())
    assert (layer.kind, layer.channels, layer.time_points) == ("channels", 3, 3)
    assert layer.voxel_size == (30.0, 6.0, 6.0)
    dims = neuroglancer_state([layer], {layer.name: "http://x/0"})["layers"][0]["source"][
        "transform"]["outputDimensions"]
    assert list(dims) == ["t", "c^", "z", "y", "x"]
    assert dims["t"] == [pytest.approx(0.05), "s"]
    with pytest.raises(VolumeError, match="3 time points"):  # other commands still refuse
        open_volume(tmp_path / "t.zarr")


def test_view_help_says_how_a_time_series_is_shown() -> None:
    result = runner.invoke(app, ["view", "--help"], terminal_width=200)
    assert result.exit_code == 0
    assert "time" in result.output.lower()


# ============================================ 6. object stores: 403 for a missing key


def forbidding(folder: Path) -> Any:
    """An HTTP handler serving `folder` that answers 403 for a file that is not there, as
    S3 does where the reader may not list the bucket."""

    class Forbidding(http.server.SimpleHTTPRequestHandler):
        def send_head(self) -> Any:
            if not os.path.isfile(self.translate_path(self.path)):
                self.send_error(403)
                return None
            return super().send_head()

        def log_message(self, *args: object) -> None:
            pass

    return functools.partial(Forbidding, directory=str(folder))


def test_a_403_on_a_probed_key_does_not_end_the_open(tmp_path: Path) -> None:
    """zarr.json of a v2 store, .zattrs of an array without attributes, `STORE/seg`'s own
    keys before labels/seg is found: each 403, each reported as 'permission denied' for a
    store that was fine."""
    from test_remote_volumes import serving, tensorstore

    tensorstore()
    data = RNG.integers(0, 255, (2, 8, 8)).astype(np.uint8)
    group = zarr.open_group(tmp_path / "v2.zarr", mode="w", zarr_format=2)
    group.create_array("raw", shape=data.shape, dtype=data.dtype, chunks=data.shape)[...] = data
    (tmp_path / "v2.zarr/raw/.zattrs").unlink(missing_ok=True)
    ids = RNG.integers(1, 5, (2, 8, 8)).astype(np.uint32)
    write_volume(tmp_path / "s.zarr", "seg", ids, voxel_size=(30, 6, 6), levels=2)
    with serving(forbidding(tmp_path)) as url:
        np.testing.assert_array_equal(open_volume(f"{url}/v2.zarr/raw").read(), data)
        seg = open_volume(f"{url}/s.zarr/seg")
        assert seg.segmentation and [lv.name for lv in seg.levels()] == ["0", "1"]


def test_a_path_no_key_answers_is_one_permission_line(tmp_path: Path) -> None:
    """Where every key is refused (nothing there, or no read permission) the one line says
    so, naming the keys tried, not the first 403 met."""
    from test_remote_volumes import serving, tensorstore

    tensorstore()
    write_volume(tmp_path / "s.zarr", "img", np.zeros((2, 8, 8), np.uint8), levels=1)
    with serving(forbidding(tmp_path)) as url, pytest.raises(VolumeError) as caught:
        open_volume(f"{url}/s.zarr/nothing")
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{url}/s.zarr/nothing: permission")
    assert "nothing/zarr.json" in message and "nothing/.zgroup" in message
