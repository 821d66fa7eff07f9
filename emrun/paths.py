"""What a path the user named is, before emrun opens it.

Opening a named pipe, a terminal or another device for reading waits on whoever is at the
other end, possibly forever (`emrun validate /dev/stdin` in a shell hung); emrun reads
recipes, checkpoints and volumes it can open again and seek in, so anything other than a
regular file (or a folder, where a folder is expected) is refused up front.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path


def not_a_file(path: str | os.PathLike[str]) -> str | None:
    """Why ``path``, which exists, cannot be read as a file (a phrase to follow its name),
    or None for a regular file. Links are followed; a loop of links is named as such."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "is a loop of symbolic links"
        return f"cannot be read ({exc.strerror or exc})"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "is a directory, not a file"
    if stat.S_ISFIFO(mode):
        return ("is a named pipe, not a file (emrun reads files it can open again and seek "
                "in: save the stream to a file first)")
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "is a device, not a file"
    return "is not a regular file"


def is_link_loop(path: str | os.PathLike[str]) -> bool:
    """True for a symbolic link that leads back to itself (``exists()`` calls it missing)."""
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno == errno.ELOOP
    return False



def file_in_the_way(path: str | os.PathLike[str]) -> Path | None:
    """For a ``path`` that does not exist yet: the nearest existing folder above it when that
    is a file (``notes.txt/out.zarr``), which no write under it can get past; else None."""
    target = Path(path)
    if target.exists():
        return None
    above = next((p for p in target.parents if p.exists()), None)
    return above if above is not None and not above.is_dir() else None


def suffix_only(path: str | os.PathLike[str]) -> str | None:
    """Why an output store named ``path`` would be a mistake when it is named only by its
    suffix (`.zarr`): a hidden folder that listings leave out (the user meant a name before
    it), as a phrase to follow the path; None otherwise."""
    out = Path(path)
    if out.name.lower() != ".zarr":
        return None
    return (f"names only the suffix, which makes a hidden folder; give a name before it, e.g. "
            f"{out.with_name('volume.zarr')}")


def missing_folders(path: str | os.PathLike[str]) -> list[Path]:
    """``path`` and the folders above it that do not exist (nor are links), outermost
    first: what a ``mkdir -p`` of it makes, so that a command can take them away again."""
    where = Path(path)
    return [p for p in (where, *where.parents) if not p.exists() and not p.is_symlink()][::-1]


def unwritable_folder(path: str | os.PathLike[str]) -> Path | None:
    """The folder that stops ``path`` (a store to make or write into) from being written:
    the nearest existing one of it and its parents, when this process may not write it (a
    plan that only checks says so before a run of hours that would be refused at once);
    None when it may."""
    where = Path(os.path.abspath(path))
    existing = next((p for p in (where, *where.parents) if p.exists()), None)
    if existing is None or not existing.is_dir():
        return None  # a file in the way: the write's own check says so
    return None if os.access(existing, os.W_OK | os.X_OK) else existing


def remove_empty(folders: list[Path]) -> None:
    """Remove ``folders`` (`missing_folders`' list) innermost first, each only while empty."""
    for folder in reversed(folders):
        try:
            folder.rmdir()
        except OSError:
            continue


def make_folder(path: str | os.PathLike[str]) -> Path:
    """``mkdir -p path`` that leaves no empty folder behind that a ``..`` in it only passed
    through (`new/../x` made `new`, and left it); returns the folder made, resolved, which
    is the one to write through (``path`` no longer is where `new` went)."""
    where = Path(path)
    blocking = where if where.exists() and not where.is_dir() else file_in_the_way(where)
    if blocking is not None:  # said as atomic writes say it
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(blocking))
    made = missing_folders(path)
    Path(path).mkdir(parents=True, exist_ok=True)
    target = Path(os.path.realpath(path))
    remove_empty([f for f in made if Path(os.path.realpath(f)) not in (target, *target.parents)])
    return target
