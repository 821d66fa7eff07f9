"""How `emrun evaluate` stops on SIGTERM (a cluster's time limit, `scancel`, `timeout`) or
SIGINT (Ctrl-C): with one line and exit 143 or 130, its workers stopped and its work folder
gone, as infer and segment stop.

Scoring keeps nothing on disk (a rerun scores everything again), so there is nothing to
finish or keep: in this process the command stops at once (`stopping`), its local worker
processes are killed (`emrun.evaluate.schedule`), and daisy's workers are told to stop
between blocks through a file in the work folder. SIGTERM used to end the command on the
spot without a word, leaving the work folder with every scored block's table, and daisy's
workers wrote on into it.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from typing import Any

from emrun.errors import Interrupted
from emrun.subprocesses import STOPPING

__all__ = ["stopped", "stopping"]

MESSAGE = ("evaluate stopped while scoring; it keeps no partial scores and left nothing "
           "behind: run the same command again to score")


def stopped(signal_name: str) -> Interrupted:
    """The stop ``signal_name`` ends evaluate with (the CLI prints 'stopped by SIGTERM: ...'
    and exits 143, or 130 for SIGINT)."""
    return Interrupted(signal_name, MESSAGE)


@contextlib.contextmanager
def stopping() -> Iterator[list[str]]:
    """Inside this, SIGTERM or SIGINT raises `stopped` at once in the main thread (a later
    one while that unwinds is noted, not raised again, so the cleanup runs to its end);
    yields the names of the signals caught. Schedulers whose loop runs outside Python
    (daisy's) take the signals over inside (`emrun.subprocesses.stop_signals`). Outside the
    main thread nothing is installed."""
    caught: list[str] = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return

    def handler(number: int, frame: Any) -> None:
        caught.append(signal.Signals(number).name)
        if len(caught) == 1:
            logging.getLogger("asyncio").setLevel(logging.CRITICAL)  # zarr's reads cut short
            raise stopped(caught[0])

    previous = {number: signal.signal(number, handler) for number in STOPPING}
    try:
        yield caught
    finally:
        _put_back(previous)


def _put_back(previous: dict[int, Any]) -> None:
    """Put the old handlers back, each even where the first signal comes meanwhile and
    its stop is raised from one of these calls (raised once all are back)."""
    raised: Interrupted | None = None
    for number, old in previous.items():
        try:
            signal.signal(number, old)
        except Interrupted as exc:
            raised = exc
            signal.signal(number, old)  # the stop may have come before this one took
    if raised is not None:
        raise raised
