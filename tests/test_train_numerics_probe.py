"""The training loop's numbers, probed: learning-rate schedules against their formulas,
gradient accumulation against one large batch, task weights (0 and any sum), gradient
clipping by hand, bf16 autocast on a CPU, the losses and validation figures logged, what a
checkpoint holds, and a stopped and resumed run against a straight one. Tiny model and
synthetic volumes, trained in-process (the recipe and helpers of test_train_resume_probe)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from test_train_logging import accumulator, plain_console
from test_train_resume_probe import TINY, stop_after, trainer

from emrun.data.loader import train_batches, unpack, validation_batches
from emrun.losses import BCE, LossResult
from emrun.recipe.run import Constant, Cosine, Poly, Step
from emrun.recipe.tasks import BCELoss
from emrun.registry import losses
from emrun.train.logging import RunLogger
from emrun.train.optim import LRFactor, build_scheduler, lr_factor
from emrun.train.trainer import RESUMED_PARTS, validation_losses, without_margins

SGD = "train.optimizer={type: sgd, lr: 0.5, momentum: 0}"
TWO_TASKS = ("tasks={affinity: {target: {type: affinity}, weight: 0.3}, "
             "boundary: {target: {type: boundary}, weight: 2.0}}")


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    path = tmp_path / "numerics.yaml"
    path.write_text(TINY)
    return path


def events(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]


def packed(trainer_: Any, count: int, *, full_masks: bool = False) -> list[dict[str, Any]]:
    """The first ``count`` loader batches of the trainer's recipe (every mask bit set with
    ``full_masks``: each voxel counted)."""
    stream = train_batches(trainer_.recipe, workers=0)
    batches = [next(stream) for _ in range(count)]
    if full_masks:
        for batch in batches:
            batch["mask"] = {name: torch.full_like(bits, 255)
                             for name, bits in batch["mask"].items()}
    return batches


def joined(batches: list[dict[str, Any]]) -> dict[str, Any]:
    """Loader batches as one batch of their summed size."""
    first = batches[0]
    return {"image": torch.cat([b["image"] for b in batches]),
            "x": torch.cat([b["x"] for b in batches]),
            **{part: {name: torch.cat([b[part][name] for b in batches]) for name in first[part]}
               for part in ("target", "mask")}}


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


# -- learning-rate schedules ----------------------------------------------------------------


def by_hand(kind: str, t: int, iterations: int, warmup: int, **kw: float) -> float:
    """The module docstring's formulas, written out again."""
    if t < warmup:
        return (t + 1) / (warmup + 1)
    progress = min(1.0, (t - warmup) / max(1, iterations - warmup))
    if kind == "cosine":
        low = kw.get("min_factor", 0.0)
        return low + (1 - low) * (1 + math.cos(math.pi * progress)) / 2
    if kind == "poly":
        return (1 - progress) ** kw.get("power", 1.0)
    if kind == "step":
        return kw.get("gamma", 1.0) ** sum(1 for m in kw.get("milestones", ()) if m <= t)
    return 1.0


SPECS = [
    ("constant", Constant, {}),
    ("cosine", Cosine, {"min_factor": 0.05}),
    ("poly", Poly, {"power": 0.9}),
    ("step", Step, {"milestones": [3, 7], "gamma": 0.5}),
]


@pytest.mark.parametrize(("kind", "spec", "kw"), SPECS)
@pytest.mark.parametrize(("iterations", "warmup"), [(10, 0), (10, 4), (1, 0), (1, 3), (4, 9),
                                                    (10, 9), (10, 10)])
