"""The optimiser step, probed against small references written here: the EMA after n
trainer steps against its closed form (warm-up decay included) and what the checkpoint
keeps of it; the learning rate the trainer's updates used at every iteration of a warmed-up
cosine run stopped and resumed; a skipped (non-finite) step against the state before it
(weights, buffers, optimizer, schedule, loss scaler, EMA); fp16's loss scaler skipping a
step of NaN gradients. Tiny model and synthetic volumes on the CPU (the recipe and helpers
of test_train_resume_probe)."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from test_train_resume_probe import TINY, stop_after, trainer

from emrun.data.loader import train_batches
from emrun.errors import UserError
from emrun.losses import LossResult
from emrun.train.optim import clip_gradients, lr_factor

SGD = "train.optimizer={type: sgd, lr: 0.5, momentum: 0}"
BATCH_NORM = "model={type: rsunet, widths: [4, 8], norm: batch}"


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    path = tmp_path / "optim.yaml"
    path.write_text(TINY)
    return path


def packed(trainer_: Any, count: int) -> list[dict[str, Any]]:
    stream = train_batches(trainer_.recipe, workers=0)
    return [next(stream) for _ in range(count)]


def snapshot(run: Any) -> dict[str, Any]:
    """Deep copies of everything a step may change."""
    return {
        "model": copy.deepcopy(run.model.state_dict()),
        "optimizer": copy.deepcopy(run.optimizer.state_dict()),
        "scheduler": copy.deepcopy(run.scheduler.state_dict()),
        "scaler": copy.deepcopy(run.scaler.state_dict()),
        "ema": copy.deepcopy(run.ema.state_dict()) if run.ema is not None else None,
    }


def differences(a: Any, b: Any, where: str = "") -> list[str]:
    """Where two nested states differ (tensors bit for bit, NaN equal to NaN)."""
    if isinstance(a, torch.Tensor):
        same = isinstance(b, torch.Tensor) and a.shape == b.shape and \
            torch.equal(torch.nan_to_num(a.float(), nan=1234.5),
                        torch.nan_to_num(b.float(), nan=1234.5)) and \
            torch.isnan(a.float()).equal(torch.isnan(b.float()))
        return [] if same else [where]
    if isinstance(a, dict):
        if a.keys() != b.keys():
            return [f"{where} keys"]
        return [d for k in a for d in differences(a[k], b[k], f"{where}.{k}")]
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return [f"{where} length"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True))
                for d in differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [where]


def poisoned_loss(run: Any, poison_call: Any) -> None:
    """The affinity loss with a finite value but NaN gradients at the calls poison_call(n)
    says (sqrt at 0: gradient inf, times 0: NaN)."""
    real, calls = run.losses["affinity"], {"n": 0}

    def loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> LossResult:
        calls["n"] += 1
        result = real(logits, target, mask)
        if not poison_call(calls["n"]):
            return result
        poison = torch.sqrt((logits.float() * 0).sum()) * 0
        return LossResult(result.loss + poison, result.valid)

    run.losses["affinity"] = loss


# -- EMA ----------------------------------------------------------------------------------


def closed_form_ema(history: list[torch.Tensor], decay: float) -> torch.Tensor:
    """sum_i w_i * (1 - d_i) * prod_{j > i} d_j over the weights after each update (w_0 the
    initial weights, d_0 = 1), d_n = min(decay, (1 + n) / (10 + n)) for the n-th update
    counted from 0."""
    d = [1.0] + [min(decay, (1 + n) / (10 + n)) for n in range(len(history) - 1)]
    total = torch.zeros_like(history[0], dtype=torch.float64)
    for i, w in enumerate(history):
        coefficient = (1 - d[i]) if i else 1.0
        for j in range(i + 1, len(history)):
            coefficient *= d[j]
        total += coefficient * w.double()
    return total


def test_the_ema_after_n_trainer_steps_is_its_closed_form_and_the_checkpoints(recipe,
                                                                              tmp_path):
    """decay 0.8 (reached at update 26: the ramp 0.1, 0.18, ... rules the first 4), one EMA
    update per optimizer step (not per accumulated batch), made after the step: the average
    of the weights each step left, the first one weighted by the ramp; last.pt keeps it, and
    its buffers are the model's."""
    run = trainer(recipe, tmp_path / "run", "train.ema=0.8", "train.accumulate=2",
                  "train.iterations=4", "train.checkpoint_every=4")
    history = [torch.cat([p.detach().flatten().clone() for p in run.model.parameters()])]
    real = run.step

    def step(batches: Any) -> Any:
        result = real(batches)
        history.append(torch.cat([p.detach().flatten().clone()
                                  for p in run.model.parameters()]))
        return result

    run.step = step  # type: ignore[method-assign]
    run.fit()
    assert len(history) == 5 and run.ema.updates == 4
    names = [n for n, _ in run.model.named_parameters()]
    got = torch.cat([run.ema.params[n].flatten() for n in names]).double()
    torch.testing.assert_close(got, closed_form_ema(history, 0.8), atol=1e-7, rtol=1e-6)
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert saved["ema"]["updates"] == 4 and saved["ema"]["decay"] == 0.8
    for name in names:
        assert torch.equal(saved["ema"]["params"][name], run.ema.params[name]), name
    for name, buffer in run.model.named_buffers():
        assert torch.equal(saved["ema"]["buffers"][name], buffer), name


