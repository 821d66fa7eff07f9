"""Photometric augmentations: they change the image only.

Labels, mask and semantic volumes pass through untouched (the very same array objects), and
the input shape equals the output shape. Each ``plan`` draws every parameter from the given
generator; bulk randomness (noise arrays) comes from ``np.random.default_rng(seed)`` with a
seed drawn in ``plan``, so one generator state always gives the same result. The planned step's
``apply`` is a small frozen dataclass (``ImageOp``) whose fields are the drawn parameters, so a
step can be inspected and logged. Images stay float32 in [0, 1]; the input array is never
modified in place.

Formulas (u ~ U(-0.5, 0.5), U(a, b) uniform):

* grayscale: ``x' = clip(x * (1 + contrast * u_c) + brightness * u_b, 0, 1) ** gamma`` with
  ``gamma = 2 ** U(-g, g)``; one draw per section (``2d``), per patch (``3d``) or either with
  equal chance (``mix``).
* missing_section: ``n ~ U{1..max_sections}`` sections (distinct, or one run when
  ``consecutive``) set to ``value`` (``fill: constant``) or to U(0, 1) noise (``fill: random``).
* blurry_section: ``n ~ U{1..max_sections}`` distinct sections, each blurred in 2D by a Gaussian
  with ``sigma ~ U(0, sigma_max]`` (reflect boundary, radius ``round(4 sigma)``: the same filter
  as ``scipy.ndimage.gaussian_filter``, computed in the DCT domain, see ``blur_sections``).
* box: boxes of ``z_size`` x ``size`` x ``size`` voxels (y and x sides drawn independently)
  at uniform positions, clipped where they stick out, so every voxel is equally likely covered:
  a box of size s covers a given voxel with chance ``c = prod(s / (d + s - 1))`` (d the patch's
  size, per axis), independently of the other boxes. Boxes are added until their covers
  ``-ln(1 - c)`` sum to ``-ln(1 - density)``, and the box that crosses it is kept with the chance
  that makes ``E[prod(1 - c)]``, the expected uncovered fraction, exactly ``1 - density``
  (adding it always overshot: 0.36-0.40 covered for 0.3 with boxes large against the patch).
  Densities above ``MAX_BOX_DENSITY`` are taken as it; needing more than ``MAX_BOXES`` boxes
  (a few voxels each on a large patch) is refused.
  Each box is filled with a U(0, 1) constant (``fill``), U(0, 1) noise (``noise``) or the
  matching region of a Gaussian-blurred copy of the image (``blur``, one sigma ~ U(2, 5) px per
  sample), kind drawn uniformly from ``modes``; later boxes overwrite earlier ones.
* noise: ``x' = clip(x + sigma * N(0, 1), 0, 1)`` with ``sigma ~ U(0, sigma_max)``. With
  ``poisson``, shot noise too: ``x' = clip(Poisson(k x) / k + sigma * N(0, 1), 0, 1)`` where
  ``k = 0.5 / s**2``, ``s ~ U(0, sigma_max]`` (so the shot noise std at mid-grey is ``s``).
  Poisson counts are exact where ``k x < 10`` and use the normal approximation
  ``N(k x, k x)`` elsewhere (exact Poisson draws cost ~60 ms per 20x256x256 patch).
* contrast_compression: ``x' = clip(m + f (x - m), 0, 1)``, ``m`` the patch mean,
  ``f ~ U(factor)``; the standard deviation is multiplied by ``f`` (for ``f <= 1`` exactly).

A ``partial`` region is drawn by cutting the section at a random row and column (between a
quarter and three quarters of its size) and taking one of the four quadrants or one of the
four half-planes, each with equal chance. ``partial`` applies with chance ``PARTIAL_CHANCE``:
per sample for grayscale (a region per section in ``2d``, one region for all sections in
``3d``), per affected section for missing and blurry sections.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import scipy.fft

from ...errors import UserError
from ...geometry import Zyx
from ...recipe.augment import (
    BOX_MAX_COUNT,
    BOX_MAX_DENSITY,
    BlurrySection,
    Box,
    ContrastCompression,
    Grayscale,
    MissingSection,
    Noise,
)
from ...registry import augmentations
from .base import Augmentation, Context, Sample, Step

PARTIAL_CHANCE = 0.5
"""Chance that a ``partial: true`` augmentation affects a region instead of the whole section."""

POISSON_EXACT_BELOW = 10.0
"""Expected photon counts below which Poisson noise is drawn exactly (normal approx. above)."""

BOX_BLUR_SIGMA = (2.0, 5.0)
"""Range of the blur sigma (pixels) for ``blur`` boxes, one draw per sample."""

MAX_BOX_DENSITY = BOX_MAX_DENSITY
"""Densities above are taken as this one (density 1 would need boxes without end)."""

MAX_BOXES = BOX_MAX_COUNT
"""Most boxes one sample may get (their plan holds 24 bytes each): a density that needs more,
with boxes of a few voxels on a large patch, is refused rather than silently not reached."""

BOX_BATCH = 65_536
"""Most boxes drawn per round while planning."""

BOX_LOOP_MAX = 20_000
"""Up to this many boxes are painted one slice assignment each (~2 us a box); more, small
ones, each covered voxel once by its last box (faster from about this many on)."""

BOX_PAINT_CHUNK = 1 << 20
"""Box voxels indexed per vectorised pass (bounds the temporary index arrays)."""

Region = tuple[slice, slice]
_F32 = np.float32


def _seed(rng: np.random.Generator) -> int:
    return int(rng.integers(2**63))


# ----------------------------------------------------------------------------------------------
# Shared helpers


def standard_normal(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Standard normal float32 samples by the Box-Muller transform.

    About three times faster than ``rng.standard_normal(dtype=np.float32)`` (numpy's float32
    ziggurat) on large arrays: 3.9 ms instead of 11.3 ms for 20x256x256 values on one core.
    """
    n = math.prod(shape)
    h = (n + 1) // 2
    out = rng.random(2 * h, dtype=_F32)  # uniforms, turned into normals in place
    radius, angle = out[:h], out[h:]
    np.subtract(_F32(1), radius, out=radius)  # (0, 1]: the logarithm stays finite
    np.log(radius, out=radius)
    radius *= _F32(-2)
    np.sqrt(radius, out=radius)
    angle *= _F32(2 * np.pi)
    sine = np.sin(angle)
    np.cos(angle, out=angle)
    angle *= radius  # out[h:] = r cos(a)
    radius *= sine  # out[:h] = r sin(a)
    return out[:n].reshape(shape)


