"""Losses against slow, obvious references: margin BCE with masks and class balancing (values
and gradients by loops), Dice on empty targets, constrained MALIS pair counts from an
all-pairs bottleneck (Floyd-Warshall on max-min) rather than Kruskal, extreme and low-precision
logits, batch-order invariance and the recipe's task weights."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from emrun.losses import BCE, MSE, Dice, DiceBCE, Malis, malis_weights, total_loss
from emrun.recipe.loader import load_recipe
from emrun.recipe.tasks import NEAREST
from emrun.registry import losses

# ----------------------------------------------------------------------------- BCE reference


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def bce(x: float, y: float) -> float:
    """Stable BCE on a logit, by hand."""
    return max(x, 0.0) - x * y + math.log1p(math.exp(-abs(x)))


def ref_bce(logits: np.ndarray, target: np.ndarray, mask: np.ndarray, margin0: float = 0.0,
            margin1: float = 0.0, mode: str = "mask", balance: bool = False
            ) -> tuple[float, np.ndarray, int]:
    """(loss, d loss / d logits, n_valid) by loops over every voxel (float64)."""
    mask = np.broadcast_to(mask, logits.shape)
    kept: list[tuple] = []  # (index, channel, logit, target, positive)
    for idx in itertools.product(*map(range, logits.shape)):
        if mask[idx] == 0:
            continue
        x, y = float(logits[idx]), float(target[idx])
        positive = y > 0.5
        if mode == "mask":
            p = sig(x)
            if positive and p > 1 - margin1 and margin1 > 0:
                continue
            if not positive and p < margin0 and margin0 > 0:
                continue
        else:
            y = margin0 + y * (1 - margin0 - margin1)
        kept.append((idx, idx[1], x, y, positive))
    weight = {}
    for c in range(logits.shape[1]):
        n1 = sum(1 for k in kept if k[1] == c and k[4])
        n0 = sum(1 for k in kept if k[1] == c and not k[4])
        if balance and n1 and n0:
            weight[c, True], weight[c, False] = n0 / (n0 + n1), n1 / (n0 + n1)
        else:
            weight[c, True] = weight[c, False] = 1.0
    n = len(kept)
    grad = np.zeros(logits.shape)
    total = 0.0
    for idx, c, x, y, positive in kept:
        w = weight[c, positive]
        total += w * bce(x, y)
        grad[idx] = w * (sig(x) - y) / n
    return (total / n if n else 0.0), grad, n


def run(loss, logits: np.ndarray, target: np.ndarray, mask: np.ndarray,
        dtype: torch.dtype = torch.float32) -> tuple[float, np.ndarray, float]:
    x = torch.tensor(logits, dtype=dtype, requires_grad=True)
    result = loss(x, torch.tensor(target, dtype=torch.float32),
                  torch.tensor(mask, dtype=torch.float32))
    (grad,) = torch.autograd.grad(result.loss, x)
    return result.loss.item(), grad.double().numpy(), result.valid.item()


def batch(seed: int, shape=(3, 2, 2, 3, 3)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2.5, shape)
    target = (rng.random(shape) < 0.4).astype(float)
    mask = (rng.random(shape) < 0.8).astype(float)
    mask[1] = 0  # one sample of the batch entirely masked
    return logits, target, mask


BCE_CASES = [
    dict(),
    dict(balance=True),
    dict(margin0=0.2, margin1=0.1),
    dict(margin0=0.3, margin1=0.25, balance=True),
    dict(margin0=0.2, margin1=0.1, mode="inverse"),
    dict(margin0=0.2, margin1=0.1, mode="inverse", balance=True),
]


@pytest.mark.parametrize("case", BCE_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in
                                                                   c.items()) or "plain")
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bce_values_and_gradients_match_the_loop_reference(case, seed):
    logits, target, mask = batch(seed)
    loss = BCE(margin0=case.get("margin0", 0.0), margin1=case.get("margin1", 0.0),
               margin_mode=case.get("mode", "mask"), balance=case.get("balance", False))
    want, want_grad, n = ref_bce(logits, target, mask, **case)
    got, grad, valid = run(loss, logits, target, mask)
    assert valid == n
    assert got == pytest.approx(want, rel=1e-5)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-7)
    assert (grad[1] == 0).all()  # the all-masked sample


@pytest.mark.parametrize("balance", [False, True])
@pytest.mark.parametrize("value", [0.0, 1.0])
def test_bce_with_one_class_only_weighs_each_voxel_one(balance, value):
    logits, _, mask = batch(3)
    target = np.full(logits.shape, value)
    want, want_grad, n = ref_bce(logits, target, mask, margin0=0.1, margin1=0.1,
                                 balance=balance)
    got, grad, valid = run(BCE(margin0=0.1, margin1=0.1, balance=balance), logits, target, mask)
    assert valid == n and n > 0
    assert got == pytest.approx(want, rel=1e-5)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-7)
    # one class: balancing changes nothing
    assert got == pytest.approx(run(BCE(margin0=0.1, margin1=0.1), logits, target, mask)[0],
                                rel=1e-6)


def test_bce_channel_mask_broadcasts_like_the_reference():
    logits, target, _ = batch(4)
    rng = np.random.default_rng(40)
    mask = (rng.random((3, 1, 2, 3, 3)) < 0.6).astype(float)
    loss = BCE(margin0=0.2, margin1=0.2, balance=True)
    want, want_grad, n = ref_bce(logits, target, mask, margin0=0.2, margin1=0.2, balance=True)
    got, grad, valid = run(loss, logits, target, mask)
    assert valid == n
    assert got == pytest.approx(want, rel=1e-5)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-7)


def test_margin_boundary_is_strict():
    # a float32 logit whose probability is exactly 1 - margin1 = 0.75 is kept (p > 0.75 drops)
    x = torch.logit(torch.tensor(0.75))
    for _ in range(8):
        if torch.sigmoid(x).item() == 0.75:
            break
        x = torch.nextafter(x, torch.tensor(-1.0))
    assert torch.sigmoid(x).item() == 0.75
    one = torch.ones(1, 1, 1, 1, 1)
    assert BCE(margin1=0.25)(x * one, one, one).valid.item() == 1
    assert BCE(margin1=0.25)(torch.nextafter(x, torch.tensor(9.0)) * one, one, one
                             ).valid.item() == 0
    assert BCE(margin0=0.25)(-x * one, 0 * one, one).valid.item() == (
        0 if torch.sigmoid(-x).item() < 0.25 else 1)


def test_all_masked_batch_is_a_connected_zero_for_every_loss():
    logits = torch.tensor([[100.0, -100.0, float("nan"), float("inf")]] * 3).reshape(
        1, 3, 1, 1, 4).requires_grad_(True)
    target = torch.ones(1, 3, 1, 1, 4)
    mask = torch.zeros(1, 3, 1, 1, 4)
    for loss in (BCE(), BCE(margin0=0.1, margin1=0.1, balance=True),
                 BCE(margin0=0.1, margin1=0.1, margin_mode="inverse"), MSE(), Dice(),
                 DiceBCE(), Malis(nearest=(0, 1, 2))):
        result = loss(logits, target, mask)
        assert result.loss.item() == 0.0 and result.valid.item() == 0, loss
        (grad,) = torch.autograd.grad(result.loss, logits)
        assert torch.equal(grad, torch.zeros_like(grad)), loss


# ---------------------------------------------------------------------------- Dice reference


def ref_dice(logits: np.ndarray, target: np.ndarray, mask: np.ndarray, eps: float
             ) -> tuple[float, np.ndarray]:
    mask = np.broadcast_to(mask, logits.shape)
    channels = logits.shape[1]
    grad = np.zeros(logits.shape)
    total = 0.0
    for c in range(channels):
        cells = [idx for idx in itertools.product(*map(range, logits.shape))
                 if idx[1] == c and mask[idx] != 0]
        p = {idx: sig(float(logits[idx])) for idx in cells}
        inter = sum(p[i] * target[i] for i in cells)
        s = sum(p[i] + target[i] for i in cells)
        total += 1 - (2 * inter + eps) / (s + eps)
        for i in cells:
            dp = -(2 * target[i] * (s + eps) - (2 * inter + eps)) / (s + eps) ** 2
            grad[i] = dp * p[i] * (1 - p[i]) / channels
    return total / channels, grad


@pytest.mark.parametrize("eps", [1.0, 1e-3])
def test_dice_matches_the_loop_reference_with_an_empty_target_channel(eps):
    logits, target, mask = batch(5)
    target[:, 1] = 0  # channel 1: empty target everywhere
    want, want_grad = ref_dice(logits, target, mask, eps)
    got, grad, valid = run(Dice(eps=eps), logits, target, mask)
    assert valid == mask.sum()
    assert got == pytest.approx(want, rel=1e-5)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-8)
    # an empty target pushes every valid prediction of that channel down
    assert (grad[:, 1][mask[:, 1] != 0] > 0).all()


def test_dice_empty_target_and_empty_prediction_is_zero_and_full_prediction_near_one():
    target = torch.zeros(2, 1, 1, 2, 3)
    mask = torch.ones(2, 1, 1, 2, 3)
    assert Dice()(torch.full_like(target, -100.0), target, mask).loss.item() == 0.0
    full = Dice()(torch.full_like(target, 100.0), target, mask).loss.item()
    assert full == pytest.approx(1 - 1 / (12 + 1), rel=1e-6)


def test_dice_bce_matches_the_two_references():
    logits, target, mask = batch(6)
    want = ref_bce(logits, target, mask)[0] + 0.3 * ref_dice(logits, target, mask, 2.0)[0]
    got = run(DiceBCE(eps=2.0, dice_weight=0.3), logits, target, mask)[0]
    assert got == pytest.approx(want, rel=1e-5)


# --------------------------------------------------------------------------- MALIS reference


def same(labels: np.ndarray, v: tuple, o: tuple) -> bool:
    """The target of edge (v, o): one label, not background."""
    return bool(labels[v] == labels[o] and labels[v] != 0)


def edges_of(labels: np.ndarray, valid: np.ndarray | None = None,
             background: bool = False) -> list[tuple]:
    """(channel, voxel, neighbour) of every in-patch nearest-neighbour edge between labelled
    voxels (the ``zero: mask`` convention; ``background``: every in-patch edge, those
    touching label 0 negative), minus the ones ``valid`` masks."""
    out = []
    for c, off in enumerate(NEAREST):
        for v in itertools.product(*map(range, labels.shape)):
            o = tuple(a + b for a, b in zip(v, off, strict=True))
            if min(o) < 0 or (not background and (not labels[v] or not labels[o])):
                continue
            if valid is not None and not valid[(c, *v)]:
                continue
            out.append((c, v, o))
    return out


def target_of(labels: np.ndarray, edges: list[tuple]) -> tuple[np.ndarray, np.ndarray]:
    target = np.zeros((3, *labels.shape), bool)
    valid = np.zeros((3, *labels.shape), bool)
    for c, v, o in edges:
        valid[(c, *v)] = True
        target[(c, *v)] = same(labels, v, o)
    return target, valid


def objects_of(labels: np.ndarray, edges: list[tuple]) -> dict:
    """Object of each voxel: connected components of the positive (same-label) edges."""
    parent = {v: v for v in itertools.product(*map(range, labels.shape))}

    def root(v):
        while parent[v] != v:
            v = parent[v]
        return v

    for _, v, o in edges:
        if same(labels, v, o):
            parent[root(v)] = root(o)
    return {v: root(v) for v in parent}


def bottleneck(nodes: list, weighted: list[tuple[tuple, tuple, float]]) -> np.ndarray:
    """All-pairs max-min path strength (-inf where not connected): Floyd-Warshall on
    (max, min), an algorithm unlike emrun's Kruskal."""
    at = {v: i for i, v in enumerate(nodes)}
    b = np.full((len(nodes), len(nodes)), -np.inf)
    for u, v, w in weighted:
        i, j = at[u], at[v]
        b[i, j] = b[j, i] = max(b[i, j], w)
    for k in range(len(nodes)):
        b = np.maximum(b, np.minimum(b[:, k:k + 1], b[k:k + 1, :]))
    return b


