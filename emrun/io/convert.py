"""Convert any volume `open_volume` reads into an emrun OME-Zarr 0.5 image group.

The source is streamed in slabs of whole z-chunks (read a slab, write it, next), so memory
is bounded by one slab, not by the volume: volumes larger than RAM convert. When a slab
of full sections would exceed `max_slab_bytes`, it is further cut along y at chunk
boundaries. The conversion is lossless (values are identical; bool becomes uint8, other
dtypes are kept, in native byte order) and all or nothing: it is written as `NAME.partial`
and renamed to `NAME` only once complete.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from emrun.capacity import check_output_fits
from emrun.geometry import BlockGrid, Roi, box_of, local_slices, slices
from emrun.io.opener import open_volume
from emrun.io.volume import Volume, VolumeError
from emrun.io.write import STORABLE, default_chunks, native_dtype, staged_volume, storable

MAX_SLAB_BYTES = 1 << 30  # cut slabs along y beyond this (very wide sections)


@dataclass(frozen=True)
class ConvertResult:
    """What was written: `path` is what `open_volume` takes ("OUT.zarr/NAME")."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    voxel_size: tuple[float, ...] | None
    chunks: tuple[int, ...]
    path: str
    offset: tuple[int, ...] | None
    source: str


def guess_name(dtype: np.dtype) -> str:
    """Default volume name from the (source) dtype.

    bool -> "mask"; uint8/int8 and floats -> "image"; integers wider than 8 bits -> "labels".
    16-bit EM images exist and are guessed as "labels": pass `name` for those.
    """
    dtype = np.dtype(dtype)
    if dtype.kind == "b":
        return "mask"
    if dtype.kind in "iu" and dtype.itemsize > 1:
        return "labels"
    return "image"


def default_name(dtype: np.dtype, ndim: int, label: bool | None, segmentation: bool) -> str:
    """The volume name when none is given: "labels" for what is written as a segmentation
    (`label`, or its metadata says ids), `guess_name` otherwise, except that "labels" is not
    guessed where the store refuses it: for an image (`label` False) or channels (4-d). A
    uint8 segmentation given --labels was named "image", and a 16-bit 4-d image "labels"."""
    if label or (label is None and segmentation):
        return "labels"
    guess = guess_name(dtype)
    return "image" if guess == "labels" and (label is False or ndim == 4) else guess


MIN_NM, MAX_NM = 1e-3, 1e6  # the stores keep 6 decimals of nm: below this, size is lost


def voxel_size_problem(voxel_size: Sequence[float]) -> str | None:
    """Why a voxel size (nm, zyx) cannot be written, or None: a size below 0.001 nm was
    stored rounded, to 0 below 5e-7 nm (a size given in metres), which was refused only when
    the finished volume's metadata was checked; above 1 mm it is no EM voxel but a slip (a
    size near 1e308 overflowed in the coarser levels' scales, after the writing)."""
    if all(math.isfinite(v) and MIN_NM <= v <= MAX_NM for v in voxel_size):
        return None
    return (f"give sizes in nm from {MIN_NM:g} to {MAX_NM:g} (a size in metres or micrometres "
            "needs converting: 4e-9 m and 0.004 um are 4 nm)")


def output_dtype(dtype: np.dtype) -> np.dtype:
    """The stored dtype: bool -> uint8, otherwise the same values in native byte order."""
    dtype = np.dtype(dtype)
    if dtype.kind == "b":
        return np.dtype(np.uint8)
    return native_dtype(dtype)


