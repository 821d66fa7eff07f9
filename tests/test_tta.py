"""Test-time augmentation: variant order, exact inverses, affinity channel/shift mapping."""

from __future__ import annotations

import math

import pytest
import torch

from emrun.infer.tta import Variant, check_offsets, reduce, variants

OFFSETS = [
    (-1, 0, 0), (0, -1, 0), (0, 0, -1),
    (-2, 0, 0), (0, -3, 0), (0, 0, -3),
    (0, -9, 0), (0, 0, -9),
    (-8, 0, 0),  # as long as the patch: no voxel has a partner inside
]  # fmt: skip


def blocky_labels(shape=(8, 12, 12), seeds=14, seed=0) -> torch.Tensor:
    """Voronoi cells of random seed points (irregular blocks), with a few 0 (unlabelled)
    voxels sprinkled in."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.stack(
        torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in shape), indexing="ij"), -1
    ).reshape(-1, 3)
    points = torch.rand(seeds, 3, generator=g) * torch.tensor(shape, dtype=torch.float32)
    labels = torch.cdist(grid * torch.tensor([2.0, 1.0, 1.0]), points * torch.tensor([2.0, 1, 1]))
    labels = labels.argmin(1).reshape(shape) + 1
    labels[torch.rand(shape, generator=g) < 0.05] = 0
    return labels


def true_affinity(labels: torch.Tensor, offsets) -> torch.Tensor:
    """aff_c(p) = labels[p] == labels[p + o_c] != 0 where p + o_c is inside, else 0."""
    shape = labels.shape
    out = torch.zeros((len(offsets), *shape))
    for c, o in enumerate(offsets):
        if any(abs(d) >= n for d, n in zip(o, shape, strict=True)):
            continue
        at_p = tuple(slice(max(0, -d), n - max(0, d)) for d, n in zip(o, shape, strict=True))
        at_q = tuple(slice(max(0, d), n - max(0, -d)) for d, n in zip(o, shape, strict=True))
        a, b = labels[at_p], labels[at_q]
        out[(c, *at_p)] = ((a == b) & (a != 0)).float()
    return out


def test_true_affinity_reference():
    """The test's reference against a voxel-by-voxel loop on a small volume."""
    labels = blocky_labels(shape=(3, 4, 5), seeds=4, seed=5)
    offsets = [(-1, 0, 0), (0, -2, 0), (0, 0, -1), (0, 1, 0), (-3, 0, 0)]
    expected = torch.zeros((len(offsets), 3, 4, 5))
    for c, o in enumerate(offsets):
        for p in torch.cartesian_prod(*(torch.arange(n) for n in (3, 4, 5))).tolist():
            q = [a + b for a, b in zip(p, o, strict=True)]
            if all(0 <= v < n for v, n in zip(q, (3, 4, 5), strict=True)):
                a, b = labels[tuple(p)], labels[tuple(q)]
                expected[(c, *p)] = float(a == b and a != 0)
    assert torch.equal(true_affinity(labels, offsets), expected)
    assert expected.sum() > 0 and (expected == 0).sum() > 0


def partner_outside(shape, o) -> torch.Tensor:
    """Voxels p with p + o outside the patch."""
    idx = torch.meshgrid(*(torch.arange(n) for n in shape), indexing="ij")
    inside = torch.ones(shape, dtype=torch.bool)
    for i, n, d in zip(idx, shape, o, strict=True):
        inside &= (i + d >= 0) & (i + d < n)
    return ~inside


def test_variant_counts_order_and_uniqueness():
    for n in (1, 2, 4, 8, 16):
        vs = variants(n, square_yx=True)
        assert len(vs) == n
        assert len(set(vs)) == n
        assert vs[0].is_identity
        assert vs == variants(16)[:n]  # nested: a larger tta only adds variants
    names = [v.name for v in variants(16)]
    assert names[:4] == ["identity", "flip-x", "flip-y", "flip-yx"]
    assert all("transpose" not in name and "z" not in name for name in names[:4])
    assert all("z" not in name for name in names[:8])
    assert all(name.startswith("flip-z") for name in names[8:])
    assert variants(4, square_yx=False) == variants(4)
    with pytest.raises(ValueError, match="square"):
        variants(8, square_yx=False)
    for bad in (0, 3, 32):
        with pytest.raises(ValueError, match="tta"):
            variants(bad)


