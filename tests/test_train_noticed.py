"""Known problems of the trainer, each pinned: events.jsonl after a kill and a resumption, dict
keys a weights-only load accepts, a user error in the ranks of a hand-started torchrun, and
the run directory's life (kill, resume, a run of another recipe, an older layout). Tiny
model, synthetic volumes, trained in-process."""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from rich.console import Console

from emrun.train.logging import EVENTS_FILE, RunLogger

TINY = """\
name: noticed
seed: 4
data:
  sources:
    a: {type: synthetic, shape: [12, 48, 48], seed: 1}
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
  validate_every: 0
  image_every: 0
  log_every: 1
  workers: 0
"""


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    path = tmp_path / "noticed.yaml"
    path.write_text(TINY)
    return path


def trainer(recipe: Path, run: Path, *overrides: str, **kwargs: Any) -> Any:
    from emrun.recipe import load_recipe
    from emrun.train.trainer import Trainer

    kwargs.setdefault("console", quiet())
    return Trainer(load_recipe(recipe, list(overrides)), run, **kwargs)


def quiet() -> Console:
    return Console(file=io.StringIO(), force_terminal=False, width=100)


def stop_after(trainer_: Any, steps: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``trainer_`` die (an exception: no checkpoint) once ``steps`` steps ran."""
    real = trainer_.step
    done = {"n": 0}

    def step(batches: Any) -> Any:
        result = real(batches)
        done["n"] += 1
        if done["n"] == steps:
            raise RuntimeError("killed by the test")
        return result

    monkeypatch.setattr(trainer_, "step", step)


def iterations(run: Path) -> list[int]:
    """The iterations of events.jsonl's training records, in file order (each line JSON)."""
    lines = (run / EVENTS_FILE).read_text(encoding="utf-8").splitlines()
    return [record["iteration"] for record in map(json.loads, lines)
            if "validation" not in record]


# -- 1. events.jsonl holds the history the run continues -------------------------------------


def test_a_resumed_run_logs_each_iteration_once(recipe, tmp_path, monkeypatch):
    """Killed in iteration 4 (checkpoint at 2) and resumed: iteration 3's line of the
    abandoned attempt stayed, and the file held 1, 2, 3, 3, 4."""
    run = tmp_path / "run"
    first = trainer(recipe, run)
    stop_after(first, 4, monkeypatch)
    with pytest.raises(RuntimeError, match="killed by the test"):
        first.fit()
    assert iterations(run) == [1, 2, 3]
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["iteration"] == 2
    monkeypatch.undo()
    trainer(recipe, run, resume=True).fit()
    assert iterations(run) == [1, 2, 3, 4]


def test_an_event_log_that_is_no_file_is_the_users_to_move(recipe, tmp_path):
    """A folder in events.jsonl's place was an internal error (IsADirectoryError, exit 1);
    the checkpoints stay as they were."""
    from emrun.errors import UserError

    run = tmp_path / "run"
    trainer(recipe, run).fit()
    (run / EVENTS_FILE).unlink()
    (run / EVENTS_FILE).mkdir()
    last = (run / "checkpoints" / "last.pt").read_bytes()
    with pytest.raises(UserError, match=r"events\.jsonl: is not a file, so not the run's "
                                        r"event log"):
        trainer(recipe, run, "train.iterations=6", resume=True).fit()
    assert (run / "checkpoints" / "last.pt").read_bytes() == last


def test_a_resume_that_trains_nothing_leaves_the_runs_recipe_and_sessions(recipe,
                                                                         tmp_path):
    """Resumed with a lower train.iterations, a run trains nothing ('nothing was trained'),
    yet its recipe.yaml took the lowered value, beside checkpoints at the old one, and its
    provenance a session that did nothing."""
    run = tmp_path / "run"
    trainer(recipe, run).fit()
    kept = {name: (run / name).read_bytes() for name in ("recipe.yaml", "provenance.json")}
    assert trainer(recipe, run, "train.iterations=2", resume=True).fit().iteration == 4
    assert {name: (run / name).read_bytes() for name in kept} == kept


def test_an_unreadable_provenance_is_kept_beside_and_said(recipe, tmp_path):
    """A damaged provenance.json was replaced on resume without a word, its earlier
    sessions gone."""
    run = tmp_path / "run"
    trainer(recipe, run).fit()
    (run / "provenance.json").write_text("{bad")
    console = quiet()
    trainer(recipe, run, "train.iterations=6", resume=True, console=console).fit()
    assert (run / "provenance.json.damaged").read_text() == "{bad"
    assert [s["iteration"] for s in json.loads((run / "provenance.json").read_text())[
        "sessions"]] == [4]
    said = " ".join(console.file.getvalue().split())
    assert "provenance.json could not be read: kept as provenance.json.damaged" in said


def test_a_resume_with_another_process_count_says_what_changes(recipe, tmp_path):
    """A `--gpus 2` run resumed with one process went on without a word, though each
    process's data stream and the effective batch change (a batch_size change is said)."""
    run = tmp_path / "run"
    trainer(recipe, run).fit()
    last = run / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=True)
    assert state["processes"] == 1
    console = quiet()
    trainer(recipe, run, "train.iterations=5", resume=True, console=console).fit()
    assert "process" not in console.file.getvalue()  # the same count: nothing to say
    state = torch.load(last, weights_only=True)
    state["processes"] = 2  # as a two-process run saves it
    torch.save(state, last)
    console = quiet()
    trainer(recipe, run, "train.iterations=6", resume=True, console=console).fit()
    said = " ".join(console.file.getvalue().split())
    assert "resuming at iteration 5 with 1 process where the run had 2: each process's data " \
           "stream and the effective batch (train.batch_size x processes) differ" in said


