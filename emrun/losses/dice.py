"""Soft Dice and Dice + BCE (registry ``losses``: ``dice``, ``dice_bce``) for semantic tasks.

Dice measures overlap rather than per-voxel error, so a rare foreground (synaptic clefts,
mitochondria) is not swamped by the background as it is in a plain voxel mean. The masking
rules are those of :mod:`emrun.losses.base`: masked voxels give zero loss and zero gradient,
whatever their logits; ``LossResult.valid`` counts the valid voxels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..recipe.tasks import DiceBCELoss, DiceLoss
from ..registry import losses
from .base import BCE, Loss, LossResult, _prepare

__all__ = ["Dice", "DiceBCE", "build_dice", "build_dice_bce"]


@dataclass(frozen=True)
class Dice:
    """``1 - (2 sum(p t) + eps) / (sum(p) + sum(t) + eps)`` with ``p = sigmoid(logits)``.

    The sums run over the batch and all space of one channel, over valid voxels only; the
    loss is the mean over the channels that have a valid voxel. ``eps`` keeps a channel
    with empty target and empty prediction at 0 (rather than 0/0) and smooths the gradient
    of small objects.
    """

    eps: float = 1.0

    def __call__(self, logits: Tensor, target: Tensor, mask: Tensor) -> LossResult:
        logits, target, valid = _prepare(logits, target, mask)
        if logits.dim() < 2:
            raise ValueError("dice needs a channel axis: (b, c, ...) tensors")
        p = torch.where(valid, torch.sigmoid(torch.where(valid, logits, 0.0)), 0.0)
        t = torch.where(valid, target, 0.0)
        dims = [d for d in range(logits.dim()) if d != 1]
        overlap = (p * t).sum(dim=dims)
        total = p.sum(dim=dims) + t.sum(dim=dims)
        per_channel = 1.0 - (2.0 * overlap + self.eps) / (total + self.eps)
        scored = valid.any(dim=dims)  # a channel masked out wholly: not
        # in the mean (it scored 0 and shrank the others' loss by its share)
        loss = (per_channel * scored).sum() / scored.sum().clamp(min=1)
        return LossResult(loss=loss, valid=valid.sum(dtype=torch.float32).detach())


@dataclass(frozen=True)
class DiceBCE:
    """Masked BCE (mean over valid voxels) plus ``dice_weight`` times :class:`Dice`."""

    eps: float = 1.0
    dice_weight: float = 1.0

    def __call__(self, logits: Tensor, target: Tensor, mask: Tensor) -> LossResult:
        bce = BCE()(logits, target, mask)
        dice = Dice(eps=self.eps)(logits, target, mask)
        return LossResult(loss=bce.loss + self.dice_weight * dice.loss, valid=dice.valid)


@losses.implement("dice")
def build_dice(spec: DiceLoss, **context: Any) -> Loss:
    """The ``dice`` loss of a recipe task (context is accepted and unused)."""
    return Dice(eps=spec.eps)


@losses.implement("dice_bce")
def build_dice_bce(spec: DiceBCELoss, **context: Any) -> Loss:
    """The ``dice_bce`` loss of a recipe task (context is accepted and unused)."""
    return DiceBCE(eps=spec.eps, dice_weight=spec.dice_weight)
