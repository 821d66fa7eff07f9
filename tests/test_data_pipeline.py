"""Sources, mixture sampling, samples and loaders, on small volumes made in code."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from emrun.data.loader import (
    tile_corners,
    tile_owned,
    to_tensors,
    train_batches,
    unpack,
    validation_batches,
)
from emrun.data.sampler import PatchSampler
from emrun.data.samples import SampleMaker
from emrun.data.sources import mixture_weights, open_sources
from emrun.errors import UserError
from emrun.geometry import Roi
from emrun.recipe import Recipe

PATCH = (4, 16, 16)


def volume(tmp_path: Path, name: str, shape=(12, 40, 40), seed=0, labelled=1.0) -> dict:
    """Write image/labels .npy files; `labelled` is the fraction of non-zero label voxels."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, shape, dtype=np.uint8)
    labels = (np.arange(np.prod(shape)).reshape(shape) // 50 + 1).astype(np.uint32)
    labels[rng.random(shape) >= labelled] = 0
    paths = {}
    for key, array in (("image", image), ("labels", labels)):
        paths[key] = str(tmp_path / f"{name}_{key}.npy")
        np.save(paths[key], array)
    return paths


def recipe(sources: dict, validation: dict | None = None, **train) -> Recipe:
    return Recipe.model_validate({
        "name": "t", "seed": 3,
        "data": {"sources": sources, "validation": validation or {}},
        "model": {"type": "rsunet", "widths": [4, 8]},
        "tasks": {"aff": {"target": {"type": "affinity",
                                     "offsets": [[-1, 0, 0], [0, -1, 0], [0, 0, -3]]}}},
        "train": {"patch": list(PATCH), "iterations": 1, "batch_size": 2, "workers": 0, **train},
    })


def test_mixture_frequencies_follow_the_weights(tmp_path):
    a, b = volume(tmp_path, "a"), volume(tmp_path, "b", seed=1)
    r = recipe({"a": {**a, "weight": 1.0}, "b": {**b, "weight": 3.0}})
    opened = open_sources(r.data.sources)
    sampler = PatchSampler(opened, mixture_weights(opened))
    rng = np.random.default_rng(0)
    picks = [sampler.draw(rng, PATCH, PATCH).source for _ in range(2000)]
    assert abs(picks.count("b") / 2000 - 0.75) < 0.04


def test_default_weights_are_proportional_to_labelled_voxels(tmp_path):
    a = volume(tmp_path, "a", labelled=1.0)
    b = volume(tmp_path, "b", shape=(12, 40, 80), labelled=0.5)
    weights = mixture_weights(open_sources(recipe({"a": a, "b": b}).data.sources))
    assert weights[0] == pytest.approx(0.5, abs=0.03)  # same labelled voxel count


def test_crops_lie_in_the_roi_with_their_centre_in_the_mask(tmp_path):
    a = volume(tmp_path, "a")
    mask = np.zeros((12, 40, 40), np.uint8)
    mask[6:8, 20:30, 14:16] = 1
    np.save(tmp_path / "mask.npy", mask)
    roi = {"offset": [2, 4, 4], "shape": [10, 36, 30]}
    r = recipe({"a": {**a, "mask": str(tmp_path / "mask.npy"), "roi": roi}})
    sampler = PatchSampler(open_sources(r.data.sources), np.array([1.0]))
    rng = np.random.default_rng(1)
    centres = set()
    for _ in range(300):
        crop = sampler.draw(rng, PATCH, PATCH)
        z, y, x = crop.corner
        assert z >= 2 and z + 4 <= 12 and y >= 4 and y + 16 <= 40 and x >= 4 and x + 16 <= 34
        assert mask[z + 2, y + 8, x + 8] == 1
        assert crop.mask is not None and crop.mask[2, 8, 8] == 1
        centres.add(crop.corner)
    assert len(centres) == 2 * 10 * 2  # every masked centre is reachable


def test_min_labelled_redraws_and_gives_up_clearly(tmp_path):
    a = volume(tmp_path, "a", labelled=0.5)
    r = recipe({"a": {**a, "min_labelled": 0.45}})
    sampler = PatchSampler(open_sources(r.data.sources), np.array([1.0]))
    rng = np.random.default_rng(2)
    for _ in range(20):
        crop = sampler.draw(rng, PATCH, PATCH)
        assert np.count_nonzero(crop.labels) >= 0.45 * crop.labels.size
    r = recipe({"a": {**a, "min_labelled": 0.9}})
    with pytest.raises(UserError, match="no acceptable patch"):
        PatchSampler(open_sources(r.data.sources), np.array([1.0])).draw(rng, PATCH, PATCH)


def test_float_image_outside_unit_range_needs_intensity(tmp_path):
    a = volume(tmp_path, "a")
    np.save(a["image"], np.full((12, 40, 40), 7.5, np.float32))
    maker = SampleMaker(recipe({"a": a}))
    with pytest.raises(UserError, match="outside \\[0, 1\\]"):
        maker.batch(0, 0, 0)
    maker = SampleMaker(recipe({"a": {**a, "intensity": {"low": 0, "high": 10}}}))
    assert maker.batch(0, 0, 0)["image"].max() == pytest.approx(0.75)


def test_batches_have_the_documented_shapes_and_are_reproducible(tmp_path):
    r = recipe({"a": volume(tmp_path, "a")})
    maker = SampleMaker(r)
    packed = maker.batch(r.seed, 0, 5)
    assert packed["target"]["aff"].shape == (2, 3, *PATCH[:2], PATCH[2] // 8)  # bit-packed
    batch = unpack(to_tensors(packed))
    assert batch["image"].shape == (2, 1, *PATCH) and batch["image"].dtype == torch.float32
    assert batch["target"]["aff"].shape == (2, 3, *PATCH)
    assert batch["mask"]["aff"].shape == (2, 3, *PATCH)
    assert set(batch["mask"]["aff"].unique().tolist()) == {0.0, 1.0}
    assert batch["image"].min() >= 0.0 and batch["image"].max() <= 1.0
    again = SampleMaker(r).batch(r.seed, 0, 5)
    np.testing.assert_array_equal(packed["image"], again["image"])
    np.testing.assert_array_equal(packed["target"]["aff"], again["target"]["aff"])
    other = maker.batch(r.seed, 0, 6)
    assert not np.array_equal(packed["image"], other["image"])
    assert not np.array_equal(packed["image"], maker.batch(r.seed, 1, 5)["image"])  # per rank


def test_unpack_restores_targets_of_any_width():
    bits = np.random.default_rng(0).integers(0, 2, (2, 3, 4, 5, 13), dtype=np.uint8)
    packed = {"image": np.zeros((2, 1, 4, 5, 13), np.float32), "x": np.asarray(13),
              "target": {"t": np.packbits(bits, axis=-1, bitorder="little")},
              "mask": {"t": np.packbits(1 - bits, axis=-1, bitorder="little")}}
    batch = unpack(to_tensors(packed))
    np.testing.assert_array_equal(batch["target"]["t"].numpy(), bits)
    np.testing.assert_array_equal(batch["mask"]["t"].numpy(), 1 - bits)


def _first(stream, n: int) -> list[torch.Tensor]:
    return [next(stream)["image"] for _ in range(n)]


def test_stream_is_the_same_for_any_worker_count_and_resumes_at_start(tmp_path):
    r = recipe({"a": volume(tmp_path, "a")})
    serial = _first(train_batches(r, workers=0), 5)
    parallel = _first(train_batches(r, workers=2), 5)
    for s, p in zip(serial, parallel, strict=True):
        torch.testing.assert_close(s, p, rtol=0, atol=0)
    resumed = _first(train_batches(r, workers=0, start=3), 2)
    torch.testing.assert_close(resumed[0], serial[3], rtol=0, atol=0)


def test_workers_start_with_spawn(tmp_path):
    r = recipe({"a": volume(tmp_path, "a")})
    spawned = _first(train_batches(r, workers=1, context="spawn"), 2)
    torch.testing.assert_close(spawned[1], _first(train_batches(r, workers=0), 2)[1])


def test_garbage_is_collected_before_forked_workers_start(tmp_path):
    """An object left in a reference cycle (an onnxruntime session, say) is freed in this
    process before the loader forks its workers, not in a worker, where freeing it can wait
    for threads that were not forked (a training run hung in its first batch)."""
    import gc
    import os
    import weakref

    class Held:
        pass

    r = recipe({"a": volume(tmp_path, "a")})
    freed: list[int] = []
    gc.disable()  # nothing but the loader collects
    try:
        held = Held()
        held.me = held
        weakref.finalize(held, freed.append, os.getpid())
        del held
        stream = train_batches(r, workers=1, pin_memory=False)
        next(stream)
        stream.close()
    finally:
        gc.enable()
    assert freed == [os.getpid()]


def test_tile_corners_cover_the_box():
    assert tile_corners(Roi((0, 0, 0), (10, 40, 16)), (4, 16, 16)) == [
        (z, y, 0) for z in (0, 4, 6) for y in (0, 16, 24)]
    assert tile_corners(Roi((5, 0, 0), (3, 16, 16)), (4, 16, 16)) == [(5, 0, 0)]


def test_tiles_own_every_voxel_of_the_box_once():
    box = Roi((2, 0, 5), (10, 40, 16))
    owned = tile_owned(box, PATCH)
    assert list(owned) == tile_corners(box, PATCH)
    counted = np.zeros(box.shape, int)
    for corner, start in owned.items():
        begin = [s - o for s, o in zip(start, box.offset, strict=True)]
        end = [min(c + p, o + b) - o for c, p, o, b in zip(corner, PATCH, box.offset, box.shape,
                                                           strict=True)]
        counted[tuple(slice(b, e) for b, e in zip(begin, end, strict=True))] += 1
    assert (counted == 1).all()
    assert owned[(8, 24, 5)] == (10, 32, 5)  # the last tiles begin at 8 and 24, overlapping


def test_validation_masks_count_each_voxel_once(tmp_path):
    a = volume(tmp_path, "a")
    val = {"v": {**a, "roi": {"offset": [0, 0, 0], "shape": [10, 40, 40]}}}
    r = recipe({"a": a}, val)
    counted = np.zeros((3, 10, 40, 40))
    corners = iter(tile_corners(Roi((0, 0, 0), (10, 40, 40)), PATCH))
    for batch in map(unpack, validation_batches(r)):
        for mask in batch["mask"]["aff"].numpy():
            z, y, x = next(corners)
            counted[:, z:z + 4, y:y + 16, x:x + 16] += mask != 0
    assert counted.max() == 1  # the tiles at z 6, y/x 24 overlap those before them
    assert counted[0, 8:].min() == 1  # the last tile in z scores the sections it owns


def test_validation_batches_are_deterministic_and_mask_padding(tmp_path):
    a = volume(tmp_path, "a")
    val = {"v": {**a, "roi": {"offset": [9, 0, 0], "shape": [3, 40, 40]}}}
    r = recipe({"a": a}, val)
    first = list(validation_batches(r))
    second = list(validation_batches(r))
    assert sum(b["image"].shape[0] for b in first) == 9  # 1 x 3 x 3 tiles, z padded
    for b1, b2 in zip(first, second, strict=True):
        torch.testing.assert_close(b1["image"], b2["image"], rtol=0, atol=0)
    mask = unpack(first[0])["mask"]["aff"]
    assert mask[:, :, 3:].sum() == 0  # the padded section never counts
    assert mask[:, 1:, :3].sum() > 0
