"""Checkpoints: atomic saves that survive a full disk, clear errors for bad files, the
checkpoint directory (naming, pruning, last.pt), random states and weights-only round trips."""

from __future__ import annotations

import errno
import io
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from emrun.errors import UserError
from emrun.io import checkpoint as ckpt_file
from emrun.io.checkpoint import CheckpointError, load, save_atomic
from emrun.recipe.run import Adam, Cosine
from emrun.train import checkpoint as ckpt
from emrun.train.checkpoint import CheckpointDir, rng_state, set_rng_state
from emrun.train.optim import EMA, build_optimizer, build_scheduler


def tiny_state(iteration: int) -> dict:
    return {"iteration": iteration, "weights": torch.full((64,), float(iteration))}


def enospc_save(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.save writes half of the real file, then the disk is full."""
    real_save = torch.save

    def half_then_full(obj, f, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", half_then_full)


# --------------------------------------------------------------------------- save_atomic


def test_save_atomic_round_trip_leaves_only_the_file(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "c.pt"
    save_atomic(path, tiny_state(3))
    assert os.listdir(path.parent) == ["c.pt"]
    assert path.stat().st_mode & 0o777 == 0o666 & ~ckpt_file._UMASK  # not mkstemp's 0o600
    state = load(path)
    assert state["iteration"] == 3
    assert torch.equal(state["weights"], torch.full((64,), 3.0))


def test_disk_full_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "last.pt"
    save_atomic(path, tiny_state(1))
    before = path.read_bytes()
    enospc_save(monkeypatch)
    with pytest.raises(CheckpointError) as info:
        save_atomic(path, tiny_state(2))
    message = str(info.value)
    assert str(path) in message
    assert "No space left on device" in message
    assert "previous checkpoint is intact" in message
    assert "\n" not in message
    assert isinstance(info.value, UserError)
    assert os.listdir(tmp_path) == ["last.pt"]  # no temporary file left behind
    assert path.read_bytes() == before
    monkeypatch.undo()
    assert load(path)["iteration"] == 1


def test_a_full_disk_under_the_file_is_named_as_such(tmp_path: Path, monkeypatch) -> None:
    """Written to the file directly, torch turns ENOSPC into 'RuntimeError: unexpected pos'
    (an internal error, exit 1); the save must say the disk is full and how to go on."""
    path = tmp_path / "last.pt"
    save_atomic(path, tiny_state(1))

    class FullDisk(io.FileIO):
        def write(self, data):  # type: ignore[no-untyped-def]
            super().write(bytes(memoryview(data)[:100]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt.os, "fdopen", lambda fd, mode: FullDisk(fd, "wb"))
    with pytest.raises(CheckpointError, match=r"No space left.*intact.*--resume"):
        save_atomic(path, tiny_state(2))
    assert os.listdir(tmp_path) == ["last.pt"]


def test_disk_full_on_the_first_save_writes_nothing(tmp_path: Path, monkeypatch) -> None:
    enospc_save(monkeypatch)
    with pytest.raises(CheckpointError, match="nothing was written"):
        save_atomic(tmp_path / "c.pt", tiny_state(1))
    assert os.listdir(tmp_path) == []


def test_failing_fsync_is_a_failed_save(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "c.pt"
    save_atomic(path, tiny_state(1))

    def eio(fd):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", eio)
    with pytest.raises(CheckpointError, match="Input/output error"):
        save_atomic(path, tiny_state(2))
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["c.pt"]
    assert load(path)["iteration"] == 1


def test_other_errors_propagate_and_clean_up(tmp_path: Path, monkeypatch) -> None:
    def broken(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise RuntimeError("boom")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(RuntimeError, match="boom"):
        save_atomic(tmp_path / "c.pt", tiny_state(1))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("bad", [np.zeros(3), np.float64(1.5), object()])
def test_state_that_would_not_load_is_refused_before_writing(tmp_path: Path, bad) -> None:
    state = {"iteration": 1, "data": {"stream": [1, bad]}}
    with pytest.raises(TypeError, match=r"state\['data'\]\['stream'\]\[1\]"):
        save_atomic(tmp_path / "c.pt", state)
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- load


def test_load_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.pt"
    with pytest.raises(CheckpointError, match="no such checkpoint") as info:
        load(path)
    assert str(path) in str(info.value)


def test_load_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    save_atomic(path, tiny_state(1))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not an emrun checkpoint") as info:
        load(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_load_text_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.pt"
    path.write_text("this is not a checkpoint\n")
    with pytest.raises(CheckpointError, match="not a PyTorch file") as info:
        load(path)
    assert str(path) in str(info.value)


def test_load_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty") as info:
        load(path)
    assert str(path) in str(info.value)


def test_load_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="is a directory"):
        load(tmp_path)


def test_load_refuses_unsafe_objects(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    torch.save({"iteration": 1, "x": np.float64(2.0)}, path)  # bypasses save_atomic's check
    with pytest.raises(CheckpointError, match="weights-only") as info:
        load(path)
    assert str(path) in str(info.value)
    assert "Unsupported global" in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("content", "match"), [
    ({"model": {}}, "no 'iteration'"),
    (torch.zeros(2), "not a dict"),
])
def test_load_wrong_content(tmp_path: Path, content, match) -> None:
    path = tmp_path / "c.pt"
    torch.save(content, path)
    with pytest.raises(CheckpointError, match=match):
        load(path)


# --------------------------------------------------------------------------- CheckpointDir


def iterations_present(directory: CheckpointDir) -> list[int]:
    return [load(p)["iteration"] for p in directory.numbered()]


def test_checkpoint_dir_naming_pruning_and_last(tmp_path: Path) -> None:
    directory = CheckpointDir(tmp_path / "checkpoints", keep=2)
    assert directory.last() is None
    assert directory.numbered() == []
    for iteration in (2, 4, 6):
        path = directory.save(iteration, tiny_state(iteration))
        assert path.name == f"iter_{iteration:07d}.pt"
        assert load(directory.last())["iteration"] == iteration
    assert directory.path(6).name == "iter_0000006.pt"
    assert sorted(os.listdir(directory.root)) == ["iter_0000004.pt", "iter_0000006.pt", "last.pt"]
    best = directory.save_best(tiny_state(4))
    assert best.name == "best.pt"
    for iteration in (8, 10, 12_000_000):
        directory.save(iteration, tiny_state(iteration))
    assert sorted(os.listdir(directory.root)) == [
        "best.pt", "iter_0000010.pt", "iter_12000000.pt", "last.pt"]
    assert load(directory.last())["iteration"] == 12_000_000
    assert load(directory.root / "best.pt")["iteration"] == 4


def test_keep_one_still_loads_last(tmp_path: Path) -> None:
    directory = CheckpointDir(tmp_path, keep=1)
    for iteration in range(1, 4):
        directory.save(iteration, tiny_state(iteration))
    assert iterations_present(directory) == [3]
    assert load(directory.last())["iteration"] == 3
    with pytest.raises(ValueError):
        CheckpointDir(tmp_path, keep=0)


def test_resuming_from_an_older_checkpoint_keeps_the_new_one(tmp_path: Path) -> None:
    directory = CheckpointDir(tmp_path, keep=2)
    for iteration in (8, 10):
        directory.save(iteration, tiny_state(iteration))
    directory.save(6, tiny_state(6))  # a run resumed from an earlier checkpoint
    assert iterations_present(directory) == [6, 10]
    assert load(directory.last())["iteration"] == 6


def test_last_is_rewritten_when_hard_links_fail(tmp_path: Path, monkeypatch) -> None:
    def no_links(src, dst, *args, **kwargs):
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(os, "link", no_links)
    directory = CheckpointDir(tmp_path, keep=3)
    directory.save(1, tiny_state(1))
    directory.save(2, tiny_state(2))
    assert load(directory.last())["iteration"] == 2
    assert not (directory.path(2)).samefile(directory.last())


def test_failure_between_the_two_writes_leaves_the_old_last(tmp_path: Path, monkeypatch) -> None:
    directory = CheckpointDir(tmp_path, keep=3)
    directory.save(1, tiny_state(1))

    def no_links(src, dst, *args, **kwargs):
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    real_save_atomic = ckpt.save_atomic
    calls = []

    def second_write_fails(path, state):
        calls.append(Path(path).name)
        if Path(path).name == "last.pt":
            enospc_save(monkeypatch)
        real_save_atomic(path, state)

    monkeypatch.setattr(os, "link", no_links)
    monkeypatch.setattr(ckpt, "save_atomic", second_write_fails)
    with pytest.raises(CheckpointError, match=r"last\.pt"):
        directory.save(2, tiny_state(2))
    monkeypatch.undo()
    assert calls == ["iter_0000002.pt", "last.pt"]
    assert load(directory.last())["iteration"] == 1  # the old, consistent last.pt
    assert iterations_present(directory) == [1, 2]
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".")]


def test_stale_temporary_files_are_removed(tmp_path: Path) -> None:
    stale = tmp_path / f".iter_0000005.pt.abcd{ckpt.TEMP_SUFFIX}"
    stale.write_bytes(b"half a checkpoint")
    (tmp_path / "notes.txt").write_text("keep me")
    CheckpointDir(tmp_path, keep=2)
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]


# --------------------------------------------------------------------------- random state


def draw() -> tuple:
    return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(),
            float(np.random.randn()), torch.rand(3).tolist(), torch.randn(2).tolist())


def test_rng_state_round_trip(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leave python's and numpy's cached Gaussians set
    np.random.randn()
    state = rng_state()
    save_atomic(tmp_path / "rng.pt", {"iteration": 0, "rng": state})
    first = draw()
    draw()  # move every stream on
    set_rng_state(state)
    assert draw() == first
    set_rng_state(load(tmp_path / "rng.pt")["rng"])  # through a weights-only load
    assert draw() == first
    assert state["cuda"] == [] or torch.cuda.is_available()


# --------------------------------------------------------------------------- a trainer's state


RECIPE = {"name": "tiny", "train": {"patch": [8, 32, 32], "iterations": 10}}


def test_realistic_trainer_state_round_trips_weights_only(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(1, 2, 3), nn.BatchNorm3d(2), nn.ReLU(), nn.Conv3d(2, 1, 1))
    optimizer = build_optimizer(Adam(type="adamw", lr=1e-3, weight_decay=0.01),
                                model.parameters())
    scheduler = build_scheduler(Cosine(warmup=2, min_factor=0.1), optimizer, 10)
    scaler = torch.amp.GradScaler("cpu")
    ema = EMA(model, 0.9)
    for _ in range(3):
        loss = model(torch.rand(2, 1, 5, 5, 5)).square().mean()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        ema.update(model)
    state = {
        "iteration": 3,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "ema": ema.state_dict(),
        "rng": rng_state(),
        "data": {"position": 6, "epoch": 0, "order": torch.arange(5)},
        "recipe": yaml.safe_dump(RECIPE),
        "metrics": {"best": None, "history": [(1, 0.5), (2, 0.25)]},
    }
    path = tmp_path / "c.pt"
    save_atomic(path, state)
    raw = torch.load(path, weights_only=True, map_location="cpu")
    loaded = load(path)
    assert raw.keys() == loaded.keys() == state.keys()
    for name, value in model.state_dict().items():
        assert torch.equal(loaded["model"][name], value)
    assert yaml.safe_load(loaded["recipe"]) == RECIPE
    assert loaded["scaler"] == scaler.state_dict()
    assert loaded["metrics"] == state["metrics"]

    # Everything loads back into fresh objects.
    model2 = nn.Sequential(nn.Conv3d(1, 2, 3), nn.BatchNorm3d(2), nn.ReLU(), nn.Conv3d(2, 1, 1))
    model2.load_state_dict(loaded["model"])
    optimizer2 = build_optimizer(Adam(type="adamw", lr=1e-3, weight_decay=0.01),
                                 model2.parameters())
    scheduler2 = build_scheduler(Cosine(warmup=2, min_factor=0.1), optimizer2, 10)
    optimizer2.load_state_dict(loaded["optimizer"])
    scheduler2.load_state_dict(loaded["scheduler"])
    scaler2 = torch.amp.GradScaler("cpu")
    scaler2.load_state_dict(loaded["scaler"])
    ema2 = EMA(model2, 0.9)
    ema2.load_state_dict(loaded["ema"])
    set_rng_state(loaded["rng"])
    assert scheduler2.last_epoch == scheduler.last_epoch == 3
    assert optimizer2.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    assert ema2.updates == 3
    for name, value in ema.params.items():
        assert torch.equal(ema2.params[name], value)


def test_resume_picks_the_newest_complete_checkpoint(tmp_path: Path, monkeypatch) -> None:
    """A kill between saving iter_N and pointing last.pt at it leaves last.pt older (or,
    before the first link, missing): resume from iter_N, not from nothing."""
    directory = CheckpointDir(tmp_path / "checkpoints", keep=3)
    assert directory.newest() is None
    directory.save(1, tiny_state(1))
    assert directory.newest() == directory.last_path  # a hard link to iter_0000001.pt
    real_replace = os.replace

    def killed(src, dst):  # the rename onto last.pt never happens
        if Path(dst).name == "last.pt":
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        directory.save(2, tiny_state(2))
    monkeypatch.setattr(ckpt.os, "replace", real_replace)
    assert ckpt.load(directory.last_path)["iteration"] == 1
    again = CheckpointDir(tmp_path / "checkpoints", keep=3)  # clears the .partial link
    assert again.newest() == again.path(2)
    again.last_path.unlink()
    assert again.newest() == again.path(2)