def test_each_schedule_is_its_formula_at_every_step(kind, spec, kw, iterations, warmup):
    """First, middle and last updates, a one-iteration run, a warm-up longer than the run:
    the rate of update t is base * f(t), never 0 while the run lasts, and the first update
    after the warm-up (if any) is at the full base rate (except where a step milestone
    already fell)."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.2)
    scheduler = build_scheduler(spec(warmup=warmup, **kw), optimizer, iterations)
    used = []
    for _ in range(iterations):
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [0.2 * by_hand(kind, t, iterations, warmup, **kw) for t in range(iterations)]
    assert used == pytest.approx(expected, rel=1e-12)
    assert all(rate > 0 for rate in used)
    if warmup < iterations and kind != "step":
        assert used[warmup] == pytest.approx(0.2)
    if warmup >= iterations:  # all warm-up: a linear ramp that never reaches the base rate
        assert used[-1] == pytest.approx(0.2 * iterations / (warmup + 1))


def test_the_last_update_of_a_decaying_schedule_is_its_smallest_but_not_its_floor():
    """Cosine and poly decrease over the run; the floor (min_factor, 0) is one past the last
    update, so the last update still moves the weights."""
    for factor in (LRFactor("cosine", 20, 5, min_factor=0.1), LRFactor("poly", 20, 5, power=2)):
        rates = [factor(t) for t in range(5, 20)]
        assert rates == sorted(rates, reverse=True) and rates[0] == 1.0
        floor = factor.min_factor if factor.kind == "cosine" else 0.0
        assert rates[-1] > floor and factor(20) == pytest.approx(floor)


# -- accumulation, weights and clipping in the trainer's step ----------------------------


def test_accumulated_batches_step_as_one_batch_of_their_size(recipe, tmp_path):
    """accumulate k batches of b = one batch of k * b when every voxel counts (a per-sample
    norm, no batch statistics), with two tasks weighted 0.3 and 2: the mean of the batches'
    means is the mean over all their voxels."""
    common = [SGD, "train.iterations=1", "augment=none", TWO_TASKS]
    split = trainer(recipe, tmp_path / "split", *common, "train.accumulate=2")
    whole = trainer(recipe, tmp_path / "whole", *common, "train.batch_size=2")
    batches = packed(split, 2, full_masks=True)
    a = split.step(iter(batches))
    b = whole.step(iter([joined(batches)]))
    assert a is not None and b is not None and set(a["losses"]) == {"affinity", "boundary"}
    for name in a["losses"]:
        torch.testing.assert_close(a["losses"][name], b["losses"][name])
    torch.testing.assert_close(flat(split.model), flat(whole.model), atol=1e-6, rtol=1e-5)
    assert split.batches_done == 2 and whole.batches_done == 1


def test_under_ddp_only_an_iterations_last_batch_all_reduces(recipe, tmp_path, monkeypatch):
    """Every backward of an accumulated iteration all-reduced the gradients under DDP; the
    batches before the last now keep them on their rank (no_sync), and the step is the
    same."""
    import contextlib

    class FakeDDP(torch.nn.Module):  # DDP's interface, in one process
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner, self.local = inner, []

        def forward(self, x):
            return self.inner(x)

        @contextlib.contextmanager
        def no_sync(self):
            self.local.append(True)
            yield

    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", FakeDDP)
    common = [SGD, "train.iterations=1", "augment=none", "train.accumulate=3"]
    wrapped = trainer(recipe, tmp_path / "ddp", *common)
    wrapped.forward_model = FakeDDP(wrapped.model)
    plain = trainer(recipe, tmp_path / "plain", *common)
    batches = packed(plain, 3)
    assert wrapped.step(iter(batches)) is not None and plain.step(iter(batches)) is not None
    assert wrapped.forward_model.local == [True, True]
    torch.testing.assert_close(flat(wrapped.model), flat(plain.model))


def test_task_weights_are_not_normalised(recipe, tmp_path):
    """The total is sum(weight * loss): weights that sum to 3 move the weights three times
    as far as the same task at weight 1 (under SGD without momentum)."""
    start = trainer(recipe, tmp_path / "one", SGD, "train.iterations=1")
    before = flat(start.model)
    triple = trainer(recipe, tmp_path / "three", SGD, "train.iterations=1",
                     "tasks.affinity.weight=3")
    batches = packed(start, 1)
    start.step(iter(batches))
    triple.step(iter(batches))
    torch.testing.assert_close(flat(triple.model) - before, 3 * (flat(start.model) - before),
                               atol=1e-6, rtol=1e-4)


def nan_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> LossResult:
    """A task's loss that is NaN yet still depends on the logits."""
    return LossResult(loss=logits.float().sum() * math.nan, valid=torch.tensor(1.0))


