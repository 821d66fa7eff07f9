"""N5 datasets (`vol.n5/raw`, local or at a URL), through tensorstore.

N5 lists axes fastest first (x, y, z); emrun reverses them to z, y, x. Voxel size and offset
come from the conventions N5 data carries: `resolution` (gunpowder/daisy) or
`pixelResolution` (n5-viewer, with a unit; a scale level's `downsamplingFactors` multiply
it, as n5-viewer and n5-spark's pyramids mean it, and such a level lies half a level-0
voxel per factor past level 0, `level_shift`), and `offset` in nm, all in x, y, z order.
N5 written before its 1.0 format names its codec in `compressionType` (a string), which
tensorstore does not read: such a dataset is opened from its structure, given the codec in
today's form.

A multiscale group holding levels s0, s1, ... (n5-viewer, BigDataViewer/BigStitcher's export,
paintera, neuroglancer's reading of them) opens as its finest level and lists its levels
(`Pyramid`); a level without a voxel size of its own takes the group's, times its factors,
and a group without one (nor its s0) its parent's (n5-viewer's root holds every channel's
defaults). A group's offset (paintera's) is level 0's: a level taking it lies half a level-0
voxel per factor past it, in whole voxels of its own plus a shift (`n5_placement`).
A BigDataViewer export (`setupN/timepointT/sK`) without one in its attributes takes setup N's
`voxelSize` from the XML beside the container that names it (`find_bdv_xml`), and level 0's
offset from the view's ViewRegistration where that is a scale and a translation by whole
voxels (`bdv_offset`; a rotation or shear is passed over with a warning).
A level's COSEM `transform` (OpenOrganelle's: scale, translate and units per named axis, on
the level or listed in its group's `multiscales`) gives its voxel size and place itself
(`cosem_geometry`). Voxel-size metadata that cannot be read gives way to a size the user
states (`emrun.io.metadata.stated_voxel_size`).
"""

from __future__ import annotations

import math
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from emrun.io.locations import is_url
from emrun.io.metadata import (
    NO_SIZE_UNITS,
    OFFSET_TOLERANCE,
    UNIT_TO_NM,
    from_attrs,
    ignored,
    shape_factor,
    size_problem,
    unit_to_nm,
    unusable_voxel_size,
    whole_voxels,
)
from emrun.io.tensorstore_volume import (
    MetadataReader,
    TensorstoreVolume,
    forbidden,
    kvstore,
    opened_volume,
)
from emrun.io.volume import Level, VolumeError, format_names

STRUCTURE_KEYS = ("dimensions", "blockSize", "dataType", "compression", "n5")
OLD_CODEC_KEY = "compressionType"
"""Where N5 before 1.0 named its codec ("raw", "gzip", "bzip2", "xz", "lz4")."""
LEVEL_NAME = re.compile(r"s(\d+)")
MAX_LEVELS = 32
"""Levels looked for past the last one a group lists (a store is probed by name, s0, s1, ...:
a remote one cannot be listed)."""
FACTOR_LISTS = ("scales", "downsamplingFactors")
"""Where a multiscale group lists every level's factors (x, y, z), s0's first: n5-viewer's
`scales`, BigDataViewer's `downsamplingFactors` (on the setup, the timepoint's parent)."""
SPATIAL_KEYS = ("resolution", "pixelResolution")
TRANSFORM_KEY = "transform"
"""COSEM's (OpenOrganelle's) per-level geometry: {"axes", "scale", "translate", "units"},
each one value per named axis, with the voxel 0's centre at `translate`."""
SHAPE_FACTORS_KEY = "emrun_shape_factors"
"""Where a level with a COSEM `transform` but no `downsamplingFactors` is told its factors
(x, y, z) as its shape gives them: a stated voxel size in place of an unreadable transform
is the finest level's, times them. emrun's own, never a volume's attribute."""
OWN_SIZE_KEYS = (*SPATIAL_KEYS, TRANSFORM_KEY)
"""What gives a level a voxel size of its own."""
PARENT_KEYS = (*SPATIAL_KEYS, "units")
"""What a pyramid group without a voxel size (nor its s0) takes from its parent group:
n5-viewer's root attributes are every channel group's defaults."""
BDV_GROUP = re.compile(r"(?:.*/)?setup(\d+)/timepoint(\d+)")
"""A BigDataViewer pyramid group, `setupN/timepointT`: setup N's voxel size is in the XML."""
XML_READ_LIMIT = 8 << 20
"""Bytes of a BigDataViewer XML read at most: its SequenceDescription (the image loader and
the setups' voxel sizes) comes first, the registrations, which grow with the views, after."""
XML_FILES = 64
"""Other *.xml files beside a container looked into at most for the one that names it."""


def open_n5(container: str, dataset: str | None) -> TensorstoreVolume:
    """Open the dataset `dataset` of the N5 container `container`, or the finest level of
    the multiscale group it names."""
    if not is_url(container) and not os.path.isdir(container):
        raise VolumeError(f"{container}: no such folder (an N5 container is a folder)")
    reader = MetadataReader(container)
    name = f"{container}/{dataset}" if dataset else container
    array, attrs, pyramid, index = _locate(reader, container, dataset)
    if pyramid is not None:
        pyramid.check(name, index)
        attrs = pyramid.effective(index)
    spec: dict[str, Any] = {"driver": "n5",
                            "kvstore": kvstore(reader.ts, f"{reader.location}/{array}")}
    if _spatial_only(attrs) or _old_codec(attrs):
        spec |= {"metadata": _structure(attrs), "assume_metadata": True}
    view = reader.open(spec, lambda store: store[reader.ts.d[:].transpose[::-1]])
    inherited = pyramid is not None and pyramid.inherits_offset(index)
    voxel_size, offset, shift = n5_placement(name, len(view.shape), attrs, inherited,
                                             coarser=pyramid is not None and index > 0)
    plain = {k: v for k, v in attrs.items()
             if k not in (*STRUCTURE_KEYS, OLD_CODEC_KEY, SHAPE_FACTORS_KEY)}
    levels = pyramid.listed(container) if pyramid is not None else ()
    return opened_volume(view, path=container, dataset=dataset, voxel_size=voxel_size,
                         offset=offset, attrs=plain, metadata=spec.get("metadata"),
                         shift_nm=shift, level_list=levels)


