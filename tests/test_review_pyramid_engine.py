"""Review of the resumable pyramid build and the engine's kept pass pool: stamping a level
holds one folder's entries at a time (not one entry per chunk file of the whole level) and
still tells every change; a build killed between its record and its progress removal
builds nothing again; an engine whose forward pass failed predicts the same bits after."""

from __future__ import annotations

import os
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_infer_speed_same import Exact, make_recipe
from test_pyramid_resume import _counting, _levels, _reference, _same_bits, _store, _volume

from emrun.infer.array import predict_array
from emrun.infer.engine import Engine
from emrun.io import pyramid
from emrun.io.pyramid import files_stamp
from emrun.io.write import PYRAMID_PROGRESS, build_pyramid


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of a few chunks, so that a small volume's levels have several blocks."""
    monkeypatch.setattr(pyramid, "BLOCK_ZYX", (2, 8, 8))


def _chunk_files(top: Path, folders: int, per_folder: int) -> None:
    for f in range(folders):
        place = top / "c" / str(f)
        place.mkdir(parents=True)
        for i in range(per_folder):
            (place / str(i)).write_bytes(b"x")


def test_stamping_holds_one_folder_of_entries_at_a_time(tmp_path: Path) -> None:
    """A level's stamp is a stat per chunk file; the entries of all of them were listed and
    sorted at the end (~110 bytes a file: a GB for a level 0 of 8 million chunks)."""
    _chunk_files(tmp_path, folders=40, per_folder=50)  # 2000 files
    files_stamp(tmp_path)  # imports and caches warmed
    tracemalloc.start()
    try:
        stamp = files_stamp(tmp_path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert stamp.startswith("2000:")
    assert peak < 80_000, peak  # all 2000 entries at once were over 200 kB


def test_a_stamp_tells_each_change_and_nothing_else(tmp_path: Path) -> None:
    """Same files: same stamp. A rewritten, added or removed file deep in the chunk tree
    changes it; zarr's ``*.partial`` temporaries and links to folders do not count."""
    _chunk_files(tmp_path / "a", folders=3, per_folder=4)
    first = files_stamp(tmp_path / "a")
    assert first == files_stamp(tmp_path / "a") and first.startswith("12:")
    (tmp_path / "a/c/1/3.0123.partial").write_bytes(b"half")
    (tmp_path / "a/link").symlink_to(tmp_path / "a/c", target_is_directory=True)
    assert files_stamp(tmp_path / "a") == first
    chunk = tmp_path / "a/c/2/1"
    chunk.with_suffix(".new").write_bytes(b"y")  # as zarr writes: a new file renamed in
    os.replace(chunk.with_suffix(".new"), chunk)
    rewritten = files_stamp(tmp_path / "a")
    assert rewritten != first
    (tmp_path / "a/c/0/9").write_bytes(b"x")
    added = files_stamp(tmp_path / "a")
    assert added not in (first, rewritten) and added.startswith("13:")
    (tmp_path / "a/c/0/9").unlink()
    assert files_stamp(tmp_path / "a") == rewritten


def test_a_kill_between_the_record_and_the_progress_removal_builds_nothing_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The record on the group is written before the progress folder goes: a kill between
    the two finds every level finished, builds no block and removes the progress."""
    data, options = _volume("image")
    want, _ = _reference(tmp_path, data, options, 3)
    group = _store(tmp_path, "late.zarr", data, options)

    def killed(self: Any) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(pyramid.Progress, "remove", killed)
        with pytest.raises(KeyboardInterrupt):
            build_pyramid(group, 3, threads=1)
    assert (group / PYRAMID_PROGRESS).is_dir()
    with monkeypatch.context() as patch:
        calls = _counting(patch)
        assert build_pyramid(group, 3, threads=1) == 3
    assert calls == []
    assert not (group / PYRAMID_PROGRESS).exists()
    assert _same_bits(_levels(group), want)


def test_a_failed_pass_leaves_the_kept_pool_working() -> None:
    """A forward pass that raises ends its block with that error; the engine's kept pool
    is not left broken or busy: the next block predicts the same bits as a fresh engine."""
    recipe = make_recipe()
    image = (np.random.default_rng(9).random((9, 30, 41)) * 255).astype(np.uint8)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        want = predict_array(Engine(recipe, Exact(recipe.head_channels()).eval(),
                                    torch.device("cpu")), image, (0.0, 255.0))
        engine = Engine(recipe, Exact(recipe.head_channels()).eval(), torch.device("cpu"))
        forward = engine._forward
        calls = [0]

        def failing(batch: torch.Tensor) -> dict[str, torch.Tensor]:
            calls[0] += 1
            if calls[0] == 2:
                raise RuntimeError("out of memory")
            return forward(batch)

        engine._forward = failing  # type: ignore[method-assign]
        with pytest.raises(RuntimeError, match="out of memory"):
            predict_array(engine, image, (0.0, 255.0))
        assert engine._passes is not None  # the pool was used, and is kept
        engine._forward = forward  # type: ignore[method-assign]
        got = predict_array(engine, image, (0.0, 255.0))
    finally:
        torch.set_num_threads(threads)
    for name in want:
        assert np.array_equal(got[name], want[name])


def test_a_kill_as_a_complete_pyramid_grows_keeps_its_levels(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A complete pyramid given one more level: its record (the group attribute) was
    deleted before the new build's progress was written, so a kill between the two left
    neither, and the next call rebuilt every level. The progress now goes first."""
    from test_pyramid_resume import Killed

    data, options = _volume("image")
    want, total = _reference(tmp_path, data, options, 4)
    group = tmp_path / "ref.zarr/v"
    build_pyramid(group, 3)  # complete, with three levels
    real_start = pyramid.Progress.start

    def killed_first(self: Any, *args: Any, **kwargs: Any) -> None:
        raise Killed  # the kill lands as the build's progress is about to be written

    with monkeypatch.context() as patch:
        patch.setattr(pyramid.Progress, "start", killed_first)
        with pytest.raises(Killed):
            build_pyramid(group, 4)
    assert pyramid.Progress.start is real_start
    with monkeypatch.context() as patch:
        calls = _counting(patch)
        assert build_pyramid(group, 4) == 4
    assert 0 < len(calls) < total / 2  # level 3 alone; levels 1 and 2 kept
    assert _same_bits(_levels(group), want)
