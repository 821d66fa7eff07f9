"""Training targets against small brute-force references: affinities (long-range, positive and
negative offsets, every label dtype, relabelling, 0 as membrane), boundary, distance (against
a pairwise loop and scipy's ``distance_transform_edt(sampling=)``) and local shape descriptors
(against a per-voxel loop over the same Gaussian weights); crops against the crop of the
whole; what padding a validation patch does to them."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import ndimage
from test_targets import components_reference

from emrun.data.lsd import local_shape_descriptors
from emrun.data.targets import Affinity, Boundary, Distance, LocalShapeDescriptors, Patch

SHAPE = (4, 6, 6)
# long-range, positive and negative, mixed signs, as large as the patch allows and beyond
OFFSETS = ((0, 0, 2), (2, 0, 0), (0, 3, 0), (-1, 2, -3), (1, -2, 3), (0, -5, 0), (3, 5, 5),
           (-3, -5, -5), (0, 0, -6), (4, 0, 0))
ID_SETS = {
    "uint64-2**40": (np.uint64, (0, 2**40, 2**40 + 3, 17)),
    "uint64-2**63": (np.uint64, (0, 2**63 + 1, 2**40, 5)),
    "int64-negative": (np.int64, (0, -(2**40), 7, 2**62)),
    "int8-negative": (np.int8, (0, -1, 1, 100)),
    "uint32-sparse": (np.uint32, (0, 1, 1000, 70000)),
    "bool": (np.bool_, (0, 1)),
}


def blocky(seed, dtype, ids, shape=SHAPE, noise=0.15):
    """Labels in 2x2 in-plane runs (equal neighbours common) with some single voxels."""
    rng = np.random.default_rng(seed)
    values = np.array(ids, dtype=dtype)
    small = rng.choice(values, size=(shape[0], -(-shape[1] // 2), -(-shape[2] // 2)))
    labels = small.repeat(2, 1).repeat(2, 2)[:, :shape[1], :shape[2]].copy()
    flip = rng.random(shape) < noise
    labels[flip] = rng.choice(values, size=int(flip.sum()))
    return labels


def as_int(labels):
    """Ids the references compare: uint64 seen as int64 (equal stays equal, 0 stays 0)."""
    return labels.view(np.int64) if labels.dtype == np.uint64 else labels.astype(np.int64)


def voxels(shape):
    return itertools.product(*map(range, shape))


# --------------------------------------------------------------------------- references


def affinity_reference(labels, valid, offsets, zero):
    """Channel c at p: pair (p, p + offset_c); counted when both ends are in the patch and
    valid and (zero='mask') labelled; target 1 when counted, equal and non-zero."""
    shape = labels.shape
    target = np.zeros((len(offsets), *shape), np.uint8)
    mask = np.zeros_like(target)
    for c, offset in enumerate(offsets):
        for p in voxels(shape):
            q = tuple(a + d for a, d in zip(p, offset, strict=True))
            if not all(0 <= q[i] < shape[i] for i in range(3)):
                continue
            if valid is not None and not (valid[p] and valid[q]):
                continue
            a, b = labels[p], labels[q]
            if zero == "mask" and (a == 0 or b == 0):
                continue
            mask[(c, *p)] = 1
            target[(c, *p)] = int(a == b and a != 0)
    return target, mask


def boundary_reference(labels, width):
    """Label 0, or a face neighbour inside the patch with another label; then every voxel
    within in-plane chessboard distance width - 1 of one, same section."""
    shape = labels.shape
    edge = np.zeros(shape, bool)
    for p in voxels(shape):
        if labels[p] == 0:
            edge[p] = True
            continue
        for axis, step in itertools.product(range(3), (-1, 1)):
            q = list(p)
            q[axis] += step
            if 0 <= q[axis] < shape[axis] and labels[tuple(q)] != labels[p]:
                edge[p] = True
    out = np.zeros(shape, np.uint8)
    r = width - 1
    for z, y, x in voxels(shape):
        out[z, y, x] = edge[z, max(0, y - r):y + r + 1, max(0, x - r):x + r + 1].any()
    return out


def distance_reference(labels, size, clip, signed):
    """Every pair of voxels: inside an object the distance (nm) to the nearest voxel of
    another label (0 included), clipped and divided by clip; label 0: 0, or minus its
    distance to the nearest labelled voxel when signed. No such voxel: infinitely far."""
    ids = as_int(labels).reshape(-1)
    points = np.stack(np.meshgrid(*map(np.arange, labels.shape), indexing="ij"), -1)
    points = points.reshape(-1, 3) * np.asarray(size, float)
    apart = np.sqrt(((points[:, None] - points[None]) ** 2).sum(-1))
    out = np.zeros(ids.size)
    for i, v in enumerate(ids):
        if v != 0:
            other = ids != v
            sign = 1.0
        elif signed:
            other = ids != 0
            sign = -1.0
        else:
            continue
        nearest = apart[i, other].min() if other.any() else np.inf
        out[i] = sign * min(nearest, clip) / clip
    return out.reshape(labels.shape)


def lsd_reference(labels, sigma, size):
    """Per labelled voxel, window sums over its object with the truncated Gaussian (radius
    int(3 sigma + 0.5) voxels, normalised per axis), positions in nm; the 10 channels of
    emrun.data.lsd's docstring, clipped to [0, 1]."""
    sigma, size = np.asarray(sigma, float), np.asarray(size, float)
    radius, kernels = [], []
    for s in sigma / size:
        r = int(3.0 * s + 0.5)
        k = np.exp(-0.5 * (np.arange(-r, r + 1) / s) ** 2)
        radius.append(r)
        kernels.append(k / k.sum())
    ids = as_int(labels)
    grid = np.stack(np.meshgrid(*map(np.arange, labels.shape), indexing="ij"), -1)
    out = np.zeros((10, *labels.shape))
    for p in voxels(labels.shape):
        if ids[p] == 0:
            continue
        d = grid - np.asarray(p)
        near = (np.abs(d) <= np.asarray(radius)).all(-1) & (ids == ids[p])
        weight = np.ones(labels.shape)
        for a in range(3):
            weight = weight * kernels[a][np.clip(d[..., a] + radius[a], 0, 2 * radius[a])]
        g = weight[near]
        u = grid[near] * size
        mass = g.sum()
        mean = (g[:, None] * u).sum(0) / mass
        cov = np.einsum("n,na,nb->ab", g, u - mean, u - mean) / mass
        here = np.asarray(p) * size
        pearson = [0.5 + 0.5 * cov[a, b] / np.sqrt(max(cov[a, a], 1e-3) * max(cov[b, b], 1e-3))
                   for a, b in ((0, 1), (0, 2), (1, 2))]
        channels = [*(0.5 + 0.5 * (mean - here) / sigma),
                    *(cov[a, a] / sigma[a] ** 2 for a in range(3)), *pearson, mass]
        out[(slice(None), *p)] = np.clip(channels, 0, 1)
    return out


