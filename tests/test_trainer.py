"""The trainer end to end on a tiny recipe: run directory, exact resume after SIGKILL,
refusals, signals, non-finite losses, and two-process DDP on the CPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import sigterm_after_first_log

TINY = """\
name: tiny_train
seed: 4
data:
  sources:
    a: {type: synthetic, shape: [12, 48, 48], seed: 1}
  validation:
    v: {type: synthetic, shape: [8, 32, 32], seed: 2}
augment: [{type: flip_rotate}, {type: grayscale, p: 0.5}]
model: {type: rsunet, widths: [4, 8], norm: group, groups: 2}
tasks:
  affinity:
    target: {type: affinity}
    loss: {type: bce, balance: true}
train:
  patch: [4, 16, 16]
  batch_size: 2
  iterations: 12
  optimizer: {type: adam, lr: 0.01}
  schedule: {type: cosine, warmup: 2}
  deterministic: true
  checkpoint_every: 3
  keep_checkpoints: 2
  validate_every: 6
  image_every: 6
  log_every: 3
  workers: 0
"""


def emrun(*args: str, env: dict | None = None,
          cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "emrun", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=cwd, timeout=300)


def emrun_here(*args: str) -> subprocess.CompletedProcess:
    """``emrun ARGS`` in this process (no ~3 s of imports) where the process boundary is not
    what a test is about; its exit code and its standard streams, as :func:`emrun` gives."""
    from typer.testing import CliRunner

    from emrun.cli import app

    result = CliRunner().invoke(app, list(args))
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return path


def weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]


def test_run_directory_layout_and_refusals(recipe, tmp_path):
    run = tmp_path / "run"
    done = emrun_here("train", str(recipe), "--run-dir", str(run))
    assert done.returncode == 0, done.stderr
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["best.pt", "iter_0000009.pt", "iter_0000012.pt", "last.pt"]  # keep 2
    assert (run / "recipe.yaml").exists() and (run / "provenance.json").exists()
    assert any((run / "tensorboard").iterdir())
    events = (run / "events.jsonl").read_text().splitlines()
    assert len([e for e in events if '"loss/affinity"' in e]) >= 4
    # validation segments the labelled validation box and scores it; best.pt by ARAND
    validations = [json.loads(e)["validation"] for e in events if '"validation"' in e]
    assert len(validations) == 2
    for v in validations:
        assert 0 <= v["arand"] <= 1 and v["voi_split"] >= 0 and v["voi_merge"] >= 0
        assert v["segment/bias"] in (0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
    best = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    assert best["best"] == min(v["arand"] for v in validations)
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert state["iteration"] == 12 and {"model", "optimizer", "scheduler", "scaler", "ema",
                                         "rng", "data"} <= set(state)
    again = emrun_here("train", str(recipe), "--run-dir", str(run))
    assert again.returncode == 2 and "already holds a run" in again.stderr
    assert "Traceback" not in again.stderr
    changed = emrun_here("train", str(recipe), "--run-dir", str(run), "--resume",
                         "-o", "model.widths=[4, 16]")
    assert changed.returncode == 2 and "the recipe's model changed" in changed.stderr
    assert "--init-from" in changed.stderr
    nothing = emrun_here("train", str(recipe), "--run-dir", str(tmp_path / "new"), "--resume")
    assert nothing.returncode == 2 and "no run to resume" in nothing.stderr
    (run / "checkpoints" / "last.pt").write_bytes(b"not a checkpoint")
    corrupt = emrun_here("train", str(recipe), "--run-dir", str(run), "--resume")
    assert corrupt.returncode == 2 and "last.pt" in corrupt.stderr
    assert "Traceback" not in corrupt.stderr


@pytest.mark.slow
def test_resume_after_sigkill_is_bitwise_identical(recipe, tmp_path):
    longer = ["-o", "train.iterations=12"]  # long enough to be killed midway, from outside
    straight = tmp_path / "straight"
    assert emrun("train", str(recipe), "--run-dir", str(straight), *longer).returncode == 0
    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "emrun", "train", str(recipe),
                                "--run-dir", str(killed), *longer],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = killed / "checkpoints" / "last.pt"
    deadline = time.time() + 120
    while time.time() < deadline and not last.exists() and process.poll() is None:
        time.sleep(0.01)
    process.kill()  # SIGKILL, wherever it is: mid-step, mid-save or mid-validation
    assert process.wait(timeout=60) == -signal.SIGKILL
    early = torch.load(last, weights_only=True)
    assert 3 <= early["iteration"] < 12
    resumed = emrun("train", str(recipe), "--run-dir", str(killed), "--resume", *longer)
    assert resumed.returncode == 0, resumed.stderr
    # the training budget spans sessions: wall time adds up, the device is recorded once
    final = torch.load(killed / "checkpoints" / "last.pt", weights_only=True)
    assert 0 < early["train_seconds"] < final["train_seconds"]
    assert len(final["devices"]) == 1 and final["devices"][0].startswith("cpu (")
    # the run's provenance keeps its start and adds the resumption (with where it began)
    record = json.loads((killed / "provenance.json").read_text())
    assert "--resume" not in record["command"]
    assert [s["iteration"] for s in record["sessions"]] == [0, early["iteration"]]
    assert ["--resume" in s["command"] for s in record["sessions"]] == [False, True]
    a, b = weights(straight), weights(killed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_init_from_loads_weights_into_a_new_run(recipe, tmp_path):
    start = str(tmp_path / "a/checkpoints/last.pt")
    assert emrun_here("train", str(recipe), "--run-dir", str(tmp_path / "a"),
                      "-o", "train.iterations=3").returncode == 0
    done = emrun_here("train", str(recipe), "--run-dir", str(tmp_path / "b"), "-o",
                      "train.iterations=3", "--init-from", start)
    assert done.returncode == 0, done.stderr
    bad = emrun_here("train", str(recipe), "--run-dir", str(tmp_path / "c"), "-o",
                     "model.widths=[4, 16]", "--init-from", start)
    assert bad.returncode == 2 and "do not fit" in bad.stderr
    assert not (tmp_path / "c").exists()  # refused before the run directory is made


def test_sigterm_writes_a_checkpoint_and_resume_finishes(recipe, tmp_path):
    run = tmp_path / "run"
    stopped = sigterm_after_first_log(
        ["train", str(recipe), "--run-dir", str(run), "-o", "train.iterations=100000", "-o",
         "train.checkpoint_every=100000"], run / "events.jsonl")
    assert stopped.returncode == 143, stopped.stderr
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert 3 <= state["iteration"] < 100000


@pytest.mark.slow
def test_sigterm_to_the_process_group_with_loader_workers(recipe, tmp_path):
    """As a SLURM time limit or GNU timeout sends it: the loader workers get the signal too,
    leave it to the trainer, and the run checkpoints, exits 143 and resumes."""
    run = tmp_path / "run"
    result = sigterm_after_first_log(
        ["train", str(recipe), "--run-dir", str(run), "-o", "train.iterations=100000", "-o",
         "train.checkpoint_every=100000", "-o", "train.workers=2"], run / "events.jsonl",
        group=True)
    assert result.returncode == 143, result.stderr
    assert "internal error" not in result.stderr and "Traceback" not in result.stderr
    stopped = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["iteration"]
    assert stopped >= 3
    resumed = emrun_here("train", str(recipe), "--run-dir", str(run), "--resume", "-o",
                         f"train.iterations={stopped + 2}", "-o", "train.checkpoint_every=100000",
                         "-o", "train.workers=2")
    assert resumed.returncode == 0, resumed.stderr
    final = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert final["iteration"] == stopped + 2


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from emrun.recipe import load_recipe
    from emrun.train.trainer import Trainer

    tmp = tmp_path_factory.mktemp("trained")
    (tmp / "tiny.yaml").write_text(TINY)
    loaded = load_recipe(tmp / "tiny.yaml", ["train.iterations=3", "train.validate_every=0"])
    Trainer(loaded, tmp / "run").fit()
    return loaded, tmp / "run"


@pytest.mark.parametrize(("edit", "says"), [
    (lambda s: s.pop("optimizer"), "it has no optimizer"),
    (lambda s: s.update(rng={"python": 5}), "its rng state is malformed"),
    (lambda s: s.update(recipe="{{{"), "not a recipe mapping"),
    (lambda s: s.update(data={"batches": "x"}), "its counters state is malformed"),
    (lambda s: s.update(scheduler=[]), "its scheduler state is malformed"),
    (lambda s: s.update(model={"x": torch.zeros(1)}), "its model state is malformed"),
])
def test_a_malformed_checkpoint_is_refused_naming_the_part(trained_run, tmp_path, edit, says):
    import shutil

    from emrun.errors import UserError
    from emrun.train.trainer import Trainer

    loaded, run = trained_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    for older in (copy / "checkpoints").glob("iter_*.pt"):
        older.unlink()  # resume would take the newest intact one
    state = torch.load(copy / "checkpoints" / "last.pt", weights_only=True)
    edit(state)
    torch.save(state, copy / "checkpoints" / "last.pt")
    with pytest.raises(UserError, match=says):
        Trainer(loaded, copy, resume=True)


def test_nonfinite_losses_are_skipped_then_stop_the_run(recipe, tmp_path, monkeypatch):
    from emrun.errors import UserError
    from emrun.losses import LossResult
    from emrun.recipe import load_recipe
    from emrun.train.trainer import MAX_NONFINITE_IN_A_ROW, Trainer

    loaded = load_recipe(recipe, ["train.iterations=20", "train.validate_every=0"])
    trainer = Trainer(loaded, tmp_path / "run")
    calls = {"n": 0}
    real = trainer.losses["affinity"]

    def flaky(logits, target, mask):
        calls["n"] += 1
        result = real(logits, target, mask)
        if calls["n"] in (2, 3) or calls["n"] > 8:
            return LossResult(result.loss * float("nan"), result.valid)
        return result

    trainer.losses["affinity"] = flaky
    with pytest.raises(UserError, match="non-finite losses in a row"):
        trainer.fit()
    assert trainer.nonfinite == 2 + MAX_NONFINITE_IN_A_ROW
    assert trainer.iteration == 8 - 2  # two skipped early, then the run stopped


def test_segmentation_validation_crop_is_centred_and_bounded():
    from emrun.geometry import Roi
    from emrun.train.seg_validation import central_crop

    assert central_crop(Roi((0, 0, 0), (8, 32, 32)), 10**6) == Roi((0, 0, 0), (8, 32, 32))
    z, y, x = central_crop(Roi((60, 0, 0), (10, 1024, 1024)), 4_000_000).to_slices()
    assert (z.start, z.stop) == (60, 70)
    assert (y.stop - y.start) * (x.stop - x.start) * 10 <= 4_000_000
    assert abs(y.start + y.stop - 1024) <= 1 and abs(x.start + x.stop - 1024) <= 1  # centred


def test_a_segmenter_missing_its_package_stops_the_run_before_it_starts(recipe, tmp_path,
                                                                       monkeypatch):
    from emrun.errors import UserError
    from emrun.recipe import load_recipe
    from emrun.train.trainer import Trainer

    monkeypatch.setitem(sys.modules, "waterz", None)  # as if `emrun[waterz]` were not installed
    loaded = load_recipe(recipe, ["segment={type: waterz, thresholds: [0.85]}"])
    with pytest.raises(UserError, match=r"emrun\[waterz\]"):
        Trainer(loaded, tmp_path / "run")
    assert not (tmp_path / "run").exists()  # nothing created
    Trainer(load_recipe(recipe, ["segment={type: waterz, thresholds: [0.85]}",
                                 "train.validate_every=0"]), tmp_path / "run")  # not needed


def test_validation_sweeps_each_segmenters_own_range(recipe, tmp_path, monkeypatch):
    pytest.importorskip("waterz")
    from emrun.recipe import load_recipe
    from emrun.recipe.run import Waterz
    from emrun.train.trainer import Trainer

    monkeypatch.setattr(Waterz, "validation_values", (0.87, 0.97))  # outside every other range
    loaded = load_recipe(recipe, ["segment={type: waterz, thresholds: [0.85]}",
                                  "train.iterations=6", "train.image_every=0"])
    Trainer(loaded, tmp_path / "run").fit()
    events = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").open()]
    chosen = [e["validation"]["segment/threshold"] for e in events if "validation" in e]
    assert len(chosen) == 1 and chosen[0] in (0.87, 0.97)


@pytest.mark.parametrize("connected", [True, False])
def test_validation_scores_the_truths_connected_pieces(recipe, tmp_path, connected):
    import numpy as np

    from emrun.io import write_volume
    from emrun.models import build_model
    from emrun.recipe import load_recipe
    from emrun.train.seg_validation import predict_validation

    labels = np.ones((8, 32, 32), np.uint32)
    labels[:, :, 12:20] = 2  # id 1 on both sides of id 2: two pieces
    image = np.random.default_rng(0).integers(0, 255, labels.shape).astype(np.uint8)
    write_volume(tmp_path / "v.zarr", "image", image)
    write_volume(tmp_path / "v.zarr", "labels", labels)
    loaded = load_recipe(recipe, [
        f"data.validation={{v: {{image: {tmp_path}/v.zarr/image, "
        f"labels: {tmp_path}/v.zarr/labels}}}}",
        f"train.validate_connected_truth={str(connected).lower()}"])
    model = build_model(loaded.recipe).eval()
    (item,) = predict_validation(loaded.recipe, model, torch.device("cpu"))
    assert len(np.unique(item.truth)) == (3 if connected else 2)
    assert item.affinities.shape == (3, *labels.shape)


def test_resuming_a_finished_run_trains_nothing_and_keeps_its_devices(recipe, tmp_path,
                                                                      monkeypatch):
    from emrun.recipe import load_recipe
    from emrun.train import trainer as trainer_module
    from emrun.train.trainer import Trainer

    loaded = load_recipe(recipe, ["train.iterations=3", "train.validate_every=0",
                                  "train.image_every=0"])
    run = tmp_path / "run"
    Trainer(loaded, run).fit()
    last = run / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=False)
    state["devices"] = ["NVIDIA H100 80GB HBM3"]  # as if trained on a GPU elsewhere
    torch.save(state, last)

    def no_loader(*args, **kwargs):
        raise AssertionError("a finished run started the data loader")

    monkeypatch.setattr(trainer_module, "train_batches", no_loader)
    resumed = Trainer(loaded, run, resume=True)
    assert resumed.fit().iteration == 3
    assert resumed.devices == ["NVIDIA H100 80GB HBM3"]  # this CPU trained none of it


def test_resume_of_a_run_killed_before_its_first_checkpoint_starts_it_again(recipe, tmp_path,
                                                                             capsys):
    from emrun.recipe import load_recipe
    from emrun.train.trainer import Trainer

    loaded = load_recipe(recipe, ["train.iterations=2", "train.validate_every=0",
                                  "train.image_every=0"])
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)  # what a run killed in its first steps leaves
    (run / "recipe.yaml").write_text("name: earlier\n")
    trained = Trainer(loaded, run, resume=True).fit()
    assert trained.iteration == 2
    assert "starting it from the beginning" in capsys.readouterr().err


def test_resume_with_another_optimizer_kind_is_refused(recipe, tmp_path):
    """Adam's saved state has no 'momentum': switching to SGD used to end in a KeyError."""
    from emrun.errors import UserError
    from emrun.recipe import load_recipe
    from emrun.train.trainer import Trainer

    base = ["train.iterations=2", "train.validate_every=0", "train.image_every=0"]
    run = tmp_path / "run"
    Trainer(load_recipe(recipe, base), run).fit()
    other = load_recipe(recipe, [*base, "train.optimizer={type: sgd, lr: 0.01}"])
    with pytest.raises(UserError, match=r"optimizer \(adam -> sgd\)"):
        Trainer(other, run, resume=True)


