"""What the last session noticed in the readers and `emrun view`: Fiji's HDF5
`element_size_um`, the half-voxel shift of n5-viewer pyramid levels, a time series opening
at its first time point, and output chunks no longer than a short axis."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import zarr
from n5_writing import n5_dataset, voxel_0_at

from emrun.infer.plan import Layout, choose_chunks_and_block
from emrun.io import VolumeError, open_volume
from emrun.io.convert import convert
from emrun.io.metadata import SHIFT_KEY

RNG = np.random.default_rng(7)


# ============================================ 1. HDF5 element_size_um (Fiji, ilastik)


def _h5(tmp_path: Path, shape: tuple[int, ...] = (4, 6, 8), **attrs: Any) -> str:
    path = tmp_path / "fiji.h5"
    with h5py.File(path, "w") as f:
        node = f.create_dataset("raw", data=np.zeros(shape, np.uint8))
        for key, value in attrs.items():
            node.attrs[key] = value
    return f"{path}/raw"


def test_hdf5_element_size_um_is_the_voxel_size_in_nm(tmp_path: Path) -> None:
    """Fiji writes float32 micrometres (z, y, x); the size was not read at all."""
    path = _h5(tmp_path, element_size_um=np.array([0.03, 0.006, 0.0045], np.float32))
    assert open_volume(path).voxel_size == (30.0, 6.0, 4.5)


def test_hdf5_element_size_um_places_a_funlib_offset_in_its_voxels(tmp_path: Path) -> None:
    path = _h5(tmp_path, element_size_um=np.array([0.03, 0.006, 0.006], np.float32),
               offset=[60, 12, 18])
    assert open_volume(path).offset == (2, 2, 3)


def test_hdf5_element_size_of_one_um_is_fijis_uncalibrated_mark(tmp_path: Path) -> None:
    """Fiji writes 1, 1, 1 um for an image without calibration: unknown, not 1000 nm."""
    path = _h5(tmp_path, element_size_um=np.array([1.0, 1.0, 1.0], np.float32))
    assert open_volume(path).voxel_size is None


def test_hdf5_funlib_voxel_size_wins_over_element_size_um(tmp_path: Path) -> None:
    path = _h5(tmp_path, element_size_um=[0.04, 0.004, 0.004], voxel_size=[30, 6, 6])
    assert open_volume(path).voxel_size == (30.0, 6.0, 6.0)


def test_hdf5_element_size_um_not_three_positive_numbers_is_refused(tmp_path: Path) -> None:
    path = _h5(tmp_path, element_size_um=[0.03, -0.006, 0.006])
    with pytest.raises(VolumeError, match=r"element_size_um .* three positive numbers"):
        open_volume(path)


def test_hdf5_2d_image_with_element_size_um_still_opens(tmp_path: Path) -> None:
    """Three values have no z to go to on a 2-d dataset: left unread, not refused."""
    path = _h5(tmp_path, shape=(6, 8), element_size_um=[0.03, 0.006, 0.006])
    assert open_volume(path).shape == (6, 8)


# ============================================ 2. n5-viewer levels: the half-voxel shift


def _n5_level(root: Path, name: str, data: np.ndarray, factors: list[int]) -> None:
    """A level as n5-viewer writes it: full resolution's pixelResolution, its factors."""
    n5_dataset(root / name, data, downsamplingFactors=factors,
               pixelResolution={"dimensions": [4.0, 4.0, 30.0], "unit": "nm"})


def _n5_pyramid(tmp_path: Path) -> Path:
    root = tmp_path / "bdv.n5" / "setup0" / "timepoint0"
    image = RNG.integers(0, 255, (8, 16, 16), dtype=np.uint8)
    _n5_level(root, "s0", image, [1, 1, 1])
    _n5_level(root, "s1", image[:, ::2, ::2].copy(), [2, 2, 1])
    _n5_level(root, "s2", image[::2, ::4, ::4].copy(), [4, 4, 2])
    return root


