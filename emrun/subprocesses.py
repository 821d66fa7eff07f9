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
import signal
import sys
from collections.abc import Iterator

PR_SET_PDEATHSIG = 1  # prctl(2)
STOPPING = (signal.SIGTERM, signal.SIGINT)


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