def _gaussian_transfer(sigmas: np.ndarray, n: int) -> np.ndarray:
    """(len(sigmas), n): the DCT-II multipliers of sampled, normalised Gaussian kernels."""
    sigmas = np.asarray(sigmas, dtype=np.float64)
    radius = int(4.0 * float(sigmas.max(initial=0.0)) + 0.5)
    if radius == 0:
        return np.ones((len(sigmas), n), dtype=_F32)
    taps = np.arange(radius + 1, dtype=np.float64)
    safe = np.where(sigmas > 0, sigmas, 1.0)[:, None]
    weights = np.exp(-0.5 * (taps[None, :] / safe) ** 2)
    # scipy truncates each kernel at round(4 sigma) taps; do the same for identical results
    weights[taps[None, :] > (4.0 * sigmas[:, None] + 0.5).astype(int)] = 0.0
    weights[sigmas <= 0, 1:] = 0.0
    weights /= weights[:, :1] + 2.0 * weights[:, 1:].sum(axis=1, keepdims=True)
    cos = np.cos(np.pi * np.arange(n)[:, None] * taps[None, 1:] / n)  # (n, radius)
    transfer = weights[:, :1] + 2.0 * weights[:, 1:] @ cos.T
    return transfer.astype(_F32)


def blur_sections(sections: np.ndarray, sigmas: np.ndarray | float) -> np.ndarray:
    """Blur each 2D section of ``sections`` (k, y, x) by its own Gaussian ``sigmas[i]``.

    Equal (to float32 rounding) to ``scipy.ndimage.gaussian_filter(section, sigma)`` (mode
    ``reflect``, truncate 4) per section: a symmetric filter under half-sample reflection is
    diagonal in the DCT-II basis, so each section costs two 2D DCTs whatever the sigma
    (~0.35 ms for 256x256 instead of 1.4 ms for scipy at sigma 5).
    """
    sections = np.asarray(sections, dtype=_F32)
    k, ny, nx = sections.shape
    sig = np.broadcast_to(np.asarray(sigmas, dtype=np.float64), (k,))
    if k == 0 or not np.any(sig > 0):
        return sections.copy()
    coef = scipy.fft.dctn(sections, type=2, axes=(1, 2))
    coef *= _gaussian_transfer(sig, ny)[:, :, None]
    coef *= _gaussian_transfer(sig, nx)[:, None, :]
    return scipy.fft.idctn(coef, type=2, axes=(1, 2), overwrite_x=True).astype(_F32, copy=False)


