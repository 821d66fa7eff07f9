"""The facts a model package states about its network, read from its recipe and source.

What a user (or another program) needs before predicting: the tasks with their channels,
activations and affinity offsets; the input's channels, voxel size, intensity scale and the
patch sizes the network accepts; and where the network came from.
"""

from __future__ import annotations

import contextlib
import datetime
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..io import VolumeError, open_volume
from ..io.intensity import default_intensity
from ..recipe import Recipe
from ..recipe.data import SyntheticSource, VolumeSource
from ..recipe.tasks import AffinityTarget
from .source import Trained


def manifest(trained: Trained) -> dict[str, Any]:
    """The package manifest (without the member checksums, which the writer adds)."""
    recipe = trained.recipe
    return {
        "emrun": __version__,
        "name": recipe.name,
        "description": recipe.description,
        "model": {"type": recipe.model.type, "summary": recipe.model.summary()},
        "tasks": tasks(recipe),
        "input": {
            "axes": "czyx",
            "channels": recipe.model.input_channels(),
            "voxel_size": voxel_size(recipe),
            "intensity": intensity(recipe),
            "patch": list(recipe.infer_patch()),
            "divisor": list(recipe.model.divisor()),
        },
        "provenance": {
            **trained.provenance,
            "iteration": trained.iteration,
            "training_data": training_data(recipe),
            "exported": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "torch": torch.__version__,
        },
    }


def tasks(recipe: Recipe) -> dict[str, Any]:
    """Each task's output: target type, channels, activation, and offsets for affinities."""
    found = {}
    for name, task in recipe.tasks.items():
        entry: dict[str, Any] = {"target": task.target.type, "channels": task.channels(),
                                 "activation": task.activation}
        if isinstance(task.target, AffinityTarget):
            entry["offsets"] = [list(offset) for offset in task.target.offsets]
        found[name] = entry
    return found


def voxel_size(recipe: Recipe) -> list[float] | None:
    """The training sources' voxel size (nm, z, y, x) when they agree, else None; a source
    that gives none in the recipe is asked for its volume's metadata (when it can be read)."""
    sizes = set()
    for source in recipe.data.sources.values():
        size = source.voxel_size
        if size is None and isinstance(source, VolumeSource):
            try:
                size = open_volume(source.image).voxel_size
            except VolumeError:
                size = None
        if size is None:
            return None
        sizes.add(tuple(float(v) for v in size))
    return list(sizes.pop()) if len(sizes) == 1 else None


def intensity(recipe: Recipe) -> dict[str, Any]:
    """Raw values in [low, high] map to [0, 1]: the recipe's scale, else the dtype's of the
    first training image (uint8 when that cannot be read: synthetic sources are uint8)."""
    for source in recipe.data.sources.values():
        if isinstance(source, VolumeSource) and source.intensity is not None:
            return {"low": source.intensity.low, "high": source.intensity.high,
                    "from": "recipe"}
    dtype = np.dtype(np.uint8)
    first = next(iter(recipe.data.sources.values()))
    if isinstance(first, VolumeSource):
        with contextlib.suppress(VolumeError):
            dtype = open_volume(first.image).dtype
    low, high = default_intensity(dtype)
    return {"low": low, "high": high, "from": f"dtype {dtype}"}


def training_data(recipe: Recipe) -> dict[str, str]:
    """Each training source's name and what it read."""
    found = {}
    for name, source in recipe.data.sources.items():
        if isinstance(source, VolumeSource):
            found[name] = str(source.image)
        elif isinstance(source, SyntheticSource):
            found[name] = f"synthetic (seed {source.seed}, shape {list(source.shape)})"
        else:
            found[name] = str(source.type)
    return found
