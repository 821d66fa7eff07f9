"""Optimizers, learning-rate schedules, the weight EMA and gradient clipping, from the recipe.

Learning-rate schedules
-----------------------
`build_scheduler` returns a ``LambdaLR`` whose factor ``f(t)`` multiplies the base rate
``train.optimizer.lr`` for the update made at step ``t = 0 .. iterations - 1`` (the
scheduler is stepped once after every optimizer step, so ``last_epoch == t`` while step
``t`` runs). With ``W = warmup`` and ``T = iterations``:

* warm-up, ``t < W``: ``f(t) = (t + 1) / (W + 1)``: linear, from ``1 / (W + 1)`` (never 0,
  which would waste the first step) towards 1, then the schedule below from ``t = W`` on;
* progress ``p(t) = min(1, (t - W) / max(1, T - W))``: 0 at ``t = W``, 1 at ``t = T`` (one
  past the last step, so the last update still has a non-zero rate under poly);
* ``constant``: ``f(t) = 1``;
* ``step``: ``f(t) = gamma ** k``, ``k`` the number of milestones ``m <= t`` (milestones
  are absolute iterations; they apply after the warm-up);
* ``cosine``: ``f(t) = min_factor + (1 - min_factor) * 0.5 * (1 + cos(pi * p(t)))``;
* ``poly``: ``f(t) = (1 - p(t)) ** power`` (nnU-Net's schedule).

The factor is a module-level callable class holding plain numbers, so the scheduler's
``state_dict`` (which includes them) saves and loads with ``weights_only=True``. Note that
``LambdaLR.load_state_dict`` restores those numbers too: a resumed run follows the saved
schedule, unless the recipe changed it (`adopt_recipe_settings`). Build the optimizer and the
scheduler first, then load both state dicts (building a scheduler resets the optimizer's
rates to ``f(0)``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from ..recipe.run import SGD, Adam, Constant, Cosine, Poly, Step

__all__ = ["EMA", "LRFactor", "adopt_recipe_settings", "build_optimizer", "build_scheduler",
           "clip_gradients"]


# --------------------------------------------------------------------------- optimizers


def build_optimizer(spec: Adam | SGD, params: Iterable[Any]) -> torch.optim.Optimizer:
    """``adam`` -> Adam (L2 weight decay), ``adamw`` -> AdamW (decoupled), ``sgd`` -> SGD.

    `params` is what torch optimizers take: parameters or parameter-group dicts.
    """
    if isinstance(spec, Adam):
        cls = torch.optim.AdamW if spec.type == "adamw" else torch.optim.Adam
        return cls(params, lr=spec.lr, betas=tuple(spec.betas), eps=spec.eps,
                   weight_decay=spec.weight_decay)
    if isinstance(spec, SGD):
        if spec.nesterov and spec.momentum == 0:
            raise UserError("train.optimizer: nesterov needs a momentum above 0 (got 0)")
        return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum,
                               nesterov=spec.nesterov, weight_decay=spec.weight_decay)
    raise TypeError(f"not an optimizer spec: {spec!r}")


# --------------------------------------------------------------------------- schedules


class LRFactor:
    """The learning-rate factor ``f(t)`` of one schedule (formulas in the module docstring).

    Its attributes are plain numbers and strings: ``LambdaLR.state_dict`` stores them.
    """

    def __init__(self, kind: str, iterations: int, warmup: int = 0, *,
                 milestones: Iterable[int] = (), gamma: float = 1.0, min_factor: float = 0.0,
                 power: float = 1.0) -> None:
        if kind not in ("constant", "step", "cosine", "poly"):
            raise ValueError(f"unknown schedule {kind!r}")
        self.kind = kind
        self.iterations = int(iterations)
        self.warmup = int(warmup)
        self.milestones = sorted(int(m) for m in milestones)
        self.gamma = float(gamma)
        self.min_factor = float(min_factor)
        self.power = float(power)

    def __call__(self, t: int) -> float:
        if t < self.warmup:
            return (t + 1) / (self.warmup + 1)
        if self.kind == "constant":
            return 1.0
        if self.kind == "step":
            return self.gamma ** sum(1 for m in self.milestones if m <= t)
        progress = min(1.0, (t - self.warmup) / max(1, self.iterations - self.warmup))
        if self.kind == "cosine":
            cosine = 0.5 * (1 + math.cos(math.pi * progress))
            return self.min_factor + (1 - self.min_factor) * cosine
        return (1 - progress) ** self.power

    def __repr__(self) -> str:
        return f"LRFactor({self.__dict__})"


def lr_factor(spec: Constant | Step | Cosine | Poly, iterations: int) -> LRFactor:
    """The factor function of a schedule spec for a run of `iterations` steps."""
    if isinstance(spec, Constant):
        return LRFactor("constant", iterations, spec.warmup)
    if isinstance(spec, Step):
        return LRFactor("step", iterations, spec.warmup, milestones=spec.milestones,
                        gamma=spec.gamma)
    if isinstance(spec, Cosine):
        return LRFactor("cosine", iterations, spec.warmup, min_factor=spec.min_factor)
    if isinstance(spec, Poly):
        return LRFactor("poly", iterations, spec.warmup, power=spec.power)
    raise TypeError(f"not a schedule spec: {spec!r}")


def build_scheduler(spec: Constant | Step | Cosine | Poly, optimizer: torch.optim.Optimizer,
                    iterations: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR with `lr_factor` (sets the optimizer's rates to ``f(0)`` at once)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(spec, iterations))


SETTINGS = ("lr", "betas", "eps", "weight_decay", "momentum", "nesterov")
"""An optimizer's hyperparameters that a recipe sets (its state, moments and step counts,
is the run's)."""


