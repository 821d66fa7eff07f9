"""The hidden folder beside an export's output where its files are made before the one
step that publishes it (`publish`): a failed or interrupted export leaves neither a
half-written file under the final name nor the folder, and never replaces a file another
export published meanwhile."""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..atomic import fsync_dir
from ..errors import UserError
from ..locks import process_alive
from ..paths import file_in_the_way, missing_folders, remove_empty


@contextlib.contextmanager
def staging_folder(output: Path) -> Iterator[Path]:
    """A new hidden folder beside ``output`` (the same file system, so the final move is a
    rename), removed afterwards whatever happens; the missing folders above ``output`` it
    made are removed too when the export fails, and when they end empty (``..`` in the
    path)."""
    made = missing_folders(output.parent)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(output)
        folder = Path(tempfile.mkdtemp(prefix=f".{output.name}.{_OWNER}.", suffix=".partial",
                                       dir=output.parent))
    except OSError as exc:
        remove_empty(made)
        if (blocking := file_in_the_way(output)) is not None:
            raise UserError(f"{output}: cannot write ({blocking} is a file, not a folder)"
                            ) from exc
        raise UserError(f"{output}: cannot write ({exc.strerror or exc})") from exc
    try:
        yield folder
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        remove_empty(made)
        raise
    shutil.rmtree(folder, ignore_errors=True)
    remove_empty(made)  # only empty ones go: those a path such as new/../x.emrun passed through


_OWNER = f"{os.getpid()}@{socket.gethostname()}"
"""Who stages, in the staging folder's name: a folder whose exporter died can be told from
one still being written."""


def _remove_stale(output: Path) -> None:
    """Remove the staging folders beside ``output`` left by exports killed outright on this
    machine (their process is gone): a model-sized hidden folder stayed there for good,
    even after the same export ran again. Another machine's, or a live process's (two
    exports to one name), are left alone."""
    pattern = re.compile(rf"\.{re.escape(output.name)}\.(\d+)@(.+)\.[^.]+\.partial")
    for folder in output.parent.glob(f".{glob.escape(output.name)}.*.partial"):
        found = pattern.fullmatch(folder.name)
        if found is None or found.group(2) != socket.gethostname():
            continue
        pid = int(found.group(1))
        if pid != os.getpid() and not process_alive(pid):
            if folder.is_dir() and not folder.is_symlink():
                shutil.rmtree(folder, ignore_errors=True)
            else:
                folder.unlink(missing_ok=True)


def publish(staged: Path, output: Path) -> None:
    """Give the finished file ``staged`` its final name ``output``, which must still be free:
    two exports to one name, started together, both found it free, and the later rename
    replaced the earlier's file while both said they wrote it. A hard link takes the name
    only if it is free; a file system without hard links gets a check and a rename."""
    try:
        os.link(staged, output)
    except FileExistsError:
        raise _appeared(output) from None
    except OSError:  # no hard links here (some network and FUSE file systems)
        if output.exists() or output.is_symlink():
            raise _appeared(output) from None
        os.replace(staged, output)
    fsync_dir(output.parent)


def _appeared(output: Path) -> UserError:
    return UserError(f"{output} appeared while this export was being written (another "
                     "export to the same name?); export never overwrites a file: it was left "
                     "as it is, remove it or choose another name")
