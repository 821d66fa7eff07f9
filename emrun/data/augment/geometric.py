"""Geometric augmentations: they move voxels, so image, labels, mask and semantic volumes move
together. Each one plans its random parameters for a requested output and says which input
it needs (spec propagation): a flip/transpose permutes the shape, a warp asks for the bounding
box of the inverse-mapped output patch, a misalignment for the displacement as margin, a lost
section for the extra sections. The input is read once at that size and cropped, never padded.

Labels, masks and semantic volumes are never interpolated: they are gathered at the nearest
source voxel with integer indices, so only original ids appear (uint64 ids above 2^53
included) and they stay aligned with the image.

Builders registered here: ``flip_rotate``, ``warp``, ``misalign``, ``misalign_missing``,
``lost_section``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ...geometry import Zyx, zyx
from ...recipe.augment import (
    WARP_MARGIN,
    FlipRotate,
    LostSection,
    Misalign,
    MisalignBase,
    MisalignMissing,
    warp_read_side,
)
from ...recipe.augment import Warp as WarpSpec
from ...registry import augmentations
from .base import Augmentation, Context, Sample, Step

Array = np.ndarray
Yx = tuple[int, int]  # (y, x): a section crop's corner in the input, or a displacement

# ---------------------------------------------------------------------------------------------
# flip_rotate


_IN_PLANE = ((0, 1, 2), (0, 2, 1))
_ALL_AXES = tuple(itertools.permutations(range(3)))


@augmentations.implement("flip_rotate")
class FlipRotateAugment(Augmentation):
    """One of the 16 flip/transpose variants (flip z, y, x; transpose y/x), or of all 48
    (any axis permutation times any flips) with ``isotropic``, each equally likely; only
    those that swap axes of the same voxel size, where the source's is known.

    The output is ``transpose(flip(input), perm)``, so output axis i is input axis
    ``perm[i]`` and the input shape is the output shape permuted back; a non-cubic patch
    therefore gets an input of the matching shape (e.g. out (8, 32, 64) transposed y/x reads
    (8, 64, 32)). Outputs are C-contiguous copies (no negative strides reach later stages).
    """

    spec: FlipRotate

    def variants(self) -> int:
        return (len(_ALL_AXES) if self.spec.isotropic else len(_IN_PLANE)) * 8

    def largest_input(self, out_shape: Zyx, context: Context) -> Zyx:
        if self.spec.isotropic:
            return zyx((max(out_shape),) * 3)
        side = max(out_shape[1:])
        return (out_shape[0], side, side)

    def plan(self, rng: np.random.Generator, out_shape: Zyx, context: Context) -> Step:
        perms = _same_sizes(_ALL_AXES if self.spec.isotropic else _IN_PLANE,
                            context.voxel_size)
        index = int(rng.integers(len(perms) * 8))
        perm = perms[index // 8]
        flips = tuple(bool(index >> axis & 1) for axis in range(3))
        in_shape = [0, 0, 0]
        for out_axis, in_axis in enumerate(perm):
            in_shape[in_axis] = out_shape[out_axis]
        if perm == (0, 1, 2) and not any(flips):
            return Step(self.name, out_shape, lambda sample: sample)
        slicer = tuple(slice(None, None, -1) if f else slice(None) for f in flips)

        def transform(a: Array) -> Array:
            return np.ascontiguousarray(a[slicer].transpose(perm))

        return Step(self.name, zyx(in_shape),
                    lambda sample: sample.map_geometric(transform, transform))


def _same_sizes(perms: tuple[tuple[int, ...], ...],
                voxel_size: tuple[float, float, float] | None) -> tuple[tuple[int, ...], ...]:
    """The axis orders that move no axis onto one of another voxel size: a y/x transpose of
    a source 4 x 6 nm in y/x (or z with y and x, ``isotropic``, of a source that is not)
    made a patch of another resolution than the data's, and its distance and LSD targets,
    measured with the source's voxel size, wrong. All of them where the size is unknown."""
    if voxel_size is None:
        return perms
    return tuple(p for p in perms if all(voxel_size[a] == voxel_size[b]
                                         for a, b in zip(p, range(3), strict=True)))


# ---------------------------------------------------------------------------------------------
# warp

