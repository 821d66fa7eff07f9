"""Checkpoints, best.pt and the run's logs against small references written here: which
numbered checkpoints a run leaves (a plain list), which checkpoint a resumption picks, best.pt
against the recorded validation rows (first lowest finite figure), the logged loss against the
mean of the per-iteration losses since the previous line, the logged learning rate against the
schedule's closed form, the throughput figures against each other, and a resumption against
the uninterrupted run. Tiny model, synthetic volumes, a few iterations on the CPU."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

TINY = """\
name: ckprobe
seed: 7
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
  checkpoint_every: 100
  keep_checkpoints: 3
  validate_every: 0
  image_every: 0
  log_every: 1
  workers: 0
"""

VALIDATION = """\
  validation:
    v: {type: synthetic, shape: [8, 32, 32], seed: 2}
"""


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return path


@pytest.fixture
def validated(tmp_path: Path) -> Path:
    path = tmp_path / "validated.yaml"
    path.write_text(TINY.replace("model:", VALIDATION + "model:", 1))
    return path


def make(recipe: Path, run: Path, *overrides: str, **kwargs: Any) -> Any:
    from emrun.recipe import load_recipe
    from emrun.train.trainer import Trainer

    return Trainer(load_recipe(recipe, list(overrides)), run, **kwargs)


def recording(trainer: Any, poison: set[int] = frozenset()) -> list[float]:
    """Wrap the affinity loss: every call's loss value is appended to the returned list;
    calls numbered in ``poison`` (from 1) return NaN (the step is then skipped)."""
    from emrun.losses import LossResult

    real = trainer.losses["affinity"]
    calls: list[float] = []

    def loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> Any:
        result = real(logits, target, mask)
        calls.append(float(result.loss))
        if len(calls) in poison:
            return LossResult(result.loss * float("nan"), result.valid)
        return result

    trainer.losses["affinity"] = loss
    return calls


def events(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]


def steps(run: Path) -> list[dict[str, Any]]:
    return [row for row in events(run) if "validation" not in row]


def validations(run: Path) -> list[dict[str, Any]]:
    return [row for row in events(run) if "validation" in row]


def numbered_iterations(run: Path) -> list[int]:
    from emrun.io.checkpoint import load

    found = sorted((run / "checkpoints").glob("iter_*.pt"))
    names = [int(p.stem.split("_")[1]) for p in found]
    assert names == [load(p)["iteration"] for p in found]  # each file holds its own iteration
    return sorted(names)


# -- references ------------------------------------------------------------------------------


def saved_at(start: int, end: int, every: int) -> list[int]:
    """The iterations a session from ``start`` to ``end`` checkpoints at (plain loop)."""
    return [i for i in range(start + 1, end + 1) if i % every == 0 or i == end]


def kept_after(saves: list[int], keep: int) -> list[int]:
    """Numbered checkpoints left after ``saves`` in order: each save adds its file and keeps
    the newest ``keep`` (the one just written counting as the newest)."""
    present: list[int] = []
    for it in saves:
        others = sorted(i for i in present if i != it)
        present = ([*others, it])[-keep:]
    return sorted(present)


def factor(kind: str, t: int, iterations: int, warmup: int, **spec: Any) -> float:
    """The schedule factor of update ``t`` from the README/optim docstring's formulas."""
    if t < warmup:
        return (t + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    if kind == "step":
        return spec["gamma"] ** len([m for m in spec["milestones"] if m <= t])
    p = min(1.0, (t - warmup) / max(1, iterations - warmup))
    if kind == "cosine":
        m = spec.get("min_factor", 0.0)
        return m + (1 - m) * 0.5 * (1 + math.cos(math.pi * p))
    return (1 - p) ** spec.get("power", 1.0)


def window_means(per_iteration: list[float], log_every: int, total: int) -> dict[int, float]:
    """The mean of the iterations' losses since the previous log line, per log line."""
    out, window = {}, []
    for i, value in enumerate(per_iteration, start=1):
        window.append(value)
        if i % log_every == 0 or i == total:
            out[i] = sum(window) / len(window)
            window = []
    return out


# -- CheckpointDir: rotation and the checkpoint a resumption picks ---------------------------


def tiny_state(iteration: int) -> dict[str, Any]:
    return {"iteration": iteration, "w": torch.full((2,), float(iteration))}


@pytest.mark.parametrize(("total", "every", "keep"), [
    (10, 3, 2), (9, 3, 2), (7, 1, 1), (5, 10, 3), (12, 4, 5), (20, 7, 1)])
def test_rotation_is_the_plain_list(tmp_path, total, every, keep):
    from emrun.io.checkpoint import load
    from emrun.train.checkpoint import CheckpointDir

    directory = CheckpointDir(tmp_path / "checkpoints", keep)
    saves = saved_at(0, total, every)
    for it in saves:
        directory.save(it, tiny_state(it))
    assert [load(p)["iteration"] for p in directory.numbered()] == kept_after(saves, keep)
    assert load(directory.newest())["iteration"] == total
    assert sorted(os.listdir(directory.root)) == sorted(
        [f"iter_{i:07d}.pt" for i in kept_after(saves, keep)] + ["last.pt"])


def test_rotation_past_seven_digits_orders_by_number_not_by_name(tmp_path):
    from emrun.io.checkpoint import load
    from emrun.train.checkpoint import CheckpointDir

    directory = CheckpointDir(tmp_path, 2)
    saves = [9_999_998, 9_999_999, 10_000_000, 10_000_001]
    for it in saves:
        directory.save(it, tiny_state(it))
    assert [load(p)["iteration"] for p in directory.numbered()] == kept_after(saves, 2)
    assert load(directory.newest())["iteration"] == 10_000_001


def test_newest_against_a_brute_force_over_killed_saves(tmp_path):
    """Every sequence of saves, each possibly killed after its numbered file and before
    last.pt (and the prune): the resumption takes the highest iteration written."""
    from emrun.io.checkpoint import load
    from emrun.train.checkpoint import CheckpointDir

    rng = random.Random(0)
    for case in range(25):
        root = tmp_path / f"c{case}"
        keep = rng.randint(1, 3)
        written: list[int] = []
        it = 0
        for _ in range(rng.randint(1, 5)):
            it += rng.randint(1, 4)
            directory = CheckpointDir(root, keep)
            if rng.random() < 0.3:  # killed between the numbered file and last.pt
                save_killed_before_last(directory, it)
            else:
                directory.save(it, tiny_state(it))
            written.append(it)
        newest = CheckpointDir(root, keep).newest()
        assert newest is not None and load(newest)["iteration"] == max(written), case


def _killed(self: Any, path: Path, state: dict) -> None:
    raise KeyboardInterrupt


def save_killed_before_last(directory: Any, it: int) -> None:
    """``directory.save(it, ...)`` killed between the numbered file and last.pt."""
    from emrun.train import checkpoint as module

    real = module.CheckpointDir._point_last_at
    module.CheckpointDir._point_last_at = _killed  # type: ignore[method-assign]
    try:
        with pytest.raises(KeyboardInterrupt):
            directory.save(it, tiny_state(it))
    finally:
        module.CheckpointDir._point_last_at = real  # type: ignore[method-assign]


def test_a_resumption_takes_the_highest_iteration_and_says_last_pt_was_older(
        recipe, tmp_path, capsys):
    """newest() cannot tell a kill between iter_N.pt and last.pt from a last.pt copied back
    by hand to go back: both leave a numbered file above last.pt. It takes the highest
    iteration (what a kill needs), and the trainer says so, naming how to go back."""
    import shutil

    from emrun.io.checkpoint import load

    run = tmp_path / "run"
    make(recipe, run, "train.iterations=4", "train.checkpoint_every=2",
         "train.keep_checkpoints=2").fit()
    checkpoints = run / "checkpoints"
    (checkpoints / "last.pt").unlink()
    shutil.copyfile(checkpoints / "iter_0000002.pt", checkpoints / "last.pt")
    resumed = make(recipe, run, "train.iterations=6", "train.checkpoint_every=2",
                   "train.keep_checkpoints=2", resume=True)
    assert resumed.iteration == 4
    said = capsys.readouterr()
    text = " ".join((said.out + said.err).split())
    assert "resuming from iter_0000004.pt (iteration 4), newer than last.pt (iteration 2)" \
        in text
    assert "move the later iter_N.pt files out of" in text
    assert load(checkpoints / "last.pt")["iteration"] == 2  # nothing changed before fit


def test_an_ordinary_resumption_says_nothing_about_last_pt(recipe, tmp_path, capsys):
    run = tmp_path / "run"
    make(recipe, run, "train.iterations=4", "train.checkpoint_every=2").fit()
    capsys.readouterr()
    assert make(recipe, run, "train.iterations=6", resume=True).iteration == 4
    said = capsys.readouterr()
    assert "newer than last.pt" not in said.out + said.err


# -- the trainer's checkpoints -------------------------------------------------------------


def test_a_run_and_its_resumption_leave_the_plain_lists_files(recipe, tmp_path):
    from emrun.io.checkpoint import load

    run = tmp_path / "run"
    make(recipe, run, "train.iterations=5", "train.checkpoint_every=2",
         "train.keep_checkpoints=2").fit()
    saves = saved_at(0, 5, 2)
    assert numbered_iterations(run) == kept_after(saves, 2) == [4, 5]
    assert load(run / "checkpoints" / "last.pt")["iteration"] == 5
    resumed = make(recipe, run, "train.iterations=8", "train.checkpoint_every=2",
                   "train.keep_checkpoints=2", resume=True)
    assert resumed.iteration == 5
    resumed.fit()
    saves += saved_at(5, 8, 2)
    assert numbered_iterations(run) == kept_after(saves, 2) == [6, 8]
    assert load(run / "checkpoints" / "last.pt")["iteration"] == 8
    assert not (run / "checkpoints" / "best.pt").exists()  # no validation, no best.pt


# -- the logged losses, rate and throughput ---------------------------------------------------


def test_logged_losses_are_the_window_means_of_the_iterations(recipe, tmp_path):
    """accumulate 2, log every 3 of 7 iterations, a task weight of 2, and the second
    iteration's batches made NaN (that step is skipped and is no iteration)."""
    run = tmp_path / "run"
    trainer = make(recipe, run, "train.iterations=7", "train.log_every=3",
                   "train.accumulate=2", "tasks.affinity.weight=2.0")
    calls = recording(trainer, poison={3})
    result = trainer.fit()
    assert (result.iteration, result.nonfinite_steps) == (7, 1)
    assert len(calls) == 16  # 8 steps of 2 batches, the skipped one included
    pairs = [(calls[i] + calls[i + 1]) / 2 for i in range(0, len(calls), 2)]
    per_iteration = [pairs[0], *pairs[2:]]  # the second step was skipped
    expected = window_means(per_iteration, 3, 7)
    rows = steps(run)
    assert [row["iteration"] for row in rows] == list(expected) == [3, 6, 7]
    for row in rows:
        want = expected[row["iteration"]]
        assert row["loss/affinity"] == pytest.approx(want, rel=1e-5)
        assert row["loss/total"] == pytest.approx(2.0 * want, rel=1e-5)
    assert [row["nonfinite_steps"] for row in rows] == [1, 1, 1]


def test_throughput_figures_agree_with_each_other(recipe, tmp_path):
    run = tmp_path / "run"
    make(recipe, run, "train.iterations=3", "train.accumulate=2", "train.batch_size=2").fit()
    for row in steps(run):
        rate = row["throughput/it_per_s"]
        assert rate > 0
        assert row["throughput/samples_per_s"] == pytest.approx(rate * 2 * 2)
        assert row["throughput/voxels_per_s"] == pytest.approx(rate * 2 * 2 * 4 * 16 * 16)


@pytest.mark.parametrize(("schedule", "kind", "spec"), [
    ("{type: cosine, warmup: 2, min_factor: 0.1}", "cosine", {"min_factor": 0.1}),
    ("{type: poly, warmup: 1, power: 2.0}", "poly", {"power": 2.0}),
    ("{type: step, warmup: 1, milestones: [3, 5], gamma: 0.5}", "step",
     {"milestones": [3, 5], "gamma": 0.5}),
])
def test_logged_rate_is_the_closed_form_of_the_update_made(recipe, tmp_path, schedule, kind,
                                                           spec):
    warmup = int(schedule.split("warmup: ")[1].split(",")[0])
    run = tmp_path / "run"
    trainer = make(recipe, run, "train.iterations=6", f"train.schedule={schedule}")
    trainer.fit()
    logged = {row["iteration"]: row["lr"] for row in steps(run)}
    assert list(logged) == [1, 2, 3, 4, 5, 6]
    for i, lr in logged.items():  # the update of iteration i is step t = i - 1
        assert lr == pytest.approx(0.01 * factor(kind, i - 1, 6, warmup, **spec), abs=1e-12)
    assert logged[6] > 0 or kind != "poly"  # the last update still has a rate under poly


def test_the_rate_logged_after_a_changed_lr_resumption_is_the_new_closed_form(recipe,
                                                                            tmp_path):
    run = tmp_path / "run"
    make(recipe, run, "train.iterations=3", "train.schedule={type: cosine, warmup: 1}").fit()
    make(recipe, run, "train.iterations=6", "train.schedule={type: cosine, warmup: 1}",
         "train.optimizer.lr=0.02", resume=True).fit()
    logged = {row["iteration"]: row["lr"] for row in steps(run)}
    assert list(logged) == [1, 2, 3, 4, 5, 6]
    for i in (1, 2, 3):
        assert logged[i] == pytest.approx(0.01 * factor("cosine", i - 1, 3, 1), abs=1e-12)
    for i in (4, 5, 6):
        assert logged[i] == pytest.approx(0.02 * factor("cosine", i - 1, 6, 1), abs=1e-12)


# -- best.pt against the validation rows ------------------------------------------------------


def scripted_validation(monkeypatch, figures: list[float]) -> None:
    """Make validation i (from 1) report ``figures[i - 1]`` as its total loss."""
    from emrun.train import trainer as module

    real = module.validation_losses
    count = {"n": 0}

    def fake(sums, counts, weights):
        metrics = real(sums, counts, weights)
        count["n"] += 1
        metrics["loss/total"] = figures[count["n"] - 1]
        return metrics

    monkeypatch.setattr(module, "validation_losses", fake)


def best_of(rows: list[dict[str, Any]]) -> tuple[int, float] | None:
    """The first validation row with the lowest finite total (strictly lower replaces)."""
    best = None
    for row in rows:
        value = row["validation"].get("loss/total")
        if value is not None and math.isfinite(value) and (best is None or value < best[1]):
            best = (row["iteration"], value)
    return best


@pytest.mark.parametrize("figures", [
    [0.5, 0.3, 0.4, 0.3, 0.35, 0.6],
    [float("nan"), 0.9, 0.9, 0.2, 0.2, 0.1],
])
def test_best_pt_holds_the_validation_rows_best_iteration(validated, tmp_path, monkeypatch,
                                                          figures):
    from emrun.io.checkpoint import load

    scripted_validation(monkeypatch, figures)
    run = tmp_path / "run"
    trainer = make(validated, run, "train.iterations=6", "train.validate_every=1",
                   "train.validate_segmentation=false", "train.checkpoint_every=3")
    trainer.fit()
    rows = validations(run)
    assert [row["iteration"] for row in rows] == [1, 2, 3, 4, 5, 6]
    expected = best_of(rows)
    best = load(run / "checkpoints" / "best.pt")
    assert (best["iteration"], best["best"]) == expected
    # its weights are the validated iteration's: its checkpoint's, where one was written
    if expected[0] in (3, 6):
        numbered = load(run / "checkpoints" / f"iter_{expected[0]:07d}.pt")
        assert all(torch.equal(best["model"][k], v) for k, v in numbered["model"].items())
    assert load(run / "checkpoints" / "last.pt")["best"] == expected[1]


def test_best_pt_after_a_resumption_is_still_the_rows_best(validated, tmp_path, monkeypatch):
    """Validations 1-3, checkpoint at 3, resumption for 3 more: best.pt is the best over all
    six rows of events.jsonl (a worse later figure does not replace it)."""
    from emrun.io.checkpoint import load

    scripted_validation(monkeypatch, [0.5, 0.2, 0.4, 0.3, 0.25, 0.2])
    run = tmp_path / "run"
    common = ("train.validate_every=1", "train.validate_segmentation=false",
              "train.checkpoint_every=3")
    make(validated, run, "train.iterations=3", *common).fit()
    make(validated, run, "train.iterations=6", *common, resume=True).fit()
    rows = validations(run)
    assert [row["iteration"] for row in rows] == [1, 2, 3, 4, 5, 6]
    best = load(run / "checkpoints" / "best.pt")
    assert (best["iteration"], best["best"]) == best_of(rows) == (2, 0.2)


# -- a resumption against the uninterrupted run ------------------------------------------------


def test_a_resumption_from_iter_n_is_the_uninterrupted_run(recipe, tmp_path):
    """Straight: 6 iterations. Killed: the same run with its checkpoints after iteration 3
    gone (as a kill after iteration 5 leaves it), resumed. The resumed calls, the log lines
    (the window of iteration 4 began before the checkpoint), the weights, and the files left
    are the straight run's."""
    settings = ("train.iterations=6", "train.log_every=2", "train.checkpoint_every=3",
                "train.keep_checkpoints=5", "train.schedule={type: cosine, warmup: 1}")
    straight = make(recipe, tmp_path / "straight", *settings)
    straight_calls = recording(straight)
    straight.fit()

    killed = tmp_path / "killed"
    make(recipe, killed, *settings).fit()
    checkpoints = killed / "checkpoints"
    (checkpoints / "iter_0000006.pt").unlink()
    (checkpoints / "last.pt").unlink()  # as a kill after iteration 5 would leave it
    resumed = make(recipe, killed, *settings, resume=True)
    assert resumed.iteration == 3 and resumed._window_count == 1
    resumed_calls = recording(resumed)
    resumed.fit()

    assert resumed_calls == straight_calls[3:]
    keys = ("iteration", "loss/affinity", "loss/total", "lr")
    assert [{k: r[k] for k in keys} for r in steps(killed)] == \
        [{k: r[k] for k in keys} for r in steps(tmp_path / "straight")]
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert numbered_iterations(killed) == numbered_iterations(tmp_path / "straight") == [3, 6]


def test_events_jsonl_is_cut_to_the_plain_filter(tmp_path):
    """keep_history against a filter written here: whole lines whose record's integer
    iteration is at most ``start`` (or which have none) stay, in order; a half line and a
    line that is not JSON go."""
    from emrun.train.logging import keep_history

    rng = random.Random(3)
    for case in range(30):
        path = tmp_path / f"e{case}.jsonl"
        lines = []
        for _ in range(rng.randint(0, 8)):
            kind = rng.random()
            if kind < 0.6:
                record: Any = {"iteration": rng.randint(0, 9), "loss": rng.random()}
            elif kind < 0.7:
                record = {"note": "no iteration"}
            elif kind < 0.8:
                record = {"iteration": True}
            elif kind < 0.9:
                record = [1, 2]
            else:
                lines.append(b"{not json\n")
                continue
            lines.append(json.dumps(record).encode() + b"\n")
        half = rng.random() < 0.3
        text = b"".join(lines) + (b'{"iteration": 1, "lo' if half else b"")
        path.write_bytes(text)
        start = rng.randint(0, 9)

        def kept(line: bytes, start: int = start) -> bool:
            try:
                record = json.loads(line)
            except ValueError:
                return False
            it = record.get("iteration") if isinstance(record, dict) else None
            return not (isinstance(it, int) and not isinstance(it, bool)) or it <= start

        keep_history(path, start)
        assert path.read_bytes() == b"".join(line for line in lines if kept(line)), case


def test_provenance_lists_every_session_in_order(recipe, tmp_path):
    run = tmp_path / "run"
    make(recipe, run, "train.iterations=2", "train.checkpoint_every=1").fit()
    for total in (3, 5):
        make(recipe, run, f"train.iterations={total}", "train.checkpoint_every=1",
             resume=True).fit()
    provenance = json.loads((run / "provenance.json").read_text())
    assert [s["iteration"] for s in provenance["sessions"]] == [0, 2, 3]
    assert provenance["started"] == provenance["sessions"][0]["started"]


def test_a_copied_run_directory_resumes_as_its_original(recipe, tmp_path):
    """last.pt is a hard link; a copy (shutil.copytree) makes it a file of its own: the
    resumption still takes the same iteration."""
    from emrun.io.checkpoint import load
    from emrun.train.checkpoint import CheckpointDir

    run = tmp_path / "run"
    make(recipe, run, "train.iterations=3", "train.checkpoint_every=2").fit()
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    assert not (copy / "checkpoints" / "last.pt").samefile(copy / "checkpoints" /
                                                           "iter_0000003.pt")
    assert load(copy / "checkpoints" / "last.pt")["iteration"] == 3
    directory = CheckpointDir(copy / "checkpoints", 3)
    assert directory.newest() == directory.last_path
    assert make(recipe, copy, "train.iterations=3", resume=True).iteration == 3


# -- best.pt by adapted Rand error --------------------------------------------------------------


def scripted_scores(monkeypatch, arands: list[float]) -> None:
    """Make segmentation validation i (from 1) score ``arands[i - 1]``."""
    from emrun.train import trainer as module

    count = {"n": 0}

    def fake(spec, inputs, values=None):
        if not inputs:  # validate_segmentation off: nothing predicted, as the real one
            return None
        count["n"] += 1
        return {"arand": arands[count["n"] - 1], "voi_split": 0.0, "voi_merge": 0.0,
                "cremi_score": 0.0, "segment/bias": 0.5}

    monkeypatch.setattr(module, "score_validation", fake)


def best_by(rows: list[dict[str, Any]], key: str) -> tuple[int, float] | None:
    best = None
    for row in rows:
        value = row["validation"].get(key)
        if value is not None and math.isfinite(value) and (best is None or value < best[1]):
            best = (row["iteration"], value)
    return best


def test_best_pt_by_segmentation_is_the_rows_lowest_arand(validated, tmp_path, monkeypatch):
    """The validation losses fall while the adapted Rand errors do not: best.pt follows
    the adapted Rand error (README: 'best.pt is the checkpoint with the lowest adapted Rand
    error')."""
    from emrun.io.checkpoint import load

    scripted_validation(monkeypatch, [0.9, 0.8, 0.7, 0.6])
    scripted_scores(monkeypatch, [0.4, 0.1, float("nan"), 0.3])
    run = tmp_path / "run"
    make(validated, run, "train.iterations=4", "train.validate_every=1",
         "train.validate_in_background=false").fit()
    rows = validations(run)
    assert [row["iteration"] for row in rows] == [1, 2, 3, 4]
    best = load(run / "checkpoints" / "best.pt")
    assert (best["iteration"], best["best"]) == best_by(rows, "arand") == (2, 0.1)


def test_best_pt_after_turning_segmentation_on_is_chosen_by_arand(validated, tmp_path,
                                                                  monkeypatch):
    """Two validations by loss (0.3, 0.2), then --resume with validate_segmentation on:
    ARAND 0.5 then 0.4. README: best.pt is the lowest ARAND, and a resumption applies the
    changed validation settings 'from here on'. best.pt stayed at iteration 2, chosen by
    a loss of 0.2 that no ARAND was ever compared against fairly."""
    from emrun.io.checkpoint import load

    scripted_validation(monkeypatch, [0.3, 0.2, 0.1, 0.1])
    scripted_scores(monkeypatch, [0.5, 0.4])
    run = tmp_path / "run"
    common = ("train.validate_every=1", "train.validate_in_background=false",
              "train.checkpoint_every=2")
    make(validated, run, "train.iterations=2", "train.validate_segmentation=false",
         *common).fit()
    make(validated, run, "train.iterations=4", "train.validate_segmentation=true", *common,
         resume=True).fit()
    rows = validations(run)
    assert [("arand" in row["validation"]) for row in rows] == [False, False, True, True]
    best = load(run / "checkpoints" / "best.pt")
    assert (best["iteration"], best["best"]) == best_by(rows, "arand") == (4, 0.4)


# -- the console's rate and ETA ---------------------------------------------------------------


def _duration(seconds: float) -> str:
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def test_rate_and_eta_are_over_the_last_twenty_log_steps(tmp_path, monkeypatch):
    """Irregular log steps and clock: each line's it/s is (iterations) / (seconds) between
    the line 20 steps back (the start for the first ones) and this one, its ETA the rest of
    the run at that rate."""
    import io

    from rich.console import Console

    from emrun.train.logging import RunLogger

    rng = random.Random(5)
    clock = [1000.0]
    monkeypatch.setattr("emrun.train.logging.time.perf_counter", lambda: clock[0])
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=False, width=200, highlight=False)
    start, total = 40, 400
    marks = [(start, clock[0])]
    expected = []
    with RunLogger(tmp_path, total=total, console=console, start=start) as log:
        it = start
        for _ in range(30):
            it += rng.randint(1, 9)
            clock[0] += rng.choice([0.5, 1.25, 3.0, 7.5])
            log.step(it, {"loss/total": 0.5})
            marks.append((it, clock[0]))
            (i0, t0), (i1, t1) = marks[max(0, len(marks) - 21)], marks[-1]
            rate = (i1 - i0) / (t1 - t0)
            expected.append(f"{rate:.3g} it/s  ETA {_duration((total - it) / rate)}")
    lines = [line for line in buf.getvalue().splitlines() if line.startswith("iter ")]
    assert len(lines) == 30
    for line, want in zip(lines, expected, strict=True):
        assert line.endswith(want), (line, want)