def _locate(reader: MetadataReader, container: str, dataset: str | None,
            ) -> tuple[str, dict[str, Any], Pyramid | None, int]:
    """The dataset read for `dataset` (its path in the container, its attributes), the
    pyramid it is a level of (None if none) and its index there: a multiscale group's is
    its level 0."""
    refused: VolumeError | None = None
    try:
        attrs = reader.json(f"{dataset}/attributes.json" if dataset else "attributes.json")
    except VolumeError as exc:  # a group without attributes, on an object store?
        if not forbidden(exc):
            raise
        attrs, refused = None, exc
    if attrs is not None and "dimensions" in attrs:
        return (dataset or "", attrs, *_pyramid_of(reader, dataset or ""))
    pyramid = read_pyramid(reader, dataset or "", attrs or {})
    if pyramid is not None:
        return pyramid.path(0), pyramid.levels[0][1], pyramid, 0
    if refused is not None:
        raise refused
    _not_a_dataset(container, dataset, attrs)


def _not_a_dataset(container: str, dataset: str | None, attrs: Any) -> NoReturn:
    """Refuse a path naming a container, a missing dataset or a group that is no pyramid."""
    if not dataset:
        raise VolumeError(f"{container}: is an N5 container; name a dataset inside it "
                          f"({container}/NAME); datasets: {list_datasets(container)}")
    name = f"{container}/{dataset}"
    if attrs is None and is_url(container):  # a remote store cannot be listed
        raise VolumeError(f"{name}: no N5 dataset there (no attributes.json)")
    if attrs is None and not os.path.isdir(name):
        raise VolumeError(f"{container} has no dataset {dataset!r}; datasets: "
                          f"{list_datasets(container)}")
    raise VolumeError(f"{name} is an N5 group, not a dataset; datasets in it: "
                      f"{list_datasets(container, dataset)}")


def _pyramid_of(reader: MetadataReader, dataset: str) -> tuple[Pyramid | None, int]:
    """The pyramid a dataset named sN is level N of, and N; (None, 0) for any other."""
    group, _, leaf = dataset.rpartition("/")
    found = LEVEL_NAME.fullmatch(leaf)
    if found is None:
        return None, 0
    attrs = _probe(reader, f"{group}/attributes.json" if group else "attributes.json")
    if attrs is not None and "dimensions" in attrs:
        return None, 0
    pyramid = read_pyramid(reader, group, attrs or {})
    index = int(found.group(1))
    if pyramid is None or index >= len(pyramid.levels) or pyramid.levels[index][0] != leaf:
        return None, 0
    return pyramid, index


@dataclass(frozen=True)
class Pyramid:
    """An N5 multiscale group: where it is in the container, its attributes, and its
    levels' names and own attributes, finest (s0) first. A level's factors (x, y, z, as
    N5 lists axes) are its own `downsamplingFactors`, else the group's list's entry."""

    group: str
    attrs: dict[str, Any]
    levels: tuple[tuple[str, dict[str, Any]], ...]
    factor_list: tuple[Any, ...] = ()

    def path(self, index: int) -> str:
        """The level's dataset path inside the container."""
        return f"{self.group}/{self.levels[index][0]}".strip("/")

    def factors(self, index: int) -> list[float] | None:
        """The level's downsampling factors (x, y, z) from level 0; None when unknown."""
        own = self.levels[index][1].get("downsamplingFactors")
        if _positive_numbers(own):
            return list(own)
        if index < len(self.factor_list) and _positive_numbers(self.factor_list[index]):
            return list(self.factor_list[index])
        rank = len(self.levels[index][1].get("dimensions") or ())
        return [1] * rank if index == 0 and rank else None

    def effective(self, index: int) -> dict[str, Any]:
        """The level's attributes as it is read: its factors, and without a voxel size of
        its own the group's (BigDataViewer's export and paintera put `resolution` on the
        group only; a level's attributes inherit its group's, as neuroglancer reads N5)."""
        own = self.levels[index][1]
        found = dict(own)
        factors = self.factors(index)
        if factors is not None:
            found["downsamplingFactors"] = factors
        elif TRANSFORM_KEY in own and (by_shape := self.shape_factors(index)) is not None:
            found[SHAPE_FACTORS_KEY] = by_shape
        if factors is None or not self._takes_group_size(index):
            return found
        if isinstance(self.attrs.get("pixelResolution"), Mapping | list):
            found["pixelResolution"] = self.attrs["pixelResolution"]
        else:
            found["resolution"] = _downsampled(self.attrs["resolution"], factors)
        for key in ("units", "offset"):
            if key not in own and key in self.attrs:
                found[key] = self.attrs[key]
        return found

    def shape_factors(self, index: int) -> list[float] | None:
        """The level's factors (x, y, z) from level 0 as its shape gives them (N5 lists
        dimensions x, y, z); None where either's dimensions are not three sizes."""
        dims = self.levels[index][1].get("dimensions")
        base = self.levels[0][1].get("dimensions")
        if not (_positive_numbers(dims) and _positive_numbers(base)) or len(dims) < 3 or \
                len(base) < 3:
            return None
        found = shape_factor(list(reversed(base[:3])), list(reversed(dims[:3])))
        return None if found is None else list(reversed(found))

    def _takes_group_size(self, index: int) -> bool:
        """Whether the level's voxel size is the group's times its factors: it has none of
        its own, its factors are known and the group has one."""
        own = self.levels[index][1]
        return not any(key in own for key in OWN_SIZE_KEYS) and \
            self.factors(index) is not None and (
                isinstance(self.attrs.get("pixelResolution"), Mapping | list)
                or self.attrs.get("resolution") is not None)

    def inherits_offset(self, index: int) -> bool:
        """Whether the level's offset is the group's: level 0's placement (paintera's),
        from which the level lies half a level-0 voxel per factor on (`n5_placement`)."""
        return self._takes_group_size(index) and "offset" not in self.levels[index][1] \
            and "offset" in self.attrs

    def mismatch(self, index: int) -> str | None:
        """Why the level's factors disagree with its shape against level 0's, or None: its
        voxel size is level 0's times its factors, so a wrong factor gives a wrong size."""
        factors, base = self.factors(index), self.factors(0)
        dims = self.levels[index][1].get("dimensions")
        base_dims = self.levels[0][1].get("dimensions")
        if factors is None or base is None or not isinstance(dims, list) or \
                not isinstance(base_dims, list) or len(base) != len(factors):
            return None
        expected = [b * f0 / f for b, f0, f in zip(base_dims, base, factors, strict=False)]
        if all(math.floor(e + 1e-9) <= d <= math.ceil(e - 1e-9)
               for d, e in zip(dims, expected, strict=False)):
            return None
        about = "x".join(f"{e:g}" for e in expected)
        return (f"level {self.levels[index][0]!r} has downsamplingFactors {factors} (x, y, "
                f"z) but dimensions {'x'.join(map(str, dims))}: level "
                f"{self.levels[0][0]!r} is {'x'.join(map(str, base_dims))}, so it should be "
                f"about {about}, and its voxel size would be wrong; correct its "
                "downsamplingFactors (or the group's scales)")

    def check(self, name: str, index: int) -> None:
        """Refuse to open a level whose factors disagree with its shape."""
        why = self.mismatch(index)
        if why is not None:
            raise VolumeError(f"{name}: N5 multiscale group {self.group or '(root)'}: {why}")

    def listed(self, container: str) -> tuple[Level, ...]:
        """Every level, its voxel size as opening it gives (None where unknown or where
        its factors disagree with its shape), its path as `open_volume` takes it."""
        return tuple(Level(level, self._voxel_size(container, i),
                           f"{container}/{self.path(i)}")
                     for i, (level, _) in enumerate(self.levels))

    def _voxel_size(self, container: str, index: int) -> tuple[float, ...] | None:
        if self.mismatch(index) is not None:
            return None
        attrs = self.effective(index)
        rank = len(attrs.get("dimensions") or ())
        try:
            return n5_voxel_size(f"{container}/{self.path(index)}", rank, attrs)
        except VolumeError:
            return None


