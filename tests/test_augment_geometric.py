"""Geometric augmentations: spec propagation, image/label alignment, ids, determinism."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial import cKDTree

import emrun.data.augment.geometric as geometric
from emrun.data.augment import Context, Pipeline, Sample, Step
from emrun.recipe.augment import FlipRotate, LostSection, Misalign, MisalignMissing, Warp
from emrun.registry import augmentations

SPECS = {
    "flip_rotate": FlipRotate(),
    "flip_rotate_iso": FlipRotate(isotropic=True),
    "warp": Warp(rot_max=45),
    "warp_twist": Warp(rot_max=180, shear_max=0.3, scale=(0.7, 1.4), stretch_max=0.5,
                       twist_max=30),
    "misalign": Misalign(displacement=(0, 9)),
    "misalign_interp": Misalign(displacement=(3, 9), interp=True, mode="step"),
    "misalign_missing": MisalignMissing(displacement=(3, 9)),
    "misalign_missing_1": MisalignMissing(displacement=(3, 9), missing_max=1),
    "lost_section": LostSection(max_sections=3),
}
OUT_SHAPES = [(4, 16, 16), (5, 17, 23), (7, 30, 11), (3, 9, 40)]


def build(spec):
    return augmentations.build(spec)


def plan(spec, seed: int, out_shape, context: Context | None = None) -> Step:
    return build(spec).plan(np.random.default_rng(seed), out_shape, context or Context())


def random_sample(shape, rng: np.random.Generator) -> Sample:
    return Sample(
        image=rng.random(shape, dtype=np.float32),
        labels=rng.integers(0, 50, shape).astype(np.uint64),
        mask=(rng.random(shape) > 0.2).astype(np.uint8),
        semantic={"mito": rng.integers(0, 3, shape).astype(np.uint32)},
    )


def voronoi(shape, cells: int, rng: np.random.Generator, *, columns: bool = False) -> np.ndarray:
    """Labels 1..cells of the nearest random seed (convex cells); ``columns``: the same in
    every section."""
    plane = (shape[1], shape[2])
    seeds = rng.uniform(0, 1, (cells, 3)) * np.array(shape)
    if columns:
        points = np.indices(plane).reshape(2, -1).T
        _, ids = cKDTree(seeds[:, 1:]).query(points)
        return np.broadcast_to((ids + 1).reshape(plane), shape).astype(np.uint64)
    points = np.indices(shape).reshape(3, -1).T * np.array([3.0, 1, 1])
    _, ids = cKDTree(seeds * np.array([3.0, 1, 1])).query(points)
    return (ids + 1).reshape(shape).astype(np.uint64)


def lut_for(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A distinct grey value in [0.1, 0.9] per id (index: id)."""
    top = int(labels.max())
    return rng.permutation(np.linspace(0.1, 0.9, top + 1)).astype(np.float32)


def lut_sample(labels: np.ndarray, lut: np.ndarray, offset: int = 0) -> Sample:
    ids = (labels - np.uint64(offset)).astype(np.intp)
    return Sample(lut[ids], labels, (ids % 2).astype(np.uint8), {"half": (ids % 3 == 0)})


# -- spec propagation ----------------------------------------------------------------------


@pytest.mark.parametrize("name", SPECS)
def test_output_is_exactly_the_requested_shape(name: str) -> None:
    rng = np.random.default_rng(0)
    for seed in range(12):
        for out_shape in OUT_SHAPES:
            step = plan(SPECS[name], seed, out_shape, Context((30.0, 6.0, 6.0)))
            assert all(isinstance(n, int) and n >= 1 for n in step.in_shape)
            out = step.apply(random_sample(step.in_shape, rng))
            for array in (out.image, out.labels, out.mask, out.semantic["mito"]):
                assert array.shape == out_shape, (name, seed, out_shape, step.in_shape)
            assert out.image.dtype == np.float32
            assert out.labels.dtype == np.uint64 and out.semantic["mito"].dtype == np.uint32


def test_pipeline_chains_geometric_steps() -> None:
    specs = [Misalign(), LostSection(), Warp(twist_max=10), FlipRotate()]
    pipeline = Pipeline(specs)
    rng = np.random.default_rng(3)
    for _ in range(5):
        steps, in_shape = pipeline.prepare(rng, (6, 33, 40), Context((30.0, 6.0, 6.0)))
        out = Pipeline.apply(steps, random_sample(in_shape, rng))
        assert out.shape == (6, 33, 40) and out.labels.shape == (6, 33, 40)