def test_a_resumption_cuts_events_jsonl_back_to_its_iteration(tmp_path):
    """What a kill left past the checkpoint goes (later records, a validation, a half
    line); the records up to it stay, a validation of that iteration too (it lands after
    its checkpoint when scored in the background)."""
    with RunLogger(tmp_path, total=6, console=quiet()) as log:
        for it in range(1, 6):
            log.step(it, {"loss/total": float(it)})
            if it in (3, 4):
                log.validation(it, {"loss/total": it / 10})
    with (tmp_path / EVENTS_FILE).open("a") as f:
        f.write('{"iteration":6,"ti')  # killed mid-write
    with RunLogger(tmp_path, total=6, console=quiet(), start=3) as log:
        for it in (4, 5, 6):
            log.step(it, {"loss/total": 10.0 + it})
    records = [json.loads(line) for line in (tmp_path / EVENTS_FILE).read_text().splitlines()]
    got = [(r["iteration"], r.get("loss/total"), r.get("validation")) for r in records]
    assert got == [(1, 1.0, None), (2, 2.0, None), (3, 3.0, None), (3, None, {"loss/total": 0.3}),
                   (4, 14.0, None), (5, 15.0, None), (6, 16.0, None)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [EVENTS_FILE, "tensorboard"]


def test_a_start_from_0_keeps_no_record_of_the_abandoned_attempt(tmp_path):
    """A run stopped before its first checkpoint and resumed starts from 0: its abandoned
    curve stayed in events.jsonl (TensorBoard already hid it)."""
    with RunLogger(tmp_path, total=4, console=quiet()) as log:
        for it in (1, 2, 3):
            log.step(it, {"loss/total": 5.0})
    with RunLogger(tmp_path, total=4, console=quiet(), start=0) as log:
        log.step(1, {"loss/total": 1.0})
    records = [json.loads(line) for line in (tmp_path / EVENTS_FILE).read_text().splitlines()]
    assert [(r["iteration"], r["loss/total"]) for r in records] == [(1, 1.0)]


def test_events_jsonl_is_left_alone_when_nothing_goes(tmp_path):
    """No rewrite (same file) when every record is of the continued history."""
    with RunLogger(tmp_path, total=4, console=quiet()) as log:
        log.step(1, {"loss/total": 1.0})
    before = (tmp_path / EVENTS_FILE).stat().st_ino
    with RunLogger(tmp_path, total=4, console=quiet(), start=1) as log:
        log.step(2, {"loss/total": 2.0})
    assert (tmp_path / EVENTS_FILE).stat().st_ino == before
    assert iterations(tmp_path) == [1, 2]


def test_the_cut_is_atomic(tmp_path, monkeypatch):
    """A failure in the middle of the cut leaves the old file whole and no temporary file;
    a temporary file a kill left is removed by the next run."""
    import emrun.train.logging as run_logging

    with RunLogger(tmp_path, total=4, console=quiet()) as log:
        for it in (1, 2, 3):
            log.step(it, {"loss/total": 1.0})
    before = (tmp_path / EVENTS_FILE).read_bytes()
    real, calls = run_logging._kept, {"n": 0}

    def failing(line: bytes, start: int) -> bool:
        calls["n"] += 1
        if calls["n"] > 4:  # the check passes, the rewrite fails at its second line
            raise OSError(28, "No space left on device")
        return real(line, start)

    monkeypatch.setattr(run_logging, "_kept", failing)
    with pytest.raises(OSError, match="No space"):
        RunLogger(tmp_path, total=4, console=quiet(), start=1)
    assert (tmp_path / EVENTS_FILE).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [EVENTS_FILE, "tensorboard"]
    monkeypatch.undo()
    (tmp_path / f".{EVENTS_FILE}.99999.tmp").write_text("left by a kill")
    RunLogger(tmp_path, total=4, console=quiet(), start=1).close()
    assert iterations(tmp_path) == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == [EVENTS_FILE, "tensorboard"]


# -- 2. what a weights-only load accepts, the check before a save accepts ---------------------


class _Kind:
    pass


CASES = {
    "tuple key": {(0, 16, 16): 1},
    "nested tuple key": {((1, 2), ("a", None)): 1},
    "torch.Size key": {torch.Size([1, 2]): 1},
    "tensor key": {torch.tensor(3): 1},
    "dtype key": {torch.float16: 1},
    "bytearray": {"a": bytearray(b"xy")},
    "Counter": {"a": collections.Counter(a=2)},
    "layout": {"a": torch.strided},
    "set of tuples": {"a": {(1, 2)}},
    "numpy item in a tuple key": {(np.int64(1),): 1},
    "numpy key": {np.int64(1): 1},
    "frozenset key": {frozenset({1}): 1},
    "frozenset": {"a": frozenset({1})},
    "numpy in a set": {"a": {np.int64(1)}},
    "defaultdict": {"a": collections.defaultdict(int)},
    "range": {"a": range(3)},
}


def _weights_only_loads(state: dict) -> bool:
    buffer = io.BytesIO()
    try:
        torch.save(state, buffer)
        buffer.seek(0)
        torch.load(buffer, weights_only=True)
    except Exception:
        return False
    return True


@pytest.mark.parametrize("name", list(CASES))
def test_the_save_check_accepts_what_a_weights_only_load_does(name):
    """Tuple keys (an offset, a pair of names) load with weights_only=True, yet the check
    before a save refused them (and bytearrays, Counters, torch.layout)."""
    from emrun.io.checkpoint import _check_loadable

    state = {"iteration": 1, "x": CASES[name]}
    if _weights_only_loads(state):
        _check_loadable(state)
    else:
        with pytest.raises(TypeError, match=r"state\['x'\]"):
            _check_loadable(state)


def test_a_checkpoint_with_tuple_keys_saves_and_loads(tmp_path):
    from emrun.io.checkpoint import load, save_atomic

    state = {"iteration": 3, "blocks": {(0, 0, 0): torch.ones(2), (0, 16, 16): torch.zeros(2)},
             "pairs": {("affinity", "mito"): 0.5}}
    save_atomic(tmp_path / "c.pt", state)
    loaded = load(tmp_path / "c.pt")
    assert set(loaded["blocks"]) == {(0, 0, 0), (0, 16, 16)}
    assert loaded["pairs"] == {("affinity", "mito"): 0.5}
    with pytest.raises(TypeError, match="numpy"):
        save_atomic(tmp_path / "d.pt", {"iteration": 1, "b": {(np.int64(0),): 1}})
    assert not (tmp_path / "d.pt").exists()


# -- 3. a user error in the ranks of a hand-started torchrun ---------------------------------


def _torchrun_rank(monkeypatch: pytest.MonkeyPatch, attempt: Path, rank: int) -> None:
    """This process's environment as torchrun gives it to local rank ``rank`` of 2."""
    from emrun.train.launch import RANK_ERRORS

    (attempt / str(rank)).mkdir(parents=True, exist_ok=True)
    monkeypatch.delenv(RANK_ERRORS, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("LOCAL_RANK", str(rank))
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(attempt / str(rank) / "error.json"))


def test_a_hand_started_torchrun_rank_says_a_message_only_once(tmp_path, monkeypatch):
    """`torchrun ... -m emrun train`: every rank printed the same user error."""
    import emrun.train.launch as launch

    monkeypatch.setattr(launch, "_GRACE_S", 0.0)
    for name in ("WORLD_SIZE", "RANK", "TORCHELASTIC_ERROR_FILE", launch.RANK_ERRORS):
        monkeypatch.delenv(name, raising=False)
    assert not launch.said_to_launcher("alone, a process says it itself")
    attempt = tmp_path / "run_x" / "attempt_0"
    _torchrun_rank(monkeypatch, attempt, 0)
    assert not launch.said_to_launcher("same")  # the first says it
    _torchrun_rank(monkeypatch, attempt, 1)
    assert launch.said_to_launcher("same")  # said already: exit 2 quietly
    assert not launch.said_to_launcher("other")  # a different message is said too
    _torchrun_rank(monkeypatch, tmp_path / "run_x" / "attempt_1", 1)  # a restart says it again
    assert not launch.said_to_launcher("same")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not launch.said_to_launcher("same")


def test_the_ranks_of_a_hand_started_torchrun_print_one_line_and_exit_2(tmp_path, monkeypatch,
                                                                       capsys):
    import typer

    import emrun.train.launch as launch
    from emrun.cli.app import guarded
    from emrun.errors import UserError

    monkeypatch.setattr(launch, "_GRACE_S", 0.0)

    @guarded
    def command() -> None:
        raise UserError("data.sources.a: no such file")

    for rank in (0, 1):
        _torchrun_rank(monkeypatch, tmp_path / "attempt_0", rank)
        with pytest.raises(typer.Exit) as stopped:
            command()
        assert stopped.value.exit_code == 2
    said = capsys.readouterr().err.strip().splitlines()
    assert said == ["error: data.sources.a: no such file"]


# -- 4. the run directory's life ------------------------------------------------------------


def _refused(fn: Any) -> str:
    from emrun.errors import UserError

    with pytest.raises(UserError) as refused:
        fn()
    return str(refused.value)


def test_a_signal_stop_and_resume_leave_last_pt_the_newest_and_one_curve(recipe, tmp_path,
                                                                          monkeypatch):
    """A SIGTERM in iteration 3 (its checkpoint written on the way out), then --resume:
    last.pt is the newest numbered checkpoint and events.jsonl one record per iteration."""
    run = tmp_path / "run"
    first = trainer(recipe, run)
    real, done = first.step, {"n": 0}

    def step(batches: Any) -> Any:
        result = real(batches)
        done["n"] += 1
        if done["n"] == 3:
            signal.raise_signal(signal.SIGTERM)
        return result

    monkeypatch.setattr(first, "step", step)
    assert first.fit().interrupted == "SIGTERM"
    monkeypatch.undo()
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["iteration"] == 3
    trainer(recipe, run, resume=True).fit()
    assert iterations(run) == [1, 2, 3, 4]
    numbered = sorted(p.name for p in (run / "checkpoints").glob("iter_*.pt"))
    assert numbered == ["iter_0000002.pt", "iter_0000003.pt", "iter_0000004.pt"]
    assert os.path.samefile(run / "checkpoints" / "last.pt", run / "checkpoints" / numbered[-1])


def test_a_run_directory_of_another_recipe_is_refused_on_resume(recipe, tmp_path):
    run = tmp_path / "run"
    trainer(recipe, run, "train.iterations=2").fit()
    said = _refused(lambda: trainer(recipe, run, "model.widths=[4, 16]", resume=True))
    assert "model changed" in said and "--init-from" in said
    said = _refused(lambda: trainer(recipe, run))
    assert "already holds a run" in said and "nothing was overwritten" in said


def test_a_checkpoint_of_an_older_emrun_resumes(recipe, tmp_path):
    """A checkpoint written before emrun had some setting (its recipe lacks the key the
    current schema resolves to a default) was refused as 'the recipe's model, tasks, data
    changed', and a missing key elsewhere was reported as a change applied from here on;
    checkpoint parts added since (the log window, devices, ...) were already optional."""
    import yaml

    run = tmp_path / "run"
    trainer(recipe, run, "train.iterations=2").fit()
    last = run / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=True)
    saved = yaml.safe_load(state["recipe"])
    del saved["model"]["upsample"], saved["tasks"]["affinity"]["target"]["relabel"]
    del saved["data"]["sources"]["a"]["min_labelled"]
    del saved["infer"][next(iter(saved["infer"]))]
    older = {key: value for key, value in state.items()
             if key not in ("log_window", "devices", "train_seconds", "nonfinite")}
    older["recipe"] = yaml.safe_dump(saved, sort_keys=False)
    for path in (run / "checkpoints").glob("*.pt"):
        path.unlink()
    torch.save(older, last)
    console = quiet()
    resumed = trainer(recipe, run, "train.iterations=3", resume=True, console=console)
    assert resumed.iteration == 2
    resumed.fit()
    assert resumed.iteration == 3
    notes = [line for line in console.file.getvalue().splitlines() if line.startswith("note:")]
    assert notes == ["note: resuming at iteration 2 with the recipe's train.iterations 2 -> 3 "
                     "(learning rate 0.01 -> 0.01)"]
    changed = yaml.safe_load(state["recipe"])
    changed["model"]["upsample"] = "transpose"  # a real change is still refused
    torch.save({**state, "recipe": yaml.safe_dump(changed)}, run / "checkpoints" / "iter_9.pt")
    (run / "checkpoints" / "last.pt").unlink()
    said = _refused(lambda: trainer(recipe, run, "train.iterations=12", resume=True))
    assert "model changed" in said