# -- the learning rate of every update ------------------------------------------------------


def test_each_update_of_a_stopped_and_resumed_warm_cosine_run_used_its_formulas_rate(
        recipe, tmp_path, monkeypatch):
    """Warm-up 2 then cosine to 0.1 over 6 iterations, SGD without momentum: the rate each
    update used (read from the optimizer as it steps) is 0.5 * f(t) at every t = 0 .. 5,
    the last (0.5 * f(5) > 0.05) included, across a SIGTERM after 3 and a --resume."""
    settings = [SGD, "train.schedule={type: cosine, warmup: 2, min_factor: 0.1}",
                "train.iterations=6", "train.checkpoint_every=1"]
    used: list[float] = []

    def recording(run: Any) -> Any:
        real = run.optimizer.step

        def step(*args: Any, **kwargs: Any) -> Any:
            used.append(run.optimizer.param_groups[0]["lr"])
            return real(*args, **kwargs)

        run.optimizer.step = step
        return run

    first = recording(trainer(recipe, tmp_path / "run", *settings))
    stop_after(first, 3, monkeypatch)
    assert first.fit().interrupted == "SIGTERM"
    monkeypatch.undo()
    resumed = recording(trainer(recipe, tmp_path / "run", *settings, resume=True))
    assert resumed.iteration == 3
    resumed.fit()
    factor = lr_factor(resumed.train.schedule, 6)
    expected = [0.5 * factor(t) for t in range(6)]
    by_hand = [0.5 / 3, 1.0 / 3, 0.5] + [
        0.5 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))) for p in (0.25, 0.5, 0.75)]
    assert expected == pytest.approx(by_hand, rel=1e-12)
    assert used == pytest.approx(expected, rel=1e-12)
    assert used[-1] > 0.05


# -- clipping -----------------------------------------------------------------------------


def test_clipping_non_finite_gradients_reports_the_norm_and_does_not_raise():
    """torch's semantics (error_if_nonfinite False): the returned norm is inf or NaN, so the
    trainer can tell and skip; finite ones are clipped to max_norm * (1 / (norm + 1e-6))."""
    a = torch.nn.Parameter(torch.zeros(2))
    b = torch.nn.Parameter(torch.zeros(1))
    a.grad, b.grad = torch.tensor([3.0, float("inf")]), torch.tensor([1.0])
    assert clip_gradients([a, b], 1.0) == math.inf
    a.grad, b.grad = torch.tensor([3.0, float("nan")]), torch.tensor([1.0])
    assert math.isnan(clip_gradients([a, b], 1.0))
    a.grad, b.grad = torch.tensor([3.0, 4.0]), torch.tensor([12.0])
    assert clip_gradients([a, b], 2.0) == pytest.approx(13.0)
    reference = torch.tensor([3.0, 4.0, 12.0]) * (2.0 / (13.0 + 1e-6))
    torch.testing.assert_close(torch.cat([a.grad, b.grad]), reference)


# -- skipped steps --------------------------------------------------------------------------


