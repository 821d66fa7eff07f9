"""The run directory: created once, never silently reused; resolved recipe and provenance."""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from .. import __version__, locks
from ..atomic import write_text
from ..errors import UserError
from ..recipe import Recipe
from ..recipe.loader import resolved_now

RESUME_KEYS = ("model", "tasks", "data")
"""Recipe sections that must not change between a checkpoint and its resumption."""

ADOPTED_KEYS = ("optimizer", "schedule", "iterations")
"""Settings under ``train`` that a resumption takes from the recipe when they changed (the
saved optimizer and scheduler states carry the old ones)."""

BOOKKEEPING = frozenset({"name", "description", "train.log_every", "train.image_every",
                         "train.checkpoint_every", "train.keep_checkpoints", "train.workers",
                         "train.validate_every", "train.validate_in_background"})
"""Recipe keys whose change on resumption leaves the trained weights as they would have been
(the data stream does not depend on the worker count): not worth a note."""


DAMAGED_PROVENANCE = "provenance.json.damaged"
"""Where an unreadable provenance.json is kept (`write_recipe_and_provenance`)."""

START_FILES = frozenset({"recipe.yaml", "provenance.json", "events.jsonl", "tensorboard",
                         "checkpoints", DAMAGED_PROVENANCE})
"""What a run writes before its first checkpoint: a folder holding only these (and no
checkpoint) is a start that failed, e.g. on its data, with nothing to resume."""


def prepare(run_dir: Path, resume: bool) -> bool:
    """Refuse to reuse a run directory without --resume; refuse --resume without one; hold
    the directory (`locks.hold`) so that a second run into it is refused while this one
    lives. A start that saved no checkpoint is cleared for a new one (True), so fixing the
    data and running the same command works."""
    _check_place(run_dir, resume)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)  # as mkdir -p: the run's files
        # are written through this very path (`new/../run` keeps `new`)
    except OSError as exc:
        raise UserError(f"--run-dir {run_dir}: cannot create it ({exc.strerror or exc})"
                        ) from None
    made_lock = not (run_dir / locks.LOCK_NAME).exists()
    locks.hold(run_dir, RUN_DIR_ADVICE)
    try:
        entries = _entries(run_dir, resume)
    except UserError:
        if made_lock:  # a refused folder is left as it was found (a user's got a lock file)
            locks.release(run_dir)
        raise
    for entry in entries:
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    return bool(entries)


def check_free(run_dir: Path, resume: bool) -> None:
    """`prepare`'s refusals, with nothing made, cleared or held: what a launcher checks
    before it starts the processes that will train (torchrun's ranks)."""
    _check_place(run_dir, resume)
    if run_dir.is_dir():
        locks.check_free(run_dir, RUN_DIR_ADVICE)
        _entries(run_dir, resume)


RUN_DIR_ADVICE = "give another --run-dir"


def _check_place(run_dir: Path, resume: bool) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--run-dir {run_dir}: is a file, not a folder")
    has_run = (run_dir / "checkpoints").is_dir() or _ours(run_dir)
    if resume and not has_run:
        raise UserError(f"{run_dir}: no run to resume here (no checkpoints); drop --resume to "
                        "start a new run")


def _entries(run_dir: Path, resume: bool) -> list[Path]:
    """What a new run would clear: a failed start's files (none with --resume); a run or a
    user's file is refused."""
    entries = locks.contents(run_dir)
    if resume or not entries:
        return []
    if not any(_start_file(entry.name) for entry in entries):
        shown = ", ".join(sorted(entry.name for entry in entries)[:3])
        raise UserError(f"--run-dir {run_dir} holds files that are no run's ({shown}"
                        f"{', ...' if len(entries) > 3 else ''}): neither empty for a new run "
                        "nor one that already holds a run to --resume; give a new or empty "
                        "--run-dir (nothing was overwritten)")
    if not _ours(run_dir) and _failed_start(entries):  # a user's recipe.yaml or
        # tensorboard/ of a run's names, and no checkpoint (a run's, even copied bare)
        shown = ", ".join(sorted(entry.name for entry in entries)[:3])
        raise UserError(f"--run-dir {run_dir} holds {shown}, but no run of emrun's (its "
                        "provenance.json): give a new or empty --run-dir, or one holding "
                        "your recipe elsewhere (nothing was overwritten)")
    if not _failed_start(entries):
        raise UserError(f"{run_dir} already holds a run; use --resume to continue it, or "
                        "--run-dir to start a new one elsewhere (nothing was overwritten)")
    return entries


