"""Probes of the numbers of training against independent numpy/scipy references: targets
(affinities, distance, local shape descriptors on one-voxel-thin parts), losses (autocast,
non-finite logits under the mask, margins, empty Dice, MALIS on degenerate patches) and
models (odd factors, one level, one channel: shapes and facts)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy import ndimage

from emrun.data.lsd import auto_factor, local_shape_descriptors
from emrun.data.targets import Affinity, Distance, Patch
from emrun.losses import BCE, MSE, Dice, DiceBCE, Malis, malis_weights
from emrun.models import (
    empirical_receptive_field,
    model_facts,
    output_problem,
    parameter_count,
)
from emrun.recipe.model import RSUNet, UpDown
from emrun.recipe.unets import MedNeXt, ResEnc
from emrun.registry import models

PAIRS = ((0, 1), (0, 2), (1, 2))
NEAREST = ((-1, 0, 0), (0, -1, 0), (0, 0, -1))


# --------------------------------------------------------------------------- references


def lsd_at(labels: np.ndarray, sigma: tuple[float, ...], size: tuple[float, ...],
           points: np.ndarray) -> np.ndarray:
    """The LSD definition in float64 at the given voxels only (10, n): explicit window sums
    of the voxel's object, truncated at 3 sigma, not renormalised at the patch edge."""
    sigma_nm, nm = np.asarray(sigma, float), np.asarray(size, float)
    in_voxels = sigma_nm / nm
    radius = [int(3.0 * s + 0.5) for s in in_voxels]
    kernels = [np.exp(-0.5 * (np.arange(-r, r + 1) / s) ** 2)
               for r, s in zip(radius, in_voxels, strict=True)]
    kernels = [k / k.sum() for k in kernels]
    out = []
    for v in points:
        lo = [max(0, c - r) for c, r in zip(v, radius, strict=True)]
        hi = [min(n, c + r + 1) for c, r, n in zip(v, radius, labels.shape, strict=True)]
        weights = np.ones([b - a for a, b in zip(lo, hi, strict=True)])
        for axis in range(3):
            k = kernels[axis][lo[axis] - v[axis] + radius[axis]:hi[axis] - v[axis] + radius[axis]]
            weights = weights * k.reshape([-1 if a == axis else 1 for a in range(3)])
        window = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        weights = weights * (labels[window] == labels[tuple(v)])
        grid = np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi, strict=True)],
                           indexing="ij")
        where = np.stack(grid, axis=-1) * nm
        mass = weights.sum()
        mean = (weights[..., None] * where).sum(axis=(0, 1, 2)) / mass
        d = where - mean
        cov = np.einsum("zyx,zyxa,zyxb->ab", weights, d, d) / mass
        var = [max(cov[a, a], 1e-3) for a in range(3)]
        channels = [*(0.5 + 0.5 * (mean - np.asarray(v) * nm) / sigma_nm),
                    *(cov[a, a] / sigma_nm[a] ** 2 for a in range(3)),
                    *(0.5 + 0.5 * cov[a, b] / np.sqrt(var[a] * var[b]) for a, b in PAIRS),
                    mass]
        out.append(np.clip(channels, 0, 1))
    return np.array(out).T