def test_a_start_killed_while_writing_a_run_file_is_cleared_like_any_failed_start(tmp_path):
    """A kill during the atomic write of recipe.yaml (or of the events.jsonl cut) left its
    temporary file; the next start was refused as 'already holds a run'. A user's own file
    is still refused."""
    from emrun import locks
    from emrun.train.run_dir import prepare

    run = tmp_path / "run"
    run.mkdir()
    (run / ".provenance.json.4241.tmp").write_text("{")  # killed in its first file: cleared
    assert prepare(run, resume=False)
    locks.release(run)
    (run / "provenance.json").write_text('{"emrun": "0.1.0", "sessions": []}')
    (run / "events.jsonl").write_text("")
    (run / ".recipe.yaml.4242.tmp").write_text("name: x\n")
    (run / ".events.jsonl.4243.tmp").write_text("")
    assert prepare(run, resume=False)
    locks.release(run)
    assert [p.name for p in locks.contents(run)] == []
    (run / ".notes.4242.tmp").write_text("mine")
    said = _refused(lambda: prepare(run, resume=False))
    locks.release(run)
    assert "already holds a run" in said
    assert (run / ".notes.4242.tmp").exists()


# -- validation's non-finite outputs -------------------------------------------------------

VALIDATED = TINY.replace("    a: {type: synthetic, shape: [12, 48, 48], seed: 1}\n",
                         "    a: {type: synthetic, shape: [12, 48, 48], seed: 1}\n"
                         "  validation:\n"
                         "    v: {type: synthetic, shape: [8, 32, 32], seed: 2}\n")


