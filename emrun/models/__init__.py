"""Networks: RSUNet, UpDown, ResEnc and MedNeXt with one output head per task, and their facts.

Importing this package registers the builders ``rsunet``, ``updown``, ``resenc`` and
``mednext`` with ``emrun.registry.models``; build a recipe's model with :func:`build_model`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import UserError
from ..registry import models
from .facts import (
    ModelFacts,
    empirical_receptive_field,
    flops_per_voxel,
    model_facts,
    output_problem,
)
from .mednext import MedNeXtModel, build_mednext
from .resenc import ResEncModel, build_resenc
from .rsunet import RSUNetModel, UpDownModel, build_rsunet, build_updown, parameter_count


def build_model(recipe: Any) -> nn.Module:
    """The recipe's model, with one head per task (``recipe.head_channels()``).

    A plugin's model has its outputs checked once, on meta tensors at ``train.patch``: one
    that returns other shapes, channels or names is refused here, naming what is wrong,
    rather than failing inside a loss or predicting a shifted volume. (emrun's own are
    tested, and spared the check's first-call cost: torch loads its meta kernels, seconds.)
    """
    heads = recipe.head_channels()
    model: nn.Module = models.build(recipe.model, head_channels=heads)
    if not models.entry(recipe.model.type).third_party:
        return model
    problem = output_problem(model, heads, recipe.train.patch, recipe.model.input_channels())
    if problem is not None:
        raise UserError(f"model {recipe.model.type}: {problem}")
    return model


def weights_mismatch(model: nn.Module, weights: Any) -> str | None:
    """How ``weights`` (a state dict) fail to fit ``model``: the counts of missing, unknown
    and differently shaped tensors, each with its first name and shapes; None when they fit.
    torch's own message names them all over dozens of lines, its first line none."""
    if weights is None:
        return "it holds none (no 'model' entry)"
    if not isinstance(weights, dict):
        return f"they are a {type(weights).__name__}, not a dictionary of tensors"
    own = model.state_dict()
    missing = [name for name in own if name not in weights]
    unknown = [name for name in weights if name not in own]
    shaped = [name for name in own if name in weights and hasattr(weights[name], "shape")
              and tuple(weights[name].shape) != tuple(own[name].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} the model has are missing (first {missing[0]})")
    if unknown:
        parts.append(f"{len(unknown)} the model does not have (first {unknown[0]})")
    if shaped:
        name = shaped[0]
        parts.append(f"{len(shaped)} of another shape (first {name}: "
                     f"{list(weights[name].shape)}, the model's {list(own[name].shape)})")
    return "; ".join(parts) or None


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
    "output_problem",
    "parameter_count",
    "weights_mismatch",
]
