"""Probes of how training patches are drawn, against a reference computed here by brute force:
every corner reachable and drawn about uniformly (jointly over z, y, x, not only per axis),
masked centres uniform over the masked voxels a patch fits around, `min_labelled` keeping
exactly the corners whose core passes, image, labels, mask and semantic volumes of one draw
aligned voxel for voxel (offsets, other chunkings, labels and masks of a part of the image or
of a larger region), mixture proportions, and sources exactly the patch size or smaller.

Volumes hold their own coordinates (image: z * 4096 + y * 64 + x; labels that plus one), so a
crop's values say where it was read from. Bounds are loose, the seeds fixed: they never flake.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from emrun.data.checks import check_data
from emrun.data.sampler import BLOCK, MaskIndex, PatchSampler
from emrun.data.samples import SampleMaker
from emrun.data.sources import mixture_weights, open_sources
from emrun.errors import UserError
from emrun.geometry import Roi
from emrun.io.write import write_volume
from emrun.recipe import Recipe, load_recipe
from emrun.recipe.errors import RecipeError

VOXEL = (30, 6, 6)
PATCH = (2, 4, 4)


def code(shape: tuple[int, ...], start: tuple[int, ...] = (0, 0, 0)) -> np.ndarray:
    """z * 4096 + y * 64 + x at image voxel (z, y, x), for an array whose first voxel is the
    image's ``start`` (int64; z < 8, y, x < 64 fit in uint16)."""
    z, y, x = np.meshgrid(*(np.arange(s, s + n) for s, n in zip(start, shape, strict=True)),
                          indexing="ij")
    return z * 4096 + y * 64 + x


def recipe_dict(sources: dict, patch: tuple[int, int, int] = PATCH) -> dict:
    return {
        "name": "t", "seed": 3, "data": {"sources": sources},
        "model": {"type": "rsunet", "widths": [4, 8]},
        "tasks": {"aff": {"target": {"type": "affinity"}}},
        "train": {"patch": list(patch), "iterations": 1, "batch_size": 1, "workers": 0},
    }


def recipe_of(sources: dict, patch: tuple[int, int, int] = PATCH) -> Recipe:
    return Recipe.model_validate(recipe_dict(sources, patch))


def validate(tmp_path: Path, sources: dict, patch: tuple[int, int, int] = PATCH) -> list[str]:
    """What `emrun validate` finds in the volumes (the recipe as a JSON-in-YAML file)."""
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps(recipe_dict(sources, patch)), encoding="utf-8")
    return [str(p) for p in check_data(load_recipe(path))[1]]


def coded_store(tmp_path: Path, shape: tuple[int, int, int], name: str = "v",
                chunks: tuple[int, int, int] | None = None) -> Path:
    """A zarr store with an image and labels that hold their own coordinates."""
    store = tmp_path / f"{name}.zarr"
    write_volume(store, "image", code(shape).astype(np.uint16), voxel_size=VOXEL, label=False,
                 offset=(0, 0, 0), chunks=chunks)
    write_volume(store, "labels", (code(shape) + 1).astype(np.uint32), voxel_size=VOXEL,
                 offset=(0, 0, 0), label=True, chunks=chunks)
    return store


def opened(sources: dict, patch: tuple[int, int, int] = PATCH) -> list:
    return open_sources(recipe_of(sources, patch).data.sources)


def assert_coded(crop, shape=PATCH) -> None:
    """The crop's image and labels are those of the voxels at its corner."""
    want = code(shape, crop.corner)
    assert crop.image.shape == tuple(shape)
    assert np.array_equal(crop.image, want)
    assert np.array_equal(crop.labels, want + 1)


def assert_uniform(counts: np.ndarray, draws: int) -> None:
    """Every cell drawn, each within 5 sigma of draws / cells, and a chi-square within
    dof + 6 sqrt(2 dof): loose enough never to flake, tight enough to see a cell drawn at
    half or twice its share."""
    cells = counts.size
    expect = draws / cells
    assert counts.sum() == draws
    assert counts.min() > 0, f"{int((counts == 0).sum())} of {cells} positions never drawn"
    assert np.all(np.abs(counts - expect) < 5 * np.sqrt(expect) + 1), (counts.min(),
                                                                        counts.max(), expect)
    chi2 = float(((counts - expect) ** 2 / expect).sum())
    assert chi2 < (cells - 1) + 6 * np.sqrt(2 * (cells - 1)), chi2


