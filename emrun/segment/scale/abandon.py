"""Long calls that do not return to Python until done (compiled loops, a database driver
waiting for a server), run where a stop can leave them.

Python runs a signal handler only in the main thread, between bytecodes: during a compiled
agglomeration of a large graph, or a connect to a PostgreSQL server that does not answer, a
SIGTERM or Ctrl-C waited for the call to return (minutes; the connect timeout). `abandonable`
runs the call in a daemon thread and waits for it in the main thread in a way signals
interrupt: a handler that raises (`MainStops` inside ``cut_short``) ends the wait at once, and
the call is left to end on its own (a process that exits does not wait for it).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar, cast

__all__ = ["THREAD_PREFIX", "abandonable"]

T = TypeVar("T")

THREAD_PREFIX = "emrun-abandonable"
"""The name of every thread `abandonable` starts (tests wait for one left behind)."""

POLL_SECONDS = 0.2
"""How long one wait for the thread lasts before the next: the wait returns as soon as the
call does, and a signal interrupts it; the bound only keeps the main thread checking."""


def abandonable(work: Callable[..., T], *args: Any,
                on_abandon: Callable[[], None] | None = None) -> T:
    """``work(*args)`` in a daemon thread: its result, or its exception raised here. If the
    wait is interrupted (an exception from a signal handler), ``on_abandon`` is called (to
    ask the call to end early) and the thread is left running."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = work(*args)
        except BaseException as exc:  # handed to the waiting thread
            outcome["error"] = exc

    name = f"{THREAD_PREFIX}-{getattr(work, '__name__', 'call')}"
    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(POLL_SECONDS)
    except BaseException:
        if on_abandon is not None:
            on_abandon()
        raise
    if "error" in outcome:
        raise outcome["error"]
    return cast(T, outcome["value"])
