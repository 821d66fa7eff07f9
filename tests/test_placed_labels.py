"""Labels (and masks) annotated in a part of a larger image, or over a larger region the
image is a cutout of, are read at their place in the image: patches come from where both
hold data, every voxel of a patch's labels is the label of that patch's image voxel, and
placements that cannot be honoured are refused in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_data_probe import PATCH, problems, recipe_file
from typer.testing import CliRunner

from emrun.cli import app
from emrun.data.checks import check_data
from emrun.data.sampler import PatchSampler
from emrun.data.sources import open_sources
from emrun.io.write import write_volume
from emrun.recipe import load_recipe

VOXEL = (30, 6, 6)
IMAGE = (12, 48, 56)


def coded(shape: tuple[int, ...], start: tuple[int, ...]) -> np.ndarray:
    """Ids that say where they lie in the image's voxels: z * 10^4 + y * 10^2 + x + 1 at
    image voxel (z, y, x), for an array whose first voxel is the image's ``start``."""
    z, y, x = np.meshgrid(*(np.arange(s, s + n) for s, n in zip(start, shape, strict=True)),
                          indexing="ij")
    return (z * 10_000 + y * 100 + x + 1).astype(np.uint32)


def store(tmp_path: Path, labels_shape: tuple[int, ...], labels_at: tuple[int, ...],
          mask_at: tuple[int, ...] | None = None) -> Path:
    """An image at offset (5, 100, 200) voxels and labels at ``labels_at`` in the image's
    voxels (negative: before its first voxel); the image's values also say where they are."""
    corner = (5, 100, 200)
    image = (coded(IMAGE, (0, 0, 0)) % 251).astype(np.uint8)
    path = tmp_path / "v.zarr"
    write_volume(path, "image", image, voxel_size=VOXEL, offset=corner)
    place = tuple(c + a for c, a in zip(corner, labels_at, strict=True))
    write_volume(path, "labels", coded(labels_shape, labels_at), voxel_size=VOXEL,
                 offset=place, label=True)
    if mask_at is not None:
        write_volume(path, "mask", np.ones((6, 20, 20), np.uint8), voxel_size=VOXEL,
                     offset=tuple(c + a for c, a in zip(corner, mask_at, strict=True)))
    return path


def source_text(path: Path, mask: bool = False, roi: str = "") -> str:
    extra = f", mask: {path}/mask" if mask else ""
    return f"{{image: {path}/image, labels: {path}/labels{extra}{roi}}}"


def crops(recipe_path: Path, draws: int = 60) -> list:
    loaded = load_recipe(recipe_path)
    sampler = PatchSampler(open_sources(loaded.recipe.data.sources), np.ones(1))
    rng = np.random.default_rng(0)
    return [sampler.draw(rng, PATCH, PATCH) for _ in range(draws)]


@pytest.mark.parametrize(("shape", "at"), [((8, 30, 36), (2, 10, 12)),  # inside the image
                                           ((16, 60, 70), (-2, -5, -7))])  # a larger region
def test_labels_are_read_at_their_place_and_patches_come_from_where_they_are(
        tmp_path, shape, at):
    path = store(tmp_path, shape, at)
    recipe_path = recipe_file(tmp_path, source_text(path))
    assert problems(recipe_path) == []
    inside = [max(a, 0) for a in at], [min(a + n, m) for a, n, m in zip(at, shape, IMAGE,
                                                                        strict=True)]
    image = (coded(IMAGE, (0, 0, 0)) % 251).astype(np.uint8)
    for crop in crops(recipe_path):
        begin = np.array(crop.corner)
        assert (begin >= inside[0]).all() and (begin + PATCH <= inside[1]).all()
        assert np.array_equal(crop.labels, coded(PATCH, crop.corner))
        box = tuple(slice(b, b + p) for b, p in zip(crop.corner, PATCH, strict=True))
        assert np.array_equal(crop.image, image[box])


def test_a_mask_of_another_part_cuts_the_box_to_where_both_lie(tmp_path):
    path = store(tmp_path, (8, 30, 36), (2, 10, 12), mask_at=(4, 20, 24))
    recipe_path = recipe_file(tmp_path, source_text(path, mask=True))
    assert problems(recipe_path) == []
    for crop in crops(recipe_path, 30):  # labels 2-9, 10-39, 12-47; mask 4-9, 20-39, 24-43
        assert crop.mask.all() and np.array_equal(crop.labels, coded(PATCH, crop.corner))
        assert crop.corner[0] >= 4 and crop.corner[1] >= 20 and crop.corner[2] >= 24
        assert crop.corner[1] + PATCH[1] <= 40 and crop.corner[2] + PATCH[2] <= 44


