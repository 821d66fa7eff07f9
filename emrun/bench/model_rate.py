"""The model-only rate `emrun bench infer` compares the engine with, and searches
configurations on: seconds per forward pass of an engine's model on a batch of patches
already on the device, at steady state (so neither data movement nor warm-up counts), run
as the engine runs its passes (`Engine.passes`: on a CPU, one pass per thread side by
side; timing one pass spread over every thread measured another rate than the engine's)."""

from __future__ import annotations

import time

import numpy as np
import torch

from ..geometry import Zyx
from ..infer.engine import Engine

WARMUP_ROUNDS = 3
"""Untimed rounds first: kernel selection, caches, compilation and the pass threads."""


def _model_batch(image: np.ndarray, patch: Zyx, batch_size: int,
                 device: torch.device) -> torch.Tensor:
    """A batch of distinct patches of the volume (mirrored up to a patch where it is
    smaller), scaled to [0, 1], on the device."""
    short = [(0, max(0, p - n)) for n, p in zip(image.shape, patch, strict=True)]
    if any(b for _, b in short):
        image = np.pad(image, short, mode="symmetric")
    pz, py, px = patch
    rows = [image[:pz, :py, x:x + px] for x in range(0, image.shape[2] - px + 1, px)]
    patches = [rows[i % len(rows)] for i in range(batch_size)]
    batch = torch.from_numpy(np.stack(patches).astype(np.float32) / 255)[:, None]
    return batch.to(device)


def passes_per_round(device: torch.device) -> int:
    """How many passes the engine runs at once on ``device``: one per torch thread on a
    CPU (each on one thread), one on a GPU (queued on its stream)."""
    return torch.get_num_threads() if device.type == "cpu" else 1


def model_times(engine: Engine, image: np.ndarray, repeats: int) -> list[float]:
    """Seconds per forward pass alone, on patches of the same volume, at steady state: per
    round of as many passes as the engine runs at once, its wall time over its passes."""
    batch = _model_batch(image, engine.patch, engine.batch_size, engine.device)
    if engine.channels_last:  # as the engine feeds it
        batch = batch.contiguous(memory_format=torch.channels_last_3d)
    at_once = passes_per_round(engine.device)
    times = []
    for i in range(WARMUP_ROUNDS + repeats):
        sync(engine.device)
        start = time.perf_counter()
        for _ in engine.passes(range(at_once), lambda _: batch):
            pass
        sync(engine.device)
        if i >= WARMUP_ROUNDS:
            times.append((time.perf_counter() - start) / at_once)
    return times


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a GPU runs asynchronously: without this a timer
    would stop at the launch, not the end)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
