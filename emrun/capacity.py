"""Whether a job can fit the machine's disk, checked before it starts.

A volume can declare any shape: a zarr array of 100,000^3 voxels over a few written chunks
is a few files. Writing its conversion, prediction or segmentation would run for days and
then fill the disk; the user's mistake should be one line at the start instead. The output's
compressed size is unknown before it is written, so the check refuses only what cannot fit
even at ``BEST_RATIO`` (no emrun output compresses better than that in practice: uint64
segmentations reach 50-120x); anything smaller is tried, and a disk that fills anyway is
reported as such (see the CLI's guard).
"""

from __future__ import annotations

import math
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

from .errors import UserError

BEST_RATIO = 200
"""Compression no output is expected to beat (raw bytes per stored byte)."""


def size_text(n: float) -> str:
    """Bytes for people, in decimal units: 340 MB, 1.2 GB, 4.0 TB, 800 kB, 12 bytes; the
    largest unit the size rounds to at least 1 of (999.96 GB is "1.0 TB", not "1000.0 GB";
    400 kB free read "0 MB"); beyond 1,000 PB, a power of ten ("7e+28 bytes")."""
    if round(n / 1e15, 1) >= 1000:
        return f"{n:.0e} bytes"
    for unit, scale, digits in SIZE_UNITS:
        if (value := round(n / scale, digits)) >= 1:
            return f"{value:.{digits}f} {unit}"
    return f"{n:.0f} bytes"


def parse_size(text: str, flag: str) -> int:
    """Bytes from a size a person wrote: 20GiB, 500 MB, 1.5TB, 2e9 (bytes); decimal units
    (kB, MB, GB, TB, PB: `size_text`'s) and binary ones (KiB ... PiB), any case.
    A malformed or negative size is ``flag``'s mistake."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match and PARSED_UNITS.get(match.group(2).lower())
    if match is None or unit is None:
        raise UserError(f"{flag} {text!r}: expected a size such as 20GiB, 500MB or 2e9 "
                        "(bytes)")
    size = float(match.group(1)) * unit
    if not math.isfinite(size):
        raise UserError(f"{flag} {text!r}: too large")
    return int(size)


PARSED_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
                "pb": 10**15, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
                "pib": 2**50}
"""`parse_size`'s units, lower-cased."""


SIZE_UNITS = (("PB", 1e15, 1), ("TB", 1e12, 1), ("GB", 1e9, 1), ("MB", 1e6, 0), ("kB", 1e3, 0))
"""`size_text`'s units, largest first, with the decimals each is shown with."""


def free_disk(path: str | os.PathLike[str]) -> int:
    """Bytes free on the file system that holds ``path`` (or its nearest existing folder)."""
    where = Path(path).absolute()
    while not where.exists() and where != where.parent:
        where = where.parent
    return shutil.disk_usage(where).free


def check_output_fits(output: str | os.PathLike[str], raw_bytes: int, what: str,
                      hint: str = "check the input's shape") -> None:
    """Refuse ``what`` (e.g. "segmenting x.zarr/affinity (1 x 10x10x10 uint64)") when
    ``raw_bytes`` of output could not fit in the free disk even compressed ``BEST_RATIO``
    times; ``hint`` says what to do instead."""
    if (kind := pseudo_file_system(output)) is not None:  # not "0 MB is free there"
        raise UserError(f"{output}: cannot be written: {kind}, not a disk; give an output "
                        "on a disk")
    free = free_disk(output)
    if raw_bytes > BEST_RATIO * free:
        raise UserError(f"{output}: {what} is {size_text(raw_bytes)} before compression; "
                        f"{size_text(free)} is free there, so it cannot fit even compressed "
                        f"{BEST_RATIO}x: {hint}")


def work_folder(path: str | os.PathLike[str] | None, option: str) -> str | None:
    """``path``, made if missing, for a command's temporary files (None: the system's
    temporary folder). A file in the way, a pseudo file system, or a folder that cannot be
    made or written, is the user's mistake, named with its ``option``."""
    if path is None:
        return None
    check_work_folder(path, option)  # a file or /proc said as such, not "(File exists)"
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{option} {os.fspath(path)}: cannot make a folder there "
                        f"({exc.strerror or exc})") from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"{option} {os.fspath(path)}: the folder is not writable")
    return os.fspath(path)