def test_validate_shows_the_labelled_part_and_trains(tmp_path):
    path = store(tmp_path, (8, 30, 36), (2, 10, 12))
    recipe_path = recipe_file(tmp_path, source_text(path))
    facts, found = check_data(load_recipe(recipe_path))
    assert found == [] and facts[0].sampled == (8, 30, 36)
    result = CliRunner().invoke(app, ["validate", str(recipe_path)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "12 x 48 x 56 (labelled 8 x 30 x 36)" in result.output
    result = CliRunner().invoke(app, ["train", str(recipe_path), "--run-dir",
                                      str(tmp_path / "run"), "--device", "cpu"])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(("shape", "at", "words"), [
    ((8, 30, 36), (6, 10, 12), "lies partly outside it"),  # ends past the image's z
    ((12, 48, 56), (1, 0, 0), "lies at offset"),  # the image's shape, shifted: a mistake
])
def test_labels_not_inside_nor_covering_the_image_are_refused(tmp_path, shape, at, words):
    path = store(tmp_path, shape, at)
    found = problems(recipe_file(tmp_path, source_text(path)))
    assert len(found) == 1 and "data.sources.a.labels" in found[0] and words in found[0]


def test_a_roi_outside_the_labelled_part_is_refused(tmp_path):
    path = store(tmp_path, (8, 30, 20), (2, 10, 12))
    roi = ", roi: {offset: [0, 0, 36], shape: [12, 48, 20]}"
    found = problems(recipe_file(tmp_path, source_text(path, roi=roi)))
    assert len(found) == 1 and "covers [2-9, 10-39, 12-31]" in found[0]
    assert "outside the roi [0-11, 0-47, 36-55]" in found[0]


def test_a_labelled_part_smaller_than_the_patch_is_refused(tmp_path):
    path = store(tmp_path, (8, 10, 36), (2, 10, 12))
    found = problems(recipe_file(tmp_path, source_text(path)))
    assert len(found) == 1 and "smaller than train.patch" in found[0]


def test_labels_of_another_shape_without_placement_are_refused_with_the_way_out(tmp_path):
    path = store(tmp_path, (8, 30, 36), (2, 10, 12))
    np.save(tmp_path / "l.npy", coded((8, 30, 36), (0, 0, 0)))
    found = problems(recipe_file(tmp_path, f"{{image: {path}/image, labels: {tmp_path}/l.npy}}"))
    assert len(found) == 1 and "needs metadata placing it" in found[0]


def test_a_mask_of_the_box_predicted_reads_0_around_it_and_one_short_of_it_is_not_placed(
        tmp_path):
    """`infer --roi` with a mask made for the ROI: read in the input's voxels, 0 outside its
    data (outside the mask), so blocks' context reads work; one that does not cover the box
    is left as it is, for the shape check to refuse."""
    from emrun.geometry import Roi
    from emrun.io import open_volume
    from emrun.io.window import Placed, placed_over

    write_volume(tmp_path / "v.zarr", "image", np.zeros((8, 20, 20), np.uint8),
                 voxel_size=(4, 4, 4), offset=(10, 10, 10))
    write_volume(tmp_path / "v.zarr", "mask", np.full((4, 6, 6), 3, np.uint8),
                 voxel_size=(4, 4, 4), offset=(12, 15, 15))
    image, mask = open_volume(f"{tmp_path}/v.zarr/image"), open_volume(f"{tmp_path}/v.zarr/mask")
    placed = placed_over(image, mask, Roi((2, 5, 5), (4, 6, 6)))
    assert isinstance(placed, Placed) and placed.shape == (8, 20, 20)
    read = placed.read(Roi((0, 0, 0), (8, 20, 20)))
    expected = np.zeros((8, 20, 20), np.uint8)
    expected[2:6, 5:11, 5:11] = 3
    assert np.array_equal(read, expected)
    assert placed_over(image, mask, Roi((2, 5, 5), (4, 7, 6))) is mask