def read_pyramid(reader: MetadataReader, group: str,
                 attrs: Mapping[str, Any]) -> Pyramid | None:
    """The multiscale group at `group` (datasets s0, s1, ... in it), or None: the levels
    are read by name until one is missing, as a remote store cannot be listed."""
    prefix = f"{group}/" if group else ""
    factor_list = _factor_list(attrs)
    parent: dict[str, Any] | None = None
    if not factor_list and group:  # BigDataViewer lists them on the setup above
        parent = _parent_attrs(reader, group)
        factor_list = _factor_list(parent)
    levels: list[tuple[str, dict[str, Any]]] = []
    for index in range(len(factor_list) + MAX_LEVELS):
        found = _probe(reader, f"{prefix}s{index}/attributes.json")
        if found is None or "dimensions" not in found:
            break
        levels.append((f"s{index}", _with_listed_transform(found, attrs, f"s{index}")))
    if not levels:
        return None
    found = dict(attrs)
    if group and not _has_voxel_size(found, levels[0][1]):  # n5-viewer's root: defaults
        parent = _parent_attrs(reader, group) if parent is None else parent
        if _has_voxel_size(parent, {}):
            found |= {k: parent[k] for k in PARENT_KEYS if k in parent}
    if not _has_voxel_size(found, levels[0][1]):  # N5's win
        voxel, offset = bdv_geometry(reader.location, group)
        if voxel is not None:
            found["pixelResolution"] = {"dimensions": voxel, "unit": "nm"}
        if voxel is not None and offset is not None and "offset" not in found:
            found["offset"] = offset  # nm, x, y, z: level 0's, as paintera's group offset
    return Pyramid(group, found, tuple(levels), tuple(factor_list))


def _parent_attrs(reader: MetadataReader, group: str) -> dict[str, Any]:
    """The attributes of the group above `group` ({} where it has none or is a dataset):
    n5-viewer keeps every channel's `scales` and `pixelResolution` in the root's, and
    BigDataViewer its levels' factors on the setup."""
    parent = group.rpartition("/")[0]
    found = _probe(reader, f"{parent}/attributes.json" if parent else "attributes.json")
    return found if found is not None and "dimensions" not in found else {}


def _has_voxel_size(group: Mapping[str, Any], level0: Mapping[str, Any]) -> bool:
    return any(key in group for key in SPATIAL_KEYS) or any(key in level0 for key in
                                                            OWN_SIZE_KEYS)


def n5_pyramid(container: str, group: str) -> Pyramid | None:
    """The multiscale group `group` of the N5 `container` as emrun reads it (None if it is
    a dataset or no pyramid): `emrun view` tells neuroglancer its levels' factors."""
    reader = MetadataReader(container)
    attrs = _probe(reader, f"{group}/attributes.json" if group else "attributes.json")
    if attrs is not None and "dimensions" in attrs:
        return None
    return read_pyramid(reader, group, attrs or {})


def _probe(reader: MetadataReader, key: str) -> dict[str, Any] | None:
    """A key looked for, not named by the user: an object store answers 403 for a missing
    key where listing is not allowed, so a refusal counts as absent (the level past the
    last, a group without attributes), as for remote zarr (`forbidden`)."""
    try:
        return reader.json(key)
    except VolumeError as exc:
        if forbidden(exc):
            return None
        raise


