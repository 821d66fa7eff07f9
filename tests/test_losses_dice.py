"""Soft Dice and Dice + BCE: hand-computed values, masking, gradients, registry builders."""

from __future__ import annotations

import math

import pytest
import torch

from emrun.losses import BCE, Dice, DiceBCE
from emrun.recipe.tasks import DiceBCELoss, DiceLoss
from emrun.registry import losses


def t(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(1, 1, 1, 1, -1)


def test_dice_value_by_hand():
    # valid voxels: p = 0.5, 0.5, 0.5 and t = 1, 0, 1 -> overlap 1, sums 1.5 + 2
    result = Dice(eps=1.0)(t([0, 0, 0, 0]), t([1, 0, 1, 1]), t([1, 1, 1, 0]))
    assert result.loss.item() == pytest.approx(1 - (2 * 1 + 1) / (3.5 + 1))
    assert result.valid.item() == 3


def test_dice_is_zero_on_perfect_and_near_one_on_inverted_predictions():
    target = t([1, 0, 1, 0])
    perfect = Dice(eps=1e-3)(t([40, -40, 40, -40]), target, torch.ones(1))
    inverted = Dice(eps=1e-3)(t([-40, 40, -40, 40]), target, torch.ones(1))
    assert perfect.loss.item() == pytest.approx(0.0, abs=1e-6)
    assert inverted.loss.item() == pytest.approx(1.0, abs=1e-3)


def test_dice_is_the_mean_over_channels():
    logits = torch.zeros(1, 2, 1, 1, 2)
    target = torch.tensor([[1.0, 1.0], [0.0, 0.0]]).view(1, 2, 1, 1, 2)
    result = Dice(eps=1.0)(logits, target, torch.ones(1))
    c0 = 1 - (2 * 1 + 1) / (3 + 1)  # p = .5, .5; t = 1, 1
    c1 = 1 - 1 / (1 + 1)  # p = .5, .5; t = 0, 0
    assert result.loss.item() == pytest.approx((c0 + c1) / 2)


def test_masked_voxels_change_nothing_and_get_no_gradient():
    logits = t([0.3, -1.0, float("nan"), float("inf")]).requires_grad_()
    target, mask = t([1, 0, 1, 0]), t([1, 1, 0, 0])
    for loss in (Dice(), DiceBCE(dice_weight=0.7)):
        result = loss(logits, target, mask)
        clean = loss(t([0.3, -1.0, 5.0, -5.0]), target, mask)
        assert result.loss.item() == pytest.approx(clean.loss.item())
        (grad,) = torch.autograd.grad(result.loss, logits)
        assert torch.isfinite(grad).all()
        assert grad.flatten()[2:].tolist() == [0.0, 0.0]
        assert result.valid.item() == 2


def test_gradients_push_positives_up_and_negatives_down():
    logits = t([0.0, 0.0, 0.0]).requires_grad_()
    (grad,) = torch.autograd.grad(Dice()(logits, t([1, 0, 1]), torch.ones(1)).loss, logits)
    g = grad.flatten().tolist()
    assert g[0] < 0 and g[2] < 0 and g[1] > 0


def test_dice_gradient_matches_finite_differences():
    logits = t([0.2, -0.4, 1.1, 0.5])
    target, mask = t([1, 0, 1, 0]), t([1, 1, 1, 0])
    x = logits.clone().requires_grad_()
    (grad,) = torch.autograd.grad(Dice()(x, target, mask).loss, x)
    h = 1e-2
    for i in range(3):
        up, down = logits.clone(), logits.clone()
        up.view(-1)[i] += h
        down.view(-1)[i] -= h
        numeric = (Dice()(up, target, mask).loss - Dice()(down, target, mask).loss) / (2 * h)
        assert grad.view(-1)[i].item() == pytest.approx(numeric.item(), rel=1e-2, abs=1e-4)


def test_no_valid_voxel_gives_a_connected_zero():
    logits = t([1.0, 2.0]).requires_grad_()
    result = Dice()(logits, t([1, 0]), torch.zeros(1))
    assert result.loss.item() == 0.0 and result.valid.item() == 0
    result.loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum().item() == 0.0


def test_dice_bce_is_bce_plus_weighted_dice():
    logits, target, mask = t([0, 0, 0, 0]), t([1, 0, 1, 1]), t([1, 1, 1, 0])
    result = DiceBCE(eps=1.0, dice_weight=0.5)(logits, target, mask)
    assert result.loss.item() == pytest.approx(math.log(2) + 0.5 * (1 / 3))
    bce = BCE()(logits, target, mask).loss + 0.5 * Dice()(logits, target, mask).loss
    assert result.loss.item() == pytest.approx(bce.item())


def test_registry_builds_them_from_their_specs():
    assert losses.build(DiceLoss(eps=0.5)) == Dice(eps=0.5)
    assert losses.build(DiceBCELoss(eps=2.0, dice_weight=3.0)) == DiceBCE(eps=2.0, dice_weight=3.0)


def test_a_channel_masked_out_wholly_leaves_the_others_loss_alone():
    """A channel with no valid voxel scored 0 and counted in the mean over channels: with
    4 channels, masking one shrank the loss of the other three to 3/4 of theirs."""
    rng = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 4, 3, 5, 5, generator=rng)
    target = (torch.rand(2, 4, 3, 5, 5, generator=rng) > 0.5).float()
    mask = torch.ones(2, 4, 3, 5, 5)
    mask[:, 2] = 0
    kept = [0, 1, 3]
    assert Dice()(logits, target, mask).loss.item() == pytest.approx(
        Dice()(logits[:, kept], target[:, kept], mask[:, kept]).loss.item())