def convert(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    name: str | None = None,
    voxel_size: Sequence[float] | None = None,
    chunks: Sequence[int] | None = None,
    progress: bool = True,
    overwrite: bool = False,
    max_slab_bytes: int = MAX_SLAB_BYTES,
    label: bool | None = None,
    levels: int | None = None,
) -> ConvertResult:
    """Convert `source` (TIFF file or folder, HDF5, zarr, .npy) into the volume `out/name`.

    `out` is a *.zarr folder (created when missing; other volumes in it are kept). `name`
    defaults to `default_name` (from the dtype, `label` and the metadata). The voxel size
    (nm, zyx) is `voxel_size`, else the source's metadata, else unknown; the source's
    offset is kept. Sources are 3-d (z, y, x) or 4-d (c, z, y, x). `chunks` default to
    `default_chunks`; for a 4-d source, 3 values are the spatial chunks (all channels in
    each). `label`: write a segmentation (OME labels; default:
    `emrun.io.write.guess_label`); `levels`: pyramid levels (None: the default). A progress
    bar over the slabs goes to stderr when `progress`. Every user-facing problem is a
    VolumeError.
    """
    vol = open_volume(source, voxel_size=voxel_size)
    if vol.ndim not in (3, 4):
        raise VolumeError(
            f"{vol}: is {vol.ndim}-d {list(vol.shape)}; convert takes 3-d (z, y, x) or 4-d "
            "(c, z, y, x) volumes"
        )
    if not storable(vol.dtype):
        raise VolumeError(f"{vol}: unsupported dtype {vol.dtype}; expected {STORABLE}")
    if 0 in vol.shape:
        raise VolumeError(f"{vol}: is empty (shape {list(vol.shape)}); nothing to convert")
    channel_axis = vol.ndim == 4
    if label is None and vol.segmentation:  # its metadata says ids (an OME label image):
        label = True  # a uint8 one too, whose pyramid must not average ids
    if name is None:
        name = default_name(vol.dtype, vol.ndim, label, vol.segmentation)
    dtype = output_dtype(vol.dtype)
    shift_nm = vol.shift_nm if voxel_size is None else None  # a voxel size given: its grid
    voxel_size = _chosen_voxel_size(vol, voxel_size)
    offset = vol.offset if vol.offset is not None and len(vol.offset) == 3 else None
    if chunks is not None and channel_axis and len(chunks) == 3:
        chunks = (vol.shape[0], *chunks)  # spatial chunks given: all channels in each chunk
    if chunks is not None:
        chunks = clipped(chunks, vol.shape)
        check_chunk_files(vol, chunks, dtype.itemsize)
    else:
        chunks = default_chunks(vol.shape, channel_axis)
    target = str(Path(out) / name)
    check_output_fits(out, math.prod(vol.shape) * np.dtype(dtype).itemsize,
                      f"converting {vol} ({'x'.join(map(str, vol.shape))} {np.dtype(dtype)})")

    with staged_volume(
        out,
        name,
        vol.shape,
        dtype,
        chunks=chunks,
        voxel_size=voxel_size,
        offset=offset,
        shift_nm=shift_nm,
        channel_axis=channel_axis,
        label=label,
        levels=levels,
        attrs=_carried_attributes(vol),
        overwrite=overwrite,
        taken="give another --name or output store, or --overwrite to replace it",
    ) as array:
        itemsize = max(vol.dtype.itemsize, dtype.itemsize)
        chunks = tuple(int(c) for c in array.chunks)
        grid = slab_grid(vol.shape, chunks, itemsize, max_slab_bytes)
        with _progress_bar(progress) as bar:
            task = bar.add_task(f"converting {name}", total=len(grid))
            for roi in lazy_boxes(grid):
                data = vol.read(roi)  # one slab: the only pixel data held at a time
                if data.dtype.kind == "b":
                    data = data.view(np.uint8)
                data = data.astype(dtype, copy=False)  # a copy only when byte order differs
                write_by_chunk(array, roi, data)
                del data
                bar.advance(task)
    return ConvertResult(
        name=name,
        shape=vol.shape,
        dtype=dtype,
        voxel_size=tuple(float(v) for v in voxel_size) if voxel_size is not None else None,
        chunks=chunks,
        path=target,
        offset=offset,
        source=str(vol),
    )


convert_volume = convert  # the name `emrun.io` exports (there, `convert` is this module)


def clipped(chunks: Sequence[int], shape: Sequence[int]) -> tuple[int, ...]:
    """`chunks` no larger than the volume along any axis: zarr allocates a chunk whole when
    writing it (--chunks 100000 100000 100000 on a small volume asked for terabytes), and a
    chunk past the volume's end means the whole axis. Anything else wrong with `chunks` is
    the writer's to refuse."""
    if len(chunks) != len(shape):
        return tuple(chunks)
    return tuple(min(c, n) for c, n in zip(chunks, shape, strict=True))


MANY_CHUNKS, MIN_CHUNK_BYTES = 100_000, 4096  # a chunk is one file: one filesystem block at least