def adopt_recipe_settings(optimizer: torch.optim.Optimizer,
                          scheduler: torch.optim.lr_scheduler.LambdaLR,
                          factor: LRFactor) -> None:
    """After a checkpoint's optimizer and scheduler states are loaded (they carry the saved
    run's rates and schedule), make the recipe's apply from the step reached: the
    hyperparameters the optimizer was built with and the schedule ``factor``. A resume with
    a new ``lr`` kept the old one while the run's recipe.yaml said the new."""
    for group in optimizer.param_groups:
        for key in SETTINGS:
            if key in optimizer.defaults:
                group[key] = optimizer.defaults[key]
        group["initial_lr"] = optimizer.defaults["lr"]
    scheduler.base_lrs = [optimizer.defaults["lr"]] * len(optimizer.param_groups)
    for own in scheduler.lr_lambdas:
        own.__dict__.update(factor.__dict__)
    for group, base in zip(optimizer.param_groups, scheduler.base_lrs, strict=True):
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]  # get_last_lr()


# --------------------------------------------------------------------------- EMA


def _unwrap(model: nn.Module) -> nn.Module:
    """The bare module inside DDP (``.module``) and ``torch.compile`` (``._orig_mod``)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _match(kind: str, names: Iterable[str], found: Mapping[str, Any]) -> None:
    expected = set(names)
    missing = sorted(expected - set(found))
    unexpected = sorted(set(found) - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}" + (" ..." if len(missing) > 5 else ""))
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}" + (" ..." if len(unexpected) > 5 else ""))
        raise ValueError(f"EMA {kind} do not match the model: {'; '.join(parts)}")


class EMA:
    """An exponential moving average of a model's weights, for validation and export.

    After each optimizer step, ``update`` sets ``shadow = d * shadow + (1 - d) * param`` for
    every floating-point parameter, and copies every buffer (BatchNorm running statistics,
    counters) as it is. ``d = min(decay, (1 + n) / (10 + n))`` after ``n`` earlier updates:
    a warm-up, so the random initial weights fade within tens of steps (with a constant
    0.999 they still made 37 % of the average at iteration 1000, the first validation).
    The shadow starts as a copy of the model at creation, on the same device: create the
    EMA after moving the model. Wrapped models (DDP, ``torch.compile``) are unwrapped, so
    names are those of the bare model's state_dict.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1) (got {decay})")
        self.decay = float(decay)
        self.updates = 0
        model = _unwrap(model)
        self.params = {name: p.detach().clone() for name, p in model.named_parameters()
                       if p.is_floating_point()}
        self.buffers = {name: b.detach().clone() for name, b in model.named_buffers()}

    def _model_tensors(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        model = _unwrap(model)
        params = dict(model.named_parameters())
        buffers = dict(model.named_buffers())
        _match("parameters", self.params, {n: p for n, p in params.items()
                                           if p.is_floating_point()})
        _match("buffers", self.buffers, buffers)
        return [params[n] for n in self.params], [buffers[n] for n in self.buffers]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the model's current weights into the average (and copy its buffers)."""
        params, buffers = self._model_tensors(model)
        if params:
            # lerp: shadow + (1 - d) * (param - shadow) == d * shadow + (1 - d) * param
            torch._foreach_lerp_(list(self.params.values()), [p.detach() for p in params],
                                 1.0 - self.current_decay())
        for shadow, buffer in zip(self.buffers.values(), buffers, strict=True):
            shadow.copy_(buffer)
        self.updates += 1

    def current_decay(self) -> float:
        """The decay the next update uses: the recipe's, ramped up over the first updates."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights (and the copied buffers) into `model`."""
        params, buffers = self._model_tensors(model)
        for target, shadow in zip(params, self.params.values(), strict=True):
            target.copy_(shadow)
        for target, shadow in zip(buffers, self.buffers.values(), strict=True):
            target.copy_(shadow)

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights as a model state_dict (parameters and buffers)."""
        return {**self.params, **self.buffers}

    def state_dict(self) -> dict[str, Any]:
        """``{"decay", "updates", "params", "buffers"}`` (the tensors are not copies)."""
        return {"decay": self.decay, "updates": self.updates,
                "params": dict(self.params), "buffers": dict(self.buffers)}

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the averages (copied into place, so onto this EMA's device).

        The decay stays the one this EMA was built with (the recipe's); names and shapes
        must match, else ValueError.
        """
        for kind in ("params", "buffers"):
            saved, own = state[kind], getattr(self, kind)
            _match(kind, own, saved)
            for name, shadow in own.items():
                value = saved[name]
                if tuple(value.shape) != tuple(shadow.shape):
                    raise ValueError(f"EMA {kind} {name!r}: shape {list(value.shape)} in the "
                                     f"checkpoint, {list(shadow.shape)} in the model")
                shadow.copy_(value)
        self.updates = int(state.get("updates", 0))


# --------------------------------------------------------------------------- clipping


def clip_gradients(model: nn.Module | Iterable[torch.Tensor],
                   max_norm: float | None) -> float | None:
    """Clip the total gradient 2-norm to `max_norm`; return the norm before clipping.

    None (and nothing done) when `max_norm` is None. With a GradScaler, call
    ``scaler.unscale_(optimizer)`` first. The norm may be inf or nan (an fp16 overflow, or a
    diverged run): the gradients are then meaningless (a GradScaler skips such a step; the
    caller decides otherwise). Reading the norm synchronises with the GPU.
    """
    if max_norm is None:
        return None
    params = model.parameters() if isinstance(model, nn.Module) else model
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
