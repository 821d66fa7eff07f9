"""Training targets: affinities (against a direct loop), relabelling, boundary, binary, synapse."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from scipy import ndimage

from emrun.data.targets import (
    Affinity,
    Binary,
    Boundary,
    Patch,
    Synapse,
    relabel_components,
)
from emrun.errors import UserError
from emrun.recipe.tasks import AffinityTarget, BinaryTarget, BoundaryTarget, SynapseTarget
from emrun.registry import targets

NEAREST = [(-1, 0, 0), (0, -1, 0), (0, 0, -1)]
LONG_RANGE = [(-2, 0, 0), (-3, 0, 0), (0, -3, 0), (0, 0, -3), (0, -6, 0), (0, 0, -9)]
MIXED = [(0, 2, -3), (3, 0, 0), (1, -1, 1), (-1, 2, 0), (0, 0, 1), (2, -4, 5)]
OUTSIDE = [(0, 0, -27), (0, 0, 10), (-6, 0, 0), (0, 9, 0)]  # patch is 6x9x10: none fits


def affinity_reference(labels, mask, offsets, zero="mask"):
    """The convention, voxel by voxel: slow and obvious."""
    shape = labels.shape
    target = np.zeros((len(offsets), *shape), np.float32)
    weight = np.zeros((len(offsets), *shape), np.float32)
    for c, offset in enumerate(offsets):
        for z in range(shape[0]):
            for y in range(shape[1]):
                for x in range(shape[2]):
                    q = (z + offset[0], y + offset[1], x + offset[2])
                    if not all(0 <= q[a] < shape[a] for a in range(3)):
                        continue
                    a, b = labels[z, y, x], labels[q]
                    if zero == "mask" and (a == 0 or b == 0):
                        continue
                    if mask is not None and not (mask[z, y, x] and mask[q]):
                        continue
                    weight[c, z, y, x] = 1
                    target[c, z, y, x] = float(a == b and a != 0)
    return target, weight


@pytest.mark.parametrize("seed", range(4))
def test_affinity_zero_as_boundary_matches_the_loop(seed):
    rng = np.random.default_rng(100 + seed)
    labels = rng.integers(0, 4, (5, 7, 8)).astype(np.uint32)
    mask = rng.random(labels.shape) > 0.2
    offsets = ((-1, 0, 0), (0, -1, 0), (0, 0, -1), (0, -3, 2), (2, 0, 0))
    target, weight = Affinity(offsets=offsets, relabel=False, zero="boundary")(
        Patch(labels, mask))
    want_t, want_m = affinity_reference(labels, mask, offsets, zero="boundary")
    np.testing.assert_array_equal(target, want_t)
    np.testing.assert_array_equal(weight, want_m)
    assert weight[(labels == 0)[None].repeat(len(offsets), 0) & (weight > 0)].size > 0


def components_reference(labels):
    """6-connected components of each id with scipy, independent of cc3d."""
    out = np.zeros(labels.shape, np.int64)
    six = ndimage.generate_binary_structure(3, 1)
    n = 0
    for value in np.unique(labels):
        if value == 0:
            continue
        pieces, count = ndimage.label(labels == value, structure=six)
        out[pieces > 0] = pieces[pieces > 0] + n
        n += count
    return out


def random_patch(seed, dtype=np.uint32, with_mask=True, shape=(6, 9, 10), ids=(0, 3, 7, 12)):
    rng = np.random.default_rng(seed)
    # Blocky labels (2x2 in-plane runs) so that equal neighbours are common.
    small = rng.choice(np.array(ids, dtype=dtype), size=(shape[0], shape[1] // 2 + 1,
                                                          shape[2] // 2 + 1))
    labels = small.repeat(2, 1).repeat(2, 2)[:, : shape[1], : shape[2]]
    noise = rng.random(shape) < 0.15
    labels[noise] = rng.choice(np.array(ids, dtype=dtype), size=int(noise.sum()))
    mask = (rng.random(shape) < 0.8).astype(np.uint8) if with_mask else None
    return labels, mask


def check_shape(arrays, channels, shape):
    for array in arrays:
        assert array.dtype == np.uint8
        assert array.shape == (channels, *shape)


# --------------------------------------------------------------------------- affinity


@pytest.mark.parametrize("offsets", [NEAREST, LONG_RANGE, MIXED, OUTSIDE],
                         ids=["nearest", "long-range", "mixed", "outside"])
@pytest.mark.parametrize("with_mask", [False, True], ids=["no-mask", "mask"])
def test_affinity_matches_reference(offsets, with_mask):
    for seed in range(3):
        labels, mask = random_patch(seed, with_mask=with_mask)
        got_t, got_m = Affinity(offsets=tuple(offsets), relabel=False)(Patch(labels, mask))
        want_t, want_m = affinity_reference(labels, mask, offsets)
        check_shape((got_t, got_m), len(offsets), labels.shape)
        np.testing.assert_array_equal(got_m, want_m)
        np.testing.assert_array_equal(got_t, want_t)
        if offsets is not OUTSIDE:  # the random cases do exercise both classes
            assert got_m.sum() > 0 and (got_t * got_m).sum() > 0
            assert ((1 - got_t) * got_m).sum() > 0


def test_offsets_outside_the_patch_are_all_masked():
    labels, _ = random_patch(0, with_mask=False)
    target, mask = Affinity(offsets=tuple(OUTSIDE), relabel=False)(Patch(labels))
    assert not target.any() and not mask.any()


@pytest.mark.parametrize(
    ("dtype", "ids"),
    [(np.uint8, (0, 1, 2, 200)), (np.int32, (0, 5, 70000, 9)),
     (np.uint64, (0, 2**40, 2**40 + 1, 2**63 + 5)), (np.int64, (0, -4, 3, 2**35))],
)
def test_affinity_label_dtypes(dtype, ids):
    labels, mask = random_patch(4, dtype=dtype, ids=ids)
    offsets = NEAREST + MIXED
    target, weight = Affinity(offsets=tuple(offsets), relabel=False)(Patch(labels, mask))
    want_t, want_m = affinity_reference(labels, mask, offsets)
    np.testing.assert_array_equal(weight, want_m)
    np.testing.assert_array_equal(target, want_t)


def test_affinity_with_relabel_matches_reference_on_components():
    offsets = NEAREST + LONG_RANGE + MIXED
    for seed in range(3):
        labels, mask = random_patch(seed + 10)
        got_t, got_m = Affinity(offsets=tuple(offsets), relabel=True)(Patch(labels, mask))
        want_t, want_m = affinity_reference(components_reference(labels), mask, offsets)
        np.testing.assert_array_equal(got_m, want_m)
        np.testing.assert_array_equal(got_t, want_t)


def test_relabel_splits_a_cut_id_and_merges_nothing():
    # One id (5) whose connection ran outside the crop: two pieces in the patch. Next to it
    # two ids (1, 2) that touch: they must stay apart.
    labels = np.array([[[5, 5, 0, 5, 5, 1, 1, 2, 2]]], dtype=np.uint64)
    patch = Patch(labels)
    far = ((0, 0, -3),)
    plain_t, plain_m = Affinity(offsets=far, relabel=False)(patch)
    split_t, split_m = Affinity(offsets=far, relabel=True)(patch)
    # x=3 (5) looks back at x=0 (5): one object without relabelling, two with.
    assert plain_m[0, 0, 0, 3] == 1 and plain_t[0, 0, 0, 3] == 1
    assert split_m[0, 0, 0, 3] == 1 and split_t[0, 0, 0, 3] == 0
    near_t, near_m = Affinity(offsets=((0, 0, -1),), relabel=True)(patch)
    np.testing.assert_array_equal(near_m[0, 0, 0], [0, 1, 0, 0, 1, 1, 1, 1, 1])
    np.testing.assert_array_equal(near_t[0, 0, 0], [0, 1, 0, 0, 1, 0, 1, 0, 1])

    relabelled = relabel_components(labels)
    assert relabelled.dtype.kind == "u"
    assert (relabelled == 0).sum() == 1 and relabelled[0, 0, 2] == 0
    assert len(np.unique(relabelled[relabelled > 0])) == 4


def test_relabel_is_a_refinement():
    # Pieces touching only along an edge are separate under 6-connectivity.
    labels = np.zeros((2, 2, 2), np.uint32)
    labels[0, 0, 0] = labels[1, 1, 0] = 7
    assert len(np.unique(relabel_components(labels))) == 3  # 0 and two pieces
    for seed in range(5):
        labels, _ = random_patch(seed + 20)
        new = relabel_components(labels)
        assert ((new == 0) == (labels == 0)).all()
        pairs = np.unique(np.stack([new.ravel(), labels.ravel().astype(np.int64)]), axis=1)
        assert len(np.unique(pairs[0])) == pairs.shape[1]  # each new id maps to one old id
        assert len(np.unique(new)) == len(np.unique(components_reference(labels)))


def test_affinity_needs_labels_and_matching_mask():
    with pytest.raises(UserError, match="affinity target needs labels"):
        Affinity(offsets=tuple(NEAREST))(Patch(semantic={"mito": np.zeros((2, 2, 2))}))
    with pytest.raises(ValueError, match="mask has shape"):
        Affinity(offsets=tuple(NEAREST))(Patch(np.ones((2, 3, 4), np.uint8),
                                               np.ones((2, 3, 3), bool)))
    with pytest.raises(ValueError, match="integer ids"):
        Affinity(offsets=tuple(NEAREST))(Patch(np.ones((2, 3, 4), np.float32)))


# --------------------------------------------------------------------------- boundary


def test_boundary_width_one():
    labels = np.array(
        [[[1, 1, 1, 2, 2],
          [1, 1, 1, 2, 2],
          [1, 1, 1, 2, 2],
          [0, 1, 1, 1, 1]]],
        dtype=np.uint64,
    )
    target, mask = Boundary(width=1)(Patch(labels))
    want = np.array(
        [[[0, 0, 1, 1, 0],
          [0, 0, 1, 1, 0],
          [1, 0, 1, 1, 1],
          [1, 1, 0, 1, 1]]],
        dtype=np.float32,
    )
    check_shape((target, mask), 1, labels.shape)
    np.testing.assert_array_equal(target[0], want)
    assert (mask == 1).all()


def test_boundary_counts_z_neighbours_and_dilates_in_plane_only():
    labels = np.ones((3, 5, 5), np.uint16)
    labels[2] = 2  # sections 1 and 2 differ everywhere: both are boundary
    target, _ = Boundary(width=1)(Patch(labels))
    assert not target[0, 0].any() and target[0, 1:].all()

    labels = np.ones((3, 7, 7), np.uint16)
    labels[1, 3, 3] = 0  # one unlabelled voxel in the middle section
    one, _ = Boundary(width=1)(Patch(labels))
    cross = ndimage.generate_binary_structure(2, 1).astype(np.float32)
    np.testing.assert_array_equal(one[0, 1, 2:5, 2:5], cross)  # itself + 4 in-plane neighbours
    assert one[0, 0].sum() == 1 and one[0, 0, 3, 3] == 1  # its z neighbours
    two, _ = Boundary(width=2)(Patch(labels))
    want = ndimage.binary_dilation(one[0] > 0, structure=np.ones((1, 3, 3), bool))
    np.testing.assert_array_equal(two[0], want.astype(np.float32))
    assert two[0, 0].sum() == 9 and two[0, 1].sum() == 21  # 3x3 square; cross dilated


def test_boundary_mask_comes_from_the_patch():
    labels = np.ones((2, 4, 4), np.uint8)
    patch_mask = np.zeros((2, 4, 4), np.uint8)
    patch_mask[:, 1:3] = 5
    _, mask = Boundary()(Patch(labels, patch_mask))
    np.testing.assert_array_equal(mask[0], (patch_mask != 0).astype(np.float32))
    with pytest.raises(UserError, match="boundary target needs labels"):
        Boundary()(Patch())


# --------------------------------------------------------------------------- binary, synapse


def test_binary_is_foreground_of_the_named_volume():
    mito = np.zeros((2, 3, 4), np.uint16)
    mito[1, 1, 2] = 3
    mito[0, 0, 0] = 1
    patch_mask = np.ones((2, 3, 4), bool)
    patch_mask[0] = False
    target, mask = Binary(volume="mito")(Patch(None, patch_mask, {"mito": mito}))
    check_shape((target, mask), 1, mito.shape)
    np.testing.assert_array_equal(target[0], (mito != 0).astype(np.float32))
    np.testing.assert_array_equal(mask[0], patch_mask.astype(np.float32))
    _, mask = Binary(volume="mito")(Patch(semantic={"mito": mito.astype(bool)}))
    assert (mask == 1).all()


def test_binary_missing_volume_is_named():
    patch = Patch(np.ones((1, 2, 2), np.uint8), semantic={"synapse": np.zeros((1, 2, 2))})
    with pytest.raises(ValueError, match=r"binary target needs the semantic volume 'mito'.*"
                                         r"has: synapse"):
        Binary(volume="mito")(patch)
    with pytest.raises(ValueError, match=r"synapse target needs the semantic volume 'cleft'"):
        Synapse(volume="cleft")(patch)
    with pytest.raises(ValueError, match="expected"):
        Binary(volume="synapse")(Patch(np.ones((1, 2, 3), np.uint8), semantic=patch.semantic))


def test_synapse_dilates_in_plane():
    cleft = np.zeros((3, 7, 7), np.uint8)
    cleft[1, 3, 3] = 1
    patch = Patch(semantic={"synapse": cleft})
    plain, _ = Synapse()(patch)
    np.testing.assert_array_equal(plain[0], cleft.astype(np.float32))
    one, _ = Synapse(dilation=1)(patch)
    assert one[0, 1, 2:5, 2:5].all() and one.sum() == 9  # 3x3 square, same section
    two, _ = Synapse(dilation=2)(patch)
    assert two[0, 1, 1:6, 1:6].all() and two.sum() == 25


# --------------------------------------------------------------------------- registry


def test_registry_builds_working_targets():
    offsets = [(-1, 0, 0), (0, -3, 0), (0, 0, -9)]
    affinity = targets.build(AffinityTarget(offsets=offsets))
    assert affinity.channels == 3
    labels, mask = random_patch(1)
    target, weight = affinity(Patch(labels, mask))
    want_t, want_m = affinity_reference(components_reference(labels), mask, offsets)
    np.testing.assert_array_equal(target, want_t)
    np.testing.assert_array_equal(weight, want_m)

    assert targets.build(BoundaryTarget(width=2)) == Boundary(width=2)
    assert targets.build(BinaryTarget(volume="mito")) == Binary(volume="mito")
    synapse = targets.build(SynapseTarget(dilation=3))
    assert synapse == Synapse(volume="synapse", dilation=3) and synapse.channels == 1
    for spec in (AffinityTarget(), BoundaryTarget(), BinaryTarget(volume="m"), SynapseTarget()):
        assert targets.build(spec).channels == spec.channels()


def test_importing_the_implementation_registers_the_builders():
    code = (
        "import sys, numpy as np\n"
        "from emrun.registry import targets\n"
        "from emrun.recipe.tasks import AffinityTarget\n"
        "assert 'emrun.data.targets' not in sys.modules\n"
        "from emrun.data.targets import Patch\n"
        "t = targets.build(AffinityTarget())\n"
        "a, m = t(Patch(np.ones((2, 2, 2), np.uint8)))\n"
        "assert a.shape == (3, 2, 2, 2) and a.sum() == 12 and m.sum() == 12\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
