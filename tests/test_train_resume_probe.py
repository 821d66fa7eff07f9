"""Resumption, probed: what a stop, a kill or a changed recipe leaves of best.pt, the loss
curve, a fine-tuning start and a damaged checkpoint; a full disk under TensorBoard; recipe
intervals the run never reaches. Tiny model and synthetic volumes, trained in-process."""

from __future__ import annotations

import errno
import json
import re
import signal
import threading
from pathlib import Path

import pytest
import torch

TINY = """\
name: probe
seed: 4
data:
  sources:
    a: {type: synthetic, shape: [12, 48, 48], seed: 1}
  validation:
    v: {type: synthetic, shape: [8, 32, 32], seed: 2}
augment: [{type: flip_rotate}]
model: {type: rsunet, widths: [4, 8], norm: group, groups: 2}
tasks:
  affinity:
    target: {type: affinity}
train:
  patch: [4, 16, 16]
  batch_size: 1
  iterations: 4
  optimizer: {type: adam, lr: 0.01}
  deterministic: true
  checkpoint_every: 2
  keep_checkpoints: 3
  validate_every: 0
  image_every: 0
  log_every: 4
  workers: 0
"""


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    path = tmp_path / "probe.yaml"
    path.write_text(TINY)
    return path


def trainer(recipe: Path, run: Path, *overrides: str, **kwargs):
    from emrun.recipe import load_recipe
    from emrun.train.trainer import Trainer

    return Trainer(load_recipe(recipe, list(overrides)), run, **kwargs)


def stop_after(trainer_, steps: int, monkeypatch, *, signum: int | None = signal.SIGTERM,
               error: type[BaseException] | None = None) -> None:
    """Make ``trainer_`` receive ``signum`` (or raise ``error``) once ``steps`` steps ran."""
    real = trainer_.step
    done = {"n": 0}

    def step(batches):
        result = real(batches)
        done["n"] += 1
        if done["n"] == steps:
            if error is not None:
                raise error("stopped by the test")
            signal.raise_signal(signum)
        return result

    monkeypatch.setattr(trainer_, "step", step)


def test_a_background_score_landed_after_its_checkpoint_still_guards_best_pt(recipe, tmp_path):
    """On a GPU a validation is scored after its iteration's checkpoint: best.pt got the
    score, last.pt did not. Killed before the next checkpoint, the run resumed with no best
    and let any later, worse validation replace best.pt."""
    run = tmp_path / "run"
    trainer(recipe, run, "train.iterations=2").fit()
    checkpoints = run / "checkpoints"
    state = torch.load(checkpoints / "last.pt", weights_only=True)
    assert state["best"] is None  # as a checkpoint written before its score arrived
    torch.save({**state, "best": 0.125}, checkpoints / "best.pt")
    resumed = trainer(recipe, run, resume=True)
    assert resumed.best == 0.125
    torch.save({**state, "best": 0.0625}, checkpoints / "last.pt")  # the lower one wins
    assert trainer(recipe, run, resume=True).best == 0.0625


def test_the_first_loss_logged_after_a_resumption_is_the_uninterrupted_runs(recipe, tmp_path,
                                                                          monkeypatch):
    """A stop mid-window lost the window's losses: the first line after the resumption
    averaged only the iterations since the checkpoint."""
    straight = tmp_path / "straight"
    trainer(recipe, straight).fit()
    stopped = tmp_path / "stopped"
    first = trainer(recipe, stopped)
    stop_after(first, 3, monkeypatch)
    assert first.fit().interrupted == "SIGTERM"
    assert torch.load(stopped / "checkpoints" / "last.pt", weights_only=True)["iteration"] == 3
    trainer(recipe, stopped, resume=True).fit()

    def logged(run: Path) -> dict[int, float]:
        rows = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
        return {row["iteration"]: row["loss/total"] for row in rows if "loss/total" in row}

    assert logged(stopped) == logged(straight) and 4 in logged(straight)


def test_a_fine_tuning_run_stopped_before_its_first_checkpoint_resumes_from_its_weights(
        recipe, tmp_path, monkeypatch, capsys):
    """--resume of a run started with --init-from and stopped before its first checkpoint
    trained it from random weights (the two flags cannot be given together)."""
    trainer(recipe, tmp_path / "base", "train.iterations=2").fit()
    weights = tmp_path / "base" / "checkpoints" / "last.pt"
    run = tmp_path / "run"
    started = trainer(recipe, run, init_from=weights)
    stop_after(started, 1, monkeypatch, error=RuntimeError)
    with pytest.raises(RuntimeError, match="stopped by the test"):
        started.fit()
    assert not any((run / "checkpoints").glob("*.pt"))
    resumed = trainer(recipe, run, resume=True)
    expected = torch.load(weights, weights_only=True)["model"]
    for key, value in resumed.model.state_dict().items():
        assert torch.equal(value, expected[key]), key
    assert f"from the weights of its --init-from {weights}" in capsys.readouterr().err
    resumed.fit()  # this session records them too: a second stop would start from them again
    sessions = json.loads((run / "provenance.json").read_text())["sessions"]
    assert [s.get("init_from") for s in sessions] == [str(weights), str(weights)]


