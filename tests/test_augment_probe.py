"""Probing the augmentation stack at its edges: box density and counts, a one_of part's
shape check, extreme shapes and magnitudes, reads that must hold every sampled position,
and the blur against scipy where its kernel is longer than the section."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pydantic import TypeAdapter
from scipy import ndimage

import emrun.data.augment.photometric as photometric
from emrun.data.augment import Augmentation, Context, Pipeline, Sample, Step
from emrun.errors import UserError
from emrun.recipe.augment import (
    BlurrySection,
    Box,
    ContrastCompression,
    FlipRotate,
    Grayscale,
    LostSection,
    Misalign,
    MisalignMissing,
    MissingSection,
    Noise,
    Warp,
)
from emrun.recipe.recipe import AugmentSpec
from emrun.registry import augmentations

SPECS = TypeAdapter(list[AugmentSpec])


def box_op(spec: Box, shape, seed: int = 0) -> photometric.BoxOp:
    step = augmentations.build(spec).plan(np.random.default_rng(seed), shape, Context())
    return step.apply


def random_sample(shape, rng: np.random.Generator) -> Sample:
    return Sample(rng.random(shape, dtype=np.float32),
                  rng.integers(1, 50, shape).astype(np.uint64) + np.uint64(2**62),
                  (rng.random(shape) > 0.2).astype(np.uint8),
                  {"m": rng.integers(0, 3, shape).astype(np.uint32)})


# -- box: the covered fraction is the density ------------------------------------------------


@pytest.mark.parametrize("size", [(5, 25), (20, 32)])
def test_box_density_is_not_overshot_by_boxes_large_against_the_patch(size):
    """Adding boxes until their volume passes the target always kept the box that crossed
    it: with boxes of a good part of a (4, 32, 32) patch, density 0.3 covered 0.36-0.40."""
    spec = Box(density=0.3, size=size, z_size=(1, 5))
    covered = [box_op(spec, (4, 32, 32), seed).coverage().mean() for seed in range(300)]
    assert abs(np.mean(covered) - 0.3) < 0.03, np.mean(covered)


def test_box_density_is_reached_with_tiny_boxes_on_a_large_patch():
    """A cap of 20,000 boxes stopped one-voxel boxes at 0.14 of a (8, 128, 128) patch for
    density 0.3, silently (47,000 are needed; they are painted by index)."""
    shape = (8, 128, 128)
    op = box_op(Box(density=0.3, size=(1, 1), z_size=(1, 1), modes=["fill"]), shape)
    covered = op.coverage()
    assert abs(covered.mean() - 0.3) < 0.01
    image = np.full(shape, 2.0, np.float32)  # fill values are in [0, 1]: every box shows
    out = op.transform(image)
    assert np.array_equal(out != 1.0, covered)  # clipped: uncovered voxels read 1


def test_box_count_beyond_the_cap_is_refused(monkeypatch):
    monkeypatch.setattr(photometric, "MAX_BOXES", 1000)
    with pytest.raises(UserError, match="more than 1,000 boxes"):
        box_op(Box(density=0.9, size=(1, 2), z_size=(1, 1)), (4, 32, 32))
    assert len(box_op(Box(density=0.3, size=(5, 25)), (4, 32, 32)).boxes) < 1000


def test_box_density_zero_adds_nothing_and_one_voxel_patches_work():
    """A one-voxel patch was always covered (the first box passed any target)."""
    assert len(box_op(Box(density=0.0), (3, 30, 30)).boxes) == 0
    hits = [box_op(Box(density=0.5, size=(1, 1), z_size=(1, 1)), (1, 1, 1), s).coverage()[0, 0, 0]
            for s in range(1000)]
    assert abs(np.mean(hits) - 0.5) < 0.05


def test_box_paint_paths_agree(monkeypatch):
    """Few boxes are painted by slices, many by each voxel's last box: same boxes, same
    result (fill and blur exactly; noise on the same voxels), in chunks of any size."""
    monkeypatch.setattr(photometric, "BOX_PAINT_CHUNK", 50)
    shape = (5, 40, 40)
    op = box_op(Box(density=0.8, size=(1, 6), z_size=(1, 3), modes=["fill", "noise", "blur"]),
                shape, seed=3)
    assert len(op.boxes) > 100 and set(op.kinds.tolist()) == {0, 1, 2}
    by_loop = photometric._winners_by_loop(op.boxes, shape)
    assert np.array_equal(by_loop, photometric._winners_by_index(op.boxes, shape))
    image = np.random.default_rng(0).random(shape, dtype=np.float32)
    slices, winners = image.copy(), image.copy()
    op._paint_slices(image, slices)
    op._paint_winners(image, winners)
    kind = np.where(by_loop >= 0, op.kinds[by_loop], -1)
    exact = kind != photometric.BOX_NOISE
    assert np.array_equal(slices[exact], winners[exact])
    assert np.array_equal(slices[kind == -1], image[kind == -1])
    noisy = kind == photometric.BOX_NOISE
    assert np.all(slices[noisy] != image[noisy]) and np.all(winners[noisy] != image[noisy])
    blurred = photometric.blur_sections(image, op.blur_sigma)
    assert np.allclose(winners[kind == photometric.BOX_BLUR], blurred[kind == photometric.BOX_BLUR])


# -- one_of: the chosen part is checked against its own shape --------------------------------


class _Crops(Augmentation):
    """A faulty plugin: returns one row fewer than it was planned for."""

    def plan(self, rng, out_shape, context):
        def crop(a):
            return a[:, :-1]

        return Step("crops", out_shape, lambda s: s.map_geometric(crop, crop))


def test_one_of_names_an_alternative_that_returns_the_wrong_shape():
    pipeline = Pipeline(SPECS.validate_python([{"type": "one_of", "of": [{"type": "noise"}]}]))
    pipeline.augmentations[0].alternatives = [_Crops(FlipRotate())]
    steps, in_shape = pipeline.prepare(np.random.default_rng(0), (2, 8, 8))
    with pytest.raises(UserError, match=r"'crops' returned an image of .*\(2, 8, 8\)"):
        Pipeline.apply(steps, random_sample(in_shape, np.random.default_rng(1)))


# -- extremes: one-voxel axes, huge magnitudes -----------------------------------------------

EXTREME = [
    FlipRotate(), FlipRotate(isotropic=True), Warp(),
    Warp(rot_max=180, shear_max=1, scale=(0.3, 3), stretch_max=0.5, twist_max=180),
    Misalign(displacement=(0, 0)), Misalign(displacement=(0, 30), interp=True),
    MisalignMissing(displacement=(0, 30)), LostSection(max_sections=16),
    Grayscale(contrast=10, brightness=10, gamma=4, partial=True),
    MissingSection(max_sections=1000, partial=True, fill="random"),
    MissingSection(consecutive=True, max_sections=1000, value=1.0),
    BlurrySection(max_sections=1000, sigma_max=100, partial=True),
    Box(density=1, size=(1, 10_000), z_size=(1, 10_000), modes=["fill", "noise", "blur"]),
    Noise(sigma_max=1, poisson=True), Noise(sigma_max=0, poisson=True),
    ContrastCompression(factor=(0.001, 100)),
]


@pytest.mark.parametrize("spec", EXTREME, ids=lambda s: s.type)
def test_extreme_shapes_and_magnitudes(spec):
    """Exactly the shape asked for, float32 in [0, 1] without NaN, only ids that were read,
    labels/mask/semantic never changed by a photometric step (the same objects)."""
    rng = np.random.default_rng(0)
    aug = augmentations.build(spec)
    geometric = spec.type in ("flip_rotate", "warp", "misalign", "misalign_missing",
                              "lost_section")
    for shape in [(1, 1, 1), (2, 1, 1), (3, 1, 5), (3, 4, 1), (5, 7, 9)]:
        if spec.type.startswith("misalign") and shape[0] < (2 if spec.type == "misalign" else 3):
            continue
        for seed in range(4):
            step = aug.plan(np.random.default_rng(seed), shape, Context((30.0, 6.0, 6.0)))
            sample = random_sample(step.in_shape, rng)
            out = step.apply(sample)
            for array in (out.image, out.labels, out.mask, out.semantic["m"]):
                assert array.shape == shape, (shape, seed)
            assert out.image.dtype == np.float32
            assert np.isfinite(out.image).all()
            assert out.image.min() >= 0 and out.image.max() <= 1
            assert set(np.unique(out.labels)) <= set(np.unique(sample.labels))
            if not geometric:
                assert out.labels is sample.labels and out.mask is sample.mask
                assert out.semantic["m"] is sample.semantic["m"]


def test_warp_samples_only_inside_what_was_read():
    """Every output pixel's source position lies at least MARGIN pixels inside the read
    input, even for the wildest warp: the border padding of grid_sample and the nearest
    index's clip never decide a value."""
    spec = Warp(rot_max=180, shear_max=1, scale=(0.2, 3), stretch_max=0.5, twist_max=180)
    aug = augmentations.build(spec)
    closest = math.inf
    for shape in [(1, 1, 1), (2, 1, 300), (3, 7, 5), (2, 64, 64)]:
        for seed in range(60):
            warp = aug.plan(np.random.default_rng(seed), shape, Context()).apply
            u, v = (a.astype(np.float64) for a in warp.base())
            in_h, in_w = warp.in_yx
            for m in warp.matrices.astype(np.float64):
                x = m[0, 0] * u + m[0, 1] * v + (in_w - 1) / 2
                y = m[1, 0] * u + m[1, 1] * v + (in_h - 1) / 2
                closest = min(closest, x.min(), y.min(), in_w - 1 - x.max(), in_h - 1 - y.max())
    assert closest >= 1 - 1e-4