def test_out_of_device_memory_is_the_users_to_fix(recipe, tmp_path, monkeypatch):
    """A batch that does not fit the GPU: one line with torch's figures (asked, free) and
    what to lower, exit 2, never a traceback (forced here: CI has no GPU)."""
    from typer.testing import CliRunner

    from emrun.cli import app
    from emrun.train.trainer import Trainer

    def too_big(self, batches):
        raise torch.OutOfMemoryError(
            "CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of "
            "79.19 GiB of which 3.06 GiB is free. Including non-PyTorch memory, this process "
            "has 76.12 GiB memory in use.")

    monkeypatch.setattr(Trainer, "step", too_big)
    result = CliRunner().invoke(app, ["train", str(recipe), "--run-dir", str(tmp_path / "r")])
    assert result.exit_code == 2, result.output
    assert "Tried to allocate 20.00 GiB" in result.stderr and "3.06 GiB is free" in result.stderr
    assert "train.batch_size" in result.stderr and "Traceback" not in result.output


def wait_for(path: str) -> dict[str, float]:
    """A stand-in scoring that takes as long as the test wants (until ``path`` exists)."""
    while not os.path.exists(path):
        time.sleep(0.01)
    return {"arand": 0.5}


def test_background_scoring_does_not_wait_for_the_helper(tmp_path):
    from emrun.train.background import BackgroundScorer

    scorer = BackgroundScorer()
    gate = tmp_path / "go"
    try:
        assert scorer.submit(6, {"loss/total": 1.0}, None, wait_for, str(gate)) == []
        time.sleep(0.5)
        assert scorer.finished() == [] and scorer.busy.iteration == 6  # still scoring
        gate.touch()
        done = scorer.drain()
        assert [(p.iteration, p.result()) for p in done] == [
            (6, {"loss/total": 1.0, "arand": 0.5})]
        assert scorer.busy is None and scorer.finished() == []
    finally:
        scorer.close()


