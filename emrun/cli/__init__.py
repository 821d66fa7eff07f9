"""The `emrun` command line: one small function per command, wiring only.

`app` holds the typer apps and the guard; `commands`, `bench` and `data` register their
commands on them when imported here.
"""

from . import bench, commands, data  # noqa: F401  (registers the commands)
from .app import app, main

__all__ = ["app", "main"]