def ref_malis(aff: np.ndarray, labels: np.ndarray, edges: list[tuple]
              ) -> tuple[dict, dict, int, int]:
    """Pair counts per affinity level, (positive, negative), and the number of pairs each
    pass must account for. Positive pass: the inside edges only, pairs of one object.
    Negative pass: inside edges at strength 2 (above every affinity: objects first), then
    the others; pairs of different objects among voxels with an edge."""
    obj = objects_of(labels, edges)
    nodes = sorted({v for _, v, _ in edges} | {o for _, _, o in edges})
    inside = [(v, o, float(aff[(c, *v)])) for c, v, o in edges if obj[v] == obj[o]]
    across = [(v, o, float(aff[(c, *v)])) for c, v, o in edges if obj[v] != obj[o]]
    pos_level: dict[float, int] = {}
    neg_level: dict[float, int] = {}
    b_pos = bottleneck(nodes, inside)
    b_neg = bottleneck(nodes, [(v, o, 2.0) for v, o, _ in inside] + across)
    n_pos = n_neg = 0
    for i, j in itertools.combinations(range(len(nodes)), 2):
        if obj[nodes[i]] == obj[nodes[j]]:
            n_pos += 1
            pos_level[b_pos[i, j]] = pos_level.get(b_pos[i, j], 0) + 1
        elif b_neg[i, j] > -np.inf:
            n_neg += 1
            neg_level[b_neg[i, j]] = neg_level.get(b_neg[i, j], 0) + 1
    return pos_level, neg_level, n_pos, n_neg