@pytest.mark.parametrize(("level", "factors"), [("s0", (1, 1, 1)), ("s1", (1, 2, 2)),
                                                ("s2", (2, 4, 4))])
def test_an_n5_viewer_level_lies_half_a_voxel_per_factor_past_level_0(
        tmp_path: Path, level: str, factors: tuple[int, int, int]) -> None:
    """s1 averages 2 x 2 voxels of s0, so its voxel 0's centre is s0's 0.5 (level-0 voxels);
    it was placed at 0, as if it sampled s0's first voxel."""
    root = _n5_pyramid(tmp_path)
    base = (30.0, 4.0, 4.0)
    expected = tuple((f - 1) / 2 * b for f, b in zip(factors, base, strict=True))
    assert voxel_0_at(f"{root}/{level}") == pytest.approx(expected)


def test_an_n5_viewer_level_converted_keeps_its_place_as_an_ome_level_does(
        tmp_path: Path) -> None:
    """The level converted to OME-Zarr lies where it lay (its translation carries the shift),
    as a coarser OME-Zarr level's own translation is carried."""
    root = _n5_pyramid(tmp_path)
    convert(f"{root}/s2", tmp_path / "out.zarr", name="s2", progress=False, levels=1)
    assert voxel_0_at(str(tmp_path / "out.zarr/s2")) == pytest.approx((15.0, 6.0, 6.0))
    multiscale = zarr.open_group(tmp_path / "out.zarr/s2").attrs["ome"]["multiscales"][0]
    assert multiscale["metadata"][SHIFT_KEY] == [15.0, 6.0, 6.0]


# ============================================ 3. emrun view: a time series at its first point


SPACE = [{"name": a, "type": "space", "unit": "nanometer"} for a in "zyx"]


def _time_series(tmp_path: Path, channels: bool) -> str:
    """An OME-Zarr 0.4 image of 5 time points of 4 x 8 x 10 voxels (30 x 6 x 6 nm) at
    z, y, x offset 2, 3, 4 voxels; t in milliseconds, 50 apart."""
    group = zarr.open_group(tmp_path / "t.zarr", mode="w", zarr_format=2)
    shape = (5, 3, 4, 8, 10) if channels else (5, 4, 8, 10)
    group.create_array("0", data=np.zeros(shape, np.float32), chunks=shape)
    lead = [50.0, 1.0] if channels else [50.0]
    axes = [{"name": "t", "type": "time", "unit": "millisecond"},
            *([{"name": "c", "type": "channel"}] if channels else []), *SPACE]
    group.attrs["multiscales"] = [{"version": "0.4", "axes": axes, "datasets": [{
        "path": "0", "coordinateTransformations": [
            {"type": "scale", "scale": [*lead, 30.0, 6.0, 6.0]},
            {"type": "translation", "translation": [0.0] * len(lead) + [60.0, 18.0, 24.0]}]}]}]
    return str(tmp_path / "t.zarr")


@pytest.mark.parametrize("channels", [False, True])
def test_view_of_a_time_series_opens_at_its_first_time_point(tmp_path: Path,
                                                             channels: bool) -> None:
    """neuroglancer's own default is the middle of every axis, t's too: the series opened at
    time point 2 of 5 while emrun reads (and reports) the first."""
    from emrun.view import layer_for, neuroglancer_state

    layer = layer_for(_time_series(tmp_path, channels), set())
    state = neuroglancer_state([layer], {layer.name: "http://x/0"})
    assert list(state["dimensions"]) == ["x", "y", "z", "t"]
    assert state["displayDimensions"] == ["x", "y", "z"]
    assert state["dimensions"]["t"] == [pytest.approx(0.05), "s"]
    assert state["dimensions"]["z"] == [pytest.approx(30e-9), "m"]
    x, y, z, t = state["position"]
    assert t == 0  # the centre of time point 0, in t's steps (neuroglancer centres OME voxels)
    # the box's centre in voxels: offset + shape / 2, on a voxel's centre (whole numbers)
    assert (x, y, z) == (4 + 5, 3 + 4, 2 + 2)


