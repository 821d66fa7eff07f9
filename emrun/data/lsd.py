"""Local shape descriptors (LSDs; Sheridan et al. 2022): for every labelled voxel, statistics
of its own object inside a Gaussian window centred on it.

With ``g`` the window (a normalised Gaussian of per-axis sigma, truncated at 3 sigma) and
``o`` the indicator of the voxel's object, the window sums ``M = sum g o``,
``S = sum g o u`` and ``Q = sum g o u u^T`` (u in nm) give the 10 channels, each in [0, 1]:

* 0-2, mean offset z, y, x: ``0.5 + 0.5 (S / M - v) / sigma`` (v: the voxel, in nm);
* 3-5, variances zz, yy, xx: ``C_aa / sigma_a**2`` (a full window gives 1);
* 6-8, covariances zy, zx, yx: ``0.5 + 0.5 C_ab / (sigma_a sigma_b)``;
* 9, size: ``M``, the fraction of the window the object fills (1 deep inside a large one);

with ``C = Q / M - (S / M)(S / M)^T``; values are clipped to [0, 1]. Voxels outside the
patch count as no object (the window is not renormalised at the border). Label 0 is no
object: every channel is 0 there (the target masks it).

How, and why it is fast: the patch is cut into blocks of ``factor`` voxels per axis
(factor 1: single voxels, exact). One sort within each block lists its (block, object,
voxel count) pairs, and which pair each voxel belongs to. Per object, the window sums are
separable Gaussian filters of its block-averaged indicator and of its coordinate-weighted
copies (block centres as coordinates; 19 one-axis passes in 3 calls, the z and y passes
shared), over its blocks' bounding box grown by the window radius, each pass cropped back
to the box before the next; they are kept for the object's pairs only. Every voxel then
takes its pair's statistics in one gather; the offset uses the voxel's own position. With
factor > 1 this is close when sigma spans several blocks (the default leaves 3).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

TRUNCATE = 3.0
"""The window ends at this many sigma (scipy's radius ``int(TRUNCATE * sigma + 0.5)``)."""

CHANNELS = 10

# (z, y, x) powers of the window sums, in the order they are stored: M, S_z, S_y, S_x,
# Q_zz, Q_yy, Q_xx, Q_zy, Q_zx, Q_yx.
_MOMENTS = ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (2, 0, 0), (0, 2, 0), (0, 0, 2),
            (1, 1, 0), (1, 0, 1), (0, 1, 1))
_PAIRS = ((0, 1), (0, 2), (1, 2))


