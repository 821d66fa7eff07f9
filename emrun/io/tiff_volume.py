"""TIFF volumes: one multi-page file, or a folder of per-section files.

Shape and dtype come from TIFF headers only. Reads touch only the pages (z sections) in
the ROI. An opened file and its parsed pages are kept per process (`_opened`, a few files,
each under its own lock), so no file offset is shared across a fork, and a slab's read
does not parse every page of the file again (a 4096-page file: 45,000 tifffile objects per
slab, its time growing with the file). tifffile's
log lines inside these reads are caught, not printed: a file that is cut short is refused
on opening with emrun's own one-line error instead, judged from the file's own structure
(its chain of page headers and where each page's data lies), not from tifffile's wording.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import re
import struct
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tifffile

from emrun.geometry import Roi, slices
from emrun.io.metadata import NO_SIZE_UNITS, UNIT_TO_NM, positive_number, unusable_voxel_size
from emrun.io.volume import TIFF_SUFFIXES, Volume, VolumeError, one_line

# what tifffile logs when a file's chain of pages runs past its end: a last resort only,
# as tifffile may reword it; `_pages_in_chain` and `_data_end` judge from the file itself
CUT_SHORT = ("invalid page offset", "invalid offset to page")
MAX_PAGES = 2**32  # a chain longer than this is a loop of page headers

_caught = threading.local()  # per thread: reads in loader threads are caught apart


class _CatchInEmrunReads(logging.Filter):
    """Keep tifffile's records from the terminal while emrun reads (`_tifffile_caught`);
    other uses of tifffile in the process still log as they would."""

    def filter(self, record: logging.LogRecord) -> bool:
        caught = getattr(_caught, "messages", None)
        if caught is None:
            return True
        caught.append(record.getMessage())
        return False


logging.getLogger("tifffile").addFilter(_CatchInEmrunReads())


@contextmanager
def _tifffile_caught() -> Iterator[list[str]]:
    """tifffile's log messages within the block, caught instead of printed (users saw two or
    three `<tifffile.TiffPages @8> invalid page offset` lines before emrun's own error)."""
    outer = getattr(_caught, "messages", None)
    _caught.messages = messages = []
    try:
        yield messages
    finally:
        _caught.messages = outer


@dataclass(frozen=True, kw_only=True)
class TiffVolume(Volume):
    """A multi-page TIFF; page i is section z=i when pages are 2-d."""

    page_stack: bool = False  # sections written one by one: one series per page

    def _read(self, roi: Roi) -> np.ndarray:
        while True:
            opened = _opened(self.path)
            with opened.lock, _tifffile_caught():
                if opened.closed:  # let go by another thread meanwhile: taken anew
                    continue
                self._check_layout(opened)
                series = opened.tif.series[0]
                pages = opened.tif.pages if self.page_stack else series.pages
                if (
                    self.ndim >= 3
                    and len(pages) == self.shape[0]
                    and pages[0] is not None
                    and tuple(pages[0].shape) == self.shape[1:]
                ):
                    rest = slices(roi)[1:]
                    out = np.empty(roi.shape, dtype=self.dtype)
                    for i, index in enumerate(range(roi.begin[0], roi.end[0])):
                        out[i] = pages[index].asarray()[rest]
                    return out
                # Pages don't map to z sections (ImageJ hyperstack, single page): read all.
                return np.asarray(series.asarray())[slices(roi)]

    def _check_layout(self, opened: _Opened) -> None:
        """Refuse a file whose shape or dtype changed since the volume was opened (a new
        version is opened anew): it was read under the old layout, its values cast to the
        old dtype or an array of another shape returned, without a word."""
        if opened.layout is None:
            series = opened.tif.series
            shape = (len(series), *series[0].shape) if self.page_stack else series[0].shape
            opened.layout = tuple(int(n) for n in shape), np.dtype(series[0].dtype)
        shape, dtype = opened.layout
        if shape != tuple(self.shape) or dtype != self.dtype:
            raise VolumeError(f"{self}: the file changed since it was opened (now {dtype} "
                              f"{list(shape)}, opened as {self.dtype} {list(self.shape)}); "
                              "run the command again to read it as it is now")