def test_dihedral_group_of_the_square():
    """The first 8 are closed under composition (a group), the 16 too."""
    x = torch.arange(3 * 4 * 4).reshape(1, 1, 3, 4, 4)
    for n in (8, 16):
        images = {tuple(v.apply(x).flatten().tolist()) for v in variants(n)}
        assert len(images) == n
        for a in variants(n):
            for b in variants(n):
                assert tuple(b.apply(a.apply(x)).flatten().tolist()) in images


@pytest.mark.parametrize("v", variants(16), ids=str)
def test_apply_invert_roundtrip(v: Variant):
    x = torch.randn(2, 3, 5, 7, 7)
    y = v.apply(x)
    assert y.shape == x.shape and y.is_contiguous()
    assert torch.equal(v.invert(y), x)
    if not v.is_identity:
        assert not torch.equal(y, x)
    # works on unbatched (c, z, y, x) and integer tensors too
    lab = torch.randint(0, 9, (1, 4, 6, 6))
    assert torch.equal(v.invert(v.apply(lab)), lab)


def test_transpose_needs_square_yx():
    v = Variant(transpose=True)
    with pytest.raises(ValueError, match="square"):
        v.apply(torch.zeros(1, 1, 2, 4, 5))
    flips = Variant(flip=(True, True, True))
    assert flips.invert(flips.apply(torch.ones(1, 1, 2, 4, 5))).shape == (1, 1, 2, 4, 5)


@pytest.mark.parametrize("v", variants(16), ids=str)
def test_invert_affinity_matches_truth(v: Variant):
    labels = blocky_labels()
    truth = true_affinity(labels, OFFSETS)
    transformed = v.apply(labels[None])[0]
    pred = true_affinity(transformed, OFFSETS)  # a perfect network on the transformed input
    back = v.invert_affinity(pred[None], OFFSETS)[0]
    assert back.shape == truth.shape
    nan = torch.isnan(back)
    assert torch.equal(back[~nan], truth[~nan])
    for d, o in enumerate(OFFSETS):
        border = partner_outside(labels.shape, o)
        assert not (nan[d] & ~border).any(), f"NaN at a voxel with a partner inside, {o}"
        # NaN exactly when the variant reversed this offset's direction
        # (single-axis offsets: reversed when the variant flips that axis of the original)
        reversed_ = any(f and c != 0 for f, c in zip(v.flip, o, strict=True))
        assert torch.equal(nan[d], border) if reversed_ else not nan[d].any()


def test_invert_affinity_flip_x_shifts_the_x_channel():
    """Hand-made case: under flip-x, channel (0,0,-1) comes back shifted by one voxel with a
    NaN first column; the y and z channels only move spatially."""
    labels = blocky_labels(shape=(3, 5, 6), seeds=5, seed=3)
    offsets = [(-1, 0, 0), (0, -1, 0), (0, 0, -1)]
    v = variants(2)[1]
    assert v.name == "flip-x"
    assert v.channel_map(offsets) == [(0, False), (1, False), (2, True)]
    back = v.invert_affinity(true_affinity(v.apply(labels[None])[0], offsets), offsets)
    assert torch.isnan(back[2, :, :, 0]).all()
    assert not torch.isnan(back[2, :, :, 1:]).any()
    assert not torch.isnan(back[:2]).any()
    assert torch.equal(back[2, :, :, 1:], true_affinity(labels, offsets)[2, :, :, 1:])


def test_symmetric_offsets_need_no_shift():
    offsets = [(0, 0, -1), (0, 0, 1), (0, -1, 0), (0, 1, 0), (-1, 0, 0), (1, 0, 0)]
    labels = blocky_labels(shape=(4, 6, 6), seeds=6, seed=1)
    truth = true_affinity(labels, offsets)
    for v in variants(16):
        back = v.invert_affinity(true_affinity(v.apply(labels[None])[0], offsets), offsets)
        assert torch.equal(back, truth)


