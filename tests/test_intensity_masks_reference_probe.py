"""Reference checks of intensity scaling (emrun.io.intensity, Source.normalise, the inference
engine's scaling and its input checks), masks (emrun.io.masks, infer's block skipping and its
mask checks) and one-channel views (emrun.io.one_channel) against numpy closed forms, brute
force and plain slicing, on small volumes made in code, for every dtype emrun accepts."""

from __future__ import annotations

import itertools
import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from emrun.data.checks import check_data
from emrun.data.sources import Source, open_sources
from emrun.errors import UserError
from emrun.geometry import Roi, box_of, clip, slices
from emrun.infer.array import predict_box
from emrun.infer.engine import Engine, finite_input, intensity_range
from emrun.infer.job import _check_float_scale, _check_mask_place
from emrun.infer.plan import Layout
from emrun.infer.worker import BlockWorker
from emrun.io import open_volume
from emrun.io.intensity import default_intensity
from emrun.io.masks import inside
from emrun.io.npy_volume import NpyVolume
from emrun.io.one_channel import OneChannel, single_channel
from emrun.io.window import placed_over
from emrun.io.write import write_volume
from emrun.models import build_model
from emrun.recipe import Recipe
from emrun.train.seg_validation import predict_validation

INTEGERS = [np.uint8, np.uint16, np.uint32, np.uint64, np.int8, np.int16, np.int32, np.int64]
FLOATS = [np.float16, np.float32, np.float64]


def npy(tmp_path: Path | None, name: str, array: np.ndarray, offset=None,
        voxel=None) -> NpyVolume:
    """An .npy volume (in memory when ``tmp_path`` is None: only its metadata is used)."""
    path = f"{name}.npy" if tmp_path is None else str(tmp_path / f"{name}.npy")
    if tmp_path is not None:
        np.save(path, array)
    return NpyVolume(path=path, dataset=None, shape=tuple(array.shape), dtype=array.dtype,
                     offset=None if offset is None else tuple(offset),
                     voxel_size=None if voxel is None else tuple(float(v) for v in voxel))


def source_for(raw: np.ndarray, low: float, high: float, given: bool) -> Source:
    image = npy(None, "x", raw)
    return Source("s", image, None, None, {}, box_of(raw.shape[-3:]), low, high, None, 0.0,
                  scale_given=given)


def engine() -> Engine:
    """An engine with only what its scaling and input reading use (CPU)."""
    eng = Engine.__new__(Engine)
    eng.device, eng._buffers = torch.device("cpu"), {}
    return eng


def inferred(raw: np.ndarray, low: float, high: float) -> np.ndarray:
    """What the network sees at inference: a block's input (`Engine._image`); a patch read
    beyond the block (`Engine._normalise`) must give the same bits."""
    eng = engine()
    block = eng._image(raw, (low, high)).numpy().copy()
    patch = eng._normalise((low, high))(torch.from_numpy(np.ascontiguousarray(raw))).numpy()
    assert np.array_equal(block, patch)
    return block


def closed_form(raw: np.ndarray, low: float, high: float) -> np.ndarray:
    """(raw - low) / (high - low) clipped to [0, 1], exactly (Python ints / float64)."""
    values = np.array([(int(v) if raw.dtype.kind in "ui" else float(v)) for v in raw.flat],
                      dtype=object)
    scaled = np.array([float((v - low) / (high - low)) for v in values], np.float64)
    return np.clip(scaled, 0.0, 1.0).reshape(raw.shape)


def spread_values(dtype, low: float, high: float, shape=(3, 4, 5)) -> np.ndarray:
    """Values from below ``low`` to above ``high`` (within the dtype), both ends included."""
    n = int(np.prod(shape))
    if np.dtype(dtype).kind in "ui":
        info = np.iinfo(dtype)
        span = high - low
        wanted = np.linspace(low - span / 4, high + span / 4, n)
        ints = [min(max(round(v), int(info.min)), int(info.max)) for v in wanted]
        ints[0], ints[1], ints[-1] = int(low), int(high), int(info.max)
        return np.array(ints, dtype=object).astype(dtype).reshape(shape)
    values = np.linspace(low - (high - low) / 4, high + (high - low) / 4, n).astype(dtype)
    values[0], values[1] = low, high
    return values.reshape(shape)


