"""Stage lines for commands that chain long steps (`emrun demo`, `emrun bench snemi3d`): each
step is announced with the time since the command started, so a terminal or a SLURM log
shows where a run of many minutes is."""

from __future__ import annotations

import time
from typing import Any


class Stages:
    """``stages("segmenting ...")`` prints ``[m:ss] segmenting ...`` on ``console`` (rich
    Console or None: then nothing)."""

    def __init__(self, console: Any, clock: Any = time.monotonic) -> None:
        self.console, self.clock = console, clock
        self.started = clock()

    def __call__(self, text: str) -> None:
        if self.console is None:
            return
        seconds = int(self.clock() - self.started)
        self.console.print(f"[{seconds // 60}:{seconds % 60:02d}] {text}", markup=False,
                           highlight=False)