@pytest.mark.parametrize("voxel", [(30.0, 6.0, 6.0), (8.0, 2.0, 2.0), None])
def test_largest_input_bounds_extreme_chains(voxel):
    """What checks hold the sources to must bound every read, for chains that transpose
    before and after a warp, fine voxels scaling a misalignment up, one_of and compose."""
    stacks = [
        [{"type": "misalign", "displacement": [0, 30], "voxel_reference": 8},
         {"type": "flip_rotate", "isotropic": True}],
        [{"type": "flip_rotate", "isotropic": True},
         {"type": "warp", "rot_max": 180, "shear_max": 1, "scale": [0.3, 3],
          "stretch_max": 0.5, "twist_max": 180},
         {"type": "flip_rotate", "isotropic": True}],
        [{"type": "lost_section", "max_sections": 16}, {"type": "flip_rotate"},
         {"type": "misalign_missing", "displacement": [10, 20], "voxel_reference": 4}],
        [{"type": "one_of", "of": [{"type": "warp", "rot_max": 90},
                                   {"type": "lost_section", "max_sections": 5}]},
         {"type": "compose", "of": [{"type": "misalign"}, {"type": "warp"}]}],
    ]
    context = Context(voxel)
    rng = np.random.default_rng(1)
    for stack in stacks:
        pipeline = Pipeline(SPECS.validate_python(stack))
        for out in [(5, 17, 40), (20, 64, 64)]:
            largest = pipeline.largest_input(out, context)
            for _ in range(150):
                _, in_shape = pipeline.prepare(rng, out, context)
                assert all(i <= m for i, m in zip(in_shape, largest, strict=True)), stack


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 1, 5), (1, 3, 3), (1, 2, 9)])
def test_blur_matches_scipy_where_the_kernel_outgrows_the_section(shape):
    rng = np.random.default_rng(0)
    for sigma in (0.3, 3.0, 40.0):
        x = rng.random(shape, dtype=np.float32)
        want = ndimage.gaussian_filter(x[0].astype(np.float64), sigma, mode="reflect")
        np.testing.assert_allclose(photometric.blur_sections(x, sigma)[0], want, atol=1e-5)