# --------------------------------------------------------------------------- affinity


@pytest.mark.parametrize("zero", ["mask", "boundary"])
@pytest.mark.parametrize("relabel", [False, True], ids=["plain", "relabel"])
@pytest.mark.parametrize("ids", list(ID_SETS), ids=list(ID_SETS))
def test_affinity_matches_the_pair_loop(ids, relabel, zero):
    dtype, values = ID_SETS[ids]
    for seed in range(2):
        labels = blocky(seed, dtype, values)
        rng = np.random.default_rng(seed + 50)
        # a uint8 mask with values other than 1, on the second seed
        valid = None if seed == 0 else (rng.random(SHAPE) < 0.85).astype(np.uint8) * 9
        target, mask = Affinity(offsets=OFFSETS, relabel=relabel, zero=zero)(
            Patch(labels, valid))
        assert target.dtype == np.uint8 and mask.dtype == np.uint8
        assert target.shape == mask.shape == (len(OFFSETS), *SHAPE)
        ref = components_reference(as_int(labels)) if relabel else as_int(labels)
        want_t, want_m = affinity_reference(ref, None if valid is None else valid != 0,
                                            OFFSETS, zero)
        np.testing.assert_array_equal(mask, want_m)
        np.testing.assert_array_equal(target, want_t)
        assert not (target & (1 - mask)).any()  # target 0 wherever the mask is


