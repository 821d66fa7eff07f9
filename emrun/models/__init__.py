"""Networks: RSUNet, UpDown, ResEnc and MedNeXt with one output head per task, and their facts.

Importing this package registers the builders ``rsunet``, ``updown``, ``resenc`` and
``mednext`` with ``emrun.registry.models``; build a recipe's model with :func:`build_model`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..registry import models
from .facts import (
    ModelFacts,
    empirical_receptive_field,
    flops_per_voxel,
    model_facts,
)
from .mednext import MedNeXtModel, build_mednext
from .resenc import ResEncModel, build_resenc
from .rsunet import RSUNetModel, UpDownModel, build_rsunet, build_updown, parameter_count


def build_model(recipe: Any) -> nn.Module:
    """The recipe's model, with one head per task (``recipe.head_channels()``)."""
    return models.build(recipe.model, head_channels=recipe.head_channels())  # type: ignore[no-any-return]


__all__ = [
    "MedNeXtModel",
    "ModelFacts",
    "RSUNetModel",
    "ResEncModel",
    "UpDownModel",
    "build_mednext",
    "build_model",
    "build_resenc",
    "build_rsunet",
    "build_updown",
    "empirical_receptive_field",
    "flops_per_voxel",
    "model_facts",
    "parameter_count",
]
