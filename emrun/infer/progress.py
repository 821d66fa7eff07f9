"""The inference progress bar: blocks done, output voxels per second, time left."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
from rich.progress import Progress as Bar


@contextmanager
def block_progress(console: Console) -> Iterator[Callable[[Any], None]]:
    """A callback for ``run_inference(on_block=...)`` that draws a bar on ``console``."""
    bar = Bar(TextColumn("blocks"), BarColumn(), MofNCompleteColumn(),
              TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
              console=console, transient=False, disable=not console.is_terminal)
    task = bar.add_task("infer", total=None, rate="")

    def report(p: Any) -> None:
        rate = p.voxels / p.seconds / 1e6 if p.seconds else 0.0
        bar.update(task, total=p.total, completed=p.done + p.skipped,
                   rate=f"{rate:.2f} Mvoxel/s")

    with bar:
        yield report
