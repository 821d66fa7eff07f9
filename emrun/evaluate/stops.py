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

import logging
from contextlib import AbstractContextManager

from emrun.errors import Interrupted
from emrun.subprocesses import catching_signals

__all__ = ["stopped", "stopping"]

MESSAGE = ("evaluate stopped while scoring; it keeps no partial scores and left nothing "
           "behind: run the same command again to score")


def stopped(signal_name: str) -> Interrupted:
    """The stop ``signal_name`` ends evaluate with (the CLI prints 'stopped by SIGTERM: ...'
    and exits 143, or 130 for SIGINT)."""
    return Interrupted(signal_name, MESSAGE)


def stopping() -> AbstractContextManager[list[str]]:
    """Inside this, SIGTERM or SIGINT raises `stopped` at once in the main thread (a later
    one while that unwinds is noted, not raised again, so the cleanup runs to its end);
    yields the names of the signals caught. Schedulers whose loop runs outside Python
    (daisy's) take the signals over inside (`emrun.subprocesses.stop_signals`). Outside the
    main thread nothing is installed."""
    return catching_signals(_stop, first_only=True)


def _stop(signal_name: str) -> None:
    """The first signal's: the stop, raised where the main thread is."""
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)  # zarr's reads cut short
    raise stopped(signal_name)
