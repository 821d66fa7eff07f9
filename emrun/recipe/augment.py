"""The `augment` section: an ordered list of augmentation specs, or the name of a preset.

Only the parameters live here; the implementations register themselves with
``emrun.registry.augmentations`` in the data layer. Every spec has a probability ``p`` and can
say which patch sizes it cannot work on (``patch_problems``), so a recipe whose patch is too
small for its augmentations fails at validation time rather than inside a loader worker.

A step does not always work on ``train.patch``: the steps after it may read a different shape
(a transpose permutes it, a misalignment or warp changes y and x, a lost section adds
sections), and that is what the step must produce. ``augment_problems`` therefore runs the list
backwards from the patch, as the pipeline plans a sample, and checks every step against each
smallest shape it may have to produce (``input_shapes`` gives a step's smallest inputs; the
checks refuse shapes that are too small, so the smallest ones decide, except the box count,
which the patch itself decides where a box is last, as usual). A step with ``p: 0`` (or an
alternative of ``one_of`` with chance 0) never runs and is not judged.

A shape large enough for every check still to come, and whose reads are too (`Need`), is
dropped on the way: it changes no verdict, and long chains of warps and isotropic flips
would otherwise carry a set of shapes that grows with every step.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
from pydantic import Field, model_validator

from ..geometry import Zyx
from ..registry import Spec, augmentations
from . import shape_sets
from .errors import KeyedValueError
from .types import Flag, NonNegative, Positive, Probability, Size, items_schema

VoxelSize = tuple[float, float, float]
KeyPath = tuple[str | int, ...]
Shapes = list[Zyx] | np.ndarray
"""Shapes a step may have to produce: a list, or an (n, 3) array where there are many."""
Need = tuple[int, int] | None
"""(z, side): a shape of at least z sections and at least ``side`` in y and in x passes
every check of the steps still to judge, and so does every shape they read from it; None
where no such bound is known (a box, whose check refuses large shapes, or a plugin's step)."""

WARP_MARGIN = 1
"""Source pixels a warp reads around the inverse-mapped patch (interpolation, rounding)."""

UNSTATED: VoxelSize = (0.0, 0.0, 0.0)
"""The voxel size of a volume source whose recipe states none: its metadata may give one,
which training scales `voxel_reference` pixels to and only the data checks read. A
displacement in such pixels is not judged against the patch without it (no real voxel
size is 0)."""

BOX_MAX_DENSITY = 0.99
"""Box densities above are taken as this one (density 1 would need boxes without end)."""

BOX_MAX_COUNT = 2_000_000
"""Most boxes one sample may get: a density that needs more (boxes of a few voxels on a
large patch) is refused."""

PxRange = tuple[Annotated[int, Field(ge=0, le=10_000)], Annotated[int, Field(ge=0, le=10_000)]]


def _ordered(pair: tuple[float, float], what: str) -> None:
    if pair[0] > pair[1]:
        raise KeyedValueError(what, f"{what}: the first value must not exceed the second (got "
                                     f"{list(pair)})")


@dataclass
class _Check:
    """One run of ``augment_problems``: what it reports against and what it found."""

    patch: Zyx
    voxel_size: VoxelSize | None
    problems: list[tuple[KeyPath, str]] = field(default_factory=list)
    before: Need = (0, 0)  # what the steps before the chain walked now still need (`Need`)


class AugmentBase(Spec):
    """Fields every augmentation has."""

    p: Probability = Field(1.0, description="Probability of applying it to a sample.")

    def patch_problems(self, patch: tuple[int, int, int]) -> list[str]:
        """Reasons this augmentation cannot produce ``patch`` (z, y, x); empty when it can."""
        return []

    def shape_problems(self, shape: Zyx, voxel_size: VoxelSize | None) -> list[str]:
        """``patch_problems`` for a source of ``voxel_size`` (nm; None: none known, pixels
        are taken as given): only a misalignment's displacement depends on it."""
        return self.patch_problems(shape)

    def input_shapes(self, out_shape: Zyx, voxel_size: VoxelSize | None) -> list[Zyx]:
        """The smallest shapes it may read to produce ``out_shape`` when it applies (the
        steps before it must produce them). Default: ``out_shape`` (photometric)."""
        return [out_shape]

    def checked_inputs(self, outs: list[Zyx], check: _Check, path: KeyPath) -> list[Zyx]:
        """Check it against every shape in ``outs`` it may have to produce, then give the
        smallest shapes it may read. A step with ``p: 0`` never runs, so nothing is asked."""
        if self.p == 0:
            return outs
        voxel = self.judged_at(check.voxel_size)
        for shape in outs:
            found = self.shape_problems(shape, voxel)
            if found:
                check.problems += [(path, _where(msg, shape, check.patch)) for msg in found]
                break
        inputs = [s for out in outs for s in self.input_shapes(out, voxel)]
        return smallest_shapes((outs if self.p < 1 else []) + inputs)

    def judged_at(self, voxel_size: VoxelSize | None) -> VoxelSize | None:
        """The voxel size its checks see: `UNSTATED` only where a step tells it apart
        (a misalignment); None (pixels as given) for any other, a plugin's too."""
        return None if voxel_size == UNSTATED else voxel_size

    def array_inputs(self, outs: np.ndarray) -> np.ndarray | None:
        """`input_shapes` of every row of ``outs``, in the same order, for the steps that
        walk arrays (`_walks_arrays`); None where it cannot (the tuple walk is taken)."""
        return outs

    def array_refused(self, outs: np.ndarray) -> int | None:
        """The first row of ``outs`` that `shape_problems` refuses, for the steps that
        walk arrays; None where none is."""
        return None

    def need_for(self, need: tuple[int, int], voxel_size: VoxelSize | None) -> Need:
        """`need_through` when it applies: ``need`` for a step that checks nothing and
        reads what it produces; None (not known) for any other, unless it says."""
        if all(getattr(type(self), name) is getattr(AugmentBase, name) for name in _DEFAULTS):
            return need
        return None


_DEFAULTS = ("patch_problems", "shape_problems", "input_shapes", "checked_inputs",
             "judged_at", "need_for")


augmentations.require(AugmentBase)


def _where(msg: str, shape: Zyx, patch: Zyx) -> str:
    if tuple(shape) == tuple(patch):
        return msg
    return (f"{msg}; the steps after it make it produce {list(shape)} (z, y, x) for "
            f"train.patch {list(patch)}")


def smallest_shapes(shapes: Sequence[Zyx]) -> list[Zyx]:
    """The shapes no other one is smaller than or equal to on every axis, first seen first
    (every check is passed by a shape if by a smaller one, so these decide).

    One sweep in (z, y, x) order over a staircase of the (y, x) kept so far, not every
    pair: a long chain of warps and isotropic flips carries thousands of shapes (and from
    `ARRAY_FROM` shapes on, the same sweep's result comes from `shape_sets`)."""
    if len(shapes) >= ARRAY_FROM and shape_sets.fits(shapes):
        return shape_sets.as_list(shape_sets.smallest_array(shape_sets.as_array(shapes)))
    distinct = list(dict.fromkeys(tuple(s) for s in shapes))
    kept: set[tuple[int, ...]] = set()
    ys: list[int] = []  # the staircase: y ascending, x descending
    xs: list[int] = []
    for shape in sorted(distinct):
        _, y, x = shape
        i = bisect.bisect_right(ys, y)
        if i and xs[i - 1] <= x:  # an earlier shape (z no larger) is no larger in y and x
            continue
        kept.add(shape)
        j = i
        while j < len(ys) and xs[j] >= x:
            j += 1
        ys[i:j], xs[i:j] = [y], [x]
    return [s for s in distinct if s in kept]  # type: ignore[misc]


def augment_problems(augment: Sequence[AugmentBase], patch: Zyx,
                     voxel_size: VoxelSize | None = None) -> list[tuple[KeyPath, str]]:
    """(key path inside ``augment``, reason) for every step that cannot produce what the
    steps after it read, for ``patch`` (z, y, x) and a source of ``voxel_size``.

    A key path is ``(i,)`` or, inside ``one_of``/``compose``, ``(i, "of", j, ...)``."""
    check = _Check(tuple(patch), voxel_size)  # type: ignore[arg-type]
    chain_inputs(augment, [check.patch], check, ())
    return check.problems


def chain_inputs(specs: Sequence[AugmentBase], outs: list[Zyx], check: _Check,
                 path: KeyPath) -> list[Zyx]:
    """Check ``specs`` backwards from ``outs``; the smallest shapes the first one reads.

    Shapes that pass every check still to come, and whose reads do too (`Need`), are
    dropped on the way: they cannot change a verdict, and without that a long chain of
    warps and isotropic flips carried a set of shapes growing with every step. Where that
    bound is not known (a box or a plugin's step comes first), the set still grows: the
    steps that check nothing then walk it as an array (`_walk`)."""
    before = check.before
    needs = [before]
    for spec in specs:
        needs.append(need_through(spec, needs[-1], check.voxel_size))
    shapes: Shapes = outs
    for i in reversed(range(len(specs))):
        check.before = needs[i]
        shapes = _walk(specs[i], shapes, needs[i + 1], check, (*path, i))
    check.before = before
    return shape_sets.as_list(_unsafe(shapes, before))


ARRAY_FROM = 128
"""Sets of this many shapes or more are walked as arrays by the steps that can."""


def _walk(spec: AugmentBase, shapes: Shapes, need: Need, check: _Check,
          path: KeyPath) -> Shapes:
    """``spec.checked_inputs`` of the shapes not meeting ``need``; for a built-in step that
    checks nothing, on many shapes, the same shapes computed as an array."""
    if len(shapes) >= ARRAY_FROM and _walks_arrays(spec) and shape_sets.fits(shapes):
        array = _unsafe(shape_sets.as_array(shapes), need)
        if spec.p == 0:
            return array
        refused = spec.array_refused(array)
        if refused is not None:  # the same message checked_inputs gives
            shape: Zyx = tuple(array[refused].tolist())  # type: ignore[assignment]
            found = spec.shape_problems(shape, spec.judged_at(check.voxel_size))
            check.problems += [(path, _where(msg, shape, check.patch)) for msg in found]
        reads = spec.array_inputs(array)
        if reads is not None:
            both = np.concatenate([array, reads]) if spec.p < 1 else reads
            return shape_sets.smallest_array(both)
    return spec.checked_inputs(shape_sets.as_list(_unsafe(shapes, need)), check, path)


def _walks_arrays(spec: AugmentBase) -> bool:
    """Whether ``spec``'s `array_inputs` and `array_refused` give what its `input_shapes`
    and `shape_problems` give: a step with the defaults (photometric), or a built-in one
    whose methods are its own (not a plugin's subclass, nor patched)."""
    kind = type(spec)
    own = _ARRAY_WALKS.get(kind)
    if own is not None:
        return all(getattr(kind, name) is method for name, method in own.items())
    return all(getattr(kind, name) is getattr(AugmentBase, name)
               for name in (*_DEFAULTS, *_ARRAY_METHODS))


_ARRAY_METHODS = ("array_inputs", "array_refused", "patch_problems", "input_shapes")
"""With `_DEFAULTS`: the methods whose array and tuple versions must agree."""


def _unsafe(shapes: Shapes, need: Need) -> Shapes:
    """The shapes that do not meet ``need``: only they may fail a check to come."""
    if need is None:
        return shapes
    z, side = need
    if isinstance(shapes, np.ndarray):
        return shapes[(shapes[:, 0] < z) | (shapes[:, 1] < side) | (shapes[:, 2] < side)]
    return [s for s in shapes if s[0] < z or s[1] < side or s[2] < side]


def need_through(spec: AugmentBase, need: Need, voxel_size: VoxelSize | None) -> Need:
    """What a shape ``spec`` produces must meet so that it passes ``spec``'s check and what
    ``spec`` reads from it meets ``need`` (what the steps before it need)."""
    if need is None or spec.p == 0:
        return need
    found = spec.need_for(need, voxel_size)
    if found is None or spec.p == 1:
        return found
    return (max(found[0], need[0]), max(found[1], need[1]))  # or it is skipped


def _greatest(*needs: Need) -> Need:
    if any(n is None for n in needs):
        return None
    return (max(n[0] for n in needs), max(n[1] for n in needs))  # type: ignore[index]


if TYPE_CHECKING:
    AugmentSpec = AugmentBase  # at run time: the union of every registered spec (recipe.py)


@augmentations.register("flip_rotate")
class FlipRotate(AugmentBase):
    """Random flips of z, y, x and the y/x transpose (16 variants); a source whose y and x
    voxel sizes differ is not transposed (its patches would have another resolution)."""

    type: Literal["flip_rotate"] = "flip_rotate"
    isotropic: Flag = Field(
        False, description="Also transpose z with y and x (for isotropic data only: axes of "
        "different voxel sizes are never swapped)."
    )

    def input_shapes(self, out_shape: Zyx, voxel_size: VoxelSize | None) -> list[Zyx]:
        """The output permuted back: y and x swapped, or any order with ``isotropic``."""
        z, y, x = out_shape
        if not self.isotropic:
            return [(z, y, x), (z, x, y)]
        return [(out_shape[a], out_shape[b], out_shape[c])
                for a, b, c in itertools.permutations(range(3))]

    def array_inputs(self, outs: np.ndarray) -> np.ndarray:
        """`input_shapes` of every row, in the same order."""
        orders = itertools.permutations(range(3)) if self.isotropic else [(0, 1, 2), (0, 2, 1)]
        return np.stack([outs[:, list(order)] for order in orders], axis=1).reshape(-1, 3)

    def need_for(self, need: tuple[int, int], voxel_size: VoxelSize | None) -> Need:
        """y and x swapped need the same; any axis may become z with ``isotropic``."""
        if type(self) is not FlipRotate:
            return None
        return (max(need),) * 2 if self.isotropic else need  # type: ignore[return-value]


@augmentations.register("warp")
class Warp(AugmentBase):
    """In-plane elastic/affine deformation: rotation, shear, scale, perspective, twist."""

    type: Literal["warp"] = "warp"
    rot_max: float = Field(45.0, ge=0, le=180, description="Largest rotation, degrees.")
    shear_max: float = Field(0.1, ge=0, le=1, description="Largest shear factor.")
    scale: tuple[Positive, Positive] = Field(
        (0.9, 1.1), description="Range of the scale factor drawn per sample."
    )
    stretch_max: float = Field(
        0.1, ge=0, le=0.5, description="Largest perspective stretch (fraction of the size)."
    )
    twist_max: float = Field(
        0.0, ge=0, le=180, description="Largest rotation change from top to bottom section, deg."
    )

    @model_validator(mode="after")
    def _check(self) -> Warp:
        _ordered(self.scale, "scale")
        return self

    def input_shapes(self, out_shape: Zyx, voxel_size: VoxelSize | None) -> list[Zyx]:
        """The smallest in y and the smallest in x over draws at the largest scale, without
        stretch (a perspective stretch never makes the read smaller: of two opposite corners
        one is magnified), over every rotation and shear a section may get.

        A twist rotates section z by ``angle + twist * (z / (Z - 1) - 1/2)``: the first and
        last sections by ``angle -+ twist / 2``, each up to ``rot_max + twist_max / 2``. The
        read holds every section's mapped corners, so it is at least one end section's read
        at such an angle: the rotations are taken up to there (a patch rotated by 90 degrees
        at both ends reads its sides swapped, smaller in x than any untwisted draw)."""
        nz, h, w = out_shape
        return [(nz, *yx) for yx in _warp_smallest(h, w, self.largest_rotation(nz),
                                                   self.shear_max, self.scale[1])]

    def array_inputs(self, outs: np.ndarray) -> np.ndarray | None:
        """`input_shapes` of every row, in the same order (None: too large for arrays)."""
        zs, where = np.unique(outs[:, 0], return_inverse=True)
        rotations = np.array([self.largest_rotation(int(z)) for z in zs])[where]
        draws = {float(r): _warp_coefficients(float(r), self.shear_max)
                 for r in np.unique(rotations)}
        return shape_sets.warp_reads(outs, rotations, draws, self.scale[1], WARP_MARGIN)

    def largest_rotation(self, sections: int) -> float:
        """The largest rotation (degrees) of the section nearest the middle of a
        ``sections``-section patch: the read holds every section, so it is at least that
        section's read. The twist turns sections in proportion to their distance from the
        middle: an odd count's middle section keeps the drawn angle, an even count's two
        middle ones are turned by a (sections - 1)th of half the twist either way (the end
        sections' half twist made a valid recipe look too small to read)."""
        if sections < 2 or sections % 2:
            return self.rot_max
        return min(180.0, self.rot_max + self.twist_max / (2 * (sections - 1)))

    def need_for(self, need: tuple[int, int], voxel_size: VoxelSize | None) -> Need:
        """The least side whose reads, of one section or more, are ``need``'s side in y
        and x; z is unchanged."""
        if type(self) is not Warp:
            return None
        side = _least_side(self._least_read, need[1])
        return None if side is None else (need[0], side)

    def _least_read(self, side: int) -> int:
        """The least y or x it may read for a square output of ``side``."""
        return min(min(s[1:]) for z in (1, 2) for s in self.input_shapes((z, side, side), None))


def _least_side(read: Callable[[int], int], need: int) -> int | None:
    """The least n >= 1 with ``read(n) >= need`` (``read`` grows with n); None past 2^40."""
    if read(1) >= need:
        return 1
    low, high = 1, 2
    while read(high) < need:
        low, high = high, high * 2
        if high > 2 ** 40:
            return None
    while high - low > 1:  # read(low) < need <= read(high)
        middle = (low + high) // 2
        low, high = (middle, high) if read(middle) < need else (low, middle)
    return high


@functools.lru_cache(maxsize=1024)
def _warp_smallest(h: int, w: int, rot_max: float, shear_max: float,
                   scale: float) -> tuple[tuple[int, int], tuple[int, int]]:
    """The reads smallest in y and in x over rotations in [0, ``rot_max``] (the reach is the
    same for the opposite angle and shear) and shears in [-shear_max, shear_max].

    Each reach is ``|sin| a + |sin shear + cos| b`` (y) or ``|cos| a + |cos shear - sin| b``
    (x): convex in the shear, so least at a bound or where the second term is 0; then,
    between the angles where a term changes sign or that best shear changes, a sinusoid
    that is positive, hence concave: least at such an angle or at 0 or ``rot_max``."""
    reads = [warp_input_yx(h, w, angle, shear, scale)
             for angle, shear in _warp_draws(rot_max, shear_max)]
    return min(reads), min(reads, key=lambda r: (r[1], r[0]))


def _warp_draws(rot_max: float, shear_max: float) -> list[tuple[float, float]]:
    """The (angle, shear) pairs `_warp_smallest` tries."""
    top, s = math.radians(rot_max), shear_max
    cot, tan = math.atan2(1, s), math.atan(s)  # arccot(s), arctan(s)
    angles = [a for a in (0, top, math.pi / 2, math.pi, tan, math.pi - tan, cot, math.pi - cot)
              if a <= top]
    draws = []
    for angle in angles:
        sin, cos = math.sin(angle), math.cos(angle)
        zeros = [-cos / sin if sin else math.inf, sin / cos if cos else math.inf]
        draws += [(angle, shear) for shear in [-s, 0.0, s, *(z for z in zeros if abs(z) <= s)]]
    return draws


@functools.lru_cache(maxsize=1024)
def _warp_coefficients(rot_max: float,
                       shear_max: float) -> list[tuple[float, float, float, float]]:
    """For each draw of `_warp_draws`, the weights of the half width and half height in
    `warp_input_yx`'s y reach and x reach, computed as it does."""
    rows = []
    for angle, shear in _warp_draws(rot_max, shear_max):
        cos, sin = math.cos(angle), math.sin(angle)
        rows.append((abs(sin), abs(sin * shear + cos), abs(cos), abs(cos * shear - sin)))
    return rows


def warp_input_yx(h: int, w: int, angle: float, shear: float, scale: float) -> tuple[int, int]:
    """The (y, x) a warp reads for an (h, w) output without stretch or twist: the bounding
    box of the mapped corners plus ``WARP_MARGIN`` each side (as the warp plans it)."""
    half_w, half_h = (w - 1) / 2, (h - 1) / 2
    cos, sin = math.cos(angle), math.sin(angle)
    reach_x = (abs(cos) * half_w + abs(cos * shear - sin) * half_h) / scale
    reach_y = (abs(sin) * half_w + abs(sin * shear + cos) * half_h) / scale
    return warp_read_side(reach_y, h), warp_read_side(reach_x, w)


def warp_read_side(reach: float, out: int) -> int:
    """The side a warp reads along an axis whose mapped corners lie within ``reach`` of the
    centre, for an output ``out`` long: their span plus ``WARP_MARGIN`` each side, and one
    more where that makes the read's length odd against an even output (or even against an
    odd one). Reads and outputs of one parity share a centre on the voxel grid, so a warp
    near the identity maps voxels onto voxels; otherwise every position fell half-way
    between two (the image a 2-voxel average, the labels half a voxel off it with a seam
    where rounding flipped across the patch)."""
    side = math.ceil(2 * reach - 1e-6) + 1 + 2 * WARP_MARGIN
    return side + (side - out) % 2


class MisalignBase(AugmentBase):
    displacement: PxRange = Field(
        (3, 15), description="Range of the in-plane shift in pixels (min, max)."
    )
    voxel_reference: float | None = Field(
        None, gt=0, le=10_000,
        description="In-plane voxel size (nm) the displacement pixels refer to; they are "
        "scaled to each source's voxel size. None: pixels as given.",
    )

    @model_validator(mode="after")
    def _check(self) -> Any:
        _ordered(self.displacement, "displacement")
        return self

    def min_sections(self) -> int:
        return 2

    def pixel_scale(self, voxel_size: VoxelSize | None) -> float:
        """Factor turning the displacement's pixels into pixels of a source of
        ``voxel_size`` (its x size); 1 without a ``voxel_reference`` or a voxel size."""
        if self.voxel_reference is None or voxel_size is None:
            return 1.0
        return self.voxel_reference / voxel_size[2]

    def judged_at(self, voxel_size: VoxelSize | None) -> VoxelSize | None:
        return voxel_size  # UNSTATED included: see known_scale

    def known_scale(self, voxel_size: VoxelSize | None) -> float | None:
        """`pixel_scale`, or None where it depends on a voxel size not known yet
        (`UNSTATED`)."""
        if self.voxel_reference is not None and voxel_size == UNSTATED:
            return None
        return self.pixel_scale(None if voxel_size == UNSTATED else voxel_size)

    def patch_problems(self, patch: tuple[int, int, int]) -> list[str]:
        return self.shape_problems(patch, None)

    def shape_problems(self, shape: Zyx, voxel_size: VoxelSize | None) -> list[str]:
        problems = []
        if shape[0] < self.min_sections():
            problems.append(f"{self.type} needs a patch of at least {self.min_sections()} "
                            f"sections (got {shape[0]})")
        factor = self.known_scale(voxel_size)
        if factor is None:  # judged by the data checks, at the volumes' voxel sizes
            return problems
        reach = self.displacement[1] * factor
        if reach >= min(shape[1], shape[2]):
            scaled = "" if factor == 1 or voxel_size is None else (
                f" ({self.displacement[1]} px of voxel_reference {self.voxel_reference:g} nm "
                f"on a source of {voxel_size[2]:g} nm in x)")
            problems.append(
                f"{self.type}: displacement up to {reach:g} px{scaled} is not smaller than "
                f"the patch ({shape[1]}x{shape[2]} in y, x)"
            )
        return problems

    def need_for(self, need: tuple[int, int], voxel_size: VoxelSize | None) -> Need:
        """Its sections, and a side larger than its largest displacement where that is
        known; it reads more than it produces."""
        if type(self) not in (Misalign, MisalignMissing):
            return None
        factor = self.known_scale(self.judged_at(voxel_size))
        side = 0 if factor is None else math.floor(self.displacement[1] * factor) + 1
        return (max(need[0], self.min_sections()), max(need[1], side))

    def input_shapes(self, out_shape: Zyx, voxel_size: VoxelSize | None) -> list[Zyx]:
        """The output plus the smallest shift, all in y or all in x."""
        z, y, x = out_shape
        factor = self.known_scale(voxel_size)
        least = 0 if factor is None else round(self.displacement[0] * factor)
        return [(z, y + least, x), (z, y, x + least)]


@augmentations.register("misalign")
class Misalign(MisalignBase):
    """Translational misalignment: a step (all sections above shift) or a slip (one shifts)."""

    type: Literal["misalign"] = "misalign"
    mode: Literal["step", "slip", "both"] = Field(
        "both", description="Step, slip, or either with equal chance."
    )
    interp: Flag = Field(
        False, description="Keep labels in place so the network must infer continuity."
    )


@augmentations.register("misalign_missing")
class MisalignMissing(MisalignBase):
    """Misalignment plus one or two missing sections at the interface."""

    type: Literal["misalign_missing"] = "misalign_missing"
    missing_max: Literal[1, 2] = Field(2, description="Most sections missing at the interface.")

    def min_sections(self) -> int:
        """Real sections on both sides of the most missing ones."""
        return self.missing_max + 2


@augmentations.register("lost_section")
class LostSection(AugmentBase):
    """Removes consecutive sections so the content jumps (the patch is read taller)."""

    type: Literal["lost_section"] = "lost_section"
    max_sections: Size = Field(1, le=16, description="Most consecutive sections lost.")

    def input_shapes(self, out_shape: Zyx, voxel_size: VoxelSize | None) -> list[Zyx]:
        """At least one section more."""
        z, y, x = out_shape
        return [(z + 1, y, x)]

    def need_for(self, need: tuple[int, int], voxel_size: VoxelSize | None) -> Need:
        """It reads more than it produces and checks nothing."""
        return need if type(self) is LostSection else None

    def array_inputs(self, outs: np.ndarray) -> np.ndarray:
        """`input_shapes` of every row."""
        return outs + np.array([1, 0, 0], dtype=outs.dtype)


class SectionAugment(AugmentBase):
    max_sections: Size = Field(7, le=1000, description="Most sections affected per sample.")
    partial: Flag = Field(False, description="Sometimes affect only part of a section.")

    def patch_problems(self, patch: tuple[int, int, int]) -> list[str]:
        if self.max_sections > patch[0]:
            return [f"{self.type}: max_sections {self.max_sections} exceeds the patch's "
                    f"{patch[0]} sections"]
        return []

    def need_for(self, need: tuple[int, int], voxel_size: VoxelSize | None) -> Need:
        """At least ``max_sections`` sections; it reads what it produces."""
        if type(self) not in (MissingSection, BlurrySection):
            return None
        return (max(need[0], self.max_sections), need[1])


@augmentations.register("missing_section")
class MissingSection(SectionAugment):
    """Fills whole or partial sections with a constant or random value."""

    type: Literal["missing_section"] = "missing_section"
    consecutive: Flag = Field(False, description="Missing sections come in one run.")
    fill: Literal["constant", "random"] = Field("constant", description="What fills them.")
    value: Probability = Field(0.0, description="The constant fill value (image is in [0, 1]).")


@augmentations.register("blurry_section")
class BlurrySection(SectionAugment):
    """Per-section Gaussian blur."""

    type: Literal["blurry_section"] = "blurry_section"
    sigma_max: float = Field(5.0, gt=0, le=100, description="Largest blur sigma, pixels.")


@augmentations.register("grayscale")
class Grayscale(AugmentBase):
    """Contrast, brightness and gamma, per section (2d), whole patch (3d) or either (mix)."""

    type: Literal["grayscale"] = "grayscale"
    contrast: NonNegative = Field(0.5, le=10, description="Contrast change amplitude.")
    brightness: NonNegative = Field(0.5, le=10, description="Brightness change amplitude.")
    gamma: NonNegative = Field(
        1.0, le=4, description="Largest |log2 gamma|: gamma is drawn from [2^-g, 2^g]."
    )
    mode: Literal["2d", "3d", "mix"] = Field("mix", description="Per section, patch, or either.")
    partial: Flag = Field(False, description="Sometimes apply to a quadrant or a half-plane only.")


@augmentations.register("box")
class Box(AugmentBase):
    """Boxes filled with a value, noise or blur, added until a density is reached."""

    type: Literal["box"] = "box"
    density: Probability = Field(0.3, description="Fraction of the patch volume to cover.")
    size: PxRange = Field((5, 25), description="Range of the box side in pixels (y, x).",
                          json_schema_extra=items_schema(minimum=1))
    z_size: PxRange = Field((1, 5), description="Range of the box depth in sections.",
                            json_schema_extra=items_schema(minimum=1))
    modes: list[Literal["fill", "noise", "blur"]] = Field(
        ["fill", "noise"], min_length=1, description="Kinds of box, chosen at random."
    )

    @model_validator(mode="after")
    def _check(self) -> Box:
        _ordered(self.size, "size")
        _ordered(self.z_size, "z_size")
        if self.size[0] < 1 or self.z_size[0] < 1:
            raise ValueError("box sizes must be at least 1")
        return self

    def patch_problems(self, patch: tuple[int, int, int]) -> list[str]:
        """Boxes larger than the patch are clipped to it, so any size works; but boxes of a
        few voxels on a large patch may need more than ``BOX_MAX_COUNT`` for the density."""
        needed = self.expected_count(patch)
        if needed > BOX_MAX_COUNT:
            return [f"box: density {self.density:g} with boxes of {list(self.z_size)} x "
                    f"{list(self.size)} voxels needs about {needed:,.0f} boxes on a patch of "
                    f"{list(patch)}, more than {BOX_MAX_COUNT:,}; use larger boxes or a lower "
                    "density"]
        return []

    def array_refused(self, outs: np.ndarray) -> int | None:
        """The first row `patch_problems` refuses: `expected_count` of every row, with the
        same float arithmetic."""
        limit = -math.log1p(-min(self.density, BOX_MAX_DENSITY))
        chance = np.ones(len(outs))
        for (low, high), axis in zip((self.z_size, self.size, self.size), range(3), strict=True):
            sides, where = np.unique(outs[:, axis], return_inverse=True)
            chance *= np.array([_box_chance(low, high, int(d)) for d in sides])[where]
        refused = np.flatnonzero(limit / chance > BOX_MAX_COUNT)
        return int(refused[0]) if len(refused) else None

    def expected_count(self, patch: Zyx) -> float:
        """About how many boxes a sample of ``patch`` gets: the density's total cover
        ``-ln(1 - density)`` over a box's mean chance to cover a voxel, ``s / (d + s - 1)``
        per axis for a side s on a patch side d (boxes may stick out)."""
        limit = -math.log1p(-min(self.density, BOX_MAX_DENSITY))
        chance = 1.0
        for (low, high), d in zip((self.z_size, self.size, self.size), patch, strict=True):
            chance *= _box_chance(low, high, d)
        return limit / chance


@functools.lru_cache(maxsize=65536)
def _box_chance(low: int, high: int, d: int) -> float:
    """A box side's mean chance to cover a voxel of a patch side ``d`` (cached: a long
    chain of geometric steps after a box asks for thousands of shapes)."""
    sides = range(low, high + 1)
    return math.fsum(side / (d + side - 1) for side in sides) / len(sides)


@augmentations.register("noise")
class Noise(AugmentBase):
    """Additive Gaussian and Poisson noise."""

    type: Literal["noise"] = "noise"
    sigma_max: float = Field(0.05, ge=0, le=1, description="Largest Gaussian sigma (image units).")
    poisson: Flag = Field(False, description="Also apply Poisson (shot) noise.")


@augmentations.register("contrast_compression")
class ContrastCompression(AugmentBase):
    """Compresses the intensity range towards its mean, as in faint sections."""

    type: Literal["contrast_compression"] = "contrast_compression"
    factor: tuple[Positive, Positive] = Field(
        (0.5, 1.0), description="Range of the compression factor (1 = unchanged)."
    )

    @model_validator(mode="after")
    def _check(self) -> ContrastCompression:
        _ordered(self.factor, "factor")
        return self


@augmentations.register("one_of")
class OneOf(AugmentBase):
    """Exactly one of several augmentations, or none: `probs` need not sum to 1."""

    type: Literal["one_of"] = "one_of"
    of: list[AugmentSpec] = Field(min_length=1, description="The alternatives.")
    probs: list[Probability] | None = Field(
        None, description="Chance of each alternative; the rest is 'nothing'. Default: equal."
    )

    @model_validator(mode="after")
    def _check(self) -> OneOf:
        if self.probs is not None:
            if len(self.probs) != len(self.of):
                raise KeyedValueError(
                    "probs", f"probs has {len(self.probs)} values for {len(self.of)} alternatives"
                )
            if sum(self.probs) > 1 + 1e-9:
                raise KeyedValueError("probs", f"probs sum to {sum(self.probs):g}, more than 1")
        return self

    def patch_problems(self, patch: tuple[int, int, int]) -> list[str]:
        return [p for a in self.of for p in a.patch_problems(patch)]

    def checked_inputs(self, outs: list[Zyx], check: _Check, path: KeyPath) -> list[Zyx]:
        """Each alternative that can be chosen is checked; it reads what any of them reads,
        or the output unchanged where 'nothing' can be chosen too."""
        if self.p == 0:
            return outs
        probs = self.probs if self.probs is not None else [1.0] * len(self.of)
        nothing = self.p < 1 or (self.probs is not None and sum(self.probs) < 1 - 1e-9)
        inputs = list(outs) if nothing else []
        for j, (alternative, prob) in enumerate(zip(self.of, probs, strict=True)):
            if prob > 0:
                inputs += alternative.checked_inputs(outs, check, (*path, "of", j))
        return smallest_shapes(inputs)

    def need_for(self, need: tuple[int, int], voxel_size: VoxelSize | None) -> Need:
        """What every alternative that can be chosen needs, and ``need`` where 'nothing'
        can be chosen."""
        if type(self) is not OneOf:
            return None
        probs = self.probs if self.probs is not None else [1.0] * len(self.of)
        found = [need_through(a, need, voxel_size)
                 for a, prob in zip(self.of, probs, strict=True) if prob > 0]
        if not found or (self.probs is not None and sum(self.probs) < 1 - 1e-9):
            found.append(need)
        return _greatest(*found)


@augmentations.register("compose")
class Compose(AugmentBase):
    """Several augmentations in order, applied together with probability `p`."""

    type: Literal["compose"] = "compose"
    of: list[AugmentSpec] = Field(min_length=1, description="The augmentations, in order.")

    def patch_problems(self, patch: tuple[int, int, int]) -> list[str]:
        return [msg for _, msg in augment_problems(self.of, patch)]

    def checked_inputs(self, outs: list[Zyx], check: _Check, path: KeyPath) -> list[Zyx]:
        if self.p == 0:
            return outs
        inputs = chain_inputs(self.of, outs, check, (*path, "of"))
        return smallest_shapes((outs if self.p < 1 else []) + inputs)

    def need_for(self, need: tuple[int, int], voxel_size: VoxelSize | None) -> Need:
        """Its steps in order, each needing what the next must produce."""
        if type(self) is not Compose:
            return None
        found: Need = need
        for spec in self.of:
            found = need_through(spec, found, voxel_size)
        return found


_ARRAY_WALKS: dict[type, dict[str, Callable[..., Any]]] = {
    kind: {name: getattr(kind, name) for name in (*_DEFAULTS, *_ARRAY_METHODS)}
    for kind in (FlipRotate, Warp, LostSection, Box)
}
"""The built-in steps whose array methods are checked against their tuple ones: the methods
each must still have for `_walks_arrays`."""


PRESETS: dict[str, list[dict[str, Any]]] = {
    # DeepEM's modern stack (flyem/pinky mip1 defaults); displacements are mip1 (8 nm) pixels.
    "deepem": [
        {
            "type": "one_of",
            "of": [
                {"type": "misalign", "mode": "both", "displacement": [5, 25],
                 "voxel_reference": 8.0},
                {"type": "misalign_missing", "displacement": [3, 15], "voxel_reference": 8.0},
                {"type": "missing_section", "max_sections": 7, "partial": True},
                {"type": "lost_section", "max_sections": 1},
            ],
        },
        {"type": "warp", "p": 0.7, "rot_max": 45.0},
        # photometric after the warp: they then work on the output size, not the larger input
        {"type": "grayscale", "p": 0.7, "contrast": 0.5, "brightness": 0.5, "mode": "mix"},
        {"type": "blurry_section", "max_sections": 7, "sigma_max": 5.0, "partial": True},
        {"type": "box", "p": 0.9, "density": 0.3, "size": [5, 25], "modes": ["fill", "noise"]},
        {"type": "flip_rotate", "p": 1.0},
    ],
    "none": [],
}
"""Named augmentation stacks; a recipe may write `augment: deepem` instead of a list."""
