"""What evaluate accepts: the user-facing checks on the volumes it is given.

Each check raises `EvaluationError` (a `UserError`: the CLI prints it and exits 2) with a
message naming the volume and what is wrong, before any voxel is scored.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from emrun.errors import UserError


class EvaluationError(UserError):
    """Inputs that cannot be scored: wrong shape, wrong dtype, nothing to score."""


def check_inputs(
    named: Sequence[tuple[str, str, tuple[int, ...], np.dtype]], binary: bool = False,
    offsets: Sequence[Sequence[int] | None] | None = None,
) -> None:
    """Check (role, name, shape, dtype) of seg/pred, truth and optionally mask.

    Volumes are 2-d (y, x) or 3-d (z, y, x); a channel axis is refused rather than guessed
    away. Segmentations and their truth need integer ids; with `binary` the prediction
    may be bool, integer or float (probabilities) and the truth any of these. ``offsets``
    (voxels, None where a volume states none), given for volumes read from files, say where
    volumes of other shapes lie.
    """
    for role, name, shape, dtype in named:
        if 0 in shape:
            raise EvaluationError(f"{name}: the {role} is empty (shape {list(shape)}): nothing "
                                  "to score")
        if len(shape) not in (2, 3):
            raise EvaluationError(
                f"{name}: {role} has {len(shape)} axes (shape {list(shape)}); evaluate needs "
                "a 3-d (z, y, x) or 2-d (y, x) volume, or one channel (1, z, y, x)"
                f"{_channels_hint(role, shape)}"
            )
        if role == "mask" or binary:
            if dtype.kind not in "biuf":
                raise EvaluationError(
                    f"{name}: {role} has dtype {dtype}; expected bool, integer or float"
                )
        elif dtype.kind not in "iu":
            hint = "; to score probabilities or a mask, use --binary" if dtype.kind in "fb" else ""
            raise EvaluationError(
                f"{name}: {role} has dtype {dtype}, not integer ids; a segmentation and its "
                f"truth need integer labels{hint}"
            )
    (_, first, shape, _), *rest = named
    for i, (role, name, other, _) in enumerate(rest, 1):
        if len(other) != len(shape):
            raise EvaluationError(
                f"{name}: {role} has shape {list(other)} ({len(other)}-d) but {first} has shape "
                f"{list(shape)} ({len(shape)}-d); give volumes with the same axes (2-d with "
                "2-d, 3-d with 3-d)"
            )
        if other != shape:
            raise EvaluationError(
                f"{name}: {role} has shape {list(other)} but {first} has shape {list(shape)}"
                f"{_apart(name, first, offsets[i], offsets[0]) if offsets else ''}"
            )


def _apart(name: str, first: str, mine: Sequence[int] | None,
           theirs: Sequence[int] | None) -> str:
    """Where two volumes of other shapes lie, as their offsets say: neither box holds the
    other, or a volume states no offset that could place it (a message said "their offsets
    do not place it inside" of volumes with none)."""
    if mine is not None and theirs is not None:
        return (f", at offset {list(mine)} against {list(theirs)} (voxels): neither box holds "
                "the other; crop both to a common box")
    missing = [n for n, offset in ((name, mine), (first, theirs)) if offset is None]
    verb = "states" if len(missing) == 1 else "state"
    return (f"; {' and '.join(missing)} {verb} no offset that places one inside the other: "
            "crop both to the same box, or give them offset metadata")


def _channels_hint(role: str, shape: tuple[int, ...]) -> str:
    """What a segmentation of several channels most likely is: a network's output (the
    message spoke only of axes, where the user gave affinities for a segmentation)."""
    if role != "segmentation" or len(shape) != 4 or shape[0] < 2:
        return ""
    return (f"; its {shape[0]} channels look like a prediction (affinities, say): segment it "
            "first (emrun segment) and evaluate the segmentation")


def negative_id_warnings(negative: tuple[int, int], seg: str, truth: str) -> list[str]:
    """A warning for each of ``seg`` and ``truth`` with negative ids among the scored voxels
    (``negative``: their counts, `ContingencyTable.negative`): each is scored as an object,
    and -1 often means unlabelled. Counted where the voxels are read, in memory, streamed
    and in blocks alike (sample boxes missed negatives elsewhere)."""
    lines = []
    if negative[0]:
        lines.append(f"{seg} holds negative ids: each is scored as a segment, as every "
                     f"segmentation id is ({negative[0]:,} scored voxels)")
    if negative[1]:
        lines.append(f"{truth} holds negative ids: each is scored as an object (only 0 is "
                     "unlabelled); map them to 0 first if they mean unlabelled "
                     f"({negative[1]:,} scored voxels)")
    return lines


def one_channel_dropped(array: np.ndarray) -> np.ndarray:
    """A (1, z, y, x) array as (z, y, x), as volumes on disk are read (`single_channel`):
    the in-memory scores take what `check_inputs`' message says they take."""
    return array[0] if array.ndim == 4 and array.shape[0] == 1 else array