def _factor_list(attrs: Mapping[str, Any]) -> list[Any]:
    """A group's list of every level's factors (`scales` or `downsamplingFactors`)."""
    for key in FACTOR_LISTS:
        value = attrs.get(key)
        if isinstance(value, list) and value and all(isinstance(v, list) for v in value):
            return value
    return []


def _positive_numbers(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(v, int | float) and not isinstance(v, bool) and v > 0 for v in value)


def _spatial_only(attrs: Mapping[str, Any]) -> bool:
    """Whether `resolution` or `units` are not what tensorstore's reading of them takes,
    one number (one string) per axis: funlib and daisy give three for z, y, x only on
    (c, z, y, x) arrays, and a malformed one (a string, too many values) that a stated voxel
    size replaces refused the dataset; such a dataset is opened from its structure alone
    (emrun reads the two itself)."""
    rank = len(attrs.get("dimensions") or ())
    resolution, units = attrs.get("resolution"), attrs.get("units")
    return not (resolution is None or (
        isinstance(resolution, list) and len(resolution) == rank and all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in resolution))) or \
        not (units is None or (isinstance(units, list) and len(units) == rank and all(
            isinstance(u, str) for u in units)))


def _old_codec(attrs: Mapping[str, Any]) -> bool:
    """Whether the dataset names its codec as N5 before 1.0 did (tensorstore refused it:
    'Error parsing object member "compression"')."""
    return "compression" not in attrs and isinstance(attrs.get(OLD_CODEC_KEY), str)