def test_too_few_sections_are_refused() -> None:
    with pytest.raises(ValueError, match="2 sections"):
        plan(Misalign(), 0, (1, 32, 32))
    with pytest.raises(ValueError, match="3 sections"):
        plan(MisalignMissing(), 0, (2, 32, 32))
    # fewer sections than missing_max + 2: fewer missing sections, still exact
    step = plan(MisalignMissing(missing_max=2), 0, (3, 32, 32))
    out = step.apply(random_sample(step.in_shape, np.random.default_rng(0)))
    assert out.shape == (3, 32, 32)


# -- alignment and ids ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["flip_rotate", "flip_rotate_iso", "misalign", "lost_section",
                                  "misalign_missing"])
def test_exact_alignment(name: str) -> None:
    rng = np.random.default_rng(1)
    for seed in range(8):
        out_shape = (6, 20, 20) if name == "flip_rotate_iso" else (6, 21, 26)
        step = plan(SPECS[name], seed, out_shape)
        labels = voronoi(step.in_shape, 30, rng)
        lut = lut_for(labels, rng)
        out = step.apply(lut_sample(labels, lut))
        assert set(np.unique(out.labels)) <= set(np.unique(labels))
        lut_image = lut[out.labels.astype(np.intp)]
        blank = (out.image == 0).all(axis=(1, 2))  # missing sections
        assert np.array_equal(out.image[~blank], lut_image[~blank])
        ids = out.labels.astype(np.intp)
        assert np.array_equal(out.mask, (ids % 2).astype(np.uint8))
        assert np.array_equal(out.semantic["half"], ids % 3 == 0)


@pytest.mark.parametrize("name", ["warp", "warp_twist"])
def test_warp_keeps_image_and_labels_aligned(name: str) -> None:
    rng = np.random.default_rng(2)
    for seed in range(6):
        step = plan(SPECS[name], seed, (4, 40, 48))
        labels = voronoi(step.in_shape, 12, rng)
        lut = lut_for(labels, rng)
        out = step.apply(lut_sample(labels, lut))
        assert set(np.unique(out.labels)) <= set(np.unique(labels))
        # away from label borders (uniform 5x5 in-plane neighbourhood) the interpolated image
        # is the grey value of the nearest label
        size = (1, 5, 5)
        interior = ndimage.maximum_filter(out.labels, size) == ndimage.minimum_filter(
            out.labels, size)
        assert interior.mean() > 0.4
        agree = np.abs(out.image - lut[out.labels.astype(np.intp)]) < 1e-4
        assert agree[interior].mean() > 0.995, (seed, agree[interior].mean())
        assert np.array_equal(out.mask, (out.labels.astype(np.intp) % 2).astype(np.uint8))


def test_warp_without_deformation_is_a_centre_crop() -> None:
    spec = Warp(rot_max=0, shear_max=0, scale=(1, 1), stretch_max=0)
    rng = np.random.default_rng(4)
    step = plan(spec, 0, (3, 20, 31))
    margin = geometric.MARGIN
    assert step.in_shape == (3, 20 + 2 * margin, 31 + 2 * margin)
    sample = random_sample(step.in_shape, rng)
    out = step.apply(sample)
    crop = (slice(None), slice(margin, -margin), slice(margin, -margin))
    assert np.array_equal(out.labels, sample.labels[crop])
    assert np.allclose(out.image, sample.image[crop], atol=1e-5)


def test_warp_enlarges_the_input_for_rotation() -> None:
    shapes = [plan(Warp(rot_max=45, scale=(1, 1), shear_max=0, stretch_max=0), s,
                   (2, 64, 64)).in_shape for s in range(50)]
    assert max(s[1] for s in shapes) > 64 * 1.3  # near 45 degrees: ~ sqrt(2) larger
    assert all(s[1] <= math.ceil(63 * math.sqrt(2)) + 4 for s in shapes)  # margins, parity
    assert all(s[1] % 2 == 0 and s[2] % 2 == 0 for s in shapes)  # the output's parity
    assert all(s[0] == 2 for s in shapes)


