"""Inference progress: a bar on a terminal, plain periodic lines otherwise (SLURM logs).

Both show blocks done, output voxels per second and the time left. Off a terminal a line is
printed after the first few seconds and then every ``EVERY`` seconds, so a log shows the job
moving without being flooded by one line per block.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
from rich.progress import Progress as Bar

FIRST = 5.0  # seconds before the first plain line
EVERY = 30.0  # seconds between plain lines


@contextmanager
def block_progress(console: Console, clock: Callable[[], float] = time.monotonic
                   ) -> Iterator[Callable[[Any], None]]:
    """A callback for ``run_inference(on_block=...)`` that reports on ``console``."""
    if not console.is_terminal:
        yield _plain_lines(console, clock)
        return
    bar = Bar(TextColumn("blocks"), BarColumn(), MofNCompleteColumn(),
              TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
              console=console, transient=False)
    task = bar.add_task("infer", total=None, rate="")

    def report(p: Any) -> None:
        bar.update(task, total=p.total, completed=p.done + p.skipped,
                   rate=f"{_rate(p):.2f} Mvoxel/s")

    with bar:
        yield report


def _plain_lines(console: Console, clock: Callable[[], float]) -> Callable[[Any], None]:
    started = clock()
    due = [started + FIRST]

    def report(p: Any) -> None:
        now = clock()
        finished = p.done + p.skipped >= p.total
        if now < due[0] and not finished:
            return
        due[0] = now + EVERY
        left = ""
        if p.done and not finished:
            seconds = (now - started) / p.done * (p.total - p.done - p.skipped)
            left = f", about {_duration(seconds)} left"
        console.print(f"infer: {p.done + p.skipped}/{p.total} blocks, {_rate(p):.2f} "
                      f"Mvoxel/s{left}", markup=False, highlight=False)

    return report


def _rate(p: Any) -> float:
    return p.voxels / p.seconds / 1e6 if p.seconds else 0.0


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
