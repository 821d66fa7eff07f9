"""Checkpoints: atomic saves, safe loads, every random state, and a directory of them.

A checkpoint is one ``torch.save`` file holding a dict with at least the key ``"iteration"``.
Everything in it must load with ``torch.load(weights_only=True)``: tensors, ints, floats,
complex, strings, bytes, bools, None, lists, tuples, sets, dicts (and OrderedDicts),
``torch.Size``, ``torch.dtype`` and ``torch.device``. `save_atomic` checks this before it
writes anything (a ``TypeError`` naming the key path, which is a bug in the caller): a numpy
array or a numpy scalar would otherwise save fine and only fail at resumption.

Saves are atomic: the state is written to a temporary file next to the target, flushed and
fsynced, then renamed onto the target and the directory fsynced. A crash, a kill or a full
disk leaves either the old file or the new one, never a torn one. A failed save (an
``OSError``: disk full, quota, permissions) removes its temporary file and raises
`CheckpointError`; the previous file is untouched.

A run directory's ``checkpoints/`` (see `CheckpointDir`) holds::

    iter_0000100.pt  iter_0000200.pt  ...   numbered, the newest `keep` of them
    last.pt                                 the newest checkpoint (a hard link when possible)
    best.pt                                 the best by validation, when the trainer saves one
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import random
import re
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DISK_FULL, UserError
from ..paths import is_link_loop, not_a_file

__all__ = [
    "CheckpointDir",
    "CheckpointError",
    "load",
    "rng_state",
    "save_atomic",
    "set_rng_state",
]

TEMP_SUFFIX = ".partial"
"""Temporary files are ``.<name>.<random>.partial`` beside their target."""

_NUMBERED = re.compile(r"^iter_(\d+)\.pt$")

_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once, at import: checkpoints get the usual 0o666 & ~umask mode


class CheckpointError(UserError):
    """A checkpoint that is missing, corrupt or incompatible, or a save that failed.

    The message is one line that names the file; as a UserError the CLI exits with code 2.
    """


# --------------------------------------------------------------------------- saving


_SCALARS = (int, float, complex, str, bytes, bool, type(None), torch.dtype, torch.device)
_CONTAINERS = (list, tuple, set, torch.Size)


def _check_loadable(obj: Any, where: str = "state") -> None:
    """Raise TypeError at the first object that ``torch.load(weights_only=True)`` refuses.

    Scalars are checked by exact type: numpy's float64 is a ``float`` subclass, yet it is
    pickled as a numpy object that a weights-only load refuses.
    """
    kind = type(obj)
    if isinstance(obj, torch.Tensor) or kind in _SCALARS:
        return
    if kind in (dict, OrderedDict):
        for key, value in obj.items():
            if type(key) not in _SCALARS:
                raise TypeError(f"{where}: key {key!r} of type {type(key).__name__} cannot be "
                                "loaded with weights_only=True")
            _check_loadable(value, f"{where}[{key!r}]")
        return
    if kind in _CONTAINERS:
        for index, value in enumerate(obj):
            _check_loadable(value, f"{where}[{index}]")
        return
    raise TypeError(f"{where}: a {kind.__module__}.{kind.__qualname__} cannot be loaded with "
                    "weights_only=True; store tensors, numbers, strings, bools, None, lists, "
                    "tuples or dicts")


def _fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable (best effort: not every platform allows it)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove(path: str | Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _save_failed(path: Path, existed: bool, exc: OSError) -> CheckpointError:
    reason = exc.strerror or str(exc) or type(exc).__name__
    after = "the previous checkpoint is intact" if existed else "nothing was written"
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
        raise _save_failed(path, existed, exc) from exc
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
        _remove(temp)
        raise _save_failed(path, existed, exc) from exc
    except BaseException:
        _remove(temp)
        raise
    _fsync_dir(path.parent)


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


# --------------------------------------------------------------------------- random state


def rng_state() -> dict:
    """Every global random state, in a weights-only-loadable form.

    ``python``: `random`'s Mersenne Twister; ``numpy``: the legacy global `np.random` state;
    ``torch``: the CPU generator; ``cuda``: one state per visible GPU ([] without CUDA).
    numpy ``Generator`` objects (``np.random.default_rng``) and data-loader workers are not
    global and are not included: their owners save them.
    """
    version, internal, gauss_next = random.getstate()
    algorithm, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    return {
        "python": {
            "version": int(version),
            "state": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": None if gauss_next is None else float(gauss_next),
        },
        "numpy": {
            "algorithm": str(algorithm),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64).copy()),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    """Restore the states `rng_state` returned (the exact inverse).

    CUDA states are restored for the GPUs present, up to as many as were saved; without
    CUDA they are ignored.
    """
    py = state["python"]
    random.setstate((
        int(py["version"]),
        tuple(int(v) for v in py["state"].tolist()),
        py["gauss_next"],
    ))
    nps = state["numpy"]
    np.random.set_state((
        str(nps["algorithm"]),
        np.asarray(nps["keys"].numpy(), dtype=np.uint32),
        int(nps["pos"]),
        int(nps["has_gauss"]),
        float(nps["cached_gaussian"]),
    ))
    torch.set_rng_state(state["torch"].to(device="cpu", dtype=torch.uint8))
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available():
        for index in range(min(len(cuda), torch.cuda.device_count())):
            torch.cuda.set_rng_state(cuda[index].to(device="cpu", dtype=torch.uint8), index)


# --------------------------------------------------------------------------- the directory


def _iteration(numbered: Path) -> int:
    match = _NUMBERED.match(numbered.name)
    return int(match.group(1)) if match else -1


def _iteration_of(path: Path) -> int:
    """The iteration a checkpoint file holds (-1 when it cannot be read)."""
    try:
        return int(load(path).get("iteration", -1))
    except (CheckpointError, TypeError, ValueError):
        return -1


class CheckpointDir:
    """``run_dir/checkpoints``: numbered checkpoints (the newest `keep`), last.pt, best.pt.

    Only one process (rank 0) may write to it. Creating one removes temporary files that a
    killed save left behind.
    """

    def __init__(self, root: Path, keep: int) -> None:
        if keep < 1:
            raise ValueError(f"keep must be at least 1 (got {keep})")
        self.root = Path(root)
        self.keep = int(keep)
        if self.root.is_dir():
            for stale in self.root.glob(f".*{TEMP_SUFFIX}"):
                with contextlib.suppress(OSError):
                    stale.unlink()

    @property
    def last_path(self) -> Path:
        return self.root / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.root / "best.pt"

    def path(self, iteration: int) -> Path:
        """The numbered checkpoint's path: ``iter_0000006.pt`` (7 digits, more when needed)."""
        return self.root / f"iter_{int(iteration):07d}.pt"

    def numbered(self) -> list[Path]:
        """The numbered checkpoints present, oldest (lowest iteration) first."""
        if not self.root.is_dir():
            return []
        found = []
        for entry in self.root.iterdir():
            match = _NUMBERED.match(entry.name)
            if match and entry.is_file():
                found.append((int(match.group(1)), entry))
        return [entry for _, entry in sorted(found)]

    def save(self, iteration: int, state: dict) -> Path:
        """Save ``iter_NNNNNNN.pt``, then make last.pt the same checkpoint, then prune.

        Each step is atomic, so a kill at any point leaves last.pt either the previous
        checkpoint or this one. last.pt is a hard link to the numbered file where the file
        system allows it (no second write), otherwise a second atomic save. Pruning keeps
        the newest `keep` numbered checkpoints; the one just written always counts as the
        newest (a run resumed from an older checkpoint never deletes what it just wrote).
        last.pt and best.pt are never pruned. Returns the numbered checkpoint's path.
        """
        path = self.path(iteration)
        save_atomic(path, state)
        self._point_last_at(path, state)
        others = [p for p in self.numbered() if p != path]
        for old in [*others, path][: -self.keep]:
            with contextlib.suppress(FileNotFoundError):
                old.unlink()
        return path

    def _point_last_at(self, path: Path, state: dict) -> None:
        last = self.last_path
        existed = last.exists()
        temp = self.root / f".{last.name}.{os.getpid()}{TEMP_SUFFIX}"
        _remove(temp)
        try:
            os.link(path, temp)
        except OSError:  # no hard links here (or a full directory): write it again
            save_atomic(last, state)
            return
        try:
            os.replace(temp, last)
        except OSError as exc:
            _remove(temp)
            raise _save_failed(last, existed, exc) from exc
        _fsync_dir(self.root)

    def save_best(self, state: dict) -> Path:
        """Save best.pt atomically and return its path."""
        save_atomic(self.best_path, state)
        return self.best_path

    def last(self) -> Path | None:
        """last.pt when present, else None."""
        return self.last_path if self.last_path.is_file() else None

    def newest(self) -> Path | None:
        """The checkpoint to resume from: last.pt, unless a kill came between saving a
        numbered checkpoint and pointing last.pt at it (last.pt is then older, or missing):
        then the numbered checkpoint of the highest iteration. None when there is none."""
        last, numbered = self.last(), self.numbered()
        if not numbered:
            return last
        if last is None:
            return numbered[-1]
        with contextlib.suppress(OSError):
            if os.path.samefile(last, numbered[-1]):  # the usual case: a hard link
                return last
        return numbered[-1] if _iteration(numbered[-1]) > _iteration_of(last) else last