def test_warp_keeps_uint64_ids_above_2_to_53() -> None:
    rng = np.random.default_rng(5)
    offset = 2**60 + 1  # float64 spacing there is 256: a float round trip would merge ids
    for seed in range(4):
        step = plan(SPECS["warp_twist" if seed % 2 else "warp"], seed, (3, 32, 32))
        small = voronoi(step.in_shape, 10, rng)
        labels = small + np.uint64(offset)
        lut = lut_for(small, rng)
        out = step.apply(lut_sample(labels, lut, offset))
        assert out.labels.dtype == np.uint64
        assert set(np.unique(out.labels)) <= set(np.unique(labels))
        assert len(np.unique(out.labels)) > 1
        ids = (out.labels - np.uint64(offset)).astype(np.intp)
        size = (1, 5, 5)  # (on the small ids: scipy's filters go through float64)
        interior = ndimage.maximum_filter(ids, size) == ndimage.minimum_filter(ids, size)
        assert interior.mean() > 0.3
        assert (np.abs(out.image - lut[ids]) < 1e-4)[interior].mean() > 0.995


# -- misalignment semantics ----------------------------------------------------------------


def shift_of(step: Step, out_shape) -> tuple[int, int]:
    return step.in_shape[1] - out_shape[1], step.in_shape[2] - out_shape[2]


def test_misalign_moves_labels_with_the_image_unless_interp() -> None:
    rng = np.random.default_rng(6)
    out_shape = (6, 24, 24)
    for seed in range(10):
        plain = plan(Misalign(displacement=(3, 9), mode="step"), seed, out_shape)
        interp = plan(Misalign(displacement=(3, 9), mode="step", interp=True), seed, out_shape)
        assert plain.in_shape == interp.in_shape
        labels = voronoi(plain.in_shape, 20, rng, columns=True)  # the same in every section
        lut = lut_for(labels, rng)
        a, b = plain.apply(lut_sample(labels, lut)), interp.apply(lut_sample(labels, lut))
        assert np.array_equal(a.image, b.image)
        assert np.array_equal(a.image, lut[a.labels.astype(np.intp)])
        # interp: every section's labels from the unmoved crop, so they are all the same
        assert all(np.array_equal(b.labels[z], b.labels[0]) for z in range(6))
        moved = [not np.array_equal(a.image[z], a.image[0]) for z in range(6)]
        assert moved[0] is False and any(moved)
        assert moved == sorted(moved)  # a step: everything above the interface moves
        for z in range(6):
            assert np.array_equal(b.labels[z], a.labels[0])
            assert np.array_equal(a.labels[z], b.labels[z]) == (not moved[z])


def test_misalign_slip_moves_one_section() -> None:
    rng = np.random.default_rng(7)
    for seed in range(10):
        step = plan(Misalign(displacement=(4, 9), mode="slip"), seed, (5, 20, 20))
        labels = voronoi(step.in_shape, 20, rng, columns=True)
        out = step.apply(lut_sample(labels, lut_for(labels, rng)))
        differs = [not np.array_equal(out.labels[z], out.labels[(z + 1) % 5]) for z in range(5)]
        assert sum(differs) == 2  # the slipped section differs from both neighbours


def test_misalign_missing_fills_the_gap_and_labels_follow_the_nearer_side() -> None:
    rng = np.random.default_rng(8)
    seen = Counter()
    for seed in range(30):
        out_shape = (6, 20, 20)
        step = plan(MisalignMissing(displacement=(3, 9)), seed, out_shape)
        labels = voronoi(step.in_shape, 20, rng, columns=True)
        lut = lut_for(labels, rng)
        out = step.apply(lut_sample(labels, lut))
        gap = [z for z in range(6) if (out.image[z] == 0).all()]
        assert gap and gap == list(range(gap[0], gap[-1] + 1))
        first, n = gap[0], len(gap)
        seen[n] += 1
        assert first >= 1 and first + n <= 5
        below, above = out.labels[first - 1], out.labels[first + n]
        assert not np.array_equal(below, above)  # the step shows in the labels
        for j, z in enumerate(gap):
            side = below if j + 1 <= n - j else above
            assert np.array_equal(out.labels[z], side)
    assert set(seen) == {1, 2}


def test_voxel_reference_scales_the_displacement() -> None:
    spec = Misalign(displacement=(6, 6), voxel_reference=8.0)
    out_shape = (4, 40, 40)
    for seed in range(20):
        scaled = math.hypot(*shift_of(plan(spec, seed, out_shape, Context((30, 6, 6))),
                                      out_shape))
        raw = math.hypot(*shift_of(plan(spec, seed, out_shape, Context()), out_shape))
        assert abs(scaled - 8) <= 0.75 and abs(raw - 6) <= 0.75
    spec = MisalignMissing(displacement=(6, 6), voxel_reference=8.0)
    step = plan(spec, 0, out_shape, Context((30, 6, 6)))
    assert abs(math.hypot(*shift_of(step, out_shape)) - 8) <= 0.75


