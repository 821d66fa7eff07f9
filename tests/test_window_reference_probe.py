"""Reference checks of volume placement (emrun.io.window), masks (emrun.io.masks,
region_mask) and intensity scaling (Source.normalise, the engine's scaling): volumes built in
code whose every voxel holds its own coordinate in a common frame, read back for ROIs inside,
straddling and outside a companion's data, and compared with the obvious answer."""

from __future__ import annotations

import itertools
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from test_data_probe import problems, recipe_file

from emrun.data.sources import Source
from emrun.errors import UserError
from emrun.evaluate.volumes import _checked
from emrun.geometry import Roi, box_of, clip, slices
from emrun.infer.engine import Engine
from emrun.io import open_volume
from emrun.io.intensity import default_intensity
from emrun.io.masks import inside
from emrun.io.npy_volume import NpyVolume
from emrun.io.volume import VolumeError
from emrun.io.window import (
    Placed,
    covered_part,
    data_box,
    off_grid,
    placed_in,
    placed_over,
)
from emrun.io.write import write_volume
from emrun.segment.pipeline import region_mask

IMAGE = (10, 16, 18)
PART = (5, 8, 9)


def coded(shape: tuple[int, ...], start: tuple[int, ...]) -> np.ndarray:
    """Each voxel's own (z, y, x) in the common frame: z * 10^6 + y * 10^3 + x + 1, for an
    array whose first voxel lies at ``start`` there (all coordinates kept non-negative)."""
    z, y, x = np.meshgrid(*(np.arange(s, s + n) for s, n in zip(start, shape, strict=True)),
                          indexing="ij")
    return (z * 1_000_000 + y * 1_000 + x + 1).astype(np.int64)


def npy(tmp_path: Path, name: str, array: np.ndarray, offset=None, voxel=None) -> NpyVolume:
    path = tmp_path / f"{name}.npy"
    np.save(path, array)
    return NpyVolume(path=str(path), dataset=None, shape=tuple(array.shape),
                     dtype=array.dtype, offset=None if offset is None else tuple(offset),
                     voxel_size=None if voxel is None else tuple(float(v) for v in voxel))


def rois(shape: tuple[int, ...], size=(2, 3, 4), step=(2, 3, 3), margin=3) -> list[Roi]:
    """Boxes of ``size`` from ``margin`` before to ``margin`` past ``shape``: inside, across
    every edge and wholly outside."""
    starts = [range(-margin, n + margin - s + 1, st)
              for n, s, st in zip(shape, size, step, strict=True)]
    return [Roi(c, size) for c in itertools.product(*starts)]


# ---------------------------------------------------------------- labels in a part of an image


@pytest.mark.parametrize("voxel", [(40, 4, 4), (8, 8, 8)])
@pytest.mark.parametrize("image_at", [(0, 0, 0), (7, 13, 21)])
def test_labels_of_a_part_are_read_at_their_place_inside_and_refused_elsewhere(
        tmp_path, voxel, image_at):
    rel = (2, 3, 5)
    labels_at = tuple(a + r for a, r in zip(image_at, rel, strict=True))
    image = npy(tmp_path, "image", coded(IMAGE, image_at), image_at, voxel)
    labels = npy(tmp_path, "labels", coded(PART, labels_at), labels_at, voxel)
    placed = placed_in(labels, image)
    assert isinstance(placed, Placed) and placed.shape == IMAGE
    assert placed.extent == Roi(rel, PART)
    assert data_box([placed], box_of(IMAGE)) == Roi(rel, PART)
    whole = box_of(IMAGE)
    for roi in rois(IMAGE):
        box = clip(roi, whole)  # a read is clipped to the volume first, as numpy clips
        if placed.extent.contains(box):
            expected = coded(tuple(box.shape), tuple(
                b + a for b, a in zip(box.offset, image_at, strict=True)))
            assert np.array_equal(placed.read(roi), expected), roi
        elif not box.empty:
            with pytest.raises(VolumeError, match="outside its data"):
                placed.read(roi)


