"""What a training run logs, against references written here: each validation loss in
events.jsonl recomputed from the weights of the checkpoint saved at its iteration (a plain
masked BCE / MSE, summed over every validation tile's voxels and divided by their count),
which lines events.jsonl holds at which iterations (a plain loop over log_every,
validate_every and the last iteration), a run killed by an exception and resumed against
the uninterrupted run (every figure but the clock's, each iteration once), TensorBoard's
scalars against events.jsonl's values, the logged learning rate against the schedule's
closed form, and best.pt against the logged validation rows. Tiny model, synthetic volumes,
a few iterations on the CPU."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

TINY = """\
name: logprobe
seed: 11
data:
  sources:
    a: {type: synthetic, shape: [12, 48, 48], seed: 1}
  validation:
    v: {type: synthetic, shape: [4, 32, 28], seed: 2}
    w: {type: synthetic, shape: [3, 12, 20], seed: 3}
model: {type: rsunet, widths: [4, 8], norm: group, groups: 2}
tasks:
  affinity:
    target: {type: affinity}
    loss: {type: bce, margin0: 0.2, margin1: 0.2}
  dist:
    target: {type: distance, signed: false, clip: 200}
    weight: 0.5
train:
  patch: [4, 16, 16]
  batch_size: 2
  iterations: 4
  optimizer: {type: adam, lr: 0.01}
  deterministic: true
  checkpoint_every: 2
  keep_checkpoints: 20
  validate_every: 2
  validate_segmentation: false
  validate_in_background: false
  image_every: 0
  log_every: 1
  workers: 0
"""

CLOCK = ("time", "throughput/it_per_s", "throughput/samples_per_s", "throughput/voxels_per_s",
         "memory/max_rss_gib", "memory/max_allocated_gib")


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return path


def make(recipe: Path, run: Path, *overrides: str, **kwargs: Any) -> Any:
    from emrun.recipe import load_recipe
    from emrun.train.trainer import Trainer

    return Trainer(load_recipe(recipe, list(overrides)), run, **kwargs)


def events(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]


def steps(run: Path) -> list[dict[str, Any]]:
    return [row for row in events(run) if "validation" not in row]


def validations(run: Path) -> list[dict[str, Any]]:
    return [row for row in events(run) if "validation" in row]


def without_clock(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in CLOCK}


def checkpoint(run: Path, iteration: int) -> dict[str, Any]:
    from emrun.io.checkpoint import load

    return load(run / "checkpoints" / f"iter_{iteration:07d}.pt")


# -- references ------------------------------------------------------------------------------


def plain_bce(x: float, t: float) -> float:
    """-t log s(x) - (1 - t) log(1 - s(x)), written stably."""
    return max(x, 0.0) - x * t + math.log1p(math.exp(-abs(x)))


def reference_validation(recipe_path: Path, state: dict[str, Any], ema: bool,
                         *overrides: str) -> dict[str, float]:
    """Each task's validation loss with the weights of ``state`` (its EMA's when ``ema``):
    every validation tile through the network in eval mode, the elementwise loss (BCE without
    margins, squared error) summed over every tile's valid voxels, divided by their count;
    the total the weighted sum. Computed in float64 from the network's float32 output."""
    from emrun.data.loader import unpack, validation_batches
    from emrun.models import build_model
    from emrun.recipe import load_recipe

    loaded = load_recipe(recipe_path, list(overrides))
    r = loaded.recipe
    model = build_model(r)
    if ema:
        model.load_state_dict({**state["ema"]["params"], **state["ema"]["buffers"]})
    else:
        model.load_state_dict(state["model"])
    model.eval()
    sums = {name: 0.0 for name in r.tasks}
    counts = {name: 0 for name in r.tasks}
    with torch.no_grad():
        for packed in validation_batches(r):
            batch = unpack(packed, torch.device("cpu"))
            outputs = model(batch["image"])
            for name, task in r.tasks.items():
                out = outputs[name].double()
                target = batch["target"][name].double()
                valid = torch.broadcast_to(batch["mask"][name] != 0, out.shape)
                if task.loss.type == "bce":
                    x, t = out[valid], target[valid]
                    sums[name] += float((x.clamp(min=0) - x * t +
                                         torch.log1p(torch.exp(-x.abs()))).sum())
                else:
                    sums[name] += float(((out[valid] - target[valid]) ** 2).sum())
                counts[name] += int(valid.sum())
    means = {f"loss/{n}": sums[n] / counts[n] for n in sums}
    means["loss/total"] = sum(task.weight * means[f"loss/{n}"] for n, task in r.tasks.items())
    return means


