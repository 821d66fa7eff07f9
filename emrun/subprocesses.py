"""Helper processes (inference workers, training-data loaders) that leave signals to the
process that started them.

A cluster's time limit, `scancel`, GNU `timeout` and Ctrl-C signal the whole process group.
If helpers died of that signal first, the parent would see a crashed helper instead of a
request to stop, and could not checkpoint or mark its finished work. So helpers ignore
SIGINT and SIGTERM (the parent stops them when it has saved what it must) and are killed
by the kernel when the parent dies, so none outlives a killed run to race its resume.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import re
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

PR_SET_PDEATHSIG = 1  # prctl(2)
STOPPING = (signal.SIGTERM, signal.SIGINT)
PUT_BACK_TRIES = 10
"""How often `catching_signals` tries to put an old handler back while signals keep coming."""


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Start helper processes inside this: SIGTERM and SIGINT are held (not lost) in the
    parent until it ends, and a helper starts with them held until it ignores them, so a
    signal to the process group while a helper is still starting up (importing torch takes
    seconds) cannot kill it."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOPPING)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def die_with_parent(parent: int) -> None:
    """Have the kernel kill this process when ``parent`` dies (Linux; elsewhere only the
    check below)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before the request took effect
        os._exit(1)


def leave_signals_to(parent: int, *_: object) -> None:
    """Run first in a helper process started by ``parent`` (extra arguments are ignored, so
    it serves as a DataLoader ``worker_init_fn`` through functools.partial)."""
    die_with_parent(parent)
    for number in STOPPING:
        signal.signal(number, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOPPING)  # held since start: now ignored
    private_blosc_lock()


def private_blosc_lock() -> None:
    """Give numcodecs' Blosc codec a lock of this process before its first use. It makes a
    ``multiprocessing.Lock`` on first use, which in a spawned helper is a named semaphore
    registered with the run's resource tracker; a helper killed outright (the out-of-memory
    killer, or `kill_workers` after it) never unregisters it, and the tracker printed
    'There appear to be N leaked semaphore objects' when the command ended. The lock guards
    Blosc's state within one process, which a spawned process shares with none: a thread
    lock does that, and leaves nothing behind. Nothing changes where numcodecs keeps it
    elsewhere (another version)."""
    try:
        import numcodecs.blosc as blosc
    except ImportError:
        return
    if getattr(blosc, "_MUTEX_IS_INIT", True) is False:
        blosc._MUTEX = threading.Lock()
        blosc._MUTEX_IS_INIT = True


def kill_workers(pool: Any) -> None:
    """SIGKILL the worker processes of a ProcessPoolExecutor whose workers `leave_signals_to`
    their parent. Once one of them is killed (kill -9, the out-of-memory killer), the pool
    ends the others with SIGTERM, which they ignore; one blocked on the task queue's lock
    the killed one held never took its stop, and the pool's shutdown waited on it forever
    (the command hung instead of saying a worker died)."""
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            process.kill()


def _nothing(name: str) -> None:
    """The default of `catching_signals`: the name is noted, nothing more."""


@contextlib.contextmanager
def catching_signals(call: Callable[[str], object] = _nothing, *, first_only: bool = False,
                     signals: Sequence[int] = STOPPING) -> Iterator[list[str]]:
    """Inside this, each of ``signals`` (SIGTERM and SIGINT) is noted by name in the list
    yielded, then ``call(name)`` runs (on the first only with ``first_only``; it may raise
    the stop, which then comes from wherever the main thread was). Every engine's stop is
    built on this, so each gets the fiddly part right: all the old handlers are back after,
    even where a signal that comes while they are put back raises (from ``call`` or from an
    old handler already back: a pending signal runs its handler before the next one is
    set, which then was not); the first such exception is raised once all are back. Python
    runs handlers in the main thread only: outside it nothing is installed, and the list
    stays empty."""
    caught: list[str] = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return

    def handler(number: int, frame: Any) -> None:
        caught.append(signal.Signals(number).name)
        if len(caught) == 1 or not first_only:
            call(caught[-1])

    previous: dict[int, Any] = {}
    try:
        for number in signals:  # one at a time: a stop raised midway puts back those set
            previous[number] = signal.signal(number, handler)
        yield caught
    finally:
        _put_back(previous)


