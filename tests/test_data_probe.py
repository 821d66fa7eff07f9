"""Probes of the training data pipeline with messy data: misplaced labels, signed and float
images, masks the sampler cannot use, and the sampler's coverage of the box's edges."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from emrun.cli import app
from emrun.data.checks import check_data
from emrun.data.sampler import PatchSampler
from emrun.data.samples import SampleMaker
from emrun.data.sources import mixture_weights, open_sources
from emrun.errors import UserError
from emrun.io.intensity import default_intensity
from emrun.io.write import write_volume
from emrun.recipe import Recipe, load_recipe

PATCH = (4, 16, 16)
DRAWS = 1200
SHAPE = (8, 32, 40)


def labels_of(shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    """Blocky non-zero ids."""
    return (np.arange(int(np.prod(shape))).reshape(shape) // 40 + 1).astype(np.uint32)


def save(tmp_path: Path, name: str, array: np.ndarray) -> str:
    path = tmp_path / f"{name}.npy"
    np.save(path, array)
    return str(path)


def recipe_file(tmp_path: Path, source: str, augment: str = "none") -> Path:
    """A recipe of one training source, given as a YAML flow mapping."""
    text = f"""\
    name: t
    data:
      sources:
        a: {source}
    model: {{type: rsunet, widths: [4, 8]}}
    augment: {augment}
    tasks:
      aff: {{target: {{type: affinity}}}}
    train: {{patch: {list(PATCH)}, iterations: 1, batch_size: 1, workers: 0}}
    """
    path = tmp_path / "r.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def problems(path: Path) -> list[str]:
    return [str(p) for p in check_data(load_recipe(path))[1]]


def recipe(source: dict) -> Recipe:
    return recipe_of({"a": source})


def recipe_of(sources: dict) -> Recipe:
    return Recipe.model_validate({
        "name": "t", "seed": 3, "data": {"sources": sources},
        "model": {"type": "rsunet", "widths": [4, 8]},
        "tasks": {"aff": {"target": {"type": "affinity"}}},
        "train": {"patch": list(PATCH), "iterations": 1, "batch_size": 1, "workers": 0},
    })


# ---------------------------------------------------------------- placement of companions


def test_labels_placed_at_another_offset_than_the_image_are_refused(tmp_path):
    """Labels of the same shape whose metadata puts them 2 sections and 10 pixels away from
    the image were read at the image's coordinates: training on shifted labels, silently."""
    image = np.random.default_rng(0).integers(0, 256, SHAPE, dtype=np.uint8)
    store = tmp_path / "a.zarr"
    write_volume(store, "image", image, voxel_size=(30, 6, 6), offset=(0, 0, 0))
    write_volume(store, "shifted", labels_of(), voxel_size=(30, 6, 6), offset=(2, 10, 10),
                 label=True)
    write_volume(store, "placed", labels_of(), voxel_size=(30, 6, 6), offset=(0, 0, 0),
                 label=True)
    path = recipe_file(tmp_path, f"{{image: {store}/image, labels: {store}/shifted}}")
    found = problems(path)
    assert len(found) == 1
    assert "data.sources.a.labels" in found[0] and "offset [2, 10, 10]" in found[0]
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2 and "offset [2, 10, 10]" in result.output
    assert "Traceback" not in result.output
    path = recipe_file(tmp_path, f"{{image: {store}/image, labels: {store}/placed}}")
    assert problems(path) == []


# ---------------------------------------------------------------- intensity


def test_a_signed_image_is_scaled_over_its_dtype_range(tmp_path):
    """int16's default scale began at 0: every negative value (the dark half of a signed
    FIB-SEM image) became 0, silently, in training and in inference alike."""
    assert default_intensity(np.dtype(np.int8)) == (-128.0, 127.0)
    rng = np.random.default_rng(1)
    raw = rng.integers(-2000, 2000, SHAPE, dtype=np.int16)
    image, labels = save(tmp_path, "image", raw), save(tmp_path, "labels", labels_of())
    assert problems(recipe_file(tmp_path, f"{{image: {image}, labels: {labels}}}")) == []
    source = open_sources(recipe({"image": image, "labels": labels}).data.sources)[0]
    np.testing.assert_allclose(source.normalise(raw), (raw + 32768.0) / 65535, atol=1e-6)
    assert len(np.unique(source.normalise(raw))) == len(np.unique(raw))  # nothing clipped
    given = {"image": image, "labels": labels, "intensity": {"low": -2000, "high": 2000}}
    scaled = f"{{image: {image}, labels: {labels}, intensity: {{low: -2000, high: 2000}}}}"
    assert problems(recipe_file(tmp_path, scaled)) == []
    batch = SampleMaker(recipe(given)).batch(0, 0, 0)
    assert batch["image"].min() < 0.01 and batch["image"].max() > 0.99