def expected_lines(start: int, total: int, log_every: int, validate_every: int
                   ) -> list[tuple[int, str]]:
    """(iteration, 'step' | 'validation') in the order a session from ``start`` writes them:
    a step line at multiples of log_every and at the last iteration, a validation record at
    multiples of validate_every, the step line first."""
    out = []
    for i in range(start + 1, total + 1):
        if i % log_every == 0 or i == total:
            out.append((i, "step"))
        if validate_every and i % validate_every == 0:
            out.append((i, "validation"))
    return out


def kinds(run: Path) -> list[tuple[int, str]]:
    return [(row["iteration"], "validation" if "validation" in row else "step")
            for row in events(run)]


def factor(kind: str, t: int, iterations: int, warmup: int, **spec: Any) -> float:
    """The optim module docstring's schedule factor of update ``t``."""
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


def tensorboard_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)]
            for tag in acc.Tags()["scalars"]}


# -- the references checked themselves --------------------------------------------------------


def test_the_plain_bce_is_torchs():
    xs = torch.tensor([-30.0, -2.0, -0.1, 0.0, 0.3, 4.0, 25.0], dtype=torch.float64)
    for t in (0.0, 1.0, 0.25):
        want = torch.nn.functional.binary_cross_entropy_with_logits(
            xs, torch.full_like(xs, t), reduction="none")
        assert [plain_bce(float(x), t) for x in xs] == pytest.approx(want.tolist(), rel=1e-12)


def test_expected_lines_of_a_small_case():
    assert expected_lines(0, 7, 3, 2) == [
        (2, "validation"), (3, "step"), (4, "validation"), (6, "step"), (6, "validation"),
        (7, "step")]


# -- the validation losses against the checkpoint's weights -------------------------------------