def _structure(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """The dataset's structure for tensorstore, an old `compressionType` in today's form."""
    found = {k: attrs[k] for k in STRUCTURE_KEYS if k in attrs}
    if _old_codec(attrs):
        found["compression"] = {"type": attrs[OLD_CODEC_KEY]}
    return found


def n5_spatial(name: str, ndim: int, attrs: Mapping[str, Any]) -> Any:
    """Voxel size (nm) and offset (voxels), z, y, x, from N5 attributes in x, y, z order.
    A voxel size that cannot be read gives way to a stated one (`stated_resolution`); an
    offset in units emrun does not know is then left unread."""
    zyx: dict[str, Any] = {}
    resolution, factors = _resolution_and_units(name, attrs)
    if factors is None:  # the stated size, nm
        zyx["voxel_size"] = list(reversed(resolution))
    elif isinstance(resolution, list):
        zyx["voxel_size"] = [_scaled(v, f)
                             for v, f in zip(reversed(resolution), factors, strict=True)]
    elif resolution is not None:
        zyx["voxel_size"] = resolution  # not a list: checked below
    if "voxel_size" in zyx and (problem := _n5_size_problem(zyx["voxel_size"], ndim)) is not None:
        zyx["voxel_size"] = list(reversed(stated_resolution(name, attrs, _size_key(attrs),
                                                            problem)))
    offset = attrs.get("offset")
    if factors is None:
        pass  # in units emrun does not know
    elif isinstance(offset, list) and len(offset) == len(factors):  # in resolution's units
        zyx["offset"] = [_scaled(v, f) for v, f in zip(reversed(offset), factors, strict=True)]
    elif offset is not None:
        zyx["offset"] = list(reversed(offset)) if isinstance(offset, list) else offset
    return from_attrs(name, ndim, zyx)


def _n5_size_problem(size: Any, ndim: int) -> str | None:
    """`size_problem`, and a value for each spatial axis at least: N5 lists x, y and z
    (and, on a dataset with channels, may list them too), where funlib lets leading axes go
    unsized; tensorstore refused a 3-d dataset's 2 values before emrun read them."""
    if isinstance(size, list) and len(size) < min(ndim, 3):
        return f"has length {len(size)} for a {ndim}-d dataset (x, y and z each need one)"
    return size_problem(size, ndim)


def _size_key(attrs: Mapping[str, Any]) -> str:
    """The attribute the voxel size is read from."""
    return "resolution" if attrs.get("resolution") is not None else "pixelResolution"


def stated_resolution(name: str, attrs: Mapping[str, Any], key: str,
                      problem: str) -> list[float]:
    """The stated voxel size (`unusable_voxel_size`; nm, x, y, z, as N5 lists them) in
    place of attribute `key`, which cannot be read for `problem`: the stated size is the
    finest level's, so a level's `downsamplingFactors` multiply it."""
    stated = list(reversed(unusable_voxel_size(name, f"attribute {key}", problem)[-3:]))
    factors = attrs.get("downsamplingFactors")
    if _positive_numbers(factors) and len(factors) == len(stated):
        return [float(v) * float(f) for v, f in zip(stated, factors, strict=True)]
    return [float(v) for v in stated]


def _resolution_and_units(name: str, attrs: Mapping[str, Any]
                          ) -> tuple[Any, list[float] | None]:
    """The voxel size as the attributes give it (x, y, z, in their units; a level's
    `pixelResolution` times its factors) and nm per unit of each axis (z, y, x). A unit
    emrun does not know gives way to a stated size (nm), with None for the units."""
    resolution = attrs.get("resolution")
    pixel = attrs.get("pixelResolution")
    factor = 1.0
    if resolution is None and isinstance(pixel, Mapping):
        resolution = _downsampled(pixel.get("dimensions"), attrs.get("downsamplingFactors"))
        unit = pixel.get("unit")
        if str(unit or "").strip().lower() not in UNIT_TO_NM:
            return stated_resolution(name, attrs, "pixelResolution", _unknown_unit(unit)), None
        factor = unit_to_nm(name, unit)
    elif resolution is None and pixel is not None:
        resolution = _downsampled(pixel, attrs.get("downsamplingFactors"))
    units = attrs.get("units")
    count = len(resolution) if isinstance(resolution, list) else 0
    if isinstance(units, list) and len(units) == count:
        unknown = [u for u in units if str(u or "").strip().lower() not in UNIT_TO_NM]
        if unknown:
            return stated_resolution(name, attrs, "units", _unknown_unit(unknown[0])), None
    return resolution, _unit_factors(name, units, resolution, factor)


def _unknown_unit(unit: Any) -> str:
    return f"{unit!r}: not a length unit emrun knows (nm, um, micrometer, mm, ...)"


def n5_voxel_size(name: str, ndim: int, attrs: Mapping[str, Any]) -> tuple[float, ...] | None:
    """The voxel size (nm, z, y, x) alone, whatever the offset: a pyramid's level list
    gives the one opening the level gives."""
    transformed = cosem_geometry(name, attrs)
    if transformed is not None:
        return transformed[0]
    voxel: tuple[float, ...] | None = n5_spatial(
        name, ndim, {k: v for k, v in attrs.items() if k != "offset"})[0]
    return voxel


def n5_placement(name: str, ndim: int, attrs: Mapping[str, Any], inherited: bool,
                 coarser: bool = False,
                 ) -> tuple[tuple[float, ...] | None, tuple[int, ...] | None,
                            tuple[float, ...] | None]:
    """Voxel size (nm), offset (voxels) and sub-voxel shift (nm), z, y, x, of an N5 dataset.

    A level's own offset is where its voxel 0 is, and `level_shift` moves it on. An
    `inherited` offset (the group's, paintera's) is level 0's: it must be whole voxels of
    level 0, and the level lies at it plus (f - 1) / 2 level-0 voxels, as paintera places
    it; that is whole voxels of the level (to the nearest) and a shift of less than half a
    voxel, as `ome_shift` splits an OME level's translation (the group's offset read as
    whole voxels of a coarser level refused 40 nm at 16 nm voxels). A COSEM `transform`
    gives all three itself (`transform_placement`); `coarser`: the level is not a pyramid's
    finest, whose translation may lie between its voxels."""
    transformed = cosem_geometry(name, attrs)
    if transformed is not None:
        return transform_placement(name, transformed, coarser)
    factors = attrs.get("downsamplingFactors")
    voxel = n5_voxel_size(name, ndim, attrs)
    offset_nm = _offset_nm(name, attrs) if inherited else None
    if voxel is None or offset_nm is None or not _positive_numbers(factors) or \
            not len(factors) == len(voxel) == 3:
        voxel, offset = n5_spatial(name, ndim, attrs)
        return voxel, offset, level_shift(voxel, factors)
    base = [v / f for v, f in zip(voxel, reversed(factors), strict=True)]
    whole = from_attrs(f"{name} (its group's offset, level 0's)", ndim,
                       {"voxel_size": base, "offset": offset_nm})[1] or (0, 0, 0)
    world = [(o + (f - 1) / 2) * b for o, f, b in zip(whole, reversed(factors), base,
                                                       strict=True)]
    placed = tuple(round(w / v) for w, v in zip(world, voxel, strict=True))
    shift = tuple(float(round(w - p * v, 6)) for w, p, v in zip(world, placed, voxel,
                                                                 strict=True))
    return voxel, placed, shift if any(shift) else None


Geometry = tuple[tuple[float, ...] | None, list[float], list[float]]
"""A COSEM transform read: voxel size (nm; None where its units give no size), translate
and scale (in its units), all z, y, x."""


def cosem_geometry(name: str, attrs: Mapping[str, Any]) -> Geometry | None:
    """The level's COSEM `transform` (z, y, x by its axis names), or None without one. One
    that cannot be read gives way to a stated voxel size (`unusable_voxel_size`)."""
    value = attrs.get(TRANSFORM_KEY)
    if value is None:
        return None
    try:
        return _read_transform(value)
    except ValueError as exc:
        stated = unusable_voxel_size(name, f"attribute {TRANSFORM_KEY}", str(exc))
        return _stated_geometry(stated[-3:], _level_factors(attrs))


def _level_factors(attrs: Mapping[str, Any]) -> list[float]:
    """A level's factors (z, y, x) from level 0: its `downsamplingFactors`, else its
    shape's (`Pyramid.shape_factors`), else 1 (no pyramid around it)."""
    for key in ("downsamplingFactors", SHAPE_FACTORS_KEY):
        found = attrs.get(key)
        if _positive_numbers(found) and len(found) == 3:
            return [float(f) for f in reversed(found)]
    return [1.0, 1.0, 1.0]


def _stated_geometry(stated: Sequence[float], factors: Sequence[float]) -> Geometry:
    """The geometry of a level at the stated voxel size (level 0's, nm, z, y, x) in place
    of a transform: its size times its factors, voxel 0's centre where COSEM's pyramids put
    it, (f - 1) / 2 level-0 voxels from level 0's (at the origin)."""
    scale = [float(round(v * f, 6)) for v, f in zip(stated, factors, strict=True)]
    translate = [(f - 1) / 2 * v for v, f in zip(stated, factors, strict=True)]
    return tuple(scale), translate, scale


def _read_transform(value: Any) -> Geometry:
    """`value` as a COSEM transform, or a ValueError saying what is wrong with it. Its axes
    are found by name (N5 tools list them x, y, z, numpy's z, y, x); unnamed, by its
    `order` ("C": the last three are z, y, x; "F": the first three are x, y, z)."""
    if not isinstance(value, Mapping):
        raise ValueError(f"{value!r} is not an object of axes, scale, translate and units")
    axes, units = value.get("axes"), value.get("units")
    rank = len(axes) if isinstance(axes, list) else 0
    if rank < 3 or not isinstance(units, list) or len(units) != rank:
        raise ValueError(f"needs axes, scale, translate and units of one value per axis "
                         f"(at least 3), got axes {axes!r}, units {units!r}")
    scale = _numbers(value.get("scale"), rank, "scale")
    translate = _numbers(value.get("translate", [0.0] * rank), rank, "translate")
    if not all(v > 0 for v in scale):
        raise ValueError(f"has scale {scale}, not positive sizes")
    zyx = _zyx_axes([str(a).strip().lower() for a in axes], value.get("order",
                                                                  value.get("ordering")))
    keys = [str(units[i]).strip().lower() for i in zyx]
    unknown = [units[i] for i, key in zip(zyx, keys, strict=True)
               if key not in UNIT_TO_NM and key not in NO_SIZE_UNITS]
    if unknown:
        raise ValueError(f"has unknown unit {unknown[0]!r} (expected nm, um, micrometer, ...)")
    picked = [scale[i] for i in zyx]
    voxel = None if any(key in NO_SIZE_UNITS for key in keys) else tuple(
        float(round(s * UNIT_TO_NM[key], 6)) for s, key in zip(picked, keys, strict=True))
    return voxel, [translate[i] for i in zyx], picked


def _numbers(value: Any, rank: int, key: str) -> list[float]:
    """`rank` finite numbers, or a ValueError naming `key`."""
    if not isinstance(value, list) or len(value) != rank or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            for v in value):
        raise ValueError(f"has {key} {value!r}, not one finite number per axis ({rank})")
    return [float(v) for v in value]