def test_a_task_of_weight_0_gives_no_gradient_and_a_finite_total(recipe, tmp_path):
    """A weight-0 task is outside the optimised total (even a NaN loss there changes no
    weight) and outside the logged total; its own loss is still logged (NaN: null)."""
    zero = ("tasks={affinity: {target: {type: affinity}}, "
            "boundary: {target: {type: boundary}, weight: 0}}")
    both = trainer(recipe, tmp_path / "both", SGD, "train.iterations=1", zero)
    both.losses["boundary"] = nan_loss
    reference = copy.deepcopy(both.model)
    batches = packed(both, 1)
    both.fit(iter(batches))
    batch = unpack(batches[0])
    outputs = reference(batch["image"])
    both.losses["affinity"](outputs["affinity"], batch["target"]["affinity"],
                            batch["mask"]["affinity"]).loss.backward()
    with torch.no_grad():
        for parameter in reference.parameters():
            if parameter.grad is not None:
                parameter -= 0.5 * parameter.grad
    torch.testing.assert_close(flat(both.model), flat(reference), atol=1e-7, rtol=1e-5)
    (line,) = [e for e in events(tmp_path / "both") if "loss/total" in e]
    assert line["loss/boundary"] is None
    assert line["loss/total"] == pytest.approx(line["loss/affinity"])
    assert both.nonfinite == 0


@pytest.mark.parametrize("accumulate", [1, 3])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_clipping_caps_the_norm_of_the_whole_update(recipe, tmp_path, accumulate, precision):
    """Under SGD without momentum the update is lr * the clipped gradient, so its norm is
    lr * grad_clip: the norm of the accumulated gradient (not each batch's), unscaled
    before clipping under fp16's loss scaler."""
    run = trainer(recipe, tmp_path / "run", SGD, "train.grad_clip=0.001",
                  f"train.accumulate={accumulate}", f"train.precision={precision}",
                  "train.iterations=1")
    if precision == "fp16":
        run.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)  # no overflow, no skip
    before = flat(run.model)
    assert run.step(iter(packed(run, accumulate))) is not None
    moved = float((flat(run.model) - before).norm())
    assert moved == pytest.approx(0.5 * 0.001, rel=1e-3)


def test_a_clipped_step_is_torchs_clip_by_hand(recipe, tmp_path):
    """The trainer's clipped step against a reference step made here with
    torch.nn.utils.clip_grad_norm_ on the same batch and starting weights."""
    run = trainer(recipe, tmp_path / "run", SGD, "train.grad_clip=0.01", "train.iterations=1")
    reference = copy.deepcopy(run.model)
    batches = packed(run, 1)
    run.step(iter(batches))
    batch = unpack(batches[0])
    outputs = reference(batch["image"])
    result = run.losses["affinity"](outputs["affinity"], batch["target"]["affinity"],
                                    batch["mask"]["affinity"])
    result.loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.01)
    assert float(norm) > 0.01  # it did clip
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter -= 0.5 * parameter.grad
    torch.testing.assert_close(flat(run.model), flat(reference), atol=1e-7, rtol=1e-5)


def test_one_parameter_group_takes_the_recipes_decay_everywhere(recipe, tmp_path):
    """The design excludes nothing from weight decay (no groups for norms or biases): every
    parameter is in the one group, with the recipe's decay."""
    run = trainer(recipe, tmp_path / "run", "train.optimizer={type: adamw, weight_decay: 0.1}")
    (group,) = run.optimizer.param_groups
    assert group["weight_decay"] == 0.1
    assert {id(p) for p in group["params"]} == {id(p) for p in run.model.parameters()}


# -- mixed precision ---------------------------------------------------------------------


