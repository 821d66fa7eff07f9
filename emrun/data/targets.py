"""Training targets, computed per sample after augmentation from the augmented label patch.

Every target is a callable ``target(patch) -> (target, mask)`` returning two arrays of
shape ``(channels, z, y, x)``: the values to learn and where they count in the loss (1) or
are excluded (0). The mask, and the target of 0/1 targets, are uint8 holding 0/1: that
keeps samples small on their way from loader workers to the trainer, which casts them to
float on the device; regression targets (lsd, distance) are float16, which is how they
travel anyway (values in [-1, 1]: error below 2.5e-4; casting 13 M float32 values costs
more than computing them in float16 form). Builders are
registered in :data:`emrun.registry.targets` when this module is imported, so
``targets.build(spec)`` finds them once it is.

Conventions (the README's "Conventions"): axes z, y, x; label 0 means unlabelled; a patch
mask is non-zero where voxels are valid, ``None`` meaning all valid.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import edt
import numpy as np
from scipy import ndimage

from ..components import components
from ..errors import UserError
from ..io.masks import inside
from ..recipe.tasks import (
    AffinityTarget,
    BinaryTarget,
    BoundaryTarget,
    DistanceTarget,
    LSDTarget,
    SynapseTarget,
)
from ..registry import targets
from .lsd import auto_factor, local_shape_descriptors

__all__ = [
    "Affinity",
    "Binary",
    "Boundary",
    "Distance",
    "LocalShapeDescriptors",
    "Patch",
    "Synapse",
    "Target",
    "build_affinity",
    "build_binary",
    "build_boundary",
    "build_distance",
    "build_lsd",
    "build_synapse",
    "relabel_components",
    "semantic_needs",
]

# In-plane (y/x) 3x3 neighbourhood, one section thick: dilation never crosses sections.
_IN_PLANE = np.ones((1, 3, 3), dtype=bool)


@dataclass(frozen=True)
class Patch:
    """What a target sees: one augmented sample, numpy, axes z, y, x.

    ``labels``: integer ids, 0 = unlabelled. ``mask``: non-zero where voxels are valid
    (``None`` = all valid). ``semantic``: named integer/bool volumes, e.g. 'mito', 'synapse'.
    ``voxel_size``: nm, z, y, x, of the source (None = unknown), for targets in nm.
    """

    labels: np.ndarray | None = None
    mask: np.ndarray | None = None
    semantic: Mapping[str, np.ndarray] = field(default_factory=dict)
    voxel_size: tuple[float, float, float] | None = None


class Target(Protocol):
    """A training target: ``channels`` outputs, computed from a :class:`Patch`."""

    channels: int

    def __call__(self, patch: Patch) -> tuple[np.ndarray, np.ndarray]:
        """``(target, mask)``, ``(channels, z, y, x)``: target uint8 0/1 or float16, mask
        uint8 0/1 (1 = counted in the loss)."""
        ...


# --------------------------------------------------------------------------- helpers


def _check_3d(name: str, array: np.ndarray, shape: tuple[int, ...] | None = None) -> None:
    if array.ndim != 3:
        raise ValueError(f"{name} must be a 3D (z, y, x) array, got shape {array.shape}")
    if shape is not None and array.shape != shape:
        raise ValueError(f"{name} has shape {array.shape}, expected {shape} (the patch shape)")


def _labels(patch: Patch, what: str) -> np.ndarray:
    """The patch's labels, checked: 3D, integer (or bool) ids."""
    labels = patch.labels
    if labels is None:  # a training source without labels: the recipe's to fix
        raise UserError(f"the {what} target needs labels, and a training source has none: "
                        "give each source in data.sources its `labels` (a source of images "
                        "only cannot train this task)")
    labels = np.asarray(labels)
    _check_3d("labels", labels)
    if labels.dtype.kind not in "biu":
        raise ValueError(f"labels must be integer ids, got dtype {labels.dtype}")
    return labels


def _valid(patch: Patch, shape: tuple[int, ...]) -> np.ndarray | None:
    """The patch mask as bool (non-zero = valid), or None when every voxel is valid."""
    if patch.mask is None:
        return None
    mask = np.asarray(patch.mask)
    _check_3d("mask", mask, shape)
    return mask if mask.dtype == bool else inside(mask)


def _semantic(patch: Patch, name: str, what: str) -> np.ndarray:
    """The named semantic volume, checked against the patch shape."""
    if name not in patch.semantic:
        have = ", ".join(sorted(patch.semantic)) or "none"
        raise ValueError(
            f"{what} target needs the semantic volume {name!r}, but the patch has "
            f"no such volume (has: {have})"
        )
    volume = np.asarray(patch.semantic[name])
    shape = patch.labels.shape if patch.labels is not None else None
    _check_3d(f"semantic volume {name!r}", volume, shape)
    return volume


