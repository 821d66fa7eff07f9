"""Optimizers, learning-rate schedules (exact factors, resumption), the EMA (hand-computed
averages, state round trip, copy_to) and gradient clipping."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from emrun.errors import UserError
from emrun.io.checkpoint import load, save_atomic
from emrun.recipe.run import SGD, Adam, Constant, Cosine, Poly, Step
from emrun.train.optim import EMA, LRFactor, build_optimizer, build_scheduler, clip_gradients

# --------------------------------------------------------------------------- optimizers


def test_build_optimizer_types_and_hyperparameters() -> None:
    params = [nn.Parameter(torch.zeros(3))]
    adam = build_optimizer(Adam(lr=0.01, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1), params)
    assert type(adam) is torch.optim.Adam
    group = adam.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == \
        (0.01, (0.8, 0.9), 1e-6, 0.1)
    assert type(build_optimizer(Adam(type="adamw"), params)) is torch.optim.AdamW
    sgd = build_optimizer(SGD(lr=0.1, momentum=0.5, nesterov=True, weight_decay=0.01), params)
    assert type(sgd) is torch.optim.SGD
    group = sgd.param_groups[0]
    assert (group["lr"], group["momentum"], group["nesterov"], group["weight_decay"]) == \
        (0.1, 0.5, True, 0.01)


def test_nesterov_without_momentum_is_a_user_error() -> None:
    with pytest.raises(UserError, match="nesterov"):
        build_optimizer(SGD(momentum=0, nesterov=True), [nn.Parameter(torch.zeros(1))])


# --------------------------------------------------------------------------- schedules


def lrs(spec, iterations: int, steps: int | None = None) -> list[float]:
    """The learning rate used at each step t = 0 .. steps-1, base rate 1."""
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = build_scheduler(spec, optimizer, iterations)
    seen = []
    for _ in range(iterations if steps is None else steps):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return seen


def cos_factor(progress: float, min_factor: float) -> float:
    return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress))


@pytest.mark.parametrize(("spec", "iterations", "expected"), [
    (Constant(), 3, [1, 1, 1]),
    (Constant(warmup=3), 6, [1 / 4, 2 / 4, 3 / 4, 1, 1, 1]),
    (Step(milestones=[2, 4], gamma=0.5), 6, [1, 1, 0.5, 0.5, 0.25, 0.25]),
    (Step(warmup=2, milestones=[4, 7], gamma=0.5), 9,
     [1 / 3, 2 / 3, 1, 1, 0.5, 0.5, 0.5, 0.25, 0.25]),
    (Cosine(min_factor=0.1), 4,
     [1, 0.1 + 0.45 * (1 + math.sqrt(0.5)), 0.55, 0.1 + 0.45 * (1 - math.sqrt(0.5))]),
    (Cosine(warmup=2), 6, [1 / 3, 2 / 3, 1, cos_factor(0.25, 0), 0.5, cos_factor(0.75, 0)]),
    (Poly(power=2, warmup=1), 5, [0.5, 1, 0.5625, 0.25, 0.0625]),
    (Poly(power=0.9), 4, [1, 0.75 ** 0.9, 0.5 ** 0.9, 0.25 ** 0.9]),
])
def test_schedule_factors(spec, iterations: int, expected: list[float]) -> None:
    assert lrs(spec, iterations) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_schedule_ends_and_beyond() -> None:
    cosine = LRFactor("cosine", 10, 0, min_factor=0.2)
    poly = LRFactor("poly", 10, 0, power=0.9)
    assert cosine(10) == pytest.approx(0.2) and cosine(50) == pytest.approx(0.2)
    assert poly(10) == 0 and poly(50) == 0
    assert poly(9) > 0  # the last update still moves the weights
    assert LRFactor("constant", 5, warmup=10)(4) == pytest.approx(5 / 11)  # warm-up past the end


def test_scheduler_resumes_identically(tmp_path: Path) -> None:
    def make():
        torch.manual_seed(0)
        model = nn.Linear(3, 1)
        optimizer = build_optimizer(SGD(lr=0.5, momentum=0.9), model.parameters())
        scheduler = build_scheduler(Step(warmup=2, milestones=[5], gamma=0.1), optimizer, 10)
        return model, optimizer, scheduler

    def step(model, optimizer, scheduler, t):
        x = torch.full((2, 3), float(t + 1))
        model(x).square().mean().backward()
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        return lr

    model, optimizer, scheduler = make()
    straight = [step(model, optimizer, scheduler, t) for t in range(8)]
    final = [p.detach().clone() for p in model.parameters()]

    model, optimizer, scheduler = make()
    for t in range(4):
        step(model, optimizer, scheduler, t)
    save_atomic(tmp_path / "c.pt", {"iteration": 4, "model": model.state_dict(),
                                    "optimizer": optimizer.state_dict(),
                                    "scheduler": scheduler.state_dict()})
    state = load(tmp_path / "c.pt")
    model, optimizer, scheduler = make()  # build first, then load every state dict
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    resumed = [step(model, optimizer, scheduler, t) for t in range(4, 8)]
    assert resumed == straight[4:]
    for p, q in zip(model.parameters(), final, strict=True):
        assert torch.equal(p.detach(), q)


# --------------------------------------------------------------------------- EMA


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 1)
        self.norm = nn.BatchNorm1d(1)

    def set(self, w: float, b: float) -> None:
        with torch.no_grad():
            self.linear.weight.fill_(w)
            self.linear.bias.fill_(b)


class Wrapped(nn.Module):  # what torch.compile looks like from outside
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self._orig_mod = inner


def test_ema_math_buffers_and_copy_to() -> None:
    model = Tiny()
    model.set(1.0, 0.0)
    ema = EMA(model, decay=0.75)
    ema.updates = 100  # past the warm-up: the recipe's decay (see the next test)
    model.set(5.0, 4.0)
    with torch.no_grad():
        model.norm.running_mean.fill_(7.0)
    ema.update(model)
    # 0.75 * 1 + 0.25 * 5 = 2; 0.75 * 0 + 0.25 * 4 = 1; buffers copied as they are.
    assert torch.allclose(ema.params["linear.weight"], torch.full((1, 2), 2.0))
    assert torch.allclose(ema.params["linear.bias"], torch.full((1,), 1.0))
    assert torch.equal(ema.buffers["norm.running_mean"], torch.full((1,), 7.0))
    model.set(10.0, -8.0)
    ema.update(Wrapped(model))  # names match through a compile-style wrapper
    # 0.75 * 2 + 0.25 * 10 = 4; 0.75 * 1 + 0.25 * -8 = -1.25
    assert torch.allclose(ema.params["linear.weight"], torch.full((1, 2), 4.0))
    assert torch.allclose(ema.params["linear.bias"], torch.full((1,), -1.25))
    assert ema.updates == 102
    assert model.linear.weight[0, 0].item() == 10.0  # the model itself is untouched
    assert not ema.params["linear.weight"].requires_grad

    target = Tiny()
    ema.copy_to(target)
    assert torch.allclose(target.linear.weight, torch.full((1, 2), 4.0))
    assert torch.allclose(target.linear.bias, torch.full((1,), -1.25))
    assert torch.equal(target.norm.running_mean, torch.full((1,), 7.0))
    assert set(ema.model_state_dict()) == set(Tiny().state_dict())


def test_ema_decay_is_ramped_up_so_the_initial_weights_fade_early() -> None:
    """With a constant decay of 0.999 the random initial weights still made 37 % of the
    average at iteration 1000 (the default first validation)."""
    model = Tiny()
    model.set(0.0, 0.0)  # the initial weights
    ema = EMA(model, decay=0.999)
    assert [round(ema.current_decay(), 4) for _ in range(1)] == [0.1]
    model.set(1.0, 1.0)  # trained weights, held fixed: the average's share of them
    for _ in range(1000):
        ema.update(model)
    initial_share = 1.0 - float(ema.params["linear.bias"])
    assert initial_share < 0.01  # constant 0.999: 0.999 ** 1000 = 0.37
    ema.updates = 8991  # (1 + n) / (10 + n) reaches 0.999 here
    assert ema.current_decay() == 0.999


def test_ema_state_round_trip(tmp_path: Path) -> None:
    model = Tiny()
    model.set(1.0, 1.0)
    ema = EMA(model, 0.5)
    ema.updates = 100  # past the warm-up
    model.set(3.0, 3.0)
    ema.update(model)
    save_atomic(tmp_path / "c.pt", {"iteration": 1, "ema": ema.state_dict()})
    other = EMA(Tiny(), 0.5)
    other.load_state_dict(load(tmp_path / "c.pt")["ema"])
    assert other.updates == 101
    for name, value in ema.model_state_dict().items():
        assert torch.equal(other.model_state_dict()[name], value)
    # Both continue identically.
    model.set(7.0, -1.0)
    ema.update(model)
    other.update(model)
    assert torch.equal(ema.params["linear.weight"], other.params["linear.weight"])
    assert torch.allclose(other.params["linear.weight"], torch.full((1, 2), 4.5))


def test_ema_mismatches_are_refused() -> None:
    ema = EMA(Tiny(), 0.9)
    with pytest.raises(ValueError, match="missing"):
        ema.update(nn.Linear(2, 1))
    state = ema.state_dict()
    state["params"] = {**state["params"], "linear.weight": torch.zeros(3, 3)}
    with pytest.raises(ValueError, match="shape"):
        ema.load_state_dict(state)
    with pytest.raises(ValueError):
        EMA(Tiny(), 1.0)


# --------------------------------------------------------------------------- clipping


def with_grads(*grads: list[float]) -> nn.Module:
    model = nn.Module()
    model.params = nn.ParameterList(nn.Parameter(torch.zeros(len(g))) for g in grads)
    for p, g in zip(model.params, grads, strict=True):
        p.grad = torch.tensor(g)
    return model


def test_clip_gradients_returns_the_norm_and_clips() -> None:
    model = with_grads([3.0], [4.0, 0.0])
    assert clip_gradients(model, 1.0) == pytest.approx(5.0)
    grads = torch.cat([p.grad for p in model.parameters()])
    assert torch.allclose(grads, torch.tensor([0.6, 0.8, 0.0]), atol=1e-6)
    assert torch.linalg.vector_norm(grads).item() == pytest.approx(1.0, abs=1e-5)


def test_clip_gradients_below_the_limit_and_none() -> None:
    model = with_grads([3.0], [4.0])
    assert clip_gradients(model, 10.0) == pytest.approx(5.0)
    assert model.params[0].grad.item() == 3.0
    assert clip_gradients(model, None) is None
    assert model.params[1].grad.item() == 4.0
    assert clip_gradients(list(model.parameters()), 2.5) == pytest.approx(5.0)
    assert model.params[0].grad.item() == pytest.approx(1.5, abs=1e-5)
