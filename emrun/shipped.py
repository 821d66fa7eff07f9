"""Where the shipped recipes and the committed schema live (a source checkout or an
editable install: both sit next to the package)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes"
SCHEMA = ROOT / "schemas" / "recipe.schema.json"


def shipped_recipes() -> list[Path]:
    """Every shipped recipe file, sorted by name."""
    return sorted(RECIPES.glob("*.yaml")) if RECIPES.is_dir() else []


def recipe_description(path: Path) -> str:
    """The recipe's `description:` line, read without validating the whole recipe."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("description:"):
            return line.partition(":")[2].strip().strip("'\"")
    return ""