@pytest.mark.parametrize("ema", [None, 0.6])
def test_validation_losses_are_the_checkpoint_weights_recomputed(recipe, tmp_path, ema):
    """Validations at 2 and 4, a checkpoint at each: every logged validation loss is the
    reference's with that checkpoint's weights (its EMA's when train.ema is on), over the
    two validation sources' tiles (the second smaller than the patch: padded, masked), the
    training loss's margins left out."""
    run = tmp_path / "run"
    overrides = (f"train.ema={'null' if ema is None else ema}",)
    make(recipe, run, *overrides).fit()
    rows = validations(run)
    assert [row["iteration"] for row in rows] == [2, 4]
    for row in rows:
        state = checkpoint(run, row["iteration"])
        want = reference_validation(recipe, state, ema is not None, *overrides)
        assert set(row["validation"]) == set(want)
        for key, value in want.items():
            assert row["validation"][key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    if ema is not None:  # the averaged weights, not the model's: a different figure
        plain = reference_validation(recipe, checkpoint(run, 4), False, *overrides)
        assert plain["loss/total"] != pytest.approx(rows[-1]["validation"]["loss/total"],
                                                    rel=1e-6)



# -- which lines, at which iterations ------------------------------------------------------------


@pytest.mark.parametrize(("total", "log_every", "validate_every"), [(7, 3, 2)])
def test_events_hold_the_documented_lines_in_order(recipe, tmp_path, total, log_every,
                                                   validate_every):
    """A step line at every multiple of log_every and at the last iteration, a validation
    record at every multiple of validate_every (none at a last iteration that is not one),
    nothing else, each once; every step line has the documented figures."""
    run = tmp_path / "run"
    make(recipe, run, f"train.iterations={total}", f"train.log_every={log_every}",
         f"train.validate_every={validate_every}", "train.checkpoint_every=100").fit()
    assert kinds(run) == expected_lines(0, total, log_every, validate_every)
    for row in steps(run):
        assert {"loss/affinity", "loss/dist", "loss/total", "lr", "throughput/it_per_s",
                "throughput/samples_per_s", "throughput/voxels_per_s",
                "nonfinite_steps"} <= set(row)
        assert row["loss/total"] == pytest.approx(row["loss/affinity"] + 0.5 * row["loss/dist"],
                                                  rel=1e-6)
    for row in validations(run):
        assert set(row["validation"]) == {"loss/affinity", "loss/dist", "loss/total"}


# -- a run killed by an exception, resumed ---------------------------------------------------------


SESSION = ("train.iterations=7", "train.log_every=2", "train.validate_every=2",
           "train.checkpoint_every=3", "train.schedule={type: cosine, warmup: 2}")


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted SESSION run (shared: nothing writes to it)."""
    root = tmp_path_factory.mktemp("straight")
    path = root / "tiny.yaml"
    path.write_text(TINY)
    make(path, root / "run", *SESSION).fit()
    return root / "run"


def killed_before(trainer: Any, iteration: int) -> None:
    """Make ``trainer`` raise when it is about to train ``iteration``."""
    real = trainer.step

    def step(batches: Any) -> Any:
        if trainer.iteration + 1 == iteration:
            raise RuntimeError("killed by the test")
        return real(batches)

    trainer.step = step


def test_a_killed_and_resumed_run_logs_the_uninterrupted_runs_lines(recipe, tmp_path,
                                                                     straight):
    """Straight: 7 iterations. Killed: the same run stopped by an exception before
    iteration 5 (its last checkpoint at 3, lines of 4 written after it), then resumed.
    events.jsonl holds the straight run's lines, every figure but the clock's equal, each
    once; best.pt is the same iteration and figure."""
    from emrun.io.checkpoint import load

    kill_at, killed = 5, tmp_path / "killed"
    first = make(recipe, killed, *SESSION)
    killed_before(first, kill_at)
    with pytest.raises(RuntimeError, match="killed by the test"):
        first.fit()
    assert kinds(killed) == [k for k in expected_lines(0, 7, 2, 2) if k[0] < kill_at]
    make(recipe, killed, *SESSION, resume=True).fit()
    assert kinds(killed) == kinds(straight) == expected_lines(0, 7, 2, 2)
    assert [without_clock(r) for r in events(killed)] == \
        [without_clock(r) for r in events(straight)]
    a = load(straight / "checkpoints" / "best.pt")
    b = load(killed / "checkpoints" / "best.pt")
    assert (a["iteration"], a["best"]) == (b["iteration"], b["best"])


def test_a_run_stopped_by_a_signal_mid_window_and_resumed_logs_the_same_lines(recipe,
                                                                             tmp_path,
                                                                             straight):
    """SIGINT's path (the trainer's stop check says 'SIGINT' once iteration 5 is done): a
    checkpoint at 5, inside the log window of 5-6, then a resumption: the lines are the
    uninterrupted run's, each once."""
    stopped = tmp_path / "stopped"
    first = make(recipe, stopped, *SESSION)
    real = first._stop
    first._stop = lambda signals: "SIGINT" if first.iteration == 5 else real(signals)
    assert first.fit().interrupted == "SIGINT"
    assert checkpoint(stopped, 5)["log_window"]["iterations"] == 1
    make(recipe, stopped, *SESSION, resume=True).fit()
    assert [without_clock(r) for r in events(stopped)] == \
        [without_clock(r) for r in events(straight)]