MARGIN = WARP_MARGIN  # source pixels kept around the inverse-mapped patch (the recipe's
# checks compute a warp's smallest read with the same margin)


@augmentations.implement("warp")
class WarpAugment(Augmentation):
    """In-plane projective deformation, the same for every section unless twisted.

    Parameters drawn per sample (all in ``plan``): rotation angle in [-rot_max, rot_max]
    degrees, shear factor in [-shear_max, shear_max], scale factor in ``scale`` (content is
    magnified by it: > 1 zooms in), perspective stretch t in [0, stretch_max] towards a random
    direction, and twist in [-twist_max, twist_max] degrees: section z is rotated by
    ``angle + twist * (z / (Z - 1) - 1/2)``, so the rotation changes linearly from the bottom
    to the top section by ``twist`` in total.

    Output pixel (y, x), centred as u = x - (W-1)/2, v = y - (H-1)/2, is taken from the source
    position (centred on the input's centre)::

        (sx, sy) = R(angle_z) @ [[1, shear], [0, 1]] @ (u, v) / (scale * q),
        q = 1 + t * (cos(phi) * u + sin(phi) * v) / r,  r = max(H, W) / 2

    (q > 0.29 everywhere as t <= 0.5: edges towards phi are magnified by up to 1 + t, the
    opposite ones shrunk). A projective map sends the output rectangle to a convex
    quadrilateral, so the input (y, x) size is the bounding box of the mapped corners over all
    sections plus ``MARGIN`` pixels each side, and one more where needed to give it the
    output's parity (`warp_read_side`: a warp near the identity maps voxels onto voxels); z
    is unchanged. The image is interpolated
    bilinearly (``torch.nn.functional.grid_sample``); labels, mask and semantic volumes take
    the source voxel nearest to the same position (integer gather, any integer dtype).
    """

    spec: WarpSpec

    def largest_input(self, out_shape: Zyx, context: Context) -> Zyx:
        """Bound: any corner maps within |M| |c| / q of the centre, with |M| <= (1 + shear)
        / scale_min (rotation, shear, scale) and q >= 1 - sqrt(2) stretch (perspective)."""
        s = self.spec
        nz, h, w = out_shape
        half_diagonal = math.hypot(h - 1, w - 1) / 2
        reach = half_diagonal * (1 + s.shear_max) / s.scale[0] / (1 - math.sqrt(2) * s.stretch_max)
        side = math.ceil(2 * reach) + 1 + 2 * MARGIN
        return (nz, side + (side - h) % 2, side + (side - w) % 2)  # as warp_read_side

    def plan(self, rng: np.random.Generator, out_shape: Zyx, context: Context) -> Step:
        s = self.spec
        angle = math.radians(rng.uniform(-s.rot_max, s.rot_max))
        shear = rng.uniform(-s.shear_max, s.shear_max)
        scale = rng.uniform(s.scale[0], s.scale[1])
        stretch = rng.uniform(0.0, s.stretch_max)
        phi = rng.uniform(0.0, 2 * math.pi)
        twist = math.radians(rng.uniform(-s.twist_max, s.twist_max))
        nz, h, w = out_shape
        angles = np.full(1, angle) if twist == 0 or nz == 1 else (
            angle + twist * (np.arange(nz) / (nz - 1) - 0.5))
        # (n, 2, 2) matrices acting on (u, v) / q, giving (sx, sy)
        cos, sin = np.cos(angles), np.sin(angles)
        matrices = np.stack([np.stack([cos, cos * shear - sin], -1),
                             np.stack([sin, sin * shear + cos], -1)], -2) / scale
        r = max(h, w) / 2
        persp = (stretch * math.cos(phi) / r, stretch * math.sin(phi) / r)
        corners_u = np.array([-1, 1, -1, 1]) * (w - 1) / 2
        corners_v = np.array([-1, -1, 1, 1]) * (h - 1) / 2
        q = 1 + persp[0] * corners_u + persp[1] * corners_v
        mapped = matrices @ np.stack([corners_u / q, corners_v / q])  # (n, 2, 4)
        extent_x, extent_y = np.abs(mapped).max(axis=(0, 2))
        in_h, in_w = warp_read_side(extent_y, h), warp_read_side(extent_x, w)
        warp = _Warp((nz, h, w), (in_h, in_w), matrices.astype(np.float32), persp)
        return Step(self.name, (nz, in_h, in_w), warp)