def random_region(rng: np.random.Generator, ny: int, nx: int) -> Region:
    """A quadrant or a half-plane of an (ny, nx) section, cut at a random row and column."""

    def cut(n: int) -> int:
        lo = max(1, n // 4)
        hi = max(lo, min(n - 1, (3 * n) // 4))
        return int(rng.integers(lo, hi + 1))

    cy, cx = cut(ny), cut(nx)
    kind = int(rng.integers(8))
    whole = slice(0, None)  # an axis of one pixel is not cut (its cut at 1 left nothing)
    top, bottom = (slice(0, cy), slice(cy, ny)) if ny > 1 else (whole, whole)
    left, right = (slice(0, cx), slice(cx, nx)) if nx > 1 else (whole, whole)
    return [
        (top, left), (top, right), (bottom, left), (bottom, right),
        (top, whole), (bottom, whole), (whole, left), (whole, right),
    ][kind]


def _pick_sections(rng: np.random.Generator, nz: int, max_sections: int,
                   consecutive: bool = False) -> np.ndarray:
    """1..max_sections distinct section indices, sorted; one run when ``consecutive``."""
    count = int(rng.integers(1, max(1, min(max_sections, nz)) + 1))
    if consecutive:
        start = int(rng.integers(0, nz - count + 1))
        return np.arange(start, start + count)
    return np.sort(rng.choice(nz, size=count, replace=False))


def _clip(image: np.ndarray) -> np.ndarray:
    return np.clip(image, 0.0, 1.0, out=image)


@dataclass(frozen=True, eq=False, kw_only=True)
class ImageOp:
    """A planned photometric step: maps the image, passes everything else through."""

    shape: Zyx

    def __call__(self, sample: Sample) -> Sample:
        if tuple(sample.image.shape) != self.shape:
            raise ValueError(f"{type(self).__name__} was planned for shape {self.shape}, "
                             f"got an image of shape {tuple(sample.image.shape)}")
        image = self.transform(np.asarray(sample.image, dtype=_F32))
        return replace(sample, image=image)

    def transform(self, image: np.ndarray) -> np.ndarray:
        """A new float32 image in [0, 1] (``image`` itself is left untouched)."""
        raise NotImplementedError


class PhotometricAugmentation(Augmentation):
    """Image-only augmentations: the planned step keeps the shape."""

    def step(self, op: ImageOp) -> Step:
        return Step(self.name, op.shape, op)


def _shape(out_shape: Zyx) -> Zyx:
    z, y, x = (int(s) for s in out_shape)
    return (z, y, x)


# ----------------------------------------------------------------------------------------------
# grayscale


def _gray(values: np.ndarray, a: Any, b: Any, gamma: Any) -> np.ndarray:
    out = np.multiply(values, a, dtype=_F32)
    out += b
    _clip(out)
    if np.any(gamma != 1):
        # x ** g as exp(g log x): numpy's float32 power falls off its SIMD path on zeros
        # (clipped voxels), 10 ms instead of 1.5 ms per 20x256x256 patch; log(0) = -inf -> 0
        with np.errstate(divide="ignore"):
            np.log(out, out=out)
        out *= gamma
        np.exp(out, out=out)
    return out


@dataclass(frozen=True, eq=False, kw_only=True)
class GrayscaleOp(ImageOp):
    """``clip(x * contrast + brightness, 0, 1) ** gamma`` per section or for the patch."""

    contrast: np.ndarray  # factors 1 + c u_c: (z,) per section, or (1,) for the patch
    brightness: np.ndarray  # offsets b u_b, same length
    gamma: np.ndarray  # exponents 2 ** U(-g, g), same length
    regions: tuple[Region, ...] | None  # one per entry above; None: whole sections

    def transform(self, image: np.ndarray) -> np.ndarray:
        a, b, g = self.contrast, self.brightness, self.gamma
        if self.regions is None:
            if len(a) == 1:
                return _gray(image, a[0], b[0], g[0])
            return _gray(image, a[:, None, None], b[:, None, None], g[:, None, None])
        out = image.copy()
        if len(a) == 1:
            ys, xs = self.regions[0]
            out[:, ys, xs] = _gray(image[:, ys, xs], a[0], b[0], g[0])
        else:
            for z, (ys, xs) in enumerate(self.regions):
                out[z, ys, xs] = _gray(image[z, ys, xs], a[z], b[z], g[z])
        return out


@augmentations.implement("grayscale")
class GrayscaleAugment(PhotometricAugmentation):
    spec: Grayscale

    def plan(self, rng: np.random.Generator, out_shape: Zyx, context: Context) -> Step:
        shape = _shape(out_shape)
        s = self.spec
        mode = s.mode if s.mode != "mix" else ("2d" if rng.random() < 0.5 else "3d")
        n = shape[0] if mode == "2d" else 1
        contrast = (1.0 + s.contrast * (rng.random(n) - 0.5)).astype(_F32)
        brightness = (s.brightness * (rng.random(n) - 0.5)).astype(_F32)
        gamma = (2.0 ** (s.gamma * (2.0 * rng.random(n) - 1.0))).astype(_F32)
        regions = None
        if s.partial and rng.random() < PARTIAL_CHANCE:
            regions = tuple(random_region(rng, shape[1], shape[2]) for _ in range(n))
        return self.step(GrayscaleOp(shape=shape, contrast=contrast, brightness=brightness,
                                     gamma=gamma, regions=regions))


# ----------------------------------------------------------------------------------------------
# missing_section


@dataclass(frozen=True, eq=False, kw_only=True)
class MissingSectionOp(ImageOp):
    """Sections (or a region of each) replaced by a constant or by uniform noise."""

    sections: np.ndarray  # sorted section indices
    regions: tuple[Region | None, ...]  # per section; None: the whole section
    fill: str  # "constant" or "random"
    value: float
    seed: int

    def transform(self, image: np.ndarray) -> np.ndarray:
        out = image.copy()
        rng = np.random.default_rng(self.seed)
        whole = [int(z) for z, r in zip(self.sections, self.regions, strict=True) if r is None]
        if whole:
            if self.fill == "constant":
                out[whole] = _F32(self.value)
            else:
                out[whole] = rng.random((len(whole), *image.shape[1:]), dtype=_F32)
        for z, region in zip(self.sections, self.regions, strict=True):
            if region is None:
                continue
            target = out[int(z)][region]
            if self.fill == "constant":
                target[...] = _F32(self.value)
            else:
                target[...] = rng.random(target.shape, dtype=_F32)
        return out


@augmentations.implement("missing_section")
class MissingSectionAugment(PhotometricAugmentation):
    spec: MissingSection

    def plan(self, rng: np.random.Generator, out_shape: Zyx, context: Context) -> Step:
        shape = _shape(out_shape)
        s = self.spec
        sections = _pick_sections(rng, shape[0], s.max_sections, s.consecutive)
        regions = tuple(
            random_region(rng, shape[1], shape[2])
            if s.partial and rng.random() < PARTIAL_CHANCE else None
            for _ in sections
        )
        return self.step(MissingSectionOp(shape=shape, sections=sections, regions=regions,
                                          fill=s.fill, value=float(s.value), seed=_seed(rng)))


# ----------------------------------------------------------------------------------------------
# blurry_section


@dataclass(frozen=True, eq=False, kw_only=True)
class BlurrySectionOp(ImageOp):
    """Sections (or a region of each) blurred by a per-section 2D Gaussian."""

    sections: np.ndarray
    sigmas: np.ndarray
    regions: tuple[Region | None, ...]

    def transform(self, image: np.ndarray) -> np.ndarray:
        out = image.copy()
        blurred = _clip(blur_sections(image[self.sections], self.sigmas))
        for i, (z, region) in enumerate(zip(self.sections, self.regions, strict=True)):
            if region is None:
                out[int(z)] = blurred[i]
            else:
                out[int(z)][region] = blurred[i][region]
        return out


@augmentations.implement("blurry_section")
class BlurrySectionAugment(PhotometricAugmentation):
    spec: BlurrySection

    def plan(self, rng: np.random.Generator, out_shape: Zyx, context: Context) -> Step:
        shape = _shape(out_shape)
        s = self.spec
        sections = _pick_sections(rng, shape[0], s.max_sections)
        sigmas = s.sigma_max * (1.0 - rng.random(len(sections)))  # (0, sigma_max]
        regions = tuple(
            random_region(rng, shape[1], shape[2])
            if s.partial and rng.random() < PARTIAL_CHANCE else None
            for _ in sections
        )
        return self.step(BlurrySectionOp(shape=shape, sections=sections, sigmas=sigmas,
                                          regions=regions))


# ----------------------------------------------------------------------------------------------
# box

BOX_FILL, BOX_NOISE, BOX_BLUR = 0, 1, 2
_BOX_KINDS = {"fill": BOX_FILL, "noise": BOX_NOISE, "blur": BOX_BLUR}


def box_cover(size: np.ndarray, dims: np.ndarray) -> np.ndarray:
    """``-ln(1 - c)`` per box, ``c`` the chance that a box of ``size`` (n, 3) at a uniform
    position (sticking out allowed) covers a given voxel of a patch of ``dims``: per axis
    ``s / (d + s - 1)``, the same for every voxel. Infinite where ``c`` is 1."""
    chance = np.prod(size / (dims + size - 1.0), axis=1)
    with np.errstate(divide="ignore"):
        return -np.log1p(-chance)


def _box_batch(limit: float, lows: np.ndarray, highs: np.ndarray, dims: np.ndarray) -> int:
    """Boxes to draw per round: about the expected count (from the middle size), bounded."""
    middle = box_cover(((lows + highs - 1) / 2.0)[None, :], dims)[0]
    return int(min(BOX_BATCH, max(16, 1.1 * limit / max(middle, 1e-12) + 16)))


def draw_boxes(rng: np.random.Generator, shape: Zyx, spec: Box) -> np.ndarray:
    """(n, 6) int32 boxes z0, z1, y0, y1, x0, x1, clipped to the patch, whose covers sum to
    ``-ln(1 - density)``; the box that crosses it is kept with the chance that makes the
    expected uncovered fraction exactly ``1 - density`` (see the module docstring)."""
    limit = -math.log1p(-min(spec.density, MAX_BOX_DENSITY))
    lows = np.array([spec.z_size[0], spec.size[0], spec.size[0]])
    highs = np.array([spec.z_size[1], spec.size[1], spec.size[1]]) + 1
    dims = np.array(shape)
    batch = _box_batch(limit, lows, highs, dims)
    chunks: list[np.ndarray] = []
    total, count = 0.0, 0
    while total < limit:
        size = rng.integers(lows, highs, size=(batch, 3))
        start = rng.integers(1 - size, dims)  # may stick out: uniform coverage per voxel
        cover = box_cover(size, dims)
        sums = total + np.cumsum(cover)
        take = int(np.searchsorted(sums, limit))  # the first box reaching the limit
        if take == batch:
            total = float(sums[-1])
        else:
            before = total if take == 0 else float(sums[take - 1])
            # E[exp(-covers)] = exp(-limit): keep it with chance (1 - e^-(L - S)) / (1 - e^-c)
            keep = -math.expm1(before - limit) / -math.expm1(-float(cover[take]))
            take += int(rng.random() < keep)
            total = limit
        count += take
        if count > MAX_BOXES:
            raise UserError(
                f"box: density {spec.density:g} with boxes of {list(spec.z_size)} x "
                f"{list(spec.size)} voxels needs more than {MAX_BOXES:,} boxes on a patch of "
                f"{list(shape)}; use larger boxes or a lower density")
        lo = np.maximum(start[:take], 0)
        hi = np.minimum(start[:take] + size[:take], dims)
        chunks.append(np.stack([lo, hi], axis=2).reshape(take, 6).astype(np.int32))
    return np.concatenate(chunks) if chunks else np.zeros((0, 6), dtype=np.int32)


def _winners_by_loop(boxes: np.ndarray, shape: Zyx) -> np.ndarray:
    """``winners`` one box at a time (fewer, larger boxes: a slice assignment each)."""
    winner = np.full(shape, -1, dtype=np.int32)
    for i, (z0, z1, y0, y1, x0, x1) in enumerate(boxes.tolist()):
        winner[z0:z1, y0:y1, x0:x1] = i
    return winner


def _winners_by_index(boxes: np.ndarray, shape: Zyx) -> np.ndarray:
    """``winners`` from every box voxel's flat index (many small boxes), in chunks of about
    ``BOX_PAINT_CHUNK`` voxels; ``maximum.at`` makes the last box win where they overlap."""
    winner = np.full(math.prod(shape), -1, dtype=np.int32)
    extent = (boxes[:, 1::2] - boxes[:, 0::2]).astype(np.int64)
    volumes = extent.prod(axis=1)
    ends = np.cumsum(volumes)
    first = 0
    while first < len(boxes):
        stop = max(first + 1, int(np.searchsorted(ends, ends[first] - volumes[first]
                                                 + BOX_PAINT_CHUNK, side="right")))
        part = slice(first, stop)
        ids = np.repeat(np.arange(first, stop, dtype=np.int32), volumes[part])
        local = np.arange(len(ids), dtype=np.int64)
        local -= np.repeat(ends[part] - volumes[part] - (ends[first] - volumes[first]),
                           volumes[part])
        ext = extent[part][ids - first]
        corner = boxes[part, 0::2].astype(np.int64)[ids - first]
        x = local % ext[:, 2]
        local //= ext[:, 2]
        y = local % ext[:, 1]
        z = local // ext[:, 1]
        flat = ((corner[:, 0] + z) * shape[1] + corner[:, 1] + y) * shape[2] + corner[:, 2] + x
        np.maximum.at(winner, flat, ids)
        first = stop
    return winner.reshape(shape)


@dataclass(frozen=True, eq=False, kw_only=True)
class BoxOp(ImageOp):
    """Boxes filled with a constant, uniform noise or a blurred copy of the image."""

    boxes: np.ndarray  # (n, 6) int: z0, z1, y0, y1, x0, x1 (clipped to the patch)
    kinds: np.ndarray  # (n,) BOX_FILL / BOX_NOISE / BOX_BLUR
    values: np.ndarray  # (n,) float32 fill constants
    blur_sigma: float
    seed: int

    def winners(self) -> np.ndarray:
        """int32 of the patch's shape: the last box covering each voxel, -1 where none."""
        if len(self.boxes) <= BOX_LOOP_MAX:
            return _winners_by_loop(self.boxes, self.shape)
        return _winners_by_index(self.boxes, self.shape)

    def coverage(self) -> np.ndarray:
        """Boolean mask of the voxels under at least one box."""
        return self.winners() >= 0

    def transform(self, image: np.ndarray) -> np.ndarray:
        out = image.copy()
        if len(self.boxes) <= BOX_LOOP_MAX:
            self._paint_slices(image, out)
        else:
            self._paint_winners(image, out)
        return _clip(out)

    def _blurred(self, image: np.ndarray, zs: np.ndarray) -> np.ndarray:
        """Sections ``zs`` (sorted, distinct) of the image, blurred."""
        return blur_sections(image[zs], self.blur_sigma)

    def _paint_slices(self, image: np.ndarray, out: np.ndarray) -> None:
        """One slice assignment per box, in order (fewer, larger boxes: the faster way)."""
        extent = self.boxes[:, 1::2] - self.boxes[:, 0::2]
        volumes = extent.astype(np.int64).prod(axis=1)
        rng = np.random.default_rng(self.seed)
        noise = rng.random(int(volumes[self.kinds == BOX_NOISE].sum()), dtype=_F32)
        blurred = None
        if np.any(self.kinds == BOX_BLUR):
            touched = np.zeros(image.shape[0], dtype=bool)
            for z0, z1 in self.boxes[self.kinds == BOX_BLUR][:, :2].tolist():
                touched[z0:z1] = True
            zs = np.flatnonzero(touched)
            blurred = image.copy()
            blurred[zs] = self._blurred(image, zs)
        offset = 0
        for (z0, z1, y0, y1, x0, x1), kind, value, volume in zip(
            self.boxes.tolist(), self.kinds.tolist(), self.values.tolist(), volumes.tolist(),
            strict=True,
        ):
            if kind == BOX_FILL:
                out[z0:z1, y0:y1, x0:x1] = value
            elif kind == BOX_NOISE:
                out[z0:z1, y0:y1, x0:x1] = noise[offset:offset + volume].reshape(
                    z1 - z0, y1 - y0, x1 - x0)
                offset += volume
            else:
                assert blurred is not None
                out[z0:z1, y0:y1, x0:x1] = blurred[z0:z1, y0:y1, x0:x1]

    def _paint_winners(self, image: np.ndarray, out: np.ndarray) -> None:
        """Each covered voxel once, by the last box over it (many small boxes)."""
        flat = out.reshape(-1)
        winner = self.winners().reshape(-1)
        covered = np.flatnonzero(winner >= 0)
        box = winner[covered]
        kind = self.kinds[box]
        fill = kind == BOX_FILL
        flat[covered[fill]] = self.values[box[fill]]
        noise = covered[kind == BOX_NOISE]
        flat[noise] = np.random.default_rng(self.seed).random(len(noise), dtype=_F32)
        blur = covered[kind == BOX_BLUR]
        if len(blur):
            plane = image.shape[1] * image.shape[2]
            zs = np.unique(blur // plane)
            blurred = self._blurred(image, zs).reshape(-1)
            rank = np.searchsorted(zs, blur // plane)  # the blurred section holding each
            flat[blur] = blurred[rank * plane + blur % plane]


@augmentations.implement("box")
class BoxAugment(PhotometricAugmentation):
    spec: Box

    def plan(self, rng: np.random.Generator, out_shape: Zyx, context: Context) -> Step:
        shape = _shape(out_shape)
        s = self.spec
        boxes = draw_boxes(rng, shape, s)
        kinds_available = np.array([_BOX_KINDS[m] for m in s.modes])
        kinds = kinds_available[rng.integers(len(kinds_available), size=len(boxes))]
        values = rng.random(len(boxes), dtype=_F32)
        blur_sigma = float(rng.uniform(*BOX_BLUR_SIGMA))
        return self.step(BoxOp(shape=shape, boxes=boxes, kinds=kinds, values=values,
                               blur_sigma=blur_sigma, seed=_seed(rng)))


# ----------------------------------------------------------------------------------------------
# noise


@dataclass(frozen=True, eq=False, kw_only=True)
class NoiseOp(ImageOp):
    """Additive Gaussian noise ``sigma``, plus Poisson shot noise at ``photons`` per unit."""

    sigma: float
    photons: float | None  # k: counts ~ Poisson(k x); None: no shot noise
    seed: int

    def transform(self, image: np.ndarray) -> np.ndarray:
        rng = np.random.default_rng(self.seed)
        noise = standard_normal(rng, image.shape)
        if self.photons is None:
            noise *= _F32(self.sigma)
            noise += image
            return _clip(noise)
        k = self.photons
        flat_image, flat_noise = image.reshape(-1), noise.reshape(-1)
        exact = np.flatnonzero(flat_image < _F32(POISSON_EXACT_BELOW / k))
        raw = flat_noise[exact]  # a copy: the unit normals of the exactly drawn voxels
        std = np.multiply(image, _F32(1.0 / k))
        std += _F32(self.sigma**2)
        np.sqrt(std, out=std)
        noise *= std
        noise += image
        if exact.size:
            counts = rng.poisson(flat_image[exact].astype(np.float64) * k)
            flat_noise[exact] = (counts / k + self.sigma * raw).astype(_F32)
        return _clip(noise)


@augmentations.implement("noise")
class NoiseAugment(PhotometricAugmentation):
    spec: Noise

    def plan(self, rng: np.random.Generator, out_shape: Zyx, context: Context) -> Step:
        shape = _shape(out_shape)
        s = self.spec
        sigma = float(s.sigma_max * rng.random())
        photons = None
        if s.poisson:
            shot = s.sigma_max * (1.0 - rng.random())  # (0, sigma_max]
            photons = 0.5 / shot**2 if shot > 0 else None
        return self.step(NoiseOp(shape=shape, sigma=sigma, photons=photons, seed=_seed(rng)))


# ----------------------------------------------------------------------------------------------
# contrast_compression


@dataclass(frozen=True, eq=False, kw_only=True)
class ContrastCompressionOp(ImageOp):
    """``m + factor (x - m)`` with ``m`` the patch mean."""

    factor: float

    def transform(self, image: np.ndarray) -> np.ndarray:
        mean = float(image.mean(dtype=np.float64)) if image.size else 0.0
        out = np.multiply(image, _F32(self.factor), dtype=_F32)
        out += _F32((1.0 - self.factor) * mean)
        return _clip(out)


@augmentations.implement("contrast_compression")
class ContrastCompressionAugment(PhotometricAugmentation):
    spec: ContrastCompression

    def plan(self, rng: np.random.Generator, out_shape: Zyx, context: Context) -> Step:
        low, high = self.spec.factor
        factor = float(low + (high - low) * rng.random())
        return self.step(ContrastCompressionOp(shape=_shape(out_shape), factor=factor))