def affinity_reference(labels: np.ndarray, valid: np.ndarray | None,
                       offsets: list[tuple[int, int, int]], zero: str
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Affinity target and mask, pair by pair, as the docstring of ``Affinity`` states."""
    target = np.zeros((len(offsets), *labels.shape), np.uint8)
    mask = np.zeros_like(target)
    for c, offset in enumerate(offsets):
        for p in itertools.product(*map(range, labels.shape)):
            q = tuple(a + d for a, d in zip(p, offset, strict=True))
            if not all(0 <= a < n for a, n in zip(q, labels.shape, strict=True)):
                continue  # the other end lies outside the patch
            if valid is not None and not (valid[p] and valid[q]):
                continue
            a, b = labels[p], labels[q]
            if zero == "mask" and (a == 0 or b == 0):
                continue
            mask[c][p] = 1
            target[c][p] = a == b and a != 0
    return target, mask


def thin_line_object(shape: tuple[int, int, int], body: int) -> np.ndarray:
    """One object: a block in a corner plus a one-voxel-thin line along x far from it."""
    labels = np.zeros(shape, np.int32)
    labels[:, :body, :body] = 1
    labels[shape[0] - 2, shape[1] - 3, body:] = 1
    return labels


# --------------------------------------------------------------------------- LSD


def test_lsd_pearson_on_a_one_voxel_thin_part_of_a_large_object_is_exact():
    # float32 window sums about the centre of the object's box cancelled badly on a thin
    # line far from that centre: variances there are 0, and the noise of the covariance
    # divided by the 1e-3 nm^2 floor put the zy correlation at 0 or 1 instead of 0.5
    labels = thin_line_object((12, 48, 128), body=16)
    sigma, size = (80.0, 80.0, 80.0), (40.0, 4.0, 4.0)
    points = np.argwhere(labels != 0)
    points = points[points[:, 2] >= 20][::2]
    got = local_shape_descriptors(labels, sigma, size)[(slice(None), *points.T)]
    np.testing.assert_allclose(got, lsd_at(labels, sigma, size, points), atol=1e-4)


@pytest.mark.parametrize("factor", [(1, 6, 6), (2, 3, 3)])
def test_lsd_pearson_on_a_thin_line_stays_neutral_on_a_coarse_grid(factor):
    labels = thin_line_object((12, 48, 160), body=16)
    got = local_shape_descriptors(labels, (80.0, 80.0, 80.0), (40.0, 4.0, 4.0), factor)
    # beyond the window's reach of the block the line is alone: no spread across it, so
    # no correlation, whatever the block size
    np.testing.assert_allclose(got[6:9, 10, 45, 90:], 0.5, atol=1e-4)


def test_lsd_follows_anisotropic_sigma_and_voxel_size_per_axis():
    rng = np.random.default_rng(4)
    labels = ndimage.zoom(rng.integers(0, 4, (3, 4, 4)), (3, 6, 5), order=0).astype(np.int32)
    labels[4, 7, :] = 2  # a thin line through the others
    for sigma, size in [((90.0, 24.0, 20.0), (30.0, 6.0, 4.0)), ((20.0, 45.0, 12.0),
                                                                    (10.0, 9.0, 3.0))]:
        points = np.argwhere(labels != 0)[::11]
        got = local_shape_descriptors(labels, sigma, size)[(slice(None), *points.T)]
        np.testing.assert_allclose(got, lsd_at(labels, sigma, size, points), atol=1e-4)
    assert auto_factor((3.0, 20.0, 6.5)) == (1, 6, 2)


# --------------------------------------------------------------------------- affinities


@pytest.mark.parametrize("zero", ["mask", "boundary"])
def test_affinity_equals_the_pairwise_reference(zero):
    rng = np.random.default_rng(0)
    offsets = [(-1, 0, 0), (0, -1, 0), (0, 0, -1), (1, 0, 0), (0, 2, -3), (7, 0, 0),
               (0, 0, 9), (-3, 4, 5), (0, -40, 0)]  # some as large as the patch or larger
    for trial in range(12):
        shape = tuple(int(n) for n in rng.integers(1, 8, 3))
        labels = rng.integers(0, 3, shape).astype([np.uint8, np.int64, np.uint64][trial % 3])
        valid = rng.random(shape) > 0.25 if trial % 2 else None
        target, mask = Affinity(tuple(offsets), relabel=False, zero=zero)(
            Patch(labels, valid))
        want_target, want_mask = affinity_reference(labels, valid, offsets, zero)
        np.testing.assert_array_equal(target, want_target)
        np.testing.assert_array_equal(mask, want_mask)


def test_affinity_relabels_pieces_of_one_id_like_scipy_components():
    rng = np.random.default_rng(1)
    for _ in range(6):
        labels = rng.integers(0, 3, (3, 6, 7))
        pieces = np.zeros(labels.shape, np.int64)
        for i in (1, 2):
            found, _ = ndimage.label(labels == i)
            pieces[found > 0] = found[found > 0] + pieces.max()
        target, mask = Affinity((*NEAREST, (0, 0, 3)))(Patch(labels))
        want_target, want_mask = affinity_reference(pieces, None, [*NEAREST, (0, 0, 3)],
                                                    "mask")
        np.testing.assert_array_equal(target, want_target)
        np.testing.assert_array_equal(mask, want_mask)


# --------------------------------------------------------------------------- distance


@pytest.mark.parametrize("signed", [False, True])
def test_distance_equals_scipy_per_object(signed):
    size = (40.0, 4.0, 6.0)
    rng = np.random.default_rng(2)
    for _ in range(8):
        labels = ndimage.zoom(rng.integers(0, 4, (3, 3, 3)), (2, 4, 3), order=0)
        target, _ = Distance(clip=50.0, signed=signed)(Patch(labels, voxel_size=size))
        want = np.zeros(labels.shape)
        for i in np.unique(labels[labels != 0]):
            inside = labels == i
            d = (np.full(labels.shape, np.inf) if inside.all()
                 else ndimage.distance_transform_edt(inside, sampling=size))
            want[inside] = d[inside]
        want = np.minimum(want, 50.0) / 50.0
        background = labels == 0
        if signed and background.any():
            d = (np.full(labels.shape, np.inf) if background.all()
                 else ndimage.distance_transform_edt(background, sampling=size))
            want[background] = -np.minimum(d[background], 50.0) / 50.0
        np.testing.assert_allclose(target[0].astype(float), want, atol=1e-3)


# --------------------------------------------------------------------------- losses


LOSSES = {
    "bce": BCE(), "bce_margins": BCE(0.1, 0.2), "bce_inverse": BCE(0.1, 0.2, "inverse"),
    "bce_balanced": BCE(0.1, 0.1, balance=True), "mse": MSE(), "dice": Dice(),
    "dice_bce": DiceBCE(), "malis": Malis((0, 1, 2)),
}


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits, 0/1 targets and a 0/1 mask, (2, 4, 3, 5, 5)."""
    g = torch.Generator().manual_seed(seed)
    shape = (2, 4, 3, 5, 5)
    logits = torch.randn(shape, generator=g) * 3
    target = (torch.rand(shape, generator=g) > 0.5).float()
    mask = (torch.rand(shape, generator=g) > 0.3).float()
    return logits, target, mask


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_loss_under_cpu_autocast_is_float32_and_close(name, dtype):
    loss = LOSSES[name]
    logits, target, mask = batch()
    expected = float(loss(logits, target, mask).loss)
    half = logits.to(dtype).requires_grad_()
    with torch.autocast("cpu", dtype=dtype):
        result = loss(half, target, mask)
    result.loss.backward()
    assert result.loss.dtype == torch.float32
    assert abs(float(result.loss.detach()) - expected) <= 0.02 * abs(expected) + 1e-6
    assert torch.isfinite(half.grad).all()


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_non_finite_logits_under_the_mask_change_nothing(name):
    loss = LOSSES[name]
    logits, target, mask = batch(1)
    expected = float(loss(logits, target, mask).loss)
    bad = logits.clone()
    bad[mask == 0] = float("nan")
    bad[(mask == 0) & (target > 0)] = float("inf")
    negative = ((mask == 0) & (target == 0)).flatten().nonzero().flatten()[::2]
    bad.view(-1)[negative] = -float("inf")
    bad.requires_grad_()
    result = loss(bad, target, mask)
    result.loss.backward()
    assert torch.isfinite(result.loss)
    assert float(result.loss.detach()) == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert (bad.grad[mask == 0] == 0).all() and torch.isfinite(bad.grad).all()


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_a_nan_logit_where_valid_is_not_hidden(name):
    """MALIS took a NaN off its maximin trees as 0.5 and hid it: a diverged network
    trained on, unseen by the trainer's non-finite count."""
    logits, target, mask = batch(2)
    logits[0, 1, 1, 2, 2] = float("nan")
    mask[0, 1, 1, 2, 2] = 1
    assert torch.isnan(LOSSES[name](logits, target, mask).loss)


def test_margins_drop_exactly_the_voxels_beyond_them():
    p = torch.tensor([0.69, 0.71, 0.29, 0.31])  # margin1 0.3 drops positives above 0.7,
    target = torch.tensor([1.0, 1.0, 0.0, 0.0])  # margin0 0.3 negatives below 0.3
    logits = torch.logit(p).view(1, 1, 1, 1, 4)
    result = BCE(margin0=0.3, margin1=0.3)(logits, target.view(logits.shape),
                                           torch.ones_like(logits))
    assert float(result.valid) == 2
    kept = -np.log(0.69) - np.log(1 - 0.31)
    assert float(result.loss) == pytest.approx(kept / 2, rel=1e-5)


def test_dice_of_an_empty_target_is_not_a_nan():
    logits = torch.full((1, 2, 2, 4, 4), -30.0)
    empty = torch.zeros_like(logits)
    result = Dice(eps=1e-6)(logits, empty, torch.ones_like(logits))
    assert torch.isfinite(result.loss) and float(result.loss) < 1e-3
    result = DiceBCE()(logits, empty, torch.ones_like(logits))
    assert torch.isfinite(result.loss) and float(result.loss) < 1e-3


def malis_on(labels: np.ndarray, zero: str) -> tuple[float, float, torch.Tensor]:
    """MALIS's (positive, negative) pair totals on a labelled patch, and the gradient."""
    target, mask = Affinity(NEAREST, zero=zero)(Patch(labels))
    t = torch.from_numpy(target[None]).float()
    m = torch.from_numpy(mask[None]).float()
    logits = torch.randn(t.shape, generator=torch.Generator().manual_seed(0),
                         requires_grad=True)
    result = Malis((0, 1, 2))(logits, t, m)
    result.loss.backward()
    assert torch.isfinite(result.loss)
    pos, neg = malis_weights(torch.sigmoid(logits).detach().numpy()[0], target > 0,
                             mask > 0)
    return float(pos.sum()), float(neg.sum()), logits.grad


def test_malis_on_one_segment_counts_every_pair_once_and_nothing_negative():
    pos, neg, grad = malis_on(np.ones((3, 4, 5), np.int32), "mask")
    assert (pos, neg) == (60 * 59 / 2, 0.0)
    assert (grad != 0).sum() == 59  # a spanning tree of 60 voxels


def test_malis_on_a_background_patch():
    pos, neg, grad = malis_on(np.zeros((3, 4, 5), np.int32), "mask")
    assert (pos, neg) == (0.0, 0.0) and (grad == 0).all()  # nothing labelled: no pair
    pos, neg, grad = malis_on(np.zeros((3, 4, 5), np.int32), "boundary")
    assert (pos, neg) == (0.0, 60 * 59 / 2)  # membrane voxels all apart


def test_malis_on_two_objects_counts_pairs_by_object():
    labels = np.ones((3, 4, 5), np.int32)
    labels[..., 2:] = 2
    pos, neg, _ = malis_on(labels, "mask")
    assert (pos, neg) == (24 * 23 / 2 + 36 * 35 / 2, 24 * 36)


# --------------------------------------------------------------------------- models


SPECS = [
    RSUNet(widths=[2]),
    RSUNet(widths=[2, 3], downsample=[(3, 1, 3)], kernel=(1, 3, 5), input_kernel=(3, 1, 1),
           in_channels=2),
    RSUNet(widths=[4, 4, 4], norm="group", groups=2, upsample="transpose",
           downsample=[(1, 3, 3), (2, 1, 1)]),
    UpDown(widths=[2, 4], factor=(1, 3, 3)),
    ResEnc(widths=[2, 3], downsample=[(3, 3, 1)], upsample="interp", kernel=(1, 1, 1)),
    ResEnc(widths=[4, 4, 4], blocks=[1, 2, 1], norm="batch", activation="gelu",
           downsample=[(1, 3, 3), (2, 1, 1)], in_channels=3),
    MedNeXt(widths=[2, 4], downsample=[(3, 3, 3)], kernel=(3, 3, 3)),
    MedNeXt(widths=[4, 4, 4], blocks=[1, 1, 1], norm="group", groups=2,
            downsample=[(1, 3, 3), (1, 1, 1)], kernel=(1, 5, 3)),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.type}-{len(s.widths)}")
def test_odd_models_keep_the_input_size_and_report_their_facts(spec):
    heads = {"affinity": 3, "mito": 1}
    model = models.build(spec, head_channels=heads)
    d = spec.divisor()
    for times in [(2, 2, 2), (3, 2, 1) if spec.norm != "instance" else (3, 2, 2)]:
        size = tuple(a * b for a, b in zip(d, times, strict=True))
        x = torch.randn(2, spec.input_channels(), *size)
        for training in (True, False):
            model.train(training)
            out = model(x)
            for task, channels in heads.items():
                assert out[task].shape == (2, channels, *size)
                assert torch.isfinite(out[task]).all()
    facts = model_facts(model, spec, tuple(2 * a for a in d))
    assert output_problem(model, heads, facts.divisor, spec.input_channels()) is None or (
        spec.norm == "instance")  # one voxel at the bottom: the recipe refuses that patch
    assert facts.divisor == d and facts.params == parameter_count(model)
    assert facts.accepts((2, *[3 * a for a in d]))
    for axis in (a for a in range(3) if d[a] > 1):
        assert not facts.accepts([n + (a == axis) for a, n in enumerate(d)])
    if spec.type in ("rsunet", "updown"):
        assert spec.parameter_count(list(heads.values())) == facts.params
    assert empirical_receptive_field(spec) == facts.receptive_field