def _bilinear(source: torch.Tensor, sampling: torch.Tensor) -> Array:
    """``source`` (n, c, y, x) sampled bilinearly at ``sampling`` (n, h, w, 2), normalised
    positions with -1 and 1 at the edge pixels' centres, the edge value beyond them."""
    out = F.grid_sample(source, sampling, mode="bilinear", padding_mode="border",
                        align_corners=True)
    return out.numpy()


class _Warp:
    """A planned warp; its coordinates are computed once per sample and shared by the image
    and every label-like volume."""

    def __init__(self, out_shape: Zyx, in_yx: tuple[int, int], matrices: Array,
                 persp: tuple[float, float]) -> None:
        self.out_shape, self.in_yx, self.matrices, self.persp = out_shape, in_yx, matrices, persp
        self._base: tuple[Array, Array] | None = None
        self._index: Array | None = None

    def __call__(self, sample: Sample) -> Sample:
        return sample.map_geometric(self.image, self.nearest)

    def base(self) -> tuple[Array, Array]:
        """Centred output coordinates u, v divided by the perspective factor q, (H*W,) each."""
        if self._base is None:
            _, h, w = self.out_shape
            u = np.arange(w, dtype=np.float32) - np.float32((w - 1) / 2)
            v = np.arange(h, dtype=np.float32) - np.float32((h - 1) / 2)
            q = (np.float32(self.persp[0]) * u[None, :]
                 + (np.float32(self.persp[1]) * v[:, None] + np.float32(1)))
            self._base = (np.divide(u[None, :], q).ravel(), np.divide(v[:, None], q).ravel())
        return self._base

    def image(self, image: Array) -> Array:
        _, h, w = self.out_shape
        in_h, in_w = self.in_yx
        source = np.ascontiguousarray(image, dtype=np.float32)
        if not source.flags.writeable:  # torch.from_numpy warns on read-only arrays
            source = source.copy()
        # align_corners=True: -1..1 spans the pixel centres 0..size-1, so a position relative
        # to the input's centre is normalised by dividing it by (size - 1) / 2
        norm = np.array([[2 / (in_w - 1)], [2 / (in_h - 1)]])
        u, v = self.base()
        uv = np.stack([u, v], axis=-1)
        grid = np.empty((len(self.matrices), h * w, 2), dtype=np.float32)
        for z, matrix in enumerate(self.matrices):  # one section at a time: stays in cache
            np.dot(uv, (matrix * norm).T.astype(np.float32), out=grid[z])
        sampling = torch.from_numpy(grid).view(-1, h, w, 2)
        if len(self.matrices) == 1:
            # one map for all sections: the sections as channels of one image, so torch
            # computes each position's weights once, not per section (the same values, a
            # third of the time); a twist maps each section its own way: one image each
            return _bilinear(torch.from_numpy(source)[None], sampling)[0]
        return _bilinear(torch.from_numpy(source)[:, None], sampling)[:, 0]

    def index(self) -> Array:
        """Flat indices of the nearest source voxels: (H*W,) into each section without twist,
        else (Z, H*W) into the whole (z, y, x) input."""
        if self._index is None:
            in_h, in_w = self.in_yx
            u, v = self.base()
            n = len(self.matrices)
            index = np.empty((n, u.size), dtype=np.intp)
            for z, ((axx, axy), (ayx, ayy)) in enumerate(self.matrices.tolist()):
                # round to nearest: + 0.5 and truncate (positions are >= MARGIN - 0.5 > 0)
                x = u * np.float32(axx)
                x += v * np.float32(axy)
                x += np.float32((in_w - 1) / 2 + 0.5)
                y = u * np.float32(ayx)
                y += v * np.float32(ayy)
                y += np.float32((in_h - 1) / 2 + 0.5)
                np.clip(x, 0, in_w - 1, out=x)  # a safety net: the margin keeps them inside
                np.clip(y, 0, in_h - 1, out=y)
                row = index[z]
                row[:] = y.astype(np.int32)
                row *= in_w
                row += x.astype(np.int32)
                if n > 1:
                    row += z * in_h * in_w
            self._index = index[0] if n == 1 else index
        return self._index

    def nearest(self, volume: Array) -> Array:
        nz, h, w = self.out_shape
        index = self.index()
        if index.ndim == 1:
            return np.take(volume.reshape(nz, -1), index, axis=1).reshape(nz, h, w)
        return np.take(volume.reshape(-1), index).reshape(nz, h, w)


