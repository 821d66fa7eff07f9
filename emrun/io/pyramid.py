"""Multiscale pyramids: how many levels, what each level's factor is, and building them.

Levels 1..N-1 are written after level 0 is complete, each from the level before it, block by
block: a block is one output block of the coarser level (`BLOCK_ZYX`, whole chunks), for
which the matching box of the finer level is read, downsampled and written. Blocks are
independent (chunk-aligned, no two write the same chunk), so `threads` of them run at once
and memory is bounded by `threads` finer blocks of at most `READ_BYTES` (with the
downsampling's temporaries, a few times that), whatever the volume's size.

Each level halves y and x; z is halved too only where its voxel size is at most half of
y's at the new level (z no coarser than y before the step), so anisotropic EM (30 x 6 x 6
nm) keeps its sections until y and x have caught up, and isotropic data halves all three
axes. An unknown voxel size is taken as anisotropic: z is kept.

Images and predictions are averaged (integers rounded to nearest, so uint8 stays uint8);
segmentations and labels take the most frequent id of each window (the smallest on ties),
which never invents an id. Windows cut by the volume's end use the voxels present.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import zarr

from emrun.devices import cpu_cores
from emrun.geometry import BlockGrid, Roi, box_of, slices
from emrun.io.volume import VolumeError

Factor = tuple[int, int, int]
MAX_LEVELS = 8  # the default never goes beyond this many levels
SMALLEST_YX = 256  # the default adds levels until y and x are at most this
BLOCK_ZYX = (32, 512, 512)  # largest output block of a coarser level, in voxels
READ_BYTES = 32 << 20  # y and x of a block shrink until a finer block is at most this


def level_factors(
    shape: Sequence[int], voxel_size: Sequence[float] | None, levels: int | None
) -> list[Factor]:
    """The cumulative (z, y, x) downsampling factor of each level, level 0's (1, 1, 1) first.

    `shape` is the spatial (z, y, x) shape. `levels` None: add levels while the coarsest
    level's y or x exceeds `SMALLEST_YX`, at most `MAX_LEVELS`. A count below 1, or one that
    would halve a y or x already of 1 voxel, is a VolumeError.
    """
    z, y, x = (int(n) for n in shape[-3:])
    most = 1 + int(math.log2(max(1, min(y, x))))  # until y or x is one voxel
    if levels is not None:
        if isinstance(levels, bool) or not isinstance(levels, int) or levels < 1:
            raise VolumeError(f"--levels must be at least 1 (level 0 alone), got {levels!r}")
        if levels > most:
            raise VolumeError(
                f"--levels {levels}: a volume of {y} x {x} voxels in y and x has at most "
                f"{most} levels (each halves y and x); give --levels {most} or fewer"
            )
        count = levels
    else:
        count = 1
        while count < min(MAX_LEVELS, most) and max(_ceil(y, 2 ** (count - 1)),
                                                     _ceil(x, 2 ** (count - 1))) > SMALLEST_YX:
            count += 1
    vz, vy = (float(voxel_size[0]), float(voxel_size[1])) if voxel_size else (math.inf, 1.0)
    factors: list[Factor] = [(1, 1, 1)]
    fz, fyx = 1, 1
    for _ in range(count - 1):
        if z > fz and vz * fz <= vy * fyx:  # z's size at most half of y's new one
            fz *= 2
        fyx *= 2
        factors.append((fz, fyx, fyx))
    return factors


def level_shape(shape: Sequence[int], factor: Sequence[int]) -> tuple[int, ...]:
    """A level's shape: each spatial axis divided by its factor, rounded up (leading
    channel axes are kept)."""
    lead = tuple(int(n) for n in shape[:-3])
    return lead + tuple(_ceil(int(n), f) for n, f in zip(shape[-3:], factor, strict=True))


def downsample(data: np.ndarray, step: Sequence[int], labels: bool) -> np.ndarray:
    """Downsample the last three axes of `data` by `step`: mean (rounded for integers) or,
    with `labels`, the most frequent value of each window."""
    step = tuple(int(s) for s in step)
    spatial = data.shape[-3:]
    out_shape = tuple(_ceil(n, s) for n, s in zip(spatial, step, strict=True))
    pad = [(0, 0)] * (data.ndim - 3) + [(0, o * s - n) for o, s, n in
                                        zip(out_shape, step, spatial, strict=True)]
    padded = np.pad(data, pad) if any(p for _, p in pad) else data  # zeros past the end
    if labels:
        present = _windows(np.pad(np.ones(spatial, bool), pad[-3:]), out_shape, step)
        return _mode(_windows(padded, out_shape, step), present)
    split = padded.reshape(*data.shape[:-3], out_shape[0], step[0], out_shape[1], step[1],
                           out_shape[2], step[2])
    counts = [np.minimum(s, n - np.arange(o) * s) for o, s, n in
              zip(out_shape, step, spatial, strict=True)]  # voxels present per window
    present = counts[0][:, None, None] * counts[1][None, :, None] * counts[2][None, None, :]
    if data.dtype.kind in "iu" and data.dtype.itemsize == 8:
        return _wide_integer_mean(split, present).astype(data.dtype)
    # sums of at most 8 values of up to 16 bits are exact in float32
    exact32 = data.dtype.itemsize <= 2 or data.dtype == np.float32
    mean = split.sum(axis=(-5, -3, -1), dtype=np.float32 if exact32 else np.float64)
    mean /= present
    if data.dtype.kind in "iub":
        np.floor(mean + 0.5, out=mean)
        if data.dtype.kind != "b":
            info = np.iinfo(data.dtype)
            np.clip(mean, info.min, info.max, out=mean)
    return mean.astype(data.dtype)


def _wide_integer_mean(split: np.ndarray, present: np.ndarray) -> np.ndarray:
    """The mean of each window of 64-bit integers, rounded half up, exactly (float64 holds
    53 bits: ids or counts beyond 2**53 came out hundreds off). Each value is cut into its
    high and low 32 bits, whose window sums fit 64 bits; the high sum's remainder after
    division joins the low sum."""
    kind = np.int64 if split.dtype.kind == "i" else np.uint64
    values = split.astype(kind, copy=False)
    axes = (-5, -3, -1)
    high = (values >> kind(32)).sum(axis=axes, dtype=kind)  # arithmetic shift: floor
    low = (values & kind(0xFFFFFFFF)).sum(axis=axes, dtype=np.int64)
    n = present.astype(np.int64)
    if kind is np.int64:
        quotient, remainder = np.divmod(high, n)
    else:
        quotient, remainder = np.divmod(high, n.astype(np.uint64))
    rest = remainder.astype(np.int64) * 2**32 + low  # < 2**41 + n * 2**32
    rounded = (2 * rest + n) // (2 * n)  # floor(rest / n + 1/2)
    return quotient.astype(kind) * kind(2**32) + rounded.astype(kind)


def _windows(data: np.ndarray, out_shape: Sequence[int], step: Sequence[int]) -> np.ndarray:
    """View a padded array as (..., oz, oy, ox, sz*sy*sx): one row per output voxel."""
    lead = data.shape[:-3]
    split = data.reshape(*lead, out_shape[0], step[0], out_shape[1], step[1],
                         out_shape[2], step[2])
    n = len(lead)
    order = (*range(n), n, n + 2, n + 4, n + 1, n + 3, n + 5)
    return split.transpose(order).reshape(*lead, *out_shape, math.prod(step))


def _mode(windows: np.ndarray, present: np.ndarray) -> np.ndarray:
    """The most frequent present value of each window; the smallest among equals."""
    counts = np.zeros(windows.shape, np.int16)
    for j in range(windows.shape[-1]):
        counts += (windows == windows[..., j : j + 1]) & present[..., j : j + 1]
    counts = np.where(present, counts, -1)
    best = counts.max(axis=-1, keepdims=True)
    candidates = np.where(counts == best, windows, _largest(windows.dtype))
    return candidates.min(axis=-1)


def _largest(dtype: np.dtype) -> int | float:
    return np.iinfo(dtype).max if dtype.kind in "iu" else (True if dtype.kind == "b"
                                                            else np.inf)


def _ceil(n: int, f: int) -> int:
    return -(-n // f)


def write_level(
    source: zarr.Array,
    target: zarr.Array,
    step: Sequence[int],
    labels: bool,
    *,
    block: Sequence[int] | None = None,
    threads: int | None = None,
    read: Callable[[zarr.Array, Roi], np.ndarray] | None = None,
) -> None:
    """Fill `target` with `source` downsampled by `step` (z, y, x), block by block.

    Each block of `target` (`block`, rounded to whole chunks; default: `BLOCK_ZYX` with y
    and x halved until the finer box is at most `READ_BYTES`) is computed from the box of
    `source` it covers, read through `read` (default: the array's own indexing); `threads`
    blocks at a time (default: the cores this process may use, at most 8).
    """
    lead = tuple(int(n) for n in target.shape[:-3])
    chunks = [int(c) for c in target.chunks[-3:]]
    if block is None:
        block = list(BLOCK_ZYX)
        per_voxel = math.prod(lead) * source.dtype.itemsize * math.prod(step)
        while math.prod(block) * per_voxel > READ_BYTES and block[1] > chunks[1]:
            block[1:] = [max(1, block[1] // 2), max(1, block[2] // 2)]
    whole = [max(c, b // c * c) for b, c in zip(block, chunks, strict=True)]
    boxes = list(BlockGrid(box_of(target.shape[-3:]), whole).boxes())
    reader = read or (lambda array, roi: np.asarray(array[slices(roi)]))
    spatial = box_of(source.shape[-3:])

    def one(box: Roi) -> None:
        fine = Roi(tuple(o * s for o, s in zip(box.offset, step, strict=True)),
                   tuple(n * s for n, s in zip(box.shape, step, strict=True))).intersect(spatial)
        full = Roi((0,) * len(lead) + tuple(fine.offset), lead + tuple(fine.shape))
        target[slices(Roi((0,) * len(lead) + tuple(box.offset), lead + tuple(box.shape)))] = (
            downsample(reader(source, full), step, labels))

    workers = threads or min(8, cpu_cores())
    if workers == 1 or len(boxes) == 1:
        for box in boxes:
            one(box)
        return
    with ThreadPoolExecutor(workers) as pool:
        for done in pool.map(one, boxes):
            del done