def test_bf16_autocast_computes_the_losses_in_float32(recipe, tmp_path):
    """Under bf16 autocast on a CPU the logits are bf16 and each loss (margins included) a
    float32 figure equal to the loss of the same logits outside autocast; extreme logits
    give no NaN, in the value or its gradient."""
    run = trainer(recipe, tmp_path / "run", "train.precision=bf16", "train.iterations=1",
                  "tasks.affinity.loss={type: bce, margin0: 0.1, margin1: 0.2, balance: true}")
    seen: list[tuple[torch.dtype, torch.Tensor, torch.Tensor]] = []
    real = run.losses["affinity"]

    def spy(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> LossResult:
        result = real(logits, target, mask)
        seen.append((logits.dtype, result.loss, real(logits.detach().float(), target,
                                                     mask).loss))
        return result

    run.losses["affinity"] = spy
    assert run.step(iter(packed(run, 1))) is not None
    ((dtype, loss, outside),) = seen
    assert dtype == torch.bfloat16 and loss.dtype == torch.float32
    assert torch.equal(loss.detach(), outside)
    shape = (1, 3, 4, 16, 16)
    extreme = torch.full(shape, 3e4, dtype=torch.bfloat16)  # sigmoid: exactly 0 and 1
    extreme[:, :, :2] = -3e4
    extreme.requires_grad_(True)
    target = (torch.arange(math.prod(shape)).reshape(shape) % 2).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = real(extreme, target, torch.ones(shape))
    result.loss.backward()
    assert result.loss.dtype == torch.float32 and torch.isfinite(result.loss)
    assert torch.isfinite(extreme.grad).all()


# -- logging and validation ---------------------------------------------------------------


def test_the_logged_total_is_the_weighted_sum_of_the_logged_task_means(recipe, tmp_path):
    """Each line's task losses are means over the window's iterations (each the mean over
    its accumulated batches), and loss/total is sum(weight * task mean)."""
    run = tmp_path / "run"
    made = trainer(recipe, run, TWO_TASKS, "train.accumulate=2", "train.log_every=2")
    per_step: list[dict[str, float]] = []
    real = made.step

    def step(batches: Any) -> Any:
        result = real(batches)
        per_step.append({n: float(v) for n, v in result["losses"].items()})
        return result

    made.step = step  # type: ignore[method-assign]
    made.fit()
    lines = [e for e in events(run) if "loss/total" in e]
    assert [e["iteration"] for e in lines] == [2, 4]
    for line, window in zip(lines, (per_step[:2], per_step[2:]), strict=True):
        for name in ("affinity", "boundary"):
            assert line[f"loss/{name}"] == pytest.approx(sum(w[name] for w in window) / 2)
        assert line["loss/total"] == pytest.approx(
            0.3 * line["loss/affinity"] + 2.0 * line["loss/boundary"])


def test_a_validation_total_needs_a_task_that_counts():
    """A weight-0 task's validation loss is a figure of its own but no total: a total of 0
    from it alone became the best loss, and no later validation could replace best.pt."""
    weights = {"aff": 1.0, "monitor": 0.0}
    alone = validation_losses({"aff": 0.0, "monitor": 3.0}, {"aff": 0.0, "monitor": 5.0},
                              weights)
    assert alone == {"loss/monitor": 0.6}
    both = validation_losses({"aff": 2.0, "monitor": 3.0}, {"aff": 4.0, "monitor": 5.0},
                             {"aff": 2.0, "monitor": 0.0})
    assert both == pytest.approx({"loss/aff": 0.5, "loss/monitor": 0.6, "loss/total": 1.0})
    nan = validation_losses({"aff": 2.0, "monitor": math.nan}, {"aff": 4.0, "monitor": 5.0},
                            weights)
    assert nan["loss/total"] == 0.5


def test_validation_is_the_per_voxel_mean_under_the_ema_weights(recipe, tmp_path):
    """The validation loss is sum(loss * counted) / sum(counted) over the validation
    batches, of the EMA's weights, not the trained ones, and without the loss's margins
    (see the next test); and validating changes nothing of the training."""
    common = ["train.ema=0.5", "train.validate_segmentation=false", "train.iterations=3",
              "tasks.affinity.loss={type: bce, margin0: 0.3, margin1: 0.3}"]
    run = tmp_path / "run"
    validated = trainer(recipe, run, *common, "train.validate_every=1")
    validated.fit()
    quiet = trainer(recipe, tmp_path / "quiet", *common)
    quiet.fit()
    assert torch.equal(flat(validated.model), flat(quiet.model))
    model = copy.deepcopy(validated.model)
    validated.ema.copy_to(model)
    assert not torch.equal(flat(model), flat(validated.model))
    model.eval()
    total = counted = 0.0
    with torch.no_grad():
        for batch in map(unpack, validation_batches(validated.recipe)):
            result = BCE()(model(batch["image"])["affinity"], batch["target"]["affinity"],
                           batch["mask"]["affinity"])
            total += float(result.loss) * float(result.valid)
            counted += float(result.valid)
    lines = [e for e in events(run) if "validation" in e]
    assert [e["iteration"] for e in lines] == [1, 2, 3]
    line = lines[-1]["validation"]
    assert line["loss/affinity"] == pytest.approx(total / counted, rel=1e-5)
    assert line["loss/total"] == pytest.approx(total / counted, rel=1e-5)


def test_validation_scores_without_margins_so_a_better_model_scores_lower():
    """With DeepEM's margins (mask mode) in the validation loss, a near-perfect prediction
    scored higher than a worse one (its remaining voxels are its hard ones), and best.pt was
    chosen by it."""
    spec = BCELoss(type="bce", margin0=0.2, margin1=0.2)
    target = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0]).view(1, 1, 1, 1, 6)
    good = torch.logit(torch.tensor([0.95, 0.95, 0.45, 0.05, 0.05, 0.55])).view(target.shape)
    worse = torch.logit(torch.tensor([0.6, 0.6, 0.6, 0.4, 0.4, 0.4])).view(target.shape)
    mask = torch.ones_like(target)
    trained = BCE(0.2, 0.2)
    assert trained(good, target, mask).loss > trained(worse, target, mask).loss  # the trap
    scorer = losses.build(without_margins(spec))
    assert scorer(good, target, mask).loss < scorer(worse, target, mask).loss
    assert without_margins(spec).balance == spec.balance


