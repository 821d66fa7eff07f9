"""What every segmenter provides, so that the same drivers run any of them in memory
(``pipeline``) or block by block (``blockwise``), and one sweep (``sweep``) can vary any of
them along the value its spec declares.

A segmenter turns float32 affinities (c, z, y, x) of one region into *fragments*: integer
ids, 0 where it assigned nothing (masked voxels, or voxels it left alone). The driver does
the rest the same way for all: unique ids for unassigned voxels, stitching across blocks,
merging small segments, compact ids.
"""

from __future__ import annotations

import functools
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from pydantic import ValidationError

from ..errors import UserError
from ..recipe.run import SegmenterBase
from ..registry import Spec
from .affinities import Offset, edge_slices
from .graph import Edges

__all__ = ["Segmenter", "edge_valid", "respec", "said_as", "spec_problems"]


def respec(spec: Spec, **changes: Any) -> Spec:
    """``spec`` with some parameters changed, validated like the recipe's (a value out of
    range is a UserError naming the parameter)."""
    try:
        return type(spec).model_validate({**spec.model_dump(), **changes})
    except ValidationError as exc:
        raise UserError(f"segmenter {spec.type}: {spec_problems(exc)}") from None  # type: ignore[attr-defined]


def said_as(flag: str, make: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``make(*args, **kwargs)``, its UserError led by the option that gave the value: a
    flag's value out of range named the segmenter's parameter (``thresholds.0``) alone."""
    try:
        return make(*args, **kwargs)
    except UserError as exc:
        raise UserError(f"{flag}: {exc}") from None


def spec_problems(exc: ValidationError) -> str:
    """pydantic's complaints about a segmenter's parameters on one line: 'bias: input should
    be a valid number (got 'x')', without its links and layout; a NaN is said to be one
    (pydantic's 'less than 1' for `--threshold nan` read oddly)."""
    return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {_complaint(e)}"
                     for e in exc.errors())


def _complaint(error: Any) -> str:
    value = error.get("input")
    if isinstance(value, float) and math.isnan(value):
        return "must be a number, not nan"
    message = str(error["msg"])
    return f"{message[:1].lower()}{message[1:]} (got {value!r})"


def edge_valid(mask: np.ndarray | None, offset: Offset) -> np.ndarray | None:
    """Over the voxels v of ``mask`` with v + offset inside it: True where both ends are
    inside the mask (None: no mask, everything valid)."""
    if mask is None:
        return None
    pair = edge_slices(mask.shape, offset)
    if pair is None:
        return np.zeros((0, 0, 0), bool)
    here, there = pair
    return mask[here] & mask[there]


@dataclass(frozen=True)
class Segmenter(ABC):
    """A segmentation method with its validated recipe spec (an ``emrun.recipe.run``
    ``SegmenterBase``, which says what a sweep varies and ``min_size``).

    ``exact_stitching`` says whether block
    results stitched with :meth:`stitch` equal the whole-volume result (up to ids).
    ``keeps_apart`` says whether :meth:`stitch` also takes ``apart=``: the pairs of ids
    adjacent inside one block, with their summed nearest-neighbour affinity (a method that
    separates neighbours on purpose, such as mws, weighs them against the crossing edges).
    """

    spec: SegmenterBase
    exact_stitching: ClassVar[bool] = False
    blockwise: ClassVar[bool] = True
    keeps_apart: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Every implementation's fragments are checked as they leave it (see
        :func:`checked_fragments`), so a plugin's cannot be written off-shape or as floats."""
        super().__init_subclass__(**kwargs)
        if "fragments" in cls.__dict__:
            cls.fragments = _checked(cls.__dict__["fragments"])  # type: ignore[method-assign]
        if "fragments_for" in cls.__dict__:
            cls.fragments_for = _checked_each(cls.__dict__["fragments_for"])  # type: ignore[method-assign]

    @property
    def min_size(self) -> int:
        return int(self.spec.min_size)

    @property
    def value_name(self) -> str:
        """What one value of the swept parameter is called (bias, threshold)."""
        return self.spec.value_name

    @property
    def value(self) -> float:
        """The current value of the swept parameter."""
        return self.spec.value()

    def with_value(self, value: float) -> Segmenter:
        """The same segmenter with the swept parameter set to ``value``."""
        return type(self)(respec(self.spec, **self.spec.value_update(value)))

    @abstractmethod
    def fragments(self, affs: np.ndarray, offsets: Sequence[Offset],
                  mask: np.ndarray | None) -> np.ndarray:
        """Integer ids for one region, 0 where nothing was assigned; ``mask`` is bool or
        None (everything inside)."""

    def fragments_for(self, values: Sequence[float], affs: np.ndarray,
                      offsets: Sequence[Offset], mask: np.ndarray | None
                      ) -> Iterator[np.ndarray]:
        """Fragments for each value of the swept parameter, in the order given (methods
        that can share work between values override this)."""
        for value in values:
            yield self.with_value(value).fragments(affs, offsets, mask)

    def channels(self, offsets: Sequence[Offset]) -> list[int]:
        """The affinity channels the method reads; the in-memory paths read only these
        (a nearest-neighbour method skips the long-range channels' memory)."""
        return list(range(len(offsets)))

    def halo(self, offsets: Sequence[Offset]) -> tuple[int, int, int]:
        """Context read around each block (voxels per axis), cropped after segmenting."""
        return (0, 0, 0)

    def bytes_per_voxel(self, channels: int) -> int:
        """Rough peak memory per voxel of a region, for choosing in memory vs blockwise."""
        return 5 * channels + 48

    @abstractmethod
    def face_edges(self, u: np.ndarray, v: np.ndarray, p: np.ndarray,
                   offset: Offset) -> Edges:
        """Reduce voxel pairs (ids u, v; affinity p of channel ``offset``) that cross a block
        face to the id pairs :meth:`stitch` needs."""

    @abstractmethod
    def stitch(self, edges: Edges, count: int) -> np.ndarray:
        """A table mapping ids 0..count to representatives, joining blocks' segments."""