def test_check_offsets():
    check_offsets(OFFSETS, variants(16))
    diagonal = [*OFFSETS, (0, -1, -1)]
    check_offsets(diagonal, variants(1))
    with pytest.raises(ValueError, match=r"flip-x.*\(0, -1, -1\)"):
        check_offsets(diagonal, variants(2))
    y_only = [(-1, 0, 0), (0, -1, 0), (0, 0, -1), (0, -9, 0)]
    check_offsets(y_only, variants(4))  # flips never mix axes
    with pytest.raises(ValueError, match=r"transpose.*\(0, -9, 0\)"):
        check_offsets(y_only, variants(8))
    # two channels onto one: (0,0,1) and (0,0,-1) both land on (0,-1,0) under transpose
    with pytest.raises(ValueError, match="both onto channel"):
        check_offsets([(0, 0, -1), (0, 0, 1), (0, -1, 0)], variants(8))
    with pytest.raises(ValueError, match="duplicates"):
        check_offsets([(0, 0, -1), (0, 0, -1)], variants(1))
    with pytest.raises(ValueError, match="offsets"):
        variants(2)[1].invert_affinity(torch.zeros(1, 2, 2, 2, 2), OFFSETS)


def test_reduce_semantics():
    nan = math.nan
    stack = torch.tensor([[0.2, 0.8, 0.5, 1.0], [9.0, 0.4, 0.1, 9.0], [9.0, 9.0, 0.3, 9.0]])
    gaps = torch.tensor([[False] * 4, [True, False, False, True], [True, True, False, True]])
    mean = reduce(stack, "mean", gaps)
    assert torch.allclose(mean, torch.tensor([0.2, 0.6, 0.3, 1.0]))
    assert torch.equal(reduce(stack, "min", gaps), torch.tensor([0.2, 0.4, 0.1, 1.0]))
    all_gaps = torch.tensor([[True, False], [True, True]])
    two = torch.tensor([[nan, 0.5], [nan, nan]])
    assert torch.equal(reduce(two, "mean", all_gaps), torch.tensor([0.0, 0.5]))
    assert torch.equal(reduce(two, "min", all_gaps), torch.tensor([0.0, 0.5]))
    assert torch.equal(reduce(two[:1], "mean", all_gaps[:1]), torch.tensor([0.0, 0.5]))
    assert torch.allclose(reduce(stack, "mean"), stack.mean(0))  # no gaps
    with pytest.raises(ValueError, match="mean"):
        reduce(stack, "median")


def test_reduce_keeps_a_network_s_nan_and_infinity_where_no_variant_has_a_gap():
    """A diverged network's NaN is a prediction, not a gap: it stays in the result for the
    engine to count (taken for a gap, every variant's NaN came out as 0.0, unreported)."""
    nan, inf = math.nan, math.inf
    stack = torch.tensor([[nan, 0.5, inf, 0.2], [0.3, nan, 0.1, 0.2]])
    gaps = torch.tensor([[False, False, False, False], [False, False, False, True]])
    for how in ("mean", "min"):
        out = reduce(stack, how, gaps)
        assert torch.isnan(out[:2]).all(), how
        assert out[3] == 0.2
    assert reduce(stack, "mean", gaps)[2] == inf
    assert reduce(stack, "min", gaps)[2] == pytest.approx(0.1)


def test_affinity_gaps_are_where_the_inverted_affinities_have_no_prediction():
    offsets = [(0, 0, -1), (0, -1, 0), (-1, 0, 0), (0, -3, 0), (0, 0, -3), (-4, 0, 0)]
    y = torch.rand(2, len(offsets), 3, 5, 5)  # (-4, 0, 0) flipped: no voxel has a partner
    for v in variants(16):
        gaps = v.affinity_gaps(offsets, y.shape)
        assert gaps.shape == (len(offsets), 3, 5, 5)
        assert torch.equal(gaps.expand_as(y), torch.isnan(v.invert_affinity(y, offsets))), v


@pytest.mark.parametrize("how", ["mean", "min"])
def test_full_tta_of_a_perfect_network_is_exact(how: str):
    """16 variants of an equivariant 'network', inverted and reduced: the truth, no NaN."""
    labels = blocky_labels(shape=(6, 10, 10), seeds=10, seed=2)
    offsets = OFFSETS[:8]
    vs = variants(16)
    check_offsets(offsets, vs)
    stack = torch.stack(
        [
            v.invert_affinity(
                true_affinity(v.apply(labels[None, None])[0, 0], offsets)[None], offsets
            )
            for v in vs
        ]
    )
    gaps = torch.stack([v.affinity_gaps(offsets, labels.shape) for v in vs])[:, None]
    out = reduce(stack, how, gaps)
    assert not torch.isnan(out).any()
    assert torch.equal(out[0], true_affinity(labels, offsets))
