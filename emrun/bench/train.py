"""`emrun bench train`: the trainer's per-iteration time against a bare PyTorch loop.

Both run the same model, optimizer, precision, memory layout, compilation (``train.compile``)
and losses on the same batches, already in memory, so the difference is what the trainer adds
per iteration (bookkeeping, logging, checkpointing, loss checks), not data loading. Compiling
happens in the warm-up steps, outside the timing.
"""

from __future__ import annotations

import io
import itertools
import math
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from ..data.loader import to_tensors, unpack
from ..data.samples import SampleMaker
from ..data.synthetic import with_synthetic_sources
from ..losses import total_loss
from ..models import build_model
from ..recipe import LoadedRecipe
from ..registry import losses
from ..train.optim import build_optimizer
from ..train.trainer import Trainer, configure_backends, seed_everything
from . import bench_device
from .room import check_step_room


def _batches(loaded: LoadedRecipe, count: int) -> list[dict[str, Any]]:
    maker = SampleMaker(loaded.recipe, keep_memory=False)  # as the trainer's own
    return [to_tensors(maker.batch(loaded.recipe.seed, 0, i)) for i in range(count)]


def _bare_loop(loaded: LoadedRecipe, batches: list[dict[str, Any]], device: torch.device,
               steps: int, warmup: int) -> float:
    """Mean seconds per step of a hand-written loop (after ``warmup`` steps): one optimizer
    step over ``train.accumulate`` batches, as the trainer's iteration (one batch per step
    reported the accumulated micro-batches as the trainer's overhead)."""
    recipe = loaded.recipe
    configure_backends(recipe, device)
    seed_everything(recipe.seed)
    model = build_model(recipe).to(device)
    if recipe.train.channels_last:  # as the trainer does
        model.to(memory_format=torch.channels_last_3d)
    forward = torch.compile(model) if recipe.train.compile else model
    optimizer = build_optimizer(recipe.train.optimizer, model.parameters())
    loss_fns = {name: losses.build(task.loss, target=task.target)
                for name, task in recipe.tasks.items()}
    weights = {name: task.weight for name, task in recipe.tasks.items()}
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(recipe.train.precision)
    accumulate = recipe.train.accumulate
    times = []
    stream = itertools.cycle(batches)
    for i in range(warmup + steps):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        for packed in itertools.islice(stream, accumulate):
            batch = unpack(packed, device)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                outputs = forward(batch["image"])
                results = {n: fn(outputs[n], batch["target"][n], batch["mask"][n])
                           for n, fn in loss_fns.items()}
            (total_loss(results, weights) / accumulate).backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.fmean(times)


def _trainer_loop(loaded: LoadedRecipe, batches: list[dict[str, Any]], device: torch.device,
                  steps: int, warmup: int) -> tuple[float, float]:
    """Seconds per iteration of the emrun trainer's own loop (logging included) after
    ``warmup`` iterations, from its first step on, and seconds of its final checkpoint, timed
    apart: a run pays its set-up once and a checkpoint every ``checkpoint_every`` iterations,
    so folding either into a short timing overstates the loop (on an H100 that gave 65 ms per
    iteration where a real run took 52 ms)."""
    with tempfile.TemporaryDirectory(prefix="emrun-bench-") as tmp:
        quiet = Console(file=io.StringIO())
        trainer = Trainer(loaded, Path(tmp) / "run", device=str(device), console=quiet)
        stream: Iterator[dict[str, Any]] = itertools.cycle(batches)
        full = trainer.train  # warm up through fit() itself: first log, first checkpoint
        trainer.train = full.model_copy(update={"iterations": warmup, "log_every": warmup})
        trainer.fit(stream)
        trainer.train = full
        checkpoint = trainer._checkpoint
        saving = [0.0]

        def timed_checkpoint(logger: Any) -> None:
            started = time.perf_counter()
            checkpoint(logger)
            saving[0] += time.perf_counter() - started

        step = trainer.step
        first: list[float] = []

        def timed_step(source: Iterator[dict[str, Any]]) -> dict[str, Any] | None:
            if not first:
                first.append(time.perf_counter())
            return step(source)

        trainer._checkpoint = timed_checkpoint  # type: ignore[method-assign]
        trainer.step = timed_step  # type: ignore[method-assign]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        trainer.fit(stream)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - first[0] - saving[0]) / steps, saving[0]


def bench_train(loaded: LoadedRecipe, *, device: str | None = None, steps: int = 30,
                warmup: int = 3, synthetic: bool = True) -> dict[str, Any]:
    """The figures `emrun bench train` reports."""
    dev = bench_device(device)  # before any work: a missing GPU is the user's error (exit 2)
    recipe = with_synthetic_sources(loaded.recipe) if synthetic else loaded.recipe
    train = recipe.train.model_copy(update={
        "iterations": warmup + steps, "validate_every": 0, "image_every": 0,
        "checkpoint_every": warmup + steps, "workers": 0})
    recipe = recipe.model_copy(update={"train": train})
    loaded = LoadedRecipe(recipe, loaded.source, loaded.path, loaded.files)
    check_step_room(recipe, dev, recipe.train.precision)  # before four batches are made
    batches = _batches(loaded, 4)
    bare = _bare_loop(loaded, batches, dev, steps, warmup)
    emrun, checkpoint_seconds = _trainer_loop(loaded, batches, dev, steps, warmup)
    voxels = recipe.train.batch_size * math.prod(recipe.train.patch) * recipe.train.accumulate
    return {
        "recipe": recipe.name,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "precision": recipe.train.precision,
        "compile": recipe.train.compile,
        "patch": list(recipe.train.patch),
        "batch_size": recipe.train.batch_size,
        "accumulate": recipe.train.accumulate,
        "steps": steps,
        "emrun_step_ms": round(emrun * 1e3, 2),
        "bare_step_ms": round(bare * 1e3, 2),
        "overhead": round(emrun / bare - 1, 4),
        "checkpoint_ms": round(checkpoint_seconds * 1e3, 1),
        "voxels_per_s": round(voxels / emrun, 1),
        "params": sum(p.numel() for p in build_model(recipe).parameters()),
    }