# -- a damaged newest checkpoint: what to move aside ---------------------------------------------


def test_moving_aside_what_readable_instead_names_resumes_from_the_newest_readable(tmp_path):
    """Random runs of saves (some killed before last.pt), then some files damaged (in place,
    so a hard-linked last.pt with them, or replaced): whenever the checkpoint newest() picks
    cannot be read, moving aside exactly the files readable_instead names makes newest() pick
    the readable checkpoint it named, which is the highest readable iteration left, and no
    readable checkpoint of a higher iteration was among those moved."""
    from emrun.io.checkpoint import CheckpointError, load
    from emrun.train.checkpoint import CheckpointDir

    def readable(path: Path) -> int | None:
        try:
            return int(load(path)["iteration"])
        except CheckpointError:
            return None

    rng = random.Random(11)
    damaged_cases = 0
    for case in range(40):
        root = tmp_path / f"c{case}"
        keep = rng.randint(1, 4)
        it = 0
        for _ in range(rng.randint(1, 5)):
            it += rng.randint(1, 3)
            directory = CheckpointDir(root, keep)
            if rng.random() < 0.25:
                save_killed_before_last(directory, it)
            else:
                directory.save(it, tiny_state(it))
        files = sorted(root.iterdir())
        for path in files:
            if rng.random() < 0.35:
                if rng.random() < 0.5:
                    with open(path, "r+b") as f:  # in place: a hard link shares it
                        f.truncate(max(1, os.path.getsize(path) // 3))
                else:
                    path.unlink()
                    path.write_bytes(b"garbage")
        directory = CheckpointDir(root, keep)
        chosen = directory.newest()
        if chosen is None or readable(chosen) is not None:
            continue
        damaged_cases += 1
        instead = directory.readable_instead(chosen)
        readable_files = {p: readable(p) for p in root.iterdir()}
        readable_numbered = [v for p, v in readable_files.items()
                             if v is not None and p.name.startswith("iter_")]
        if instead is None:
            assert not readable_numbered, case
            continue
        older, blocking = instead
        assert readable(older) == max(readable_numbered), case
        assert all(readable_files[p] is None or readable_files[p] <= readable(older)
                   for p in blocking), case
        aside = tmp_path / f"aside{case}"
        aside.mkdir()
        for path in blocking:
            path.rename(aside / path.name)
        again = CheckpointDir(root, keep).newest()
        assert again is not None and readable(again) == readable(older), case
    assert damaged_cases >= 5


# -- the validation record's losses -------------------------------------------------------------


TWO_TASKS = """\
  dist:
    target: {type: distance, signed: false, clip: 200}
    weight: 0.5
"""


def test_validation_losses_are_voxel_weighted_means_and_their_weighted_sum(validated,
                                                                          tmp_path):
    """Each validation's per-task loss is the mean over the voxels every validation batch
    counted (sum of loss x counted / sum of counted), its total the weighted sum; the
    training lines' total is the weighted sum of the window means."""
    path = tmp_path / "two.yaml"
    path.write_text(validated.read_text().replace("train:", TWO_TASKS + "train:", 1))
    run = tmp_path / "run"
    trainer = make(path, run, "train.iterations=2", "train.validate_every=1",
                   "train.validate_segmentation=false")
    seen: dict[str, list[tuple[float, float]]] = {"affinity": [], "dist": []}
    for name in seen:
        real = trainer.scorers[name]

        def scorer(logits, target, mask, real=real, name=name):
            result = real(logits, target, mask)
            seen[name].append((float(result.loss), float(result.valid)))
            return result

        trainer.scorers[name] = scorer
    trainer.fit()
    rows = validations(run)
    assert [row["iteration"] for row in rows] == [1, 2]
    batches = len(seen["affinity"]) // 2
    assert batches >= 2 and len(seen["dist"]) == 2 * batches
    for k, row in enumerate(rows):
        want = {}
        for name, pairs in seen.items():
            part = pairs[k * batches:(k + 1) * batches]
            want[name] = sum(loss * valid for loss, valid in part) / sum(v for _, v in part)
            assert row["validation"][f"loss/{name}"] == pytest.approx(want[name], rel=1e-6)
        assert row["validation"]["loss/total"] == pytest.approx(
            want["affinity"] + 0.5 * want["dist"], rel=1e-6)
    for row in steps(run):
        assert row["loss/total"] == pytest.approx(row["loss/affinity"] + 0.5 * row["loss/dist"],
                                                  rel=1e-6)


# -- TensorBoard against events.jsonl ----------------------------------------------------------


def test_tensorboard_after_a_resumption_shows_the_events_jsonl_curve(recipe, tmp_path):
    """A run of 4 (lines at 1..4) with its iter_4 and last.pt gone (as a kill after
    iteration 3 leaves it), resumed from iter_2 with another lr: every step's scalars in
    TensorBoard, as TensorBoard reads them (the purged steps hidden), are events.jsonl's
    (float32), each step once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    settings = ("train.iterations=4", "train.checkpoint_every=2", "train.keep_checkpoints=4")
    run = tmp_path / "run"
    make(recipe, run, *settings).fit()
    (run / "checkpoints" / "iter_0000004.pt").unlink()
    (run / "checkpoints" / "last.pt").unlink()
    make(recipe, run, *settings, "train.optimizer.lr=0.003", resume=True).fit()
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    rows = {row["iteration"]: row for row in steps(run)}
    assert list(rows) == [1, 2, 3, 4]
    for tag in ("loss/total", "loss/affinity", "lr"):
        shown = [(e.step, e.value) for e in acc.Scalars(tag)]
        assert [step for step, _ in shown] == [1, 2, 3, 4], tag
        for step, value in shown:
            assert value == pytest.approx(rows[step][tag], rel=1e-6), (tag, step)