# -- misalignment: whole sections translated, inside the read ---------------------------------


def _section_offsets(out: np.ndarray, in_shape) -> list[tuple[int, int]]:
    """Per output section, the (y, x) corner of the input it was cropped at (ids encode the
    input position; each section must be one pure translation of its own input section)."""
    z, y, x = np.unravel_index(out.astype(np.int64), in_shape)
    offsets = []
    for k in range(out.shape[0]):
        assert np.all(z[k] == k)  # never from another section
        dy, dx = y[k] - np.arange(out.shape[1])[:, None], x[k] - np.arange(out.shape[2])
        assert np.all(dy == dy.flat[0]) and np.all(dx == dx.flat[0])
        offsets.append((int(dy.flat[0]), int(dx.flat[0])))
    return offsets


@pytest.mark.parametrize("mode", ["step", "slip"])
def test_misalign_translates_whole_sections_by_the_drawn_shift(mode):
    """Each output section is one input section cropped at one corner inside the read; the
    image's corners differ by exactly the read's growth (the shift); labels and mask take the
    image's corners, or with ``interp`` the unmoved one for every section."""
    out_shape = (6, 11, 13)
    for seed in range(20):
        for interp in (False, True):
            spec = Misalign(displacement=(1, 9), mode=mode, interp=interp)
            step = augmentations.build(spec).plan(np.random.default_rng(seed), out_shape,
                                                  Context())
            ids = np.arange(math.prod(step.in_shape), dtype=np.uint64).reshape(step.in_shape)
            image = ids.astype(np.float32) / 4096  # exact: fewer than 4096 voxels
            out = step.apply(Sample(image, ids, ids.copy(), {}))
            seen = _section_offsets((out.image * 4096).astype(np.uint64), step.in_shape)
            labelled = _section_offsets(out.labels, step.in_shape)
            np.testing.assert_array_equal(out.mask, out.labels)
            grow = (step.in_shape[1] - out_shape[1], step.in_shape[2] - out_shape[2])
            for oy, ox in seen + labelled:  # inside what was read
                assert 0 <= oy <= grow[0] and 0 <= ox <= grow[1]
            corners = sorted(set(seen))
            if grow == (0, 0):
                assert len(corners) == 1
                continue
            assert len(corners) == 2
            (ay, ax), (by, bx) = corners
            assert (abs(ay - by), abs(ax - bx)) == grow
            # the unmoved corner is the one of most sections (step: k >= 1 below; slip: 5)
            unmoved = max(corners, key=seen.count) if mode == "slip" else seen[0]
            moved = [o != unmoved for o in seen]
            assert moved == sorted(moved) if mode == "step" else sum(moved) == 1
            assert labelled == ([unmoved] * 6 if interp else seen)
