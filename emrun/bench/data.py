"""`emrun bench data`: how fast the training data pipeline delivers samples.

Two measurements in one run: per-stage cost (sampling/reading, each augmentation, targets)
in this process on one core, and end-to-end throughput with the requested worker count.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Any

from threadpoolctl import threadpool_limits

from ..data.loader import train_batches, unpack
from ..data.samples import SampleMaker, batch_rng
from ..data.synthetic import with_synthetic_sources
from ..recipe import Recipe


def stage_costs(recipe: Recipe, samples: int) -> tuple[dict[str, float], list[float]]:
    """Mean ms per sample of each stage, and each sample's total ms, in this process on one
    core (as a loader worker runs)."""
    with threadpool_limits(1):
        return _stage_costs(recipe, samples)


def _stage_costs(recipe: Recipe, samples: int) -> tuple[dict[str, float], list[float]]:
    maker = SampleMaker(recipe)
    maker.sample(batch_rng(recipe.seed, 1 << 20, 0))  # warm-up (another rank's stream)
    maker.timings = {}
    totals = []
    for index in range(samples):
        rng = batch_rng(recipe.seed, 0, index)
        start = time.perf_counter()
        maker.sample(rng)
        totals.append((time.perf_counter() - start) * 1e3)
    per_stage = {name: seconds * 1e3 / samples for name, seconds in maker.timings.items()}
    return per_stage, totals


def throughput(recipe: Recipe, workers: int, samples: int) -> tuple[float, float]:
    """Samples per second through the real loader (after every worker has made its first
    batch), and the ms per sample to unpack targets to float on this CPU (on a GPU the
    trainer does that on the device)."""
    batches = train_batches(recipe, workers=workers, pin_memory=False)
    for _ in range(max(workers, 1)):  # warm-up: worker start, volume generation or opening
        next(batches)
    count = max(1, samples // recipe.train.batch_size)
    received = []
    start = time.perf_counter()
    for _ in range(count):
        received.append(next(batches))
        if len(received) > 2:
            received.pop(0)
    elapsed = time.perf_counter() - start
    del batches
    start = time.perf_counter()
    unpack(received[-1])
    unpack_ms = (time.perf_counter() - start) * 1e3 / recipe.train.batch_size
    return count * recipe.train.batch_size / elapsed, unpack_ms


def _names(specs: Any) -> list[str]:
    """Every augmentation type in a stack, combinators' members included."""
    names = []
    for spec in specs:
        names.append(spec.type)
        names += _names(getattr(spec, "of", []))
    return names


def bench_data(recipe: Recipe, *, synthetic: bool, workers: int, samples: int) -> dict[str, Any]:
    """The figures `emrun bench data` reports."""
    if synthetic:
        recipe = with_synthetic_sources(recipe)
    per_stage, totals = stage_costs(recipe, samples)
    augment_names = set(_names(recipe.augment))
    per_aug = {k: round(v, 3) for k, v in per_stage.items() if k in augment_names}
    rate, unpack_ms = throughput(recipe, workers, samples)
    return {
        "recipe": recipe.name,
        "patch": list(recipe.train.patch),
        "channels": {name: task.channels() for name, task in recipe.tasks.items()},
        "synthetic": synthetic,
        "workers": workers,
        "samples": samples,
        "samples_per_s": round(rate, 3),
        "ms_per_sample": round(1e3 / rate, 3),
        "median_ms_per_sample_one_core": round(statistics.median(totals), 3),
        "read_ms": round(per_stage.get("sample", 0.0), 3),
        "targets_ms": round(per_stage.get("targets", 0.0), 3),
        "per_target_ms": {name: round(per_stage.get(f"target:{name}", 0.0), 3)
                          for name in recipe.tasks},
        "cpu_unpack_ms": round(unpack_ms, 3),
        "per_augmentation_ms": per_aug,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
    }
