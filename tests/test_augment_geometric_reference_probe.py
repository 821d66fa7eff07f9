"""Geometric augmentations (flip_rotate, warp, misalign, misalign_missing, lost_section)
against references written here, on tiny coded volumes: every input voxel carries its own
code in the image, the labels, the mask and a semantic volume, so an output voxel says where
it came from in each of them.

References: np.flip/np.transpose/np.rot90 for the 16 (48) flip variants, per-section
crop offsets found by brute force for the misalignments, a consecutive run of removed
sections for lost_section, linear images (which bilinear interpolation reproduces exactly)
for the warp's source positions, and brute-force affinities (per-id connected components
by scipy, one loop per offset) for what the loader makes of an augmented sample. Seeds are
fixed and bounds loose (5 sigma), so nothing can flake.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.ndimage

from emrun.data.augment import Context, Pipeline, Sample
from emrun.data.samples import SampleMaker, batch_rng
from emrun.recipe import Recipe
from emrun.recipe.augment import (
    FlipRotate,
    LostSection,
    Misalign,
    MisalignMissing,
    Warp,
)
from emrun.recipe.recipe import AugmentSpec  # noqa: F401  (completes the combinators)
from emrun.registry import augmentations

BIG = np.uint64(2**60)  # ids above 2^53: a float round trip would change them


def within(count: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p)) + 1


def coded(shape: tuple[int, int, int]) -> Sample:
    """Image voxel i (C order) holds i / N; labels BIG + i; mask i % 3 != 0 (uint8);
    semantic 'mito' i % 5 (uint8)."""
    n = int(np.prod(shape))
    code = np.arange(n, dtype=np.int64).reshape(shape)
    return Sample((code / n).astype(np.float32), code.astype(np.uint64) + BIG,
                  (code % 3 != 0).astype(np.uint8), {"mito": (code % 5).astype(np.uint8)})


def code_of(sample: Sample, n: int) -> np.ndarray:
    """The input voxel index each output image voxel holds."""
    return np.rint(sample.image.astype(np.float64) * n).astype(np.int64)


def run(spec, out_shape, seed, context=None):
    """(input code volume, output sample) of one draw of ``spec`` through the Pipeline."""
    pipeline = Pipeline([spec])
    steps, in_shape = pipeline.prepare(np.random.default_rng(seed), out_shape,
                                       context or Context())
    sample = coded(in_shape)
    out = Pipeline.apply(steps, sample)
    assert out.shape == tuple(out_shape)
    return in_shape, sample, out


def assert_others_follow_image(inp: Sample, out: Sample, n: int) -> np.ndarray:
    """Labels, mask and semantic voxels are the input's at the voxel the image came from."""
    code = code_of(out, n)
    assert code.min() >= 0 and code.max() < n
    flat = np.unravel_index(code, inp.image.shape)
    assert out.labels.dtype == np.uint64
    assert np.array_equal(out.labels, inp.labels[flat])
    assert np.array_equal(out.mask, inp.mask[flat])
    assert np.array_equal(out.semantic["mito"], inp.semantic["mito"][flat])
    return code


# -- flip_rotate -------------------------------------------------------------------------------


def variants(volume: np.ndarray, perms) -> list[np.ndarray]:
    """Every transpose(flip(volume, flips), perm), plainly."""
    found = []
    for perm in perms:
        for flips in itertools.product((False, True), repeat=3):
            v = volume
            for axis, f in enumerate(flips):
                if f:
                    v = np.flip(v, axis)
            found.append(np.transpose(v, perm))
    return found


IN_PLANE = [(0, 1, 2), (0, 2, 1)]
ALL = list(itertools.permutations(range(3)))