def by_level(weights: np.ndarray, aff: np.ndarray) -> dict[float, int]:
    out: dict[float, int] = {}
    for idx in zip(*np.nonzero(weights), strict=True):
        key = float(aff[idx])
        out[key] = out.get(key, 0) + int(weights[idx])
    return out


def check_malis(aff: np.ndarray, labels: np.ndarray, mask_edges: np.ndarray | None = None,
                background: bool = False) -> tuple[np.ndarray, np.ndarray]:
    edges = edges_of(labels, mask_edges, background)
    target, valid = target_of(labels, edges)
    aff = aff.astype(np.float32)
    pos, neg = malis_weights(aff, target, valid)
    want_pos, want_neg, n_pos, n_neg = ref_malis(aff, labels, edges)
    assert by_level(pos, aff) == want_pos
    assert by_level(neg, aff) == want_neg
    assert pos.sum() == n_pos and neg.sum() == n_neg
    assert not (pos[~valid] != 0).any() and not (neg[~valid] != 0).any()
    assert not (pos[~target] != 0).any() and not (neg[target] != 0).any()
    return pos, neg


def distinct_affinities(rng: np.random.Generator, shape: tuple) -> np.ndarray:
    """Affinities with no two alike (so every level is one edge): per-edge exact counts."""
    n = 3 * int(np.prod(shape))
    return ((rng.permutation(n) + 1) / (n + 1)).reshape(3, *shape).astype(np.float32)