def _zyx_axes(names: list[str], order: Any) -> list[int]:
    """Where z, y and x are among a transform's axes."""
    if set("zyx") <= set(names) and len(set(names)) == len(names):
        return [names.index(axis) for axis in "zyx"]
    if str(order or "C").upper() == "F":
        return [2, 1, 0]
    return [len(names) - 3, len(names) - 2, len(names) - 1]


def transform_placement(name: str, geometry: Geometry, coarser: bool,
                        ) -> tuple[tuple[float, ...] | None, tuple[int, ...],
                                   tuple[float, ...] | None]:
    """Voxel size, offset (voxels) and sub-voxel shift (nm) of a COSEM transform. Its
    translate is where voxel 0's centre lies: whole voxels on a pyramid's finest level; a
    `coarser` level's carries the half-voxel shift of downsampling, split off as for an
    OME-Zarr level (`ome_shift`)."""
    voxel, translate, scale = geometry
    voxels = [t / s for t, s in zip(translate, scale, strict=True)]
    nearest = tuple(round(v) for v in voxels)
    close = all(abs(v - n) <= OFFSET_TOLERANCE for v, n in zip(voxels, nearest, strict=True))
    if close or not coarser or voxel is None:
        described = f"transform translate {translate} with scale {scale}"
        return voxel, whole_voxels(name, voxels, described, scale, "translate", ""), None
    shift = tuple(float(round((v - n) * nm, 6))
                  for v, n, nm in zip(voxels, nearest, voxel, strict=True))
    return voxel, nearest, shift


def _with_listed_transform(level: dict[str, Any], group: Mapping[str, Any],
                           name: str) -> dict[str, Any]:
    """A level's attributes with the `transform` its group's COSEM `multiscales` lists for
    it, where it carries none of its own."""
    listed = group.get("multiscales")
    if TRANSFORM_KEY in level or not isinstance(listed, list):
        return level
    for ms in listed:
        datasets = ms.get("datasets") if isinstance(ms, Mapping) else None
        for ds in datasets if isinstance(datasets, list) else ():
            if isinstance(ds, Mapping) and str(ds.get("path", "")).strip("/") == name and \
                    TRANSFORM_KEY in ds:
                return {**level, TRANSFORM_KEY: ds[TRANSFORM_KEY]}
    return level


def _offset_nm(name: str, attrs: Mapping[str, Any]) -> list[float] | None:
    """The `offset` in nm (z, y, x), or None where it is not three numbers in the units
    of a voxel size of three (n5_spatial then says what is wrong)."""
    offset = attrs.get("offset")
    factors = _resolution_and_units(name, attrs)[1]
    if not isinstance(offset, list) or factors is None or len(offset) != 3 or \
            len(factors) != 3 or not all(
            isinstance(o, int | float) and not isinstance(o, bool) for o in offset):
        return None
    return [o * f for o, f in zip(reversed(offset), factors, strict=True)]


def level_shift(voxel_size: tuple[float, ...] | None,
                factors: Any) -> tuple[float, ...] | None:
    """The half-voxel shift (nm, z, y, x) of an n5-viewer pyramid level: its voxels average
    `downsamplingFactors` (x, y, z) voxels of level 0, so its voxel 0's centre lies (f - 1) / 2
    level-0 voxels from level 0's, as an OME-Zarr level's translation says (it was placed at
    level 0's, so outputs made from s1 lay half a voxel off their input); None without a
    voxel size, without factors or at factors of 1."""
    if voxel_size is None or not isinstance(factors, list) or len(factors) != 3 or not all(
            isinstance(f, int | float) and not isinstance(f, bool) and f >= 1 for f in factors):
        return None
    shift = tuple(float(round((f - 1) / 2 * v / f, 6))
                  for f, v in zip(reversed(factors), voxel_size[-3:], strict=True))
    return shift if any(shift) else None


def _downsampled(resolution: Any, factors: Any) -> Any:
    """n5-viewer's `pixelResolution` of a pyramid's level: the full resolution's, which each
    level repeats, times the level's `downsamplingFactors` (s1 of 6 nm with [2, 2, 1] is
    12 nm; it was read as 6, so a recipe at 12 nm was refused and one at 6 nm took it)."""
    numbers = isinstance(factors, list) and all(
        isinstance(f, int | float) and not isinstance(f, bool) and f > 0 for f in factors)
    if not numbers or not isinstance(resolution, list) or len(resolution) != len(factors):
        return resolution
    return [_scaled(r, f) for r, f in zip(resolution, factors, strict=True)]


def _unit_factors(name: str, units: Any, resolution: Any, factor: float) -> list[float]:
    """nm per unit of each axis, z, y, x: `units` beside `resolution` (neuroglancer's N5
    convention, which tensorstore writes: "um" made 0.004 read as 0.004 nm), else
    ``factor`` (pixelResolution's unit, or nm)."""
    count = len(resolution) if isinstance(resolution, list) else 0
    if isinstance(units, list) and len(units) == count:
        return [unit_to_nm(name, unit) for unit in reversed(units)]
    return [factor] * count