def checked_fragments(segmenter: Segmenter, ids: object, affs: np.ndarray) -> np.ndarray:
    """``ids`` if they are what the drivers take: an array of the affinities' spatial shape
    holding non-negative integers; a UserError naming the segmenter otherwise (a float or
    off-shape array would be cast or written as a segmentation of the wrong shape)."""
    want = tuple(affs.shape[1:])
    name = getattr(segmenter.spec, "type", type(segmenter).__name__)
    if not isinstance(ids, np.ndarray):
        raise UserError(f"segmenter {name!r} returned a {type(ids).__name__}, not a numpy "
                        f"array of integer ids of shape {want}")
    if ids.shape != want or ids.dtype.kind not in "ui":
        raise UserError(f"segmenter {name!r} returned fragments of {ids.shape} {ids.dtype} "
                        f"for affinities of {want}: they must be integer ids of shape {want}")
    if ids.dtype.kind == "i" and ids.size and int(ids.min()) < 0:
        raise UserError(f"segmenter {name!r} returned negative fragment ids "
                        f"({int(ids.min())}): ids are 0 (unassigned) or positive")
    return ids


def _checked(fragments: Any) -> Any:
    @functools.wraps(fragments)
    def wrapper(self: Segmenter, affs: np.ndarray, *args: Any, **kwargs: Any) -> np.ndarray:
        return checked_fragments(self, fragments(self, affs, *args, **kwargs), affs)

    return wrapper


def _checked_each(fragments_for: Any) -> Any:
    @functools.wraps(fragments_for)
    def wrapper(self: Segmenter, values: Sequence[float], affs: np.ndarray, *args: Any,
                **kwargs: Any) -> Iterator[np.ndarray]:
        for ids in fragments_for(self, values, affs, *args, **kwargs):
            yield checked_fragments(self, ids, affs)

    return wrapper
