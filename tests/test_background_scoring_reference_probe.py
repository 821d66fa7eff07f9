"""Background validation scoring, probed against plain references: the figures logged per
iteration and best.pt (the first iteration of the lowest ARAND, its training state) must not
depend on whether, or how fast, a helper process scores; a scorer that fails or dies is
reported and leaves the checkpoints intact; a resumption keeps what the uninterrupted run
keeps, or differs only as documented. Tiny CPU trainings whose validation predictions and
scores are scripted per iteration (the trainer's own bookkeeping is what is under test), and
emrun.evaluate.stops / schedule against their stated rules.

Module level stays light (no torch): the helper processes import this module."""

from __future__ import annotations

import json
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

TINY = """\
name: background_probe
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
  checkpoint_every: 1
  keep_checkpoints: 20
  validate_every: 1
  image_every: 0
  log_every: 1
  workers: 0
"""


# ------------------------------------------------------------------ scripted scoring

@dataclass(frozen=True)
class Tag:
    """What the scripted `predict_validation` hands the scorer: the iteration validated and
    what its scoring does (``nonfinite``: the attribute the trainer sums)."""

    iteration: int
    arand: float
    action: str = "score"  # score | raise | exit | memory | wait
    gate: str = ""
    nonfinite: int = 0


def scripted(spec: object, inputs: list[Tag]) -> dict[str, float]:
    """A stand-in `score_validation`: the scores the test wrote for the iteration, or the
    failure it asked for. Runs in the trainer or in its helper process alike."""
    (tag,) = inputs
    if tag.action == "raise":
        raise ValueError(f"scripted failure at iteration {tag.iteration}")
    if tag.action == "exit":
        os._exit(7)
    if tag.action == "memory":
        raise MemoryError("scripted: the scorer ran out of memory")
    if tag.action == "wait":  # as a long scoring: until the gate opens (bounded)
        deadline = time.monotonic() + 4
        while not os.path.exists(tag.gate) and time.monotonic() < deadline:
            time.sleep(0.01)
    return {"arand": tag.arand, "voi_split": tag.iteration / 100, "voi_merge": 0.0,
            "cremi_score": 0.0, "segment/bias": 0.5}


def sleeping(seconds: float, scores: dict[str, float]) -> dict[str, float]:
    time.sleep(seconds)
    return scores


def raising(message: str) -> None:
    raise ValueError(message)


def exiting(code: int) -> None:
    os._exit(code)


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    path = tmp_path / "probe.yaml"
    path.write_text(TINY)
    return path


def make(recipe: Path, run: Path, background: str, *overrides: str, **kwargs):
    from rich.console import Console

    from emrun.recipe import load_recipe
    from emrun.train.trainer import Trainer

    loaded = load_recipe(recipe, [f"train.validate_in_background={background}", *overrides])
    return Trainer(loaded, run, console=Console(file=open(os.devnull, "w")), **kwargs)


def script(trainer, monkeypatch, table: dict[int, float],
           actions: dict[int, tuple[str, str]] | None = None) -> None:
    """Validation predictions and scores of ``trainer`` scripted by iteration: ``table``
    gives each iteration's ARAND, ``actions`` (iteration: (action, gate)) its failures."""
    from emrun.train import trainer as module

    actions = actions or {}

    def predict(recipe, model, device):
        it = trainer.iteration
        action, gate = actions.get(it, ("score", ""))
        return [Tag(it, table[it], action, gate)]

    monkeypatch.setattr(module, "predict_validation", predict)
    monkeypatch.setattr(module, "score_validation", scripted)


def sigterm_in_step(trainer, monkeypatch, n: int) -> None:
    """SIGTERM to this process at the end of ``trainer``'s n-th step, as a cluster's."""
    real, calls = trainer.step, []

    def step(batches):
        result = real(batches)
        calls.append(1)
        if len(calls) == n:
            signal.raise_signal(signal.SIGTERM)
        return result

    monkeypatch.setattr(trainer, "step", step)