# ---------------------------------------------------------------- unmasked corners


def test_every_corner_of_an_offset_roi_is_drawn_uniformly_jointly_and_aligned(tmp_path):
    """Over a roi with an offset (and chunks that cut the patch), each of the 3 x 3 x 4
    corners at which the patch fits is drawn about equally often, no other; every crop's
    image and labels are the voxels at its corner."""
    store = coded_store(tmp_path, (8, 20, 24), chunks=(3, 7, 5))
    roi = {"offset": [1, 3, 5], "shape": [4, 6, 7]}
    (source,) = opened({"a": {"image": f"{store}/image", "labels": f"{store}/labels",
                              "roi": roi}})
    assert source.box == Roi((1, 3, 5), (4, 6, 7))
    sampler, rng = PatchSampler([source], np.array([1.0])), np.random.default_rng(11)
    room = np.array(roi["shape"]) - PATCH + 1
    counts = np.zeros(room, np.int64)
    draws = 25 * int(np.prod(room))
    for _ in range(draws):
        crop = sampler.draw(rng, PATCH, PATCH)
        assert_coded(crop)
        rel = np.array(crop.corner) - roi["offset"]
        assert (rel >= 0).all() and (rel < room).all(), crop.corner
        counts[tuple(rel)] += 1
    assert_uniform(counts, draws)


def test_a_source_exactly_the_patch_size_gives_its_one_patch(tmp_path):
    """Room 0 along every axis: the one corner, its voxels; with a mask that selects only
    the centre voxel, the same."""
    store = coded_store(tmp_path, (5, 7, 9))
    patch = (5, 7, 9)
    mask = np.zeros(patch, np.uint8)
    mask[2, 3, 4] = 1
    write_volume(store, "mask", mask, voxel_size=VOXEL, offset=(0, 0, 0), label=False)
    plain = {"image": f"{store}/image", "labels": f"{store}/labels"}
    for spec in (plain, {**plain, "mask": f"{store}/mask"}):
        (source,) = opened({"a": spec}, patch)
        sampler, rng = PatchSampler([source], np.array([1.0])), np.random.default_rng(0)
        for _ in range(5):
            crop = sampler.draw(rng, patch, patch)
            assert crop.corner == (0, 0, 0)
            assert_coded(crop, patch)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_a_source_one_voxel_short_of_the_patch_is_refused_naming_it(tmp_path, axis):
    """One voxel short along one axis: one UserError naming the source, from the sampler and
    from validate (never a padded or clipped crop)."""
    shape = [4, 8, 8]
    shape[axis] -= 1
    store = coded_store(tmp_path, tuple(shape))
    spec = {"image": f"{store}/image", "labels": f"{store}/labels"}
    patch = (4, 8, 8)
    (source,) = opened({"short_one": spec}, patch)
    with pytest.raises(UserError, match="short_one") as caught:
        PatchSampler([source], np.array([1.0])).draw(np.random.default_rng(0), patch, patch)
    assert str(list(shape)) in str(caught.value)
    problems = validate(tmp_path, {"short_one": spec}, patch)
    assert len(problems) == 1 and "short_one" in str(problems[0]), problems
    # a roi one voxel short, over a volume large enough: the recipe itself is refused
    big = coded_store(tmp_path, (6, 10, 10), name="big")
    roi = {"offset": [1, 1, 1], "shape": shape}
    spec = {"image": f"{big}/image", "labels": f"{big}/labels", "roi": roi}
    with pytest.raises(RecipeError, match=r"data\.sources\.short_roi\.roi: .* smaller than"):
        validate(tmp_path, {"short_roi": spec}, patch)
    source = replace(opened({"a": {"image": f"{big}/image", "labels": f"{big}/labels"}},
                            patch)[0], name="short_roi", box=Roi((1, 1, 1), tuple(shape)))
    with pytest.raises(UserError, match="short_roi"):  # the sampler's own guard
        PatchSampler([source], np.array([1.0])).draw(np.random.default_rng(0), patch, patch)


