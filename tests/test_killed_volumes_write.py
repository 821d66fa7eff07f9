"""`write_volumes` (several volumes, all or none) killed outright part-way: the next writer of
the store undoes what the killed one added, by the record it kept (`emrun.io.adding`). The
kill is a forked child's `os._exit` as its second volume begins."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest

from emrun.io import adding, open_volume
from emrun.io import write as write_module
from emrun.io.write import killed_first_write, store_entries, write_volume, write_volumes

pytestmark = pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(),
                                reason="kills a forked writer")

IMAGE = np.arange(4 * 8 * 8, dtype=np.uint8).reshape(4, 8, 8)
LABELS = (np.arange(4 * 8 * 8).reshape(4, 8, 8) // 40).astype(np.uint32)


def _volumes() -> dict[str, tuple[np.ndarray, bool]]:
    return {"image": (IMAGE, False), "cells": (LABELS, True), "mito": (LABELS % 2, True)}


def _killed_at_second_volume(store: Path, overwrite: bool = False) -> None:
    def child() -> None:
        calls = {"n": 0}
        real = write_module.write_volume

        def dying(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 2:
                os._exit(9)  # no clean-up runs: as kill -9
            return real(*args, **kwargs)

        write_module.write_volume = dying
        write_volumes(store, _volumes(), voxel_size=(30, 6, 6), overwrite=overwrite)
        os._exit(0)

    process = multiprocessing.get_context("fork").Process(target=child)
    process.start()
    process.join(60)
    assert process.exitcode == 9
    assert (store / "image.partial" / "zarr.json").is_file()  # written, not yet in place
    assert (store / adding.RECORD).is_file()


def test_the_same_write_again_finishes_after_a_kill_into_a_new_store(tmp_path):
    store = tmp_path / "s.zarr"
    _killed_at_second_volume(store)
    write_volumes(store, _volumes(), voxel_size=(30, 6, 6))  # was 'image: already exists'
    assert np.array_equal(open_volume(store / "image").read(), IMAGE)
    assert np.array_equal(open_volume(store / "labels" / "cells").read(), LABELS)
    assert not (store / adding.RECORD).exists()


def test_a_kill_into_a_users_store_removes_only_the_volumes_it_added(tmp_path):
    store = tmp_path / "s.zarr"
    write_volume(store, "mine", IMAGE[::-1].copy(), voxel_size=(30, 6, 6))
    _killed_at_second_volume(store)
    write_module.hold_store(store)  # the next holder undoes it
    write_module.release_store(store)
    assert not (store / "image").exists()
    assert np.array_equal(open_volume(store / "mine").read(), IMAGE[::-1])
    root = json.loads((store / "zarr.json").read_text())
    assert "image" not in json.dumps(root["attributes"])  # the root names no removed volume


def _old_set(store: Path) -> None:
    write_volumes(store, {"image": (IMAGE[::-1].copy(), False), "cells": (LABELS + 1, True),
                          "mito": (LABELS % 3, True)}, voxel_size=(30, 6, 6))


def _is_old_set(store: Path) -> bool:
    return (np.array_equal(open_volume(store / "image").read(), IMAGE[::-1])
            and np.array_equal(open_volume(store / "labels" / "cells").read(), LABELS + 1)
            and np.array_equal(open_volume(store / "labels" / "mito").read(), LABELS % 3))


def test_a_kill_part_way_through_replacing_leaves_the_old_volumes_all(tmp_path):
    """--overwrite replaced volumes one by one: a `data synth --overwrite` killed after its
    image left the new image beside the old labels, of the same shape, which nothing
    flagged (training would take the wrong truth). The new ones now go into place together
    at the end, so a kill before leaves the old set whole, and the next writer clears the
    new ones' partial volumes."""
    store = tmp_path / "s.zarr"
    _old_set(store)
    _killed_at_second_volume(store, overwrite=True)
    write_module.hold_store(store)
    write_module.release_store(store)
    assert _is_old_set(store)
    assert not list(store.rglob("*.partial"))


def test_a_failure_part_way_through_replacing_leaves_the_old_volumes_all(tmp_path,
                                                                          monkeypatch):
    store = tmp_path / "s.zarr"
    _old_set(store)
    real, calls = write_module.write_volume, {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("the disk is full")
        return real(*args, **kwargs)

    monkeypatch.setattr(write_module, "write_volume", failing)
    with pytest.raises(OSError, match="the disk is full"):
        write_volumes(store, _volumes(), voxel_size=(30, 6, 6), overwrite=True)
    assert _is_old_set(store) and not list(store.rglob("*.partial"))
    monkeypatch.setattr(write_module, "write_volume", real)
    write_volumes(store, _volumes(), voxel_size=(30, 6, 6), overwrite=True)
    assert np.array_equal(open_volume(store / "image").read(), IMAGE)
    assert np.array_equal(open_volume(store / "labels" / "cells").read(), LABELS)


def test_a_new_store_undone_is_as_good_as_new(tmp_path):
    """A killed write had made the store: once undone, a failing next write removes it as
    it removes a store it made itself (no empty OUT.zarr left behind)."""
    store = tmp_path / "s.zarr"
    _killed_at_second_volume(store)
    with pytest.raises(RuntimeError), write_module.held_store(store) as new:
        assert new
        raise RuntimeError("the next write fails")
    assert not store.exists()


def test_a_kill_before_any_volume_leaves_a_store_taken_as_new(tmp_path):
    store = tmp_path / "s.zarr"
    store.mkdir()
    (store / ".emrun-lock").write_text("")
    adding.start(store, [("image", False)], new_store=True)
    (store / f".{adding.RECORD}.123.tmp").write_text("{")  # a kill inside the record's write
    assert store_entries(store) == [] and killed_first_write(store)


def test_a_record_names_nothing_outside_its_store(tmp_path):
    store = tmp_path / "s.zarr"
    write_volume(store, "mine", IMAGE, voxel_size=(30, 6, 6))
    outside = tmp_path / "keep"
    outside.mkdir()
    adding.start(store, [("../keep", False), (".emrun-lock", False), ("mine", False)],
                 new_store=False)
    adding.undo_killed(store)
    assert outside.is_dir()
    assert not (store / "mine").exists()  # the one it did name is removed


def test_an_unreadable_record_is_removed_and_removes_nothing(tmp_path):
    store = tmp_path / "s.zarr"
    write_volume(store, "mine", IMAGE, voxel_size=(30, 6, 6))
    (store / adding.RECORD).write_text("{not json")
    assert adding.undo_killed(store) is False
    assert (store / "mine" / "zarr.json").is_file() and not (store / adding.RECORD).exists()
