"""Multiscale pyramids: how many levels, what each level's factor is, and building them.

Levels 1..N-1 are written after level 0 is complete, each from the level before it, block by
block: a block is one output block of the coarser level (`BLOCK_ZYX`, whole chunks: whole
shards of a sharded level, `write_chunks`), for which the matching box of the finer level is
read, downsampled and written. Blocks are independent (chunk-aligned, no two write the same
chunk file), so `threads` of them run at once
and memory is bounded by `threads` finer blocks of at most `READ_BYTES` (with the
downsampling's temporaries, about twice that for images), whatever the volume's size: the
blocks are enumerated one at a time and no more than `threads` are handed to the pool at
once (`run_bounded`). Each finished block is reported (`done`) so
that a build cut short resumes at the blocks it had not finished (`Progress`, whose journal
of finished blocks `emrun.io.write.build_pyramid` keeps in the image group's hidden
`.emrun-pyramid` folder).

Each level halves y and x; z is halved too only where its voxel size is at most half of
y's at the new level (z no coarser than y before the step), so anisotropic EM (30 x 6 x 6
nm) keeps its sections until y and x have caught up, and isotropic data halves all three
axes. An unknown voxel size is taken as anisotropic: z is kept.

Images and predictions are averaged (integers rounded to nearest, so uint8 stays uint8);
segmentations and labels take the most frequent id of each window (the smallest on ties),
which never invents an id. Windows cut by the volume's end use the voxels present.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import math
import os
import shutil
import threading
import zlib
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import numpy as np
import zarr

try:  # zarr's own event loop, which its stores' coroutines are meant to run on
    from zarr.core.sync import sync as zarr_sync
except ImportError:  # pragma: no cover - a zarr that moved it: a loop of its own per call
    def zarr_sync(coroutine: Any) -> Any:
        return asyncio.run(coroutine)

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
    most = 1 + (max(1, min(y, x)) - 1).bit_length()  # until y or x is one voxel (7: 4, 2, 1)
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
    if data.dtype.kind in "iu" and data.dtype.itemsize == 8:
        present = counts[0][:, None, None] * counts[1][None, :, None] * counts[2][None, None, :]
        return _wide_integer_mean(split, present).astype(data.dtype)
    # sums of at most 8 values of up to 16 bits are exact in float32
    exact32 = data.dtype.itemsize <= 2 or data.dtype == np.float32
    mean = split.sum(axis=(-5, -3, -1), dtype=np.float32 if exact32 else np.float64)
    _divide_by_counts(mean, counts)
    if data.dtype.kind in "iub":
        mean += 0.5  # in place: `mean + 0.5` was one more temporary of the block's size
        np.floor(mean, out=mean)
        if data.dtype.kind != "b":
            info = np.iinfo(data.dtype)
            np.clip(mean, info.min, info.max, out=mean)
    return mean.astype(data.dtype)


def _divide_by_counts(mean: np.ndarray, counts: Sequence[np.ndarray]) -> None:
    """Divide each window's sum by its voxel count, in place, one z plane at a time: the
    counts of the whole block (an int64 array of the output's size, twice a float32 mean)
    were the largest temporary of a pyramid block. The arithmetic is that of dividing by
    the whole array (each plane's counts are the same int64 values)."""
    plane = counts[1][:, None] * counts[2][None, :]
    for z, count in enumerate(counts[0]):
        target = mean[..., z, :, :]
        target /= plane * count


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


def level_block(lead: Sequence[int], itemsize: int, step: Sequence[int],
                chunks: Sequence[int], block: Sequence[int] | None = None) -> tuple[int, ...]:
    """The output block of a coarser level in whole chunks of it (`chunks`, z y x): `block`,
    or `BLOCK_ZYX` with y and x halved until the finer box it reads (`lead` channels of
    `itemsize` bytes, `step` finer voxels per voxel) is at most `READ_BYTES`."""
    if block is None:
        block = list(BLOCK_ZYX)
        per_voxel = math.prod(lead) * itemsize * math.prod(step)
        while math.prod(block) * per_voxel > READ_BYTES and block[1] > chunks[1]:
            block[1:] = [max(1, block[1] // 2), max(1, block[2] // 2)]
    return tuple(max(c, int(b) // c * c) for b, c in zip(block, chunks, strict=True))


def write_level(
    source: zarr.Array,
    target: zarr.Array,
    step: Sequence[int],
    labels: bool,
    *,
    block: Sequence[int] | None = None,
    threads: int | None = None,
    read: Callable[[zarr.Array, Roi], np.ndarray] | None = None,
    skip: Collection[int] = (),
    done: Callable[[int], None] | None = None,
) -> None:
    """Fill `target` with `source` downsampled by `step` (z, y, x), block by block.

    Each block of `target` (`level_block`) is computed from the box of `source` it covers,
    read through `read` (default: the array's own indexing); `threads` blocks at a time
    (default: the cores this process may use, at most 8). Blocks are numbered in the order
    of `level_blocks`; those in `skip` are left as they are (a resumed build) and `done`
    is called with each block's number once its chunks are written.
    """
    lead = tuple(int(n) for n in target.shape[:-3])
    chunks = list(write_chunks(target)[-3:])
    whole = level_block(lead, source.dtype.itemsize, step, chunks, block)
    reader = read or (lambda array, roi: np.asarray(array[slices(roi)]))
    spatial = box_of(source.shape[-3:])

    def one(index: int, box: Roi) -> None:
        fine = Roi(tuple(o * s for o, s in zip(box.offset, step, strict=True)),
                   tuple(n * s for n, s in zip(box.shape, step, strict=True))).intersect(spatial)
        full = Roi((0,) * len(lead) + tuple(fine.offset), lead + tuple(fine.shape))
        values = downsample(reader(source, full), step, labels)
        region = slices(Roi((0,) * len(lead) + tuple(box.offset), lead + tuple(box.shape)))
        clear_shards(target, region)
        target[region] = values
        if done is not None:
            done(index)

    todo = ((i, box) for i, box in level_blocks(target.shape, whole) if i not in skip)
    run_bounded(one, todo, threads or min(8, cpu_cores()))


def write_chunks(array: zarr.Array) -> tuple[int, ...]:
    """The unit a writer must own whole: the shard of a sharded array (one file, rewritten
    whole by a write into any of its inner chunks: two writers of one shard would lose each
    other's chunks), else the chunk. zarr's ``chunks`` is the inner chunk of a sharded
    array, the unit a reader decodes. An array-like without ``shards`` has chunks only."""
    return tuple(int(c) for c in (getattr(array, "shards", None) or array.chunks))


def clear_shards(array: zarr.Array, region: Sequence[slice]) -> None:
    """Remove the files of the shards of ``array`` that ``region`` (a slice per axis) covers
    whole, before a writer that owns them (`write_chunks`) writes them again. zarr's
    sharding codec reads a shard before it writes it, even whole: a shard file cut short (a
    kill mid-write where zarr writes files in place, a crash) failed its checksum on every
    later write, so a resumed job could never finish its block; and each shard a resumed
    block rewrote was read and decoded for nothing. Nothing for an unsharded array (its
    chunks are written over unread), nor for a shard the region covers only in part."""
    shards = getattr(array, "shards", None)
    if not shards:
        return
    ranges = []
    for cut, size, shard in zip(region, array.shape, shards, strict=True):
        start, stop, _ = cut.indices(size)
        end = -(-stop // shard) if stop == size else stop // shard  # an edge shard is whole
        ranges.append(range(-(-start // shard), end))
    where = array.store_path
    for coords in itertools.product(*ranges):
        key = array.metadata.encode_chunk_key(coords)
        zarr_sync(where.store.delete(f"{where.path}/{key}" if where.path else key))


def level_blocks(shape: Sequence[int], block: Sequence[int]) -> Iterator[tuple[int, Roi]]:
    """The blocks of a level of `shape` (its last three axes) with their numbers, in raster
    order, one at a time (a list of a large level's boxes was hundreds of MB)."""
    grid = BlockGrid(box_of(shape[-3:]), block)
    for number, index in enumerate(itertools.product(*(range(c) for c in grid.counts))):
        yield number, grid.box(index)


def run_bounded(one: Callable[[int, Roi], None], todo: Iterable[tuple[int, Roi]],
                workers: int) -> None:
    """Run `one` on each item of `todo`, `workers` at a time, in order, handing the pool no
    more than `workers` at once: `pool.map` took every block of the level up front, about
    1.7 kB of queued work each, 1.8 GB for the million blocks of an 8 TB volume's level 1.
    The first error is raised once the blocks already running are done."""
    if workers <= 1:
        for item in todo:
            one(*item)
        return
    with ThreadPoolExecutor(workers) as pool:
        running: set[Future[None]] = set()
        try:
            for item in todo:
                if len(running) >= workers:
                    _settle(running)
                running.add(pool.submit(one, *item))
            while running:
                _settle(running)
        finally:
            for future in running:
                future.cancel()


def _settle(running: set[Future[None]]) -> None:
    """Wait for one of `running` to end; raise its error, if any."""
    finished, _ = wait(running, return_when=FIRST_COMPLETED)
    running.difference_update(finished)
    for future in finished:
        future.result()


# --- resuming: what a build has finished --------------------------------------------------


def files_stamp(folder: Path) -> str:
    """A digest of what the files under `folder` are: their paths, sizes, modification times
    (nanoseconds) and inode numbers (zarr 3.1.3 on writes each chunk as a new file, renamed
    into place: a chunk written again is another inode, also where the file system's clock
    is coarse; zarr 3.1.0 to 3.1.2 write in place, where the modification time alone tells
    a chunk rewritten at the same size). It tells whether an array was written since the
    stamp was taken without reading its data: a stat per file, nothing more (a copy of the
    store has other inodes, so a copied pyramid is built again once). zarr's temporaries
    (``*.partial``, left by a killed writer) do not count. Folders are walked in name order
    and hashed as they are read: a list of every file's entry, sorted at the end, held ~110
    bytes per chunk file (a GB for a level 0 of 8 million chunks)."""
    digest = hashlib.blake2b(digest_size=16)
    count = 0
    for relative, name, info in _files_in_order(folder, "."):
        digest.update(f"{relative}/{name}\0{info.st_size}\0{info.st_mtime_ns}"
                      f"\0{info.st_ino}\n".encode("utf-8", "surrogateescape"))
        count += 1
    return f"{count}:{digest.hexdigest()}"


def _files_in_order(place: Path, relative: str) -> Iterator[tuple[str, str, os.stat_result]]:
    """The files under `place` (but zarr's ``*.partial``), each with its folder relative to
    the walk's top and its stat, folder by folder in name order (one folder's names held).
    As `os.walk`: links to folders are not followed, links to files are."""
    try:
        with os.scandir(place) as found:
            entries = sorted(found, key=lambda entry: entry.name)
    except OSError:  # gone as we walked, or not a folder
        return
    folders = []
    for entry in entries:
        try:
            if entry.is_dir(follow_symlinks=False):
                folders.append(entry.name)
                continue
            if entry.is_dir() or entry.name.endswith(".partial"):  # a link to a folder
                continue
            info = os.stat(entry.path)
        except FileNotFoundError:  # removed as we walked
            continue
        yield relative, entry.name, info
    del entries
    for name in folders:
        yield from _files_in_order(place / name,
                                   name if relative == "." else f"{relative}/{name}")


class Progress:
    """What a pyramid build has finished, in a folder of plain files: ``build.json`` (what
    the build is: the caller's record), ``<level>.done`` for each finished level and the
    journal ``<level>.blocks`` of the level in progress (`BlockJournal`: one line per
    finished block; a file per block was ~10^6 files in one folder for a large volume, slow
    on the metadata servers of network file systems). The previous release's layout, a
    ``<level>/`` folder of one empty file per block, is still read, so that a build it left
    unfinished resumes with its blocks. Markers are written after what they mark, so a
    build killed at any point finds only finished work marked."""

    RECORD = "build.json"
    JOURNAL = ".blocks"

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def record(self) -> dict[str, Any] | None:
        """The record of the build in progress; None if there is none (or it is unreadable:
        cut short while written, which `start` never leaves)."""
        try:
            found = json.loads((self.folder / self.RECORD).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return found if isinstance(found, dict) else None

    def level_stamp(self, level: int) -> str | None:
        """The `files_stamp` `level` had when it was finished; None if it is not marked
        finished, "" where the marker holds no stamp (the previous release's: empty)."""
        try:
            return (self.folder / f"{level}.done").read_text(encoding="utf-8").strip()
        except (OSError, ValueError):
            return None

    def blocks(self, level: int) -> set[int]:
        """The finished blocks of `level`: its journal's and, left by the previous
        release, its folder's."""
        return (read_journal(self.folder / f"{level}{self.JOURNAL}")
                | _folder_markers(self.folder / str(level)))

    def start(self, record: dict[str, Any], stamps: list[str], resumed: bool) -> None:
        """Begin (or go on with) the build `record` describes, keeping levels 1..k as
        finished with their `stamps` (k of them) and, when `resumed`, the finished blocks of
        level k + 1. The other markers go first and the record is written atomically after
        them: no marker outlives the build it belongs to."""
        kept = len(stamps)
        self.folder.mkdir(parents=True, exist_ok=True)
        journal = self.folder / f"{kept + 1}{self.JOURNAL}"
        going_on = {str(kept + 1), journal.name} if resumed else set()
        for entry in list(self.folder.iterdir()):
            level = entry.name.split(".")[0]
            if not level.isdigit() or int(level) <= kept or entry.name in going_on:
                continue
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink(missing_ok=True)
        if journal.is_dir():  # not a journal (`read_journal` read none): one is made there
            shutil.rmtree(journal)
        if self.record() != record:
            _write_atomically(self.folder / self.RECORD, json.dumps(record))
        for level, stamp in enumerate(stamps, start=1):  # kept: their stamps vouched
            if self.level_stamp(level) != stamp:
                _write_atomically(self.folder / f"{level}.done", stamp)

    def journal(self, level: int) -> BlockJournal:
        """The journal that marks blocks of `level` finished (called from the writing
        threads); use it in a ``with`` block, which closes it however the level ends."""
        return BlockJournal(self.folder / f"{level}{self.JOURNAL}")

    def finish_level(self, level: int, stamp: str) -> None:
        """Mark `level` finished, with the `files_stamp` it has now (a resumed build keeps it
        only while it still has that stamp); its block markers are no longer needed."""
        _write_atomically(self.folder / f"{level}.done", stamp)
        (self.folder / f"{level}{self.JOURNAL}").unlink(missing_ok=True)
        shutil.rmtree(self.folder / str(level), ignore_errors=True)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


class BlockJournal:
    """An append-only file of finished block numbers, one line each: the number in decimal,
    a space and the CRC-32 of the number's digits in 8 hex digits, then a newline
    (`journal_line`). Each line goes in one `os.write` on an ``O_APPEND`` descriptor under a
    lock, so lines of threads never mix. A line is taken only whole and with its check
    (`read_journal`): a line cut short by a kill, or run together with the next one (a
    failed write), never reads as another block. A journal whose last line was cut short
    gets a newline before the next line, so that line stands on its own."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._fd: int | None = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(self._fd).st_size
            if size and os.pread(self._fd, 1, size - 1) != b"\n":
                _write_all(self._fd, b"\n")  # the torn line ends here, unread
        except BaseException:
            self.close()
            raise

    def __call__(self, index: int) -> None:
        """Mark block `index` finished."""
        line = journal_line(index)
        with self._lock:
            if self._fd is None:
                raise ValueError(f"{self.path}: the journal is closed")
            _write_all(self._fd, line)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                fd, self._fd = self._fd, None
                os.close(fd)

    def __enter__(self) -> BlockJournal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_LONGEST_LINE = 64  # a journal line's length is far below this (20 digits, space, 8 hex)


def journal_line(index: int) -> bytes:
    """A block's line in a `BlockJournal`: ``<index> <crc32 of the digits>`` and a
    newline."""
    digits = str(int(index)).encode("ascii")
    return b"%s %08x\n" % (digits, zlib.crc32(digits))


def read_journal(path: Path) -> set[int]:
    """The blocks a `BlockJournal` marks finished (none if it is absent): its whole lines
    whose check matches; the rest (a torn last line, what a failed write left) is ignored."""
    try:
        return {index for line in _whole_lines(path)
                if (index := _journal_index(line)) is not None}
    except (FileNotFoundError, IsADirectoryError):  # a folder there is no journal either
        return set()


def _whole_lines(path: Path, chunk: int = 1 << 20) -> Iterator[bytes]:
    """The newline-ended lines of `path`, without their newline, read a MB at a time (the
    file is not held whole); what follows the last newline is not a line. A stretch
    without newlines longer than any line (zeros a crash left) is not kept as it grows."""
    with path.open("rb") as file:
        rest = b""
        while data := file.read(chunk):
            lines = (rest + data).split(b"\n")
            rest = lines.pop()
            if len(rest) > _LONGEST_LINE:
                rest = b"-"  # no line, whatever follows it up to the next newline
            yield from lines


def _journal_index(line: bytes) -> int | None:
    """The block number of a journal line (its newline cut), None if it does not check
    out: decimal digits without leading zeros, a space, their CRC-32 in 8 hex digits."""
    digits, _, check = line.partition(b" ")
    if (len(check) == 8 and digits.isdigit() and (digits[0] != 0x30 or len(digits) == 1)
            and b"%08x" % zlib.crc32(digits) == check):
        return int(digits)
    return None


def _folder_markers(place: Path) -> set[int]:
    """The finished blocks of the previous release's layout: one empty file per block,
    named by its number, in one folder (one listing)."""
    try:
        names = os.listdir(place)
    except OSError:
        return set()
    return {int(name) for name in names if name.isascii() and name.isdigit()}


def _write_all(fd: int, data: bytes) -> None:
    """Write `data` at the end of `fd`: one `os.write` (a short write, rare on a regular
    file, goes on with the rest)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _write_atomically(path: Path, text: str) -> None:
    """Write `path` through a temporary file and a rename: never half written."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)
