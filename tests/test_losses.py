"""Losses: values against hand computations on tiny tensors, masking, margins, balancing,
exact zero gradients where masked, the empty case, total loss, bf16 and the registry."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from emrun.losses import BCE, MSE, LossResult, total_loss
from emrun.recipe.tasks import BCELoss, MSELoss
from emrun.registry import losses


def t(values) -> torch.Tensor:
    """A float32 tensor shaped (1, c, 1, 1, x) from a list of channel rows (or a flat list)."""
    x = torch.tensor(values, dtype=torch.float32)
    if x.dim() == 1:
        x = x[None]
    return x.reshape(1, x.shape[0], 1, 1, x.shape[1])


def bce(x: float, y: float) -> float:
    """Binary cross-entropy of one logit against one (soft) target, by hand."""
    p = 1 / (1 + math.exp(-x))
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


LOGITS = [2.0, -1.0, 0.5, -3.0]
TARGET = [1.0, 0.0, 0.0, 1.0]


def test_plain_bce_is_the_mean_over_all_voxels():
    result = BCE()(t(LOGITS), t(TARGET), torch.ones(1, 1, 1, 1, 4))
    expected = sum(bce(x, y) for x, y in zip(LOGITS, TARGET, strict=True)) / 4
    assert isinstance(result, LossResult)
    assert result.loss.dtype == torch.float32 and result.loss.dim() == 0
    assert result.loss.item() == pytest.approx(expected, rel=1e-6)
    assert result.valid.item() == 4


def test_mask_ignores_zeros_and_divides_by_the_valid_count():
    mask = t([1.0, 0.0, 1.0, 0.0])
    result = BCE()(t(LOGITS), t(TARGET), mask)
    expected = (bce(2.0, 1.0) + bce(0.5, 0.0)) / 2
    assert result.loss.item() == pytest.approx(expected, rel=1e-6)
    assert result.valid.item() == 2


def test_mask_may_broadcast_over_channels():
    logits = t([[2.0, -1.0], [0.5, -3.0]])
    target = t([[1.0, 0.0], [0.0, 1.0]])
    mask = t([1.0, 0.0])  # (1, 1, 1, 1, 2): applies to both channels
    result = BCE()(logits, target, mask)
    assert result.valid.item() == 2
    assert result.loss.item() == pytest.approx((bce(2.0, 1.0) + bce(0.5, 0.0)) / 2, rel=1e-6)


def test_margins_in_mask_mode_drop_voxels_already_right():
    # probabilities: 0.881 (t=1), 0.269 (t=0), 0.622 (t=0), 0.0474 (t=1), 0.953 (t=1),
    # 0.0067 (t=0)
    logits = [2.0, -1.0, 0.5, -3.0, 3.0, -5.0]
    target = [1.0, 0.0, 0.0, 1.0, 1.0, 0.0]
    loss = BCE(margin0=0.3, margin1=0.1, margin_mode="mask")
    result = loss(t(logits), t(target), torch.ones(1, 1, 1, 1, 6))
    # dropped: t=1 with p > 0.9 (logit 3), t=0 with p < 0.3 (logits -1 and -5)
    kept = [(2.0, 1.0), (0.5, 0.0), (-3.0, 1.0)]
    assert result.valid.item() == 3
    assert result.loss.item() == pytest.approx(sum(bce(x, y) for x, y in kept) / 3, rel=1e-6)
    assert sig(2.0) < 0.9 and sig(-1.0) < 0.3 and sig(-5.0) < 0.3  # the hand check's premise


def test_margins_do_not_count_masked_voxels_and_zero_margin_drops_nothing():
    logits = t([3.0, 30.0, -30.0])
    target = t([1.0, 1.0, 0.0])
    assert BCE()(logits, target, torch.ones(1, 1, 1, 1, 3)).valid.item() == 3
    result = BCE(margin1=0.1)(logits, target, t([0.0, 1.0, 1.0]))
    assert result.valid.item() == 1  # logit 3 masked, logit 30 dropped, logit -30 kept
    assert result.loss.item() == pytest.approx(bce(-30.0, 0.0), rel=1e-5)


def test_inverse_mode_softens_targets_and_drops_nothing():
    logits = [2.0, -1.0, 0.5, -3.0, 3.0, -5.0]
    target = [1.0, 0.0, 0.0, 1.0, 1.0, 0.0]
    loss = BCE(margin0=0.3, margin1=0.1, margin_mode="inverse")
    result = loss(t(logits), t(target), torch.ones(1, 1, 1, 1, 6))
    soft = {0.0: 0.3, 1.0: 0.9}
    expected = sum(bce(x, soft[y]) for x, y in zip(logits, target, strict=True)) / 6
    assert result.valid.item() == 6
    assert result.loss.item() == pytest.approx(expected, rel=1e-6)


def test_balancing_per_channel_over_batch_and_space():
    # channel 0: over both batch items, valid positives 3, negatives 1 (one masked voxel)
    # channel 1: only negatives valid -> weight 1
    logits = torch.tensor([
        [[1.0, -2.0, 0.5], [0.3, -0.7, 1.2]],
        [[-1.5, 2.5, 0.1], [0.9, -0.4, 2.2]],
    ]).reshape(2, 2, 1, 1, 3)
    target = torch.tensor([
        [[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]],
        [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]],
    ]).reshape(2, 2, 1, 1, 3)
    mask = torch.tensor([
        [[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]],
        [[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]],
    ]).reshape(2, 2, 1, 1, 3)
    result = BCE(balance=True)(logits, target, mask)

    # by hand: channel 0 valid voxels (logit, target)
    c0 = [(1.0, 1.0), (-2.0, 0.0), (0.5, 1.0), (-1.5, 1.0), (2.5, 1.0)]
    n1, n0 = 4, 1
    w = {1.0: n0 / (n0 + n1), 0.0: n1 / (n0 + n1)}
    c1 = [(0.3, 0.0), (-0.7, 0.0), (0.9, 0.0), (2.2, 0.0)]  # one class only: weight 1
    weighted = sum(w[y] * bce(x, y) for x, y in c0) + sum(bce(x, y) for x, y in c1)
    assert result.valid.item() == 9
    assert result.loss.item() == pytest.approx(weighted / 9, rel=1e-6)


def test_balancing_counts_after_margin_dropping():
    logits = [4.0, 1.0, -1.0, 0.2]  # the 4.0 positive is dropped (p > 0.9)
    target = [1.0, 1.0, 0.0, 0.0]
    result = BCE(margin1=0.1, balance=True)(t(logits), t(target), torch.ones(1, 1, 1, 1, 4))
    # after dropping: n1 = 1, n0 = 2 -> positives 2/3, negatives 1/3
    expected = (2 / 3 * bce(1.0, 1.0) + 1 / 3 * (bce(-1.0, 0.0) + bce(0.2, 0.0))) / 3
    assert result.valid.item() == 3
    assert result.loss.item() == pytest.approx(expected, rel=1e-6)


def test_mse_is_masked_and_compares_the_raw_output():
    logits = t([2.0, -1.0, 0.5, -3.0])
    target = t([1.0, 0.0, 0.0, 1.0])
    mask = t([1.0, 1.0, 0.0, 1.0])
    result = MSE()(logits, target, mask)
    assert result.valid.item() == 3
    assert result.loss.item() == pytest.approx((1.0 + 1.0 + 16.0) / 3, rel=1e-6)


@pytest.mark.parametrize("loss", [
    BCE(), BCE(margin0=0.2, margin1=0.2), BCE(margin0=0.2, margin1=0.1, margin_mode="inverse"),
    BCE(balance=True), MSE(),
], ids=["bce", "bce-margin", "bce-inverse", "bce-balance", "mse"])
def test_masked_voxels_get_exactly_zero_gradient(loss):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 2, 4, 5, generator=gen)
    target = (torch.rand(2, 3, 2, 4, 5, generator=gen) > 0.5).float()
    mask = (torch.rand(2, 3, 2, 4, 5, generator=gen) > 0.4).float()
    masked = mask == 0
    extreme = torch.tensor([1e4, -1e4, float("inf"), float("-inf"), float("nan"), 1e38])
    logits[masked] = extreme[torch.arange(int(masked.sum())) % len(extreme)]
    logits.requires_grad_(True)

    result = loss(logits, target, mask)
    assert torch.isfinite(result.loss)
    result.loss.backward()
    grad = logits.grad
    assert grad is not None
    assert torch.equal(grad[masked], torch.zeros_like(grad[masked]))
    assert torch.isfinite(grad).all()
    kept = ~masked
    if isinstance(loss, BCE) and loss.margin_mode == "mask" and loss.margin1 > 0:
        p = torch.sigmoid(logits.detach())
        dropped = kept & (((target == 1) & (p > 1 - loss.margin1))
                          | ((target == 0) & (p < loss.margin0)))
        assert dropped.any()
        assert torch.equal(grad[dropped], torch.zeros_like(grad[dropped]))
        kept &= ~dropped
    assert (grad[kept] != 0).all()


def test_large_logits_are_stable_where_valid():
    logits = t([1e4, -1e4, 1e4, -1e4]).requires_grad_(True)
    target = t([1.0, 0.0, 0.0, 1.0])
    result = BCE()(logits, target, torch.ones(1, 1, 1, 1, 4))
    assert result.loss.item() == pytest.approx(1e4 / 2, rel=1e-6)
    result.loss.backward()
    assert torch.allclose(logits.grad, t([0.0, 0.0, 0.25, -0.25]))


@pytest.mark.parametrize("loss", [BCE(), BCE(margin0=0.1, balance=True), MSE()],
                         ids=["bce", "bce-margin-balance", "mse"])
def test_no_valid_voxel_gives_a_connected_zero(loss):
    logits = torch.tensor([1.0, float("inf"), float("nan")]).reshape(1, 1, 1, 1, 3)
    logits.requires_grad_(True)
    result = loss(logits, t([1.0, 0.0, 1.0]), torch.zeros(1, 1, 1, 1, 3))
    assert result.loss.item() == 0.0 and result.valid.item() == 0
    result.loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_all_dropped_by_margin_gives_zero():
    result = BCE(margin0=0.2, margin1=0.2)(t([5.0, -5.0]), t([1.0, 0.0]), t([1.0, 1.0]))
    assert result.loss.item() == 0.0 and result.valid.item() == 0


def test_total_loss_sums_weighted_task_losses_and_skips_weight_zero():
    a = torch.tensor(2.0, requires_grad=True)
    b = torch.tensor(3.0, requires_grad=True)
    results = {
        "aff": LossResult(a * 1.0, torch.tensor(10.0)),
        "mito": LossResult(b * 1.0, torch.tensor(5.0)),
        "off": LossResult(torch.tensor(float("nan")), torch.tensor(0.0)),
    }
    total = total_loss(results, {"aff": 1.0, "mito": 0.5, "off": 0.0, "unused": 7.0})
    assert total.item() == pytest.approx(2.0 + 1.5)
    total.backward()
    assert a.grad.item() == 1.0 and b.grad.item() == 0.5

    with pytest.raises(KeyError, match="mito"):
        total_loss(results, {"aff": 1.0})

    zero = total_loss({"off": results["off"]}, {"off": 0.0})
    assert zero.item() == 0.0 and zero.dtype == torch.float32
    zero.backward()


def test_bf16_logits_under_autocast_give_a_float32_loss():
    gen = torch.Generator().manual_seed(1)
    logits32 = torch.randn(1, 2, 2, 3, 3, generator=gen)
    target = (torch.rand(1, 2, 2, 3, 3, generator=gen) > 0.5).float()
    mask = (torch.rand(1, 2, 2, 3, 3, generator=gen) > 0.3).float()
    logits = logits32.bfloat16().requires_grad_(True)
    for loss in (BCE(margin0=0.1, margin1=0.1, balance=True), MSE()):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            result = loss(logits, target, mask)
        assert result.loss.dtype == torch.float32
        reference = loss(logits.detach().float(), target, mask)
        assert result.loss.item() == pytest.approx(reference.loss.item(), rel=1e-6)
        result.loss.backward()
        assert logits.grad is not None and logits.grad.dtype == torch.bfloat16
        logits.grad = None


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="target shape"):
        BCE()(torch.zeros(1, 2, 1, 1, 3), torch.zeros(1, 1, 1, 1, 3), torch.ones(1, 1, 1, 1, 3))
    with pytest.raises(ValueError, match="mask shape"):
        MSE()(torch.zeros(1, 2, 1, 1, 3), torch.zeros(1, 2, 1, 1, 3), torch.ones(1, 3, 1, 1, 3))


def test_registry_builds_losses_from_specs():
    loss = losses.build(BCELoss(margin0=0.1, margin1=0.2, margin_mode="inverse", balance=True))
    assert loss == BCE(margin0=0.1, margin1=0.2, margin_mode="inverse", balance=True)
    assert isinstance(losses.build(MSELoss(), device="cpu"), MSE)


def test_importing_the_implementation_registers_the_builders():
    code = (
        "import sys\n"
        "from emrun.recipe.tasks import BCELoss\n"
        "from emrun.registry import losses\n"
        "assert 'emrun.losses' not in sys.modules\n"
        "import emrun.losses\n"
        "loss = losses.build(BCELoss())\n"
        "print(type(loss).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "BCE"