# -- checkpoints and resumption -----------------------------------------------------------


def test_a_checkpoint_holds_what_resumption_needs_in_step(recipe, tmp_path):
    """Every part resumption reads, with counters that agree: the scheduler's step and the
    optimizer's step count are the iteration, the data position iteration * accumulate."""
    run = tmp_path / "run"
    trainer(recipe, run, "train.accumulate=2", "train.ema=0.9").fit()
    state = torch.load(run / "checkpoints" / "iter_0000002.pt", weights_only=True)
    assert set(RESUMED_PARTS) <= set(state) and state["iteration"] == 2
    assert state["scheduler"]["last_epoch"] == 2
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {2}
    assert state["data"]["batches"] == 4 and state["ema"]["updates"] == 2
    assert state["log_window"]["iterations"] == 2


CONTINUED = [SGD.replace("momentum: 0", "momentum: 0.9, nesterov: true, weight_decay: 0.01"),
             "train.schedule={type: step, warmup: 1, milestones: [3], gamma: 0.5}",
             "train.grad_clip=0.5", "train.accumulate=2", "train.ema=0.7",
             "train.log_every=3", "tasks.affinity.weight=1.5"]


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_a_stopped_and_resumed_run_is_the_straight_run_bit_for_bit(recipe, tmp_path,
                                                                   monkeypatch, precision):
    """4 iterations straight against 2, SIGTERM, --resume, 2 more (momentum, weight decay,
    warm-up and a milestone, clipping, accumulation, EMA, augmentation): the same weights,
    optimizer state, EMA, schedule, data position, and the same logged losses and rates."""
    settings = [*CONTINUED, f"train.precision={precision}"]
    straight = tmp_path / "straight"
    trainer(recipe, straight, *settings).fit()
    stopped = tmp_path / "stopped"
    first = trainer(recipe, stopped, *settings)
    stop_after(first, 2, monkeypatch)
    assert first.fit().interrupted == "SIGTERM"
    trainer(recipe, stopped, *settings, resume=True).fit()
    a, b = (torch.load(r / "checkpoints" / "last.pt", weights_only=True)
            for r in (straight, stopped))
    for part in ("model", "optimizer", "scheduler", "scaler", "ema", "data", "iteration",
                 "log_window", "nonfinite"):
        assert_same(a[part], b[part], part)
    strip = ("throughput", "memory", "time")
    logged = [[{k: v for k, v in e.items() if not k.startswith(strip)} for e in events(r)
               if "loss/total" in e] for r in (straight, stopped)]
    assert logged[0] == logged[1] and [e["iteration"] for e in logged[0]] == [3, 4]