KEPT_FILES = 32
"""Opened multi-page TIFFs a process keeps (`_opened`): a training mixture reads its
sources' images, labels and masks in turn, and with more files than this each read parsed
its file's pages again (4 kept: six 1000-page files read in turn took 4.1 ms a read
instead of 1.2 ms). One descriptor and the parsed page headers per file."""

FileKey = tuple[str, int, int, int, int, int, int]
"""A version of a file in a process: real path, pid, device, inode, size, modification and
change times (ns). The inode tells a file renamed over the path (an atomic save); the
change time, one written again in place with its modification time put back (cp -p,
rsync -a, tar) or on a file system keeping whole seconds."""


@dataclass(eq=False)
class _Opened:
    """A file opened with its pages parsed once (`_opened`), the lock its reads take (a file
    position is one per handle), whether it was closed (let go: a reader that got it just
    before takes it anew) and, once read, its layout (shape, dtype)."""

    tif: tifffile.TiffFile
    lock: threading.Lock = field(default_factory=threading.Lock)
    closed: bool = False
    layout: tuple[tuple[int, ...], np.dtype[Any]] | None = None

    def close(self) -> None:
        with self.lock:  # after a read in progress
            self.closed = True
            self.tif.close()


_kept: OrderedDict[FileKey, _Opened] = OrderedDict()
_kept_lock = threading.Lock()


def _after_fork_in_child() -> None:
    """A forked child starts with no kept files and a free lock: the parent's handles share
    their file positions with the parent, and a lock a parent's thread held at the fork
    would never be released in the child."""
    global _kept_lock
    _kept_lock = threading.Lock()
    _kept.clear()  # not closed: the parent's (a child's close would not free them anyway)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _opened(path: str) -> _Opened:
    """``path`` opened with its pages parsed once, for this process and this version of the
    file (`FileKey`). The least recently used of more than `KEPT_FILES` is closed, and so
    is an older version of the same file (deleted or replaced: its space is freed)."""
    try:
        key = _file_key(path)
    except FileNotFoundError:
        with _kept_lock:
            gone = _others(os.path.realpath(path), None)
        _close_all(gone)
        raise
    with _kept_lock:
        found = _kept.get(key)
        if found is not None:
            _kept.move_to_end(key)
            return found
    with _tifffile_caught():
        tif = tifffile.TiffFile(path)
    tif.pages.cache = True  # each page header parsed once, on first use
    return _keep(key, tif)


def _file_key(path: str) -> FileKey:
    """This process's key for this version of the file at ``path``."""
    stat = os.stat(path)
    return (os.path.realpath(path), os.getpid(), stat.st_dev, stat.st_ino, stat.st_size,
            stat.st_mtime_ns, stat.st_ctime_ns)


def _keep(key: FileKey, tif: tifffile.TiffFile) -> _Opened:
    """Keep ``tif`` opened under ``key`` (`_opened`); one opened meanwhile by another thread
    is kept instead, and ``tif`` closed. What is let go is closed once the cache's lock is
    released (a close waits for a read in progress)."""
    spare: tifffile.TiffFile | None = tif
    with _kept_lock:
        found = _kept.get(key)
        if found is None:
            found = _kept[key] = _Opened(tif)
            spare = None
        _kept.move_to_end(key)
        gone = _others(key[0], key)
        while len(_kept) > KEPT_FILES:
            gone.append(_kept.popitem(last=False)[1])
    if spare is not None:
        spare.close()
    _close_all(gone)
    return found


def _others(real: str, keep: FileKey | None) -> list[_Opened]:
    """Take this process's versions of the file at real path ``real`` other than ``keep``
    (all where None) out of the cache, for the caller to close once it has released
    ``_kept_lock``, which it holds."""
    pid = os.getpid()
    stale = [k for k in _kept if k[0] == real and k[1] == pid and k != keep]
    return [_kept.pop(k) for k in stale]


def _close_all(files: list[_Opened]) -> None:
    for opened in files:
        opened.close()