def test_affinity_value_sits_at_p_not_at_p_plus_offset():
    labels = np.array([[[2**40, 2**40, 2**40, 5, 5, 0]]], np.uint64)
    t, m = Affinity(offsets=((0, 0, 2), (0, 0, -2)), relabel=False)(Patch(labels))
    # +2: p compares with p+2; the last two voxels have no partner, x=3 meets the 0 at x=5
    assert m[0, 0, 0].tolist() == [1, 1, 1, 0, 0, 0]
    assert t[0, 0, 0].tolist() == [1, 0, 0, 0, 0, 0]
    # -2: p compares with p-2; the first two have no partner; x=5 (0) is masked
    assert m[1, 0, 0].tolist() == [0, 0, 1, 1, 1, 0]
    assert t[1, 0, 0].tolist() == [0, 0, 1, 0, 0, 0]
    tb, mb = Affinity(offsets=((0, 0, 2),), relabel=False, zero="boundary")(Patch(labels))
    assert mb[0, 0, 0].tolist() == [1, 1, 1, 1, 0, 0] and tb[0, 0, 0].tolist() == [1, 0, 0, 0,
                                                                                     0, 0]


def test_affinity_on_a_crop_is_the_crop_of_the_whole_without_relabelling():
    labels = blocky(3, np.uint64, (0, 2**40, 9, 2**63 + 2), shape=(5, 9, 9))
    valid = (np.random.default_rng(3).random(labels.shape) < 0.9)
    aff = Affinity(offsets=OFFSETS, relabel=False)
    whole_t, whole_m = aff(Patch(labels, valid))
    box = (slice(1, 5), slice(2, 8), slice(0, 6))
    part_t, part_m = aff(Patch(labels[box], valid[box]))
    for c, offset in enumerate(OFFSETS):
        # pairs whose far end is inside the crop: as in the whole; the rest masked
        inside = np.zeros(labels.shape, bool)
        inside[box] = True
        partner = np.zeros(labels.shape, bool)
        here, there = [], []
        for n, d in zip(labels.shape, offset, strict=True):
            here.append(slice(max(0, -d), n - max(0, d)))
            there.append(slice(max(0, d), n - max(0, -d)) if abs(d) < n else slice(0, 0))
        if all(s.stop > s.start for s in here):
            partner[tuple(here)] = inside[tuple(there)]
        keep = (partner & inside)[box]
        np.testing.assert_array_equal(part_m[c][keep], whole_m[c][box][keep])
        np.testing.assert_array_equal(part_t[c][keep], whole_t[c][box][keep])
        assert not part_m[c][~keep].any()


# --------------------------------------------------------------------------- boundary


@pytest.mark.parametrize("width", [1, 2, 3])
def test_boundary_matches_the_neighbour_loop(width):
    for seed, ids in enumerate(("uint64-2**63", "int8-negative", "uint32-sparse")):
        dtype, values = ID_SETS[ids]
        labels = blocky(seed + 20, dtype, values)
        valid = (np.random.default_rng(seed).random(SHAPE) < 0.7).astype(np.uint8)
        target, mask = Boundary(width=width)(Patch(labels, valid))
        assert target.dtype == mask.dtype == np.uint8
        assert target.shape == mask.shape == (1, *SHAPE)
        np.testing.assert_array_equal(target[0], boundary_reference(as_int(labels), width))
        np.testing.assert_array_equal(mask[0], valid)


def test_boundary_of_a_crop_is_the_crop_of_the_whole_away_from_its_faces():
    labels = blocky(4, np.uint64, (0, 2**40, 9, 3), shape=(6, 10, 10))
    for width in (1, 2):
        whole, _ = Boundary(width=width)(Patch(labels))
        part, _ = Boundary(width=width)(Patch(labels[1:5, 2:9, 1:8]))
        # voxels more than `width` in-plane and one section from the crop's faces
        w = width
        np.testing.assert_array_equal(part[0, 1:-1, w:-w, w:-w],
                                      whole[0, 2:4, 2 + w:9 - w, 1 + w:8 - w])


