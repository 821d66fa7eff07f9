"""Affinities as segmenters see them: float32 (c, z, y, x) in [0, 1] plus one zyx offset per
channel, and the voxel pairs each channel connects.

The convention is the data layer's (emrun.data.targets): channel c at voxel v is
the probability that v and v + offsets[c] belong to one object. Nearest-neighbour channels
are the single-axis unit offsets ((-1, 0, 0), (0, -1, 0), (0, 0, -1) in DeepEM's and waterz's
convention); every other offset is long-range.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import UserError
from ..io.intensity import outside_unit

Offset = tuple[int, int, int]

__all__ = [
    "Offset",
    "check_distinct_offsets",
    "check_offsets",
    "edge_slices",
    "nearest_axes",
    "parse_offsets",
    "to_float",
]


def parse_offsets(value: Any, where: str) -> tuple[Offset, ...]:
    """Offsets from an attribute value (a list of triples) or command-line text.

    Text may be JSON (``[[-1,0,0],[0,-1,0]]``) or triples separated by spaces or ';'
    (``-1,0,0 0,-1,0``). Problems are UserErrors naming ``where``.
    """
    if isinstance(value, str):
        text = value.strip()
        try:
            value = json.loads(text)
        except ValueError as exc:
            if text.startswith("["):  # JSON meant: triples split at its commas said nonsense
                raise UserError(f"{where}: {text!r} is not valid JSON ({exc}); give "
                                "[[-1,0,0],[0,-1,0],...] or -1,0,0 0,-1,0 ...") from None
            value = [part.split(",") for part in re.split(r"[;\s]+", text) if part]
    if not isinstance(value, list | tuple) or not value:
        raise UserError(f"{where}: offsets must be a non-empty list of z,y,x triples "
                        f"(got {value!r})")
    offsets = []
    for item in value:
        try:
            triple = tuple(int(str(v).strip()) for v in item)
        except (TypeError, ValueError):
            raise UserError(f"{where}: offset {item!r} is not three integers z,y,x") from None
        if len(triple) != 3:
            raise UserError(f"{where}: offset {list(triple)} is not three integers z,y,x")
        if triple == (0, 0, 0):
            raise UserError(f"{where}: offset [0, 0, 0] connects a voxel to itself")
        offsets.append(triple)
    return tuple(offsets)  # type: ignore[return-value]


def check_offsets(offsets: Sequence[Offset], channels: int, where: str,
                  shape: Sequence[int] | None = None) -> None:
    """One offset per channel, and a nearest-neighbour channel along every axis of the
    volume's spatial ``shape`` that is more than one voxel long (a one-section volume has
    no z edge, so its 2-d affinities need no z channel; None: along every axis)."""
    if len(offsets) != channels:
        raise UserError(f"{where}: {channels} affinity channels but {len(offsets)} offsets "
                        f"{[list(o) for o in offsets]}; give one offset per channel")
    missing = [axis for axis, chans in enumerate(nearest_axes(offsets))
               if not chans and (shape is None or shape[axis] > 1)]
    if missing:
        names = ", ".join("zyx"[a] for a in missing)
        need = ", ".join(str(_unit(a)) for a in missing)
        raise UserError(f"{where}: no nearest-neighbour affinity along {names} (offsets "
                        f"{[list(o) for o in offsets]}); segmentation needs one along every "
                        f"axis longer than one voxel: add {need}")


def check_distinct_offsets(offsets: Sequence[Offset], where: str) -> None:
    """Refuse a volume whose offsets name one edge twice: a metadata mistake (two channels
    cannot both be the same edge), which segmented in memory and in blocks differently.
    The segmenters themselves take repeated channels; this is for a user's volume."""
    named = [tuple(int(d) for d in o) for o in offsets]
    repeated = sorted({o for o in named if named.count(o) > 1})
    if repeated:
        raise UserError(f"{where}: offsets {[list(o) for o in offsets]} name "
                        f"{', '.join(str(list(o)) for o in repeated)} more than once; each "
                        "channel is the affinity of another offset")


def _unit(axis: int) -> Offset:
    """The nearest-neighbour offset along ``axis`` (one step back)."""
    return tuple(-1 if a == axis else 0 for a in range(3))  # type: ignore[return-value]


def nearest_axes(offsets: Sequence[Offset]) -> tuple[list[int], list[int], list[int]]:
    """For each axis z, y, x: the channels whose offset is one step along that axis only."""
    axes: tuple[list[int], list[int], list[int]] = ([], [], [])
    for c, offset in enumerate(offsets):
        if sum(abs(d) for d in offset) == 1:
            axes[int(np.flatnonzero(offset)[0])].append(c)
    return axes


def is_nearest(offset: Offset) -> bool:
    return sum(abs(d) for d in offset) == 1


def to_float(affs: np.ndarray, where: str = "affinities") -> np.ndarray:
    """float32 affinities in [0, 1]: uint8 is read as round(255 p) (inference output), floats
    as probabilities (outside [0, 1] they are logits: refused), bool as 0/1. Anything else is
    a UserError."""
    dtype = affs.dtype
    if dtype == np.uint8:
        # divided, not multiplied by float32(1/255): the product lands one float32 step above
        # k/255 for 126 of the 256 levels, so a stored 51 counted as above a threshold of 0.2
        return affs.astype(np.float32) / np.float32(255)
    if dtype.kind == "f":
        values = affs.astype(np.float32, copy=False)
        if not np.isfinite(values).all():  # segmenters (mws: a Rust panic) cannot rank NaN
            bad = int(values.size - np.isfinite(values).sum())
            raise UserError(f"{where}: {bad} NaN or infinite values; affinities are "
                            "probabilities in [0, 1]")
        if values.size:
            low, high = float(values.min()), float(values.max())
            if outside_unit(low, high):  # logits: garbage segments
                raise UserError(f"{where}: values in [{low:.4g}, {high:.4g}], outside [0, 1]; "
                                "affinities are probabilities: apply a sigmoid to logits "
                                "first (emrun infer writes probabilities)")
        return values
    if dtype.kind == "b":
        return affs.astype(np.float32)
    raise UserError(f"{where}: dtype {dtype} is not affinities; expected uint8 (255 = 1) or "
                    "float probabilities")


def edge_slices(shape: Sequence[int], offset: Sequence[int]
                ) -> tuple[tuple[slice, ...], tuple[slice, ...]] | None:
    """Slices ``(at_v, at_v_plus_offset)`` over the voxels v with v + offset inside ``shape``;
    None when there is none."""
    here, there = [], []
    for n, d in zip(shape, offset, strict=True):
        if abs(d) >= n:
            return None
        here.append(slice(max(0, -d), n - max(0, d)))
        there.append(slice(max(0, d), n + min(0, d)))
    return tuple(here), tuple(there)