@pytest.mark.parametrize("shape", [(1, 4, 5), (2, 3, 3), (3, 3, 2)], ids=["2d", "3d", "3d-b"])
@pytest.mark.parametrize("seed", range(4))
def test_malis_counts_match_the_bottleneck_reference(shape, seed):
    rng = np.random.default_rng(100 + seed)
    labels = rng.integers(0, 4, size=shape)  # 0 is background: its voxels are in no pair
    check_malis(distinct_affinities(rng, shape), labels)


@pytest.mark.parametrize("seed", range(4))
def test_malis_counts_with_tied_affinities(seed):
    rng = np.random.default_rng(200 + seed)
    labels = rng.integers(0, 3, size=(2, 3, 4))
    aff = rng.choice(np.float32([0.1, 0.5, 0.9, 1.0]), size=(3, 2, 3, 4))
    check_malis(aff, labels)  # compared per affinity level: any tie order is right


@pytest.mark.parametrize("seed", range(6))
def test_malis_counts_with_ties_masks_and_background_edges_together(seed):
    rng = np.random.default_rng(300 + seed)
    shape = (2, 4, 3)
    labels = rng.integers(0, 3, size=shape)
    aff = rng.choice(np.float32([0.0, 0.2, 0.7, 1.0]), size=(3, *shape))
    keep = rng.random((3, *shape)) < 0.8
    check_malis(aff, labels, keep, background=seed % 2 == 1)


def test_malis_all_tied_at_one_half():
    labels = np.array([[[1, 1, 2], [1, 3, 2], [0, 3, 3]]])
    check_malis(np.full((3, 1, 3, 3), 0.5, np.float32), labels)


def test_malis_with_masked_edges():
    rng = np.random.default_rng(7)
    labels = rng.integers(1, 3, size=(2, 3, 3))
    keep = rng.random((3, 2, 3, 3)) < 0.7
    check_malis(distinct_affinities(rng, (2, 3, 3)), labels, keep)


def test_malis_one_segment_has_only_positive_pairs():
    rng = np.random.default_rng(8)
    labels = np.ones((2, 3, 3), int)
    pos, neg = check_malis(distinct_affinities(rng, (2, 3, 3)), labels)
    assert pos.sum() == 18 * 17 // 2 and neg.sum() == 0
    # pair counts on a maximum spanning tree: 17 edges carry them
    assert (pos > 0).sum() == 17


def test_malis_all_background_has_no_pairs():
    labels = np.zeros((2, 3, 3), int)
    pos, neg = check_malis(np.full((3, 2, 3, 3), 0.3, np.float32), labels)
    assert pos.sum() == 0 and neg.sum() == 0