def check_chunk_files(vol: Volume, chunks: Sequence[int], itemsize: int) -> None:
    """Refuse chunks so small that the output is more than `MANY_CHUNKS` files of under a
    filesystem block each: --chunks 1 1 1 on a 1024^2 x 128 volume set out to write 134
    million one-byte files, for days, after what it had written was removed on Ctrl-C."""
    if len(chunks) != len(vol.shape) or min(chunks) < 1:
        return  # the writer refuses these, in its words
    count = math.prod(-(-n // c) for n, c in zip(vol.shape, chunks, strict=True))
    size = math.prod(chunks) * itemsize
    if count > MANY_CHUNKS and size < MIN_CHUNK_BYTES:
        raise VolumeError(f"{vol}: --chunks {' '.join(map(str, chunks[-3:]))} makes {count:,} "
                          f"chunks of {size:,} byte(s), one file each; give chunks of at least "
                          f"{MIN_CHUNK_BYTES:,} bytes (e.g. 16 64 64, or leave --chunks out)")


def write_by_chunk(array: zarr.Array, roi: Roi, data: np.ndarray) -> None:
    """Write `data` into `array[roi]` one chunk at a time.

    Handing zarr a whole slab encodes all its chunks concurrently, which measured about 4x
    the slab in extra memory (SNEMI3D, 16 MB slab: +64 MB); chunk by chunk it is ~1.2x,
    for ~10% more time.
    """
    for box in BlockGrid(roi, [int(c) for c in array.chunks]).boxes():
        array[slices(box)] = data[local_slices(box, roi.offset)]


def slabs(
    shape: Sequence[int], chunks: Sequence[int], itemsize: int, max_bytes: int = MAX_SLAB_BYTES
) -> Iterator[Roi]:
    """ROIs covering `shape` in z-order (`slab_grid`'s boxes, one at a time)."""
    yield from lazy_boxes(slab_grid(shape, chunks, itemsize, max_bytes))


def slab_grid(
    shape: Sequence[int], chunks: Sequence[int], itemsize: int, max_bytes: int = MAX_SLAB_BYTES
) -> BlockGrid:
    """The slabs covering `shape`: one z-chunk deep, whole sections when they fit.

    The z axis is the third from last (z, y, x or c, z, y, x). A slab larger than
    `max_bytes` is cut along y into bands of whole y-chunks (at least one chunk).
    """
    z_axis, y_axis = len(shape) - 3, len(shape) - 2
    depth, band = chunks[z_axis], chunks[y_axis]
    others = math.prod(n for i, n in enumerate(shape) if i not in (z_axis, y_axis))
    row_bytes = max(1, itemsize * depth * others)  # one y row of a slab
    rows = max(band, max_bytes // row_bytes // band * band)
    slab = [*(max(1, n) for n in shape[:z_axis]), depth, rows, max(1, shape[-1])]
    return BlockGrid(box_of(shape), slab)


def lazy_boxes(grid: BlockGrid) -> Iterator[Roi]:
    """`grid`'s boxes in raster order, made one at a time: `BlockGrid.boxes` lists them all,
    which kept ~7 objects per slab for the whole conversion (a 1 TB volume has ~250,000
    slabs: tens of MB held, growing with the volume, not bounded by one slab)."""
    for index in itertools.product(*(range(n) for n in grid.counts)):
        yield grid.box(index)


def _chosen_voxel_size(vol: Volume, given: Sequence[float] | None) -> Sequence[float] | None:
    """The voxel size written: `given`, else the source's metadata; refused before any
    writing when it has not 3 values or the store cannot keep it (`voxel_size_problem`)."""
    voxel_size = given if given is not None else vol.voxel_size
    if voxel_size is None:
        return None
    if len(voxel_size) != 3:
        raise VolumeError(f"{vol}: its metadata gives voxel size {list(voxel_size)}, not 3 "
                          "values (z, y, x); give the voxel size explicitly")
    if (problem := voxel_size_problem(voxel_size)) is not None:
        where = " (its metadata's; give the voxel size explicitly)" if given is None else ""
        raise VolumeError(f"{vol}: voxel size {[float(v) for v in voxel_size]} nm{where}: "
                          f"{problem}")
    return voxel_size


def _progress_bar(enabled: bool) -> Progress:
    """A rich progress bar on stderr; off a terminal rich prints only its final state, once."""
    return Progress(
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
    )


def _carried_attributes(vol: Volume) -> dict[str, Any]:
    """The attributes a converted volume keeps: where it came from and, for affinities (4-d),
    their ``offsets``, which `emrun segment` reads to know each channel's edge (without them
    the converted copy had to be given --offsets by hand)."""
    attrs: dict[str, Any] = {"emrun": {"converted_from": str(vol)}}
    offsets = vol.attributes().get("offsets") if vol.ndim == 4 else None
    if offsets is None:
        return attrs
    try:  # a list in zarr's JSON, an array in an HDF5 attribute
        table = np.asarray(offsets, dtype=np.int64)
    except (TypeError, ValueError):
        return attrs  # not offsets as emrun writes them: segment will ask for --offsets
    if table.ndim == 2 and table.shape[0] == vol.shape[0]:
        attrs["offsets"] = table.tolist()
    return attrs