# ---------------------------------------------------------------- masks


def masked_counts(sampler: PatchSampler, draws: int, shape: tuple[int, ...], seed: int,
                  patch=PATCH) -> np.ndarray:
    rng = np.random.default_rng(seed)
    counts = np.zeros(shape, np.int64)
    half = np.array(patch) // 2
    for _ in range(draws):
        crop = sampler.draw(rng, patch, patch)
        assert_coded(crop, patch)
        counts[tuple(np.array(crop.corner) + half)] += 1
    return counts


def test_masked_centres_are_uniform_over_every_fitting_masked_voxel_across_blocks(tmp_path):
    """A sparse mask over a box several 4x32x32 blocks wide, not aligned to them (a roi with an
    offset, last blocks cut short): each masked voxel a patch fits around is a centre about
    equally often (jointly, voxel by voxel), no other voxel ever."""
    shape = (10, 40, 60)
    store = coded_store(tmp_path, shape, chunks=(3, 16, 16))
    rng = np.random.default_rng(7)
    mask = (rng.random(shape) < 0.003).astype(np.uint8)
    mask[5, 20, 33] = 1  # one lone voxel in its own block column
    write_volume(store, "mask", mask, voxel_size=VOXEL, offset=(0, 0, 0), label=False)
    roi = {"offset": [1, 3, 2], "shape": [9, 35, 55]}
    (source,) = opened({"a": {"image": f"{store}/image", "labels": f"{store}/labels",
                              "mask": f"{store}/mask", "roi": roi}})
    allowed = np.zeros(shape, bool)
    lo = np.array(roi["offset"]) + np.array(PATCH) // 2
    hi = np.array(roi["offset"]) + roi["shape"] - np.array(PATCH) + np.array(PATCH) // 2
    allowed[lo[0]:hi[0] + 1, lo[1]:hi[1] + 1, lo[2]:hi[2] + 1] = True
    allowed &= mask != 0
    cells = int(allowed.sum())
    assert 20 < cells < 80, cells
    draws = 25 * cells
    counts = masked_counts(PatchSampler([source], np.array([1.0])), draws, shape, seed=8)
    assert counts[~allowed].sum() == 0
    assert_uniform(counts[allowed], draws)


def test_a_float_mask_nan_is_never_a_centre_nor_counted_apart_from_zero(tmp_path):
    """A float mask whose unmasked voxels are NaN (a registered mask), in blocks that also
    hold masked voxels: centres land only on masked voxels. (The blocks' counts and the pick
    inside a block must use one rule, `inside`.)"""
    shape = (8, 16, 16)
    store = coded_store(tmp_path, shape)
    mask = np.full(shape, np.nan, np.float32)
    mask[1::2] = 1.0  # odd sections in, even ones NaN: every block holds both
    write_volume(store, "mask", mask, voxel_size=VOXEL, offset=(0, 0, 0), label=False)
    (source,) = opened({"a": {"image": f"{store}/image", "labels": f"{store}/labels",
                              "mask": f"{store}/mask"}})
    index = MaskIndex(source.mask, source.box)
    assert index.cumulative[-1] == 4 * 16 * 16  # the counts: right
    counts = masked_counts(PatchSampler([source], np.array([1.0])), 400, shape, seed=1)
    drawn_on_nan = int(counts[0::2].sum())
    assert drawn_on_nan == 0, f"{drawn_on_nan} of 400 centres on NaN (outside) voxels"



