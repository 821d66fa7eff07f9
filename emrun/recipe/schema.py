"""JSON Schema of the recipe language, for editors (yaml-language-server) and docs."""

from __future__ import annotations

import json
from typing import Any

from .recipe import Recipe

SCHEMA_URI = "https://json-schema.org/draft/2020-12/schema"


def recipe_schema() -> dict[str, Any]:
    """The recipe's JSON Schema (draft 2020-12), generated from the pydantic models."""
    schema = Recipe.model_json_schema(mode="validation")
    return {"$schema": SCHEMA_URI, "title": "emrun recipe", **schema}


def recipe_schema_text() -> str:
    """The schema as the exact text committed in schemas/recipe.schema.json."""
    return json.dumps(recipe_schema(), indent=2, sort_keys=False) + "\n"
