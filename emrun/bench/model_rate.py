"""The model-only rate `emrun bench infer` compares the engine with, and searches
configurations on: seconds per forward pass of an engine's model on a batch of patches
already on the device, at steady state (so neither data movement nor warm-up counts)."""

from __future__ import annotations

import time

import numpy as np
import torch

from ..geometry import Zyx
from ..infer.engine import Engine


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


def model_times(engine: Engine, image: np.ndarray, repeats: int) -> list[float]:
    """Seconds per forward pass alone, on patches of the same volume, at steady state (after
    a few warm-up passes for kernel selection, caches and compilation)."""
    batch = _model_batch(image, engine.patch, engine.batch_size, engine.device)
    if engine.channels_last:  # as the engine feeds it
        batch = batch.contiguous(memory_format=torch.channels_last_3d)
    for _ in range(3):
        engine._forward(batch)
    times = []
    for _ in range(repeats):
        sync(engine.device)
        start = time.perf_counter()
        engine._forward(batch)
        sync(engine.device)
        times.append(time.perf_counter() - start)
    return times


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a GPU runs asynchronously: without this a timer
    would stop at the launch, not the end)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
