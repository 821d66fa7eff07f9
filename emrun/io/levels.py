"""`--level`: choose one level of a multiscale image by its name or its voxel size.

A level is chosen by rewriting the path to the one that names it (`vol.zarr/image` with
`--level s1` is `vol.zarr/image/s1`), so the choice travels wherever the path goes (job
files, worker processes, recipes) and a path may also name its level directly.
"""

from __future__ import annotations

import math
import os

from emrun.io.opener import open_volume
from emrun.io.volume import Level, VolumeError

SYNTAX = ("a level name (e.g. s1, or 1 for s1) or a voxel size in nm as z,y,x "
          "(e.g. 40,8,8)")


def parse_level(text: str) -> str | tuple[float, float, float]:
    """A level name, or (with commas) a voxel size z, y, x in nm."""
    text = text.strip()
    if not text:
        raise VolumeError(f"--level is empty; give {SYNTAX}")
    if "," not in text:
        return text
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise VolumeError(f"--level {text!r}: a voxel size is three numbers z,y,x in nm "
                          "(e.g. 40,8,8)") from None
    if len(values) != 3 or any(not math.isfinite(v) or v <= 0 for v in values):
        raise VolumeError(f"--level {text!r}: a voxel size is three positive numbers z,y,x "
                          "in nm (e.g. 40,8,8)")
    return values[0], values[1], values[2]


def choose_level(path: str | os.PathLike[str], level: str) -> str:
    """The path of the level of `path`'s multiscale image that `level` names (by name or
    by voxel size); an unknown level lists the levels there are."""
    volume = open_volume(path)
    wanted = parse_level(level)
    levels = volume.levels()
    if not levels:
        raise VolumeError(f"{volume}: --level {level}: not a multiscale image (an OME-Zarr "
                          "image group, an N5 group of levels s0, s1, ... or a neuroglancer "
                          "precomputed volume); it has one level")
    for candidate in levels:
        if _matches(candidate, wanted):
            return candidate.path
    for candidate in levels:
        if isinstance(wanted, str) and _same_number(candidate.name, wanted):
            return candidate.path
    raise VolumeError(f"--level {level}: {volume} has no level {level}; levels: "
                      + ", ".join(describe(c) for c in levels))


def describe(level: Level) -> str:
    """"s1 (40,8,8 nm)": a level's name and voxel size as --level takes them (digits
    enough for `_matches`: 13.3333 was 2.5e-6 from the level's 13.333334, and refused)."""
    if level.voxel_size is None:
        return f"{level.name} (voxel size unknown)"
    return f"{level.name} ({','.join(f'{v:.10g}' for v in level.voxel_size[-3:])} nm)"


def _matches(level: Level, wanted: str | tuple[float, float, float]) -> bool:
    if isinstance(wanted, str):
        return level.name == wanted.strip("/")
    if level.voxel_size is None or len(level.voxel_size) < len(wanted):
        return False  # unknown, or a 2-d image's (y, x): no z to compare
    return all(math.isclose(a, b, rel_tol=1e-6)
               for a, b in zip(level.voxel_size[-3:], wanted, strict=True))


def _same_number(name: str, wanted: str) -> bool:
    """Whether `wanted` and a level's name number the same level, one as N and the other as
    sN (emrun's stores name their levels 0, 1, ...; N5 pyramids and many OME-Zarr writers
    s0, s1, ...), so `--level 1` works on either; an exact name is looked for first."""
    ours, theirs = _number(name), _number(wanted.strip("/"))
    return ours is not None and ours == theirs


def _number(name: str) -> int | None:
    digits = name[1:] if name[:1] in ("s", "S") else name
    return int(digits) if digits.isdigit() and digits.isascii() else None
