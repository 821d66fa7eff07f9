"""JSON Schema of the recipe language, for editors (yaml-language-server) and docs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import UserError
from .recipe import Recipe

SCHEMA_URI = "https://json-schema.org/draft/2020-12/schema"


def recipe_schema() -> dict[str, Any]:
    """The recipe's JSON Schema (draft 2020-12), generated from the pydantic models."""
    schema = Recipe.model_json_schema(mode="validation")
    return {"$schema": SCHEMA_URI, "title": "emrun recipe", **schema}


def recipe_schema_text() -> str:
    """The schema as the exact text committed in schemas/recipe.schema.json."""
    return json.dumps(recipe_schema(), indent=2, sort_keys=False) + "\n"


MAX_SCHEMA_BYTES = 1 << 20


def refuse_foreign_file(output: Path) -> None:
    """An existing ``output`` is replaced only if it is an earlier recipe schema (so that
    ``emrun schema`` refreshes schemas/recipe.schema.json, and a user's file is kept)."""
    if not output.exists() or output.is_dir():
        return
    if not output.is_file():  # a device or a pipe: read whole (/dev/zero) or never answering
        raise UserError(f"{output}: exists and is not a regular file (a device, pipe or "
                        "socket); give a file path for the schema")
    try:
        with open(output, "rb") as handle:
            head = handle.read(MAX_SCHEMA_BYTES + 1)  # a schema is ~100 KB; more is not one
        doc = json.loads(head) if len(head) <= MAX_SCHEMA_BYTES else None
    except (OSError, ValueError):
        doc = None
    mine = recipe_schema()
    if not (isinstance(doc, dict) and doc.get("title") == mine["title"]
            and {"data", "model", "tasks"} <= set(doc.get("properties") or {})):
        raise UserError(f"{output}: exists and is not an emrun recipe schema; not overwriting "
                        "it (give another --output, or remove it)")
