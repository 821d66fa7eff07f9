"""`emrun train`, probed beyond resumption: non-finite losses and gradients (one process and
two), fp16's loss scaler on a CPU, validation sources the first validation would stop on and
validation losses of nothing counted, the devices asked for, a target that disagrees with its
channels, a user's mistake found in a loader worker, and gradient accumulation against a
hand-made step. Tiny model, synthetic volumes (and .npy files made here)."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from emrun.errors import UserError

TINY = """\
name: tprobe
seed: 3
data:
  sources:
    a: {type: synthetic, shape: [12, 48, 48], seed: 1}
model: {type: rsunet, widths: [4, 8], norm: group, groups: 2}
tasks:
  affinity:
    target: {type: affinity}
train:
  patch: [4, 16, 16]
  iterations: 4
  optimizer: {type: adam, lr: 0.01}
  checkpoint_every: 100
  validate_every: 0
  image_every: 0
  log_every: 1
  workers: 0
"""


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return path


def _load(path: Path, *overrides: str) -> Any:
    from emrun.recipe import load_recipe

    return load_recipe(path, list(overrides))


def _with_loss(trainer: Any, broken: Any) -> None:
    """Replace the affinity task's loss by ``broken(call, result, logits)``."""
    real = trainer.losses["affinity"]
    calls = {"n": 0}

    def loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> Any:
        calls["n"] += 1
        return broken(calls["n"], real(logits, target, mask), logits)

    trainer.losses["affinity"] = loss


# -- non-finite losses and gradients ---------------------------------------------------------


def test_a_stop_before_the_first_checkpoint_does_not_name_checkpoint_none(recipe, tmp_path,
                                                                        monkeypatch):
    """Before: 'The last good checkpoint is None'."""
    from emrun.losses import LossResult
    from emrun.train import trainer as module
    from emrun.train.trainer import Trainer

    monkeypatch.setattr(module, "MAX_NONFINITE_IN_A_ROW", 3)
    trainer = Trainer(_load(recipe, "train.iterations=30"), tmp_path / "run")
    _with_loss(trainer, lambda n, r, x: LossResult(r.loss * float("nan"), r.valid))
    with pytest.raises(UserError) as caught:
        trainer.fit()
    message = str(caught.value)
    assert "None" not in message
    assert "3 non-finite losses in a row at iteration 1; stopping. No checkpoint was written " \
        "before it;" in message


def test_a_finite_loss_with_nan_gradients_skips_the_step(recipe, tmp_path):
    """A loss whose value is finite but whose gradient is NaN (an overflow in the backward
    pass) was stepped: every weight became NaN, every later loss too, and the run stopped
    with a checkpoint of NaN weights as its 'last good' one."""
    from emrun.losses import LossResult
    from emrun.train.trainer import Trainer

    def nan_gradient(n: int, result: LossResult, logits: torch.Tensor) -> LossResult:
        if n != 2:
            return result
        poison = torch.sqrt((logits * 0).sum()) * 0  # value 0, gradient 0 * inf = NaN
        return LossResult(result.loss + poison, result.valid)

    trainer = Trainer(_load(recipe, "train.checkpoint_every=1"), tmp_path / "run")
    _with_loss(trainer, nan_gradient)
    result = trainer.fit()
    assert (result.iteration, result.nonfinite_steps) == (4, 1)
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in saved["model"].values())


RANK_SCRIPT = """\
import os, sys
from pathlib import Path
from emrun.losses import LossResult
from emrun.recipe import load_recipe
from emrun.train.trainer import Trainer

threads = lambda: len(os.listdir("/proc/self/task"))  # noqa: E731
before = threads()
trainer = Trainer(load_recipe(Path(sys.argv[1]), ["train.iterations=3"]), Path(sys.argv[2]),
                  device="cpu")
real, calls = trainer.losses["affinity"], []

def loss(logits, target, mask):
    calls.append(1)
    result = real(logits, target, mask)
    if os.environ["RANK"] == "1" and len(calls) == 2:
        return LossResult(result.loss * float("nan"), result.valid)
    return result

trainer.losses["affinity"] = loss
result = trainer.fit()
print(f"rank {os.environ['RANK']}: iteration {result.iteration}, "
      f"skipped {result.nonfinite_steps}, batches {trainer.batches_done}, "
      f"threads {before} before and {threads()} after")
"""