# ---------------------------------------------------------------- one scale, train and infer


@pytest.mark.parametrize("dtype", INTEGERS + FLOATS)
def test_default_scale_is_the_dtype_range_and_train_and_infer_see_the_same_bits(dtype):
    low, high = default_intensity(np.dtype(dtype))
    if np.dtype(dtype).kind in "ui":
        info = np.iinfo(dtype)
        assert (low, high) == (float(info.min), float(info.max))
        ints = np.linspace(float(info.min), float(info.max), 60)
        raw = np.array([min(max(int(v), int(info.min)), int(info.max)) for v in ints],
                       dtype=object).astype(dtype).reshape(3, 4, 5)
        raw.flat[0], raw.flat[-1] = info.min, info.max
    else:
        assert (low, high) == (0.0, 1.0)
        raw = np.linspace(0, 1, 60).astype(dtype).reshape(3, 4, 5)
    trained = source_for(raw, low, high, given=False).normalise(raw)
    assert trained.dtype == np.float32
    np.testing.assert_allclose(trained, closed_form(raw, low, high), atol=3e-7, rtol=0)
    assert trained.flat[0] == 0.0 and trained.flat[-1] == 1.0  # the dtype's ends: 0 and 1
    assert np.array_equal(inferred(raw, low, high), trained)  # the network sees the same


@pytest.mark.parametrize(("dtype", "low", "high"), [
    (np.uint8, 17.0, 201.0), (np.uint16, 300.0, 4000.0), (np.uint32, 1000.0, 70000.0),
    (np.uint64, 5.0, 905.0), (np.int8, -100.0, 50.0), (np.int16, -2000.0, 1000.0),
    (np.int32, -70000.0, 20000.0), (np.int64, -12345.0, 54321.0),
    (np.float16, -2.0, 6.0), (np.float32, -0.5, 0.25), (np.float64, 100.0, 355.0)])
def test_a_given_scale_maps_low_high_to_0_1_clips_and_agrees_between_train_and_infer(
        dtype, low, high):
    raw = spread_values(dtype, low, high)
    trained = source_for(raw, low, high, given=True).normalise(raw)
    np.testing.assert_allclose(trained, closed_form(raw, low, high), atol=4e-7, rtol=0)
    assert trained.flat[0] == 0.0 and trained.flat[1] == 1.0
    assert trained.min() == 0.0 and trained.max() == 1.0  # clipped on both sides
    assert np.array_equal(inferred(raw, low, high), trained)


def test_inference_takes_the_first_given_scale_else_the_input_dtypes():
    base = {"image": "a.npy"}
    recipe = recipe_of({"a": base, "b": {**base, "intensity": {"low": 10, "high": 90}},
                        "c": {**base, "intensity": {"low": 0, "high": 5}}})
    assert intensity_range(recipe, npy(None, "i", np.zeros(1, np.uint16))) == (10.0, 90.0)
    plain = recipe_of({"a": base})
    for dtype in INTEGERS + FLOATS:
        assert intensity_range(plain, npy(None, "i", np.zeros(1, dtype))) == \
            default_intensity(np.dtype(dtype))


@pytest.mark.parametrize(("dtype", "low", "step"), [
    (np.uint32, 2.0**24, 1.0), (np.int64, -(2.0**25), 1.0), (np.float64, 1e6, 1 / 256)])