# ---------------------------------------------------------------------------------------------
# misalign, misalign_missing, lost_section


def _pixel_scale(spec: MisalignBase, context: Context) -> float:
    """Factor turning the spec's displacement pixels into pixels of this sample's source."""
    return spec.pixel_scale(context.voxel_size)


def _displacement(spec: MisalignBase, rng: np.random.Generator, context: Context) -> Yx:
    """A (dy, dx) of magnitude drawn in the (scaled) range and a uniform direction."""
    factor = _pixel_scale(spec, context)
    magnitude = rng.uniform(spec.displacement[0] * factor, spec.displacement[1] * factor)
    direction = rng.uniform(0.0, 2 * math.pi)
    return round(magnitude * math.sin(direction)), round(magnitude * math.cos(direction))


def _crop_sections(volume: Array, out_yx: tuple[int, int], offsets: Sequence[Yx | None],
                   fill: float = 0) -> Array:
    """Section z of the result is ``volume[z]`` cropped to ``out_yx`` at ``offsets[z]``
    (``None``: filled with ``fill``). Runs of equal offsets are copied in one go."""
    h, w = out_yx
    out = np.empty((len(offsets), h, w), dtype=volume.dtype)
    start = 0
    for stop in range(1, len(offsets) + 1):
        if stop < len(offsets) and offsets[stop] == offsets[start]:
            continue
        offset = offsets[start]
        if offset is None:
            out[start:stop] = fill
        else:
            y, x = offset
            out[start:stop] = volume[start:stop, y:y + h, x:x + w]
        start = stop
    return out


def _misalign_step(name: str, out_shape: Zyx, shift: Yx,
                   image_offsets: Callable[[Yx, Yx], list[Yx | None]],
                   other_offsets: Callable[[Yx, Yx], list[Yx | None]]) -> Step:
    nz, h, w = out_shape
    dy, dx = shift
    base = (max(0, -dy), max(0, -dx))
    moved = (base[0] + dy, base[1] + dx)
    image_at, other_at = image_offsets(base, moved), other_offsets(base, moved)

    def apply(sample: Sample) -> Sample:
        return sample.map_geometric(lambda a: _crop_sections(a, (h, w), image_at),
                                    lambda a: _crop_sections(a, (h, w), other_at))

    return Step(name, (nz, h + abs(dy), w + abs(dx)), apply)


@augmentations.implement("misalign")
class MisalignAugment(Augmentation):
    """Translational misalignment at one z position, by a whole number of pixels.

    ``step``: every section from a random interface k (1 <= k < Z) upwards is displaced by
    (dy, dx); ``slip``: one random section is displaced; ``both``: either, equally likely.
    The magnitude is drawn uniformly in ``displacement`` (times ``voxel_reference /
    voxel_size_x`` when both are known), the direction uniformly, then rounded to pixels.
    The input is the output plus |dy|, |dx| in y, x: unmoved sections are cropped at one
    corner of it, moved ones at the corner offset by (dy, dx), so every voxel is real data.

    Labels, mask and semantic volumes move with the image (same crops), unless ``interp``:
    then every section of them is cropped at the unmoved corner, i.e. they keep the aligned
    geometry of the tissue while the image of the moved sections is displaced by (dy, dx)
    against them. The network must then predict the aligned segmentation through the
    misalignment: for a slip, label continuity across the slipped section is the one the
    tissue really has; for a step, the sections above the interface are labelled in the
    frame of the sections below it.
    """

    spec: Misalign

    def largest_input(self, out_shape: Zyx, context: Context) -> Zyx:
        return _largest_shift(self.spec, out_shape, context)

    def plan(self, rng: np.random.Generator, out_shape: Zyx, context: Context) -> Step:
        nz = out_shape[0]
        if nz < 2:
            raise ValueError(f"misalign needs at least 2 sections, got a patch of {nz}")
        mode = self.spec.mode
        coin = rng.random()
        if mode == "both":
            mode = "step" if coin < 0.5 else "slip"
        where = int(rng.integers(1, nz)) if mode == "step" else int(rng.integers(nz))
        shift = _displacement(self.spec, rng, context)
        moves = [z >= where if mode == "step" else z == where for z in range(nz)]

        def image_at(base: Yx, moved: Yx) -> list[Yx | None]:
            return [moved if m else base for m in moves]

        def other_at(base: Yx, moved: Yx) -> list[Yx | None]:
            return [base] * nz if self.spec.interp else image_at(base, moved)

        return _misalign_step(self.name, out_shape, shift, image_at, other_at)


