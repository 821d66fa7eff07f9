"""Training losses (registry ``losses``): masked BCE on logits with DeepEM's margins and
per-channel class balancing, masked MSE, and the weighted total over tasks.

Every loss is called as ``loss(logits, target, mask) -> LossResult`` with three tensors of
the same shape (b, c, z, y, x) (the mask may also be broadcastable to it, e.g. one channel).
``target`` holds 0/1 values (soft values are allowed where noted); ``mask`` is 0/1 and a
voxel is *valid* where ``mask != 0``. The rules shared by all losses:

* The loss of a task is a mean over its valid voxels: ``sum(w * l) / n_valid`` with ``l``
  the elementwise loss, ``w`` the per-voxel weight (1 without class balancing) and
  ``n_valid`` the number of valid voxels over all channels (after margin dropping).
* ``LossResult.valid`` is that count ``n_valid`` (a detached float32 scalar), for logging
  and for averaging across batches or ranks.
* Masked (and margin-dropped) voxels contribute exactly zero to the loss and exactly zero
  gradient, whatever their logits are, even ``inf`` or ``nan``: their logits are replaced by
  0 before the elementwise loss (``torch.where``) and their losses are selected away again
  afterwards, so no ``0 * inf`` can appear in the forward or the backward pass.
* With no valid voxel the loss is an exact 0 that is still connected to the logits
  (``backward`` works and leaves zero gradients), and ``valid`` is 0.
* Everything is computed in float32: bf16/fp16 logits (e.g. under autocast) are cast first,
  so the result is a float32 scalar.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import UserError
from ..recipe.tasks import BCELoss, MSELoss
from ..registry import losses

__all__ = ["BCE", "MSE", "Loss", "LossResult", "build_bce", "build_mse", "total_loss"]


@dataclass(frozen=True)
class LossResult:
    """One task's loss on one batch."""

    loss: Tensor
    """Float32 scalar: the mean over the valid voxels (weighted by class balancing)."""
    valid: Tensor
    """Detached float32 scalar: how many voxels entered the loss (after margin dropping)."""


class Loss(Protocol):
    """What the loss builders return."""

    def __call__(self, logits: Tensor, target: Tensor, mask: Tensor) -> LossResult: ...


def _prepare(logits: Tensor, target: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Float32 logits and target, and the boolean valid mask broadcast to the logits' shape."""
    if target.shape != logits.shape:
        raise ValueError(f"target shape {tuple(target.shape)} differs from the logits' "
                         f"{tuple(logits.shape)}")
    try:
        valid = torch.broadcast_to(mask != 0, logits.shape)
    except RuntimeError:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not broadcast to the logits' "
                         f"{tuple(logits.shape)}") from None
    return logits.float(), target.detach().float(), valid


def _mean(elementwise: Tensor, valid: Tensor, weight: Tensor | None = None) -> LossResult:
    """``sum(weight * elementwise over valid) / count(valid)``; exactly 0 when none is valid."""
    if weight is not None:
        elementwise = elementwise * weight
    total = torch.where(valid, elementwise, 0.0).sum()
    count = valid.sum(dtype=torch.float32)
    return LossResult(loss=total / count.clamp(min=1.0), valid=count.detach())