def _failed_start(entries: list[Path]) -> bool:
    """Only what a run writes before its first checkpoint, and no checkpoint."""
    checkpoints = [entry for entry in entries if entry.name == "checkpoints"]
    return (all(_start_file(entry.name) for entry in entries)
            and not (checkpoints and checkpoints[0].is_dir() and any(checkpoints[0].iterdir())))


def _ours(run_dir: Path) -> bool:
    """Whether a run of emrun's started here: its provenance.json (written first, before
    the recipe), naming emrun's version. A folder holding only files of a run's names was
    taken for a failed start and cleared: a user's own recipe.yaml (``emrun train
    exp/recipe.yaml --run-dir exp``) or tensorboard/ logs were deleted."""
    if isinstance(_read_provenance(run_dir / "provenance.json").get("emrun"), str):
        return True  # or a start killed while writing it, its first file
    return run_dir.is_dir() and any(_start_file(p.name) and p.name.startswith(
        ".provenance.json.") for p in run_dir.iterdir())


def _start_file(name: str) -> bool:
    """One of `START_FILES`, or the temporary file a kill during its atomic write left
    (``.recipe.yaml.1234.tmp``): such a start was refused as 'already holds a run'."""
    if name in START_FILES:
        return True
    stem, _, rest = name[1:].rpartition(".")[0].rpartition(".")
    return name.startswith(".") and name.endswith(".tmp") and rest.isdigit() and \
        stem in START_FILES


def write_recipe_and_provenance(run_dir: Path, recipe: Recipe, recipe_path: Path,
                                iteration: int = 0, init_from: Path | None = None,
                                init_iteration: int | None = None) -> str | None:
    """The fully resolved recipe and where this run came from: the first session's
    provenance, and under ``sessions`` every session's, with the iteration it started at
    (a resumption added its own; it used to replace the run's start, so a model exported
    from a resumed run named only the last session) and, for a session that began from
    ``--init-from`` weights, the absolute path of the file read (a run directory's
    checkpoint, not the directory: `init_weights` reads it back) and the iteration its
    weights were saved at (best.pt and last.pt are replaced as their run goes on). A
    provenance.json that cannot be read is kept beside as provenance.json.damaged, not
    replaced unread (its earlier sessions went without a word); returns the note saying
    so, else None."""
    this = {**provenance(recipe_path), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "iteration": iteration}
    if init_from is not None:
        this["init_from"] = str(Path(init_from).resolve())
        if init_iteration is not None:
            this["init_from_iteration"] = init_iteration
    earlier = _read_provenance(run_dir / "provenance.json")
    note = None
    if not earlier and (run_dir / "provenance.json").is_file():
        os.replace(run_dir / "provenance.json", run_dir / DAMAGED_PROVENANCE)
        note = (f"{run_dir / 'provenance.json'} could not be read: kept as "
                f"{DAMAGED_PROVENANCE}; the run's record of sessions starts again here")
    sessions = earlier.get("sessions")
    if not isinstance(sessions, list):  # none yet, or written before sessions were kept
        sessions = [earlier] if earlier else []
    first = {key: value for key, value in (sessions[0] if sessions else this).items()
             if key != "sessions"}
    write_text(run_dir / "provenance.json",  # first: it tells the folder is a run's
               json.dumps({**first, "sessions": [*sessions, this]}, indent=2) + "\n")
    write_text(run_dir / "recipe.yaml", recipe_text(recipe))
    return note


def init_weights(run_dir: Path) -> Path | None:
    """The ``--init-from`` weights the run's latest session began from, if it did: a run
    stopped before its first checkpoint and resumed starts again from them, not from random
    weights (``--resume`` and ``--init-from`` cannot be given together)."""
    sessions = _read_provenance(run_dir / "provenance.json").get("sessions")
    last = sessions[-1] if isinstance(sessions, list) and sessions else None
    found = last.get("init_from") if isinstance(last, dict) else None
    return Path(found) if isinstance(found, str) and found else None


