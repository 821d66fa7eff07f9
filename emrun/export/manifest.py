"""The facts a model package states about its network, read from its recipe and source.

What a user (or another program) needs before predicting: the tasks with their channels,
activations and affinity offsets; the input's channels, voxel size, intensity scale and the
patch sizes the network accepts; the plugin packages its recipe's names need; and where the
network came from.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..io import Volume, VolumeError, open_volume
from ..io.intensity import default_intensity
from ..recipe import Recipe
from ..recipe.data import SyntheticSource, VolumeSource
from ..recipe.tasks import AffinityTarget
from ..registry import plugins_used
from .source import Trained


def manifest(trained: Trained) -> dict[str, Any]:
    """The package manifest (without the member checksums, which the writer adds)."""
    recipe = trained.recipe
    run = trained.provenance.get("training_run")
    base = run.get("cwd") if isinstance(run, dict) and isinstance(run.get("cwd"), str) else None
    return {
        "emrun": __version__,
        "name": recipe.name,
        "description": recipe.description,
        "model": {"type": recipe.model.type, "summary": recipe.model.summary()},
        "tasks": tasks(recipe),
        "input": {
            "axes": "czyx",
            "channels": recipe.model.input_channels(),
            "voxel_size": _stated(voxel_size(recipe, base),
                                  _voxel_size_or_none(trained.stated.get("voxel_size"))),
            "intensity": _stated(intensity(recipe, base),
                                 _intensity_or_none(trained.stated.get("intensity"))),
            "patch": list(recipe.infer_patch()),
            "divisor": list(recipe.model.divisor()),
        },
        "plugins": [use.as_dict() for use in plugins_used(recipe.resolved())],
        "provenance": {
            **trained.provenance,
            "iteration": trained.iteration,
            "training_data": training_data(recipe),
            "exported": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "torch": torch.__version__,
        },
    }


def _stated(found: Any, stated: Any) -> Any:
    """What the data say now, unless they could not say and a package stated it before."""
    unknown = found is None or (isinstance(found, dict) and
                                str(found.get("from", "")).startswith(ASSUMED))
    if unknown and stated is not None and not (
            isinstance(stated, dict) and str(stated.get("from", "")).startswith(ASSUMED)):
        return stated
    return found


def _voxel_size_or_none(stated: Any) -> list[float] | None:
    """A package's stated voxel size when it is one (three positive numbers): its manifest
    carries the checksums, not one of its own, so a hand edit reaches here unchecked."""
    if not isinstance(stated, list) or len(stated) != 3 or not all(
            _number(v) and v > 0 for v in stated):
        return None
    return [float(v) for v in stated]


def _intensity_or_none(stated: Any) -> dict[str, Any] | None:
    """A package's stated intensity scale when it is one (numbers, low below high)."""
    if not isinstance(stated, dict):
        return None
    low, high = stated.get("low"), stated.get("high")
    if not (_number(low) and _number(high) and low < high):
        return None
    return stated


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and \
        bool(np.isfinite(value))


ASSUMED = "assumed"
"""How an intensity scale that no data or recipe gave begins its ``from``."""


def notes(facts: dict[str, Any]) -> list[str]:
    """Lines for the user about input facts the export could not find (its training data
    are elsewhere): what the output states instead."""
    found = []
    source = facts["input"]["intensity"].get("from", "")
    if str(source).startswith(ASSUMED):
        found.append(f"note: intensity scale {source}; if the network was trained on "
                     "another dtype, export from where its training data are (or give the "
                     "sources' `intensity` in the recipe)")
    if facts["input"]["voxel_size"] is None:
        found.append("note: voxel size unknown (the training sources do not state one, "
                     "disagree, or could not be read here)")
    return found


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


def _training_volume(path: Any, base: str | None) -> Volume:
    """A training source's volume: its path as the recipe gives it, relative to this
    working directory, else to the one training ran in (``base``, from the run's
    provenance), so an export from another folder still reads it."""
    try:
        return open_volume(path)
    except VolumeError:
        text = str(path)
        if base is None or "://" in text or Path(text).is_absolute():
            raise
        return open_volume(Path(base) / text)


def voxel_size(recipe: Recipe, base: str | None = None) -> list[float] | None:
    """The training sources' voxel size (nm, z, y, x) when they agree, else None; a source
    that gives none in the recipe is asked for its volume's metadata (when it can be read;
    relative paths also from ``base``, the training's working directory)."""
    sizes = set()
    for source in recipe.data.sources.values():
        size = source.voxel_size
        if size is None and isinstance(source, VolumeSource):
            try:
                size = _training_volume(source.image, base).voxel_size
            except VolumeError:
                size = None
        if size is None:
            return None
        sizes.add(tuple(float(v) for v in size))
    return list(sizes.pop()) if len(sizes) == 1 else None


def intensity(recipe: Recipe, base: str | None = None) -> dict[str, Any]:
    """Raw values in [low, high] map to [0, 1]: the recipe's scale, else the dtype's of the
    first training image (uint8 when that cannot be read: synthetic sources are uint8;
    relative paths also from ``base``, the training's working directory)."""
    for source in recipe.data.sources.values():
        if isinstance(source, VolumeSource) and source.intensity is not None:
            return {"low": source.intensity.low, "high": source.intensity.high,
                    "from": "recipe"}
    dtype = np.dtype(np.uint8)
    first = next(iter(recipe.data.sources.values()))
    if isinstance(first, VolumeSource):
        try:
            dtype = _training_volume(first.image, base).dtype
        except VolumeError:
            low, high = default_intensity(dtype)
            return {"low": low, "high": high, "from": f"{ASSUMED} (dtype {dtype}): the "
                    f"training image {first.image} could not be read"}
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