def test_mask_index_counts_are_the_masked_voxels_of_each_block(tmp_path):
    """The coarse index against a count made here: per 4x32x32 block of a box with an offset,
    the number of masked voxels, blocks without any left out."""
    shape = (11, 70, 45)
    store = tmp_path / "m.zarr"
    rng = np.random.default_rng(3)
    mask = (rng.random(shape) < 0.002).astype(np.uint8)
    write_volume(store, "mask", mask, voxel_size=VOXEL, offset=(0, 0, 0), label=False,
                 chunks=(5, 9, 13))
    from emrun.io import open_volume

    box = Roi((1, 2, 3), (9, 66, 40))
    index = MaskIndex(open_volume(f"{store}/mask"), box)
    want = {}
    inner = mask[1:10, 2:68, 3:43]
    for gz in range(0, 9, BLOCK[0]):
        for gy in range(0, 66, BLOCK[1]):
            for gx in range(0, 40, BLOCK[2]):
                n = int(inner[gz:gz + 4, gy:gy + 32, gx:gx + 32].sum())
                if n:
                    want[(gz // 4, gy // 32, gx // 32)] = n
    got = dict(zip(map(tuple, index.blocks.tolist()),
                   np.diff(index.cumulative, prepend=0).tolist(), strict=True))
    assert got == want


# ---------------------------------------------------------------- min_labelled


def test_min_labelled_keeps_exactly_the_corners_whose_core_passes_each_equally(tmp_path):
    """Labels present in a pattern; with `min_labelled` 0.5 and a read larger than the output
    (augmentation), the corners drawn are exactly those whose centre (output-sized) part is at
    least half labelled, each about equally often (redrawing keeps the draw uniform)."""
    shape = (5, 10, 10)
    store = coded_store(tmp_path, shape)
    labels = code(shape) + 1
    labels[:, :, 5:] = 0  # x >= 5 unlabelled
    labels[3:, :5] = 0  # and sections 3 on, where y < 5
    write_volume(store, "partial", labels.astype(np.uint32), voxel_size=VOXEL,
                 offset=(0, 0, 0), label=True)
    spec = {"image": f"{store}/image", "labels": f"{store}/partial", "min_labelled": 0.5}
    (source,) = opened({"a": spec})
    in_shape, out_shape = (4, 6, 6), (2, 4, 4)
    passing = np.zeros(np.array(shape) - in_shape + 1, bool)
    for corner in np.ndindex(*passing.shape):
        core = labels[tuple(slice(c + (i - o) // 2, c + (i - o) // 2 + o)
                            for c, i, o in zip(corner, in_shape, out_shape, strict=True))]
        passing[corner] = np.count_nonzero(core) >= 0.5 * core.size
    assert 0 < passing.sum() < passing.size
    sampler, rng = PatchSampler([source], np.array([1.0])), np.random.default_rng(2)
    counts = np.zeros(passing.shape, np.int64)
    draws = 25 * int(passing.sum())
    for _ in range(draws):
        crop = sampler.draw(rng, in_shape, out_shape)
        assert np.array_equal(crop.image, code(in_shape, crop.corner))
        counts[crop.corner] += 1
    assert counts[~passing].sum() == 0
    assert_uniform(counts[passing], draws)


# ---------------------------------------------------------------- alignment


@pytest.mark.parametrize(("labels_shape", "labels_at", "mask_shape", "mask_at"), [
    ((6, 30, 40), (1, 5, 9), (8, 40, 34), (0, 2, 3)),  # labels and mask of parts
    ((10, 60, 64), (-1, -3, -2), (8, 40, 34), (0, 2, 3)),  # labels of a larger region
    ((6, 30, 40), (1, 5, 9), (10, 52, 62), (-1, -2, -3)),  # a mask of a larger region
])
def test_image_labels_mask_and_semantic_are_aligned_voxel_for_voxel(
        tmp_path, labels_shape, labels_at, mask_shape, mask_at):
    """An image at an offset, labels and a semantic volume placed at another one and of
    another shape, a mask of another part, every volume chunked differently: each voxel of
    every array of a crop is the value at the crop's image voxel, and crops come only from
    where labels and mask both hold data."""
    image_shape, corner = (8, 48, 56), (5, 100, 200)
    store = tmp_path / "v.zarr"
    write_volume(store, "image", code(image_shape).astype(np.uint16), voxel_size=VOXEL, label=False,
                 offset=corner, chunks=(3, 7, 11))

    def placed(at: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(c + a for c, a in zip(corner, at, strict=True))

    write_volume(store, "labels", (code(labels_shape, labels_at) + 1).astype(np.uint32),
                 voxel_size=VOXEL, offset=placed(labels_at), label=True, chunks=(2, 13, 5))
    write_volume(store, "mito", (code(labels_shape, labels_at) % 7 + 1).astype(np.uint32),
                 voxel_size=VOXEL, offset=placed(labels_at), label=True, chunks=(4, 4, 17))
    mask = ((code(mask_shape, mask_at) % 5) != 0).astype(np.uint8)
    write_volume(store, "mask", mask, voxel_size=VOXEL, offset=placed(mask_at),
                 label=False, chunks=(8, 8, 8))
    spec = {"image": f"{store}/image", "labels": f"{store}/labels", "mask": f"{store}/mask",
            "semantic": {"mito": f"{store}/mito"}}
    assert validate(tmp_path, {"a": spec}) == []
    (source,) = opened({"a": spec})
    begin = np.maximum(np.maximum(labels_at, 0), np.maximum(mask_at, 0))
    end = np.minimum(np.minimum(np.add(labels_at, labels_shape), image_shape),
                     np.minimum(np.add(mask_at, mask_shape), image_shape))
    assert source.box == Roi(tuple(begin), tuple(end - begin))
    sampler, rng = PatchSampler([source], np.array([1.0])), np.random.default_rng(5)
    half = np.array(PATCH) // 2
    for _ in range(100):
        crop = sampler.draw(rng, PATCH, PATCH)
        at = np.array(crop.corner)
        assert (at >= begin).all() and (at + PATCH <= end).all(), crop.corner
        want = code(PATCH, crop.corner)
        assert np.array_equal(crop.image, want)
        assert np.array_equal(crop.labels, want + 1)
        assert np.array_equal(crop.semantic["mito"], want % 7 + 1)
        assert np.array_equal(crop.mask, (want % 5 != 0).astype(np.uint8))
        assert crop.mask[tuple(half)] == 1  # centred on a masked voxel


# ---------------------------------------------------------------- mixture


def test_mixture_proportions_follow_recipe_weights_of_three_sources(tmp_path):
    """Weights 1, 2, 5: picks and draws in proportions 1/8, 2/8, 5/8, each within 5
    sigma."""
    sources, stores = {}, {}
    for i, (name, weight) in enumerate((("a", 1.0), ("b", 2.0), ("c", 5.0))):
        stores[name] = coded_store(tmp_path, (4 + i, 8, 8), name=name)
        sources[name] = {"image": f"{stores[name]}/image", "labels": f"{stores[name]}/labels",
                         "weight": weight}
    found = opened(sources)
    weights = mixture_weights(found)
    np.testing.assert_allclose(weights, [1 / 8, 2 / 8, 5 / 8])
    sampler, rng = PatchSampler(found, weights), np.random.default_rng(9)
    for draws, draw in ((4000, lambda: sampler.pick(rng).name),
                        (400, lambda: sampler.draw(rng, PATCH, PATCH).source)):
        names = [draw() for _ in range(draws)]
        for name, p in zip("abc", weights, strict=True):
            n = names.count(name)
            assert abs(n - p * draws) < 5 * np.sqrt(draws * p * (1 - p)), (name, n, p * draws)


def test_a_source_without_labelled_voxels_weighs_0_and_is_never_drawn(tmp_path):
    """Default weights: a source whose labels are all 0 weighs 0 and is never drawn, the
    others in proportion to their labelled voxels; a recipe weight of 0, or weights given to
    some sources only, are refused."""
    full = coded_store(tmp_path, (4, 8, 8), name="full")
    half = coded_store(tmp_path, (4, 8, 16), name="half")
    labels = code((4, 8, 16)) + 1
    labels[:, 4:] = 0  # half labelled: 256 voxels, as many as `full`
    write_volume(half, "half", labels.astype(np.uint32), voxel_size=VOXEL, offset=(0, 0, 0),
                 label=True)
    write_volume(full, "empty", np.zeros((4, 8, 8), np.uint32), voxel_size=VOXEL,
                 offset=(0, 0, 0), label=True)
    found = opened({"full": {"image": f"{full}/image", "labels": f"{full}/labels"},
                    "none": {"image": f"{full}/image", "labels": f"{full}/empty"},
                    "half": {"image": f"{half}/image", "labels": f"{half}/half"}})
    weights = mixture_weights(found)
    np.testing.assert_allclose(weights, [0.5, 0.0, 0.5])
    sampler, rng = PatchSampler(found, weights), np.random.default_rng(4)
    names = [sampler.pick(rng).name for _ in range(3000)]
    assert names.count("none") == 0
    assert abs(names.count("full") - 1500) < 5 * np.sqrt(750)
    with pytest.raises(ValidationError, match="weight"):
        recipe_of({"a": {"image": f"{full}/image", "labels": f"{full}/labels", "weight": 0}})
    # a recipe weight beside a default one (1.0 against a voxel count) is refused at load
    with pytest.raises(RecipeError, match="every source or to none"):
        validate(tmp_path, {"full": {"image": f"{full}/image", "labels": f"{full}/labels",
                                     "weight": 1.0},
                            "half": {"image": f"{half}/image", "labels": f"{half}/half"}})


def test_a_mask_of_ones_samples_whenever_the_unmasked_source_does(tmp_path):
    """A mask that lets every voxel in changes nothing: a patch nearly the source's size is
    drawn as without the mask (validate passes both). Rejecting centres a patch does not fit
    around makes each try succeed with probability (fitting centres) / (masked voxels): here
    25 / 12800, and `MAX_TRIES` 500 tries all fail about 38% of the time: training stops at
    its first batches with "no acceptable patch", though validate said ok."""
    shape, patch = (8, 40, 40), (8, 36, 36)
    store = coded_store(tmp_path, shape)
    write_volume(store, "ones", np.ones(shape, np.uint8), voxel_size=VOXEL, offset=(0, 0, 0),
                 label=False)
    plain = {"image": f"{store}/image", "labels": f"{store}/labels"}
    masked = {**plain, "mask": f"{store}/ones"}
    assert validate(tmp_path, {"a": masked}, patch) == []
    for spec in (plain, masked):
        (source,) = opened({"a": spec}, patch)
        sampler, rng = PatchSampler([source], np.array([1.0])), np.random.default_rng(0)
        failed = 0
        for _ in range(8):
            try:
                sampler.draw(rng, patch, patch)
            except UserError:
                failed += 1
        assert failed == 0, f"{failed} of 8 draws found no acceptable patch"


def test_a_mask_validate_accepts_feeds_training_with_its_augmentations(tmp_path):
    """The only masked voxel sits where a train.patch [8, 32, 32] fits around it, 16 voxels
    from the y and x edges; a warp (p 1) reads up to [8, 66, 66], which does not fit
    around it. Validate said ok, and training's samples stopped with "no acceptable
    patch": now validate names the mask, and with the voxel where the largest read fits,
    says ok and every sample is made."""
    shape, patch = (10, 120, 120), (8, 32, 32)
    store = coded_store(tmp_path, shape)
    for name, where in (("edge", (5, 16, 16)), ("middle", (5, 60, 60))):
        mask = np.zeros(shape, np.uint8)
        mask[where] = 1
        write_volume(store, name, mask, voxel_size=VOXEL, offset=(0, 0, 0), label=False)
    for name in ("edge", "middle"):
        sources = {"a": {"image": f"{store}/image", "labels": f"{store}/labels",
                         "mask": f"{store}/{name}"}}
        text = recipe_dict(sources, patch)
        text["augment"] = [{"type": "warp", "p": 1.0}]
        path = tmp_path / f"{name}.yaml"
        path.write_text(json.dumps(text), encoding="utf-8")
        loaded = load_recipe(path)
        problems = check_data(loaded)[1]
        if name == "edge":
            assert [p.path for p in problems] == [("data", "sources", "a", "mask")]
            assert "selects no voxel anywhere that a crop of [8, 66, 66]" in problems[0].message
            continue
        assert problems == []
        maker = SampleMaker(loaded.recipe, keep_memory=False)
        for seed in range(10):
            maker.sample(np.random.default_rng(seed))
