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

A file system that cannot lock files (an NFS mount without its lock service: flock says
ENOLCK) gets the lock file alone instead, said once on stderr: whoever creates it holds the
folder, and its line (pid, host) tells a live holder from one that was killed. A killed
holder's file on this machine is taken over; one on another machine cannot be judged, so
the refusal says to remove it once no emrun uses the folder.

Who holds what: `train` its run directory; `infer` its output; `segment` its output store,
and every write of a volume into a store (`data convert`, `data synth`:
`emrun.io.write.held_store`) that store; `demo` and `bench snemi3d` their --out. One
process of a job holds the lock: the one that coordinates it (in `train --gpus N`, rank 0;
the launcher checks first with `check_free`). The job's other processes (the other ranks;
inference and segmentation workers, local or daisy's) write the same place by design and
never take it; one on another machine (a SLURM job step) could not see it anyway.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import os
import re
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import UserError

LOCK_NAME = ".emrun-lock"
BUSY = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
"""What flock says when another process holds the lock."""

HOLDER = re.compile(r"pid (\d+) on (\S+) since ")
"""The line a holder writes into the lock file (`_stamp`)."""
STARTING_S = 60.0
"""How long a lock file may stay empty while its maker is still writing its line; an
older empty one is what a holder killed in between left (only judged without locks)."""

_told_no_locks = False
"""Whether this process has said once that the file system cannot lock files."""

_without_locks: dict[str, tuple[Path, int]] = {}
"""Folders held by their lock file alone, with the pid that holds each: no kernel lets
them go when the process ends, so `_release_at_exit` does (a forked child leaves them)."""

_held: dict[str, int] = {}
"""Locks this process holds, by folder: taking one again is a no-op (a process that runs
several steps in one folder, or a test that trains and resumes in one process)."""


def hold(folder: Path, advice: str) -> None:
    """Hold ``folder``'s lock until `release` or this process's end; a folder another
    process holds is refused in one line ending with ``advice`` (what to do instead). File
    systems without locks (some network mounts) are held by the lock file alone."""
    key = os.path.realpath(folder)
    if key in _held:
        return
    path = Path(folder) / LOCK_NAME
    while True:
        fd, refused, made = _open(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in BUSY:
                holder = _holder(fd)
                os.close(fd)
                raise UserError(_in_use(folder, holder, advice)) from None
            _tell_no_locks(folder, exc)  # ENOLCK, EOPNOTSUPP: no locks here
            fd = _claim_without_locks(folder, path, fd, made, advice)
            _stamp(fd, durable=True)
            _held[key] = fd
            if not _without_locks:
                atexit.register(_release_at_exit)
            _without_locks[key] = (Path(folder), os.getpid())
            return
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
    _stamp(fd, durable=False)
    _held[key] = fd


def _stamp(fd: int, durable: bool) -> None:
    """Write who holds the lock into its file; ``durable``: flushed to the server at once,
    where the file itself is the lock (another NFS client reads it before we close it)."""
    os.ftruncate(fd, 0)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {stamp}\n".encode())
    if durable:
        with contextlib.suppress(OSError):
            os.fsync(fd)


def _open(path: Path) -> tuple[int, PermissionError | None, bool]:
    """The lock file at ``path`` (made if missing), open for writing, and whether this call
    made it; one this user may not write (another user's, left in a shared folder by a run
    killed outright: 0644, theirs) is opened for reading, which is enough to lock it, with
    the refusal to write it."""
    while True:
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                           0o644), None, True
        except FileExistsError:
            pass
        except PermissionError as exc:
            try:
                return os.open(path, os.O_RDONLY | os.O_CLOEXEC), exc, False
            except OSError:
                raise exc from None  # no file to read (a folder this user may not write)
        try:
            return os.open(path, os.O_RDWR | os.O_CLOEXEC), None, False
        except FileNotFoundError:
            _check_not_dangling(path)
            continue  # its holder released it between our two opens
        except PermissionError as exc:
            try:
                return os.open(path, os.O_RDONLY | os.O_CLOEXEC), exc, False
            except FileNotFoundError:
                continue


def _check_not_dangling(path: Path) -> None:
    """Refuse a lock file that is a link to nothing: it exists for O_EXCL but not for an
    open, so `_open` went round forever (at 100 % CPU) where it was a FileNotFoundError."""
    if path.is_symlink() and not path.exists():
        raise UserError(f"{path} is a link to {os.readlink(path)}, which does not exist: "
                        "emrun keeps its lock there; remove the link")


