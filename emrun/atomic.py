"""Write a user's file completely or not at all: into a hidden temporary file beside it,
flushed to disk, then renamed over the target (a rename within a folder is atomic) and the
folder flushed too, so that the rename itself survives a crash."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yields a temporary path to write; on success it replaces ``path``, on failure it is
    removed and ``path`` is left as it was. A symbolic link is written through (its target
    is replaced, the link kept); a parent that is a file is a NotADirectoryError naming it."""
    if path.is_symlink():
        path = path.resolve()
    for folder in (path.parent, *path.parent.parents):  # the nearest one that exists
        if folder.exists():
            if not folder.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(folder))
            break
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (best effort: not every platform allows it)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_text(path: Path, text: str) -> None:
    """``path.write_text(text)``, atomically."""
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes(path: Path, data: bytes) -> None:
    """``path.write_bytes(data)``, atomically."""
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)
