"""A run's checkpoints and every random state the trainer resumes.

A run directory's ``checkpoints/`` (see `CheckpointDir`) holds::

    iter_0000100.pt  iter_0000200.pt  ...   numbered, the newest `keep` of them
    last.pt                                 the newest checkpoint (a hard link when possible)
    best.pt                                 the best by validation, when the trainer saves one

Each file is written and read by ``emrun.io.checkpoint`` (atomic saves, weights-only loads).
"""

from __future__ import annotations

import contextlib
import os
import random
import re
from pathlib import Path

import numpy as np
import torch

from ..atomic import fsync_dir
from ..io.checkpoint import (
    TEMP_SUFFIX,
    CheckpointError,
    load,
    remove,
    save_atomic,
    save_failed,
)

__all__ = ["CheckpointDir", "rng_state", "set_rng_state"]

_NUMBERED = re.compile(r"^iter_(\d+)\.pt$")


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
        remove(temp)
        try:
            os.link(path, temp)
        except OSError:  # no hard links here (or a full directory): write it again
            save_atomic(last, state)
            return
        try:
            os.replace(temp, last)
        except OSError as exc:
            remove(temp)
            raise save_failed(last, existed, exc) from exc
        fsync_dir(self.root)

    def save_best(self, state: dict) -> Path:
        """Save best.pt atomically and return its path."""
        save_atomic(self.best_path, state)
        return self.best_path

    def last(self) -> Path | None:
        """last.pt when present, else None."""
        return self.last_path if self.last_path.is_file() else None

    def readable_instead(self, unreadable: Path) -> tuple[Path, list[Path]] | None:
        """When ``unreadable`` (the checkpoint `newest` chose) cannot be loaded: the newest
        numbered checkpoint that can, and every file that must be moved aside for `newest`
        to choose it (last.pt and the numbered files above it: last.pt is a hard link to
        the newest, so a damaged last.pt is a damaged numbered file too). None when no
        numbered checkpoint can be read."""
        blocking = [unreadable] if unreadable.exists() else []
        last = self.last()
        if last is not None and last != unreadable and _iteration_of(last) < 0:
            blocking.append(last)
        for candidate in reversed(self.numbered()):
            if candidate == unreadable:
                continue
            if _iteration_of(candidate) >= 0:
                return candidate, blocking
            blocking.append(candidate)
        return None

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
