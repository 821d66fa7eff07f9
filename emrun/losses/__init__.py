"""Training losses (registry ``losses``). Importing the package registers every built-in
loss: ``bce`` and ``mse`` (:mod:`.base`, which also holds the shared rules and
``total_loss``), ``dice`` and ``dice_bce`` (:mod:`.dice`), ``malis`` (:mod:`.malis`)."""

from .base import BCE, MSE, Loss, LossResult, build_bce, build_mse, total_loss
from .dice import Dice, DiceBCE, build_dice, build_dice_bce
from .malis import Malis, build_malis, malis_weights

__all__ = ["BCE", "MSE", "Dice", "DiceBCE", "Loss", "LossResult", "Malis", "build_bce",
           "build_dice", "build_dice_bce", "build_malis", "build_mse", "malis_weights",
           "total_loss"]
