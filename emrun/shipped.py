"""Where the shipped recipes and the committed schema live: inside the package, so that a
wheel or a plain `pip install .` has them too (a source checkout also shows them as the
top-level `recipes/` and `schemas/`, links to these folders)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

PACKAGE = Path(str(resources.files("emrun")))
RECIPES = PACKAGE / "recipes"
SCHEMA = PACKAGE / "schemas" / "recipe.schema.json"


def shipped_recipes() -> list[Path]:
    """Every shipped recipe file, sorted by name."""
    return sorted(RECIPES.glob("*.yaml")) if RECIPES.is_dir() else []


def recipe_description(path: Path) -> str:
    """The recipe's `description:` line, read without validating the whole recipe."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("description:"):
            return line.partition(":")[2].strip().strip("'\"")
    return ""
