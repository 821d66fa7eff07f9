"""Shared field types of the recipe language (zyx triples, probabilities, bounded numbers)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

MAX_SIZE = 1_000_000  # voxels along one axis; larger values are typos, not volumes
MAX_COUNT = 1_000_000_000  # iterations, steps and other counters

# Counts and sizes are strict integers: YAML's `true` or `yes` is a boolean, not 1.
Size = Annotated[int, Field(gt=0, le=MAX_SIZE, strict=True)]
Index = Annotated[int, Field(ge=0, le=MAX_SIZE, strict=True)]
Count = Annotated[int, Field(ge=0, le=MAX_COUNT, strict=True)]
PositiveCount = Annotated[int, Field(gt=0, le=MAX_COUNT, strict=True)]
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
