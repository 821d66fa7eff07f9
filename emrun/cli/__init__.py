"""The `emrun` command line: one small function per command, wiring only.

`app` holds the typer apps and the guard; `commands`, `bench` and `data` register their
commands on them when imported here.
"""

import sys

try:
    from . import bench, commands, data  # noqa: F401  (registers the commands)
    from .app import app, main
except KeyboardInterrupt:  # Ctrl-C while emrun starts, before the guard is there
    sys.stderr.write("stopped by SIGINT (Ctrl-C) while emrun was starting: nothing was "
                     "done\n")
    raise SystemExit(130) from None

__all__ = ["app", "main"]
