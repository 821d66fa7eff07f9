"""One emrun at a time in a folder it writes (a run directory, an output store, --out).

Two commands writing one place at once mixed their files without a word: two `emrun train`
into one run directory both finished, leaving one run's recipe beside the other's
checkpoints; two `emrun data synth` into one store left one seed's image beside the other's
labels. `hold` takes an exclusive advisory lock (flock) on a hidden ``.emrun-lock`` file in
the folder; the kernel releases it when the process ends, however it ends (kill -9
included), so a resume never finds a stale lock. The file records who holds it, for the
message the second command prints; `release` removes it (an output store keeps no trace),
and a process that locked a file removed meanwhile locks the folder's new one instead. One
that a run killed outright left in a shared folder is its user's (0644): another user locks
it read-only and, once it is theirs, replaces it (`hold`).

Who holds what: `train` its run directory; `infer` its output; `segment` its output store,
and every write of a volume into a store (`data convert`, `data synth`:
`emrun.io.write.held_store`) that store; `demo` and `bench snemi3d` their --out. One
process of a job holds the lock: the one that coordinates it (in `train --gpus N`, rank 0;
the launcher checks first with `check_free`). The job's other processes (the other ranks;
inference and segmentation workers, local or daisy's) write the same place by design and
never take it; one on another machine (a SLURM job step) could not see it anyway.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import UserError

LOCK_NAME = ".emrun-lock"
BUSY = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
"""What flock says when another process holds the lock."""

_held: dict[str, int] = {}
"""Locks this process holds, by folder: taking one again is a no-op (a process that runs
several steps in one folder, or a test that trains and resumes in one process)."""


def hold(folder: Path, advice: str) -> None:
    """Hold ``folder``'s lock until `release` or this process's end; a folder another
    process holds is refused in one line ending with ``advice`` (what to do instead). File
    systems without locks (some network mounts) are used without one."""
    key = os.path.realpath(folder)
    if key in _held:
        return
    path = Path(folder) / LOCK_NAME
    while True:
        fd, refused = _open(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _holder(fd)
            os.close(fd)
            if exc.errno in BUSY:
                raise UserError(_in_use(folder, holder, advice)) from None
            return  # ENOLCK, EOPNOTSUPP: no locks here
        if not _is_file_at(fd, path):
            os.close(fd)  # its holder released (removed) it between our open and our lock
            continue
        if refused is None:
            break
        # another user's file, left by a run that ended without `release` (killed
        # outright): ours replaces it, removed while locked as `release` removes one
        try:
            os.unlink(path)
        except OSError:
            os.close(fd)
            raise refused from None  # a folder this user may not write
        os.close(fd)
    os.ftruncate(fd, 0)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {stamp}\n".encode())
    _held[key] = fd


def _open(path: Path) -> tuple[int, PermissionError | None]:
    """The lock file at ``path`` (made if missing), open for writing; one this user may not
    write (another user's, left in a shared folder by a run killed outright: 0644, theirs)
    is opened for reading, which is enough to lock it, with the refusal to write it."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644), None
    except PermissionError as exc:
        try:
            return os.open(path, os.O_RDONLY | os.O_CLOEXEC), exc
        except OSError:
            raise exc from None  # no file to read (a folder this user may not write)


def contents(folder: Path) -> list[Path]:
    """What ``folder`` holds, its lock file aside (whether a folder is empty, or what a
    command found in it, is asked of what users and commands put there)."""
    return [entry for entry in Path(folder).iterdir() if entry.name != LOCK_NAME]


def held(folder: Path) -> bool:
    """Whether this process holds ``folder``'s lock."""
    return os.path.realpath(folder) in _held


@contextlib.contextmanager
def holding(folder: Path, advice: str) -> Iterator[None]:
    """`hold` ``folder`` for the ``with`` block, then `release` it; a lock this process held
    already (an outer step's) is left to that step."""
    outer = held(folder)
    hold(folder, advice)
    try:
        yield
    finally:
        if not outer:
            release(folder)


@contextlib.contextmanager
def holding_out(out: Path) -> Iterator[None]:
    """Make a command's ``--out`` folder and hold it for the ``with`` block (`demo`, `bench
    snemi3d`): two into one --out mixed their files, and one that went on trained on a
    half-converted copy."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--out {out}: cannot create it ({exc.strerror or exc})") from None
    with holding(out, "give another --out"):
        yield


def check_free(folder: Path, advice: str) -> None:
    """Refuse ``folder`` as `hold` would, without holding it: a launcher's check before the
    processes that will hold it start (torchrun's ranks: a refusal in rank 0 took the
    others down with a page of tracebacks)."""
    path = Path(folder) / LOCK_NAME
    if os.path.realpath(folder) in _held or not path.is_file():
        return
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # fails while another holds it
    except OSError as exc:
        if exc.errno in BUSY:
            raise UserError(_in_use(folder, _holder(fd), advice)) from None
    finally:
        os.close(fd)  # and lets the shared lock go


def _in_use(folder: Path, holder: str, advice: str) -> str:
    return (f"{folder} is in use by another emrun ({holder}): two at once would mix their "
            f"files; wait for it to end, or {advice}")


def release(folder: Path) -> None:
    """Let another process use ``folder``; the lock file goes, removed while still locked
    (a process that opened it meanwhile finds it gone once it has the lock, and takes the
    folder's next one: `hold`)."""
    fd = _held.pop(os.path.realpath(folder), None)
    if fd is not None:
        with contextlib.suppress(OSError):
            if _is_file_at(fd, Path(folder) / LOCK_NAME):
                os.unlink(Path(folder) / LOCK_NAME)
        with contextlib.suppress(OSError):
            os.close(fd)


def _is_file_at(fd: int, path: Path) -> bool:
    """Whether ``fd`` is the file at ``path`` still (not one removed since it was opened)."""
    try:
        now, opened = os.stat(path), os.fstat(fd)
    except OSError:
        return False
    return (now.st_dev, now.st_ino) == (opened.st_dev, opened.st_ino)


def _holder(fd: int) -> str:
    """Who holds the lock, as its file says (empty while the holder is still writing it)."""
    with contextlib.suppress(OSError):
        text = os.pread(fd, 200, 0).decode(errors="replace").strip()
        if text:
            return text
    return "its process is starting"
