"""The two kinds of failure: the user's (exit 2, one clear message) and ours (exit 1)."""

from __future__ import annotations

import errno
from collections.abc import Iterator

DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
NOT_ALLOWED = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})
"""A place the user pointed at that this user may not write (or read): theirs to change."""
NOT_A_FOLDER = frozenset({errno.ENOTDIR})
"""A path whose parent the user gave is a file: theirs to change."""


class UserError(Exception):
    """Something the user can fix: a recipe, a volume, an argument. Exits with code 2."""


class UserWarned(UserWarning):
    """A warning for the user (metadata passed over, a setting that will not do what it
    seems): the command goes on, and the CLI prints it as one `warning:` line."""


class NotImplementedYet(Exception):
    """A command or registered name whose implementation has not landed. Exits with code 1."""


class Interrupted(Exception):
    """A command stopped by SIGINT or SIGTERM after saving its work; the message says what
    was kept and how to go on. Exits 130 (SIGINT) or 143 (SIGTERM), as a shell reports a
    process ended by that signal."""

    def __init__(self, signal_name: str, message: str) -> None:
        super().__init__(message)
        self.signal_name = signal_name

    @property
    def exit_code(self) -> int:
        return 130 if self.signal_name == "SIGINT" else 143


def disk_full(exc: BaseException) -> OSError | None:
    """The 'no space left' (or quota) error behind ``exc``, if that is what it is: zarr and
    the libraries under it may raise it from their own threads or chained to another."""
    return _behind(exc, DISK_FULL)


def not_allowed(exc: BaseException) -> OSError | None:
    """The read-only file system or permission error behind ``exc``, if that is what it is
    (an output under a read-only mount, a folder of another user)."""
    return _behind(exc, NOT_ALLOWED)


def not_a_folder(exc: BaseException) -> OSError | None:
    """The error of a path under a file (``notes.txt/out.json``) behind ``exc``, if any."""
    return _behind(exc, NOT_A_FOLDER)


HOST_ALLOCATOR = ("can't allocate memory", "not enough memory")  # torch's CPU allocator


def host_out_of_memory(exc: BaseException) -> str | None:
    """What ran out, in short, when ``exc`` (or its cause) is the host's memory running out:
    numpy's MemoryError or torch's CPU allocator; None otherwise."""
    for current in _chain(exc):
        text = " ".join(str(current).split())
        if isinstance(current, MemoryError) or (
                isinstance(current, RuntimeError) and any(m in text for m in HOST_ALLOCATOR)):
            return (text[:160] + "...") if len(text) > 160 else (text or "MemoryError")
    return None


def _behind(exc: BaseException, codes: frozenset[int]) -> OSError | None:
    """The first OSError with one of ``codes`` in ``exc``'s chain of causes."""
    return next((c for c in _chain(exc) if isinstance(c, OSError) and c.errno in codes), None)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and its causes (or the exceptions it was raised while handling), each once."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__