@dataclass(frozen=True, kw_only=True)
class TiffStackVolume(Volume):
    """A folder of 2-d sections, one file per z, in natural order of file names."""

    files: tuple[str, ...]

    def _read(self, roi: Roi) -> np.ndarray:
        rest = slices(roi)[1:]
        out = np.empty(roi.shape, dtype=self.dtype)
        for i, index in enumerate(range(roi.begin[0], roi.end[0])):
            name = self.files[index]
            try:
                with _tifffile_caught():
                    section = tifffile.imread(os.path.join(self.path, name))
            except Exception as exc:
                raise VolumeError(f"{self}: cannot read section {name}: {one_line(exc)}") from exc
            if section.shape != self.shape[1:] or section.dtype != self.dtype:
                raise VolumeError(
                    f"{self}: section {name} is {section.dtype} {section.shape}, but the first "
                    f"section is {self.dtype} {self.shape[1:]}; all sections must match"
                )
            out[i] = section[rest]
        return out


def open_tiff(path: str) -> TiffVolume:
    """Header-only inspection of a TIFF file's first series; a file cut short is refused.
    The file, its pages parsed, is kept open for the volume's reads (`_opened`)."""
    key = _file_key(path)
    with _tifffile_caught() as said:
        tif = tifffile.TiffFile(path)
        try:
            volume = _inspected(path, tif, said)
        except BaseException:
            tif.close()
            raise
    _keep(key, tif)
    return volume


def _inspected(path: str, tif: tifffile.TiffFile, said: list[str]) -> TiffVolume:
    """The volume of the opened file ``tif`` at ``path``, checked whole (`open_tiff`);
    ``said``: tifffile's messages so far."""
    _check_chain(path, tif)  # first: tifffile may misparse a page header cut in two
    # each page header is parsed once: finding the series parses them, and the check
    # of where their data ends reads them again from this cache (20,000 pages: ~1 s)
    tif.pages.cache = True
    stack = _page_stack(tif)
    series = tif.series[0] if stack else _first_series(path, tif)
    _check_whole(path, tif, series, said)
    _check_axes(path, series)
    shape = (len(tif.series), *series.shape) if stack else tuple(series.shape)
    shape = tuple(int(n) for n in shape)
    return TiffVolume(
        path=path,
        dataset=None,
        shape=shape,
        dtype=np.dtype(series.dtype),
        voxel_size=_imagej_voxel_size(path, tif, len(shape))
        or _ome_voxel_size(path, tif, len(shape)),
        page_stack=stack,
    )


def _page_stack(tif: tifffile.TiffFile) -> bool:
    """Whether the file is sections written one call each (tifffile's default makes every
    call its own series of one page): several series, each one 2-d page of one shape and
    dtype. Such a stack was read as its first section, and refused as 2-d."""
    series = tif.series
    return len(series) > 1 and all(
        len(s.pages) == 1 and len(s.shape) == 2 and s.shape == series[0].shape
        and s.dtype == series[0].dtype for s in series)


def open_tiff_stack(path: str) -> TiffStackVolume:
    """A folder of sections; the first file sets shape and dtype (checked again on read)."""
    files = tiff_files(path)
    _check_numbering(path, files)
    first = os.path.join(path, files[0])
    try:
        with _tifffile_caught(), tifffile.TiffFile(first) as tif:
            series = _first_series(first, tif)
            _check_axes(first, series)
            section = tuple(int(n) for n in series.shape)
            dtype = np.dtype(series.dtype)
    except (tifffile.TiffFileError, OSError, ValueError) as exc:  # named, as later ones are
        raise VolumeError(f"{path.rstrip('/') or path}: cannot read section {files[0]}: "
                          f"{one_line(exc)}") from exc
    return TiffStackVolume(
        path=path.rstrip("/") or path,
        dataset=None,
        shape=(len(files), *section),
        dtype=dtype,
        files=tuple(files),
    )


