"""The folder a benchmark writes its temporary volumes under (``--folder``, ``--workdir``)."""

from __future__ import annotations

import os

from ..errors import UserError


def scratch_folder(path: str | os.PathLike[str] | None, option: str) -> str | None:
    """``path``, created if missing (None: the system's temp folder). A file in the way or a
    folder that cannot be made is the user's mistake, named with its ``option``."""
    if path is None:
        return None
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{option} {os.fspath(path)}: cannot make a folder there "
                        f"({exc.strerror or exc})") from exc
    return os.fspath(path)
