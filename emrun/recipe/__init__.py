"""The recipe language: pydantic models, YAML loading with positions, checks, JSON Schema.

Plugins are loaded before the models are defined, so their specs join the unions.
"""

from ..registry import load_plugins

load_plugins()

from .errors import Mark, Problem, RecipeError  # noqa: E402
from .loader import LoadedRecipe, load_recipe, validate  # noqa: E402
from .recipe import Recipe  # noqa: E402

__all__ = ["LoadedRecipe", "Mark", "Problem", "Recipe", "RecipeError", "load_recipe", "validate"]