def flip_counts(spec, out_shape, draws, context=None) -> dict[bytes, int]:
    """How often each distinct output arrangement appears; checks each is one variant of
    the input and that labels, mask and semantic moved with the image."""
    counts: dict[bytes, int] = {}
    for seed in range(draws):
        in_shape, inp, out = run(spec, out_shape, seed, context)
        n = inp.image.size
        code = assert_others_follow_image(inp, out, n)
        refs = [v for v in variants(np.arange(n).reshape(in_shape), ALL)
                if v.shape == tuple(out_shape)]
        assert any(np.array_equal(code, r) for r in refs), seed
        assert out.image.flags.c_contiguous and out.labels.flags.c_contiguous
        counts[code.tobytes()] = counts.get(code.tobytes(), 0) + 1
    return counts


@pytest.mark.parametrize("out_shape", [(3, 4, 4), (3, 4, 5)])
def test_flip_rotate_draws_each_of_the_16_variants_evenly_and_moves_everything(out_shape):
    draws = 640
    counts = flip_counts(FlipRotate(), out_shape, draws)
    assert len(counts) == 16  # 8 flips x (transposed or not), all distinct here
    assert all(within(c, draws, 1 / 16) for c in counts.values()), sorted(counts.values())


def test_flip_rotate_variants_include_the_in_plane_rotations():
    out_shape = (2, 3, 3)
    counts = flip_counts(FlipRotate(), out_shape, 300)
    code = np.arange(18).reshape(out_shape)
    for k in range(4):
        assert np.ascontiguousarray(np.rot90(code, k, axes=(1, 2))).tobytes() in counts, k
    # the transposes, too: transpose(y, x) and the anti-transpose
    assert np.ascontiguousarray(code.transpose(0, 2, 1)).tobytes() in counts
    assert np.ascontiguousarray(np.rot90(code, 1, axes=(1, 2))[:, ::-1]).tobytes() in counts


def test_flip_rotate_isotropic_draws_all_48_evenly():
    draws = 1440
    counts = flip_counts(FlipRotate(isotropic=True), (2, 3, 4), draws)
    assert len(counts) == 48
    assert all(within(c, draws, 1 / 48) for c in counts.values()), sorted(counts.values())


@pytest.mark.parametrize(("isotropic", "voxel", "kinds"), [
    (True, (40.0, 4.0, 4.0), 16),  # z anisotropic: never z<->y or z<->x
    (False, (4.0, 4.0, 6.0), 8),   # y != x: never transposed
    (True, (4.0, 4.0, 6.0), 16),   # only z<->y may swap
    (True, (5.0, 5.0, 5.0), 48),
])
def test_flip_rotate_never_swaps_axes_of_different_voxel_sizes(isotropic, voxel, kinds):
    out_shape = (2, 3, 4)
    draws = 40 * kinds
    counts = flip_counts(FlipRotate(isotropic=isotropic), out_shape, draws, Context(voxel))
    assert len(counts) == kinds
    assert all(within(c, draws, 1 / kinds) for c in counts.values())
    allowed = [p for p in ALL
               if all(voxel[a] == voxel[b] for a, b in zip(p, range(3), strict=True))]
    want = set()
    for perm in ALL:  # every input shape the output may be read from
        in_shape = [0, 0, 0]
        for o, i in enumerate(perm):
            in_shape[i] = out_shape[o]
        code = np.arange(24).reshape(in_shape)
        want |= {np.ascontiguousarray(v).tobytes() for v in variants(code, allowed)
                 if v.shape == out_shape}
    assert set(counts) <= want


def test_flip_rotate_p_zero_is_a_no_op():
    for seed in range(20):
        in_shape, inp, out = run(FlipRotate(p=0.0, isotropic=True), (2, 3, 4), seed)
        assert in_shape == (2, 3, 4)
        for a, b in ((inp.image, out.image), (inp.labels, out.labels), (inp.mask, out.mask)):
            assert np.array_equal(a, b)


def test_flip_rotate_p_is_realised():
    draws, p = 800, 0.3
    spec = FlipRotate(p=p)
    identity = 0
    for seed in range(draws):
        _, inp, out = run(spec, (2, 3, 4), seed)
        identity += np.array_equal(inp.image, out.image)
    # skipped (1 - p), or applied and the identity variant drawn (p / 16)
    assert within(identity, draws, 1 - p + p / 16)


