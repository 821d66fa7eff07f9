"""The checkpoint file: saved atomically, loaded safely, readable by every engine.

A checkpoint is one ``torch.save`` file holding a dict with at least the key ``"iteration"``.
Everything in it must load with ``torch.load(weights_only=True)``: tensors, ints, floats,
complex, strings, bytes, bytearrays, bools, None, lists, tuples, sets, dicts (and
OrderedDicts and Counters), ``torch.Size``, ``torch.dtype``, ``torch.device`` and
``torch.layout``, as values and as dict keys (a tuple key such as ``(z, y, x)`` too).
`save_atomic` checks this before it writes anything (a ``TypeError`` naming the key path,
which is a bug in the caller): a numpy array or a numpy scalar would otherwise save fine and
only fail at resumption.

Saves are atomic: the state is written to a temporary file next to the target, flushed and
fsynced, then renamed onto the target and the directory fsynced. A crash, a kill or a full
disk leaves either the old file or the new one, never a torn one. A failed save (an
``OSError``: disk full, quota, permissions) removes its temporary file and raises
`CheckpointError`; the previous file is untouched.

The file lives here, below the trainer and inference, because both read it; what a run
directory keeps (numbered files, last.pt, best.pt) and the random states are the trainer's
(``emrun.train.checkpoint``).
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import pickle
import re
import tempfile
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any

import torch

from emrun.atomic import fsync_dir
from emrun.errors import DISK_FULL, UserError
from emrun.paths import is_link_loop, not_a_file

__all__ = ["TEMP_SUFFIX", "CheckpointError", "checkpoint_of", "load", "remove", "save_atomic",
           "save_failed"]

TEMP_SUFFIX = ".partial"
"""Temporary files are ``.<name>.<random>.partial`` beside their target."""

_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once, at import: checkpoints get the usual 0o666 & ~umask mode


class CheckpointError(UserError):
    """A checkpoint that is missing, corrupt or incompatible, or a save that failed.

    The message is one line that names the file; as a UserError the CLI exits with code 2.
    """


# --------------------------------------------------------------------------- saving


_SCALARS = (int, float, complex, str, bytes, bytearray, bool, type(None), torch.dtype,
            torch.device, torch.layout)
_CONTAINERS = (list, tuple, set, torch.Size)
_MAPPINGS = (dict, OrderedDict, Counter)


def _check_loadable(obj: Any, where: str = "state") -> None:
    """Raise TypeError at the first object that ``torch.load(weights_only=True)`` refuses.

    Scalars are checked by exact type: numpy's float64 is a ``float`` subclass, yet it is
    pickled as a numpy object that a weights-only load refuses.
    """
    kind = type(obj)
    if isinstance(obj, torch.Tensor) or kind in _SCALARS:
        return
    if kind in _MAPPINGS:
        for key, value in obj.items():
            _check_key(key, where)
            _check_loadable(value, f"{where}[{key!r}]")
        return
    if kind in _CONTAINERS:
        for index, value in enumerate(obj):
            _check_loadable(value, f"{where}[{index}]")
        return
    raise TypeError(f"{where}: a {kind.__module__}.{kind.__qualname__} cannot be loaded with "
                    "weights_only=True; store tensors, numbers, strings, bools, None, lists, "
                    "tuples or dicts")


def _check_key(key: Any, where: str) -> None:
    """A dict key loads as any other object does: a tuple key (an ``(z, y, x)`` offset, a
    pair of names) is as loadable as its items; a numpy one is refused like a numpy value."""
    _check_loadable(key, f"{where}, the key {key!r}")


def remove(path: str | Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def save_failed(path: Path, existed: bool, exc: OSError) -> CheckpointError:
    reason = exc.strerror or str(exc) or type(exc).__name__
    after = ("the previous checkpoint is intact" if existed
             else "nothing was written; earlier checkpoints are as they were")
    hint = "; free space and continue with --resume" if exc.errno in DISK_FULL else ""
    return CheckpointError(f"{path}: could not save checkpoint ({reason}); {after}{hint}")


def save_atomic(path: Path, state: dict) -> None:
    """Write `state` to `path` atomically (temp file, fsync, rename, fsync the directory).

    Creates the parent directory. On an OSError (e.g. ENOSPC) the temporary file is removed,
    the previous file at `path` is left as it was, and a `CheckpointError` is raised. Any
    other exception (a state that cannot be pickled) also removes the temporary file and
    propagates unchanged.
    """
    path = Path(path)
    _check_loadable(state)
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    except OSError as exc:
        raise save_failed(path, existed, exc) from exc
    try:
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), 0o666 & ~_UMASK)  # mkstemp makes it 0o600
            # Serialised in memory first: writing to the file straight away, torch turns a
            # full disk into "RuntimeError: unexpected pos" and the cause is lost.
            buffer = io.BytesIO()
            torch.save(state, buffer)
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except OSError as exc:
        remove(temp)
        raise save_failed(path, existed, exc) from exc
    except BaseException:
        remove(temp)
        raise
    fsync_dir(path.parent)


# --------------------------------------------------------------------------- loading


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_REFUSED = re.compile(r"WeightsUnpickler error: (.*?)(?:\. Please|\.?$)", re.MULTILINE)


def _detail(exc: BaseException, limit: int = 160) -> str:
    """The informative part of torch's (long, multi-line) error message, on one line."""
    text = _ANSI.sub("", str(exc)).strip()
    refused = _REFUSED.search(text)
    if refused:
        line = refused.group(1)
    else:
        line = text.splitlines()[0].split(". ")[0].strip() if text else ""
        if len(line) < 12:  # KeyError: '101' and the like
            line = f"{type(exc).__name__}: {line}" if line else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def load(path: Path) -> dict:
    """Load a checkpoint onto the CPU with ``weights_only=True``.

    Raises `CheckpointError` (naming `path`) when the file is missing, is not a torch file,
    is truncated, holds objects a weights-only load refuses, or is not a dict with the key
    ``"iteration"``.
    """
    path = Path(path)
    if is_link_loop(path):
        raise CheckpointError(f"{path} is a loop of symbolic links")
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a checkpoint file")
    if (why := not_a_file(path)) is not None:
        raise CheckpointError(f"{path} {why}")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read checkpoint ({exc.strerror or exc})") from exc
    if not head:
        raise CheckpointError(f"{path} is not an emrun checkpoint: the file is empty")
    if head != b"PK\x03\x04" and head[:1] != b"\x80":  # zip (torch.save) or legacy pickle
        raise CheckpointError(f"{path} is not an emrun checkpoint: not a PyTorch file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path} is not an emrun checkpoint (it holds objects a weights-only load refuses, "
            f"or it is corrupt): {_detail(exc)}"
        ) from exc
    except OSError as exc:
        if exc.errno == errno.EINVAL:  # torch's zip reader seeking past a cut-short file's end
            raise CheckpointError(f"{path} is not an emrun checkpoint (truncated or corrupt): "
                                  "its archive ends early") from exc
        raise CheckpointError(f"{path}: cannot read checkpoint ({exc.strerror or exc})") from exc
    except Exception as exc:  # torch raises RuntimeError, EOFError, KeyError, ... here
        raise CheckpointError(
            f"{path} is not an emrun checkpoint (truncated or corrupt): {_detail(exc)}"
        ) from exc
    if not isinstance(state, dict):
        raise CheckpointError(
            f"{path} is not an emrun checkpoint: it holds a {type(state).__name__}, not a dict"
        )
    if "iteration" not in state:
        raise CheckpointError(f"{path} is not an emrun checkpoint: it has no 'iteration'")
    return state