def timing(monkeypatch, how: str) -> None:
    """When the helper's scores are collected: ``fast``, each by the next iteration (as a
    scoring shorter than a step); ``slow``, only when the next validation or the end waits
    for it (as a scoring longer than validate_every steps); ``real``: as they come."""
    from emrun.train.background import BackgroundScorer

    if how == "fast":
        monkeypatch.setattr(BackgroundScorer, "finished", BackgroundScorer.drain)
    elif how == "slow":
        monkeypatch.setattr(BackgroundScorer, "finished", lambda self: [])


def validations(run: Path) -> list[tuple[int, dict]]:
    rows = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    return [(r["iteration"], r["validation"]) for r in rows if "validation" in r]


def load(path: Path) -> dict:
    import torch

    return torch.load(path, weights_only=True)


def same_tensors(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def reference_best(table: dict[int, float], iterations: list[int]) -> int | None:
    """The first iteration of the lowest finite ARAND: a plain loop."""
    best_it, best = None, None
    for it in iterations:
        value = table[it]
        if value is None or not math.isfinite(value):
            continue
        if best is None or value < best:
            best_it, best = it, value
    return best_it


TABLE = {1: 0.5, 2: 0.3, 3: math.nan, 4: 0.3}
"""A tie at 0.3 (iterations 2 and 4) and a NaN between."""


# ------------------------------------------------------------------ BackgroundScorer alone

def test_scores_come_back_in_submission_order_with_the_losses_merged():
    """A slow scoring then a fast one: each submit hands back the one before (waited for),
    so the order is the iterations' whatever the helpers' speeds."""
    from emrun.train.background import BackgroundScorer

    scorer = BackgroundScorer()
    got = []
    try:
        for it, delay in ((2, 0.6), (4, 0.0), (6, 0.3)):
            done = scorer.submit(it, {"loss/total": it / 10}, {"iteration": it}, sleeping,
                                 delay, {"arand": it / 100})
            got += [(p.iteration, p.result(), p.state) for p in done]
            assert scorer.busy is not None and scorer.busy.iteration == it
        got += [(p.iteration, p.result(), p.state) for p in scorer.drain()]
    finally:
        scorer.close()
    assert got == [(it, {"loss/total": it / 10, "arand": it / 100}, {"iteration": it})
                   for it in (2, 4, 6)]
    assert scorer.busy is None and scorer.drain() == [] and scorer.finished() == []


@pytest.mark.parametrize(("fn", "arg", "said"), [
    (raising, "no segment", "validation scoring failed: ValueError: no segment"),
    (exiting, 3, "died (exit code 3"),
])
def test_a_failed_scoring_is_collected_without_waiting_and_said_once(fn, arg, said):
    """A helper that raises or dies is finished (finished() returns it, never blocks), and
    result() says why; drain() does not raise, so the trainer records it where it logs."""
    from emrun.train.background import BackgroundScorer

    scorer = BackgroundScorer()
    try:
        scorer.submit(3, {"loss/total": 1.0}, None, fn, arg)
        deadline = time.monotonic() + 30
        done = []
        while not done and time.monotonic() < deadline:
            done = scorer.finished()
            time.sleep(0.01)
        assert [p.iteration for p in done] == [3]
        for _ in range(2):  # the same answer when asked again
            with pytest.raises(RuntimeError) as caught:
                done[0].result()
            assert said in str(caught.value)
    finally:
        scorer.close()


# ------------------------------------------------------------------ the trainer, scripted

@pytest.fixture(scope="module")
def inline(tmp_path_factory) -> Path:
    """The reference run: TABLE's scores, scored in the trainer (validate_in_background
    false), 4 iterations, a checkpoint and a validation each."""
    folder = tmp_path_factory.mktemp("inline")
    recipe = folder / "probe.yaml"
    recipe.write_text(TINY)
    run = folder / "run"
    with pytest.MonkeyPatch.context() as patch:
        trainer = make(recipe, run, "false")
        script(trainer, patch, TABLE)
        trainer.fit()
    return run


@pytest.mark.parametrize("how", ["inline", "fast", "slow"])
def test_logged_figures_and_best_pt_match_a_plain_argmin(inline, recipe, tmp_path,
                                                         monkeypatch, how):
    """Whether scored in the trainer or by a helper (collected at once or late): one
    validation record per iteration, in order, with the scripted figures and the
    trainer-scored run's losses; best.pt the first iteration of the lowest finite ARAND
    (a later equal one does not replace it; NaN never chooses), holding that iteration's
    weights (iter_N.pt's) and figure; the last weights the trainer-scored run's (scores
    never feed back into training)."""
    run = inline
    if how != "inline":
        timing(monkeypatch, how)
        run = tmp_path / "run"
        trainer = make(recipe, run, "true")
        script(trainer, monkeypatch, TABLE)
        trainer.fit()
    logged = validations(run)
    assert [it for it, _ in logged] == [1, 2, 3, 4]
    for it, figures in logged:
        want = None if math.isnan(TABLE[it]) else TABLE[it]
        assert figures["arand"] == want and figures["voi_split"] == it / 100
        assert "loss/total" in figures and "loss/affinity" in figures
    assert logged == validations(inline)
    best_it = reference_best(TABLE, [1, 2, 3, 4])
    assert best_it == 2
    best = load(run / "checkpoints" / "best.pt")
    assert best["iteration"] == best_it and best["best"] == TABLE[best_it]
    assert best["best_by"] == "arand"
    snapshot = load(run / "checkpoints" / f"iter_{best_it:07d}.pt")
    assert same_tensors(best["model"], snapshot["model"])
    assert best["optimizer"]["state"].keys() == snapshot["optimizer"]["state"].keys()
    last = load(run / "checkpoints" / "last.pt")
    assert last["best"] == TABLE[best_it] and last["best_by"] == "arand"
    assert same_tensors(last["model"], load(inline / "checkpoints" / "last.pt")["model"])


def test_a_kill_after_a_late_score_resumes_to_the_uninterrupted_runs_record(
        inline, recipe, tmp_path, monkeypatch):
    """checkpoint_every 2, scores in a helper: iteration 2's score (the best, 0.3) lands at
    iteration 3, after checkpoint 2. Killed in step 4 (no checkpoint 3 or 4), the run
    resumes at 2 with that score read back from best.pt and from events.jsonl (kept:
    iteration 2's), so iteration 4's equal 0.3 does not replace it, and the finished run's
    record, best.pt and weights are the uninterrupted trainer-scored run's."""
    every = ("train.checkpoint_every=2",)
    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        timing(patch, "fast")
        first = make(recipe, run, "true", *every)
        script(first, patch, TABLE)
        real, calls = first.step, []

        def step(batches):
            calls.append(1)
            if len(calls) == 4:
                raise RuntimeError("killed by the test")
            return real(batches)

        patch.setattr(first, "step", step)
        with pytest.raises(RuntimeError, match="killed by the test"):
            first.fit()
    assert load(run / "checkpoints" / "last.pt")["iteration"] == 2
    assert load(run / "checkpoints" / "last.pt")["best"] == 0.5  # 2's score came later
    assert load(run / "checkpoints" / "best.pt")["iteration"] == 2
    with monkeypatch.context() as patch:
        timing(patch, "fast")
        resumed = make(recipe, run, "true", *every, resume=True)
        assert resumed.best == 0.3
        script(resumed, patch, TABLE)
        resumed.fit()
    assert validations(run) == validations(inline)
    best, best_inline = (load(r / "checkpoints" / "best.pt") for r in (run, inline))
    assert best["iteration"] == best_inline["iteration"] == reference_best(TABLE, range(1, 5))
    assert same_tensors(best["model"], best_inline["model"])
    assert same_tensors(load(run / "checkpoints" / "last.pt")["model"],
                        load(inline / "checkpoints" / "last.pt")["model"])


def test_a_stop_skips_the_validation_of_its_iteration(
        inline, recipe, tmp_path, monkeypatch):
    """Scores collected late: SIGTERM in step 3 stops after iteration 3, whose checkpoint
    is written without validating it (a stop waits for no score): iteration 3 is never
    validated and iteration 2's score, still pending, is abandoned (a note says so); neither
    is recorded, even after --resume. The rest of the record and training are the
    uninterrupted trainer-scored run's, and best.pt is the best of what was recorded."""
    run = tmp_path / "run"
    messages: list[str] = []
    with monkeypatch.context() as patch:
        timing(patch, "slow")
        first = make(recipe, run, "true")
        script(first, patch, TABLE)
        sigterm_in_step(first, patch, 3)
        from emrun.train.logging import RunLogger

        said = RunLogger.message
        patch.setattr(RunLogger, "message", lambda self, text: (messages.append(text),
                                                                said(self, text))[1])
        assert first.fit().interrupted == "SIGTERM"
    assert any("iteration 2 was still being scored; it is not recorded" in m for m in messages)
    assert load(run / "checkpoints" / "last.pt")["iteration"] == 3
    assert [it for it, _ in validations(run)] == [1]
    with monkeypatch.context() as patch:
        timing(patch, "slow")
        resumed = make(recipe, run, "true", resume=True)
        script(resumed, patch, TABLE)
        resumed.fit()
    assert validations(run) == [(it, v) for it, v in validations(inline) if it not in (2, 3)]
    assert load(run / "checkpoints" / "best.pt")["iteration"] == 4  # 0.3, as 2 was
    assert same_tensors(load(run / "checkpoints" / "last.pt")["model"],
                        load(inline / "checkpoints" / "last.pt")["model"])


@pytest.mark.parametrize(("action", "said"), [
    ("raise", "validation scoring failed: ValueError: scripted failure at iteration 2"),
    ("exit", "died (exit code 7"),
])
def test_a_failed_scoring_stops_the_run_with_one_message_and_intact_checkpoints(
        recipe, tmp_path, monkeypatch, action, said):
    """Iteration 2's scoring fails in the helper: the run stops with that reason when it
    collects it (in iteration 3, by finished() or the next submit), no helper is left, and
    every checkpoint written is whole."""
    import multiprocessing

    run = tmp_path / "run"
    trainer = make(recipe, run, "true", "train.iterations=3")
    script(trainer, monkeypatch, TABLE, {2: (action, "")})
    with pytest.raises(RuntimeError) as caught:
        trainer.fit()
    assert said in str(caught.value)
    assert multiprocessing.active_children() == []
    last = load(run / "checkpoints" / "last.pt")
    assert last["iteration"] == 2  # collected in iteration 3, before its checkpoint
    for path in (run / "checkpoints").glob("iter_*.pt"):
        assert load(path)["iteration"] == int(path.stem.split("_")[1])
    assert load(run / "checkpoints" / "best.pt")["iteration"] == 1
    assert [it for it, _ in validations(run)] == [1]


def test_a_scorer_out_of_memory_is_said_as_in_the_trainer(recipe, tmp_path, monkeypatch):
    """The same scoring failure, scored in the trainer or in the helper, gives the same
    kind of message and exit code through the CLI."""
    from typer.testing import CliRunner

    from emrun.cli import app
    from emrun.train import trainer as module

    monkeypatch.setattr(module, "predict_validation",
                        lambda recipe, model, device: [Tag(1, 0.5, "memory")])
    monkeypatch.setattr(module, "score_validation", scripted)
    outcomes = {}
    for background in ("false", "true"):
        path = tmp_path / f"{background}.yaml"
        path.write_text(TINY.replace("iterations: 6", "iterations: 1").replace(
            "  workers: 0\n", f"  workers: 0\n  validate_in_background: {background}\n"))
        result = CliRunner().invoke(app, ["train", str(path), "--run-dir",
                                          str(tmp_path / background), "--device", "cpu"])
        outcomes[background] = (result.exit_code, "ran out of memory" in result.output,
                                "bug in emrun" in result.output)
    assert outcomes["false"] == (2, True, False)
    assert outcomes["true"] == outcomes["false"]


def test_a_stop_does_not_wait_for_the_pending_score(recipe, tmp_path, monkeypatch):
    """Iteration 2's scoring takes long (here until a 4 s bound; SNEMI3D's: minutes).
    SIGTERM comes in step 4, before the validation of 4: the run should write its
    checkpoint and stop, the pending score not recorded ('a score still pending when a run
    is stopped is not recorded'), not sit in the validation of 4 until the helper is
    done (a cluster's grace period then ends in SIGKILL, and no stop checkpoint)."""
    gate = tmp_path / "never"
    run = tmp_path / "run"
    trainer = make(recipe, run, "true", "train.validate_every=2", "train.iterations=5")
    script(trainer, monkeypatch, {**TABLE, 5: 0.5}, {2: ("wait", str(gate))})
    sigterm_in_step(trainer, monkeypatch, 4)
    assert trainer.fit().interrupted == "SIGTERM"
    assert load(run / "checkpoints" / "last.pt")["iteration"] == 4
    assert 2 not in [it for it, _ in validations(run)]


# ------------------------------------------------------------------ evaluate.stops / schedule

def test_stopped_exits_as_a_shell_reports_the_signal():
    """143 for SIGTERM, 130 for SIGINT (128 + the signal's number), with the one message."""
    from emrun.errors import Interrupted
    from emrun.evaluate.stops import MESSAGE, stopped

    for name in ("SIGTERM", "SIGINT"):
        stop = stopped(name)
        assert isinstance(stop, Interrupted) and stop.signal_name == name
        assert stop.exit_code == 128 + int(getattr(signal, name)) and str(stop) == MESSAGE


def test_stopping_raises_at_the_first_signal_notes_the_next_and_puts_handlers_back():
    from emrun.errors import Interrupted
    from emrun.evaluate.stops import stopping

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with pytest.raises(Interrupted) as caught, stopping() as names:
        try:
            signal.raise_signal(signal.SIGINT)
            pytest.fail("not raised at once")
        finally:
            signal.raise_signal(signal.SIGTERM)  # while the stop unwinds: noted only
    assert caught.value.signal_name == "SIGINT" and caught.value.exit_code == 130
    assert names == ["SIGINT", "SIGTERM"]
    assert {s: signal.getsignal(s) for s in before} == before


def observer_reference(blocks: int, runs: int, completed: list[int]) -> list[tuple[int, int]]:
    """Blocks told done: the share of runs done, floored, in blocks; each block once, in
    order; every block once all runs are done."""
    calls, told = [], 0
    for done_runs in completed:
        reached = (blocks * done_runs) // max(1, runs)
        while told < reached:
            told += 1
            calls.append((told, blocks))
    return calls


def test_daisys_progress_is_told_in_blocks_as_a_plain_share():
    from types import SimpleNamespace

    from emrun.evaluate.schedule import _Observer

    for blocks in range(1, 9):
        for runs in range(1, blocks + 1):
            completed = list(range(runs + 1))
            calls: list[tuple[int, int]] = []
            observer = _Observer(lambda d, t, calls=calls: calls.append((d, t)), blocks)
            for done_runs in completed:
                state = SimpleNamespace(total_block_count=runs, completed_count=done_runs)
                observer.on_progress({"emrun-evaluate": state})
            observer.on_finish({"emrun-evaluate": state})  # told again at the end: no repeat
            assert calls == observer_reference(blocks, runs, completed)
            assert calls[-1] == (blocks, blocks) and len(calls) == blocks


def test_parallel_options_are_checked_by_their_stated_rules():
    from emrun.devices import cpu_cores
    from emrun.errors import UserError
    from emrun.evaluate.schedule import Parallel

    refused = [Parallel(scheduler="slurm"), Parallel(workers=0), Parallel(block=(4, 0, 4)),
               Parallel(launch="srun -c 4")]
    for options in refused:
        with pytest.raises(UserError):
            options.check()
    Parallel(workers=1, block=(1, 1, 1)).check()
    assert Parallel().worker_count == cpu_cores()
    assert Parallel(scheduler="daisy").worker_count == 1
    assert Parallel(workers=3).worker_count == 3


def test_only_old_unheld_work_folders_holding_only_an_evaluations_files_are_removed(tmp_path):
    """_remove_abandoned's stated rule: a folder of the prefix, a real folder (not a link),
    at least ABANDONED_AFTER_S old, no process holding it, nothing in it but what an
    evaluation writes. Everything else stays."""
    import subprocess
    import sys

    from emrun.evaluate.schedule import ABANDONED_AFTER_S, PREFIX, _remove_abandoned
    from emrun.locks import LOCK_NAME

    old = time.time() - ABANDONED_AFTER_S - 5
    cases = {  # name: (files, age, removed?)
        f"{PREFIX}killed": (["work.pickle", "block-3.npz", ".block-4.npz.17.tmp", "stop",
                             LOCK_NAME], old, True),
        f"{PREFIX}empty": ([], old, True),
        f"{PREFIX}young": (["work.pickle"], time.time(), False),
        f"{PREFIX}users": (["work.pickle", "notes.txt"], old, False),
        f"{PREFIX}users2": (["block-3.npz.bak"], old, False),
        "other-killed": (["work.pickle"], old, False),
        f"{PREFIX}held": (["work.pickle", LOCK_NAME], old, False),
    }
    for name, (files, age, _) in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        for file in files:
            (folder / file).write_bytes(b"")
        os.utime(folder, (age, age))
    (tmp_path / f"{PREFIX}link").symlink_to(tmp_path / "other-killed")
    (tmp_path / f"{PREFIX}file").write_bytes(b"")
    os.utime(tmp_path / f"{PREFIX}file", (old, old))
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
        "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)"),
        str(tmp_path / f"{PREFIX}held" / LOCK_NAME)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        _remove_abandoned(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    left = {p.name for p in tmp_path.iterdir()}
    want = {name for name, (_, _, removed) in cases.items() if not removed}
    assert left == want | {f"{PREFIX}link", f"{PREFIX}file"}


def test_a_stop_keeps_a_score_that_is_already_in(recipe, tmp_path, monkeypatch):
    """Iteration 3's score arrives between the loop's last collection and the stop (here:
    the loop collects nothing): the stop records it rather than calling it pending."""
    from emrun.train.background import BackgroundScorer

    run = tmp_path / "run"
    trainer = make(recipe, run, "true")
    script(trainer, monkeypatch, TABLE)
    asked: list[int] = []
    real_finished = BackgroundScorer.finished

    def finished(self):  # the loop's 3 collections find nothing; the stop's finds it done
        asked.append(1)
        if len(asked) <= 3:
            return []
        if self.busy is not None and self.busy.scoring is not None:
            self.busy.scoring.get()  # its scores are in
        return real_finished(self)

    monkeypatch.setattr(BackgroundScorer, "finished", finished)
    sigterm_in_step(trainer, monkeypatch, 3)
    assert trainer.fit().interrupted == "SIGTERM"
    assert len(asked) == 4  # the stop asked once more
    assert [it for it, _ in validations(run)] == [1, 2]  # 2, already in, is kept
