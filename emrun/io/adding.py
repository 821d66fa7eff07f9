"""The record a write of several volumes keeps while it adds them, so that one killed
outright (kill -9, the OOM killer) is undone by the store's next writer.

`write_volumes` promises all or none: `data synth` writes image, labels, mito and synapse,
and a failure part-way removes the ones it added. A kill runs no clean-up, and left a
complete-looking image without its labels, which the same command run again refused as
"already exists". The record names the volumes the write adds (not those it replaces:
`--overwrite` keeps what it already replaced) and whether it made the store; it is removed
when the write ends, either way. A record found by the next holder of the store's lock
means its writer died: the volumes it names are removed, and the store is as it was.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from emrun.atomic import write_text
from emrun.io import PRIVATE_PREFIX
from emrun.io.layout import refresh_root, volume_dir

RECORD = f"{PRIVATE_PREFIX}adding.json"
_RECORD_OR_ITS_TEMPORARY = re.compile(rf"\.?{re.escape(RECORD)}(\.\d+\.tmp)?")
"""The record, or the temporary `emrun.atomic` writes it through (a kill there left it)."""


def is_record(path: Path) -> bool:
    """Whether ``path`` is a store's record of volumes being added, or what a kill left of
    one being written (no user's content)."""
    return bool(_RECORD_OR_ITS_TEMPORARY.fullmatch(path.name))


def start(store: Path, adding: list[tuple[str, bool]], new_store: bool) -> None:
    """Record, before the first is written, the volumes ({name, label}) a write adds."""
    write_text(store / RECORD, json.dumps({
        "volumes": [{"name": name, "label": label} for name, label in adding],
        "new_store": new_store}))


def finish(store: Path) -> None:
    """The write ended (its volumes are all there, or its own clean-up removed them)."""
    (store / RECORD).unlink(missing_ok=True)


def undo_killed(store: Path) -> bool:
    """Remove what a killed write of several volumes added, by its record; returns whether
    that write had made the store (the store is then as good as new). Only the store's lock
    holder calls it, so the record is no live writer's."""
    for temporary in store.glob(f".{RECORD}.*.tmp"):
        temporary.unlink(missing_ok=True)
    record = store / RECORD
    try:
        found = json.loads(record.read_text())
        volumes = [(str(v["name"]), bool(v["label"])) for v in found["volumes"]]
        made_store = bool(found.get("new_store", False))
    except FileNotFoundError:
        return False
    except (OSError, ValueError, KeyError, TypeError):  # not emrun's (edited): names nothing
        volumes, made_store = [], False
    for name, label in volumes:
        if not name or "/" in name or name.startswith("."):  # nothing outside its volume
            continue
        shutil.rmtree(volume_dir(store, name, label), ignore_errors=True)
    if volumes:
        refresh_root(store)
    record.unlink(missing_ok=True)
    return made_store
