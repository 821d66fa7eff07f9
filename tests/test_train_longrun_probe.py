"""Long runs, probed: many stops and resumptions of one run, what its folder grows by, and
which process keeps freed sample memory. Tiny model and synthetic volumes, trained
in-process."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

TINY = """\
name: longrun
seed: 5
data:
  sources:
    a: {type: synthetic, shape: [12, 48, 48], seed: 1}
    b: {type: synthetic, shape: [12, 48, 48], seed: 2}
augment: [{type: flip_rotate}, {type: grayscale, p: 0.5, contrast: 0.3, brightness: 0.3}]
model: {type: rsunet, widths: [4, 8], norm: group, groups: 2}
tasks:
  affinity:
    target: {type: affinity}
train:
  patch: [4, 16, 16]
  batch_size: 1
  iterations: 4
  optimizer: {type: adam, lr: 0.01}
  schedule: {type: cosine, warmup: 2}
  deterministic: true
  checkpoint_every: 2
  keep_checkpoints: 2
  validate_every: 0
  image_every: 0
  log_every: 2
  workers: 0
"""


@pytest.fixture
def recipe(write) -> Path:  # type: ignore[no-untyped-def]
    return write(TINY, "longrun.yaml")


def train(recipe: Path, run: Path, *, resume: bool = False, stop_at: int | None = None):
    """A trainer run into ``run``; SIGTERM once iteration ``stop_at`` is done."""
    from emrun.recipe import load_recipe
    from emrun.train.trainer import Trainer

    trainer = Trainer(load_recipe(recipe), run, resume=resume)
    if stop_at is not None:
        real = trainer.step

        def step(batches):
            result = real(batches)
            if result is not None and trainer.iteration + 1 == stop_at:
                signal.raise_signal(signal.SIGTERM)
            return result

        trainer.step = step  # type: ignore[method-assign]
    trainer.fit()
    return trainer


def curve(run: Path) -> list[tuple[int, float, float]]:
    """(iteration, total loss, lr) of each log line of the run's events.jsonl."""
    lines = (run / "events.jsonl").read_text().splitlines()
    return [(r["iteration"], r["loss/total"], r["lr"]) for r in map(json.loads, lines)]


def test_a_run_stopped_and_resumed_between_log_lines_is_the_straight_run(recipe, tmp_path):
    """Three sessions, stopped off the log and checkpoint grid: the same weights, learning
    rate and loss curve as one session, no line twice, and a folder that grew by one
    TensorBoard file and one provenance session per session, with no more numbered
    checkpoints than ``keep_checkpoints``."""
    straight = train(recipe, tmp_path / "straight")
    pieces = tmp_path / "pieces"
    train(recipe, pieces, stop_at=1)
    train(recipe, pieces, resume=True, stop_at=3)
    resumed = train(recipe, pieces, resume=True)

    assert resumed.iteration == straight.iteration == 4
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.optimizer.param_groups[0]["lr"] == straight.optimizer.param_groups[0]["lr"]
    assert curve(pieces) == curve(tmp_path / "straight")
    assert [it for it, _, _ in curve(pieces)] == [2, 4]
    assert sorted(p.name for p in (pieces / "checkpoints").iterdir()) == \
        ["iter_0000003.pt", "iter_0000004.pt", "last.pt"]  # a stop's checkpoint counts too
    assert len(list((pieces / "tensorboard").iterdir())) == 3
    provenance = json.loads((pieces / "provenance.json").read_text())
    assert [s["iteration"] for s in provenance["sessions"]] == [0, 1, 3]


def test_a_resumption_with_nothing_to_cut_leaves_events_jsonl_unwritten(tmp_path):
    """A resumption from the last logged iteration (a SIGTERM's checkpoint) appends to
    events.jsonl as it is: rewriting it at every resumption wrote the whole history again
    each time, bytes growing with the square of the resumptions of a long run."""
    from emrun.train.logging import keep_history

    events = tmp_path / "events.jsonl"
    events.write_text("".join(json.dumps({"iteration": i, "loss": 0.5}) + "\n"
                              for i in range(1, 101)))
    before = os.stat(events)
    keep_history(events, 100)
    after = os.stat(events)
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == \
        (before.st_ino, before.st_mtime_ns, before.st_size)
    keep_history(events, 40)  # a kill after iteration 40's checkpoint: the rest goes
    assert [json.loads(line)["iteration"] for line in events.read_text().splitlines()] == \
        list(range(1, 41))


def _calls_to_keep_memory(monkeypatch) -> list[bool]:
    """Record `keep_freed_memory` calls (the real one sets glibc's heap for good)."""
    import emrun.data.samples as samples

    calls: list[bool] = []
    monkeypatch.setattr(samples, "keep_freed_memory", lambda: calls.append(True) or True)
    return calls


def test_the_trainer_making_its_own_samples_keeps_no_freed_memory(recipe, monkeypatch):
    """With ``workers: 0`` the trainer makes its samples itself: glibc's 256 MB trim
    threshold was set in the process that holds the model's tensors (its memory stayed 60
    to 150 MB higher between steps); only loader workers keep freed sample memory."""
    from emrun.data.loader import train_batches
    from emrun.recipe import load_recipe

    calls = _calls_to_keep_memory(monkeypatch)
    stream = train_batches(load_recipe(recipe).recipe, workers=0)
    try:
        batch = next(stream)
    finally:
        stream.close()
    assert batch["image"].shape == (1, 1, 4, 16, 16)
    assert calls == []


def test_a_loader_worker_keeps_freed_sample_memory(recipe, monkeypatch):
    """A loader worker (a process that only makes samples) still keeps them."""
    import emrun.data.loader as loader
    from emrun.recipe import load_recipe

    calls = _calls_to_keep_memory(monkeypatch)
    monkeypatch.setattr(loader, "get_worker_info", lambda: SimpleNamespace(id=0, num_workers=1))
    monkeypatch.setattr(loader, "threadpool_limits", lambda limits: None)  # not this process's
    batches = iter(loader.TrainBatches(load_recipe(recipe).recipe))
    assert "image" in next(batches)
    assert calls == [True]