def _first_series(path: str, tif: tifffile.TiffFile) -> Any:
    """The file's first image series; a file whose header holds none (damaged after its
    first bytes) is refused by name (it was an IndexError)."""
    if not tif.series:
        raise VolumeError(f"{path}: no image can be read from this TIFF file (damaged, or "
                          "cut short after its header); copy it again")
    others = [s for s in tif.series[1:] if not all(
        getattr(page, "is_reduced", False) for page in s.pages if page is not None)]
    if others:  # pages of another shape start another series, which was dropped unsaid
        shapes = "; ".join(f"{len(s.pages)} of {list(s.shape[-2:])}"
                           for s in [tif.series[0], *others][:4])
        raise VolumeError(f"{path}: holds pages of different shapes ({shapes}), so no one "
                          "stack of sections; crop or pad them to one shape and save again")
    return tif.series[0]


def _check_axes(path: str, series: Any) -> None:
    """Refuse layouts that would be read as the wrong axes: colour samples last (an RGB
    export became z, y, x = rows, columns, 3), ImageJ channels after z (read as c, z) and
    time points of a z stack (read as channels; frames alone, TYX, are read as sections, as
    Fiji often labels a stack's sections)."""
    axes, shape = str(series.axes), tuple(series.shape)
    if len(axes) > 1 and axes.endswith("S") and shape[-1] > 1:
        raise VolumeError(f"{path}: is a colour TIFF ({shape[-1]} samples per pixel, axes "
                          f"{axes}); EM images have one channel: save it as 8- or 16-bit "
                          "greyscale (Fiji: Image > Type > 8-bit) and convert that")
    if "T" in axes and "Z" in axes and shape[axes.index("T")] > 1:
        raise VolumeError(f"{path}: holds {shape[axes.index('T')]} time points of a z stack "
                          f"(axes {axes}), which would be read as channels; emrun reads one: "
                          "save a single time point (Fiji: Image > Duplicate, one frame)")
    if "C" in axes and axes.index("C") > 0 and shape[axes.index("C")] > 1:
        raise VolumeError(f"{path}: holds channels after other axes (axes {axes}, shape "
                          f"{list(shape)}); emrun reads channels first (c, z, y, x): save one "
                          "file per channel, or reorder them (Fiji: Image > Hyperstacks > "
                          "Re-order Hyperstack)")


def _check_whole(path: str, tif: tifffile.TiffFile, series: Any, said: list[str]) -> None:
    """Refuse a file cut short (an unfinished copy or download): its headers alone look
    fine, and it failed only when read, after outputs were made, or lost its last sections
    without a word. Judged by where the pages' data lies against the file's size; the words
    tifffile logs are a last resort only (they change between its versions)."""
    size = os.path.getsize(path)
    end = max(_data_end(series), _pages_data_end(tif))
    if end > size:
        raise VolumeError(f"{path}: the TIFF file is cut short: its image data runs to byte "
                          f"{end:,} but the file has {size:,} bytes; copy it again")
    if any(cut in message for message in said for cut in CUT_SHORT):
        raise VolumeError(f"{path}: the TIFF file is cut short or damaged: only "
                          f"{len(tif.pages)} of its pages can be read; copy it again")


def _check_chain(path: str, tif: tifffile.TiffFile) -> None:
    """Refuse a file whose chain of page headers breaks off: a header, or the pointer to
    the next one, lies past the file's end. The pages before the break read well, so a
    compressed file cut in its middle was a shorter (or 2-d) volume, said only in a log."""
    found, whole = _pages_in_chain(tif, os.path.getsize(path))
    if not whole:
        raise VolumeError(f"{path}: the TIFF file is cut short or damaged: only {found} of "
                          "its pages can be read; copy it again")


def _pages_in_chain(tif: tifffile.TiffFile, size: int) -> tuple[int, bool]:
    """How many page headers (IFDs) the file holds in its chain, and whether the chain
    ends as TIFF says (a zero pointer) rather than past the file's end or in a loop."""
    form, fh = tif.tiff, tif.filehandle
    if not len(tif.pages):
        return 0, True  # not even a first page: `_first_series` names the file damaged
    offset, found, seen = int(tif.pages.first.offset), 0, set()
    while found < MAX_PAGES:
        if offset in seen or offset + form.tagnosize > size:
            return found, False
        seen.add(offset)
        fh.seek(offset)
        count = struct.unpack(form.tagnoformat, fh.read(form.tagnosize))[0]
        pointer = offset + form.tagnosize + count * form.tagsize
        if pointer + form.offsetsize > size:
            return found, False
        found += 1
        fh.seek(pointer)
        offset = int(struct.unpack(form.offsetformat, fh.read(form.offsetsize))[0])
        if offset == 0:
            return found, True
    return found, False


