"""Shared field types of the recipe language (zyx triples, probabilities, bounded numbers)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from pydantic import Field

MAX_SIZE = 1_000_000  # voxels along one axis; larger values are typos, not volumes
MAX_COUNT = 1_000_000_000  # iterations, steps and other counters

# Counts and sizes are strict integers: YAML's `true` or `yes` is a boolean, not 1.
Size = Annotated[int, Field(gt=0, le=MAX_SIZE, strict=True)]
Index = Annotated[int, Field(ge=0, le=MAX_SIZE, strict=True)]
Count = Annotated[int, Field(ge=0, le=MAX_COUNT, strict=True)]
PositiveCount = Annotated[int, Field(gt=0, le=MAX_COUNT, strict=True)]
Flag = Annotated[bool, Field(strict=True)]
"""A yes/no setting: a YAML boolean only (1, 0.0 and 'yes' were read as booleans, which
the recipe's JSON Schema, and so an editor, refused)."""
Probability = Annotated[float, Field(ge=0.0, le=1.0)]
NonNegative = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
Positive = Annotated[float, Field(gt=0.0, allow_inf_nan=False)]

Zyx = tuple[Size, Size, Size]
"""A positive size per axis, z, y, x (voxels)."""

IndexZyx = tuple[Index, Index, Index]
"""A non-negative position per axis, z, y, x (voxels)."""

Nanometres = tuple[Positive, Positive, Positive]
"""A voxel size per axis, z, y, x (nm)."""

Offset = tuple[Annotated[int, Field(strict=True)], Annotated[int, Field(strict=True)],
               Annotated[int, Field(strict=True)]]
"""An affinity offset, z, y, x (voxels; DeepEM/waterz convention uses negative components)."""

Seed = Annotated[int, Field(ge=0, lt=2**63, strict=True)]

Name = Annotated[str, Field(pattern=r"^[A-Za-z][A-Za-z0-9_\-]*$", max_length=64, strict=True)]
"""A name used as a key or an output array name: letters, digits, '_' and '-'."""


def items_schema(**keywords: Any) -> Callable[[dict[str, Any]], None]:
    """A field's `json_schema_extra` adding ``keywords`` to each item of its array (also of
    an optional one): a check a validator makes item by item, with its own message, stated
    to the JSON Schema too, so that an editor flags what `emrun validate` refuses."""
    def extra(schema: dict[str, Any]) -> None:
        for array in [schema, *schema.get("anyOf", [])]:
            items = [*array.get("prefixItems", []), *([array["items"]] if "items" in array
                                                      else [])]
            for item in items:
                item.update(keywords)
    return extra
