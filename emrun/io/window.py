"""The part of a larger volume that another one covers, found from their offsets.

`emrun infer --roi 60,0,0/10,1024,1024` writes predictions (and `emrun segment` then a
segmentation) that know where they sit: offset (60, 0, 0) in voxels. Their truth is usually
the whole annotated volume. Scoring or sweeping against it reads the box the prediction
covers, instead of asking the user to cut a copy of the truth first.

Training takes the same facts the other way round: labels annotated in a part of a larger
image (a ground-truth cutout of a large volume, CREMI's padded volumes), or of a larger region
the image is a cutout of, are read at their place in the image's voxels, and patches are drawn
where both hold data. Both are one wrapper, `Placed`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from emrun.errors import UserWarned
from emrun.geometry import Coordinate, Roi, clip, local_slices, zyx
from emrun.io.volume import Volume

__all__ = ["Placed", "covered_part", "data_box", "off_grid", "placed_in",
           "placed_over", "placement"]


@dataclass(frozen=True, kw_only=True)
class Placed(Volume):
    """A volume read in another's (the reference's) voxel coordinates, its first voxel at
    ``start`` there: negative where it begins before the reference (a larger truth or mask
    the reference is cut from), positive where it begins inside (labels of a part of a
    larger image). It has the reference's spatial shape but holds data only over
    ``extent``; reads must stay inside it (a training source samples only there)."""

    inner: Volume
    start: tuple[int, ...]
    fill: int | None = None
    """What reads outside ``extent`` give (a mask: 0, outside); None: such reads are refused."""

    def __str__(self) -> str:
        n = len(self.start)
        if self.extent.contains(Roi((0,) * n, tuple(self.shape[-n:]))):
            # the part of a larger volume: name the box read, in its own voxels
            box = ", ".join(f"{-a}-{m - a - 1}"
                            for a, m in zip(self.start, self.shape[-n:], strict=True))
            return f"{self.inner} [{box}]"
        return str(self.inner)

    @property
    def extent(self) -> Roi:
        """Where the data lie, in the reference's voxels (spatial axes)."""
        return Roi(self.start, tuple(self.inner.shape[-len(self.start):]))

    def _read(self, roi: Roi) -> np.ndarray:
        n = len(self.start)
        spatial = Roi(roi.offset[-n:], roi.shape[-n:])
        if spatial.empty:  # a read clipped to nothing (past the end): empty, as any volume's
            lead = tuple(self.inner.shape[:-n])
            return np.empty((*lead, *(int(s) for s in spatial.shape)), self.inner.dtype)
        if self.extent.contains(spatial):
            return self.inner.read(spatial.shift(-Coordinate(self.start)))
        if self.fill is None or self.inner.ndim != n:
            raise RuntimeError(f"{self}: a read of {spatial} in the reference's voxels lies "
                               f"outside its data {self.extent}")
        out = np.full(tuple(spatial.shape), self.fill, dtype=self.inner.dtype)
        part = clip(spatial, self.extent)
        if not part.empty:
            out[local_slices(part, spatial.offset)] = self.inner.read(
                part.shift(-Coordinate(self.start)))
        return out

    def attributes(self) -> dict[str, Any]:
        return self.inner.attributes()

    def container_attributes(self) -> dict[str, Any]:
        return self.inner.container_attributes()


def covered_part(reference: Volume, other: Volume) -> Volume:
    """``other`` cut to the box ``reference`` covers, when their shapes differ and their
    offsets (voxels; a volume without one starts at 0) and voxel sizes place the reference
    inside it; otherwise ``other`` unchanged (the caller's shape check then speaks)."""
    spatial = tuple(reference.shape[-3:]) if reference.ndim >= 3 else tuple(reference.shape)
    if tuple(other.shape) == spatial or other.ndim != len(spatial):
        return other
    if (reference.voxel_size is not None and other.voxel_size is not None
            and tuple(reference.voxel_size[-len(spatial):]) != tuple(other.voxel_size)):
        return other
    if reference.offset is None:
        return other
    mine = tuple(reference.offset[-len(spatial):])
    theirs = tuple(other.offset) if other.offset is not None else (0,) * len(spatial)
    start = tuple(int(b - a) for a, b in zip(mine, theirs, strict=True))
    covers = all(a <= 0 and n - a <= m
                 for a, n, m in zip(start, spatial, other.shape, strict=True))
    if not covers:
        return other
    return Placed(inner=other, start=start, path=other.path, dataset=other.dataset,
                  shape=spatial, dtype=other.dtype, voxel_size=other.voxel_size, offset=mine,
                  segmentation=other.segmentation)


def placed_over(reference: Volume, mask: Volume, box: Roi) -> Volume:
    """``mask`` in ``reference``'s voxels where their offsets place it: the part of a larger
    one (`covered_part`), or a smaller one that covers ``box`` of the reference (the mask of
    the box `emrun infer --roi` predicts), read as 0 outside its data, i.e. outside the
    mask. Otherwise unchanged (the caller's shape check then speaks)."""
    covered = covered_part(reference, mask)
    if covered is not mask:
        return covered
    start = placement(mask, reference)
    if start is None or mask.ndim != 3:
        return mask
    placed = Placed(inner=mask, start=start, path=mask.path, dataset=mask.dataset,
                    shape=tuple(reference.shape[-3:]), dtype=mask.dtype,
                    voxel_size=mask.voxel_size, offset=reference.offset, fill=0)
    return placed if placed.extent.contains(box) else mask


