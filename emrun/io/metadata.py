"""Voxel size and offset from the metadata conventions EM data uses.

Two conventions are read: OME-Zarr `multiscales` on the parent group (0.4 at the top of
the attributes, 0.5 under "ome") and funlib/gunpowder array attributes (`voxel_size` or
`resolution`, `offset` in nm). Results are zyx: voxel size in nm, offset in voxels.
Absent metadata gives None; present but inconsistent metadata is a `VolumeError`, since
a silently wrong voxel size would corrupt everything downstream. OME axes of type space
that declare no unit at all, or multiscales that give no scale, say "size unknown": the
voxel size is None (the offset in voxels, translation / scale, needs no unit and is still
read). An offset must be a whole number of voxels (a coarser OME level's, which carries the
half-voxel shift of downsampling, is taken to the nearest); OME axes must be one per
dimension of the array and come in the order (t,) (c,) z, y, x (channels only with three
spatial axes), and a time axis of one point is dropped (`time_axis`). Spatial axes give a
unit all or none: with some but not all, the others' size is unknown and is refused.

A format's own voxel-size metadata that cannot be read at all (Fiji's `element_size_um` as a
string, a funlib `voxel_size` that is no list of positive sizes, an OME scale of the wrong
length or with a NaN, a unit emrun does not know) gives way to a size the user states
(`stated_voxel_size`, with a `MetadataIgnored` warning) and is otherwise refused, saying
that one would override it (`unusable_voxel_size`). A stated size is the finest level's:
a coarser level's is it times the level's factor (from the shapes where the metadata gives
none). An offset in nm (funlib's) is placed with it; one in the unreadable scale's or
unit's terms (an OME translation, an N5 offset in an unknown unit) is left unread.

One convention is written: `ome_image_attrs` builds the OME-Zarr 0.5 attributes of the
image group emrun writes for every volume (see `emrun.io.write`).
"""

from __future__ import annotations

import functools
import math
import re
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from emrun.errors import UserWarned
from emrun.io.volume import VolumeError

Spatial = tuple[tuple[float, ...] | None, tuple[int, ...] | None]

# Factors to nanometres for the length units OME-NGFF allows (UDUNITS-2 names) and the
# abbreviations ImageJ writes.
UNIT_TO_NM = {
    "": 1.0,
    "nanometer": 1.0,
    "nm": 1.0,
    "angstrom": 0.1,
    "micrometer": 1e3,
    "micron": 1e3,
    "um": 1e3,
    "µm": 1e3,
    "\u03bcm": 1e3,  # Greek mu, which some writers put for the micro sign
    "\\u00b5m": 1e3,
    "millimeter": 1e6,
    "mm": 1e6,
    "yoctometer": 1e-15,
    "zeptometer": 1e-12,
    "attometer": 1e-9,
    "femtometer": 1e-6,
    "picometer": 1e-3,
    "centimeter": 1e7,
    "cm": 1e7,
    "decimeter": 1e8,
    "meter": 1e9,
    "m": 1e9,
    "dekameter": 1e10,
    "hectometer": 1e11,
    "kilometer": 1e12,
    "megameter": 1e15,
    "gigameter": 1e18,
    "terameter": 1e21,
    "petameter": 1e24,
    "exameter": 1e27,
    "zettameter": 1e30,
    "yottameter": 1e33,
    "inch": 2.54e7,
    "foot": 3.048e8,
    "yard": 9.144e8,
    "mile": 1.609344e12,
    "parsec": 3.0856775814913673e25,
}


def spatial_metadata(
    name: str,
    ndim: int,
    array_attrs: Mapping[str, Any],
    group_attrs: Mapping[str, Any] | None = None,
    array_name: str | None = None,
    level_factor: LevelFactor | None = None,
) -> Spatial:
    """OME-Zarr metadata on the parent group wins; else the array's own attributes.
    `level_factor`: a level's downsampling factor from the finest, which scales a stated
    voxel size (the finest level's) that replaces an unreadable OME scale."""
    if group_attrs is not None and array_name is not None:
        found = from_ome(name, ndim, group_attrs, array_name, level_factor)
        if found is not None:
            return found
    return from_attrs(name, ndim, array_attrs)


LevelFactor = Callable[[str], Sequence[float] | None]
"""A multiscale level's (z, y, x) factor from the finest level, by its path (None: unknown)."""


def shape_factor(finest: Sequence[int], level: Sequence[int]) -> tuple[float, ...] | None:
    """A pyramid level's (z, y, x) downsampling factor from the finest level's shape and its
    own (9 sections to 5 is 2: a level's shape is rounded up); None where either has fewer
    than three axes or an empty one."""
    pairs = list(zip(finest[-3:], level[-3:], strict=False))
    if len(pairs) != 3 or min(finest[-3:]) < 1 or min(level[-3:]) < 1:
        return None
    return tuple(float(max(1, round(a / b))) for a, b in pairs)


def from_ome(name: str, ndim: int, attrs: Mapping[str, Any], array_name: str,
             level_factor: LevelFactor | None = None) -> Spatial | None:
    """Read scale/translation of `array_name` from OME-Zarr 0.4 or 0.5 multiscales."""
    found = _ome_entry(attrs, array_name)
    if found is None:
        return None
    ms, ds, first = found
    factor = None if first or level_factor is None else functools.partial(level_factor,
                                                                            array_name)
    return _ome_dataset(name, ndim, ms, ds, first, factor)