def auto_factor(sigma_voxels: Sequence[float]) -> tuple[int, int, int]:
    """Per axis the largest block size that leaves at least 3 coarse voxels per sigma."""
    return tuple(max(1, int(s // 3)) for s in sigma_voxels)  # type: ignore[return-value]


def local_shape_descriptors(labels: np.ndarray, sigma: Sequence[float],
                            voxel_size: Sequence[float],
                            factor: Sequence[int] = (1, 1, 1)) -> np.ndarray:
    """The (10, z, y, x) float32 LSDs of a 3D integer label volume (0 = no object).

    ``sigma`` and ``voxel_size`` in nm per axis z, y, x; ``factor``: block size of the
    coarse grid the window sums are computed on (1 = exact).
    """
    if labels.ndim != 3:
        raise ValueError(f"labels must be 3D (z, y, x), got shape {labels.shape}")
    sigma_nm = np.asarray(sigma, np.float64)
    size = np.asarray(voxel_size, np.float64)
    f = tuple(int(v) for v in factor)
    shape = labels.shape
    ids = _sortable_ids(labels)
    padded = tuple(math.ceil(n / k) * k for n, k in zip(shape, f, strict=True))
    if padded != shape:
        ids = np.pad(ids, [(0, p - n) for p, n in zip(padded, shape, strict=True)])
    coarse = tuple(p // k for p, k in zip(padded, f, strict=True))
    pairs = _pairs(ids, f)
    sigma_blocks = sigma_nm / size / np.asarray(f)
    step = size * np.asarray(f)  # nm between coarse voxel centres
    offset = (np.asarray(f) - 1) * size / 2  # nm from a block's first voxel to its centre
    table = np.zeros((CHANNELS, len(pairs.label)), np.float32)
    order = np.argsort(pairs.label, kind="stable")
    bounds = np.flatnonzero(np.diff(pairs.label[order])) + 1
    for group in np.split(order, bounds):
        if pairs.label[group[0]] == 0:
            continue
        points = np.unravel_index(pairs.block[group], coarse)
        table[:, group] = _window_stats(points, pairs.fraction[group], sigma_blocks, step,
                                        offset)
    crop = tuple(slice(0, n) for n in shape)
    scaled = _scale_table(table, sigma_nm)
    scaled[:, pairs.label == 0] = 0.0
    channels = np.take(scaled, pairs.of_voxel[crop], axis=1)
    _offsets(channels, ids[crop] != 0, sigma_nm, size)
    return channels


class _Pairs:
    """The (block, object) pairs of a volume cut into blocks: per pair its flat block index,
    object id and the fraction of the block the object fills; per voxel its pair."""

    def __init__(self, block: np.ndarray, label: np.ndarray, fraction: np.ndarray,
                 of_voxel: np.ndarray) -> None:
        self.block, self.label, self.fraction, self.of_voxel = block, label, fraction, of_voxel


def _pairs(ids: np.ndarray, f: Sequence[int]) -> _Pairs:
    """Sort each block's voxels by id (id and position packed in one integer) and number
    the runs of equal ids: each run is a pair; scatter the run numbers back to the voxels."""
    z, y, x = ids.shape
    coarse = (z // f[0], y // f[1], x // f[2])
    per = math.prod(f)
    nblocks = math.prod(coarse)
    blocked = ids.reshape(coarse[0], f[0], coarse[1], f[1], coarse[2], f[2])
    blocked = blocked.transpose(0, 2, 4, 1, 3, 5).reshape(nblocks, per)
    bits = max(1, (per - 1).bit_length())
    top = int(ids.max()) if ids.size else 0
    dtype = np.int32 if top < 2 ** (31 - bits) else np.int64
    key = (blocked.astype(dtype) << bits) | np.arange(per, dtype=dtype)
    key.sort(axis=1)
    label = key >> bits
    start = np.ones(key.shape, bool)
    np.not_equal(label[:, 1:], label[:, :-1], out=start[:, 1:])
    run = np.cumsum(start.ravel(), dtype=np.int32).reshape(key.shape) - 1
    of_voxel = np.empty(key.shape, np.int32)
    np.put_along_axis(of_voxel, key & ((1 << bits) - 1), run, axis=1)
    of_voxel = of_voxel.reshape(*coarse, *f).transpose(0, 3, 1, 4, 2, 5).reshape(ids.shape)
    firsts = np.flatnonzero(start.ravel())
    counts = np.diff(firsts, append=nblocks * per)
    return _Pairs(block=firsts // per, label=label.ravel()[firsts],
                  fraction=(counts / per).astype(np.float32), of_voxel=of_voxel)


def _kernel(sigma: float) -> np.ndarray:
    """The normalised Gaussian of ``sigma`` blocks, truncated like scipy's (radius
    ``int(TRUNCATE * sigma + 0.5)``)."""
    radius = int(TRUNCATE * sigma + 0.5)
    weights = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    return (weights / weights.sum()).astype(np.float32)


def _window_stats(points: tuple[np.ndarray, ...], fraction: np.ndarray,
                  sigma: np.ndarray, step: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """(10, n) window mass, mean (nm, absolute) and covariance (nm^2) at one object's n
    blocks (``points``: their coarse indices; ``fraction``: how much of each it fills).

    The object's indicator on its blocks' bounding box is filtered one axis at a time, x,
    then y, then z, each a matrix product that also weights by coordinate powers 0-2
    (see ``_window_matrix``); outside the box the object is absent, so the box suffices.
    """
    lo = [int(p.min()) for p in points]
    hi = [int(p.max()) + 1 for p in points]
    nz, ny, nx = (b - a for a, b in zip(lo, hi, strict=True))
    centre = [(a + b - 1) / 2 * s + o for a, b, s, o in zip(lo, hi, step, offset, strict=True)]
    kernels = [_kernel(sd) for sd in sigma]
    box = np.zeros((nz, ny, nx), np.float32)
    box[tuple(p - a for p, a in zip(points, lo, strict=True))] = fraction
    coords = [(np.arange(a, b) * s + o - c).astype(np.float32)
              for a, b, s, o, c in zip(lo, hi, step, offset, centre, strict=True)]

    def smooth(volumes: list[np.ndarray], axis: int, exponents: list[int]) -> np.ndarray:
        shape = [1, 1, 1]
        shape[axis] = -1
        c = coords[axis].reshape(shape)
        stack = np.stack([v * c ** e if e else v for v, e in zip(volumes, exponents,
                                                                    strict=True)])
        return ndimage.correlate1d(stack, kernels[axis], axis=axis + 1, mode="constant")

    along_x = smooth([box] * 3, 2, [0, 1, 2])
    xy = [(c, b) for c in range(3) for b in range(3 - c)]
    along_y = smooth([along_x[c] for c, _ in xy], 1, [b for _, b in xy])
    along_z = smooth([along_y[xy.index((c, b))] for _, b, c in _MOMENTS], 0,
                     [a for a, _, _ in _MOMENTS])
    moments = along_z[(slice(None), *(p - a for p, a in zip(points, lo, strict=True)))]
    mass = np.maximum(moments[0], np.float32(1e-12))
    mean = moments[1:4] / mass
    stats = np.empty_like(moments)
    stats[0] = moments[0]
    for a in range(3):
        stats[1 + a] = mean[a] + np.float32(centre[a])
        stats[4 + a] = moments[4 + a] / mass - mean[a] ** 2
    for i, (a, b) in enumerate(_PAIRS):
        stats[7 + i] = moments[7 + i] / mass - mean[a] * mean[b]
    return stats


def _scale_table(table: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Per pair, the 10 channels in channel order and [0, 1], except that the offset
    channels still hold ``0.5 + 0.5 mean / sigma`` (the voxel's position comes later)."""
    scale = np.empty(CHANNELS, np.float32)
    shift = np.zeros(CHANNELS, np.float32)
    scale[0] = 1.0
    for a in range(3):
        scale[1 + a], shift[1 + a] = 0.5 / sigma[a], 0.5
        scale[4 + a] = 1 / sigma[a] ** 2
    for i, (a, b) in enumerate(_PAIRS):
        scale[7 + i], shift[7 + i] = 0.5 / (sigma[a] * sigma[b]), 0.5
    out = table * scale[:, None] + shift[:, None]
    np.clip(out[4:], 0.0, 1.0, out=out[4:])
    np.clip(out[:1], 0.0, 1.0, out=out[:1])
    return out[_OUTPUT_ORDER]


def _offsets(channels: np.ndarray, labelled: np.ndarray, sigma: np.ndarray,
             size: np.ndarray) -> None:
    """Finish the offset channels in place: less the voxel's position, clipped, 0 where
    not ``labelled`` (the other channels are 0 there already: label 0's pairs are)."""
    for a in range(3):
        bshape = [1, 1, 1]
        bshape[a] = -1
        position = (np.arange(labelled.shape[a]) * (size[a] * 0.5 / sigma[a]))
        channels[a] -= position.astype(np.float32).reshape(bshape)
        np.clip(channels[a], 0.0, 1.0, out=channels[a])
        channels[a] *= labelled


_OUTPUT_ORDER = [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]
"""Statistics are stored mass first (as the moments); the channels put size last."""


def _sortable_ids(labels: np.ndarray) -> np.ndarray:
    """Ids that pack with a voxel's place in its block into one int64 sort key: the labels
    themselves when in [0, 2**40), else their ranks (0 stays 0)."""
    if labels.dtype.kind not in "biu":
        raise ValueError(f"labels must be integer ids, got dtype {labels.dtype}")
    if labels.dtype == bool:
        return labels.astype(np.uint8)
    if labels.size == 0 or (int(labels.min()) >= 0 and int(labels.max()) < 2**40):
        return labels
    _, inverse = np.unique(labels, return_inverse=True)
    ranks = inverse.reshape(labels.shape).astype(np.int64) + 1
    ranks[labels == 0] = 0
    return ranks