# --------------------------------------------------------------------------- a run's checkpoint


RUN_CHOICE = ("best.pt", "last.pt")
"""What a run directory stands for, first found: its best checkpoint by validation, else its
newest (the network one would ship, or fine-tune from)."""


def checkpoint_of(source: Path) -> Path:
    """The file ``source`` names: itself, or a run directory's best (else newest) checkpoint.
    Here, below the trainer and export, so that ``export RUN_DIR`` and ``train --init-from
    RUN_DIR`` choose the same file. A directory that is no run is refused naming what was
    expected (`UserError`)."""
    source = Path(source)
    if source.is_file():
        return source
    if not source.exists():
        raise UserError(f"{source}: no such run directory, checkpoint or model package")
    if not source.is_dir() and (why := not_a_file(source)) is not None:
        raise UserError(f"{source} {why}")
    for name in RUN_CHOICE:
        if (source / "checkpoints" / name).is_file():
            return source / "checkpoints" / name
    numbered = _numbered(source / "checkpoints")
    if numbered:  # a run stopped between saving iter_N.pt and pointing last.pt at it
        raise UserError(f"{source} has no checkpoints/best.pt or checkpoints/last.pt, but "
                        f"has {numbered[-1].name} (its newest): give that file, "
                        f"{numbered[-1]}")
    raise UserError(f"{source} is a directory without checkpoints/best.pt or "
                    "checkpoints/last.pt: give a run directory, a checkpoint file or a model "
                    "package")


def _numbered(folder: Path) -> list[Path]:
    """The run's numbered checkpoints (``iter_NNNNNNN.pt``), oldest first."""
    with contextlib.suppress(OSError):
        return sorted(p for p in folder.glob("iter_*.pt") if p.is_file())
    return []