def _scaled(value: Any, factor: float) -> Any:
    return value * factor if isinstance(value, int | float) and not isinstance(value, bool) \
        else value


@dataclass(frozen=True)
class BdvXml:
    """A BigDataViewer XML as far as read: its path, the folder its relative paths start
    from (its BasePath) and its SequenceDescription."""

    path: str
    base: str
    sequence: ET.Element


def bdv_geometry(container: str, group: str
                 ) -> tuple[list[float] | None, list[float] | None]:
    """Setup N's voxel size and its level 0's offset (both nm, x, y, z) in the
    BigDataViewer XML that names the local N5 `container`, for its group
    `setupN/timepointT`: Fiji's and BigStitcher's N5 export keep them there only. The
    voxel size is None for another group, a remote container, no such XML, or a size the XML
    does not give (unit "pixel": the image was never calibrated); the offset is None without
    a voxel size or a registration that places the view on whole voxels (`bdv_offset`)."""
    found = BDV_GROUP.fullmatch(group)
    if found is None or is_url(container):
        return None, None
    xml = find_bdv_xml(container)
    if xml is None:
        return None, None
    name = f"{container.rstrip('/')}/{group}"
    setup, timepoint = int(found.group(1)), int(found.group(2))
    voxel = _setup_voxel_size(xml, setup, name)
    if voxel is None:
        return None, None
    return voxel, bdv_offset(name, xml.path, setup, timepoint, voxel)


def find_bdv_xml(container: str) -> BdvXml | None:
    """The BigDataViewer XML whose image loader (bdv.n5) names `container`: `NAME.xml`
    beside `NAME.n5` first, then the folder's other *.xml.

    `NAME.xml` is what the export writes for `NAME.n5`, so a damaged one (cut short by a
    copy) is a VolumeError naming it: left unread, the voxel size would just be unknown and
    a recipe giving one refused the volume with nothing saying why. Any other *.xml may be
    about something else entirely, so one that cannot be read is passed over."""
    folder, name = os.path.split(os.path.abspath(container.rstrip("/")))
    own = os.path.join(folder, f"{os.path.splitext(name)[0]}.xml")
    try:
        others = sorted(entry.path for entry in os.scandir(folder)
                        if entry.name.lower().endswith(".xml") and entry.path != own)
    except OSError:
        others = []
    target = os.path.realpath(container)
    for path in ([own] if os.path.isfile(own) else []) + others[:XML_FILES]:
        xml = _read_bdv_xml(path, container if path == own else None)
        if xml is not None and _names_container(xml, target):
            return xml
    return None


def _read_bdv_xml(path: str, strict_for: str | None) -> BdvXml | None:
    """The XML at `path` read up to its SequenceDescription, or None if it is no
    BigDataViewer XML; one that cannot be read is a VolumeError where `strict_for` names
    the container it belongs to, else None. At most XML_READ_LIMIT bytes are read, and a
    document type declaration (entities, which BigDataViewer never writes) is refused."""
    parser = ET.XMLPullParser(events=("start", "end"))
    base, seen, tail = os.path.dirname(path), False, b""
    try:
        with open(path, "rb") as f:
            while f.tell() < XML_READ_LIMIT:
                chunk = f.read(min(1 << 16, XML_READ_LIMIT - f.tell()))
                if not chunk:
                    parser.close()  # a document cut short: ParseError
                    return None
                if b"<!DOCTYPE" in tail + chunk or b"<!ENTITY" in tail + chunk:
                    raise ET.ParseError("it declares a document type (entities), which a "
                                        "BigDataViewer XML never does")
                tail = chunk[-16:]
                parser.feed(chunk)
                for event, element in parser.read_events():
                    if event == "start" and not seen:
                        seen = True
                        if element.tag != "SpimData":
                            return None
                    elif event == "end" and element.tag == "BasePath":
                        base = _xml_path(base, element)
                    elif event == "end" and element.tag == "SequenceDescription":
                        return BdvXml(path, base, element)
        problem = f"no SequenceDescription in its first {XML_READ_LIMIT / 2**20:g} MB"
    except OSError as exc:
        problem = f"cannot be read: {exc.strerror or exc}"
    except ET.ParseError as exc:
        problem = f"not valid XML: {exc}"
    if strict_for is None:
        return None
    raise VolumeError(f"{path}: {problem}; it is the BigDataViewer XML of {strict_for}, "
                      "which holds its voxel size: repair it, or move it away to read the "
                      "volume without a voxel size")


def _xml_path(base: str, element: ET.Element) -> str:
    """A path element of a BigDataViewer XML (type "relative" to `base`, or "absolute")."""
    text = (element.text or "").strip()
    return text if element.get("type") == "absolute" else os.path.join(base, text)


def _names_container(xml: BdvXml, target: str) -> bool:
    """Whether the XML's image loader is a bdv.n5 one reading the container `target`."""
    loader = xml.sequence.find("ImageLoader")
    if loader is None or not str(loader.get("format", "")).startswith("bdv.n5"):
        return False
    path = loader.find("n5")
    if path is None or not (path.text or "").strip():
        return False
    return os.path.realpath(_xml_path(xml.base, path)) == target


def _setup_voxel_size(xml: BdvXml, setup: int, name: str) -> list[float] | None:
    """Setup `setup`'s voxelSize in nm (x, y, z, as the XML lists them); None where it has
    none, or no length unit (empty or "pixel"). A unit emrun does not know, or a size that
    is not three positive numbers, gives way to a stated voxel size (`unusable_voxel_size`)."""
    for view in xml.sequence.iterfind("ViewSetups/ViewSetup"):
        if _number(view.findtext("id") or "") != setup:
            continue
        size = view.find("voxelSize")
        unit = (size.findtext("unit") or "").strip() if size is not None else ""
        if size is None or unit.lower() in ("", *NO_SIZE_UNITS):
            return None
        where = f"{xml.path}: ViewSetup {setup}'s voxelSize:"
        values = (size.findtext("size") or "").split()
        numbers = [_number(v) for v in values]
        if unit.lower() not in UNIT_TO_NM:
            problem = (f"unit {unit!r} is not a length unit emrun knows (nm, µm, micrometer, "
                       "mm, ...)")
        elif len(numbers) != 3 or not all(n is not None and n > 0 for n in numbers):
            problem = f"size {' '.join(values)!r} is not three positive numbers (x y z)"
        else:
            factor = unit_to_nm(where, unit)
            return [n * factor for n in numbers if n is not None]
        return list(reversed(unusable_voxel_size(name, where, problem)[-3:]))
    return None