@pytest.mark.parametrize("voxel", [(40, 4, 4), (8, 8, 8)])
def test_a_larger_region_placed_in_the_image_reads_the_image_voxels(tmp_path, voxel):
    image_at, region_at = (7, 13, 21), (4, 10, 16)
    image = npy(tmp_path, "image", coded(IMAGE, image_at), image_at, voxel)
    region = npy(tmp_path, "region", coded((16, 22, 30), region_at), region_at, voxel)
    placed = placed_in(region, image)
    assert isinstance(placed, Placed) and placed.start == (-3, -3, -5)
    for roi in rois(IMAGE, margin=2):
        got = placed.read(roi)
        assert np.array_equal(got, image.read(roi)), roi  # the same coordinates, voxel by voxel


def test_a_part_with_channels_is_placed_on_its_spatial_axes(tmp_path):
    image_at, labels_at = (7, 13, 21), (9, 16, 26)
    image = npy(tmp_path, "image", coded(IMAGE, image_at), image_at, (8, 8, 8))
    two = np.stack([coded(PART, labels_at), -coded(PART, labels_at)])
    labels = npy(tmp_path, "labels", two, labels_at, (8, 8, 8))
    placed = placed_in(labels, image)
    assert isinstance(placed, Placed) and placed.shape == (2, *IMAGE)
    roi = Roi((3, 4, 6), (2, 5, 7))
    expected = coded((2, 5, 7), (10, 17, 27))
    assert np.array_equal(placed.read(roi), np.stack([expected, -expected]))


def test_a_mask_of_the_box_predicted_reads_its_values_there_and_0_around_it(tmp_path):
    """placed_over (fill 0): inside its data, its values; straddling, its values on its part
    and 0 on the rest; outside it, 0; outside the reference, clipped as any read."""
    image_at, rel = (7, 13, 21), (2, 3, 5)
    mask_at = tuple(a + r for a, r in zip(image_at, rel, strict=True))
    image = npy(tmp_path, "image", np.zeros(IMAGE, np.uint8), image_at, (8, 8, 8))
    mask = npy(tmp_path, "mask", coded(PART, mask_at), mask_at, (8, 8, 8))
    placed = placed_over(image, mask, Roi(rel, PART))
    assert isinstance(placed, Placed) and placed.fill == 0
    reference = np.zeros(IMAGE, np.int64)
    reference[slices(Roi(rel, PART))] = coded(PART, mask_at)
    for roi in rois(IMAGE):
        got = placed.read(roi)
        expected = reference[slices(clip(roi, box_of(IMAGE)))]
        assert got.dtype == np.int64 and np.array_equal(got, expected), roi


def test_companions_of_another_voxel_size_or_a_part_outside_are_left_unplaced(tmp_path):
    image = npy(tmp_path, "image", coded(IMAGE, (7, 13, 21)), (7, 13, 21), (8, 8, 8))
    finer = npy(tmp_path, "finer", coded(PART, (9, 16, 26)), (9, 16, 26), (8, 4, 4))
    across = npy(tmp_path, "across", coded(PART, (14, 13, 21)), (14, 13, 21), (8, 8, 8))
    unplaced = npy(tmp_path, "unplaced", coded(PART, (0, 0, 0)))
    for volume in (finer, across, unplaced):
        assert placed_in(volume, image) is volume
        assert placed_over(image, volume, Roi((0, 0, 0), (1, 1, 1))) is volume


# ---------------------------------------------------------------- a larger truth, cut