# --------------------------------------------------------------------------- distance


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
@pytest.mark.parametrize("size", [(30.0, 4.0, 6.0), (4.0, 8.0, 3.0)])
def test_distance_matches_the_pairwise_loop(size, signed):
    cases = [blocky(s, *ID_SETS[k]) for s, k in enumerate(ID_SETS)]
    single = np.zeros(SHAPE, np.uint32)
    single[2, 3, 1] = 5  # one voxel
    border = np.full(SHAPE, 3, np.uint16)
    border[:, :, 0] = 2**15 + 1  # objects along the patch faces
    cases += [single, border, np.full(SHAPE, 2**40, np.uint64), np.zeros(SHAPE, np.uint8)]
    for labels in cases:
        for clip in (10.0, 45.0, 1000.0):
            target, mask = Distance(clip=clip, signed=signed)(Patch(labels, voxel_size=size))
            assert target.dtype == np.float16 and target.shape == (1, *SHAPE)
            assert mask.dtype == np.uint8 and mask.all()
            want = distance_reference(labels, size, clip, signed)
            np.testing.assert_allclose(target[0], want, atol=5e-4, rtol=0,
                                       err_msg=f"{labels.dtype} clip {clip}")


def test_distance_inside_objects_is_scipys_edt_with_sampling():
    size = (30.0, 4.0, 6.0)
    labels = blocky(9, np.uint64, (0, 2**40, 7, 2**63 + 3), shape=(5, 8, 8))
    labels[0, 0, 0] = 0  # every object has a voxel of another label somewhere
    clip = 50.0
    target, _ = Distance(clip=clip)(Patch(labels, voxel_size=size))
    want = np.zeros(labels.shape)
    for value in np.unique(labels):
        if value != 0:
            d = ndimage.distance_transform_edt(labels == value, sampling=size)
            want[labels == value] = np.minimum(d[labels == value], clip) / clip
    np.testing.assert_allclose(target[0], want, atol=5e-4, rtol=0)
    signed, _ = Distance(clip=clip, signed=True)(Patch(labels, voxel_size=size))
    away = ndimage.distance_transform_edt(labels == 0, sampling=size)
    want[labels == 0] = -np.minimum(away[labels == 0], clip) / clip
    np.testing.assert_allclose(signed[0], want, atol=5e-4, rtol=0)


def test_distance_of_a_crop_is_the_crop_of_the_whole_where_clip_is_nearer_than_its_faces():
    size = (10.0, 4.0, 4.0)
    labels = blocky(11, np.uint64, (0, 2**40, 7), shape=(6, 14, 14), noise=0.0)
    clip = 8.0  # 2 voxels in y/x, under one section in z
    whole, _ = Distance(clip=clip, signed=True)(Patch(labels, voxel_size=size))
    box = (slice(1, 6), slice(3, 13), slice(0, 11))
    part, _ = Distance(clip=clip, signed=True)(Patch(labels[box], voxel_size=size))
    # voxels at least clip from every face of the crop that cuts the volume: clip 8 nm is
    # two voxels in y/x and one section in z
    np.testing.assert_array_equal(part[0, 1:, 2:-2, :-2], whole[0][box][1:, 2:-2, :-2])


# --------------------------------------------------------------------------- lsd

LSD_SETTINGS = [((40.0, 10.0, 15.0), (20.0, 4.0, 6.0)), ((10.0, 10.0, 10.0), (10.0, 10.0, 10.0))]


@pytest.mark.parametrize(("sigma", "size"), LSD_SETTINGS, ids=["anisotropic", "isotropic"])
@pytest.mark.parametrize("ids", ["uint64-2**40", "uint64-2**63", "int64-negative", "bool",
                                 "uint32-sparse"])
def test_lsd_matches_the_per_voxel_loop(ids, sigma, size):
    dtype, values = ID_SETS[ids]
    labels = blocky(2, dtype, values)
    got = local_shape_descriptors(labels, sigma, size)
    assert got.dtype == np.float32 and got.shape == (10, *SHAPE)
    np.testing.assert_allclose(got, lsd_reference(labels, sigma, size), atol=2e-5, rtol=0)