# -- warp --------------------------------------------------------------------------------------


def warp_positions(spec, out_shape, seed, context=None):
    """(in_shape, out labels, source y, source x) of one warp draw: the image is run
    through the same step twice, once holding y and once x of the input (linear, so the
    bilinear image is the source position itself, away from the border)."""
    pipeline = Pipeline([spec])
    steps, in_shape = pipeline.prepare(np.random.default_rng(seed), out_shape,
                                       context or Context())
    nz, h, w = in_shape
    z, y, x = np.meshgrid(np.arange(nz), np.arange(h), np.arange(w), indexing="ij")
    code = (z * h + y) * w + x
    labels = code.astype(np.uint64) + BIG
    got = []
    for coordinate in (y, x):
        sample = Sample((coordinate / 1000).astype(np.float32), labels, None, {})
        got.append(Pipeline.apply(steps, sample))
    assert np.array_equal(got[0].labels, got[1].labels)
    lab = got[0].labels
    assert lab.dtype == np.uint64 and lab.shape == tuple(out_shape)
    return (in_shape, lab, got[0].image.astype(np.float64) * 1000,
            got[1].image.astype(np.float64) * 1000)


WARPS = {
    "rotation": Warp(rot_max=180, shear_max=0, scale=(1, 1), stretch_max=0),
    "everything": Warp(rot_max=45, shear_max=0.3, scale=(0.7, 1.3), stretch_max=0.5),
    "twist": Warp(rot_max=30, shear_max=0.1, scale=(0.9, 1.1), stretch_max=0.2,
                  twist_max=60),
}


@pytest.mark.parametrize("name", list(WARPS))
def test_warp_labels_are_the_nearest_source_voxel_of_the_image_position(name):
    out_shape = (3, 9, 11)
    for seed in range(30):
        in_shape, lab, sy, sx = warp_positions(WARPS[name], out_shape, seed)
        nz, h, w = in_shape
        index = (lab - BIG).astype(np.int64)
        assert index.min() >= 0 and index.max() < nz * h * w  # only input ids
        lz, ly, lx = np.unravel_index(index, in_shape)
        assert np.array_equal(lz, np.broadcast_to(np.arange(nz)[:, None, None], lz.shape))
        # the image was interpolated where the labels were taken: within half a voxel
        # (float32 positions: a hair more at exact ties)
        assert np.abs(ly - sy).max() <= 0.5 + 1e-3, (seed, np.abs(ly - sy).max())
        assert np.abs(lx - sx).max() <= 0.5 + 1e-3, (seed, np.abs(lx - sx).max())
        # the margin keeps every position inside the input, not on the clamped border
        assert sy.min() >= 0.5 - 1e-3 and sy.max() <= h - 1.5 + 1e-3
        assert sx.min() >= 0.5 - 1e-3 and sx.max() <= w - 1.5 + 1e-3


def test_warp_rotation_is_a_rigid_rotation_about_the_centres():
    """Without shear, scale or stretch: distances kept, the output centre at the input's,
    the angle in [-rot_max, rot_max], the same for every section."""
    spec = Warp(rot_max=40, shear_max=0, scale=(1, 1), stretch_max=0)
    out_shape = (2, 7, 9)
    angles = []
    for seed in range(40):
        in_shape, _, sy, sx = warp_positions(spec, out_shape, seed)
        _, h, w = in_shape
        # centre: mean of the source positions (the map is affine)
        assert abs(sy.mean() - (h - 1) / 2) < 1e-3 and abs(sx.mean() - (w - 1) / 2) < 1e-3
        # one step in x of the output: a unit vector at the rotation angle
        ex = (sy[:, :, 1:] - sy[:, :, :-1], sx[:, :, 1:] - sx[:, :, :-1])
        ey = (sy[:, 1:, :] - sy[:, :-1, :], sx[:, 1:, :] - sx[:, :-1, :])
        assert np.allclose(np.hypot(*ex), 1, atol=1e-3)
        assert np.allclose(np.hypot(*ey), 1, atol=1e-3)
        angle = math.degrees(math.atan2(float(ex[0].mean()), float(ex[1].mean())))
        assert abs(angle) <= 40 + 1e-3
        assert np.allclose(ex[0], ex[0].mean(), atol=1e-3)  # same in every section
        angles.append(angle)
    assert min(angles) < -20 and max(angles) > 20  # both directions drawn