def _ome_entry(
    attrs: Mapping[str, Any], array_name: str
) -> tuple[Mapping[str, Any], Mapping[str, Any], bool] | None:
    """The multiscale and dataset entries listing `array_name`, and whether it is the
    multiscale's first (finest) level; None when no multiscale lists it."""
    for ms in _multiscales(attrs) or ():
        if not isinstance(ms, Mapping):
            continue
        for i, ds in enumerate(finest_first(ms)):
            if str(ds.get("path", "")).strip("/") == array_name:
                return ms, ds, i == 0
    return None


def finest_first(ms: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """A multiscale's datasets, finest first. OME-NGFF lists them so, but some writers list
    them coarsest first, whose coarsest level was then opened as the full resolution (and
    whole-voxel checks held to it): they are ordered by the voxel volume their scales give,
    keeping each level's path; equal sizes, or any level without one plain scale, keep the
    listed order."""
    datasets = [ds for ds in ms.get("datasets") or () if isinstance(ds, Mapping)]
    sizes = [size for ds in datasets if (size := _voxel_volume(ms, ds)) is not None]
    if len(sizes) != len(datasets):
        return datasets
    return [datasets[i] for i in sorted(range(len(datasets)), key=sizes.__getitem__)]


def _voxel_volume(ms: Mapping[str, Any], ds: Mapping[str, Any]) -> float | None:
    """The product of a dataset's spatial scale values (the levels share their axes and
    units, so this orders them); None without exactly one scale of positive numbers."""
    scales = [t.get("scale") for t in ds.get("coordinateTransformations") or ()
              if isinstance(t, Mapping) and t.get("type") == "scale"]
    values = scales[0] if len(scales) == 1 else None
    if not isinstance(values, Sequence) or isinstance(values, str) or not values:
        return None
    try:
        numbers = [float(v) for v in values]
    except (TypeError, ValueError):
        return None
    if not all(math.isfinite(v) and v > 0 for v in numbers):
        return None
    return math.prod(numbers[i] for i in _spatial_axes(ms.get("axes"), len(numbers)))


class MetadataIgnored(UserWarned):
    """Metadata a reader passed over (a voxel size given in its place, a registration it
    cannot represent): the volume opened, and the warning names what was left unread."""


_STATED_VOXEL_SIZE: ContextVar[tuple[float, ...] | None] = ContextVar(
    "emrun_stated_voxel_size", default=None)


STATE_WITH_OPTION = "--voxel-size Z Y X (nm)"
"""How `data convert` states a voxel size (its option)."""
STATE_BY_CONVERTING = "emrun data convert IN OUT.zarr --voxel-size Z Y X (nm)"
"""What the refusal of unreadable metadata advises where no place said otherwise
(`stated_voxel_size`'s ``how``): infer, segment, evaluate and view have no --voxel-size, but a
converted copy carries the size."""
_HOW_STATED: ContextVar[str] = ContextVar("emrun_how_stated", default=STATE_BY_CONVERTING)


@contextmanager
def stated_voxel_size(voxel_size: Sequence[float] | None,
                      how: str | None = None) -> Iterator[None]:
    """Within it, volume metadata whose voxel size cannot be read (Fiji's `element_size_um`
    as a string, a BigDataViewer unit emrun does not know) gives way to ``voxel_size`` (nm,
    z, y, x; what the user stated, e.g. `--voxel-size`) with a warning, instead of making
    the volume unopenable. None: no size stated, such metadata is refused, advising ``how``
    the user states one at this place (e.g. "voxel_size: [z, y, x] (nm) in the recipe's
    source"; None: as the place around it says, by default `STATE_BY_CONVERTING`): a recipe
    user was told to give --voxel-size, which no recipe command has."""
    stated = tuple(float(v) for v in voxel_size) if voxel_size is not None else None
    token = _STATED_VOXEL_SIZE.set(stated)
    said = _SAID.set(set())
    advice = _HOW_STATED.set(how) if how is not None else None
    try:
        yield
    finally:
        if advice is not None:
            _HOW_STATED.reset(advice)
        _SAID.reset(said)
        _STATED_VOXEL_SIZE.reset(token)


_SAID: ContextVar[set[str] | None] = ContextVar("emrun_stated_said", default=None)
"""What `unusable_voxel_size` has said within the `stated_voxel_size` around it: a volume's
metadata is read again for its level list (each level by its own name) and its placement,
and the user hears each problem once."""


def unusable_voxel_size(name: str, what: str, problem: str) -> tuple[float, ...]:
    """The stated voxel size (`stated_voxel_size`) in place of metadata `what` that cannot
    be read for `problem`, with a warning naming it; where none was stated, a one-line
    VolumeError saying what is wrong and that a stated size overrides it."""
    described = f"{what} {problem}"
    stated = _STATED_VOXEL_SIZE.get()
    if stated is None:
        raise VolumeError(f"{name}: {described}; give the voxel size yourself with "
                          f"{_HOW_STATED.get()}, which overrides it, or correct the "
                          "metadata")
    text = f"{described}: ignored, the stated voxel size {_listed(stated)} nm is used"
    said = _SAID.get()
    if said is None or text not in said:  # a volume's levels say it again: said once
        ignored(name, text)
    if said is not None:
        said.add(text)
    return stated


def ignored(name: str, text: str) -> None:
    """Warn that a reader passed over metadata of the volume `name` (`text` says which and
    why): the volume opens, and the user hears what was left unread."""
    warnings.warn(f"{name}: {text}", MetadataIgnored, stacklevel=3)


_FIRST_TIME_POINT: ContextVar[bool] = ContextVar("emrun_first_time_point", default=False)


@contextmanager
def first_time_point() -> Iterator[None]:
    """Within it, a time series (an OME t axis longer than 1) opens as its first time point
    instead of being refused: for `emrun view`, which serves the whole series (neuroglancer
    shows its t axis) and reads only the geometry of one point."""
    token = _FIRST_TIME_POINT.set(True)
    try:
        yield
    finally:
        _FIRST_TIME_POINT.reset(token)


def time_axis(
    name: str,
    shape: Sequence[int],
    group_attrs: Mapping[str, Any] | None,
    array_name: str | None,
) -> bool:
    """Whether the array's first axis is an OME-Zarr time axis of one time point, which the
    reader drops (bioformats2raw and OMERO write t, c, z, y, x even for one 3-d stack).

    The axes are checked first: emrun indexes arrays as (t,) (c,) z, y, x, so axes in any
    other order (x, y, z; z, z, x; channels last) would be read as the wrong ones and are
    refused, as is a time series, of which emrun reads no single point on its own (but
    within `first_time_point`, which opens its first).
    """
    found = _ome_entry(group_attrs or {}, array_name) if array_name is not None else None
    axes = found[0].get("axes") if found is not None else None
    if not isinstance(axes, Sequence) or isinstance(axes, str) or len(axes) != len(shape):
        return False  # no axes to go by (or not one per dimension): read as emrun's
    names = [_axis_name(axis) for axis in axes]
    kinds = "".join(_axis_kind(axis) for axis in axes)
    shown = ", ".join(n or "?" for n in names)
    listed = [n for n in names if n]
    spatial = [n for n, kind in zip(names, kinds, strict=True) if kind == "s"]
    in_order = re.fullmatch(r"t?c?s{2,3}", kinds) is not None and (
        not set(spatial) <= set("zyx") or spatial == list("zyx"[-len(spatial):]))
    if len(set(listed)) < len(listed) or not in_order:
        raise VolumeError(
            f"{name}: its OME-Zarr axes are {shown}; emrun reads the axes (t,) (c,) z, y, x "
            "in that order, as OME-Zarr prescribes, and would read these as the wrong ones: "
            "write the array with its axes in that order (and its metadata to match)")
    if "c" in kinds and kinds.count("s") == 2:
        raise VolumeError(
            f"{name}: its OME-Zarr axes are {shown}, a 2-d image with channels; emrun reads "
            "3-d volumes, z, y, x or c, z, y, x, and would read the channels as z: give it "
            "a z axis of one section (c, 1, y, x) or save each channel as a volume of its own")
    if not kinds.startswith("t"):
        return False
    if shape[0] != 1 and not _FIRST_TIME_POINT.get():
        raise VolumeError(
            f"{name}: holds {shape[0]} time points (OME-Zarr axes {shown}); emrun reads one "
            "3-d volume, not a time series: save the time point you want as a volume of its "
            "own (e.g. the array's [t] in Python) and give that")
    return True


def check_dimension_names(
    name: str,
    dimension_names: Sequence[Any] | None,
    group_attrs: Mapping[str, Any] | None,
    array_name: str | None,
) -> None:
    """Refuse a zarr v3 array whose own `dimension_names` disagree with its OME-Zarr axes
    (x, y, z under axes z, y, x): one of the two is wrong, and reading by the OME axes, as
    was done unchecked, read x as z if it was the OME metadata. Unnamed dimensions (null)
    and arrays without names or OME axes are not checked."""
    found = _ome_entry(group_attrs or {}, array_name) if array_name is not None else None
    axes = found[0].get("axes") if found is not None else None
    if not dimension_names or not isinstance(axes, Sequence) or isinstance(axes, str) or \
            len(axes) != len(dimension_names):
        return  # nothing to compare (a count unlike the array's is _check_axis_count's)
    ome = [_axis_name(axis) for axis in axes]
    own = [str(d).strip().lower() if d is not None else "" for d in dimension_names]
    if all(not a or not b or a == b for a, b in zip(own, ome, strict=True)):
        return
    raise VolumeError(
        f"{name}: its zarr dimension_names ({', '.join(n or 'null' for n in own)}) disagree "
        f"with its OME-Zarr axes ({', '.join(n or '?' for n in ome)}), so which axis is z, y "
        "or x is unclear: write both in the same order (emrun reads (t,) (c,) z, y, x)")


def ome_time_step(attrs: Mapping[str, Any]) -> tuple[str, float, str] | None:
    """The time axis of an OME-Zarr image's first multiscale: its name, the step between
    time points (its finest level's scale on the axis, times the multiscale's own) and its
    unit ('' for none); None without a time axis first."""
    for ms in _multiscales(attrs) or ():
        if not isinstance(ms, Mapping):
            continue
        axes = ms.get("axes")
        if not isinstance(axes, Sequence) or isinstance(axes, str) or not axes or \
                _axis_kind(axes[0]) != "t":
            return None
        datasets = finest_first(ms)
        step = 1.0
        for transforms in (datasets[0].get("coordinateTransformations") if datasets else None,
                           ms.get("coordinateTransformations")):
            for t in transforms or ():
                values = t.get("scale") if isinstance(t, Mapping) else None
                if isinstance(values, Sequence) and values and isinstance(
                        values[0], int | float) and math.isfinite(values[0]):
                    step *= float(values[0])
        unit = axes[0].get("unit") if isinstance(axes[0], Mapping) else None
        return (_axis_name(axes[0]) or "t"), step, str(unit or "").strip().lower()
    return None


def _axis_name(axis: Any) -> str:
    """An OME axis's name, lower case ('' when it has none)."""
    name = axis.get("name") if isinstance(axis, Mapping) else axis
    return str(name).strip().lower() if name is not None else ""


def _axis_kind(axis: Any) -> str:
    """'t' (time), 's' (space) or 'c' (channel or any other) for an OME axis, by its type,
    else (0.3's bare names, a missing type) by its name."""
    kind = axis.get("type") if isinstance(axis, Mapping) else None
    if kind is None:
        name = _axis_name(axis)
        return "t" if name == "t" else "s" if name in ("z", "y", "x") else "c"
    return {"time": "t", "space": "s"}.get(str(kind).lower(), "c")


def multiscale_dataset(attrs: Mapping[str, Any]) -> str | None:
    """Path of the first dataset (level 0) of the first multiscale in OME-Zarr group attributes.

    None when the attributes carry no multiscales (the group is not an OME-Zarr image).
    """
    levels = multiscale_levels(attrs)
    return levels[0] if levels else None


def is_label_image(attrs: dict[str, Any]) -> bool:
    """Whether group attributes are an OME label image's (0.5 under ``ome``, 0.4 at top)."""
    return "image-label" in ome_attrs(attrs) and multiscale_dataset(attrs) is not None


def ome_attrs(attrs: dict[str, Any]) -> dict[str, Any]:
    """A group's OME metadata: under ``ome`` in OME-Zarr 0.5, the attributes in 0.4."""
    return attrs["ome"] if isinstance(attrs.get("ome"), dict) else attrs


def is_label_level(group_attrs: dict[str, Any] | None, array_name: str | None) -> bool:
    """Whether the array is a level of an OME label image (`image-label`); a plain array
    beside one, in a group that carries the metadata (a store's root), is not."""
    attrs = group_attrs or {}
    if not is_label_image(attrs):
        return False
    levels = [d.get("path") for m in ome_attrs(attrs).get("multiscales") or []
              if isinstance(m, dict) for d in m.get("datasets") or [] if isinstance(d, dict)]
    return array_name in levels


def multiscale_levels(attrs: Mapping[str, Any]) -> list[str]:
    """Paths of the datasets (levels) of the first multiscale in OME-Zarr group attributes,
    finest first (`finest_first`); empty when there is none."""
    for ms in _multiscales(attrs) or ():
        if not isinstance(ms, Mapping):
            continue
        paths = [str(ds.get("path", "")).strip("/") for ds in finest_first(ms)]
        if any(paths):
            return [p for p in paths if p]
    return []


def ome_levels(
    name: str, ndim: int, attrs: Mapping[str, Any], level_factor: LevelFactor | None = None
) -> list[tuple[str, tuple[float, ...] | None]]:
    """Each level of an OME-Zarr image group with its voxel size (nm, z, y, x; None when
    the axes have no unit), finest first (`level_factor` as for `spatial_metadata`)."""
    return [(level, from_ome(f"{name} (level {level})", ndim, attrs, level,
                             level_factor)[0])
            for level in multiscale_levels(attrs)]


def _multiscales(attrs: Mapping[str, Any]) -> Sequence[Any] | None:
    """The multiscales: OME-Zarr 0.5's under "ome" first (as `ome_attrs` reads the rest of
    the OME metadata), else 0.4's at the top, which a 0.5 group may still carry from before."""
    ome = attrs.get("ome")
    multiscales = ome.get("multiscales") if isinstance(ome, Mapping) else None
    if multiscales is None:
        multiscales = attrs.get("multiscales")
    if not isinstance(multiscales, Sequence) or isinstance(multiscales, str):
        return None
    return multiscales


SHIFT_KEY = "emrun_shift_nm"
"""Where in a multiscale's ``metadata`` emrun states the part of every translation that lies
between voxels (nm, z, y, x): an output made from a coarser pyramid level keeps that level's
half-voxel shift of downsampling, so it lies where its input lies. A reader subtracts it
before asking for whole voxels; foreign data stay held to whole voxels."""


def declared_shift(ms: Mapping[str, Any], axes: int = 3) -> list[float]:
    """The sub-voxel shift (nm, one value per spatial axis: ``axes``) a multiscale states
    under ``SHIFT_KEY``; zeros when it states none (or not one per axis)."""
    meta = ms.get("metadata")
    values = meta.get(SHIFT_KEY) if isinstance(meta, Mapping) else None
    if isinstance(values, Sequence) and len(values) == axes and all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            for v in values):
        return [float(v) for v in values]
    return [0.0] * axes


