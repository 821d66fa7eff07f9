"""JSON Schema of the recipe language, for editors (yaml-language-server) and docs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import UserError
from .recipe import DEFAULT_SOURCE_TYPE, Recipe

SCHEMA_URI = "https://json-schema.org/draft/2020-12/schema"


def recipe_schema() -> dict[str, Any]:
    """The recipe's JSON Schema (draft 2020-12), generated from the pydantic models, with
    what JSON Schema can say of emrun's rules and pydantic's generator leaves out (editors
    judge recipes by it: it should accept what `emrun validate` accepts, refuse what it
    refuses): a `type:` each member of a union needs, names as keys, null tasks, and
    recipes that `extends` a base (any section may be partial)."""
    schema = Recipe.model_json_schema(mode="validation")
    full = {"$schema": SCHEMA_URI, "title": "emrun recipe", **schema}
    for node in _nodes(full):
        _require_member_types(node, full["$defs"])
        _names_as_keys(node)
    _null_tasks(full)
    return _partial_when_extending(full)


def _nodes(schema: Any) -> list[dict[str, Any]]:
    """Every mapping in ``schema``, depth first."""
    found: list[dict[str, Any]] = []
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            found.append(node)
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return found


def _require_member_types(node: dict[str, Any], defs: dict[str, Any]) -> None:
    """A union of specs tells its members by `type:`, which pydantic requires (the source
    union reads none as a volume source), but its schema left optional: a mapping that fit
    one member without it (`segment: {threshold: 0.4}`, a cc) passed the editor."""
    members = node.get("oneOf")
    if not isinstance(members, list) or not all(
            isinstance(m, dict) and set(m) == {"$ref"} for m in members):
        return
    for member in members:
        spec = defs[member["$ref"].rpartition("/")[2]]
        kind = (spec.get("properties") or {}).get("type")
        if kind is None:
            continue
        if "discriminator" not in node and kind.get("const") == DEFAULT_SOURCE_TYPE:
            continue  # the union's default: `type:` may be left out
        required = spec.setdefault("required", [])
        if "type" not in required:
            required.append("type")


def _names_as_keys(node: dict[str, Any]) -> None:
    """Keys that are names (tasks, sources) are checked by their pattern: as
    `patternProperties` alone, a key that did not match it was let through unchecked."""
    patterns = node.get("patternProperties")
    if isinstance(patterns, dict) and len(patterns) == 1 and "propertyNames" in node:
        node["propertyNames"] = {**node["propertyNames"], "pattern": next(iter(patterns))}


def _null_tasks(schema: dict[str, Any]) -> None:
    """A task may be null (`tasks: {lsd: null}`: all its defaults, `task_defaults`)."""
    tasks = schema["properties"]["tasks"]["patternProperties"]
    for pattern, task in tasks.items():
        tasks[pattern] = {"anyOf": [task, {"type": "null"}]}


PARTIAL = "Partial"
"""Prefix of the definitions of `_partial_when_extending`'s relaxed copy."""


def _partial_when_extending(full: dict[str, Any]) -> dict[str, Any]:
    """A recipe that `extends` a base may leave anything to it: the base's sections are
    merged under its own. The schema's top level is the recipe with nothing required (each
    definition copied as `PartialNAME`, unions of specs as `anyOf`: a partial model fits
    several), and the whole recipe's rules hold unless `extends` is given: the shipped
    snemi3d_lsd.yaml, which points editors at this schema, was flagged for the sections it
    takes from its base."""
    defs = full.pop("$defs")
    top = {k: full.pop(k) for k in ("$schema", "title")}
    whole = dict(full)
    partial = _relaxed({"$defs": defs, **whole})
    return {**top, **{k: v for k, v in partial.items() if k != "$defs"},
            "$defs": {**defs, **partial["$defs"], "Recipe": whole},
            "if": EXTENDING, "else": {"$ref": "#/$defs/Recipe"}}


EXTENDING = {"required": ["extends"], "properties": {"extends": {"anyOf": [
    {"type": "string"}, {"type": "array", "minItems": 1}]}}}
"""A recipe that names a base (`extends: null` or `[]` names none)."""


def _relaxed(schema: Any) -> Any:
    """``schema`` with nothing required, `oneOf` read as `anyOf`, and its definitions'
    names (and references to them) prefixed with `PARTIAL`."""
    if isinstance(schema, list):
        return [_relaxed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if (key == "required" and isinstance(value, list)) or (
                key == "discriminator" and isinstance(value, dict)):
            continue  # keywords, not properties of those names
        if key == "$ref" and isinstance(value, str) and value.startswith("#/$defs/"):
            out[key] = f"#/$defs/{PARTIAL}{value.rpartition('/')[2]}"
        elif key == "$defs":
            out[key] = {f"{PARTIAL}{name}": _relaxed(spec) for name, spec in value.items()}
        else:
            out["anyOf" if key == "oneOf" else key] = _relaxed(value)
    return out


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
            head = handle.read(MAX_SCHEMA_BYTES + 1)  # a schema is ~200 KB; more is not one
        doc = json.loads(head) if len(head) <= MAX_SCHEMA_BYTES else None
    except (OSError, ValueError):
        doc = None
    mine = recipe_schema()
    if not (isinstance(doc, dict) and doc.get("title") == mine["title"]
            and {"data", "model", "tasks"} <= set(doc.get("properties") or {})):
        raise UserError(f"{output}: exists and is not an emrun recipe schema; not overwriting "
                        "it (give another --output, or remove it)")
