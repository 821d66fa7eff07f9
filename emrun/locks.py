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
folder, and its line tells a live holder from one that was killed. A killed holder's file
on this machine is taken over; one on another machine cannot be judged, so the refusal says
to remove it once no emrun uses the folder. The line names its process by more than pid and
host name (`_stamp`): containers commonly share a host name and small pids (pid 1 in each),
so a live holder in another container was judged dead (its pid did not run here, or was
this very process's) and its folder taken over. It adds the machine's boot, the pid
namespace and the process's start time: only a holder of this boot and namespace is judged
(gone, or its pid another process's now); one of another container or an earlier boot is
never taken over, and the refusal says which file to remove. Of any number of processes
that find one stale file, one takes it over (`_take_over`), and an empty one is judged by
the file server's clock or this machine's alone, never the two compared (`_stale_empty`).

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
PROCESS = re.compile(r"\(boot (\S+), pid namespace (\d+), started (\d+)\)")
"""The end of that line (`_process_of`): which boot of the machine, which pid namespace and
which start of the pid; missing in an older emrun's line, and where /proc is missing."""
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
STARTING_S = 60.0
"""How long a lock file may stay empty while its maker is still writing its line; an
older empty one is what a holder killed in between left (only judged without locks)."""

Identity = tuple[int, int, int]
"""A lock file's device, inode and time of last change (`_identity`)."""

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
    process = _process_of(os.getpid())
    known = f" (boot {process[0]}, pid namespace {process[1]}, started {process[2]})" \
        if process is not None else ""
    line = f"pid {os.getpid()} on {socket.gethostname()} since {stamp}{known}\n"
    os.pwrite(fd, line.encode(), 0)
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
        except IsADirectoryError:
            raise UserError(f"{path} is a folder: emrun keeps its lock file there; remove "
                            "that folder") from None
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
        if not _stale(path, holder):  # a line written while it was watched names its holder
            raise UserError(_in_use_unlocked(folder, path, holder or _read_text(path), advice))
        _step("judged")
        mine = _take_over(folder, path, holder, judged, advice)
        if mine is not None:
            return mine
        fd, refused, made = _open(path)  # another process's file now: judged again
        if refused is not None:
            os.close(fd)
            raise refused  # another user's file in a folder this user may not write
    os.close(fd)
    raise UserError(_in_use_unlocked(folder, path, _read_text(path), advice))


def _step(name: str) -> None:
    """Between two steps of a takeover (tests pause here to interleave processes)."""


def _take_over(folder: Path, path: Path, judged: str, identity: Identity,
               advice: str) -> int | None:
    """Replace the stale lock file judged by its line ``judged`` and its `_identity` with
    ours, open and stamped; None where it changed meanwhile (another process took the
    folder over first, or made the next file once it was gone): that one is judged again.

    Only the process that holds the claim on this very file (`_claim`) may remove it, so
    of any number that judged it stale one removes it, and the file it removes is the one
    judged; a new file is made with O_EXCL, so of those that find none one makes it."""
    claim, claim_fd = _claim(folder, path, identity, advice)
    try:
        _step("claimed")
        try:
            now = os.stat(path)
        except FileNotFoundError:
            return None
        if _identity(now) != identity or _read_text(path) != judged:
            return None  # replaced meanwhile (by a claimer before us, now gone)
        try:
            os.unlink(path)
        except PermissionError:  # a sticky-bit folder (/tmp, a shared scratch): owner only
            raise UserError(f"{path}: left by a process that is gone, but it is another "
                            "user's and this folder lets only its owner remove it; ask them "
                            f"(or an administrator) to remove it, or {advice}") from None
        _step("removed")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            return None  # another process found no file and made its own first
        _stamp(fd, durable=True)
        _remove_claims_of_killed(claim)
        return fd
    finally:
        os.close(claim_fd)
        with contextlib.suppress(OSError):
            os.unlink(claim)


def _remove_claims_of_killed(claim: Path) -> None:
    """Remove the claims that `_claim` found left by killed claimers before ``claim``."""
    base, number = claim.name.rsplit(".", 1)
    for earlier in range(int(number)):
        with contextlib.suppress(OSError):
            os.unlink(claim.with_name(f"{base}.{earlier}"))


MAX_CLAIMS = 8
"""Claims on one stale lock file tried in turn, each one's claimer killed meanwhile."""


def _claim(folder: Path, path: Path, identity: Identity, advice: str) -> tuple[Path, int]:
    """Claim the stale lock file of ``identity``: a file named after it, made with O_EXCL
    (atomic on NFS too), so one process at a time has it. A claim whose claimer was killed
    (judged as a lock file is) gives way to the next claim's name; a live claimer is taking
    the folder over, so this process is refused."""
    base = f"{LOCK_NAME}.claim.{identity[1]}-{identity[2]}"  # the same on every client
    number = 0
    while number < MAX_CLAIMS:
        claim = path.with_name(f"{base}.{number}")
        try:
            fd = os.open(claim, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            try:
                other = os.open(claim, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue  # its claimer is done: the same name again
            try:
                claimer = _holder_text(other)
            finally:
                os.close(other)
            if not _stale(claim, claimer):
                raise UserError(_in_use_unlocked(folder, path, claimer, advice)) from None
            number += 1
            continue
        _stamp(fd, durable=True)
        return claim, fd
    raise UserError(_in_use_unlocked(folder, path, _read_text(path), advice))


SETTLE_S = 0.5
"""How long an empty lock file older than `STARTING_S` is watched before it is taken over:
one just made over NFS can show a wrong time (an exclusive create parks a verifier in it)
until its maker's next call, well within this."""


def _stale(path: Path, holder: str) -> bool:
    """Whether the lock file's holder is surely gone: a process of this machine's boot and
    pid namespace that no longer runs, or whose pid another process has now (`_gone`), or
    an empty file its maker left (`_stale_empty`). One on another host, in another
    container or of an earlier boot (its processes cannot be seen from here), or a line
    emrun did not write, cannot be judged. An older emrun's line (pid and host alone) is
    judged by its pid, as before."""
    if not holder:
        try:
            return _stale_empty(path, _identity(os.stat(path)))
        except FileNotFoundError:
            return True  # gone meanwhile
    found = HOLDER.match(holder)
    if found is None or found.group(2) != socket.gethostname():
        return False
    pid = int(found.group(1))
    process = PROCESS.search(holder)
    if process is None:
        return not process_alive(pid)  # this process's own pid included: alive, so in doubt
    boot, namespace, started = process.groups()
    return _gone(pid, (boot, int(namespace), int(started)))


Process = tuple[str, int, int]
"""A process beyond its pid (`_process_of`): boot id, pid namespace, start time in ticks."""


def _gone(pid: int, recorded: Process) -> bool:
    """Whether the process ``recorded`` with ``pid`` no longer runs: judged only where this
    process shares its boot and pid namespace (another container's pids, or an earlier
    boot's, say nothing here: in doubt, it runs)."""
    here = _process_of(os.getpid())
    if here is None or here[:2] != recorded[:2]:
        return False
    now = _process_of(pid)
    if now is None:
        return not process_alive(pid)  # no such process; or one /proc hides (another user's)
    return now[2] != recorded[2]  # the pid is another process's now


def _process_of(pid: int) -> Process | None:
    """Process ``pid``'s boot id, pid namespace (this process's: a pid names a process of
    the namespace it is seen from) and start time (ticks since boot); None where /proc
    cannot tell (not Linux, no such process, one hidden from this user)."""
    try:
        boot = BOOT_ID.read_text(encoding="ascii").strip()
        namespace = int(re.sub(r"\D", "", os.readlink("/proc/self/ns/pid")))
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            started = int(stat.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None
    return boot, namespace, started


def _stale_empty(path: Path, identity: Identity) -> bool:
    """Whether an empty lock file was left by a maker killed before it wrote its line. Its
    time is the file server's, and another machine's clock may differ by minutes, so it is
    compared with the server's own time (a file this process touches beside it), never with
    this machine's clock; where that cannot tell (a time in the future, no file can be made)
    the file is stale once it stayed as it is for `STARTING_S` on this machine's clock."""
    age = _age_on_server(path, identity[2])
    if age is not None and -SKEW_S <= age <= STARTING_S:
        return False  # its maker is writing its line
    if age is not None and age > STARTING_S:
        return _unchanged_for(path, identity, SETTLE_S)
    return _unchanged_for(path, identity, STARTING_S)


SKEW_S = 2.0
"""How far apart two times of one file server may be for one instant (their rounding)."""


def _age_on_server(path: Path, mtime_ns: int) -> float | None:
    """Seconds from ``mtime_ns`` to the file server's now: the time it gives a file this
    process touches beside ``path``; None where no such file can be made."""
    probe = path.with_name(f"{LOCK_NAME}.clock.{socket.gethostname()}.{os.getpid()}")
    try:
        fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    except OSError:
        return None
    try:
        os.utime(fd)  # the server's time, not ours (NFS: set to the server's time)
        now = os.fstat(fd).st_mtime_ns
    except OSError:
        return None
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(probe)
    return (now - mtime_ns) / 1e9


def _unchanged_for(path: Path, identity: Identity, seconds: float) -> bool:
    """Whether the empty lock file of ``identity`` stays as it is, empty, for ``seconds``
    of this machine's clock (checked by opening it anew each time, which NFS revalidates);
    one that changes or goes is judged again by the caller."""
    until = time.monotonic() + seconds
    while True:
        _step("watched")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            if _identity(os.fstat(fd)) != identity or _holder_text(fd):
                return False
        finally:
            os.close(fd)
        left = until - time.monotonic()
        if left <= 0:
            return True
        time.sleep(min(left, max(seconds / 20, 0.01)))


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # another user's process
    return True


def _identity(stat: os.stat_result) -> Identity:
    """Which file a lock file is, and its last change: two empty lock files (a stale one,
    and the one another process has just made in its place) differ only in these."""
    return stat.st_dev, stat.st_ino, stat.st_mtime_ns


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes()[:200].decode(errors="replace").strip()
    except OSError:
        return ""


def _in_use_unlocked(folder: Path, path: Path, holder: str, advice: str) -> str:
    """`_in_use`, plus what to do about a holder that cannot be judged from here."""
    return (f"{_in_use(folder, holder or 'its process is starting', advice)} (this file "
            f"system cannot lock files{_unseen(holder)}: if no emrun uses the folder, "
            f"remove {path})")


def _unseen(holder: str) -> str:
    """Why a holder of this host name cannot be judged, where its line says it: it ran in
    another container or before the machine restarted. Never that it runs: a container
    restarted (Kubernetes after the out-of-memory killer, ``docker restart``) keeps its host
    name and gets a new pid namespace, so its own killed run's file reads the same."""
    found, process = HOLDER.match(holder), PROCESS.search(holder)
    here = _process_of(os.getpid())
    if found is None or process is None or here is None or \
            found.group(2) != socket.gethostname():
        return ""
    if process.group(1) != here[0]:
        return ("; its process ran on another machine of this name, or before this one "
                "restarted")
    if int(process.group(2)) != here[1]:  # a live container's, or one restarted since
        return ("; its process ran in another container, or in this one before it "
                "restarted, whose processes cannot be seen from here")
    return ""


def contents(folder: Path) -> list[Path]:
    """What ``folder`` holds, its lock file aside (whether a folder is empty, or what a
    command found in it, is asked of what users and commands put there)."""
    return [entry for entry in Path(folder).iterdir() if not is_lock_file(entry.name)]


def is_lock_file(name: str) -> bool:
    """Whether ``name`` is one of the lock's own files: the lock, a takeover's claim or a
    clock probe (one a killed claimer left is no user's content)."""
    return name.startswith(LOCK_NAME)


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
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:  # its holder let it go between the two looks: free
        return
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