def ome_shift(name: str, ndim: int, attrs: Mapping[str, Any],
              array_name: str) -> tuple[float, float, float] | None:
    """The part of a level's OME translation (nm, z, y, x) that its whole-voxel offset does
    not carry: a coarser level's half-voxel shift, or what an output of one states; None
    when there is none or the voxel size is unknown."""
    found = _ome_entry(attrs, array_name)
    if found is None:
        return None
    ms, ds, first = found
    voxel, offset = _ome_dataset(name, ndim, ms, ds, first)
    if voxel is None or offset is None:
        return None
    scale, translation, spatial, factors, _ = _geometry(name, ndim, ms, ds)
    shift = tuple(_clean((translation[i] - o * scale[i]) * f)
                  for i, o, f in zip(spatial, offset, factors, strict=True))
    tolerance = [OFFSET_TOLERANCE * v for v in voxel]
    return None if all(abs(s) <= t for s, t in zip(shift, tolerance, strict=True)) \
        else shift  # type: ignore[return-value]


def _geometry(name: str, ndim: int, ms: Mapping[str, Any], ds: Mapping[str, Any]
              ) -> tuple[list[float], list[float], list[int], list[float], bool]:
    """A dataset's combined scale and translation (axis units; multiscale-level transforms
    apply after the dataset's own, OME-NGFF 0.4+), its spatial axes, their factors to nm (1
    for no unit) and whether any scale was given."""
    axes = ms.get("axes")
    _check_axis_count(name, ndim, axes)  # first: it says why a scale has too few values
    _check_transform_counts(name, ms)
    scale, translation, scaled = _transforms(name, ndim, ds.get("coordinateTransformations"))
    g_scale, g_translation, g_scaled = _transforms(name, ndim,
                                                   ms.get("coordinateTransformations"))
    scale = [s * g for s, g in zip(scale, g_scale, strict=True)]
    translation = [t * g + gt for t, g, gt in zip(translation, g_scale, g_translation, strict=True)]
    spatial = _spatial_axes(axes, ndim)
    factors = [_unit_factor(name, axes[i] if axes else None) for i in spatial]
    return scale, translation, spatial, factors, scaled or g_scaled