def test_values_far_from_zero_keep_the_resolution_of_their_scale(dtype, low, step):
    high = low + 255 * step
    raw = (low + step * np.arange(256).reshape(4, 8, 8)).astype(dtype)
    expected = np.arange(256).reshape(4, 8, 8) / 255
    trained = source_for(raw, low, high, given=True).normalise(raw)
    np.testing.assert_allclose(closed_form(raw, low, high), expected, atol=1e-12)
    np.testing.assert_allclose(trained, expected, atol=1e-6, rtol=0)
    np.testing.assert_allclose(inferred(raw, low, high), expected, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- float inputs: range, NaN


def recipe_of(sources: dict, validation: dict | None = None) -> Recipe:
    return Recipe.model_validate({
        "name": "t", "seed": 3, "data": {"sources": sources, "validation": validation or {}},
        "model": {"type": "rsunet", "widths": [4, 8]},
        "tasks": {"aff": {"target": {"type": "affinity"}}},
        "train": {"patch": [4, 16, 16], "iterations": 1, "batch_size": 1, "workers": 0},
    })


def float_image(tmp_path: Path, lo: float, hi: float) -> NpyVolume:
    return npy(tmp_path, "f", np.linspace(lo, hi, 4 * 6 * 8, dtype=np.float32)
               .reshape(4, 6, 8))


def test_a_float_input_outside_0_1_is_refused_by_default_and_clipped_by_another_given_scale(
        tmp_path):
    volume = float_image(tmp_path, -0.5, 1.5)
    shape = volume.shape
    with pytest.raises(UserError, match=r"\[-0.5, 1.5\]"):
        _check_float_scale(recipe_of({"a": {"image": volume.path}}), volume, (0, 0, 0), shape)
    with pytest.raises(UserError, match="outside"):  # training refuses it as well
        source_for(volume.read(), 0.0, 1.0, given=False).normalise(volume.read())
    wide = recipe_of({"a": {"image": volume.path, "intensity": {"low": -0.25, "high": 1.25}}})
    _check_float_scale(wide, volume, (0, 0, 0), shape)  # given: clipped, as training does
    inside_unit = float_image(tmp_path, 0.0, 1.0)
    _check_float_scale(recipe_of({"a": {"image": volume.path}}), inside_unit, (0, 0, 0), shape)


def test_a_float_input_with_a_given_0_1_scale_is_clipped_at_inference_as_in_training(
        tmp_path):
    volume = float_image(tmp_path, -0.5, 1.5)
    raw = volume.read()
    given = {"a": {"image": volume.path, "intensity": {"low": 0.0, "high": 1.0}}}
    (opened,) = open_sources(recipe_of(given).data.sources)
    assert opened.scale_given
    np.testing.assert_array_equal(opened.normalise(raw), np.clip(raw, 0, 1))  # training clips
    _check_float_scale(recipe_of(given), volume, (0, 0, 0), volume.shape)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize(("low", "high"), [(0.0, 1.0), (0.25, 0.75), (-3.0, 5.0)])
def test_nan_outside_the_mask_reads_as_black_in_training_and_inference(dtype, low, high):
    rng = np.random.default_rng(7)
    raw = (low + (high - low) * rng.random((3, 4, 5))).astype(dtype)
    mask = np.ones(raw.shape, np.float32)
    raw[0, 0, :3] = [np.nan, np.inf, -np.inf]
    mask[0, 0, :2] = 0
    mask[0, 0, 2] = np.nan  # NaN in a float mask is outside
    trained = source_for(raw, low, high, given=True).normalise(raw, mask)
    volume = SimpleNamespace(read=lambda roi: mask)  # the mask as a volume
    read = finite_input(npy(None, "x", raw), box_of(raw.shape), raw, volume, low, "here")
    seen = inferred(read, low, high)
    assert np.array_equal(seen, trained)
    assert (trained[0, 0, :3] == 0).all()
    finite = np.isfinite(raw)
    np.testing.assert_allclose(trained[finite], closed_form(raw, low, high)[finite],
                               atol=1e-3 if dtype == np.float16 else 4e-7, rtol=0)
    mask[0, 0, 1] = 0.5  # the infinite voxel inside the mask: refused by both
    with pytest.raises(UserError, match="1 in one training patch"):
        source_for(raw, low, high, given=True).normalise(raw, mask)
    with pytest.raises(UserError, match="1 NaN or infinite voxels inside the mask"):
        finite_input(npy(None, "x", raw), box_of(raw.shape), raw, volume, low, "here")


def nan_validation_recipe(tmp_path: Path) -> tuple[Recipe, np.ndarray]:
    """A validation source (also the training one) whose float image is NaN where its mask
    is 0: two y rows of every section."""
    shape = (8, 24, 24)
    rng = np.random.default_rng(3)
    image = rng.random(shape).astype(np.float32)
    image[:, :2] = np.nan
    mask = np.ones(shape, np.uint8)
    mask[:, :2] = 0
    labels = (np.arange(int(np.prod(shape))).reshape(shape) // 37 + 1).astype(np.uint32)
    spec = {"image": npy(tmp_path, "img", image).path, "labels": npy(tmp_path, "lab", labels).path,
            "mask": npy(tmp_path, "mask", mask).path}
    return recipe_of({"a": spec}, {"v": spec}), image


def test_nan_outside_a_validation_mask_is_accepted_by_the_checks_and_the_loss_path(tmp_path):
    recipe, _ = nan_validation_recipe(tmp_path)
    assert check_data(SimpleNamespace(recipe=recipe))[1] == []  # type: ignore[arg-type]
    (source,) = open_sources(recipe.data.validation)
    crop = source.image.read()
    scaled = source.normalise(crop, source.mask.read())
    assert np.isfinite(scaled).all() and (scaled[:, :2] == 0).all()


def test_segmentation_validation_reads_nan_outside_the_mask_as_black(tmp_path):
    recipe, image = nan_validation_recipe(tmp_path)
    torch.manual_seed(0)
    model = build_model(recipe).eval()
    got = predict_validation(recipe, model, torch.device("cpu"))
    # the reference: the same image with the masked-out NaN read as black (low, 0)
    eng = Engine(recipe, model, torch.device("cpu"), tta=1, compile=False)
    clean = np.where(np.isnan(image), np.float32(0), image)
    want = predict_box(eng, npy(tmp_path, "clean", clean), box_of(image.shape), (0.0, 1.0))
    assert len(got) == 1
    np.testing.assert_array_equal(got[0].affinities, (np.clip(want["aff"], 0, 1) * 255)
                                  .round().astype(np.uint8))


# ---------------------------------------------------------------- blank blocks and masks


@pytest.mark.parametrize("dtype", INTEGERS + FLOATS)
def test_a_block_is_blank_exactly_when_every_voxel_reads_as_the_scales_low(dtype):
    low, high = default_intensity(np.dtype(dtype))
    layout = Layout((4, 8, 8), (2, 4, 4), (2, 4, 4), (4, 8, 8), (4, 8, 8))
    eng = engine()
    at_low = np.full((4, 8, 8), low).astype(dtype)
    assert eng.read_input(_array(at_low), layout, (0, 0, 0), low=low) is None
    one_up = at_low.copy()
    if np.dtype(dtype).kind in "ui":  # a dark grey (int64's low + 1 is low in float32)
        one_up[3, 7, 7] = np.array(int(low) + max(int(high - low) // 1000, 1), dtype=dtype)
    else:
        one_up[3, 7, 7] = 0.001
    got = eng.read_input(_array(one_up), layout, (0, 0, 0), low=low)
    assert got is not None and np.array_equal(got, one_up)
    if np.dtype(dtype).kind == "i":  # raw 0 is mid-grey in a signed image: not blank
        zeros = np.zeros((4, 8, 8), dtype)
        assert eng.read_input(_array(zeros), layout, (0, 0, 0), low=low) is not None


def _array(array: np.ndarray):
    from emrun.infer.array import ArrayVolume
    return ArrayVolume.of(array)


MASK_DTYPES = [bool, np.uint8, np.int16, np.uint64, np.float32]


def mask_values(keep: np.ndarray, dtype) -> np.ndarray:
    """``keep`` as a mask of ``dtype``: non-zero (negative for a signed one) inside, and for
    a float one NaN at some voxels outside."""
    if dtype is bool:
        return keep.copy()
    if dtype is np.float32:
        out = np.where(keep, np.float32(0.5), np.float32(0)).astype(np.float32)
        out[~keep & (np.indices(keep.shape).sum(0) % 2 == 0)] = np.nan
        return out
    value = -7 if dtype is np.int16 else 2**40 if dtype is np.uint64 else 9
    return np.where(keep, value, 0).astype(dtype)


@pytest.mark.parametrize("dtype", MASK_DTYPES)
@pytest.mark.parametrize("larger", [False, True])
def test_blocks_are_skipped_exactly_where_no_masked_in_voxel_lies_in_their_write_box(
        tmp_path, dtype, larger):
    shape, chunks = (6, 12, 10), (2, 4, 5)
    rng = np.random.default_rng(11)
    image = rng.integers(1, 255, shape).astype(np.uint8)
    keep = np.zeros(shape, bool)
    keep[rng.random(shape) < 0.01] = True
    keep[0, 0, 0] = keep[5, 11, 9] = True
    image_at = (3, 5, 7)
    if larger:  # a mask of a larger region, placed by the offsets (the part the input covers)
        around = np.zeros((shape[0] + 5, shape[1] + 6, shape[2] + 9), bool)
        around[2:2 + shape[0], 1:1 + shape[1], 4:4 + shape[2]] = keep
        around[0, 0, 0] = around[-1, -1, -1] = True  # outside the input: never read
        mask_at = tuple(a - b for a, b in zip(image_at, (2, 1, 4), strict=True))
        given, where = mask_values(around, dtype), mask_at
    else:
        given, where = mask_values(keep, dtype)[None], image_at  # (1, z, y, x): one channel
    volume = npy(tmp_path, "img", image, offset=image_at, voxel=(8, 4, 4))
    lead = () if larger else (0,)
    mask_volume = npy(tmp_path, "mask", given, offset=(*lead, *where),
                      voxel=(*(float(v) for v in lead), 8, 4, 4))
    mask = placed_over(volume, single_channel(mask_volume), box_of(shape))
    _check_mask_place(mask, volume)
    layout = Layout(shape, (2, 4, 4), (2, 4, 4), chunks, chunks)
    worker = BlockWorker.__new__(BlockWorker)
    worker.job = SimpleNamespace(layout=layout, roi_offset=(0, 0, 0), scale=(0.0, 255.0))
    worker.volume, worker.mask, worker.engine = volume, mask, engine()
    for block in layout.block_grid():
        box = layout.write_box(block)
        wanted = bool(keep[slices(box)].any())
        assert (worker._read_input(block) is not None) == wanted, block
    assert np.array_equal(inside(mask.read()), keep)


def test_an_input_mask_on_another_grid_is_refused_naming_what_differs(tmp_path):
    image = npy(tmp_path, "img", np.ones((4, 6, 8), np.uint8), offset=(0, 0, 0),
                voxel=(8, 4, 4))
    with pytest.raises(UserError, match=r"mask shape \[4, 6, 7\] differs from the input's "
                       r"\[4, 6, 8\]"):
        _check_mask_place(npy(tmp_path, "m1", np.ones((4, 6, 7), bool)), image)
    coarse = npy(tmp_path, "m2", np.ones((2, 3, 4), bool), offset=(0, 0, 0), voxel=(16, 8, 8))
    with pytest.raises(UserError, match=r"voxel size \[16.0, 8.0, 8.0\] nm"):
        _check_mask_place(placed_over(image, coarse, box_of((4, 6, 8))), image)
    moved = npy(tmp_path, "m3", np.ones((4, 6, 8), bool), offset=(0, 1, 0), voxel=(8, 4, 4))
    with pytest.raises(UserError, match=r"offset \[0, 1, 0\]"):
        _check_mask_place(placed_over(image, moved, box_of((4, 6, 8))), image)


# ---------------------------------------------------------------- one-channel views


def rois(shape: tuple[int, ...], size=(2, 3, 4), margin=2) -> list[Roi]:
    starts = [range(-margin, n + margin - s + 1, 2) for n, s in zip(shape, size, strict=True)]
    return [Roi(c, size) for c in itertools.product(*starts)]


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.float32, np.uint64])
def test_one_channel_reads_every_box_as_numpy_slices_the_channel(tmp_path, dtype):
    rng = np.random.default_rng(5)
    array = (rng.random((1, 5, 7, 9)) * 100).astype(dtype)
    write_volume(tmp_path / "s.zarr", "img", array, voxel_size=(40, 8, 8), offset=(2, 3, 4),
                 shift_nm=(0.0, 4.0, 4.0), channel_axis=True, chunks=(1, 2, 3, 4))
    inner = open_volume(str(tmp_path / "s.zarr" / "img"))
    view = single_channel(inner)
    assert isinstance(view, OneChannel) and view.ndim == 3
    assert (view.shape, view.dtype) == ((5, 7, 9), np.dtype(dtype))
    assert tuple(view.voxel_size) == tuple(inner.voxel_size[-3:]) == (40.0, 8.0, 8.0)
    assert tuple(view.offset) == (2, 3, 4)
    assert tuple(view.shift_nm) == (0.0, 4.0, 4.0)
    assert tuple(view.chunks) == (2, 3, 4)
    assert np.array_equal(view.read(), array[0])
    whole = box_of(view.shape)
    for roi in rois(view.shape):
        assert np.array_equal(view.read(roi), array[0][slices(clip(roi, whole))]), roi
    again = pickle.loads(pickle.dumps(view))
    assert np.array_equal(again.read(Roi((1, 2, 3), (3, 3, 3))), array[0, 1:4, 2:5, 3:6])


def test_only_a_single_leading_channel_is_dropped():
    three = npy(None, "a", np.zeros((5, 6, 7), np.uint8))
    assert single_channel(three) is three
    two = npy(None, "b", np.zeros((2, 5, 6, 7), np.uint8))
    assert single_channel(two) is two
    one = npy(None, "c", np.zeros((1, 5, 6, 7), np.uint8), offset=(0, 1, 2, 3),
              voxel=(1, 30, 6, 6))
    view = single_channel(one)
    assert view.shape == (5, 6, 7) and view.offset == (1, 2, 3)
    assert view.voxel_size == (30.0, 6.0, 6.0)


def test_one_channel_of_a_coarser_level_keeps_that_levels_place_and_values(tmp_path):
    array = np.arange(1 * 8 * 16 * 16, dtype=np.uint16).reshape(1, 8, 16, 16)
    write_volume(tmp_path / "s.zarr", "img", array, voxel_size=(8, 8, 8), offset=(0, 2, 4),
                 channel_axis=True, chunks=(1, 4, 8, 8), levels=2)
    inner = open_volume(str(tmp_path / "s.zarr" / "img" / "1"))
    view = single_channel(inner)
    assert view.shape == tuple(inner.shape[1:])
    assert view.voxel_size == tuple(inner.voxel_size[-3:])
    assert view.offset == (tuple(inner.offset[-3:]) if inner.offset is not None else None)
    assert view.shift_nm == (tuple(inner.shift_nm[-3:]) if inner.shift_nm is not None else None)
    assert np.array_equal(view.read(), inner.read()[0])