def _tell_no_locks(folder: Path, exc: OSError) -> None:
    """Say once per process that locks are missing here, and what stands in for them."""
    global _told_no_locks
    if _told_no_locks:
        return
    _told_no_locks = True
    why = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    print(f"warning: {folder}: this file system cannot lock files ({why}); emrun marks the "
          f"folders it writes with its {LOCK_NAME} file alone, which a run killed on "
          "another machine leaves behind: remove it by hand once no emrun uses the folder",
          file=sys.stderr, flush=True)


def _release_at_exit() -> None:
    """Let go of the folders this process holds by lock file alone, as the kernel lets go
    of a lock; a forked child, which inherits the record, leaves its parent's alone."""
    for key, (folder, pid) in list(_without_locks.items()):
        if pid == os.getpid():
            release(folder)
        _without_locks.pop(key, None)


def _claim_without_locks(folder: Path, path: Path, fd: int, made: bool, advice: str) -> int:
    """The lock file, made by us, open for writing, where no lock can be taken: the one
    this process just made, else one that replaces a stale one (its holder is gone). A live
    holder's file, or one that cannot be judged, is refused."""
    for _ in range(3):
        if made:
            return fd
        holder, judged = _holder_text(fd), _identity(os.fstat(fd))
        os.close(fd)
        if not _stale(path, holder):
            raise UserError(_in_use_unlocked(folder, path, holder, advice))
        _set_aside(path, holder, judged)
        fd, refused, made = _open(path)
        if refused is not None:
            os.close(fd)
            raise refused  # another user's file in a folder this user may not write
    os.close(fd)
    raise UserError(_in_use_unlocked(folder, path, _read_text(path), advice))


def _stale(path: Path, holder: str) -> bool:
    """Whether the lock file's holder is surely gone: a process on this machine that no
    longer runs (or this process's own pid, left by an earlier process given the same pid,
    as containers do), or no line written for `STARTING_S`. One on another host, or a line
    emrun did not write, cannot be judged."""
    if not holder:
        try:
            return time.time() - os.stat(path).st_mtime > STARTING_S
        except OSError:
            return True  # gone meanwhile
    found = HOLDER.match(holder)
    if found is None or found.group(2) != socket.gethostname():
        return False
    pid = int(found.group(1))
    return pid == os.getpid() or not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # another user's process
    return True


def _identity(stat: os.stat_result) -> tuple[int, int, int]:
    """Which file a lock file is, and its last change: two empty lock files (a stale one,
    and the one another process has just made in its place) differ only in these."""
    return stat.st_dev, stat.st_ino, stat.st_mtime_ns


def _set_aside(path: Path, judged: str, identity: tuple[int, int, int]) -> None:
    """Remove the stale lock file judged by its line ``judged`` and its `_identity`; one
    that changed meanwhile (another process took the folder over first, maybe not yet
    written its line: an empty file as the stale one was) is put back, to be judged again."""
    aside = path.with_name(f"{LOCK_NAME}.{socket.gethostname()}.{os.getpid()}.stale")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return  # removed meanwhile
    try:
        if _read_text(aside) != judged or _identity(os.stat(aside)) != identity:
            with contextlib.suppress(FileExistsError):
                os.link(aside, path)
    finally:
        os.unlink(aside)


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes()[:200].decode(errors="replace").strip()
    except OSError:
        return ""


def _in_use_unlocked(folder: Path, path: Path, holder: str, advice: str) -> str:
    """`_in_use`, plus what to do about a holder that cannot be judged from here."""
    return (f"{_in_use(folder, holder or 'its process is starting', advice)} (this file "
            f"system cannot lock files: if no emrun uses the folder, remove {path})")


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
        holder = _holder_text(fd)  # no locks here: the file's line says who holds it
        if not _stale(path, holder):
            raise UserError(_in_use_unlocked(folder, path, holder, advice)) from None
    finally:
        os.close(fd)  # and lets the shared lock go


def _in_use(folder: Path, holder: str, advice: str) -> str:
    return (f"{folder} is in use by another emrun ({holder}): two at once would mix their "
            f"files; wait for it to end, or {advice}")


def release(folder: Path) -> None:
    """Let another process use ``folder``; the lock file goes, removed while still locked
    (a process that opened it meanwhile finds it gone once it has the lock, and takes the
    folder's next one: `hold`)."""
    _without_locks.pop(os.path.realpath(folder), None)
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
    return _holder_text(fd) or "its process is starting"


def _holder_text(fd: int) -> str:
    """The lock file's line, empty while its holder is still writing it."""
    with contextlib.suppress(OSError):
        return os.pread(fd, 200, 0).decode(errors="replace").strip()
    return ""