def _check_transform_counts(name: str, ms: Mapping[str, Any]) -> None:
    """OME-NGFF allows each dataset exactly one scale and at most one translation (after
    it), the multiscale itself at most one of each. Two scales were multiplied together,
    a guess at what the writer meant that makes a wrong voxel size silently: refused, as is a
    second translation, naming the dataset."""
    lists = [(f"dataset {str(ds.get('path', '?'))!r}", ds.get("coordinateTransformations"))
             for ds in ms.get("datasets") or () if isinstance(ds, Mapping)]
    lists.append(("multiscale (its own coordinateTransformations)",
                  ms.get("coordinateTransformations")))
    for where, transforms in lists:
        if not isinstance(transforms, Sequence) or isinstance(transforms, str):
            continue
        kinds = [t.get("type") for t in transforms if isinstance(t, Mapping)]
        for kind in ("scale", "translation"):
            if kinds.count(kind) > 1:
                raise VolumeError(
                    f"{name}: OME-Zarr {where} has {kinds.count(kind)} {kind} "
                    "transformations; OME-NGFF allows one scale and at most one translation "
                    "after it, and emrun does not guess how several combine: write the "
                    f"{kind} as one")


def _check_axis_count(name: str, ndim: int, axes: Any) -> None:
    """OME axes name one axis per dimension of the array; other counts leave it unknown which
    axis is which (the last three were taken for z, y, x, or an IndexError came out)."""
    if isinstance(axes, Sequence) and not isinstance(axes, str) and len(axes) != ndim:
        shown = ", ".join(_axis_name(axis) or "?" for axis in axes)
        raise VolumeError(
            f"{name}: its OME-Zarr axes ({shown}) are {len(axes)} for an array of {ndim} "
            "dimensions; the metadata must name one axis per dimension of the array")