def assert_same(a: Any, b: Any, where: str) -> None:
    """Equal, tensors bit for bit, through nested dicts and lists."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{index}]")
    else:
        assert a == b, where


def test_an_ema_first_enabled_on_resumption_starts_from_the_resumed_weights(recipe, tmp_path):
    """A resumption that turns train.ema on averaged from the random initial weights (the EMA
    was made before the checkpoint's weights were loaded): validation, best.pt and every
    export then took a mostly untrained model."""
    run = tmp_path / "run"
    trainer(recipe, run, "train.iterations=2").fit()
    saved = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]
    resumed = trainer(recipe, run, "train.iterations=3", "train.ema=0.5", resume=True)
    assert resumed.ema is not None
    for name, value in resumed.ema.model_state_dict().items():
        assert torch.equal(value, saved[name]), name
    before = {n: v.clone() for n, v in resumed.model.state_dict().items()}
    resumed.fit()
    after = resumed.model.state_dict()
    for name, value in resumed.ema.params.items():  # a new average: its first update's
        torch.testing.assert_close(value, 0.1 * before[name] + 0.9 * after[name])  # decay 0.1


def test_a_finished_run_lengthened_on_resumption_is_the_longer_run(recipe, tmp_path):
    """Under a schedule that does not depend on the run's length (constant, with warm-up),
    4 iterations resumed to 8 are the 8 straight, bit for bit: taking the recipe's settings
    on resumption keeps the rate, betas and moments the straight run has."""
    schedule = "train.schedule={type: constant, warmup: 2}"
    straight = tmp_path / "straight"
    trainer(recipe, straight, schedule, "train.iterations=8").fit()
    run = tmp_path / "run"
    trainer(recipe, run, schedule).fit()
    trainer(recipe, run, schedule, "train.iterations=8", resume=True).fit()
    a, b = (torch.load(r / "checkpoints" / "last.pt", weights_only=True)
            for r in (straight, run))
    for part in ("model", "optimizer", "scheduler", "iteration"):
        assert_same(a[part], b[part], part)


def test_a_longer_schedule_on_resumption_follows_the_new_formula(recipe, tmp_path):
    """Resuming a 4-iteration poly run as an 8-iteration one: the remaining updates use the
    8-iteration schedule's rates at their own step (logged), not the old one's (0 after 4)."""
    schedule = "train.schedule={type: poly, warmup: 1, power: 1}"
    run = tmp_path / "run"
    trainer(recipe, run, schedule, "train.log_every=1").fit()
    trainer(recipe, run, schedule, "train.log_every=1", "train.iterations=8", resume=True).fit()
    rates = {e["iteration"]: e["lr"] for e in events(run) if "lr" in e}
    old = lr_factor(Poly(warmup=1, power=1), 4)
    new = lr_factor(Poly(warmup=1, power=1), 8)
    assert rates == pytest.approx({k: 0.01 * (old if k <= 4 else new)(k - 1)
                                   for k in range(1, 9)})


def test_a_run_started_again_from_0_hides_its_abandoned_curve(tmp_path):
    """A run stopped before its first checkpoint and resumed starts again at iteration 0
    in the same folder: TensorBoard showed the abandoned steps 1..5 beside the new 1..3."""
    console, _ = plain_console()
    with RunLogger(tmp_path, total=6, console=console) as log:
        for it in range(1, 6):
            log.step(it, {"loss/total": float(it)})
    with RunLogger(tmp_path, total=6, console=console, start=0) as log:
        for it in (1, 2, 3):
            log.step(it, {"loss/total": 10.0 + it})
    got = [(e.step, e.value) for e in accumulator(tmp_path).Scalars("loss/total")]
    assert got == [(1, 11.0), (2, 12.0), (3, 13.0)]


def test_validation_scores_are_means_over_sources_at_one_shared_value(monkeypatch):
    """Each value's scores are averaged over the validation sources and one value, the
    lowest mean adapted Rand error, is reported with its means: not each source's own best
    value (which would flatter the model)."""
    from emrun.recipe.run import MutexWatershed
    from emrun.segment.sweep import SweepResult
    from emrun.train import seg_validation

    table = {1: [0.1, 0.5], 2: [0.6, 0.3]}  # arand per value, sources 1 and 2

    def fake(affs: Any, offsets: Any, spec: Any, values: Any, truth: Any,
             mask: Any) -> SweepResult:
        arand = table[int(affs.flat[0])]
        scores = tuple({"arand": a, "voi_split": 2 * a, "voi_merge": 3 * a, "cremi_score": a}
                       for a in arand)
        return SweepResult("mws", "bias", tuple(values), scores, 0, truth)

    monkeypatch.setattr(seg_validation, "sweep", fake)
    inputs = [seg_validation.SegmentationInput(
        affinities=torch.full((3, 1, 1, 1), source, dtype=torch.uint8).numpy(),
        truth=torch.ones((1, 1, 1), dtype=torch.int64).numpy(), mask=None,
        offsets=((-1, 0, 0), (0, -1, 0), (0, 0, -1))) for source in table]
    got = seg_validation.score_validation(MutexWatershed(), inputs, values=(0.2, 0.7))
    assert got == pytest.approx({"arand": 0.35, "voi_split": 0.7, "voi_merge": 1.05,
                                 "cremi_score": 0.35, "segment/bias": 0.2})
