"""Where benchmarks write their temporary volumes, and how they leave nothing behind.

`made_folder` is `emrun.capacity.work_folder` (a ``--folder``/``--workdir`` made if missing)
for a benchmark: the folders it made go again when it ends, so a finished, refused or
stopped run leaves the file system as it found it (a finished one left `a/b` behind, empty).
`remove_tree` removes a temporary folder that zarr may still be writing into: after an
interrupt, zarr's IO thread goes on writing the chunks the interrupted call had queued,
recreating folders while they are removed ("Directory not empty"), and its tasks, destroyed
pending at exit, are logged by the thousand; so its tasks are cancelled first (after an
interrupt only: in a normal run none is left, and another caller's might be) and the removal is
retried until the writes settle.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

from ..capacity import work_folder
from ..subprocesses import catching_signals

SETTLE_SECONDS = 10.0
"""How long `remove_tree` keeps retrying while writes already handed to zarr's threads land."""


@contextlib.contextmanager
def made_folder(path: str | os.PathLike[str] | None, option: str) -> Iterator[str | None]:
    """``work_folder(path, option)`` for the ``with`` block; when the block ends the folders
    this made are removed again (a folder that was there stays): after a failure (an error
    or an interrupt) with what is in them, after a run that finished only while empty (what
    the run left there, or another process put there, is not deleted)."""
    if path is None:
        yield None
        return
    path = os.path.normpath(path)  # `a/b/../c` made a/b too, which the clean-up never reached
    top = _first_missing(Path(path))
    try:
        folder = work_folder(path, option)
        yield folder
    except BaseException:
        if top is not None:
            remove_tree(top)
        raise
    if top is not None:
        _remove_empty(Path(path).absolute(), top)


def _remove_empty(path: Path, top: Path) -> None:
    """Remove ``path`` and the folders above it up to ``top`` (included) while empty."""
    while True:
        try:
            path.rmdir()
        except OSError:  # not empty (or gone): what is left stays
            return
        if path == top or path == path.parent:
            return
        path = path.parent


def terminated_as_interrupt() -> contextlib.AbstractContextManager[list[str]]:
    """While a benchmark writes its temporary arrays: SIGTERM (`timeout`, `kill`, a
    cluster's time limit) stops it as Ctrl-C does, so its temporary folder is removed (the
    default action ended the process at once and left up to hundreds of MB in the system's
    temporary folder). Yields the names of the signals that stopped it ("SIGTERM"); outside
    the main thread nothing is installed."""
    return catching_signals(_interrupt, signals=(signal.SIGTERM,))


def _interrupt(signal_name: str) -> None:
    """Each SIGTERM's: the KeyboardInterrupt a Ctrl-C raises."""
    raise KeyboardInterrupt


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of ``path`` (itself included) that does not exist yet: the one
    that making ``path`` creates first; None when ``path`` exists."""
    path = path.absolute()
    top = None
    while not os.path.lexists(path) and path != path.parent:
        top, path = path, path.parent
    return top


def remove_tree(path: str | os.PathLike[str], *, interrupted: bool = False) -> bool:
    """Remove ``path`` and what is under it, retried while writes already under way recreate
    folders; whether it is gone. ``interrupted``: a call into zarr was cut short, so zarr's
    queued writes (its event loop's tasks, which would go on) are cancelled first."""
    if interrupted:
        stop_zarr_io()
    deadline = time.monotonic() + SETTLE_SECONDS
    while True:
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.lexists(path):
            time.sleep(0.05)  # a write that was under way may make its folder again
            if not os.path.lexists(path):
                return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def stop_zarr_io(timeout: float = SETTLE_SECONDS) -> None:
    """Cancel the tasks on zarr's IO event loop (those an interrupted call left running) and
    wait until they have ended; asyncio's 'Task was destroyed but it is pending!' for any
    left is silenced. Nothing when zarr has not started its loop."""
    try:
        from zarr.core import sync as zarr_sync
    except ImportError:  # pragma: no cover - zarr is a dependency; its layout may change
        return
    loop = getattr(zarr_sync, "loop", [None])[0]
    if loop is None or loop.is_closed() or not loop.is_running():
        return

    async def cancel_all() -> None:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # a loop stopping meanwhile, or a timeout: the retries in remove_tree remain
    with contextlib.suppress(Exception):
        asyncio.run_coroutine_threadsafe(cancel_all(), loop).result(timeout)
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