def _ome_dataset(
    name: str, ndim: int, ms: Mapping[str, Any], ds: Mapping[str, Any], first: bool,
    factor: Callable[[], Sequence[float] | None] | None = None,
) -> Spatial:
    """Voxel size and offset of one dataset (level); `first`: it is the finest level. A
    scale that gives no size gives way to a stated one, the finest level's, times the
    level's `factor` (z, y, x, asked only then; None or unknown: 1); its translation, in
    units of that scale, is left unread (the volume lies at its origin)."""
    try:
        scale, translation, spatial, factors, scaled = _geometry(name, ndim, ms, ds)
        sizes = [scale[i] for i in spatial]
        if any(v <= 0 for v in sizes):
            raise UnreadableScale(name, "multiscales scale", f"{sizes} must be positive")
    except UnreadableScale as exc:
        stated = unusable_voxel_size(name, exc.what, exc.problem)
        found = factor() if factor is not None else None
        steps = [1.0] * len(stated) if found is None else list(found)[-len(stated):]
        return tuple(_clean(v * f) for v, f in zip(stated, steps, strict=True)), None
    stated = declared_shift(ms, len(spatial))  # nm: taken off before asking for whole voxels
    voxels = [(translation[i] - s / f) / scale[i]
              for i, s, f in zip(spatial, stated, factors, strict=True)]
    if first:
        offset = whole_voxels(
            name, voxels, f"OME-Zarr translation {_listed([translation[i] for i in spatial])} "
            f"with scale {_listed([scale[i] for i in spatial])}",
            [scale[i] for i in spatial], "translation", "")
    else:  # a coarser level's translation carries the half-voxel shift of downsampling
        offset = tuple(round(v) for v in voxels)
    if not scaled:
        return None, offset  # no scale at all: the size is unknown, not 1 x 1 x 1
    axes = ms.get("axes")
    units = [_has_unit(axes[i] if axes else None) for i in spatial]
    if not any(units):
        return None, offset  # scale in unknown units: a ratio, not a size
    if not all(units):
        _partly_unitless(name, [axes[i] for i in spatial], units)
    voxel = tuple(_clean(scale[i] * f) for i, f in zip(spatial, factors, strict=True))
    return voxel, offset


