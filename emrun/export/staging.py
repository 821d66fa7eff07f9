"""The hidden folder beside an export's output where its files are made before the one
rename that publishes it: a failed or interrupted export leaves neither a half-written file
under the final name nor the folder."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import UserError


@contextlib.contextmanager
def staging_folder(output: Path) -> Iterator[Path]:
    """A new hidden folder beside ``output`` (the same file system, so the final move is a
    rename), removed afterwards whatever happens."""
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".partial",
                                       dir=output.parent))
    except OSError as exc:
        raise UserError(f"{output}: cannot write ({exc.strerror or exc})") from exc
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