@pytest.mark.slow
def test_a_nan_loss_on_one_rank_skips_the_step_on_every_rank_and_the_group_ends(recipe,
                                                                               tmp_path):
    """Under DDP the rank whose loss was NaN skipped its backward while the others ran
    theirs: their all-reduce paired with that rank's next batch (with batch norm's buffer
    broadcast, the run hung), and the ranks' counts and data streams parted.

    And the gloo group's threads outlived fit (DDP's constructor imported a torch module
    whose default arguments held the group for good) and met the interpreter's exit: 1 run
    in 10 to 30 aborted a rank after it had finished ("terminate called without an active
    exception"), and torchrun failed the run. One torchrun run serves both."""
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(script), str(recipe), str(tmp_path / "run")],
        capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 0: iteration 3, skipped 1, batches 4" in done.stdout, done.stdout
    assert "rank 1: iteration 3, skipped 1, batches 4" in done.stdout, done.stdout
    assert "ranks in sync" in done.stdout
    if Path("/proc/self/task").is_dir():  # threads are counted there
        counts = re.findall(r"threads (\d+) before and (\d+) after", done.stdout)
        assert len(counts) == 2 and all(before == after for before, after in counts), \
            done.stdout


def test_fp16_on_a_cpu_scales_the_loss(recipe, tmp_path):
    """precision fp16 on a CPU ran without the gradient scaler the README promises: small
    gradients underflowed to 0 in fp16 and most tensors were never updated."""
    from emrun.losses import LossResult
    from emrun.train.trainer import Trainer

    trainer = Trainer(_load(recipe, "train.iterations=1", "train.precision=fp16"),
                      tmp_path / "run", device="cpu")
    _with_loss(trainer, lambda n, r, x: LossResult(r.loss * 1e-4, r.valid))
    before = copy.deepcopy(trainer.model.state_dict())
    trainer.fit()
    unchanged = [k for k, v in trainer.model.state_dict().items() if torch.equal(v, before[k])]
    assert unchanged == []


def test_a_run_resumed_in_fp16_starts_a_loss_scaler(recipe, tmp_path, capsys):
    """The checkpoint of an fp32 run holds a disabled scaler's empty state, which an fp16
    scaler refuses to load: on a GPU (and on a CPU, now that fp16 scales there too) the
    resumption was refused as 'scaler state is malformed'."""
    from emrun.train.trainer import Trainer

    Trainer(_load(recipe, "train.iterations=2"), tmp_path / "run").fit()
    resumed = Trainer(_load(recipe, "train.iterations=3", "train.precision=fp16"),
                      tmp_path / "run", resume=True, device="cpu")
    assert resumed.fit().iteration == 3
    assert "train.precision" in capsys.readouterr().err


# -- validation sources ----------------------------------------------------------------------


def _volume_recipe(tmp_path: Path, validation: str) -> Path:
    """TINY with a validation source of files (image and maybe labels) saved here."""
    from emrun.synth import synthesize

    volume = synthesize((8, 32, 32), seed=2)
    np.save(tmp_path / "image.npy", volume.image)
    np.save(tmp_path / "labels.npy", volume.labels.astype(np.uint32))
    np.save(tmp_path / "zeros.npy", np.zeros(volume.labels.shape, np.uint32))
    text = TINY.replace("  sources:\n", f"  validation:\n    v: {validation}\n  sources:\n")
    text = text.replace("validate_every: 0", "validate_every: 2")
    path = tmp_path / "val.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(("validation", "says"), [
    ("{image: image.npy, voxel_size: [30, 6, 6]}",
     "data.validation.v: it has no `labels`, which its validation losses need"),
    ("{image: image.npy, labels: zeros.npy, voxel_size: [30, 6, 6]}",
     "data.validation.v: its labels have no labelled voxel (all 0) in the validation box "
     "[0:8, 0:32, 0:32] (8, 32, 32): nothing to score a segmentation against"),
])
def test_a_validation_source_the_first_validation_would_stop_on_is_refused_first(
        tmp_path, monkeypatch, validation, says):
    """Before: the run trained validate_every iterations, then stopped at the first
    validation (exit 2) before that iteration's checkpoint, and a source without labels
    was blamed on 'a training source' in data.sources."""
    from emrun.recipe import RecipeError
    from emrun.train.trainer import Trainer

    monkeypatch.chdir(tmp_path)
    path = _volume_recipe(tmp_path, validation)
    with pytest.raises(RecipeError) as caught:
        Trainer(_load(path), tmp_path / "run")
    message = str(caught.value)
    assert message.startswith("val.yaml:5:8: ") and says in message, message
    assert "the first validation, at iteration 2, would stop the run" in message
    assert "\n" not in message and not (tmp_path / "run").exists()