def _pages_data_end(tif: tifffile.TiffFile) -> int:
    """Where the data of the file's pages ends at the latest: each page's strips or tiles,
    read as light frames (offsets and byte counts only) to stay quick for long stacks."""
    pages = tif.pages
    useframes = pages.useframes
    pages.useframes = True
    try:
        return max((_page_end(page) for page in pages if page is not None), default=0)
    finally:
        pages.useframes = useframes


def _page_end(page: Any) -> int:
    parts = zip(getattr(page, "dataoffsets", ()), getattr(page, "databytecounts", ()),
                strict=False)
    return max((int(offset) + int(count) for offset, count in parts if count), default=0)


def _data_end(series: Any) -> int:
    """Where the series' image data ends in the file: its contiguous block's end, else the
    end of its last page's strips or tiles."""
    if series.dataoffset is not None:
        return int(series.dataoffset) + int(series.nbytes)
    last = series.pages[-1] if len(series.pages) else None
    return _page_end(last) if last is not None else 0


def has_tiffs(path: str) -> bool:
    return bool(tiff_files(path))


def tiff_files(path: str) -> list[str]:
    """TIFF file names in a folder, naturally sorted (section_2 before section_10)."""
    names = [
        n
        for n in os.listdir(path)
        if n.lower().endswith(TIFF_SUFFIXES)
        and not n.startswith(".")
        and os.path.isfile(os.path.join(path, n))
    ]
    return sorted(names, key=natural_key)


def _check_numbering(path: str, files: list[str]) -> None:
    """Refuse a folder whose section files are numbered with a gap (s_006.tif, s_008.tif).

    The sections are stacked in order of their names, so a missing file would move every
    later section up by one, out of line with its labels, without a word. When the names
    share one pattern with one varying number, that number must run without a gap in its
    step (0, 1, 2, ... or 0, 30, 60, ... for numbering by depth); numbers with more holes
    than files in their step (rounded depths: 0, 8, 17, 25, ...) are taken as they are.
    """
    numbers = _section_numbers(files)
    if numbers is None:
        return
    seen = sorted(set(numbers))
    if len(seen) < len(numbers):
        twice = sorted({n for n in numbers if numbers.count(n) > 1})
        raise VolumeError(f"{path}: several section files carry the same number "
                          f"{_listed(twice)}; keep one file per section")
    step = math.gcd(*(b - a for a, b in itertools.pairwise(seen)))
    missing = sorted(set(range(seen[0], seen[-1] + 1, step)) - set(seen))
    if len(missing) > len(seen):  # more holes than files: irregular numbering (files named by
        return  # rounded depth, 0, 8, 17, 25, ...), not lost sections
    if missing:
        raise VolumeError(
            f"{path}: section {'number' if len(missing) == 1 else 'numbers'} "
            f"{_listed(missing)} of {seen[0]}..{seen[-1]} {'is' if len(missing) == 1 else 'are'} "
            "missing; the sections are stacked in order, so every later one would move up and "
            "out of line with its labels: add the missing files (or number the files without "
            "a gap if none is missing)")


def _section_numbers(files: list[str]) -> list[int] | None:
    """The one number that varies among the file names (s_000.tif ... s_015.tif: 0..15);
    None when there are fewer than three files, the names do not share one pattern of text
    and numbers, or not exactly one of their numbers varies."""
    if len(files) < 3:
        return None
    parts = [re.split(r"(\d+)", name.lower()) for name in files]
    first = parts[0]
    if any(len(p) != len(first) or p[::2] != first[::2] for p in parts):
        return None  # text between the numbers differs: no single pattern
    varying = [i for i in range(1, len(first), 2) if len({p[i] for p in parts}) > 1]
    if len(varying) != 1:
        return None
    return [int(p[varying[0]]) for p in parts]


