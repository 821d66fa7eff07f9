"""The stand-in network behind `emrun bench infer --no-model`: it costs (almost) nothing, so
the rate measured is the engine's own (reading, blending, quantising, compressing, writing),
yet its outputs are valid predictions every output dtype stores as they are."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..errors import UserError
from ..recipe import Recipe

PRE_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "sigmoid": lambda x: x * 8.0 - 4.0,  # sigmoid: 0.018 .. 0.982, spread like predictions
    "tanh": lambda x: x * 2.0,  # tanh: 0 .. 0.964
    "none": lambda x: x,  # 0 .. 1 as is
}
"""Per task activation, the stand-in's pre-activation of the normalised input x in [0, 1]:
once activated it lies in [0, 1], a valid probability that every output dtype stores as it is
(uint8 keeps round(255 p) of p clipped to [0, 1]; float16/float32 keep p)."""


class StandIn(nn.Module):
    """A network that costs (almost) nothing, with the recipe's heads: each head is the input
    mapped to a pre-activation and expanded (a view, no copy) to the head's channels. Under
    autocast it returns the autocast dtype, as a real network's last convolution would."""

    def __init__(self, heads: dict[str, tuple[int, str]]) -> None:
        super().__init__()
        self.heads = heads  # name: (channels, activation)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = x[:, :1]
        kind = x.device.type
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype
        return {name: PRE_ACTIVATIONS[activation](x).to(dtype).expand(-1, channels, -1, -1, -1)
                for name, (channels, activation) in self.heads.items()}


def stand_in(recipe: Recipe) -> StandIn:
    """The stand-in for ``recipe``'s network; a task whose activation it cannot produce valid
    outputs for is the user's error (benching it without its model would mean nothing)."""
    heads = {}
    for name, task in recipe.tasks.items():
        if task.activation not in PRE_ACTIVATIONS:
            raise UserError(f"--no-model: task {name!r} has activation {task.activation!r}, "
                            "which the stand-in network cannot produce (it knows "
                            f"{', '.join(PRE_ACTIVATIONS)}); bench this recipe with its model")
        heads[name] = (task.channels(), task.activation)
    return StandIn(heads)