def test_a_damaged_last_checkpoint_names_the_readable_one_and_what_to_move(recipe, tmp_path):
    """last.pt is a hard link to the newest numbered file: truncating one truncates both, so
    moving last.pt aside alone resumed nothing; the refusal now says what to move."""
    from emrun.io.checkpoint import CheckpointError

    run = tmp_path / "run"
    trainer(recipe, run).fit()
    checkpoints = run / "checkpoints"
    with open(checkpoints / "last.pt", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(CheckpointError, match=re.escape(
            "iter_0000002.pt can be read: move last.pt and iter_0000004.pt out of")):
        trainer(recipe, run, resume=True)
    aside = tmp_path / "aside"
    aside.mkdir()
    for name in ("last.pt", "iter_0000004.pt"):
        (checkpoints / name).rename(aside / name)
    assert trainer(recipe, run, resume=True).iteration == 2


def test_a_resumption_names_the_changes_it_applies_without_a_note_before(recipe, tmp_path,
                                                                        capsys):
    """A changed seed, augmentation, patch or EMA was taken silently on --resume (only the
    optimizer, schedule and length were named); bookkeeping changes stay quiet."""
    run = tmp_path / "run"
    trainer(recipe, run, "train.iterations=2").fit()
    capsys.readouterr()
    trainer(recipe, run, "train.iterations=2", "train.log_every=1", "train.workers=1",
            resume=True)
    assert "resuming" not in capsys.readouterr().err
    trainer(recipe, run, "train.iterations=2", "seed=5", "augment=none", "train.ema=0.99",
            "train.patch=[4, 32, 32]", resume=True)
    said = capsys.readouterr().err
    assert "resuming at iteration 2 with the recipe's changed seed 4 -> 5; augment [{" in said
    assert "type: flip_rotate}] -> []; train.patch" in said
    assert "train.patch [4, 16, 16] -> [4, 32, 32]; train.ema null -> 0.99" in said
    assert len(said.strip().splitlines()) == 1


def test_a_tensorboard_writer_that_cannot_write_leaves_the_error_to_the_trainer(tmp_path,
                                                                               monkeypatch):
    """A full disk under TensorBoard's writer thread printed that thread's traceback before
    the one-line error the trainer's next write ended in."""
    from emrun.train.logging import RunLogger

    printed: list[BaseException] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: printed.append(args.exc_value))
    logger = RunLogger(tmp_path, total=4, live=False)
    async_writer = logger._tb._writer.event_writer._async_writer

    def full(data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(async_writer._writer, "write", full)
    logger.step(1, {"loss/total": 0.5})
    async_writer._worker.join(timeout=60)
    assert not async_writer._worker.is_alive() and printed == []
    with pytest.raises(OSError) as raised:
        logger.step(2, {"loss/total": 0.25})
    assert raised.value.errno == errno.ENOSPC
    with pytest.raises(OSError):
        logger.close()
    boom = threading.Thread(target=lambda: 1 / 0)  # other threads' failures still print
    boom.start()
    boom.join()
    assert len(printed) == 1 and isinstance(printed[0], ZeroDivisionError)


@pytest.mark.parametrize(("setting", "key", "says"), [
    ("validate_every: 10", "probe.yaml:24:19: train.validate_every",
     "10 is more than train.iterations 4: the run never validates, so it writes no best.pt"),
    ("schedule: {type: step, milestones: [2, 4, 9]}", "probe.yaml:25:38: train.schedule."
     "milestones", "4, 9 are not before train.iterations 4: the rate never decays there"),
])
def test_intervals_the_run_never_reaches_are_located_warnings(tmp_path, setting, key, says):
    """A recipe shortened for a try kept its long intervals: no validation (so no best.pt)
    and no decay happened, and nothing said so."""
    from emrun.recipe import load_recipe

    path = tmp_path / "probe.yaml"
    validation = "" if setting.startswith("validate_every") else "  validate_every: 0\n"
    path.write_text(TINY.replace("  validate_every: 0\n", "") + validation + f"  {setting}\n")
    [line] = load_recipe(path).cautions()
    assert key in line and says in line, line
    path.write_text(TINY.replace("validate_every: 0", "validate_every: 4"))
    assert load_recipe(path).cautions() == []


def test_inference_export_and_fine_tuning_take_the_weights_validation_scored(recipe, tmp_path):
    """With train.ema, validation scores the averaged weights and best.pt is chosen by them;
    infer, export and --init-from took the raw weights, a model nobody had scored."""
    from emrun.export.source import load_trained
    from emrun.infer.engine import load_model
    from emrun.io.checkpoint import load
    from emrun.io.package import load_network
    from emrun.recipe import load_recipe

    run = tmp_path / "run"
    trainer(recipe, run, "train.ema=0.5").fit()
    last = run / "checkpoints" / "last.pt"
    state = load(last)
    averaged = {**state["ema"]["params"], **state["ema"]["buffers"]}
    moved = [n for n, t in averaged.items()
             if t.is_floating_point() and not torch.equal(t, state["model"][n])]
    assert moved, "the EMA should differ from the raw weights after 4 steps at decay 0.5"

    def same(weights) -> bool:
        return all(torch.equal(weights[n].cpu(), averaged[n].cpu()) for n in averaged)

    assert same(load_network(last)["model"])
    model = load_model(load_recipe(recipe, ["train.ema=0.5"]).recipe, last, torch.device("cpu"))
    assert same(model.state_dict())
    assert same(load_trained(last).weights)