def test_malis_lone_voxels_in_background_count_in_negative_pairs():
    # single-voxel objects touching each other: no positive pair, every pair negative
    labels = np.array([[[1, 2, 3, 4]]])
    pos, neg = check_malis(np.float32([0.5, 0.5, 0.5]).reshape(3, 1, 1, 1) *
                           np.ones((3, 1, 1, 4), np.float32), labels)
    assert pos.sum() == 0 and neg.sum() == 6


def malis_loss_reference(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """sum w BCE / sum w over the batch, w from the reference counts (distinct affinities,
    so each level is one edge)."""
    weights = np.zeros(logits.shape)
    targets = np.zeros(logits.shape)
    for b in range(logits.shape[0]):
        edges = edges_of(labels[b])
        target, _ = target_of(labels[b], edges)
        aff = torch.sigmoid(torch.tensor(logits[b], dtype=torch.float32)).numpy()
        pos, neg, _, _ = ref_malis(aff, labels[b], edges)
        levels = {**pos, **neg}
        for c, v, _ in edges:
            weights[(b, c, *v)] = levels.get(float(aff[(c, *v)]), 0)
        targets[b] = target
    total = weights.sum()
    loss = sum(weights[i] * bce(float(logits[i]), targets[i])
               for i in zip(*np.nonzero(weights), strict=True))
    grad = weights * (1 / (1 + np.exp(-logits)) - targets) / max(total, 1.0)
    return loss / max(total, 1.0), grad


def test_malis_loss_and_gradient_match_the_reference_over_a_batch():
    rng = np.random.default_rng(9)
    shape = (2, 3, 3)
    labels = rng.integers(0, 3, size=(2, *shape))
    logits = np.stack([np.log(a / (1 - a)) for a in
                       (distinct_affinities(rng, shape).astype(np.float64) for _ in range(2))])
    target = np.stack([target_of(lab, edges_of(lab))[0] for lab in labels]).astype(float)
    mask = np.stack([target_of(lab, edges_of(lab))[1] for lab in labels]).astype(float)
    want, want_grad = malis_loss_reference(logits, labels)
    got, grad, _ = run(Malis(nearest=(0, 1, 2)), logits, target, mask)
    assert got == pytest.approx(want, rel=1e-5)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-8)


def test_malis_channel_order_and_long_range_equal_the_reordered_parts():
    logits, target, mask = affinity_batch(16, b=2)
    x, t, m = (torch.tensor(a, dtype=torch.float32) for a in (logits, target, mask))
    got = Malis(nearest=(2, 0, 3), long_range=0.7)(x, t, m).loss.item()
    nn = [2, 0, 3]
    want = (Malis(nearest=(0, 1, 2))(x[:, nn], t[:, nn], m[:, nn]).loss
            + 0.7 * ref_bce(logits[:, [1]], target[:, [1]], mask[:, [1]])[0])
    assert got == pytest.approx(want.item(), rel=1e-5)


def test_malis_mask_broadcast_over_channels_equals_the_expanded_mask():
    logits, target, mask = affinity_batch(17, b=2)
    x, t, m = (torch.tensor(a, dtype=torch.float32) for a in (logits, target, mask))
    one = m[:, :1]
    a = Malis(nearest=(0, 1, 2))(x, t, one)
    b = Malis(nearest=(0, 1, 2))(x, t, one.expand_as(m).contiguous())
    assert a.loss.item() == b.loss.item() and a.valid.item() == b.valid.item()


def test_malis_masked_edges_get_zero_gradient_whatever_their_logits():
    rng = np.random.default_rng(10)
    labels = rng.integers(1, 3, size=(1, 2, 3, 3))
    target, valid = target_of(labels[0], edges_of(labels[0]))
    valid &= rng.random(valid.shape) < 0.7
    logits = rng.normal(0, 2, (1, 3, 2, 3, 3))
    bad = np.float64([np.inf, -np.inf, np.nan, 1e30])
    logits[0][~valid] = bad[np.arange((~valid).sum()) % 4]
    got, grad, _ = run(Malis(nearest=(0, 1, 2)), logits, target[None].astype(float),
                       valid[None].astype(float))
    assert math.isfinite(got) and got > 0
    assert (grad[0][~valid] == 0).all() and np.isfinite(grad).all()


# ------------------------------------------------- extreme logits, precisions, batch order