def test_warp_scale_above_one_zooms_in():
    spec = Warp(rot_max=0, shear_max=0, scale=(2, 2), stretch_max=0)
    _, _, sy, sx = warp_positions(spec, (1, 9, 9), 0)
    assert np.allclose(np.diff(sx, axis=2), 0.5, atol=1e-3)  # output step: half a voxel
    assert np.allclose(np.diff(sy, axis=1), 0.5, atol=1e-3)


def test_warp_twist_turns_sections_linearly_by_at_most_twist_max():
    spec = Warp(rot_max=0, shear_max=0, scale=(1, 1), stretch_max=0, twist_max=60)
    totals = []
    for seed in range(20):
        _, _, sy, sx = warp_positions(spec, (5, 7, 7), seed)
        ex = (np.diff(sy, axis=2).mean(axis=(1, 2)), np.diff(sx, axis=2).mean(axis=(1, 2)))
        angles = np.degrees(np.arctan2(*ex))
        steps = np.diff(angles)
        assert np.allclose(steps, steps[0], atol=1e-2)  # linear in z
        assert abs(angles.mean()) < 1e-2  # rot_max 0: the middle section is unturned
        totals.append(angles[-1] - angles[0])
    assert max(abs(t) for t in totals) <= 60 + 1e-2
    assert min(totals) < -20 and max(totals) > 20


READ_WARPS = {**WARPS, "extreme": Warp(rot_max=180, shear_max=1, scale=(0.5, 2),
                                        stretch_max=0.5, twist_max=180)}


@pytest.mark.parametrize("name", list(READ_WARPS))
@pytest.mark.parametrize("out_shape", [(3, 12, 20), (1, 5, 40), (4, 3, 3)])
def test_warp_reads_within_its_bound_and_no_less_than_its_smallest_reads(name, out_shape):
    """``largest_input`` bounds every read; ``input_shapes`` (the smallest in y and the
    smallest in x, which the recipe checks judge) is no more, per axis, than any read."""
    spec = READ_WARPS[name]
    largest = augmentations.build(spec).largest_input(out_shape, Context())
    least = np.min(spec.input_shapes(out_shape, None), axis=0)
    for seed in range(150):
        _, in_shape = Pipeline([spec]).prepare(np.random.default_rng(seed), out_shape)
        assert all(a <= b for a, b in zip(in_shape, largest, strict=True)), (seed, in_shape)
        assert all(a >= b for a, b in zip(in_shape, least, strict=True)), (seed, in_shape)


def test_warp_p_zero_is_a_no_op():
    spec = WARPS["everything"].model_copy(update={"p": 0.0})
    for seed in range(10):
        in_shape, inp, out = run(spec, (2, 5, 6), seed)
        assert in_shape == (2, 5, 6)
        assert np.array_equal(inp.image, out.image) and np.array_equal(inp.labels, out.labels)


# -- misalign ----------------------------------------------------------------------------------


def section_offsets(inp: Sample, out: Sample, volume: str = "image") -> list[tuple[int, int]]:
    """Per output section, the (y, x) corner of the input section it is a crop of, found
    by brute force over every corner; (-1, -1) where it is no crop of its own section."""
    _, h, w = out.shape
    _, in_h, in_w = inp.shape
    found = []
    for z in range(out.shape[0]):
        a, b = getattr(inp, volume)[z], getattr(out, volume)[z]
        hits = [(y, x) for y in range(in_h - h + 1) for x in range(in_w - w + 1)
                if np.array_equal(a[y:y + h, x:x + w], b)]
        assert len(hits) <= 1
        found.append(hits[0] if hits else (-1, -1))
    return found