def test_a_nan_loss_step_changes_nothing_a_step_changes(recipe, tmp_path):
    """Adam with weight decay, warm-up, clipping, accumulation and an EMA: after a good step,
    a step whose second batch's loss is NaN is skipped, and weights, optimizer moments and
    step counts, the schedule, the EMA (averages and update count) are bit for bit those
    before it; no gradient is left behind; the next good step is the one the skipped step
    would have been (the same rate, the same EMA decay)."""
    run = trainer(recipe, tmp_path / "run", "train.optimizer={type: adamw, lr: 0.01, "
                  "weight_decay: 0.1}", "train.schedule={type: cosine, warmup: 2}",
                  "train.grad_clip=0.5", "train.accumulate=2", "train.ema=0.9")
    batches = packed(run, 6)
    real = run.losses["affinity"]
    calls = {"n": 0}

    def loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> LossResult:
        calls["n"] += 1
        result = real(logits, target, mask)
        return LossResult(result.loss * math.nan, result.valid) if calls["n"] == 4 else result

    run.losses["affinity"] = loss
    assert run.step(iter(batches[:2])) is not None
    before = snapshot(run)
    rate, decay = run.optimizer.param_groups[0]["lr"], run.ema.current_decay()
    assert run.step(iter(batches[2:4])) is None
    assert differences(before, snapshot(run)) == []
    assert all(p.grad is None for p in run.model.parameters())
    assert run.batches_done == 4
    assert (run.optimizer.param_groups[0]["lr"], run.ema.current_decay()) == (rate, decay)
    assert run.step(iter(batches[4:6])) is not None
    assert run.scheduler.last_epoch == 2 and run.ema.updates == 2


def test_a_skipped_step_leaves_the_batch_norm_statistics_as_they_were(recipe, tmp_path):
    """norm: batch (the model default). A step whose forward is non-finite (here a NaN
    voxel in the image; in practice an fp16 or diverging activation) is skipped, but its
    forward already folded the batch's mean and variance into the running statistics:
    running_mean becomes NaN, stays NaN through every later good step (momentum average of
    NaN), and the EMA copies it, so validation and every export predict NaN while training
    (batch statistics) goes on."""
    run = trainer(recipe, tmp_path / "run", BATCH_NORM, "train.ema=0.9")
    batches = packed(run, 3)
    assert run.step(iter(batches[:1])) is not None
    before = copy.deepcopy(dict(run.model.named_buffers()))
    bad = copy.deepcopy(batches[1])
    bad["image"][0, 0, 0, 0, 0] = math.nan
    assert run.step(iter([bad])) is None
    assert run.step(iter(batches[2:])) is not None  # training goes on, its loss finite
    nan = [n for n, b in run.model.named_buffers() if b.is_floating_point() and
           not torch.isfinite(b).all()]
    ema_nan = [n for n, b in run.ema.buffers.items() if b.is_floating_point() and
               not torch.isfinite(b).all()]
    changed = [n for n, b in run.model.named_buffers()
               if n.endswith("num_batches_tracked") and int(b) != int(before[n]) + 1]
    assert (nan, ema_nan, changed) == ([], [], [])


def test_under_fp16_a_step_of_nan_gradients_is_skipped_as_under_fp32(recipe, tmp_path):
    """README: 'a finite loss with non-finite gradients skips the step (counted, logged)'.
    Under fp16 the scaler's found-inf check made scaler.step skip the optimizer, but the
    trainer did not look: the schedule stepped, the EMA folded in, the iteration counted,
    and NaN gradients at every step 'finished' the run with untrained weights and
    nonfinite_steps 0. Now the step is skipped as under fp32, and 10 in a row stop."""
    run = trainer(recipe, tmp_path / "run", "train.precision=fp16", "train.ema=0.9",
                  "train.iterations=3", "train.log_every=1")
    poisoned_loss(run, lambda n: True)
    start = copy.deepcopy(run.model.state_dict())
    before = snapshot(run)
    outcome = run.step(iter(packed(run, 1)))
    after = snapshot(run)
    moved = [part for part in ("scheduler", "ema") if differences(before[part], after[part])]
    assert (outcome is None, moved) == (True, [])
    with pytest.raises(UserError, match="10 non-finite losses in a row at iteration 1"):
        run.fit()
    assert all(torch.equal(v, start[k]) for k, v in run.model.state_dict().items())