def test_float_image_with_a_given_unit_range_is_clipped_not_refused(tmp_path):
    """`intensity: {low: 0, high: 1}` on a float image reaching 1.5 passed validate, then
    stopped training at its first batch asking for the `intensity` the recipe gives."""
    rng = np.random.default_rng(3)
    image = save(tmp_path, "image", (rng.random(SHAPE) * 1.5).astype(np.float32))
    labels = save(tmp_path, "labels", labels_of())
    source = {"image": image, "labels": labels, "intensity": {"low": 0.0, "high": 1.0}}
    batch = SampleMaker(recipe(source)).batch(0, 0, 0)
    assert batch["image"].max() == 1.0
    with pytest.raises(UserError, match="outside \\[0, 1\\]"):  # without: refused as before
        SampleMaker(recipe({"image": image, "labels": labels})).batch(0, 0, 0)


def test_float_image_a_rounding_above_one_passes_validate_as_it_trains(tmp_path):
    """validate refused values above 1 by any amount; training allows float rounding."""
    image = np.full(SHAPE, 0.5, np.float32)
    image[0, 0, 0] = 1.0000001
    image_path, labels = save(tmp_path, "image", image), save(tmp_path, "labels", labels_of())
    assert problems(recipe_file(tmp_path, f"{{image: {image_path}, labels: {labels}}}")) == []


# ---------------------------------------------------------------- masks