def misalign_draw(spec, out_shape, seed, context=None):
    in_shape, inp, out = run(spec, out_shape, seed, context)
    image_at = section_offsets(inp, out)
    label_at = section_offsets(inp, out, "labels")
    _, h, w = out.shape
    for z, (y, x) in enumerate(label_at):  # mask and semantic volumes go with the labels
        assert np.array_equal(out.mask[z], inp.mask[z, y:y + h, x:x + w])
        assert np.array_equal(out.semantic["mito"][z], inp.semantic["mito"][z, y:y + h, x:x + w])
    return in_shape, inp, out, image_at, label_at


def split(offsets):
    """(unmoved corner, moved corner, moved sections): the unmoved corner is section 0's."""
    base = offsets[0]
    moved = [z for z, o in enumerate(offsets) if o != base]
    others = {offsets[z] for z in moved}
    assert len(others) <= 1
    return base, (others.pop() if others else base), moved


@pytest.mark.parametrize("mode", ["step", "slip"])
def test_misalign_moves_exactly_the_documented_sections(mode):
    nz, draws = 5, 400
    spec = Misalign(mode=mode, displacement=(2, 4))
    where_counts = {}
    signs = set()
    for seed in range(draws):
        in_shape, _, _, image_at, label_at = misalign_draw(spec, (nz, 6, 7), seed)
        assert -1 not in itertools.chain(*image_at)  # every voxel real data, no fill
        assert label_at == image_at  # labels and mask move with the image
        base, moved, sections = split(image_at)
        dy, dx = moved[0] - base[0], moved[1] - base[1]
        # the input is the output plus |dy|, |dx|; the two corners are its opposite ones
        assert in_shape == (nz, 6 + abs(dy), 7 + abs(dx))
        assert {base[0], moved[0]} <= {0, abs(dy)} and {base[1], moved[1]} <= {0, abs(dx)}
        # magnitude in the range, each component then rounded (off by up to sqrt(2) / 2)
        assert 2 - 0.71 <= math.hypot(dy, dx) <= 4 + 0.71 and (dy, dx) != (0, 0)
        signs.add((np.sign(dy), np.sign(dx)))
        if mode == "step":
            # sections from k up: k in 1..Z-1 (section 0 is always the unmoved one)
            k = sections[0]
            assert sections == list(range(k, nz)) and 1 <= k <= nz - 1
            where_counts[k] = where_counts.get(k, 0) + 1
        else:
            # one section; a slip of section 0 shows as sections 1.. at the other corner
            z = sections[0] if len(sections) == 1 else 0
            assert len(sections) == 1 or sections == list(range(1, nz))
            where_counts[z] = where_counts.get(z, 0) + 1
    places = nz - 1 if mode == "step" else nz
    assert len(where_counts) == places
    assert all(within(c, draws, 1 / places) for c in where_counts.values()), where_counts
    assert len({s for s in signs if 0 not in s}) == 4  # every quadrant of directions


def test_misalign_both_draws_steps_and_slips_equally():
    nz, draws = 6, 600
    spec = Misalign(mode="both", displacement=(2, 3))
    interior_slips = 0
    for seed in range(draws):
        *_, image_at, _ = misalign_draw(spec, (nz, 5, 5), seed)
        _, _, sections = split(image_at)
        interior_slips += len(sections) == 1 and 0 < sections[0] < nz - 1
    # only a slip moves one interior section: half the draws, (nz - 2) / nz of those
    assert within(interior_slips, draws, 0.5 * (nz - 2) / nz)


@pytest.mark.parametrize("mode", ["step", "slip"])
def test_misalign_interp_keeps_every_label_section_at_the_unmoved_corner(mode):
    nz = 4
    spec = Misalign(mode=mode, displacement=(2, 4), interp=True)
    for seed in range(40):
        _, _, _, image_at, label_at = misalign_draw(spec, (nz, 6, 6), seed)
        assert len(set(label_at)) == 1  # every label section at one corner
        if mode == "step":  # section 0 is below the step: unmoved
            assert label_at[0] == image_at[0] and label_at != image_at
        else:  # all sections but the slipped one are unmoved
            assert sum(a == b for a, b in zip(label_at, image_at, strict=True)) == nz - 1