def _transforms(
    name: str, ndim: int, transforms: Any
) -> tuple[list[float], list[float], bool]:
    """Combined scale and translation of an OME transform list (identity when absent), and
    whether it had a scale at all (without one the voxel size is unknown, not 1)."""
    scale, translation = [1.0] * ndim, [0.0] * ndim
    scaled = False
    for t in transforms or ():
        if not isinstance(t, Mapping) or t.get("type") not in ("scale", "translation"):
            continue
        kind = t["type"]
        values = t.get(kind)
        if not isinstance(values, Sequence) or len(values) != ndim:
            _bad_transform(name, kind, f"{values!r} does not have one value per axis ({ndim})")
        for value in values:
            if _finite(value) is None:
                what = "non-number" if _finite(value, finite=False) is None else \
                    "non-finite value"
                _bad_transform(name, kind, f"contains a {what} {value!r}")
        values = [_number(name, v, f"OME-Zarr {kind}") for v in values]
        if kind == "scale":
            scaled = True
            scale = [a * b for a, b in zip(scale, values, strict=True)]
            translation = [a * b for a, b in zip(translation, values, strict=True)]
        else:
            translation = [a + b for a, b in zip(translation, values, strict=True)]
    return scale, translation, scaled


class UnreadableScale(VolumeError):
    """An OME scale that gives no voxel size (`problem` says why, after `what`): it gives
    way to a stated one (`unusable_voxel_size`); elsewhere it is refused as any
    VolumeError."""

    def __init__(self, name: str, what: str, problem: str) -> None:
        super().__init__(f"{name}: {what} {problem}")
        self.what, self.problem = what, problem


def _bad_transform(name: str, kind: str, problem: str) -> None:
    """Refuse an OME transform's values: a scale's as an `UnreadableScale`."""
    if kind == "scale":
        raise UnreadableScale(name, "OME-Zarr scale", problem)
    raise VolumeError(f"{name}: OME-Zarr {kind} {problem}")


def _spatial_axes(axes: Any, ndim: int) -> list[int]:
    """Indices of the spatial axes; by declared type when given, else the last three."""
    if isinstance(axes, Sequence) and len(axes) == ndim:
        found = []
        for i, axis in enumerate(axes):
            if isinstance(axis, Mapping):
                if axis.get("type") == "space" or (
                    axis.get("type") is None and axis.get("name") in ("z", "y", "x")
                ):
                    found.append(i)
            elif axis in ("z", "y", "x"):
                found.append(i)
        if found:
            return found
    return list(range(max(0, ndim - 3), ndim))


def _partly_unitless(name: str, axes: Sequence[Any], units: Sequence[bool]) -> None:
    """Refuse spatial axes of which some give a unit and some none: the size of the latter
    is unknown, and taking their scale as nm (as was done) made 0.006 um x 0.006 x 0.006 a
    6 x 0.006 x 0.006 nm voxel."""
    given = ", ".join(_axis_name(a) or "?" for a, u in zip(axes, units, strict=True) if u)
    missing = ", ".join(_axis_name(a) or "?" for a, u in zip(axes, units, strict=True) if not u)
    raise VolumeError(
        f"{name}: its OME-Zarr axes give a unit for {given} but none for {missing}, whose "
        "voxel size is then unknown; give every spatial axis its unit (e.g. \"unit\": "
        "\"nanometer\")")


NO_SIZE_UNITS = ("pixel", "pixels", "px", "voxel", "voxels")
"""Units some writers give that say no physical size: read as no unit (the voxel size is
unknown), as TIFF's resolution unit "pixel" is, not refused as an unknown unit."""


def _has_unit(axis: Any) -> bool:
    unit = str(axis.get("unit") or "").strip().lower() if isinstance(axis, Mapping) else ""
    return bool(unit) and unit not in NO_SIZE_UNITS


def _unit_factor(name: str, axis: Any) -> float:
    """nm per unit of an OME axis; a unit emrun does not know gives no voxel size (an
    `UnreadableScale`, which a stated size replaces)."""
    unit = axis.get("unit") if isinstance(axis, Mapping) else None
    key = str(unit or "").strip().lower()
    if key in NO_SIZE_UNITS:
        return 1.0  # a ratio of the array's steps, not a length
    if key not in UNIT_TO_NM:
        raise UnreadableScale(name, "OME-Zarr axis", f"{_axis_name(axis) or '?'}: unknown "
                              f"spatial unit {unit!r}; expected a length unit OME-NGFF "
                              "allows (nanometer, micrometer, meter, ...) or nm, um, mm")
    return UNIT_TO_NM[key]


def unit_to_nm(name: str, unit: Any) -> float:
    """Factor from a physical unit name to nanometres (None or "" means nm)."""
    key = str(unit or "").strip().lower()
    if key not in UNIT_TO_NM:
        raise VolumeError(f"{name}: unknown spatial unit {unit!r}; expected a length unit "
                          "OME-NGFF allows (nanometer, micrometer, meter, ...) or nm, um, mm")
    return UNIT_TO_NM[key]


def from_attrs(name: str, ndim: int, attrs: Mapping[str, Any],
               size_key: str | None = None) -> Spatial:
    """funlib convention: `voxel_size`/`resolution` and `offset`, both in nm, zyx. A voxel
    size that cannot be read gives way to a stated one (`unusable_voxel_size`), named as
    `size_key` (the attribute as stored; default the one read), which then places the
    offset in nm."""
    raw_voxel = attrs.get("voxel_size", attrs.get("resolution"))
    key = size_key or ("voxel_size" if attrs.get("voxel_size") is not None else "resolution")
    voxel = _funlib_voxel_size(name, raw_voxel, key, ndim) if raw_voxel is not None else None
    raw_offset = attrs.get("offset")
    if raw_offset is None:
        return voxel, None
    offset_nm = _vector(name, raw_offset, "offset", ndim)
    divisor = voxel if voxel is not None else (1.0,) * len(offset_nm)
    if len(divisor) != len(offset_nm):
        raise VolumeError(
            f"{name}: offset {list(offset_nm)} and voxel_size {list(divisor)} differ in length"
        )
    voxels = [o / v for o, v in zip(offset_nm, divisor, strict=True)]
    if voxel is None:
        return None, whole_voxels(name, voxels, f"offset {_listed(offset_nm)} (no voxel size)",
                                  divisor, "offset", "")
    return voxel, whole_voxels(name, voxels, f"offset {_listed(offset_nm)} nm with voxel size "
                               f"{_listed(voxel)} nm", divisor, "offset", " nm")