@pytest.mark.parametrize("channels", [0, 3])
@pytest.mark.parametrize("voxel", [None, (40, 4, 4)])
def test_covered_part_of_a_larger_truth_is_exactly_the_segmentations_box(
        tmp_path, channels, voxel):
    seg_at, truth_at, seg_shape = (20, 40, 60), (10, 30, 50), (6, 8, 10)
    shape = (channels, *seg_shape) if channels else seg_shape
    seg = npy(tmp_path, "seg", np.zeros(shape, np.float32), seg_at, voxel)
    truth = npy(tmp_path, "truth", coded((30, 25, 40), truth_at), truth_at, voxel)
    part = covered_part(seg, truth)
    assert isinstance(part, Placed) and part.shape == seg_shape
    assert np.array_equal(part.read(), coded(seg_shape, seg_at))
    for roi in rois(seg_shape, size=(3, 3, 3), step=(2, 4, 4), margin=2):
        box = clip(roi, box_of(seg_shape))
        expected = coded(tuple(box.shape),
                         tuple(b + a for b, a in zip(box.offset, seg_at, strict=True)))
        assert np.array_equal(part.read(roi), expected), roi
    # the same box from a truth stored without placement: it starts at 0
    bare = npy(tmp_path, "bare", coded((30, 50, 80), (0, 0, 0)))
    assert np.array_equal(covered_part(seg, bare).read(), coded(seg_shape, seg_at))


def test_covered_part_leaves_a_truth_it_cannot_place_unchanged(tmp_path):
    seg = npy(tmp_path, "seg", np.zeros((6, 8, 10), np.uint32), (20, 40, 60), (40, 4, 4))
    short = npy(tmp_path, "short", coded((8, 8, 8), (18, 40, 60)), (18, 40, 60), (40, 4, 4))
    other = npy(tmp_path, "other", coded((30, 25, 40), (10, 30, 50)), (10, 30, 50), (40, 8, 8))
    unplaced_seg = npy(tmp_path, "useg", np.zeros((6, 8, 10), np.uint32))
    for reference, truth in ((seg, short), (seg, other), (unplaced_seg, other)):
        assert covered_part(reference, truth) is truth


def test_evaluate_cuts_a_larger_truth_and_refuses_one_on_another_grid_naming_both(tmp_path):
    seg = npy(tmp_path, "seg", np.ones((6, 8, 10), np.uint32), (20, 40, 60), (40, 4, 4))
    truth = npy(tmp_path, "truth", coded((30, 25, 40), (10, 30, 50)).astype(np.uint32),
                (10, 30, 50), (40, 4, 4))
    _, cut = _checked([("segmentation", seg), ("truth", truth)])
    assert np.array_equal(cut.read(), coded((6, 8, 10), (20, 40, 60)))
    other = npy(tmp_path, "other", coded((30, 25, 40), (10, 30, 50)).astype(np.uint32),
                (10, 30, 50), (40, 8, 8))
    with pytest.raises(UserError) as caught:
        _checked([("segmentation", seg), ("truth", other)])
    text = str(caught.value)
    assert "other.npy" in text and "seg.npy" in text and "[40.0, 8.0, 8.0]" in text
    assert "\n" not in text
    message = off_grid(other, seg, "truth", "the segmentation")
    assert message is not None and "other.npy" in message and "seg.npy" in message


def test_a_read_past_the_end_of_a_covered_part_is_empty_as_for_any_volume(tmp_path):
    seg = npy(tmp_path, "seg", np.zeros((6, 8, 10), np.uint32), (20, 40, 60))
    truth = npy(tmp_path, "truth", coded((12, 8, 10), (14, 40, 60)), (14, 40, 60))
    part = covered_part(seg, truth)
    assert isinstance(part, Placed)
    past = Roi((8, 0, 0), (2, 8, 10))
    assert seg.read(past).shape == (0, 8, 10)
    assert part.read(past).shape == (0, 8, 10)


# ---------------------------------------------------------------- offsets off the grid