def all_losses() -> list:
    return [BCE(), BCE(margin0=0.1, margin1=0.1, balance=True),
            BCE(margin0=0.1, margin1=0.2, margin_mode="inverse", balance=True), MSE(),
            Dice(), DiceBCE(dice_weight=0.5), Malis(nearest=(0, 1, 2)),
            Malis(nearest=(2, 0, 3), long_range=0.7)]


def affinity_batch(seed: int, b: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(b, 4, 2, 3, 3): nearest channels 0-2 from labels plus a fourth channel."""
    rng = np.random.default_rng(seed)
    target = np.zeros((b, 4, 2, 3, 3))
    mask = np.zeros((b, 4, 2, 3, 3))
    for i in range(b):
        labels = rng.integers(0, 3, size=(2, 3, 3))
        t, v = target_of(labels, edges_of(labels))
        target[i, :3], mask[i, :3] = t, v
        target[i, 3] = rng.random((2, 3, 3)) < 0.5
        mask[i, 3] = rng.random((2, 3, 3)) < 0.8
    logits = rng.normal(0, 2, target.shape)
    return logits, target, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["f32", "f16", "bf16"])
def test_extreme_logits_give_finite_losses_and_gradients(dtype):
    logits, target, mask = affinity_batch(11)
    logits = np.where(np.random.default_rng(12).random(logits.shape) < 0.5, 100.0, -100.0)
    for loss in all_losses():
        got, grad, _ = run(loss, logits, target, mask, dtype)
        assert math.isfinite(got) and got >= 0, (loss, dtype)
        assert np.isfinite(grad).all(), (loss, dtype)
        got32 = run(loss, logits, target, mask)[0]
        assert got == pytest.approx(got32, rel=1e-5), (loss, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_low_precision_logits_equal_their_float32_cast(dtype):
    logits, target, mask = affinity_batch(13)
    low = torch.tensor(logits).to(dtype)
    for loss in all_losses():
        got = run(loss, low.float().numpy(), target, mask, dtype)
        ref = run(loss, low.float().numpy(), target, mask, torch.float32)
        assert got[0] == pytest.approx(ref[0], rel=1e-6), loss
        np.testing.assert_allclose(got[1], ref[1], rtol=1e-2, atol=1e-4)


def test_every_loss_is_invariant_to_batch_order():
    logits, target, mask = affinity_batch(14, b=4)
    order = [2, 0, 3, 1]
    for loss in all_losses():
        a, ga, va = run(loss, logits, target, mask)
        b, gb, vb = run(loss, logits[order], target[order], mask[order])
        assert b == pytest.approx(a, rel=1e-6), loss
        assert vb == va
        np.testing.assert_allclose(gb, ga[order], rtol=1e-5, atol=1e-9)


# --------------------------------------------------------------- task weights of the recipe

RECIPE = """\
name: weights
data:
  sources:
    a: {type: synthetic, shape: [16, 64, 64], seed: 1}
model: {type: rsunet, widths: [4, 8]}
tasks:
  affinity:
    target: {type: affinity, offsets: [[-1, 0, 0], [0, -1, 0], [0, 0, -1], [0, 0, -3]]}
    loss: {type: bce, balance: true}
    weight: 2.5
  boundary:
    target: {type: boundary}
    loss: {type: dice}
    weight: 0.25
  unused:
    target: {type: boundary, width: 2}
    weight: 0
train:
  patch: [8, 32, 32]
  iterations: 2
"""


def test_total_loss_applies_the_recipe_task_weights(write):
    recipe = load_recipe(write(RECIPE)).recipe
    weights = {name: task.weight for name, task in recipe.tasks.items()}
    assert weights == {"affinity": 2.5, "boundary": 0.25, "unused": 0.0}
    fns = {name: losses.build(task.loss, target=task.target)
           for name, task in recipe.tasks.items()}
    logits, target, mask = affinity_batch(15, b=2)
    x = torch.tensor(logits, dtype=torch.float32, requires_grad=True)
    t, m = torch.tensor(target, dtype=torch.float32), torch.tensor(mask, dtype=torch.float32)
    results = {name: fn(x, t, m) for name, fn in fns.items()}
    results["unused"] = type(results["unused"])(results["unused"].loss * float("nan"),
                                             results["unused"].valid)
    total = total_loss(results, weights)
    want = (2.5 * ref_bce(logits, target, mask, balance=True)[0]
            + 0.25 * ref_dice(logits, target, mask, 1.0)[0])
    assert total.item() == pytest.approx(want, rel=1e-5)
    (grad,) = torch.autograd.grad(total, x)
    assert torch.isfinite(grad).all()