def test_lsd_of_many_small_objects_a_single_voxel_and_border_objects():
    sigma, size = (40.0, 10.0, 15.0), (20.0, 4.0, 6.0)
    rng = np.random.default_rng(0)
    ids = np.array([0, *rng.integers(1, 2**45, 12)], np.uint64)  # not contiguous, large
    labels = rng.choice(ids, size=SHAPE)
    labels[:, :3, :3] = ids[1]  # touching three faces
    labels[:, 3:, 3:] = ids[2]
    np.testing.assert_allclose(local_shape_descriptors(labels, sigma, size),
                               lsd_reference(labels, sigma, size), atol=2e-5, rtol=0)
    single = np.zeros(SHAPE, np.uint64)
    single[0, 0, 5] = 2**40  # one voxel, in a corner
    got = local_shape_descriptors(single, sigma, size)
    want = lsd_reference(single, sigma, size)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
    np.testing.assert_allclose(got[[0, 1, 2, 6, 7, 8], 0, 0, 5], 0.5, atol=1e-6)
    assert (got[:, single == 0] == 0).all()


def test_lsd_target_float16_and_mask_match_the_loop():
    sigma, size = (40.0, 10.0, 15.0), (20.0, 4.0, 6.0)
    labels = blocky(5, np.uint64, (0, 2**40, 2**40 + 1, 3))
    valid = np.random.default_rng(5).random(SHAPE) < 0.8
    target, mask = LocalShapeDescriptors(sigma=sigma, downsample=(1, 1, 1))(
        Patch(labels, valid.astype(np.uint8) * 3, voxel_size=size))
    assert target.dtype == np.float16 and target.shape == (10, *SHAPE)
    assert mask.dtype == np.uint8 and mask.shape == (1, *SHAPE)
    kept = np.where(valid, labels, 0)
    np.testing.assert_array_equal(mask[0], (kept != 0).astype(np.uint8))
    np.testing.assert_allclose(target, lsd_reference(kept, sigma, size), atol=2.5e-4, rtol=0)


def test_lsd_of_a_crop_is_the_crop_of_the_whole_where_the_window_fits():
    labels = blocky(5, np.uint64, (0, 4, 2**40, 9, 11), shape=(6, 15, 15), noise=0.0)
    sigma, size = (10.0, 8.0, 8.0), (10.0, 4.0, 4.0)  # radius 3 sections, 6 voxels in-plane
    whole = local_shape_descriptors(labels, sigma, size)
    box = (slice(0, 6), slice(1, 15), slice(0, 14))
    part = local_shape_descriptors(labels[box], sigma, size)
    # z is whole; in-plane, voxels 6 or more from the crop's cut faces (y 1 low, x 14 high)
    np.testing.assert_allclose(part[:, :, 6:, :8], whole[(slice(None), *box)][:, :, 6:, :8],
                               atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- validation padding


def test_validation_padding_leaves_the_targets_of_valid_voxels_alone(tmp_path):
    from emrun.data.loader import unpack, validation_batches
    from emrun.recipe import Recipe

    shape = (3, 16, 16)  # one section fewer than the patch: padded to 4
    np.save(tmp_path / "image.npy", np.random.default_rng(0).integers(0, 256, shape, np.uint8))
    np.save(tmp_path / "labels.npy", np.full(shape, 7, np.uint32))  # one object, everywhere
    source = {"image": str(tmp_path / "image.npy"), "labels": str(tmp_path / "labels.npy"),
              "voxel_size": [30, 4, 4]}
    recipe = Recipe.model_validate({
        "name": "t", "seed": 3,
        "data": {"sources": {"a": source}, "validation": {"v": source}},
        "model": {"type": "rsunet", "widths": [4, 8]},
        "tasks": {"b": {"target": {"type": "boundary"}},
                  "d": {"target": {"type": "distance", "clip": 40}}},
        "train": {"patch": [4, 16, 16], "iterations": 1, "batch_size": 1, "workers": 0},
    })
    [batch] = [unpack(b) for b in validation_batches(recipe)]
    labels = np.full(shape, 7, np.uint32)
    boundary, _ = Boundary()(Patch(labels))
    distance, _ = Distance(clip=40.0)(Patch(labels, voxel_size=(30.0, 4.0, 4.0)))
    for name, unpadded in (("b", boundary), ("d", distance)):
        mask = batch["mask"][name][0].numpy()
        assert mask[:, :3].all() and not mask[:, 3].any()
        np.testing.assert_allclose(batch["target"][name][0].numpy()[:, :3],
                                   unpadded.astype(np.float32), atol=5e-4,
                                   err_msg=f"task {name}")