def test_validation_counts_the_network_s_nan_outputs(tmp_path):
    """NaN outputs are blended as 0 (boundaries): the segmentation scored splits there, and
    the validation said nothing of it, where `emrun infer` warns."""
    from emrun.models import build_model
    from emrun.recipe import load_recipe
    from emrun.train.seg_validation import predict_validation

    path = tmp_path / "v.yaml"
    path.write_text(VALIDATED)
    loaded = load_recipe(path).recipe
    model = build_model(loaded).eval()
    assert predict_validation(loaded, model, torch.device("cpu"))[0].nonfinite == 0
    last = [m for m in model.modules() if isinstance(m, torch.nn.Conv3d)][-1]
    with torch.no_grad():
        last.bias.fill_(float("nan"))
    [scored] = predict_validation(loaded, model, torch.device("cpu"))
    assert scored.nonfinite >= 3 * 8 * 32 * 32  # every output of every patch


def test_the_trainer_warns_of_nan_in_the_validation_prediction(tmp_path, monkeypatch):
    import emrun.train.trainer as trainer_module

    path = tmp_path / "v.yaml"
    path.write_text(VALIDATED.replace("validate_every: 0", "validate_every: 2")
                    + "  validate_in_background: false\n")
    real = trainer_module.predict_validation

    def with_nan(*args: Any) -> Any:
        return [dataclasses.replace(i, nonfinite=7) for i in real(*args)]

    monkeypatch.setattr(trainer_module, "predict_validation", with_nan)
    buffer = io.StringIO()
    trainer(path, tmp_path / "run", console=Console(file=buffer, width=300)).fit()
    assert "warning: validation: the network output 7 NaN or infinite values" in \
        buffer.getvalue()