def test_a_stopped_run_leaves_no_scorer_behind(tmp_path):
    from emrun.train.background import BackgroundScorer

    scorer = BackgroundScorer()
    scorer.submit(6, {}, None, wait_for, str(tmp_path / "never"))
    helper = scorer.busy.scoring._process
    assert helper.is_alive()
    scorer.close()  # at once, though the scoring never ends
    assert not helper.is_alive() and helper.exitcode == -signal.SIGKILL


def test_a_scorer_that_dies_is_reported_not_waited_for(tmp_path):
    from emrun.errors import UserError
    from emrun.train.background import BackgroundScorer

    scorer = BackgroundScorer()
    scorer.submit(6, {}, None, wait_for, str(tmp_path / "never"))
    os.kill(scorer.busy.scoring._process.pid, signal.SIGKILL)  # as the kernel's OOM killer
    (done,) = scorer.drain()
    with pytest.raises(UserError, match=r"died .*killed outright: the out-of-memory killer"):
        done.result()  # the user's to act on (exit 2), not a bug in emrun


@pytest.mark.slow
def test_background_validation_records_what_validation_in_the_trainer_does(recipe, tmp_path):
    """Same scores for the same iterations, the same best.pt and the same trained weights,
    whether the segmentations are scored by a helper process or by the trainer."""
    from emrun.recipe import load_recipe
    from emrun.train.trainer import Trainer

    runs = {}
    for background in ("true", "false"):
        loaded = load_recipe(recipe, [f"train.validate_in_background={background}",
                                      "train.image_every=0", "train.iterations=6",
                                      "train.validate_every=3"])
        run = tmp_path / background
        Trainer(loaded, run).fit()
        events = [json.loads(line) for line in (run / "events.jsonl").open()]
        runs[background] = (
            {e["iteration"]: e["validation"] for e in events if "validation" in e},
            torch.load(run / "checkpoints" / "best.pt", weights_only=True), weights(run))
    (scores, best, final), (scores_here, best_here, final_here) = runs["true"], runs["false"]
    assert sorted(scores) == [3, 6] and scores == scores_here
    assert best["iteration"] == best_here["iteration"] and best["best"] == best_here["best"]
    for key, value in best["model"].items():
        assert torch.equal(value, best_here["model"][key]), key
    for key, value in final.items():
        assert torch.equal(value, final_here[key]), key