def test_lost_section_drops_consecutive_interior_sections() -> None:
    rng = np.random.default_rng(9)
    for seed in range(15):
        step = plan(LostSection(max_sections=3), seed, (5, 8, 8))
        lost = step.in_shape[0] - 5
        assert 1 <= lost <= 3
        sample = random_sample(step.in_shape, rng)
        out = step.apply(sample)
        matches = [p for p in range(1, 5)
                   if np.array_equal(out.image, np.delete(sample.image, range(p, p + lost), 0))]
        assert len(matches) == 1
        p = matches[0]
        assert np.array_equal(out.labels, np.delete(sample.labels, range(p, p + lost), 0))


# -- flips ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("isotropic", "count"), [(False, 16), (True, 48)])
def test_flip_rotate_hits_every_variant_evenly(isotropic: bool, count: int) -> None:
    aug = build(FlipRotate(isotropic=isotropic))
    shape = (3, 3, 3)
    cube = np.arange(27, dtype=np.float32).reshape(shape)
    rng = np.random.default_rng(10)
    seen: Counter[bytes] = Counter()
    draws = 40 * count
    for _ in range(draws):
        step = aug.plan(rng, shape, Context())
        out = step.apply(Sample(cube, cube.astype(np.uint64), None, {}))
        assert np.array_equal(out.labels, out.image.astype(np.uint64))
        seen[out.image.tobytes()] += 1
    assert len(seen) == count
    assert min(seen.values()) > 40 * 0.5 and max(seen.values()) < 40 * 1.5


@pytest.mark.parametrize(("isotropic", "voxel_size", "count"), [
    (False, (30.0, 4.0, 6.0), 8),  # y and x differ: flips only, no transpose
    (False, (30.0, 6.0, 6.0), 16),
    (True, (30.0, 6.0, 6.0), 16),  # "isotropic" on anisotropic data: y/x only
    (True, (8.0, 8.0, 8.0), 48),
    (True, (6.0, 6.0, 8.0), 16),  # z with y only
])
def test_flip_rotate_never_swaps_axes_of_different_voxel_sizes(
        isotropic: bool, voxel_size: tuple[float, float, float], count: int) -> None:
    """A transposed patch of a source 4 x 6 nm in y/x had another resolution than the data,
    and its distance and LSD targets, made with the source's voxel size, were wrong."""
    aug = build(FlipRotate(isotropic=isotropic))
    shape = (3, 3, 3)
    cube = np.arange(27, dtype=np.float32).reshape(shape)
    rng = np.random.default_rng(13)
    seen: set[bytes] = set()
    for _ in range(30 * count):
        out = aug.plan(rng, shape, Context(voxel_size)).apply(Sample(cube, None, None, {}))
        origin = np.array(np.unravel_index(int(out.image[0, 0, 0]), shape))
        for out_axis, neighbour in ((0, (1, 0, 0)), (1, (0, 1, 0)), (2, (0, 0, 1))):
            came = np.array(np.unravel_index(int(out.image[neighbour]), shape))
            in_axis = int(np.flatnonzero(came != origin)[0])  # the input axis it walks
            assert voxel_size[in_axis] == voxel_size[out_axis]
        seen.add(out.image.tobytes())
    assert len(seen) == count


def test_flip_rotate_outputs_are_contiguous() -> None:
    rng = np.random.default_rng(11)
    for seed in range(20):
        step = plan(FlipRotate(isotropic=True), seed, (4, 6, 8))
        out = step.apply(random_sample(step.in_shape, rng))
        assert out.image.flags.c_contiguous and out.labels.flags.c_contiguous


# -- determinism ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", SPECS)
def test_same_seed_same_result_different_seeds_differ(name: str) -> None:
    out_shape = (6, 24, 28)
    rng = np.random.default_rng(12)
    step = plan(SPECS[name], 0, out_shape)
    sample = random_sample(step.in_shape, rng)
    first = plan(SPECS[name], 0, out_shape).apply(sample)
    again = plan(SPECS[name], 0, out_shape).apply(sample)
    assert np.array_equal(first.image, again.image)
    assert np.array_equal(first.labels, again.labels)
    others = []
    for seed in range(1, 8):
        other = plan(SPECS[name], seed, out_shape)
        if other.in_shape != step.in_shape:
            others.append(True)
            continue
        others.append(not np.array_equal(other.apply(sample).image, first.image))
    assert any(others)


def test_builders_accept_context() -> None:
    for spec in SPECS.values():
        aug = augmentations.build(spec, anything="ignored")
        assert aug.name == spec.type