def test_validate_refuses_a_validation_source_without_labels(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from emrun.cli import app

    path = _volume_recipe(tmp_path, "{image: image.npy, voxel_size: [30, 6, 6]}")
    monkeypatch.chdir(tmp_path)  # the recipe's relative paths, as from a shell there
    done = CliRunner().invoke(app, ["validate", str(path)])
    assert done.exit_code == 2 and "data.validation.v" in done.stderr, done.stdout


def test_a_labelled_validation_source_from_files_trains_and_validates(tmp_path, monkeypatch):
    from emrun.train.trainer import Trainer

    monkeypatch.chdir(tmp_path)
    path = _volume_recipe(tmp_path, "{image: image.npy, labels: labels.npy, "
                          "voxel_size: [30, 6, 6]}")
    Trainer(_load(path, "train.iterations=2"), tmp_path / "run").fit()
    lines = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").open()]
    (validation,) = [line["validation"] for line in lines if "validation" in line]
    assert 0 <= validation["arand"] <= 1 and validation["loss/total"] > 0


def test_a_validation_loss_of_nothing_counted_is_no_figure(tmp_path, monkeypatch, capsys):
    """Labels all 0 (scored by loss only): before, the validation loss was 0.0, and best.pt
    was chosen by it (and never replaced: nothing is below 0)."""
    from emrun.train.trainer import Trainer

    monkeypatch.chdir(tmp_path)
    path = _volume_recipe(tmp_path, "{image: image.npy, labels: zeros.npy, "
                          "voxel_size: [30, 6, 6]}")
    Trainer(_load(path, "train.iterations=2", "train.validate_segmentation=false"),
            tmp_path / "run").fit()
    lines = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").open()]
    assert [line["validation"] for line in lines if "validation" in line] == [{}]
    assert not (tmp_path / "run" / "checkpoints" / "best.pt").exists()
    assert "task 'affinity' counted no voxel of data.validation" in capsys.readouterr().out


# -- devices ---------------------------------------------------------------------------------


def test_a_device_kind_emrun_cannot_train_on_is_the_users_mistake(recipe, tmp_path):
    """Before: --device mps (or meta) on this machine was an internal RuntimeError."""
    from emrun.train.trainer import Trainer

    for name in ("mps", "meta"):
        with pytest.raises(UserError, match=f"--device {name}: emrun runs on cpu or cuda"):
            Trainer(_load(recipe), tmp_path / "run", device=name)
    assert not (tmp_path / "run").exists()


def test_parse_device_refuses_kinds_emrun_cannot_run_on():
    from emrun.devices import parse_device

    with pytest.raises(UserError):
        parse_device("meta")


def test_each_ddp_process_takes_its_own_gpu(monkeypatch):
    """Under --gpus, `--device cuda` put every rank on the current GPU, cuda:0 (NCCL
    refuses two ranks on one GPU); `--device cuda:1` did so on purpose; a rank past the
    machine's last GPU failed inside torch."""
    from emrun.train import trainer
    from emrun.train.distributed import World

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    second = World(rank=1, local_rank=1, size=2)
    assert trainer._device("cuda", second) == torch.device("cuda", 1)
    assert trainer._device(None, second) == torch.device("cuda", 1)
    assert trainer._device("cpu", second) == torch.device("cpu")
    assert trainer._device("cuda:1", World()) == torch.device("cuda", 1)
    with pytest.raises(UserError, match="under --gpus each process trains on its own GPU"):
        trainer._device("cuda:0", second)
    with pytest.raises(UserError, match="--gpus: process 2 of this machine has no GPU"):
        trainer._device(None, World(rank=2, local_rank=2, size=3))


def test_a_mistake_under_gpus_is_one_line_and_exit_2(recipe, tmp_path, monkeypatch):
    """Refused before torchrun starts any rank (in this process: no rank may start)."""
    from typer.testing import CliRunner

    from emrun.cli import app, commands

    def no_ranks(processes: int) -> int:
        raise AssertionError("torchrun was started for a refused --gpus run")

    monkeypatch.setattr(commands, "_launch_torchrun", no_ranks)
    done = CliRunner().invoke(app, ["train", str(recipe), "--run-dir", str(tmp_path / "run"),
                                    "--gpus", "2", "--device", "cuda:0"])
    assert done.exit_code == 2, done.output[-2000:]
    assert "Traceback" not in done.stderr and "ChildFailedError" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


# -- data ------------------------------------------------------------------------------------


def test_a_users_mistake_in_a_loader_worker_is_its_own_one_line(tmp_path):
    """A training source without labels, found by a loader worker: before, the worker's
    whole traceback came back inside the error's message (dozens of 'error:' lines)."""
    from emrun.data.loader import train_batches

    np.save(tmp_path / "image.npy", np.zeros((8, 32, 32), np.uint8))
    path = tmp_path / "r.yaml"
    path.write_text(TINY.replace("a: {type: synthetic, shape: [12, 48, 48], seed: 1}",
                                 f"a: {{image: {tmp_path / 'image.npy'}, "
                                 "voxel_size: [30, 6, 6]}"))
    stream = train_batches(_load(path).recipe, workers=2, pin_memory=False)
    try:
        with pytest.raises(UserError) as caught:
            next(stream)
    finally:
        stream.close()
    assert str(caught.value).startswith("the affinity target needs labels")
    assert "\n" not in str(caught.value)


def test_every_built_in_target_passes_the_shape_check(recipe):
    """The check of a target's shape against its channels lets lsd's one mask channel for
    its ten target channels through."""
    from emrun.data.samples import SampleMaker

    recipe.write_text(recipe.read_text().replace("    target: {type: affinity}\n", """\
    target: {type: affinity}
  lsd: {target: {type: lsd, sigma: [30, 24, 24]}}
  boundary: {target: {type: boundary}}
  distance: {target: {type: distance}}
"""))
    maker = SampleMaker(_load(recipe, "train.patch=[8, 32, 32]").recipe)
    sample = maker.sample(np.random.default_rng(0))
    assert {k: v.shape[0] for k, v in sample["target"].items()} == \
        {"affinity": 3, "lsd": 10, "boundary": 1, "distance": 1}
    assert sample["mask"]["lsd"].shape[0] == 1


def test_a_validation_target_with_other_channels_is_named(recipe, monkeypatch):
    """The validation pass makes targets too; a wrong-shaped one failed in the loss."""
    from emrun.data import loader
    from emrun.registry import targets

    recipe.write_text(recipe.read_text().replace(
        "  sources:\n", "  validation:\n    v: {type: synthetic, shape: [8, 32, 32]}\n"
        "  sources:\n"))

    def two_channels(patch: Any) -> tuple[np.ndarray, np.ndarray]:
        fg = (patch.labels > 0).astype(np.uint8)
        return np.stack([fg, fg]), np.ones((2, *fg.shape), np.uint8)

    monkeypatch.setattr(targets, "build", lambda spec: two_channels)
    with pytest.raises(UserError, match=r"task 'affinity': target 'affinity' made a target "
                       r"of shape \(2, 4, 16, 16\), not \(3, 4, 16, 16\)"):
        next(loader.validation_batches(_load(recipe).recipe))


# -- the step itself -------------------------------------------------------------------------


def test_an_accumulated_step_is_the_step_of_the_mean_loss(recipe, tmp_path):
    """train.accumulate: one SGD step on the mean of the batches' losses (a reference step
    made here from the same batches and starting weights)."""
    from emrun.data.loader import train_batches, unpack
    from emrun.losses import total_loss
    from emrun.train.trainer import Trainer

    loaded = _load(recipe, "train.iterations=1", "train.accumulate=3", "train.batch_size=2",
                   "train.optimizer={type: sgd, lr: 0.5}", "train.deterministic=true")
    trainer = Trainer(loaded, tmp_path / "run")
    model = copy.deepcopy(trainer.model)
    trainer.fit()
    stream = train_batches(loaded.recipe, workers=0)
    losses = []
    for _ in range(3):
        batch = unpack(next(stream))
        outputs = model(batch["image"])
        results = {n: fn(outputs[n], batch["target"][n], batch["mask"][n])
                   for n, fn in trainer.losses.items()}
        losses.append(total_loss(results, trainer.weights))
    (sum(losses) / 3).backward()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter -= 0.5 * parameter.grad
    for (name, got), want in zip(trainer.model.state_dict().items(),
                                 model.state_dict().values(), strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5, msg=name)


# -- what is logged ----------------------------------------------------------------------------


def test_the_logged_rate_is_the_one_each_logged_update_used(recipe, tmp_path):
    """The line of iteration k showed the rate of update k + 1: under poly the last line said
    lr 0 though the last update had a non-zero rate, and a warm-up looked one step ahead."""
    from emrun.train.optim import lr_factor
    from emrun.train.trainer import Trainer

    loaded = _load(recipe, "train.schedule={type: poly, warmup: 2, power: 1}")
    run = tmp_path / "run"
    Trainer(loaded, run).fit()
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    rates = {e["iteration"]: e["lr"] for e in events if "lr" in e}
    factor = lr_factor(loaded.recipe.train.schedule, 4)
    assert rates == pytest.approx({k: 0.01 * factor(k - 1) for k in (1, 2, 3, 4)})
    assert rates[4] > 0


def test_pointwise_weights_keep_the_strides_their_gradients_get(recipe, tmp_path):
    """channels_last_3d gave a 1x1x1 convolution's weight strides (in, 1, in, in, in); its
    gradient came plain, and DDP warned 'Grad strides do not match bucket view strides' on
    every rank of every run. The weights' values are untouched."""
    from emrun.train.trainer import Trainer

    trainer = Trainer(_load(recipe), tmp_path / "run")
    pointwise = [p for p in trainer.model.parameters()
                 if p.dim() == 5 and tuple(p.shape[2:]) == (1, 1, 1)]
    assert pointwise
    out = trainer.model(torch.rand(1, 1, 4, 16, 16).contiguous(
        memory_format=torch.channels_last_3d))
    sum(o.sum() for o in out.values()).backward()
    for parameter in pointwise:
        assert parameter.stride() == parameter.grad.stride()
    others = [p for p in trainer.model.parameters() if p.dim() == 5 and p.shape[2] > 1]
    assert all(p.is_contiguous(memory_format=torch.channels_last_3d) for p in others)


# -- a user error found in the ranks of --gpus -------------------------------------------------


@pytest.mark.slow
def test_a_user_error_in_the_ranks_of_gpus_is_said_once_with_exit_2(tmp_path):
    """The ranks' check of a validation source: every rank printed the message, then torchrun
    printed its ChildFailedError traceback and exited 1 (an 'internal' error)."""
    path = _volume_recipe(tmp_path, "{image: image.npy, labels: zeros.npy, "
                          "voxel_size: [30, 6, 6]}")
    done = subprocess.run([sys.executable, "-m", "emrun", "train", str(path), "--run-dir",
                           str(tmp_path / "run"), "--gpus", "2", "--device", "cpu"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=240)
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: val.yaml:5:8: data.validation.v: "), \
        done.stderr[-3000:]
    assert not (tmp_path / "run").exists()


def test_the_launcher_says_each_ranks_message_once_and_names_a_killed_rank(tmp_path, monkeypatch,
                                                                          capsys):
    from emrun.train.launch import RANK_ERRORS, _failure_code, rank_errors, said_to_launcher

    monkeypatch.delenv(RANK_ERRORS, raising=False)
    assert not said_to_launcher("outside a launched rank it is said by the rank itself")
    monkeypatch.setenv(RANK_ERRORS, str(tmp_path))
    for rank, message in ((0, "same"), (1, "same"), (10, "same"), (2, "other")):
        monkeypatch.setenv("RANK", str(rank))
        assert said_to_launcher(message)
    assert rank_errors(tmp_path) == "rank 0, 1, 10: same\nrank 2: other"
    (tmp_path / "rank-2.txt").unlink()
    assert rank_errors(tmp_path) == "same"
    assert not list(tmp_path.glob("*.part"))
    assert _failure_code(3, 1) == 1 and capsys.readouterr().err == ""  # the rank said why
    assert _failure_code(3, -9) == 137
    assert "rank 3 was killed by SIGKILL" in capsys.readouterr().err


def test_the_launcher_says_the_line_of_the_rank_whose_end_ended_the_run(tmp_path, monkeypatch,
                                                                      capsys):
    """When one rank died, torchrun stopped the others and each said its own end first
    ("stopped by SIGTERM", or a lost connection as a bug in emrun) before the launcher's
    line naming the rank that died. Launched ranks leave those lines; the launcher says
    the one of the rank that ended the run, or each distinct one when it was stopped."""
    from emrun.cli.app import _closing
    from emrun.train.launch import RANK_ERRORS, _ending_rank, rank_lines

    monkeypatch.setenv(RANK_ERRORS, str(tmp_path))
    for rank, line in ((0, "internal error: RuntimeError: Connection closed by peer"),
                       (1, "stopped by SIGTERM: checkpoint kept"),
                       (2, "stopped by SIGTERM: checkpoint kept")):
        monkeypatch.setenv("RANK", str(rank))
        _closing(line)
    assert capsys.readouterr().err == ""  # left for the launcher, not said by the ranks
    assert rank_lines(tmp_path) == ("internal error: RuntimeError: Connection closed by peer\n"
                                    "stopped by SIGTERM: checkpoint kept")
    assert rank_lines(tmp_path, only=1) == "stopped by SIGTERM: checkpoint kept"
    assert rank_lines(tmp_path, only=3) == ""
    # rank 3 killed by SIGKILL: its end, not rank 0's failed collective seen first
    assert _ending_rank({0: 1, 1: -15, 3: -9}, first=0) == (3, -9)
    assert _ending_rank({0: 1, 1: -15}, first=0) == (0, 1)  # no kill: the first failure
    monkeypatch.delenv(RANK_ERRORS)
    _closing("error: said here")  # outside a launched rank: said by the process itself
    assert capsys.readouterr().err.strip() == "error: said here"


@pytest.mark.slow
def test_a_rank_killed_by_sigkill_is_the_one_line_said(tmp_path):
    """`train --gpus 2`, kill -9 of rank 1 after the first log line: one line naming it,
    exit 137; rank 0's own end (a lost peer, torchrun's SIGTERM) was said before it."""
    import signal
    import time

    from emrun.shipped import RECIPES

    run = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "emrun", "train", str(RECIPES / "demo.yaml"), "--run-dir",
         str(run), "--gpus", "2", "--device", "cpu", "-o", "train.log_every=1",
         "-o", "train.iterations=500", "-o", "train.validate_every=0",
         "-o", "model.widths=[4, 8]"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    events = run / "events.jsonl"
    deadline = time.time() + 150
    while time.time() < deadline and not (events.exists() and '"iteration"' in
                                           events.read_text()):
        time.sleep(0.2)
    ranks = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == process.pid:
                environ = (stat.parent / "environ").read_bytes().split(b"\0")
                rank = next(v for v in environ if v.startswith(b"RANK="))
                ranks[int(rank[5:])] = int(stat.parent.name)
        except (OSError, StopIteration, ValueError, IndexError):
            continue
    assert set(ranks) == {0, 1}, (ranks, process.poll())
    os.kill(ranks[1], signal.SIGKILL)
    _, stderr = process.communicate(timeout=150)
    assert process.returncode == 137, stderr[-3000:]
    assert stderr.strip().splitlines() == [
        "error: rank 1 was killed by SIGKILL (as the kernel does when memory runs out); its "
        "checkpoints up to then are kept: continue with --resume"], stderr[-3000:]