def test_an_offset_in_nm_between_voxels_is_refused_naming_the_volume(tmp_path):
    path = tmp_path / "v.h5"
    with h5py.File(path, "w") as f:
        data = f.create_dataset("half", data=np.zeros((4, 4, 4), np.uint8))
        data.attrs["resolution"] = [8, 4, 4]
        data.attrs["offset"] = [12, 0, 0]  # 1.5 voxels
        whole = f.create_dataset("whole", data=np.zeros((4, 4, 4), np.uint8))
        whole.attrs["resolution"] = [8, 4, 4]
        whole.attrs["offset"] = [16, 8, 4]
    with pytest.raises(VolumeError) as caught:
        open_volume(f"{path}/half")
    text = str(caught.value)
    assert "half" in text and "[1.5, 0, 0]" in text and "\n" not in text
    assert open_volume(f"{path}/whole").offset == (2, 2, 1)


def test_labels_on_another_grid_are_refused_once_for_their_voxel_size(tmp_path):
    store = tmp_path / "v.zarr"  # image: [56, 104, 168] to [136, 232, 312] nm
    write_volume(store, "image", (coded(IMAGE, (0, 0, 0)) % 251).astype(np.uint8),
                 voxel_size=(8, 8, 8), offset=(7, 13, 21))
    write_volume(store, "labels", coded(PART, (0, 0, 0)).astype(np.uint32),
                 voxel_size=(8, 4, 4), offset=(9, 32, 50), label=True)  # (72, 128, 200) nm
    found = [p for p in problems(recipe_file(
        tmp_path, f"{{image: {store}/image, labels: {store}/labels}}")) if "labels" in p]
    assert any("voxel size" in p for p in found)
    assert not any("partly outside" in p for p in found)
    assert len(found) == 1


# ---------------------------------------------------------------- masks


@pytest.mark.parametrize(("values", "expected"), [
    (np.array([False, True, True]), [False, True, True]),
    (np.array([0, 1, 255], np.uint8), [False, True, True]),
    (np.array([0, 2, 2**64 - 1], np.uint64), [False, True, True]),
    (np.array([0, -1, -128], np.int8), [False, True, True]),
    (np.array([0.0, np.nan, 0.5], np.float32), [False, False, True]),
    (np.array([-0.0, np.inf, -np.nan], np.float64), [False, True, False]),
    (np.array([0.0, np.nan, 1e-3], np.float16), [False, False, True]),
])
def test_inside_is_non_zero_and_not_nan_for_every_dtype(values, expected):
    got = inside(values)
    assert got.dtype == bool and got.tolist() == expected


@pytest.mark.parametrize("dtype", [bool, np.uint8, np.uint64, np.int16, np.float32])
def test_region_mask_takes_any_dtype_and_a_leading_channel_of_one(dtype):
    rng = np.random.default_rng(1)
    keep = rng.random((3, 4, 5)) < 0.5
    if dtype is bool:
        mask = keep
    elif dtype is np.float32:
        mask = np.where(keep, np.float32(0.25), np.float32(np.nan)).astype(np.float32)
        mask[0, 0, :] = 0.0
        keep[0, 0, :] = False
    elif dtype is np.int16:
        mask = np.where(keep, -3, 0).astype(dtype)
    else:
        mask = np.where(keep, 255 if dtype is np.uint8 else 2, 0).astype(dtype)
    for given in (mask, mask[None]):
        got = region_mask(given, (3, 4, 5))
        assert got is not None and got.dtype == bool and np.array_equal(got, keep)
    with pytest.raises(UserError, match=r"\[3, 4, 6\]"):
        region_mask(mask, (3, 4, 6))
    with pytest.raises(UserError):
        region_mask(np.stack([mask, mask]), (3, 4, 5))  # two channels: not a mask of one
    assert region_mask(None, (3, 4, 5)) is None


# ---------------------------------------------------------------- intensity


def source(low: float, high: float, given: bool = True) -> Source:
    image = NpyVolume(path="x.npy", dataset=None, shape=(4, 4, 4), dtype=np.dtype(np.float32))
    return Source("s", image, None, None, {}, box_of((4, 4, 4)), low, high, None, 0.0,
                  scale_given=given)