Affine = list[list[float]]
"""Three rows of four: x, y, z of a view's voxel (level 0) to BigDataViewer's world."""


def bdv_offset(name: str, path: str, setup: int, timepoint: int,
               voxel: list[float]) -> list[float] | None:
    """Level 0's offset (nm, x, y, z) that the XML's ViewRegistration of the view places it
    at, as BigDataViewer does: its affine's translation over its scale, whole voxels of the
    view, times the voxel size (the world's unit is BigDataViewer's own: BigStitcher's is a
    pixel's width, Fiji's export its calibration's unit, so the size is voxelSize's).
    None without a registration, or (with a warning) where it cannot be represented: a
    rotation, shear or flip, or a translation between voxels."""
    affine = _registration(name, path, setup, timepoint)
    if affine is None:
        return None
    view = f"{path}: the registration of setup {setup}, timepoint {timepoint}"
    scale = [affine[i][i] for i in range(3)]
    largest = max(abs(v) for row in affine for v in row[:3])
    if any(abs(affine[i][j]) > 1e-9 * largest for i in range(3) for j in range(3) if i != j) \
            or not all(v > 0 for v in scale):
        rows = "; ".join(" ".join(f"{v:g}" for v in row) for row in affine)
        ignored(name, f"{view} (affine {rows}) rotates, shears or flips the view, which emrun "
                "cannot represent: ignored, the volume lies at its origin")
        return None
    ratios = [s / v for s, v in zip(scale, voxel, strict=True)]
    if not all(math.isclose(r, ratios[0], rel_tol=1e-4) for r in ratios):
        ignored(name, f"{view} scales x y z by {' '.join(f'{v:g}' for v in scale)}, unlike "
                f"its voxelSize ({' '.join(f'{v:g}' for v in voxel)} nm): its scale is ignored "
                "(voxelSize gives the voxel size)")
    voxels = [row[3] / s for row, s in zip(affine, scale, strict=True)]
    nearest = [round(v) for v in voxels]
    if any(abs(v - n) > OFFSET_TOLERANCE for v, n in zip(voxels, nearest, strict=True)):
        ignored(name, f"{view} translates the view by {' '.join(f'{v:g}' for v in voxels)} "
                "voxels (x y z), not whole voxels: ignored, the volume lies at its origin")
        return None
    return [n * v for n, v in zip(nearest, voxel, strict=True)]


def _registration(name: str, path: str, setup: int, timepoint: int) -> Affine | None:
    """The affine of the view's ViewRegistration in the XML at `path` (its ViewTransforms
    concatenated, the first listed applied last, as BigDataViewer does), or None where it
    lists none. At most XML_READ_LIMIT bytes are read; registrations past them, or that
    cannot be read, are passed over with a warning (the voxel size came before them)."""
    parser = ET.XMLPullParser(events=("end",))
    try:
        with open(path, "rb") as f:
            while f.tell() < XML_READ_LIMIT:
                chunk = f.read(min(1 << 16, XML_READ_LIMIT - f.tell()))
                if not chunk:
                    parser.close()
                    return None
                parser.feed(chunk)
                for _, element in parser.read_events():
                    if element.tag == "ViewRegistrations":
                        return None
                    if element.tag == "ViewRegistration" and \
                            _number(element.get("setup", "")) == setup and \
                            _number(element.get("timepoint", "")) == timepoint:
                        return _concatenated(element)
                    if element.tag == "ViewRegistration":
                        element.clear()
        problem = f"lie past its first {XML_READ_LIMIT / 2**20:g} MB"
    except (OSError, ET.ParseError, ValueError) as exc:
        problem = f"cannot be read ({exc})"
    ignored(name, f"{path}: its ViewRegistrations {problem}: ignored, the volume lies at its "
            "origin")
    return None


def _concatenated(registration: ET.Element) -> Affine:
    """A ViewRegistration's affines multiplied in order (each applies before the one above
    it); a ValueError where one is not twelve numbers."""
    model = [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]]
    for transform in registration.iterfind("ViewTransform"):
        text = (transform.findtext("affine") or "").split()
        values = [_number(v) for v in text]
        if len(values) != 12 or any(v is None for v in values):
            raise ValueError(f"affine {' '.join(text)!r} is not twelve numbers")
        rows = [[float(v or 0.0) for v in values[i * 4:i * 4 + 4]] for i in range(3)]
        model = [[sum(model[i][k] * rows[k][j] for k in range(3)) + (model[i][3] if j == 3
                                                                      else 0.0)
                  for j in range(4)] for i in range(3)]
    return model


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def list_datasets(container: str, under: str | None = None) -> str:
    """The datasets of a local N5 container (folders whose attributes.json has dimensions);
    a remote store cannot be listed."""
    if is_url(container):
        return "(a remote store cannot be listed)"
    import json

    top = os.path.join(container, under) if under else container
    names: list[str] = []
    for folder, subfolders, files in os.walk(top):
        subfolders.sort()
        if "attributes.json" in files and folder != container:
            try:
                with open(os.path.join(folder, "attributes.json"), encoding="utf-8") as f:
                    if "dimensions" in json.load(f):
                        names.append(os.path.relpath(folder, container).replace(os.sep, "/"))
                        subfolders.clear()  # a dataset's folders are its chunks
            except (OSError, ValueError):
                continue
        if len(names) > 120:
            break
    return format_names(names)
