"""The network as other programs call it: one tensor in, one activated tensor per task out.

emrun's own models return a dict of logits; TorchScript, ONNX and bioimage.io want plain
tensors. `ExportedNetwork` takes the image already scaled to [0, 1] (batch, channel, z, y,
x: the consumer applies the intensity scale, declared as preprocessing) and returns each
task's prediction after its activation, in recipe order, as emrun's inference would.

bioimage.io's ``pytorch_state_dict`` weights name this class and its keyword argument (the
resolved recipe as YAML text) as their architecture: with emrun installed, a consumer
rebuilds the network from that alone.
"""

from __future__ import annotations

import keyword
from collections.abc import Sequence
from typing import Any

import torch
import yaml
from torch import nn

from ..infer.engine import ACTIVATIONS
from ..models import build_model
from ..recipe import Recipe


class ExportedNetwork(nn.Module):
    """The recipe's model behind a tensors-only interface (see the module's docstring)."""

    def __init__(self, recipe: str | Recipe) -> None:
        super().__init__()
        if isinstance(recipe, str):
            recipe = Recipe.model_validate(yaml.safe_load(recipe))
        self.tasks = list(recipe.tasks)
        self.activations = [recipe.tasks[name].activation for name in self.tasks]
        self.model = build_model(recipe)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        raw: dict[str, Any] = self.model(image)
        return tuple(ACTIVATIONS[act](raw[name].float())
                     for name, act in zip(self.tasks, self.activations, strict=True))


def exported_network(recipe: Recipe, weights: dict[str, torch.Tensor]) -> ExportedNetwork:
    """The wrapper around the recipe's model with ``weights``, in eval mode on the CPU."""
    network = ExportedNetwork(recipe)
    network.model.load_state_dict(weights)
    return network.eval()


INPUT = "raw"
"""The input tensor's name in every exported format."""
ID_LENGTH = 32
"""bioimage.io's longest tensor id."""


def output_names(tasks: Sequence[str]) -> list[str]:
    """Each task's output tensor name: the task's own, unless another tool cannot take it.

    bioimage.io wants Python identifiers (no keywords) of at most `ID_LENGTH` characters,
    and ONNX and bioimage.io want every tensor named once: a task may be named ``my-task``,
    ``None`` or ``raw`` (the input), or 40 letters long. Those get ``_`` for ``-``, a ``_``
    after a keyword or a taken name, a cut, and a number where that still collides."""
    taken = {INPUT}
    names = []
    for task in tasks:
        name = _identifier(task)
        if name in taken:
            name = _identifier(name + "_")
        stem, n = name, 2
        while name in taken:
            suffix = f"_{n}"
            name, n = stem[: ID_LENGTH - len(suffix)] + suffix, n + 1
        taken.add(name)
        names.append(name)
    return names


def _identifier(name: str) -> str:
    name = name.replace("-", "_")
    if keyword.iskeyword(name):
        name += "_"
    return name[:ID_LENGTH]


def renamed(tasks: Sequence[str]) -> list[str]:
    """A note naming the outputs that are not called after their task, if any."""
    pairs = [f"{task} as {name}" for task, name in zip(tasks, output_names(tasks), strict=True)
             if task != name]
    if not pairs:
        return []
    return [f"note: outputs renamed for other tools (Python identifiers of at most "
            f"{ID_LENGTH} characters, '{INPUT}' is the input): {', '.join(pairs)}"]