def test_tensorboard_shows_events_jsonl_after_a_kill_and_resume(recipe, tmp_path):
    """The killed-and-resumed run's TensorBoard scalars, as TensorBoard reads them (the
    killed session's steps after the checkpoint hidden): for every figure of events.jsonl,
    step lines and validation records ('validation/<name>'), the same steps once each and
    the same values (float32)."""
    run = tmp_path / "run"
    first = make(recipe, run, *SESSION)
    killed_before(first, 6)
    with pytest.raises(RuntimeError):
        first.fit()
    make(recipe, run, *SESSION, "train.optimizer.lr=0.004", resume=True).fit()
    shown = tensorboard_scalars(run)
    want: dict[str, list[tuple[int, float]]] = {}
    for row in events(run):
        figures = row.get("validation", row)
        prefix = "validation/" if "validation" in row else ""
        for key, value in figures.items():
            if key in ("iteration", "time"):
                continue
            want.setdefault(prefix + key, []).append((row["iteration"], value))
    assert set(shown) == set(want)
    for tag, pairs in want.items():
        assert [s for s, _ in shown[tag]] == [s for s, _ in pairs], tag
        for (_, got), (_, value) in zip(shown[tag], pairs, strict=True):
            assert got == pytest.approx(value, rel=1e-6, abs=1e-30), tag


# -- the learning rate -----------------------------------------------------------------------------


def poisoned(trainer: Any, calls_to_poison: set[int]) -> None:
    """The affinity loss of the numbered calls (from 1) made NaN: that step is skipped."""
    from emrun.losses import LossResult

    real = trainer.losses["affinity"]
    count = {"n": 0}

    def loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> Any:
        result = real(logits, target, mask)
        count["n"] += 1
        if count["n"] in calls_to_poison:
            return LossResult(result.loss * float("nan"), result.valid)
        return result

    trainer.losses["affinity"] = loss


@pytest.mark.parametrize(("schedule", "kind", "spec"), [
    ("{type: cosine, warmup: 2, min_factor: 0.1}", "cosine", {"min_factor": 0.1}),
    ("{type: poly, warmup: 3, power: 0.9}", "poly", {"power": 0.9}),
    ("{type: step, warmup: 1, milestones: [2, 5], gamma: 0.3}", "step",
     {"milestones": [2, 5], "gamma": 0.3}),
])
def test_the_rate_of_each_line_is_the_closed_form_of_its_last_update(recipe, tmp_path,
                                                                     schedule, kind, spec):
    """Lines every 3 of 7 iterations, accumulate 2, the second step's batches NaN (skipped:
    no iteration, no schedule step): the line of iteration i logs the rate of update
    t = i - 1."""
    warmup = int(schedule.split("warmup: ")[1].split(",")[0])
    run = tmp_path / "run"
    trainer = make(recipe, run, "train.iterations=7", "train.log_every=3",
                   "train.accumulate=2", "train.batch_size=1", "train.validate_every=0",
                   f"train.schedule={schedule}")
    poisoned(trainer, {3})
    result = trainer.fit()
    assert (result.iteration, result.nonfinite_steps) == (7, 1)
    logged = {row["iteration"]: row["lr"] for row in steps(run)}
    assert list(logged) == [3, 6, 7]
    for i, lr in logged.items():
        assert lr == pytest.approx(0.01 * factor(kind, i - 1, 7, warmup, **spec), abs=1e-12), i


# -- best.pt ------------------------------------------------------------------------------------


def first_lowest(rows: list[dict[str, Any]], key: str) -> tuple[int, float]:
    best: tuple[int, float] | None = None
    for row in rows:
        value = row["validation"].get(key)
        if value is not None and math.isfinite(value) and (best is None or value < best[1]):
            best = (row["iteration"], value)
    assert best is not None
    return best


def test_best_pt_is_the_lowest_logged_loss_and_its_weights_recompute_it(recipe, tmp_path):
    """Validations at every iteration, checkpoints every 3: best.pt is the first row with
    the lowest logged total, and its weights (the EMA's) give that figure again."""
    from emrun.io.checkpoint import load

    run = tmp_path / "run"
    overrides = ("train.iterations=5", "train.validate_every=1", "train.checkpoint_every=3",
                 "train.ema=0.5", "train.optimizer.lr=0.05")
    make(recipe, run, *overrides).fit()
    rows = validations(run)
    assert [row["iteration"] for row in rows] == [1, 2, 3, 4, 5]
    best = load(run / "checkpoints" / "best.pt")
    assert (best["iteration"], best["best"]) == first_lowest(rows, "loss/total")
    assert best["best_by"] == "loss/total"
    again = reference_validation(recipe, best, True, *overrides)
    assert again["loss/total"] == pytest.approx(best["best"], rel=1e-5)