def engine_scale(raw: np.ndarray, low: float, high: float) -> np.ndarray:
    """The inference engine's scaling of a block's input (`Engine._image`) and of a patch
    read beyond it (`Engine._normalise`), both on the CPU."""
    engine = Engine.__new__(Engine)
    engine.device, engine._buffers = torch.device("cpu"), {}
    block = engine._image(raw, (low, high)).numpy().copy()
    patch = Engine._normalise(engine, (low, high))(torch.from_numpy(raw)).numpy()
    assert np.array_equal(block, patch)
    return block


@pytest.mark.parametrize(("dtype", "low", "high"), [
    (np.uint16, 1000.0, 5000.0), (np.uint8, 20.0, 220.0), (np.float32, -2.0, 6.0),
    (np.float64, 0.25, 0.75), (np.int16, -300.0, 300.0)])
def test_the_recipe_scale_maps_low_to_0_high_to_1_and_clips_beyond(dtype, low, high):
    raw = np.linspace(low - (high - low) / 2, high + (high - low) / 2, 64)
    raw = raw.astype(dtype).reshape(4, 4, 4)
    raw.flat[:3] = np.array([low, (low + high) / 2, high]).astype(dtype)
    got = source(low, high).normalise(raw)
    reference = np.clip((raw.astype(np.float64) - low) / (high - low), 0, 1)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, reference, atol=2e-7)
    assert got.flat[0] == 0.0 and got.flat[2] == 1.0
    assert abs(got.flat[1] - 0.5) < 1e-6 or dtype in (np.uint8, np.uint16, np.int16)
    assert got.min() == 0.0 and got.max() == 1.0  # clipped on both sides
    # inference scales the same values to the same numbers (to float32 rounding)
    if dtype != np.uint16 or hasattr(torch, "uint16"):
        np.testing.assert_allclose(engine_scale(raw, low, high), got, atol=1e-6, rtol=0)
    # a crop is scaled with the global low, high: the crop of the scaled whole
    crop = (slice(1, 3), slice(0, 2), slice(2, 4))
    assert np.array_equal(source(low, high).normalise(raw[crop]), got[crop])


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int8, np.float32])
def test_default_scale_is_the_dtypes_range_and_a_constant_image_stays_constant(dtype):
    low, high = default_intensity(np.dtype(dtype))
    scaler = source(low, high, given=False)
    for value in (low, high, (low + high) / 2 if dtype != np.float32 else 0.3):
        raw = np.full((3, 4, 5), value).astype(dtype)
        got = scaler.normalise(raw)
        expected = np.float32((float(raw.flat[0]) - low) / (high - low))
        assert np.all(got == got.flat[0]) and abs(got.flat[0] - expected) < 1e-6
    if dtype == np.float32:
        with pytest.raises(UserError, match="outside"):
            scaler.normalise(np.full((2, 2, 2), 3.0, np.float32))


def test_nan_is_refused_where_trained_on_and_0_where_masked_out():
    raw = np.linspace(0, 1, 64, dtype=np.float32).reshape(4, 4, 4)
    raw[0, 0, :2] = np.nan
    raw[0, 1, 0] = np.inf
    scaler = source(0.0, 1.0)
    with pytest.raises(UserError, match="3 in one training patch"):
        scaler.normalise(raw)
    mask = np.ones(raw.shape, np.float32)
    mask[0, 0, :2] = np.nan  # NaN in a float mask is outside
    mask[0, 1, 0] = 0
    got = scaler.normalise(raw, mask)
    assert np.isfinite(got).all() and (got[0, 0, :2] == 0).all() and got[0, 1, 0] == 0
    finite = np.isfinite(raw)
    assert np.array_equal(got[finite], np.clip(raw[finite], 0, 1))
    mask[0, 1, 0] = 1  # the infinite voxel inside the mask: refused
    with pytest.raises(UserError, match="1 in one training patch"):
        scaler.normalise(raw, mask)