def _listed(numbers: list[int]) -> str:
    shown = ", ".join(str(n) for n in numbers[:12])
    return shown + (f", ... ({len(numbers)} in all)" if len(numbers) > 12 else "")


def natural_key(name: str) -> tuple[Any, ...]:
    """Sort key treating digit runs as numbers; text parts and numbers alternate."""
    return tuple(
        int(part) if i % 2 else part.lower() for i, part in enumerate(re.split(r"(\d+)", name))
    )


def _imagej_voxel_size(path: str, tif: tifffile.TiffFile,
                       ndim: int) -> tuple[float, ...] | None:
    """zyx nm from ImageJ 'spacing'/'unit' plus X/YResolution, only when all are present.
    A unit that says no size ("pixel") or a resolution of no pixels per unit reads as
    unknown; a spacing that is not a positive number, pixels that are 0 units wide or a
    unit emrun does not know give way to a stated voxel size (`unusable_voxel_size`)."""
    meta = tif.imagej_metadata or {}
    if ndim != 3 or "spacing" not in meta or "unit" not in meta:
        return None
    tags = tif.pages[0].tags
    xres, yres = tags.get("XResolution"), tags.get("YResolution")
    if xres is None or yres is None:
        return None
    unit = str(meta["unit"] or "").strip().lower()
    if unit in NO_SIZE_UNITS:
        return None  # no physical size to report
    sizes: list[float] = []
    problem = None
    for tag in (yres, xres):
        num, den = tag.value  # pixels per unit, as a rational
        if not num:
            return None
        sizes.append(den / num)
    spacing = positive_number(meta["spacing"])
    if unit not in UNIT_TO_NM:
        problem = f"unit {meta['unit']!r} is not a length unit emrun knows (nm, micron, ...)"
    elif spacing is None:
        problem = f"spacing {meta['spacing']!r} is not a positive number"
    elif not all(math.isfinite(s) and s > 0 for s in sizes):
        problem = (f"pixel width {sizes[1]:g} x height {sizes[0]:g} {meta['unit']} "
                   "(XResolution, YResolution) is not positive")
    if problem is not None:
        return unusable_voxel_size(path, "ImageJ metadata", problem)
    factor = UNIT_TO_NM[unit]
    return tuple(round(s * factor, 6) for s in [spacing, *sizes] if s is not None)


def _ome_voxel_size(path: str, tif: tifffile.TiffFile, ndim: int) -> tuple[float, ...] | None:
    """zyx nm from an OME-TIFF's first image (PhysicalSizeZ/Y/X, in their units, micrometres
    by default as the OME schema has it), only when all three are given; Bio-Formats and
    most microscope software write this, not ImageJ's. A size or unit that cannot be used
    gives way to a stated voxel size (`unusable_voxel_size`). A (c, z, y, x) image has them
    too: they size z, y and x (a multichannel OME-TIFF's were dropped without a word)."""
    if ndim not in (3, 4) or not tif.is_ome or not tif.ome_metadata:
        return None
    try:
        image = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]
        pixels = (image[0] if isinstance(image, list) else image)["Pixels"]
    except (KeyError, IndexError, TypeError, ValueError):
        return None  # metadata of another shape: no size to report
    if not all(f"PhysicalSize{axis}" in pixels for axis in "ZYX"):
        return None
    sizes = []
    for axis in "ZYX":
        value, unit = pixels[f"PhysicalSize{axis}"], str(pixels.get(f"PhysicalSize{axis}Unit",
                                                                  "\u00b5m"))
        number = positive_number(value)
        if unit not in UNIT_TO_NM:
            return unusable_voxel_size(path, "OME-TIFF metadata", f"PhysicalSize{axis}Unit "
                                       f"{unit!r} is not a length unit emrun knows")
        if number is None:
            return unusable_voxel_size(path, "OME-TIFF metadata", f"PhysicalSize{axis} "
                                       f"{value!r} is not a positive number")
        sizes.append(round(number * UNIT_TO_NM[unit], 6))
    return tuple(sizes)