def test_misalign_voxel_reference_scales_the_displacement():
    spec = Misalign(mode="step", displacement=(4, 4), voxel_reference=8.0)
    for seed in range(30):
        *_, image_at, _ = misalign_draw(spec, (2, 10, 10), seed, Context((40.0, 4.0, 4.0)))
        base, moved, _ = split(image_at)
        assert abs(math.hypot(moved[0] - base[0], moved[1] - base[1]) - 8) <= 0.75


@pytest.mark.parametrize("spec", [Misalign(displacement=(3, 9)),
                                  MisalignMissing(displacement=(5, 5)),
                                  Misalign(displacement=(4, 6), voxel_reference=8.0)])
def test_misalign_reads_within_its_bound_and_no_less_than_its_smallest_reads(spec):
    context = Context((40.0, 4.0, 4.0))
    out_shape = (4, 12, 14)
    largest = augmentations.build(spec).largest_input(out_shape, context)
    least = np.min(spec.input_shapes(out_shape, context.voxel_size), axis=0)
    for seed in range(300):
        _, in_shape = Pipeline([spec]).prepare(np.random.default_rng(seed), out_shape, context)
        assert all(a <= b for a, b in zip(in_shape, largest, strict=True))
        assert all(a >= b for a, b in zip(in_shape, least, strict=True))


def test_misalign_p_zero_is_a_no_op():
    for spec in (Misalign(p=0.0), MisalignMissing(p=0.0), LostSection(p=0.0)):
        in_shape, inp, out = run(spec, (4, 5, 6), 0)
        assert in_shape == (4, 5, 6)
        assert np.array_equal(inp.image, out.image) and np.array_equal(inp.mask, out.mask)


# -- misalign_missing --------------------------------------------------------------------------


@pytest.mark.parametrize(("nz", "missing_max"), [(6, 2), (5, 1), (3, 2)])
def test_misalign_missing_blacks_out_the_gap_and_labels_follow_the_nearer_side(nz, missing_max):
    draws = 300
    spec = MisalignMissing(displacement=(2, 3), missing_max=missing_max)
    counts: dict[tuple[int, int], int] = {}
    for seed in range(draws):
        _, _, out, image_at, label_at = misalign_draw(spec, (nz, 5, 6), seed)
        gap = [z for z in range(nz) if not out.image[z].any()]
        assert gap and gap == list(range(gap[0], gap[-1] + 1))
        k, n = gap[0], len(gap)
        assert k >= 1 and k + n <= nz - 1 and 1 <= n <= min(missing_max, nz - 2)
        counts[(k, n)] = counts.get((k, n), 0) + 1
        below, above = image_at[k - 1], image_at[k + n]
        assert below != above
        assert all(image_at[z] == below for z in range(k))
        assert all(image_at[z] == above for z in range(k + n, nz))
        # labels, mask and semantic: every section its own, intact ones with the image,
        # gap sections in the frame of the nearer side (the lower one on a tie)
        want = [below if z < k else above if z >= k + n else
                below if z - k + 1 <= k + n - z else above for z in range(nz)]
        assert label_at == want
    # n uniform in 1..missing_max (capped), then k uniform where it fits
    ns = range(1, min(missing_max, nz - 2) + 1)
    for n in ns:
        total = sum(c for (_, m), c in counts.items() if m == n)
        assert within(total, draws, 1 / len(ns))
        places = nz - n - 1
        for k in range(1, nz - n):
            assert within(counts.get((k, n), 0), draws, 1 / len(ns) / places)


# -- lost_section ------------------------------------------------------------------------------


