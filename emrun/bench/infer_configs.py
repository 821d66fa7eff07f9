"""`emrun bench infer --configs`: the model-only rate over batch size, memory format and
torch.compile mode, and the ``-o`` overrides that make `emrun infer` run the fastest (with its
speed-up over the recipe's own configuration), so a user tunes a recipe from one measurement."""

from __future__ import annotations

import copy
import math
import statistics
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from ..infer.engine import Engine
from ..recipe import Recipe
from .model_rate import model_times

EXTRA_COMPILE_MODES = ("max-autotune", "reduce-overhead")
"""torch.compile modes tried on CUDA beyond the default (`infer.compile_mode`; reduce-overhead
replays CUDA graphs)."""


@dataclass(frozen=True)
class Config:
    """One way to run the model: patches per pass, memory format (None: not an axis on this
    device) and torch.compile mode (None: eager)."""

    batch_size: int
    channels_last: bool | None
    compile: str | None


def config_grid(recipe: Recipe, compile_: bool) -> list[Config]:
    """The recipe's batch size, 2x and 4x; channels_last_3d on and off; eager, and
    torch.compile's default mode when ``compile_``."""
    batch = recipe.infer.batch_size
    sizes = [b for b in (batch, 2 * batch, 4 * batch) if b <= 1024]  # infer.batch_size's limit
    layouts: list[bool | None] = [True, False]
    modes: list[str | None] = [None, "default"] if compile_ else [None]
    return [Config(b, c, m) for b in sizes for c in layouts for m in modes]


def recipe_config(recipe: Recipe) -> Config:
    """The config the recipe runs (the speed-ups' baseline)."""
    return Config(recipe.infer.batch_size, recipe.infer.channels_last,
                  recipe.infer.compile_mode if recipe.infer.compile else None)


def extra_configs(best: Config, device_type: str, compile_: bool) -> list[Config]:
    """The slow-to-compile modes, on the best batch size and memory format only (compiling
    each takes minutes); CUDA only."""
    if device_type != "cuda" or not compile_:
        return []
    return [replace(best, compile=mode) for mode in EXTRA_COMPILE_MODES]


def _config_engine(recipe: Recipe, model: nn.Module, device: torch.device,
                   config: Config) -> Engine:
    """An engine running ``config`` as `emrun infer` would with the config's overrides, on a
    contiguous copy of the model (the bench's engine may have made it channels_last_3d: that
    converts in place; the config's engine converts its copy when the config says so)."""
    update: dict[str, Any] = {}
    if config.channels_last is not None:
        update["channels_last"] = config.channels_last
    if config.compile is not None:
        update["compile_mode"] = config.compile
        from torch import _dynamo

        _dynamo.reset()  # each config compiles afresh (no recompile limit, no reuse)
    infer = recipe.infer.model_copy(update=update)
    net = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    return Engine(recipe.model_copy(update={"infer": infer}), net, device,
                  batch_size=config.batch_size, compile=config.compile is not None)


def _time_config(recipe: Recipe, model: nn.Module, device: torch.device, image: np.ndarray,
                 config: Config, repeats: int) -> dict[str, Any]:
    """The config's model-only voxels/s, or the first line of why it failed (a compiler
    missing, out of memory): one failed config does not end the search."""
    row: dict[str, Any] = {**asdict(config), "voxels_per_s": None, "error": None}
    try:
        engine = _config_engine(recipe, model, device, config)
        seconds = statistics.median(model_times(engine, image, repeats))
        row["voxels_per_s"] = round(config.batch_size * math.prod(engine.patch) / seconds, 1)
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}" \
            if str(exc).strip() else type(exc).__name__
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def config_overrides(recipe: Recipe, row: dict[str, Any], compile_measured: bool) -> list[str]:
    """The ``-o`` overrides that make `emrun infer` run ``row``'s config (only for the axes
    that were measured)."""
    found = []
    if row["batch_size"] != recipe.infer.batch_size:
        found.append(f"infer.batch_size={row['batch_size']}")
    if row["channels_last"] is not None and row["channels_last"] != recipe.infer.channels_last:
        found.append(f"infer.channels_last={str(row['channels_last']).lower()}")
    if compile_measured:
        compiled = row["compile"] is not None
        if compiled != recipe.infer.compile:
            found.append(f"infer.compile={str(compiled).lower()}")
        if compiled and row["compile"] != recipe.infer.compile_mode:
            found.append(f"infer.compile_mode={row['compile']}")
    return found


def search_configs(recipe: Recipe, model: nn.Module, device: torch.device, image: np.ndarray,
                   compile_: bool, repeats: int) -> dict[str, Any]:
    """Every config's model-only rate, and the best one with the overrides that select it
    and its speed-up over the recipe's own config."""
    rows = [_time_config(recipe, model, device, image, c, repeats)
            for c in config_grid(recipe, compile_)]
    best = _best(rows)
    if best is not None:
        rows += [_time_config(recipe, model, device, image, c, repeats)
                 for c in extra_configs(Config(best["batch_size"], best["channels_last"],
                                               best["compile"]), device.type, compile_)]
    mine = recipe_config(recipe)
    own = next((r for r in rows if r["voxels_per_s"] and Config(
        r["batch_size"], r["channels_last"], r["compile"]) == mine), None)
    return {"configs": rows, "best_config": _with_overrides(recipe, _best(rows), own, compile_),
            "compile_measured": compile_}


def _best(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The fastest timed row (failed configs have no rate), or None when every one failed."""
    timed = [r for r in rows if r["voxels_per_s"]]
    return max(timed, key=lambda r: r["voxels_per_s"]) if timed else None


def _with_overrides(recipe: Recipe, row: dict[str, Any] | None, own: dict[str, Any] | None,
                    compile_: bool) -> dict[str, Any] | None:
    """``row`` with what a user needs to act on it: the overrides that select it and how much
    faster it is than the recipe's own config (None when that one was not timed)."""
    if row is None:
        return None
    speedup = None if own is None else round(row["voxels_per_s"] / own["voxels_per_s"], 3)
    return {**row, "overrides": config_overrides(recipe, row, compile_),
            "speedup_vs_recipe": speedup}