def test_view_state_with_its_first_time_point_is_one_neuroglancer_reads(
        tmp_path: Path) -> None:
    neuroglancer = pytest.importorskip("neuroglancer")
    from emrun.view import layer_for, neuroglancer_state

    layer = layer_for(_time_series(tmp_path, False), set())
    state = neuroglancer.ViewerState(neuroglancer_state([layer], {layer.name: "http://x/0"}))
    assert list(state.position) == [9, 7, 4, 0]
    assert list(state.dimensions.names) == ["x", "y", "z", "t"]


def test_view_of_volumes_without_time_leaves_the_position_to_neuroglancer(
        tmp_path: Path) -> None:
    from emrun.io import write_volume
    from emrun.view import layer_for, neuroglancer_state

    write_volume(tmp_path / "v.zarr", "image", np.zeros((4, 8, 8), np.uint8),
                 voxel_size=(30, 6, 6))
    layer = layer_for(str(tmp_path / "v.zarr/image"), set())
    state = neuroglancer_state([layer], {layer.name: "http://x/0"})
    assert "position" not in state and "dimensions" not in state


# ============================================ 4. --block longer than a short axis


PATCH, STRIDE = (8, 64, 64), (4, 32, 32)


@pytest.mark.parametrize(("chunks", "block", "expected"), [
    (None, (64, 256, 256), ((20, 256, 256), (20, 256, 256))),  # z chunks were 32
    ((32, 64, 64), (64, 256, 256), ((20, 64, 64), (20, 256, 256))),  # a recipe's chunks too
    ((32, 64, 64), None, ((20, 64, 64), (20, 128, 128))),  # the default block, rounded up
    (None, (40, 256, 256), ((20, 256, 256), (40, 256, 256))),  # fits already: as before
])
def test_output_chunks_are_no_longer_than_a_short_axis(chunks: Any, block: Any,
                                                       expected: Any) -> None:
    """A volume 20 sections deep with --block 64 256 256 was written in chunks of 32 in z,
    whose last 12 sections are not there."""
    shape = (20, 300, 300)
    got = choose_chunks_and_block(shape, PATCH, STRIDE, chunks, block)
    assert got == expected
    assert all(c <= n for c, n in zip(got[0], shape, strict=True))
    Layout(shape, PATCH, STRIDE, *got)  # whole chunks per block


# ============================================ left for other files


def test_a_served_coarser_ome_level_keeps_its_half_voxel_shift(tmp_path: Path) -> None:
    from test_remote_volumes import served, tensorstore

    from emrun.io import write_volume

    tensorstore()
    write_volume(tmp_path / "v.zarr", "image", RNG.integers(0, 255, (4, 16, 16), np.uint8),
                 voxel_size=(30, 6, 6), levels=2)
    local = open_volume(tmp_path / "v.zarr/image/1").shift_nm
    assert local is not None
    with served(tmp_path) as url:
        assert open_volume(f"{url}/v.zarr/image/1").shift_nm == local


def test_a_given_block_that_splits_a_clamped_chunk_is_still_refused() -> None:
    """A recipe's chunks of 32 on 20 sections become 20; a --block of 16 in z still splits
    one, and stays 16 (for `Layout` to refuse), not silently grown to the axis."""
    chunks, block = choose_chunks_and_block((20, 300, 300), PATCH, STRIDE, (32, 64, 64),
                                            (16, 256, 256))
    assert (chunks, block) == ((20, 64, 64), (16, 256, 256))
    with pytest.raises(ValueError, match="not a whole number of chunks"):
        Layout((20, 300, 300), PATCH, STRIDE, chunks, block)