def _funlib_voxel_size(name: str, raw: Any, key: str, ndim: int) -> tuple[float, ...]:
    """A funlib voxel size as stored, or where it is not one positive size in nm per axis
    the stated one (it made the volume unopenable even where the user gave its size)."""
    try:
        return _size_values(raw, ndim)
    except ValueError as exc:
        return unusable_voxel_size(name, f"attribute {key}", str(exc))


def size_problem(raw: Any, ndim: int) -> str | None:
    """What is wrong with `raw` as a funlib voxel size (nm, at most one per axis), or None:
    for readers that convert a format's size to one first (N5's, in x, y, z and units)."""
    try:
        _size_values(raw, ndim)
    except ValueError as exc:
        return str(exc)
    return None


def _size_values(raw: Any, ndim: int) -> tuple[float, ...]:
    """`raw` as positive sizes in nm, at most one per axis, or a ValueError saying what is
    wrong: not a list, a non-number or non-finite value, too many values, a size stated in
    metres (4e-9 rounds to 0 nm: named as stored, not as a sign error) or not positive."""
    values = raw.tolist() if hasattr(raw, "tolist") else raw
    if isinstance(values, (int, float, str)) or not isinstance(values, Sequence):
        raise ValueError(f"must be a list of numbers, got {raw!r}")
    numbers = []
    for value in values:
        number = _finite(value)
        if number is None:
            kind = "non-number" if _finite(value, finite=False) is None else "non-finite value"
            raise ValueError(f"contains a {kind} {value!r}")
        numbers.append(number)
    voxel = tuple(_clean(v) for v in numbers)
    if not 0 < len(voxel) <= ndim:
        raise ValueError(f"has {len(voxel)} values for a {ndim}-d array")
    if any(v > 0 and c <= 0 for v, c in zip(numbers, voxel, strict=True)):
        shown = ", ".join(f"{v:g}" for v in numbers)
        raise ValueError(f"[{shown}] is not in nm (in metres? 4e-09 m is 4 nm; store it in nm)")
    if any(v <= 0 for v in voxel):
        raise ValueError(f"{list(voxel)} must be positive")
    return voxel


def positive_number(value: Any) -> float | None:
    """`value` as a positive finite float (a bool is no number), or None."""
    number = _finite(value)
    return number if number is not None and number > 0 else None