def test_best_pt_by_segmentation_is_the_lowest_logged_arand(recipe, tmp_path):
    """validate_segmentation on (cc, scored in this process): best.pt is chosen by the
    logged adapted Rand error, the first lowest, and TensorBoard shows the same figures."""
    from emrun.io.checkpoint import load

    run = tmp_path / "run"
    make(recipe, run, "train.iterations=3", "train.validate_every=1",
         "train.validate_segmentation=true", "segment={type: cc}",
         "train.optimizer.lr=0.05").fit()
    rows = validations(run)
    assert [row["iteration"] for row in rows] == [1, 2, 3]
    assert all(0 <= row["validation"]["arand"] <= 1 for row in rows)
    best = load(run / "checkpoints" / "best.pt")
    assert best["best_by"] == "arand"
    assert (best["iteration"], best["best"]) == first_lowest(rows, "arand")
    shown = tensorboard_scalars(run)
    assert [s for s, _ in shown["validation/arand"]] == [1, 2, 3]
    assert [v for _, v in shown["validation/arand"]] == pytest.approx(
        [row["validation"]["arand"] for row in rows], rel=1e-6)


def test_best_pt_after_a_resumption_is_a_row_of_events_jsonl(recipe, tmp_path):
    """Validations at every iteration, a checkpoint at 3; the first attempt, at a high
    rate, validates 4 and 5 well and is killed before 6; the resumption (from 3, with the
    documented-as-supported lower train.optimizer.lr) trains 4-6 again. events.jsonl is cut
    back to 3 and holds the resumed run's one curve; best.pt should be that curve's first
    lowest row. It stayed at the abandoned attempt's iteration 5, with a figure no line of
    events.jsonl shows."""
    from emrun.io.checkpoint import load

    run = tmp_path / "run"
    common = ("train.iterations=6", "train.validate_every=1", "train.checkpoint_every=3")
    first = make(recipe, run, *common, "train.optimizer.lr=0.05")
    killed_before(first, 6)
    with pytest.raises(RuntimeError):
        first.fit()
    abandoned = {row["iteration"]: row["validation"]["loss/total"] for row in validations(run)}
    make(recipe, run, *common, "train.optimizer.lr=0.0001", resume=True).fit()
    rows = validations(run)
    assert [row["iteration"] for row in rows] == [1, 2, 3, 4, 5, 6]
    assert min(abandoned.values()) < min(row["validation"]["loss/total"] for row in rows)
    best = load(run / "checkpoints" / "best.pt")
    assert (best["iteration"], best["best"]) == first_lowest(rows, "loss/total")


def test_a_balanced_validation_loss_does_not_depend_on_the_batch_size(recipe, tmp_path):
    """Class balancing weighs a batch's voxels by its class counts: validation batches of
    train.batch_size tiles gave 0.5442 at batch 1 and 0.5467 at batch 6 for the same
    weights, so a batch-size change (allowed on resume) moved the curve best.pt is chosen
    by. Validation now scores tile by tile. (A learning rate of 1e-12: the same weights.)"""
    figures = []
    for size in (1, 3):
        run = tmp_path / f"b{size}"
        make(recipe, run, "train.iterations=1", "train.validate_every=1",
             "train.optimizer.lr=1e-12", "tasks.affinity.loss.balance=true",
             f"train.batch_size={size}").fit()
        (row,) = [r for r in events(run) if "validation" in r]
        figures.append(row["validation"]["loss/affinity"])
    assert figures[0] == pytest.approx(figures[1], rel=1e-6, abs=1e-7), figures