def _largest_shift(spec: MisalignBase, out_shape: Zyx, context: Context) -> Zyx:
    reach = math.ceil(spec.displacement[1] * _pixel_scale(spec, context)) + 1
    return (out_shape[0], out_shape[1] + reach, out_shape[2] + reach)


@augmentations.implement("misalign_missing")
class MisalignMissingAugment(Augmentation):
    """A misalignment step with n missing sections (1 <= n <= ``missing_max``, fewer when
    the patch has fewer than n + 2 sections) at the interface.

    Sections [0, k) are unmoved, [k, k + n) are missing and [k + n, Z) are displaced, with
    1 <= k and k + n <= Z - 1 so that real sections show on both sides. The image of a
    missing section is filled with 0 (black, as alignment pipelines fill absent sections).
    Labels, mask and semantic volumes of a missing section are that section's own labels
    (the tissue is there, only its image is lost), cropped in the frame of the nearer intact
    side, the lower one on a tie: one missing section follows the lower side; of two, the
    lower follows the lower side and the upper the upper side. So the labels' step lies in
    the middle of the gap and the network learns to bridge it to the nearer side.
    """

    spec: MisalignMissing

    def largest_input(self, out_shape: Zyx, context: Context) -> Zyx:
        return _largest_shift(self.spec, out_shape, context)

    def plan(self, rng: np.random.Generator, out_shape: Zyx, context: Context) -> Step:
        nz = out_shape[0]
        if nz < 3:
            raise ValueError(f"misalign_missing needs at least 3 sections, got a patch of {nz}")
        missing = min(int(rng.integers(1, self.spec.missing_max + 1)), nz - 2)
        first = int(rng.integers(1, nz - missing))
        shift = _displacement(self.spec, rng, context)
        gap = range(first, first + missing)

        def image_at(base: Yx, moved: Yx) -> list[Yx | None]:
            return [None if z in gap else moved if z >= first else base for z in range(nz)]

        def other_at(base: Yx, moved: Yx) -> list[Yx | None]:
            # nearer side: distance below = z - first + 1, above = first + missing - z
            return [moved if z - first + 1 > first + missing - z else base for z in range(nz)]

        return _misalign_step(self.name, out_shape, shift, image_at, other_at)


@augmentations.implement("lost_section")
class LostSectionAugment(Augmentation):
    """Drops n consecutive sections (1 <= n <= ``max_sections``) so the content jumps.

    The input has Z + n sections; sections [p, p + n) are removed from image, labels, mask
    and semantic volumes alike, with 1 <= p <= Z - 1 (at least one section kept on each side;
    for a one-section patch the kept section is the first or the last)."""

    spec: LostSection

    def largest_input(self, out_shape: Zyx, context: Context) -> Zyx:
        return (out_shape[0] + self.spec.max_sections, out_shape[1], out_shape[2])

    def plan(self, rng: np.random.Generator, out_shape: Zyx, context: Context) -> Step:
        nz, h, w = out_shape
        lost = int(rng.integers(1, self.spec.max_sections + 1))
        where = int(rng.integers(1, nz)) if nz >= 2 else int(rng.integers(2))

        def drop(a: Array) -> Array:
            return np.concatenate((a[:where], a[where + lost:]), axis=0)

        return Step(self.name, (nz + lost, h, w), lambda sample: sample.map_geometric(drop, drop))