def _finite(value: Any, finite: bool = True) -> float | None:
    """`value` as a float (a bool is no number), or None where it is none (or, `finite`,
    not finite)."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) or not finite else None


OFFSET_TOLERANCE = 1e-3
"""Voxels an offset may lie off a whole number and still be taken as it: the float noise of
unit conversions (0.006 um * 5 / 0.006 um), not a shift anyone meant."""


def whole_voxels(
    name: str,
    voxels: Sequence[float],
    described: str,
    per_voxel: Sequence[float],
    key: str,
    unit: str,
) -> tuple[int, ...]:
    """An offset in whole voxels, or a one-line VolumeError when the metadata puts the volume
    between voxels.

    Offsets place volumes against each other (evaluate compares them, outputs carry their
    input's) on whole voxels only; rounding a half-voxel offset to one side (as was done,
    silently) moves a volume against its labels or its outputs against the input's metadata.
    `described` names the metadata's values; `per_voxel` (the metadata's units per voxel,
    with `unit`) expresses the nearest whole offset as its `key` for the message.
    """
    nearest = tuple(round(v) for v in voxels)
    if all(abs(v - n) <= OFFSET_TOLERANCE for v, n in zip(voxels, nearest, strict=True)):
        return nearest
    there = _listed([n * p for n, p in zip(nearest, per_voxel, strict=True)])
    raise VolumeError(
        f"{name}: {described} (z, y, x) puts it {_listed(voxels)} voxels from the origin, "
        "not a whole number of voxels; emrun places volumes on whole voxels and does not "
        f"shift one silently: correct the {key} in its metadata (to whole voxels, e.g. "
        f"{key} {there}{unit})")


def _listed(values: Sequence[float]) -> str:
    """Numbers for a message, without float noise or a needless '.0': [15, 3, 0.5]; to ten
    digits, as 99999.995 voxels 'not a whole number' read 100000 in six."""
    return "[" + ", ".join(f"{_clean(v):.10g}" for v in values) + "]"


def _vector(name: str, value: Any, key: str, ndim: int) -> tuple[float, ...]:
    values = value.tolist() if hasattr(value, "tolist") else value
    if isinstance(values, (int, float)) or not isinstance(values, Sequence):
        raise VolumeError(f"{name}: attribute {key} must be a list of numbers, got {value!r}")
    out = tuple(_clean(_number(name, v, key)) for v in values)
    if not 0 < len(out) <= ndim:
        raise VolumeError(f"{name}: attribute {key} has {len(out)} values for a {ndim}-d array")
    return out


def _number(name: str, value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise VolumeError(f"{name}: {key} contains a non-number {value!r}") from None
    if not math.isfinite(value):
        raise VolumeError(f"{name}: {key} contains a non-finite value {value!r}")
    return float(value)


def _clean(value: float) -> float:
    """Round away float noise (e.g. 4.000000001 nm from rational TIFF tags or unit maths)."""
    return float(round(value, 6))


def ome_image_attrs(
    name: str,
    ndim: int,
    voxel_size: Sequence[float] | None,
    offset: Sequence[int] | None,
    channel_axis: bool = False,
    factors: Sequence[Sequence[int]] = ((1, 1, 1),),
    channel_names: Sequence[str] | None = None,
    shift_nm: Sequence[float] | None = None,
) -> dict[str, Any]:
    """OME-Zarr 0.5 attributes for an image group whose levels are the arrays "0", "1", ...

    Axes are z, y, x (type space, unit nanometer), after a leading channel axis c when
    `channel_axis`. Level k's scale is the voxel size in nm times its (z, y, x) factor in
    `factors`; its translation puts its voxel centres at the centres of the windows it
    averages (offset * voxel size + (factor - 1) / 2 voxels; written only where non-zero).
    An unknown voxel size is written as scale 1 with no unit on the axes, which reads back
    as "unknown" (None), not as 1 nm. `channel_names` become OME `omero` channel labels.
    `shift_nm` (with a known voxel size) moves every level by less than a voxel and is
    stated under the multiscale's ``metadata`` (`SHIFT_KEY`): the output of a coarser level
    lies where that level lies. Values are trusted here; `emrun.io.write` validates them with
    user-facing messages.
    """
    spatial = ndim - 1 if channel_axis else ndim
    if spatial != 3 or ndim not in (3, 4):
        raise ValueError(
            f"{name}: expected a 3-d (z, y, x) or, with a channel axis, 4-d (c, z, y, x) "
            f"volume, got {ndim} axes"
        )
    # the scale as written (float noise rounded away) also makes the translations: from the
    # size as given, 6.6666667 nm written as 6.666667, an offset of 100000 voxels read back
    # 0.005 voxels off and the volume was refused on reopening (even as it was written)
    voxel = [_clean(float(v)) for v in voxel_size] if voxel_size is not None \
        else [1.0, 1.0, 1.0]
    shift = [int(o) for o in offset] if offset is not None else [0, 0, 0]
    if len(voxel) != 3 or len(shift) != 3:
        raise ValueError(f"{name}: voxel size and offset need 3 values (z, y, x)")
    moved = [_clean(float(m)) for m in shift_nm] if shift_nm is not None and \
        voxel_size is not None else [0.0, 0.0, 0.0]

    axes: list[dict[str, Any]] = [{"name": "c", "type": "channel"}] if channel_axis else []
    for axis in "zyx":
        entry: dict[str, Any] = {"name": axis, "type": "space"}
        if voxel_size is not None:
            entry["unit"] = "nanometer"
        axes.append(entry)
    lead = [1.0] if channel_axis else []
    datasets = []
    for level, factor in enumerate(factors):
        scale = [_clean(v * f) for v, f in zip(voxel, factor, strict=True)]
        transforms: list[dict[str, Any]] = [{"type": "scale", "scale": lead + scale}]
        corner = [(o + (f - 1) / 2) * v + m
                  for o, f, v, m in zip(shift, factor, voxel, moved, strict=True)]
        if any(corner):
            transforms.append({"type": "translation",
                               "translation": [0.0] * len(lead) + [_clean(c) for c in corner]})
        datasets.append({"path": str(level), "coordinateTransformations": transforms})
    multiscale: dict[str, Any] = {"axes": axes, "datasets": datasets, "name": name}
    if any(moved):
        multiscale["metadata"] = {SHIFT_KEY: moved}
    ome: dict[str, Any] = {"version": "0.5", "multiscales": [multiscale]}
    if channel_names is not None:
        ome["omero"] = {"channels": [{"label": label, "active": True, "color": "FFFFFF"}
                                     for label in channel_names]}
    return {"ome": ome}


def funlib_attrs(
    voxel_size: Sequence[float] | None,
    corner: Sequence[float] | None,
    channel_axis: bool,
    factor: Sequence[int] = (1, 1, 1),
) -> dict[str, Any]:
    """funlib.persistence's attributes for one level array, so `open_ds` (gunpowder, daisy)
    reads the same geometry: `voxel_size` (level 0's, nm, times the level's `factor`),
    `offset` in nm (the volume's first corner, `corner` in level-0 voxels, on the level's
    own grid: funlib, and emrun opening the level alone, refuse an offset that is not a
    whole number of the level's voxels; rounded half up as the level's OME translation
    is read), axis names with "^" marking the channel axis."""
    voxel = [_clean(float(v)) for v in voxel_size] if voxel_size is not None \
        else [1.0, 1.0, 1.0]  # as written: the offset must be a whole number of them
    start = [float(o) for o in corner] if corner is not None else [0.0, 0.0, 0.0]
    return {
        "voxel_size": [_clean(v * f) for v, f in zip(voxel, factor, strict=True)],
        "offset": [_clean(math.floor(o / f + 0.5) * f * v)
                   for o, v, f in zip(start, voxel, factor, strict=True)],
        "axis_names": (["c^"] if channel_axis else []) + ["z", "y", "x"],
        "units": ["nm", "nm", "nm"] if voxel_size is not None else ["", "", ""],
    }


def image_label_attrs() -> dict[str, Any]:
    """OME-Zarr 0.5 `image-label` of a segmentation: background (0) transparent, the image
    it labels at the store's root (`../../`, where the OME layout puts it: see
    `emrun.io.layout`)."""
    return {"version": "0.5", "colors": [{"label-value": 0, "rgba": [0, 0, 0, 0]}],
            "source": {"image": "../../"}}