def _voxel_size(patch: Patch, what: str) -> tuple[float, float, float]:
    """The patch's voxel size, which targets measured in nm need."""
    if patch.voxel_size is None:
        raise ValueError(f"{what} target needs the source's voxel size (nm); give the source "
                         "a `voxel_size`")
    return tuple(float(v) for v in patch.voxel_size)  # type: ignore[return-value]


def _mask_channel(valid: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    """A (1, z, y, x) uint8 loss mask from the patch mask."""
    if valid is None:
        return np.ones((1, *shape), dtype=np.uint8)
    return valid.astype(np.uint8)[None]


def _overlap(
    shape: Sequence[int], offset: Sequence[int]
) -> tuple[tuple[slice, ...], tuple[slice, ...]] | None:
    """Slices ``(at_p, at_p_plus_offset)`` over the voxels p with p + offset in the patch.

    None when no such voxel exists (|offset| >= size along some axis).
    """
    here, there = [], []
    for n, d in zip(shape, offset, strict=True):
        if abs(d) >= n:
            return None
        if d >= 0:
            here.append(slice(0, n - d))
            there.append(slice(d, n))
        else:
            here.append(slice(-d, n))
            there.append(slice(0, n + d))
    return tuple(here), tuple(there)


def _zero_outside(array: np.ndarray, box: tuple[slice, ...]) -> None:
    """Set ``array`` to 0 outside ``box`` (slices with explicit start and stop), in place."""
    view = array
    for axis, s in enumerate(box):
        lead = (slice(None),) * axis
        view[(*lead, slice(0, s.start))] = 0
        view[(*lead, slice(s.stop, None))] = 0
        view = view[(*lead, s)]


def _compact(labels: np.ndarray, top: int | None = None) -> np.ndarray:
    """The same ids in the narrowest of uint16/uint32 that holds them (comparisons read less
    memory), or ``labels`` unchanged. ``top``: the largest id, when already known."""
    if labels.dtype.itemsize <= 2 or labels.size == 0:
        return labels
    if top is None:
        if labels.dtype.kind == "i" and labels.min() < 0:
            return labels
        top = int(labels.max())
    if top < 2**16:
        return labels.astype(np.uint16)
    if top < 2**32 and labels.dtype.itemsize > 4:
        return labels.astype(np.uint32)
    return labels


def relabel_components(labels: np.ndarray) -> np.ndarray:
    """Connected components of each id (6-connectivity), numbered 1..N; 0 stays 0.

    Two pieces of one id that touch only across an edge or a corner become different ids.
    The output is uint16 when N < 2**16, else uint32 or uint64 (cc3d's choice).
    """
    pieces, n = components(labels, connectivity=6, return_N=True)
    return _compact(pieces, top=int(n))


# --------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Affinity:
    """Affinities, one channel per zyx offset (DeepEM / waterz convention).

    Channel c at voxel p: target 1 when ``labels[p] == labels[p + offset_c]``, 0 when they
    differ; mask 1 only where both ends lie inside the patch, are labelled (non-zero) and
    are valid in the patch mask. Where the mask is 0 the target is 0 too. With
    ``zero="boundary"`` label 0 is membrane rather than unknown: pairs touching it count,
    with target 0 (DeepEM's convention for data whose cells are separated by 0-labelled
    gaps, like SNEMI3D; otherwise nearest-neighbour channels would see no negatives). With
    ``relabel``,
    the labels are first replaced by their 6-connected components inside the patch (label 0
    stays 0), so pieces of one id that the crop disconnected count as different objects.
    """

    offsets: tuple[tuple[int, int, int], ...]
    relabel: bool = True
    zero: str = "mask"

    @property
    def channels(self) -> int:
        return len(self.offsets)

    def __call__(self, patch: Patch) -> tuple[np.ndarray, np.ndarray]:
        labels = _labels(patch, "affinity")
        valid = _valid(patch, labels.shape)
        labels = relabel_components(labels) if self.relabel else _compact(labels)
        labelled = labels != 0
        # A voxel may be an end of a counted pair when it is inside the mask and, unless 0
        # means membrane, labelled (None: every voxel may).
        if self.zero == "boundary":
            usable = None if valid is None else valid.astype(bool)
        else:
            usable = labelled if valid is None else labelled & valid
        shape = labels.shape
        target = np.empty((self.channels, *shape), dtype=np.uint8)
        mask = np.empty((self.channels, *shape), dtype=np.uint8)
        flat = _Flat(np.ascontiguousarray(labels).reshape(-1),
                     None if usable is None else np.ascontiguousarray(usable).reshape(-1),
                     labelled.reshape(-1) if self.zero == "boundary" else None)
        for c, offset in enumerate(self.offsets):
            pair = _overlap(shape, offset)
            if pair is None:  # p + offset is outside the patch everywhere
                target[c] = 0
                mask[c] = 0
                continue
            # written in place as bool views of the uint8 channels: one pass per operation
            # over the large outputs, no bool map copied in after
            same, counted = target[c].view(bool), mask[c].view(bool)
            flat.pairs(same.reshape(-1), counted.reshape(-1), _flat_shift(shape, offset))
            _zero_outside(same, pair[0])
            _zero_outside(counted, pair[0])
        return target, mask


def _flat_shift(shape: Sequence[int], offset: Sequence[int]) -> int:
    """How far voxel p + ``offset`` lies from p in a C-ordered array of ``shape``."""
    shift = 0
    for n, d in zip(shape, offset, strict=True):
        shift = shift * n + d
    return shift


@dataclass(frozen=True)
class _Flat:
    """A patch's labels, usable voxels (None: all) and, where 0 is membrane, labelled
    voxels, flattened (C order) for `pairs`."""

    labels: np.ndarray
    usable: np.ndarray | None
    labelled: np.ndarray | None

    def pairs(self, same: np.ndarray, counted: np.ndarray, shift: int) -> None:
        """One affinity channel, flat, for the pairs (p, p + ``shift``): ``counted`` where
        both ends are usable, ``same`` where they are counted, of one id and not membrane.

        Flat, every operation runs over one contiguous run: an x offset sliced in 3-d runs
        over rows one short, at a fifth of the speed. A pair that wraps from one row (or
        section) to the next gets a value here; only voxels p whose p + offset lies outside
        the patch do, and the caller zeroes those (as those left unwritten at either end).
        """
        size = len(self.labels)
        here = slice(max(0, -shift), size - max(0, shift))
        there = slice(here.start + shift, here.stop + shift)
        same_here, counted_here = same[here], counted[here]
        np.equal(self.labels[here], self.labels[there], out=same_here)
        if self.usable is None:
            counted_here[...] = True
        else:
            np.logical_and(self.usable[here], self.usable[there], out=counted_here)
            same_here &= counted_here
        if self.labelled is not None:
            same_here &= self.labelled[here]  # 0-0 pairs are membrane, not one object


@dataclass(frozen=True)
class Boundary:
    """Boundary map, one channel.

    A voxel is boundary (target 1) when its label is 0, or when its label differs from that
    of one of its 6 face neighbours (z +-1, y +-1, x +-1) that lies inside the patch; both
    sides of an interface are therefore marked. With ``width`` w > 1 that map is then dilated
    in-plane w - 1 times with a 1x3x3 (full square, single section) structure, so every voxel
    within in-plane chessboard distance w - 1 of such a voxel is boundary too. Everything
    else is 0. The mask is the patch mask (all 1 when it is None).
    """

    width: int = 1

    @property
    def channels(self) -> int:
        return 1

    def __call__(self, patch: Patch) -> tuple[np.ndarray, np.ndarray]:
        labels = _labels(patch, "boundary")
        valid = _valid(patch, labels.shape)
        edge = labels == 0
        for axis in range(3):
            a = [slice(None)] * 3
            b = [slice(None)] * 3
            a[axis], b[axis] = slice(None, -1), slice(1, None)
            differ = labels[tuple(a)] != labels[tuple(b)]
            edge[tuple(a)] |= differ
            edge[tuple(b)] |= differ
        if self.width > 1:
            edge = ndimage.binary_dilation(edge, structure=_IN_PLANE, iterations=self.width - 1)
        return edge.astype(np.uint8)[None], _mask_channel(valid, labels.shape)


@dataclass(frozen=True)
class Binary:
    """Foreground of a named semantic volume: target = (volume != 0), optionally dilated
    in-plane ``dilation`` times with a 1x3x3 structure; mask = the patch mask."""

    volume: str
    dilation: int = 0

    kind: ClassVar[str] = "binary"

    @property
    def channels(self) -> int:
        return 1

    def __call__(self, patch: Patch) -> tuple[np.ndarray, np.ndarray]:
        volume = _semantic(patch, self.volume, self.kind)
        valid = _valid(patch, volume.shape)
        fg = volume != 0
        if self.dilation > 0:
            fg = ndimage.binary_dilation(fg, structure=_IN_PLANE, iterations=self.dilation)
        return fg.astype(np.uint8)[None], _mask_channel(valid, volume.shape)


@dataclass(frozen=True)
class Synapse(Binary):
    """Synaptic clefts: :class:`Binary` on the named volume (default 'synapse'), dilated
    in-plane ``dilation`` times with a 1x3x3 structure."""

    volume: str = "synapse"

    kind: ClassVar[str] = "synapse"


@dataclass(frozen=True)
class LocalShapeDescriptors:
    """Local shape descriptors (see :mod:`emrun.data.lsd` for the 10 channels), float16.

    Voxels outside the patch mask are no object (their labels are not trusted); they and
    label 0 get target 0 and mask 0. The mask has one channel (the losses broadcast it).
    ``sigma`` in nm, z, y, x; ``downsample``: the block size per axis, z, y, x, or None for
    :func:`~emrun.data.lsd.auto_factor`.
    """

    sigma: tuple[float, float, float]
    downsample: tuple[int, int, int] | None = None

    @property
    def channels(self) -> int:
        return 10

    def __call__(self, patch: Patch) -> tuple[np.ndarray, np.ndarray]:
        labels = _labels(patch, "lsd")
        valid = _valid(patch, labels.shape)
        size = _voxel_size(patch, "lsd")
        if valid is not None:
            labels = np.where(valid, labels, 0)
        if self.downsample is None:
            factor = auto_factor([s / v for s, v in zip(self.sigma, size, strict=True)])
        else:
            factor = self.downsample
        target = local_shape_descriptors(labels, self.sigma, size, factor, np.float16)
        return target, (labels != 0).astype(np.uint8)[None]  # one channel: the same for all


@dataclass(frozen=True)
class Distance:
    """Distance to the nearest boundary, in nm with the patch's voxel size, float16.

    Inside an object: the Euclidean distance to the nearest voxel of another label or of
    label 0 (the patch edge is no boundary), clipped at ``clip`` and divided by it, so in
    (0, 1]; label 0 gets 0, or with ``signed`` minus its distance to the nearest labelled
    voxel, clipped likewise (in [-1, 0)). The mask is the patch mask.
    """

    clip: float
    signed: bool = False

    @property
    def channels(self) -> int:
        return 1

    def __call__(self, patch: Patch) -> tuple[np.ndarray, np.ndarray]:
        labels = _labels(patch, "distance")
        valid = _valid(patch, labels.shape)
        size = _voxel_size(patch, "distance")
        ids = np.ascontiguousarray(_compact(labels))
        inside = edt.edt(ids, anisotropy=size, black_border=False)
        target = np.minimum(inside, self.clip, dtype=np.float32) * np.float32(1 / self.clip)
        if self.signed:
            background = ids == 0
            if background.all():
                target[:] = -1.0
            elif background.any():
                outside = edt.edt(background, anisotropy=size, black_border=False)
                away = np.minimum(outside, self.clip, dtype=np.float32) / np.float32(self.clip)
                target -= away
        return target[None].astype(np.float16), _mask_channel(valid, labels.shape)


def semantic_needs(target: object) -> frozenset[str] | None:
    """The semantic volumes a built-in target reads; None for any other (a plugin's, which
    may read any)."""
    if type(target) in (Binary, Synapse):
        return frozenset({target.volume})  # type: ignore[attr-defined]
    if type(target) in (Affinity, Boundary, LocalShapeDescriptors, Distance):
        return frozenset()
    return None


# --------------------------------------------------------------------------- builders


@targets.implement("affinity")
def build_affinity(spec: AffinityTarget, **context: Any) -> Affinity:
    offsets = tuple((int(z), int(y), int(x)) for z, y, x in spec.offsets)
    return Affinity(offsets=offsets, relabel=spec.relabel, zero=spec.zero)


@targets.implement("boundary")
def build_boundary(spec: BoundaryTarget, **context: Any) -> Boundary:
    return Boundary(width=spec.width)


@targets.implement("binary")
def build_binary(spec: BinaryTarget, **context: Any) -> Binary:
    return Binary(volume=spec.volume)


@targets.implement("synapse")
def build_synapse(spec: SynapseTarget, **context: Any) -> Synapse:
    return Synapse(volume=spec.volume, dilation=spec.dilation)


@targets.implement("lsd")
def build_lsd(spec: LSDTarget, **context: Any) -> LocalShapeDescriptors:
    return LocalShapeDescriptors(sigma=spec.sigma_zyx(), downsample=spec.downsample_zyx())


@targets.implement("distance")
def build_distance(spec: DistanceTarget, **context: Any) -> Distance:
    return Distance(clip=spec.clip, signed=spec.signed)