def test_resume_with_a_new_rate_schedule_or_length_applies_them_and_says_so(recipe, tmp_path,
                                                                           capsys):
    """A resume with another lr, weight decay or schedule kept the saved ones (the weights
    were those of a plain continuation) while the run's recipe.yaml said the new ones."""
    from emrun.recipe import load_recipe
    from emrun.train.optim import lr_factor
    from emrun.train.trainer import Trainer

    base = ["train.iterations=4", "train.validate_every=0", "train.image_every=0"]
    run = tmp_path / "run"
    Trainer(load_recipe(recipe, base), run).fit()
    saved = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["optimizer"]

    same = Trainer(load_recipe(recipe, base), run, resume=True)  # unchanged: exact
    assert same.optimizer.state_dict()["param_groups"] == saved["param_groups"]
    assert "resuming at iteration" not in capsys.readouterr().err

    changed = load_recipe(recipe, ["train.iterations=8", "train.validate_every=0",
                                   "train.image_every=0", "train.optimizer.lr=0.1",
                                   "train.optimizer.weight_decay=0.5"])
    trainer = Trainer(changed, run, resume=True)
    said = capsys.readouterr().err
    assert "resuming at iteration 4 with the recipe's train.optimizer.lr 0.01 -> 0.1" in said
    assert "train.optimizer.weight_decay 0.0 -> 0.5; train.iterations 4 -> 8" in said
    factor = lr_factor(changed.recipe.train.schedule, 8)
    (group,) = trainer.optimizer.param_groups
    assert group["lr"] == pytest.approx(0.1 * factor(4)) and group["weight_decay"] == 0.5
    assert trainer.scheduler.get_last_lr() == [group["lr"]]
    moments = trainer.optimizer.state_dict()["state"]  # the run's state is kept
    for key, value in saved["state"].items():
        torch.testing.assert_close(moments[key]["exp_avg"], value["exp_avg"])
    trainer.fit()
    logged = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    rates = {e["iteration"]: e["lr"] for e in logged if "lr" in e and e["iteration"] > 4}
    # the rate logged at iteration k is that of the k-th update (t = k - 1)
    assert rates == pytest.approx({6: 0.1 * factor(5), 8: 0.1 * factor(7)})