def placement(volume: Volume, reference: Volume) -> tuple[int, int, int] | None:
    """Where ``volume``'s first voxel lies in ``reference``'s voxels (z, y, x) when its
    spatial shape differs, both state an offset and a voxel size, those agree, and one of
    the two lies wholly inside the other; None otherwise (the shape checks then speak)."""
    mine, theirs = tuple(volume.shape[-3:]), tuple(reference.shape[-3:])
    if mine == theirs or len(mine) != 3 or len(theirs) != 3 or volume.offset is None or \
            reference.offset is None or volume.voxel_size is None or \
            reference.voxel_size is None or other_voxel_size(volume, reference) is not None:
        return None
    start = tuple(int(a) - int(b) for a, b in zip(volume.offset[-3:], reference.offset[-3:],
                                                  strict=True))
    inside = all(a >= 0 and a + n <= m for a, n, m in zip(start, mine, theirs, strict=True))
    covers = all(a <= 0 and a + n >= m for a, n, m in zip(start, mine, theirs, strict=True))
    return zyx(start) if inside or covers else None


def placed_in(volume: Volume, reference: Volume) -> Volume:
    """``volume`` read in ``reference``'s voxel coordinates (`Placed`) where `placement`
    finds it, else unchanged."""
    start = placement(volume, reference)
    if start is None:
        return volume
    shape = (*volume.shape[:-3], *reference.shape[-3:])
    return Placed(inner=volume, start=start, path=volume.path, dataset=volume.dataset,
                  shape=shape, dtype=volume.dtype, voxel_size=volume.voxel_size,
                  offset=reference.offset, segmentation=volume.segmentation)


def data_box(volumes: Sequence[Volume], box: Roi) -> Roi:
    """``box`` cut to where every `Placed` volume among ``volumes`` holds data."""
    for volume in volumes:
        if isinstance(volume, Placed):
            box = box.intersect(volume.extent)
    return box


def other_voxel_size(volume: Volume, reference: Volume
                     ) -> tuple[list[float], list[float]] | None:
    """(``volume``'s, ``reference``'s) z, y, x voxel sizes in nm when both state one and
    they differ: voxel i of one is not where voxel i of the other is. None otherwise."""
    mine, theirs = volume.voxel_size, reference.voxel_size
    if mine is None or theirs is None or len(mine[-3:]) != len(theirs[-3:]) or np.allclose(
            mine[-3:], theirs[-3:], rtol=1e-6, atol=0):
        return None
    return [float(v) for v in mine[-3:]], [float(v) for v in theirs[-3:]]


def other_offset(volume: Volume, reference: Volume) -> tuple[list[int], list[int]] | None:
    """(``volume``'s, ``reference``'s) z, y, x offsets in voxels when both are placed, have
    the same z, y, x shape and lie apart: compared voxel by voxel, one would be read against
    another box of the other. A volume without placement (TIFF, .npy) is taken to lie where
    the other does; volumes of other shapes are the shape checks' to explain. None
    otherwise."""
    if volume.offset is None or reference.offset is None or \
            tuple(volume.shape[-3:]) != tuple(reference.shape[-3:]):
        return None
    mine, theirs = [int(v) for v in volume.offset[-3:]], [int(v) for v in reference.offset[-3:]]
    return (mine, theirs) if mine != theirs else None


def shifts_apart(volume: Volume, reference: Volume) -> tuple[list[float], list[float]] | None:
    """(``volume``'s, ``reference``'s) sub-voxel shifts (nm, z, y, x; a pyramid level's
    half-voxel placement, 0 where none is stated) when both are placed on one voxel size
    and the shifts differ by more than a thousandth of a voxel; None otherwise."""
    if volume.offset is None or reference.offset is None or reference.voxel_size is None:
        return None
    mine = [float(v) for v in (volume.shift_nm or (0.0, 0.0, 0.0))[-3:]]
    theirs = [float(v) for v in (reference.shift_nm or (0.0, 0.0, 0.0))[-3:]]
    sizes = [float(v) for v in reference.voxel_size[-3:]]
    apart = any(abs(a - b) > 1e-3 * s for a, b, s in zip(mine, theirs, sizes, strict=True))
    return (mine, theirs) if apart else None


def off_grid(volume: Volume, reference: Volume, role: str, of: str, hint: str = "") -> str | None:
    """Why ``volume`` (the ``role``: mask, truth) is not on the grid of ``reference`` (named
    ``of``: "the input", "the affinities") where both state a voxel size or an offset, or
    None. The same shape alone is not the same box: another offset or resolution compared
    voxel by voxel masks or scores the wrong voxels, silently. ``hint`` ends the offset
    message (what the command does with a volume that holds the box)."""
    if (sizes := other_voxel_size(volume, reference)) is not None:
        return (f"{volume}: the {role} has voxel size {sizes[0]} nm but {of} {reference} "
                f"{sizes[1]} nm: they are not on the same grid; give a {role} on the grid of "
                f"{of} (e.g. the same level of its pyramid)")
    if (offsets := other_offset(volume, reference)) is not None:
        return (f"{volume}: the {role} lies at offset {offsets[0]} (voxels) with shape "
                f"{list(volume.shape[-3:])} but {of} {reference} at {offsets[1]} with shape "
                f"{list(reference.shape[-3:])}: it does not cover the same box; give a "
                f"{role} that holds the box of {of}{hint}, or crop both to a common box")
    if (shifts := shifts_apart(volume, reference)) is not None:  # warned, not refused: many
        warnings.warn(  # tools write pyramid levels without their half-voxel translation
            f"{volume}: the {role} lies a fraction of a voxel off the grid of {of} "
            f"{reference} (sub-voxel shifts {shifts[0]} against {shifts[1]} nm, as pyramid "
            f"levels written with and without their half-voxel translation have); it is "
            "read voxel by voxel as if on that grid", UserWarned, stacklevel=2)
    return None