@pytest.mark.parametrize(("nz", "max_sections"), [(4, 3), (1, 2), (2, 1)])
def test_lost_section_removes_one_interior_run(nz, max_sections):
    draws = 400
    spec = LostSection(max_sections=max_sections)
    counts: dict[tuple[int, int], int] = {}
    for seed in range(draws):
        in_shape, inp, out = run(spec, (nz, 3, 4), seed)
        n = inp.image.size
        code = assert_others_follow_image(inp, out, n)
        kept = [int(code[z, 0, 0]) // (3 * 4) for z in range(nz)]
        for z in range(nz):
            assert np.array_equal(code[z], np.arange(12).reshape(3, 4) + kept[z] * 12)
        lost = sorted(set(range(in_shape[0])) - set(kept))
        assert kept == sorted(kept) and lost == list(range(lost[0], lost[-1] + 1))
        p, m = lost[0], len(lost)
        assert in_shape[0] == nz + m and 1 <= m <= max_sections
        if nz >= 2:
            assert 1 <= p <= nz - 1
        else:
            assert p in (0, 1)
        counts[(p, m)] = counts.get((p, m), 0) + 1
    places = nz - 1 if nz >= 2 else 2
    for key, c in counts.items():
        assert within(c, draws, 1 / places / max_sections), (key, counts)
    assert len(counts) == places * max_sections


# -- what the loader makes of an augmented sample ---------------------------------------------

OFFSETS = [[-1, 0, 0], [0, -1, 0], [0, 0, -1], [-2, 0, 0], [0, -3, 0], [0, 0, -4]]
SHAPE = (12, 32, 32)


def block_labels(z, y, x):
    """Blocks whose ids repeat diagonally (pieces of one id touching only at an edge,
    which relabelling separates) and a 0 stripe (unlabelled)."""
    ids = (z // 3 + y // 4 + x // 5) % 3 + 1
    return np.where(x % 9 == 8, 0, ids)


def coded_recipe(tmp_path: Path, augment: Any, voxel=(4.0, 4.0, 4.0), zero="mask",
                 relabel=True, patch=(4, 10, 10)) -> Recipe:
    z, y, x = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    np.save(tmp_path / "ci.npy", ((z * 32 + y) * 32 + x).astype(np.uint16))
    np.save(tmp_path / "cl.npy", block_labels(z, y, x).astype(np.uint32))
    return Recipe.model_validate({
        "name": "geomprobe", "seed": 5,
        "data": {"sources": {"c": {
            "image": str(tmp_path / "ci.npy"), "labels": str(tmp_path / "cl.npy"),
            "intensity": {"low": 0, "high": 65535}, "voxel_size": list(voxel)}}},
        "model": {"type": "rsunet", "widths": [4, 8]},
        "augment": augment,
        "tasks": {"aff": {"target": {"type": "affinity", "offsets": OFFSETS, "zero": zero,
                                     "relabel": relabel}}},
        "train": {"patch": list(patch), "iterations": 1, "batch_size": 1, "workers": 0},
    })


def reference_affinity(labels: np.ndarray, offsets, zero="mask", relabel=True):
    """Plain loops over the offsets; components per id by scipy (6-connected)."""
    labels = labels.astype(np.int64)
    if relabel:
        comp = np.zeros_like(labels)
        top = 0
        for i in np.unique(labels):
            if i == 0:
                continue
            pieces, k = scipy.ndimage.label(labels == i)
            comp[pieces > 0] = pieces[pieces > 0] + top
            top += k
        labels = comp
    shape = labels.shape
    target = np.zeros((len(offsets), *shape), np.uint8)
    mask = np.zeros((len(offsets), *shape), np.uint8)
    for c, off in enumerate(offsets):
        for p in itertools.product(*(range(n) for n in shape)):
            q = tuple(a + d for a, d in zip(p, off, strict=True))
            if not all(0 <= a < n for a, n in zip(q, shape, strict=True)):
                continue
            a, b = labels[p], labels[q]
            if zero == "mask":
                counted = a != 0 and b != 0
                same = counted and a == b
            else:
                counted = True
                same = a != 0 and a == b
            mask[(c, *p)] = counted
            target[(c, *p)] = same
    return target, mask


LOADER_STACKS = {
    "flip": [{"type": "flip_rotate", "isotropic": True}],
    "misalign": [{"type": "misalign", "displacement": [2, 4]}, {"type": "flip_rotate"}],
    "lost": [{"type": "lost_section", "max_sections": 2}, {"type": "flip_rotate"}],
    "missing": [{"type": "misalign_missing", "displacement": [2, 3], "missing_max": 1}],
}


@pytest.mark.parametrize("name", list(LOADER_STACKS))
def test_loader_labels_travel_with_the_image_and_affinities_are_the_reference(tmp_path, name):
    recipe = coded_recipe(tmp_path, LOADER_STACKS[name])
    maker = SampleMaker(recipe, keep_memory=False)
    for k in range(6):
        out = maker.sample(batch_rng(recipe.seed, 0, k))
        labels = maker.last_labels
        assert labels.shape == (4, 10, 10)
        code = np.rint(out["image"][0].astype(np.float64) * 65535).astype(np.int64)
        z, y, x = code // 1024, code // 32 % 32, code % 32
        real = np.ones(code.shape, bool)
        if name == "missing":  # the gap's image is black; its labels are still real
            real[:] = code.reshape(4, -1).any(axis=1)[:, None, None]
        assert np.array_equal(labels[real], block_labels(z, y, x)[real])
        target, mask = reference_affinity(labels, OFFSETS)
        assert np.array_equal(out["target"]["aff"], target), k
        assert np.array_equal(out["mask"]["aff"], mask), k


def test_loader_affinities_after_a_warp_are_the_reference(tmp_path):
    recipe = coded_recipe(tmp_path, [{"type": "warp", "rot_max": 45, "stretch_max": 0.2,
                                      "twist_max": 20}], zero="boundary")
    maker = SampleMaker(recipe, keep_memory=False)
    source = block_labels(*np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij"))
    for k in range(4):
        out = maker.sample(batch_rng(recipe.seed, 0, k))
        labels = maker.last_labels
        assert labels.shape == (4, 10, 10) and labels.dtype.kind in "iu"
        assert set(np.unique(labels)) <= set(np.unique(source))
        target, mask = reference_affinity(labels, OFFSETS, zero="boundary")
        assert np.array_equal(out["target"]["aff"], target), k
        assert np.array_equal(out["mask"]["aff"], mask), k


def test_loader_never_moves_z_of_a_z_anisotropic_source(tmp_path):
    recipe = coded_recipe(tmp_path, [{"type": "flip_rotate", "isotropic": True}],
                          voxel=(40.0, 4.0, 4.0), patch=(4, 4, 4))
    maker = SampleMaker(recipe, keep_memory=False)
    seen = set()
    for k in range(60):
        out = maker.sample(batch_rng(recipe.seed, 0, k))
        code = np.rint(out["image"][0].astype(np.float64) * 65535).astype(np.int64)
        z = code // 1024
        assert all(len(np.unique(z[i])) == 1 for i in range(4))  # a section stays a section
        seen.add(int(code[0, 0, 1] - code[0, 0, 0]))  # an x step of the output
    assert seen == {1, -1, 32, -32}  # x and y flipped, and y/x transposed


def test_a_chain_of_exact_steps_inside_combinators_keeps_everything_together():
    """compose(lost_section, misalign) then one_of(flip_rotate, misalign slip, nothing):
    every output voxel is one input voxel, with its labels, mask and semantic."""
    from emrun.recipe.augment import Compose, OneOf

    spec = [Compose(of=[LostSection(max_sections=2), Misalign(displacement=(1, 3))]),
            OneOf(of=[FlipRotate(isotropic=True), Misalign(mode="slip", displacement=(2, 2))],
                  probs=[0.5, 0.4])]
    for seed in range(60):
        steps, in_shape = Pipeline(spec).prepare(np.random.default_rng(seed), (4, 5, 6))
        inp = coded(in_shape)
        out = Pipeline.apply(steps, inp)
        assert out.shape == (4, 5, 6)
        code = assert_others_follow_image(inp, out, inp.image.size)
        assert len(np.unique(code)) == code.size  # no voxel twice