def check_work_folder(path: str | os.PathLike[str] | None, option: str) -> None:
    """Refuse ``path`` as `work_folder` would, without making it: a check that runs before
    the volumes are opened must not leave a folder behind when they are then refused."""
    if path is None:
        return
    given = Path(os.path.abspath(path))
    existing = nearest_existing(given)
    if not existing.is_dir():
        what = "is not a folder but a file" if existing.is_file() else "is not a folder"
        raise UserError(f"{option} {os.fspath(path)}: cannot make a folder there "
                        f"({'it' if existing == given else existing} {what})")
    if (kind := pseudo_file_system(existing)) is not None:
        raise UserError(f"{option} {os.fspath(path)}: cannot be written: {kind}, not a "
                        "disk; give a folder on a disk")
    if not os.access(existing, os.W_OK | os.X_OK):
        if existing == given:
            raise UserError(f"{option} {os.fspath(path)}: the folder is not writable")
        raise UserError(f"{option} {os.fspath(path)}: cannot make a folder there "
                        f"({existing} is not writable)")


def nearest_existing(path: str | os.PathLike[str]) -> Path:
    """``path`` (absolute) or the nearest folder above it that exists (a link counts)."""
    where = Path(os.path.abspath(path))
    while not os.path.lexists(where) and where != where.parent:
        where = where.parent
    return where


def pseudo_file_system(path: str | os.PathLike[str]) -> str | None:
    """What ``path`` (or the nearest folder above it that exists) lies on when that is a
    file system with no disk behind it (/proc, /sys: no blocks at all), e.g. "/proc is a
    pseudo file system (proc)"; None otherwise. Root may seem to write there (os.access
    says yes), its free space reads 0 bytes, and no file can be made: "0 MB is free" or
    "No such file or directory" said nothing of why. A FUSE mount that reports no blocks is
    not taken for one (some do, and hold files)."""
    where = nearest_existing(path)
    try:
        if os.statvfs(where).f_blocks != 0:
            return None
    except (OSError, AttributeError):  # no statvfs (Windows) or unreadable: not known
        return None
    mount, kind = _mount_of(Path(os.path.realpath(where)))  # where statvfs looked
    if kind is not None and kind.startswith("fuse"):
        return None
    named = f" ({kind})" if kind else ""
    return f"{mount or where} is a pseudo file system{named}"


def _mount_of(path: Path) -> tuple[str | None, str | None]:
    """The mount point holding ``path`` and its file system type, from /proc/self/mounts
    (Linux); (None, None) where that cannot be read."""
    try:
        lines = Path("/proc/self/mounts").read_text(encoding="utf-8").splitlines()
    except OSError:
        return None, None
    best: tuple[str | None, str | None] = (None, None)
    text = os.fspath(path)
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = _unescaped(fields[1])
        inside = text == point or text.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best[0] or ""):
            best = (point, fields[2])
    return best


def _unescaped(field: str) -> str:
    """A /proc/self/mounts path with the kernel's octal escapes undone (space, tab, newline,
    backslash: ``\\040`` ...)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


MAX_BLOCKS = 1_000_000  # a teravoxel in default blocks is ~60,000


def check_block_count(shape: Sequence[int], block: Sequence[int], option: str = "--block") -> None:
    """Refuse a block so small for the volume that the job would be millions of blocks (and
    as many files per output, and done-markers): `--block 1 1 1` made 65,536 for a 64k-voxel
    volume, and billions on a real one."""
    count = math.prod(-(-int(n) // max(1, int(b))) for n, b in zip(shape, block, strict=True))
    if count > MAX_BLOCKS:
        raise UserError(f"{option} {' '.join(str(b) for b in block)}: makes {count:,} blocks "
                        f"of the {'x'.join(str(n) for n in shape)} volume (and as many files "
                        f"per output); give a larger {option} (at most {MAX_BLOCKS:,} blocks)")
