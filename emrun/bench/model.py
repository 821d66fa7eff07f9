"""`emrun bench model`: training-step throughput of the recipe's model.

Times forward + backward + optimizer step on random input of the recipe's patch and batch
size, with the recipe's losses on random targets, for every configuration the device
supports: fp32 / bf16 autocast, eager / compiled, channels_last_3d on / off.
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
from typing import Any

import torch

from ..losses import total_loss
from ..models import build_model
from ..models.facts import model_facts
from ..recipe import Recipe
from ..registry import losses
from . import bench_device
from .model_rate import sync
from .room import check_step_room


def _time_steps(recipe: Recipe, device: torch.device, precision: str, compiled: bool,
                channels_last: bool, steps: int, warmup: int) -> list[float]:
    torch.manual_seed(recipe.seed)
    heads = recipe.head_channels()
    model = build_model(recipe).to(device)
    batch = recipe.train.batch_size
    shape = (batch, recipe.model.input_channels(), *recipe.train.patch)
    image = torch.rand(shape, device=device)
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    image = image.contiguous(memory_format=fmt)
    step_model = torch.compile(model) if compiled else model
    loss_fns = {name: losses.build(task.loss, target=task.target)
                for name, task in recipe.tasks.items()}
    weights = {name: task.weight for name, task in recipe.tasks.items()}
    targets = {n: (torch.rand((batch, c, *recipe.train.patch), device=device) > 0.5).float()
               for n, c in heads.items()}
    masks = {n: torch.ones_like(t) for n, t in targets.items()}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    dtype = torch.bfloat16 if precision == "bf16" else None
    times = []
    for i in range(warmup + steps):
        sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            outputs = step_model(image)
            results = {n: fn(outputs[n], targets[n], masks[n]) for n, fn in loss_fns.items()}
        loss = total_loss(results, weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def bench_model(recipe: Recipe, *, device: str | None = None, steps: int = 5, warmup: int = 2,
                compile_: bool = True) -> dict[str, Any]:
    """The figures `emrun bench model` reports."""
    dev = bench_device(device)
    check_step_room(recipe, dev)  # before the first batch is allocated
    model = build_model(recipe)
    facts = model_facts(model, recipe.model, recipe.train.patch)
    voxels = recipe.train.batch_size * math.prod(recipe.train.patch)
    precisions = ["fp32", "bf16"]
    if dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        precisions = ["fp32"]
    configs = []
    for precision, compiled, channels_last in itertools.product(
            precisions, [False, True] if compile_ else [False], [False, True]):
        times = _time_steps(recipe, dev, precision, compiled, channels_last, steps, warmup)
        median = statistics.median(times)
        configs.append({"precision": precision, "compiled": compiled,
                        "channels_last": channels_last, "step_ms": round(median * 1e3, 2),
                        "voxels_per_s": round(voxels / median, 1)})
    best = max(configs, key=lambda c: c["voxels_per_s"])
    return {
        "recipe": recipe.name,
        "model": recipe.model.type,
        "summary": recipe.model.summary(),  # widths, the sampling per level, kernel, norm
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "patch": list(recipe.train.patch),
        "batch_size": recipe.train.batch_size,
        "params": facts.params,
        "flops_per_voxel": facts.flops_per_voxel,
        "receptive_field": None if facts.receptive_field is None else list(facts.receptive_field),
        "step_voxels_per_s": best["voxels_per_s"],
        "best": {k: best[k] for k in ("precision", "compiled", "channels_last")},
        "configs": configs,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