def _put_back(handlers: dict[int, Any]) -> None:
    """Put every old handler back, each even where a signal that came meanwhile raises from
    a handler while they are put back (KeyboardInterrupt, a stop); the first such exception
    is raised once all are back."""
    raised: BaseException | None = None
    for number, old in handlers.items():
        # A pending signal is handled once, before the handler is set: the next try sets it
        # unless yet another came in that instant. Bounded: a handler signal.signal refuses
        # (None: one not set from Python) is refused every time.
        for _ in range(PUT_BACK_TRIES):
            try:
                signal.signal(number, old)
                break
            except BaseException as exc:  # raised below, once all are back
                if raised is None:
                    raised = exc
    if raised is not None:
        raise raised


@contextlib.contextmanager
def stop_signals(on_stop: Callable[[], None] = lambda: None) -> Iterator[list[str]]:
    """Around a scheduler whose loop runs outside Python (daisy's): SIGTERM (a cluster's
    time limit, `scancel`, `timeout`) or SIGINT calls ``on_stop`` at once, from a thread
    (Python runs its signal handlers in the main thread, which is inside that loop), to tell
    the workers to stop between blocks. SIGTERM used to end the process on the spot,
    without a word, while daisy's workers went on writing the output after its lock was
    gone. Yields the names of the signals caught; outside the main thread nothing is
    installed.

    The handlers are `catching_signals`' (which puts the old ones back), but what it notes
    and calls would come too late here: a Python handler runs only once the main thread is
    back in Python, after daisy's loop. The signals are read from the wakeup fd instead,
    which the C-level handler writes at once, by a watcher thread."""
    caught: list[str] = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return
    reader, writer = socket.socketpair()
    writer.setblocking(False)

    def watch() -> None:
        while data := reader.recv(64):
            for number in data:
                if number in STOPPING:
                    caught.append(signal.Signals(number).name)
                    if len(caught) == 1:
                        on_stop()

    watcher = threading.Thread(target=watch, name="emrun-stop-signals", daemon=True)
    watcher.start()
    # The wakeup fd is ours from before our handlers go in until after the old ones are
    # back: a signal at any step is the watcher's, the old handler's, or both. The other
    # way round, one between the wakeup fd's restore and the old handler's met the no-op
    # handler alone and was lost (the command went on as if never told to stop).
    old_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    try:
        with catching_signals():  # its own notes are the watcher's too: left unread
            yield caught
    finally:
        signal.set_wakeup_fd(old_fd)
        writer.close()
        watcher.join(timeout=5)
        reader.close()


def killed_by(worker_error: str | None) -> int | None:
    """The signal that killed a daisy worker, from daisy's report of its last worker error
    ('daisy worker subprocess exited with code -9'), or None. A worker killed (the
    out-of-memory killer's kill -9, a user's) is the machine's or the user's doing, as the
    local schedulers say: under daisy it was 'This is a bug in emrun' and exit 1."""
    found = re.search(r"exited with code -(\d+)", worker_error or "")
    return int(found.group(1)) if found else None


def stop_between_blocks() -> list[str]:
    """In a worker that stops itself between blocks (daisy's): SIGINT and SIGTERM are noted
    in the list returned instead of ending it mid-block (or, ignored, leaving it to finish
    its whole unit of blocks first). In the main thread only."""
    caught: list[str] = []

    def handler(number: int, frame: Any) -> None:
        caught.append(signal.Signals(number).name)

    for number in STOPPING:
        signal.signal(number, handler)
    return caught