def _read_provenance(path: Path) -> dict[str, Any]:
    """The run's provenance so far ({} when there is none or it cannot be read)."""
    try:
        found = json.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return found if isinstance(found, dict) else {}


def recipe_text(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.resolved(), sort_keys=False)


def provenance(recipe_path: Path) -> dict[str, Any]:
    return {
        "emrun": __version__,
        "git": _git_revision(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "python": platform.python_version(),
        "host": socket.gethostname(),
        "command": sys.argv,
        "cwd": os.getcwd(),  # what the recipe's relative data paths are relative to
        "recipe": str(recipe_path),
    }


def _git_revision() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def _optimizer(recipe: dict) -> str | None:
    optimizer = (recipe.get("train") or {}).get("optimizer") or {}
    return optimizer.get("type") if isinstance(optimizer, dict) else None


def check_resumable(saved_text: str, recipe: Recipe, checkpoint: Path, run_dir: Path) -> None:
    """Refuse to resume when the model, tasks or data differ from the checkpoint's recipe
    (or when the checkpoint's recipe is not one)."""
    try:
        saved = yaml.safe_load(saved_text) if isinstance(saved_text, str) else None
    except yaml.YAMLError:
        saved = None
    if not isinstance(saved, dict):
        raise UserError(f"cannot resume {checkpoint}: the recipe it holds is not a recipe "
                        "mapping (an emrun checkpoint stores its resolved recipe as YAML)")
    saved, current = resolved_now(saved), recipe.resolved()
    changed = [key for key in RESUME_KEYS if saved.get(key) != current.get(key)]
    kinds = [_optimizer(r) for r in (saved, current)]
    if kinds[0] != kinds[1]:  # its saved state (momenta, ...) does not fit another kind
        changed.append(f"optimizer ({kinds[0]} -> {kinds[1]})")
    if changed:
        raise UserError(
            f"cannot resume {checkpoint}: the recipe's {', '.join(changed)} changed since it was "
            f"saved. Start a new run (--run-dir NEW), or fine-tune from its weights with "
            f"--run-dir NEW --init-from {checkpoint}")


def changed_settings(saved_text: str, recipe: Recipe) -> list[str]:
    """``ADOPTED_KEYS`` that differ between a checkpoint's recipe and ``recipe``, one
    ``train.optimizer.lr 0.001 -> 0.1`` per value."""
    saved = resolved_now(yaml.safe_load(saved_text)).get("train") or {}
    current = recipe.resolved().get("train") or {}
    changes: list[str] = []
    for key in ADOPTED_KEYS:
        changes += _differences(f"train.{key}", saved.get(key), current.get(key))
    return changes


def other_changes(saved_text: str, recipe: Recipe) -> list[str]:
    """What else differs between a checkpoint's recipe and ``recipe`` (neither refused nor
    adopted, and not mere bookkeeping): seed, augment, patch, batch, precision, EMA,
    validation and segmentation settings, ... A resumption applies them from its iteration
    on, so the run no longer continues as it began: the user is told, not left to find out."""
    saved = resolved_now(yaml.safe_load(saved_text))
    current = recipe.resolved()
    skipped = {*RESUME_KEYS, *(f"train.{key}" for key in ADOPTED_KEYS), *BOOKKEEPING}
    changes: list[str] = []
    for key in dict.fromkeys([*saved, *current]):
        if key in RESUME_KEYS:
            continue
        old, new = saved.get(key), current.get(key)
        if key == "train" and isinstance(old, dict) and isinstance(new, dict):
            changes += [change for sub in dict.fromkeys([*old, *new])
                        if f"train.{sub}" not in skipped
                        for change in _differences(f"train.{sub}", old.get(sub), new.get(sub))]
        elif key not in skipped:
            changes += _differences(key, old, new)
    return changes


def _differences(path: str, old: Any, new: Any) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict) and old.get("type") == new.get("type"):
        return [change for key in dict.fromkeys([*old, *new])
                for change in _differences(f"{path}.{key}", old.get(key), new.get(key))]
    return [] if old == new else [f"{path} {_short(old)} -> {_short(new)}"]


def _short(value: Any, limit: int = 60) -> str:
    """A value on one line, cut to ``limit`` characters (an augment list can be long)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix(
        "\n...").strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."