def test_mask_whose_voxels_no_patch_can_be_centred_on_is_refused_by_validate(tmp_path):
    """Masked voxels only in the last 3 columns: a patch centred there leaves the volume, so
    the sampler finds nothing and training stopped at its first batch; validate said ok."""
    image = save(tmp_path, "image", np.zeros(SHAPE, np.uint8))
    labels = save(tmp_path, "labels", labels_of())
    edge = np.zeros(SHAPE, np.uint8)
    edge[..., -3:] = 1
    mask = save(tmp_path, "edge", edge)
    found = problems(recipe_file(tmp_path, f"{{image: {image}, labels: {labels}, "
                                 f"mask: {mask}}}"))
    assert len(found) == 1 and "data.sources.a.mask" in found[0]
    assert "centred" in found[0]
    opened = open_sources(recipe({"image": image, "labels": labels, "mask": mask}).data.sources)
    with pytest.raises(UserError, match="no acceptable patch"):  # what training met
        PatchSampler(opened, np.array([1.0])).draw(np.random.default_rng(0), PATCH, PATCH)
    # the first voxel a patch can be centred on is enough, for validate and the sampler
    one = np.zeros(SHAPE, bool)
    one[PATCH[0] // 2, PATCH[1] // 2, PATCH[2] // 2] = True
    mask = save(tmp_path, "one", one)
    assert problems(recipe_file(tmp_path, f"{{image: {image}, labels: {labels}, "
                                f"mask: {mask}}}")) == []
    opened = open_sources(recipe({"image": image, "labels": labels, "mask": mask}).data.sources)
    crop = PatchSampler(opened, np.array([1.0])).draw(np.random.default_rng(0), PATCH, PATCH)
    assert crop.corner == (0, 0, 0)


@pytest.mark.parametrize("dtype", [np.bool_, np.uint64, np.float32])
def test_masked_centres_are_uniform_over_the_voxels_a_patch_fits_around(tmp_path, dtype):
    """Centres land only on masked voxels a patch fits around, each about equally often,
    edge ones included, in a roi with an offset. A float mask's NaN is outside (it was
    inside: NaN != 0)."""
    image = save(tmp_path, "image", np.zeros(SHAPE, np.uint8))
    labels = save(tmp_path, "labels", labels_of())
    mask = np.full(SHAPE, np.nan if dtype == np.float32 else 0, dtype)
    mask[2:7, 5:30, 3:37] = 1
    roi = {"offset": [1, 2, 3], "shape": [7, 28, 34]}
    source = {"image": image, "labels": labels, "mask": save(tmp_path, "mask", mask),
              "roi": roi}
    opened = open_sources(recipe(source).data.sources)
    sampler, rng = PatchSampler(opened, np.array([1.0])), np.random.default_rng(4)
    counts = np.zeros(SHAPE, np.int64)
    for _ in range(DRAWS):
        corner = np.array(sampler.draw(rng, PATCH, PATCH).corner)
        counts[tuple(corner + np.array(PATCH) // 2)] += 1
    lo = np.array(roi["offset"]) + np.array(PATCH) // 2
    hi = lo + np.array(roi["shape"]) - np.array(PATCH)  # inclusive
    allowed = np.zeros(SHAPE, bool)
    allowed[lo[0]:hi[0] + 1, lo[1]:hi[1] + 1, lo[2]:hi[2] + 1] = True
    allowed &= (mask != 0) & ~np.isnan(mask.astype(np.float32))
    assert counts[~allowed].sum() == 0
    for axis in range(3):  # the extreme centres along every axis are drawn
        seen = np.nonzero(counts.sum(axis=tuple(a for a in range(3) if a != axis)))[0]
        want = np.nonzero(allowed.any(axis=tuple(a for a in range(3) if a != axis)))[0]
        assert (seen.min(), seen.max()) == (want.min(), want.max())
    # per z section, frequency proportional to its allowed voxels (chi-square-ish bound)
    per_z, expect = counts.sum(axis=(1, 2)), allowed.sum(axis=(1, 2)) / allowed.sum() * DRAWS
    used = expect > 0
    assert np.all(np.abs(per_z[used] - expect[used]) < 5 * np.sqrt(expect[used]) + 1)


def test_corners_cover_the_roi_edges_uniformly(tmp_path):
    """Without a mask every corner from the roi's first voxel to the last one that fits is
    drawn, about equally often."""
    image = save(tmp_path, "image", np.zeros(SHAPE, np.uint8))
    labels = save(tmp_path, "labels", labels_of())
    roi = {"offset": [1, 3, 5], "shape": [6, 20, 30]}
    opened = open_sources(recipe({"image": image, "labels": labels, "roi": roi}).data.sources)
    sampler, rng = PatchSampler(opened, mixture_weights(opened)), np.random.default_rng(5)
    corners = np.array([sampler.draw(rng, PATCH, PATCH).corner for _ in range(3000)])
    for axis in range(3):
        first = roi["offset"][axis]
        last = first + roi["shape"][axis] - PATCH[axis]
        hist = np.bincount(corners[:, axis] - first)
        assert corners[:, axis].min() == first and corners[:, axis].max() == last
        expect = 3000 / (last - first + 1)
        assert np.all(np.abs(hist - expect) < 5 * np.sqrt(expect))


# ---------------------------------------------------------------- mixture weights


def test_default_weight_counts_labels_lying_between_the_sampled_sections(tmp_path):
    """Labels in sections 30-39 of 100 fell between the 8 sections the estimate reads: the
    source weighed 0 and was never sampled, silently."""
    sparse = np.zeros((100, 16, 16), np.uint32)
    sparse[30:40] = 1
    sources = {
        "sparse": {"image": save(tmp_path, "i1", np.zeros(sparse.shape, np.uint8)),
                   "labels": save(tmp_path, "l1", sparse)},
        "dense": {"image": save(tmp_path, "i2", np.zeros((20, 16, 16), np.uint8)),
                  "labels": save(tmp_path, "l2", np.ones((20, 16, 16), np.uint32))},
    }
    opened = open_sources(recipe_of(sources).data.sources)
    np.testing.assert_allclose(mixture_weights(opened), [1 / 3, 2 / 3])
    empty = {"image": sources["dense"]["image"],
             "labels": save(tmp_path, "l3", np.zeros((20, 16, 16), np.uint32))}
    with pytest.raises(UserError, match="no labelled voxels"):
        mixture_weights(open_sources(recipe(empty).data.sources))


def test_default_weight_counts_only_labelled_voxels_inside_the_mask(tmp_path):
    """Losses count only inside the mask: a source labelled everywhere but masked to a
    quarter weighed as if all of it were trained on (the refusal for an empty mixture
    already spoke of labels "inside no mask")."""
    quarter = np.zeros((20, 16, 16), np.uint8)
    quarter[:, :8, :8] = 1
    sources = {
        "masked": {"image": save(tmp_path, "i1", np.zeros((20, 16, 16), np.uint8)),
                   "labels": save(tmp_path, "l1", np.ones((20, 16, 16), np.uint32)),
                   "mask": save(tmp_path, "m1", quarter)},
        "plain": {"image": save(tmp_path, "i2", np.zeros((10, 16, 16), np.uint8)),
                  "labels": save(tmp_path, "l2", np.ones((10, 16, 16), np.uint32))},
    }
    opened = open_sources(recipe_of(sources).data.sources)
    np.testing.assert_allclose(mixture_weights(opened), [1 / 3, 2 / 3])


def test_nan_in_a_float_mask_is_outside_for_targets_and_image_checks(tmp_path):
    """The targets' masks (what the losses count) and the image's NaN check took a float
    mask's NaN as inside (`!= 0`), as the sampler did before `emrun.io.masks`."""
    from emrun.data.targets import Affinity, Patch

    labels = np.ones((4, 8, 8), np.uint32)
    mask = np.ones((4, 8, 8), np.float32)
    mask[:, :, :4] = np.nan
    _, valid = Affinity(((0, 0, -1),), relabel=False)(Patch(labels=labels, mask=mask))
    assert not valid[..., :4].any() and valid[..., 5:].all()

    image = np.zeros(SHAPE, np.float32)
    image[:, :, :2] = np.nan  # where the mask has no value either
    float_mask = np.ones(SHAPE, np.float32)
    float_mask[:, :, :2] = np.nan
    source = {"image": save(tmp_path, "image", image), "labels": save(tmp_path, "labels",
              labels_of()), "mask": save(tmp_path, "mask", float_mask), "intensity":
              {"low": 0.0, "high": 1.0}}
    (opened,) = open_sources(recipe(source).data.sources)
    region = (slice(None), slice(None), slice(0, 4))
    normalised = opened.normalise(image[region], float_mask[region])
    assert (normalised[..., :2] == 0).all()
