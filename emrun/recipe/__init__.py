"""The recipe language: pydantic models, YAML loading with positions, checks, JSON Schema.

The composed ``Recipe`` (and the loader built on it) is imported on first use: defining it
resolves every registered name, which loads the third-party plugins, so ``import
emrun.recipe`` (or a section module such as ``emrun.recipe.augment``) runs no plugin code.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import Mark, Problem, RecipeError

if TYPE_CHECKING:
    from .loader import LoadedRecipe, load_recipe, validate
    from .recipe import Recipe

_LAZY = {
    "LoadedRecipe": "emrun.recipe.loader",
    "load_recipe": "emrun.recipe.loader",
    "validate": "emrun.recipe.loader",
    "Recipe": "emrun.recipe.recipe",
}

__all__ = ["LoadedRecipe", "Mark", "Problem", "Recipe", "RecipeError", "load_recipe", "validate"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