@dataclass(frozen=True)
class BCE:
    """Masked binary cross-entropy on logits (``F.binary_cross_entropy_with_logits``).

    A voxel is *positive* where ``target > 0.5`` and *negative* elsewhere.

    Margins (DeepEM), ``margin_mode="mask"``: a valid positive voxel whose probability
    ``sigmoid(logit) > 1 - margin1`` is dropped (weight 0, not counted in ``valid``), and a
    valid negative voxel whose probability ``sigmoid(logit) < margin0`` is dropped: it is
    already right by the margin. The decision is made without gradient, per batch. With a
    margin of 0 nothing is dropped (a float32 probability is never > 1 nor < 0).

    ``margin_mode="inverse"``: no voxel is dropped; the targets are softened to
    ``margin0 + target * (1 - margin0 - margin1)``, i.e. 0 -> ``margin0`` and
    1 -> ``1 - margin1``.

    Class balancing (``balance=True``), per channel over the whole batch and all space:
    ``n1`` and ``n0`` are the numbers of valid (after margin dropping) positive and negative
    voxels of that channel; positives weigh ``n0 / (n0 + n1)`` and negatives
    ``n1 / (n0 + n1)``. A channel with only one class present weighs its voxels 1. The
    weighted sum is still divided by the number of valid voxels (not the sum of weights), so
    balancing changes relative weights only; a channel with n0 == n1 weighs each voxel 0.5.
    """

    margin0: float = 0.0
    margin1: float = 0.0
    margin_mode: str = "mask"
    balance: bool = False

    def __post_init__(self) -> None:
        if not (0.0 <= self.margin0 < 0.5 and 0.0 <= self.margin1 < 0.5):
            raise ValueError(f"margins must lie in [0, 0.5): {self.margin0}, {self.margin1}")
        if self.margin_mode not in ("mask", "inverse"):
            raise ValueError(f"margin_mode must be 'mask' or 'inverse', not {self.margin_mode!r}")

    def __call__(self, logits: Tensor, target: Tensor, mask: Tensor) -> LossResult:
        logits, target, valid = _prepare(logits, target, mask)
        positive = target > 0.5
        if self.margin_mode == "mask" and (self.margin0 > 0 or self.margin1 > 0):
            with torch.no_grad():
                p = torch.sigmoid(logits)
                right = torch.where(positive, p > 1.0 - self.margin1, p < self.margin0)
                valid = valid & ~right
        elif self.margin_mode == "inverse" and (self.margin0 > 0 or self.margin1 > 0):
            target = self.margin0 + target * (1.0 - self.margin0 - self.margin1)
        safe = torch.where(valid, logits, 0.0)
        elementwise = F.binary_cross_entropy_with_logits(safe, target, reduction="none")
        weight = self._balance(positive, valid) if self.balance else None
        return _mean(elementwise, valid, weight)

    @staticmethod
    def _balance(positive: Tensor, valid: Tensor) -> Tensor:
        """Per-voxel class weights, from the per-channel counts over batch and space."""
        if positive.dim() < 2:
            raise ValueError("class balancing needs a channel axis: (b, c, ...) tensors")
        dims = [d for d in range(positive.dim()) if d != 1]
        shape = [1, -1] + [1] * (positive.dim() - 2)
        n1 = (positive & valid).sum(dim=dims, dtype=torch.float32)
        n0 = (~positive & valid).sum(dim=dims, dtype=torch.float32)
        both = (n0 > 0) & (n1 > 0)
        total = (n0 + n1).clamp(min=1.0)
        w1 = torch.where(both, n0 / total, 1.0).view(shape)
        w0 = torch.where(both, n1 / total, 1.0).view(shape)
        return torch.where(positive, w1, w0)


@dataclass(frozen=True)
class MSE:
    """Masked mean squared error between the raw network output and the target.

    It compares the *raw* output (what the other losses call logits) with the target:
    ``(logits - target) ** 2``. The task's ``activation`` is applied at inference only, so
    a regression task scored with MSE normally sets ``activation: none``. Targets may be
    any real values; the mask follows the shared rules of this module.
    """

    def __call__(self, logits: Tensor, target: Tensor, mask: Tensor) -> LossResult:
        logits, target, valid = _prepare(logits, target, mask)
        safe = torch.where(valid, logits, 0.0)
        return _mean((safe - target) ** 2, valid)


@losses.implement("bce")
def build_bce(spec: BCELoss, **context: Any) -> Loss:
    """The ``bce`` loss of a recipe task (context is accepted and unused)."""
    return BCE(margin0=spec.margin0, margin1=spec.margin1, margin_mode=spec.margin_mode,
               balance=spec.balance)


@losses.implement("mse")
def build_mse(spec: MSELoss, **context: Any) -> Loss:
    """The ``mse`` loss of a recipe task (context is accepted and unused)."""
    return MSE()


def _check_result(task: str, result: object) -> None:
    """A loss (a plugin's, say) must return a LossResult of scalars: a tensor per channel
    would be summed in silence or fail deep in the trainer, naming neither task nor loss."""
    if not isinstance(result, LossResult):
        raise UserError(f"the loss of task {task!r} returned a {type(result).__name__}, not "
                        "an emrun.losses.LossResult(loss=<scalar tensor>, valid=<scalar>)")
    for field in ("loss", "valid"):
        value = getattr(result, field)
        if not isinstance(value, Tensor) or value.numel() != 1:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise UserError(f"the loss of task {task!r} returned a {field} of {shape}, not a "
                            "scalar tensor (reduce it over the batch, channels and voxels)")


def total_loss(results: Mapping[str, LossResult], weights: Mapping[str, float]) -> Tensor:
    """``sum(weights[name] * results[name].loss)`` over the tasks in ``results``.

    Every task in ``results`` needs a weight (KeyError otherwise; extra weights are ignored).
    Tasks with weight 0 are left out of the sum and of the graph, so even a NaN loss there
    changes nothing. When no task has a non-zero weight the total is a float32 zero that
    accepts ``backward()`` (and gives no gradient to anything).
    """
    total: Tensor | None = None
    for name, result in results.items():
        _check_result(name, result)
        if name not in weights:
            raise KeyError(f"no weight for task {name!r} (weights for: {sorted(weights)})")
        weight = float(weights[name])
        if weight == 0.0:
            continue
        term = weight * result.loss.float()
        total = term if total is None else total + term
    if total is None:
        device = next(iter(results.values())).loss.device if results else None
        return torch.zeros((), dtype=torch.float32, device=device, requires_grad=True)
    return total
