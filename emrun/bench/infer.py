"""`emrun bench infer`: the engine's end-to-end output voxels/s against the model alone.

The model-only rate is forward passes on the same patch size, batch and precision, with the
input already on the device. The engine is `emrun infer`'s block worker (reads ahead, writes
behind) timed from the first block to the last written, model loading excluded; its seconds
per stage tell whether the device or the IO bounds it. The engine has to predict every voxel
``overlap`` times (patch voxels x patches / output voxels), so its efficiency is
``engine_voxels_per_s * overlap / model_voxels_per_s`` (1.0: no time lost to reading,
blending, padding, quantising or writing).
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..infer.engine import Engine
from ..infer.job import prepare_job
from ..infer.plan import Layout, choose_chunks_and_block
from ..infer.worker import BlockWorker
from ..io.write import write_volume
from ..recipe import Recipe
from ..registry import models
from ..synth import synthesize

TILE = (64, 512, 512)
"""Largest synthetic block generated; bigger volumes repeat it, mirrored (generation costs
seconds per 10 M voxels, and the bench is about the engine, not the data)."""


def synthetic_image(shape: tuple[int, int, int]) -> np.ndarray:
    """A synthetic EM-like volume of ``shape``: one generated block of at most ``TILE``,
    mirrored at its faces to fill the rest (no seams of constant value)."""
    tile = tuple(min(n, t) for n, t in zip(shape, TILE, strict=True))
    image = synthesize(tile, 0).image
    if tile == shape:
        return image
    pad = [(0, n - t) for n, t in zip(shape, tile, strict=True)]
    return np.pad(image, pad, mode="symmetric")


def _model_times(engine: Engine, image: np.ndarray, repeats: int) -> list[float]:
    """Seconds per forward pass alone, on patches of the same volume, at steady state (after
    a few warm-up passes for kernel selection and caches)."""
    pz, py, px = engine.patch
    rows = [image[:pz, :py, x:x + px] for x in range(0, image.shape[2] - px + 1, px)]
    patches = [rows[i % len(rows)] for i in range(engine.batch_size)]
    batch = torch.from_numpy(np.stack(patches).astype(np.float32) / 255)[:, None]
    batch = batch.to(engine.device)
    for _ in range(3):
        engine._forward(batch)
    times = []
    for _ in range(repeats):
        if engine.device.type == "cuda":
            torch.cuda.synchronize(engine.device)
        start = time.perf_counter()
        engine._forward(batch)
        if engine.device.type == "cuda":
            torch.cuda.synchronize(engine.device)
        times.append(time.perf_counter() - start)
    return times


def _monai_rate(engine: Engine, image: np.ndarray) -> float | None:
    """MONAI's sliding-window output voxels/s on the same volume, or None without MONAI."""
    try:
        from monai.inferers import sliding_window_inference
    except ImportError:
        return None
    overlap = [1 - s / p for s, p in zip(engine.stride, engine.patch, strict=True)]
    volume = torch.from_numpy(image.astype(np.float32) / 255)[None, None].to(engine.device)

    def predictor(batch: torch.Tensor) -> torch.Tensor:
        return torch.cat(list(engine._forward(batch).values()), dim=1)

    def run() -> None:
        sliding_window_inference(volume, engine.patch, engine.batch_size, predictor,
                                 overlap=overlap, mode="gaussian", sw_device=engine.device,
                                 device=engine.device)

    run()  # warm-up
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)
    start = time.perf_counter()
    run()
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)
    return image.size / (time.perf_counter() - start)


def bench_infer(recipe: Recipe, *, shape: tuple[int, int, int] | None = None,
                device: str | None = None, repeats: int = 15) -> dict[str, Any]:
    """The figures `emrun bench infer` reports."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    patch = recipe.infer_patch()
    shape = shape or (patch[0] * 3, patch[1] * 3, patch[2] * 3)
    torch.manual_seed(recipe.seed)
    model = models.build(recipe.model, head_channels=recipe.head_channels()).to(dev).eval()
    engine = Engine(recipe, model, dev)
    chunks, block = choose_chunks_and_block(shape, engine.patch, engine.stride,
                                            recipe.infer.chunks, recipe.infer.block)
    layout = Layout(shape, engine.patch, engine.stride, chunks, block)
    patches = math.prod(len(layout.starts(a)) for a in range(3))
    overlap = patches * math.prod(patch) / math.prod(shape)
    with tempfile.TemporaryDirectory(prefix="emrun-bench-infer-") as tmp:
        root = Path(tmp)
        image = synthetic_image(shape)
        times = _model_times(engine, image, repeats)  # before the engine and after it:
        write_volume(root / "in.zarr", "image", image)
        torch.save({"model": model.state_dict(), "iteration": 0}, root / "model.pt")
        job = prepare_job(recipe, root / "model.pt", str(root / "in.zarr/image"),
                          root / "out.zarr")
        worker = BlockWorker(job, dev)  # `emrun infer`'s worker; loading the model not timed
        blocks = job.pending()
        started = time.perf_counter()
        worker.run(blocks)
        seconds = time.perf_counter() - started
        times += _model_times(engine, image, repeats)  # a drifting machine biases neither
    engine_rate = math.prod(shape) / seconds
    model_rate = engine.batch_size * math.prod(patch) / statistics.median(times)
    monai_rate = _monai_rate(engine, image)
    return {
        "recipe": recipe.name,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "precision": recipe.infer.precision,
        "patch": list(patch), "stride": list(engine.stride), "batch_size": engine.batch_size,
        "volume": list(shape), "block": list(block), "blocks": len(blocks),
        "tta": recipe.infer.tta,
        "overlap": round(overlap, 3),
        "engine_voxels_per_s": round(engine_rate, 1),
        "model_voxels_per_s": round(model_rate, 1),
        "efficiency": round(engine_rate * overlap / model_rate, 4),
        "engine_seconds": round(seconds, 3),
        "stage_seconds": {k: round(v, 3) for k, v in worker.seconds.items()},
        "monai_voxels_per_s": None if monai_rate is None else round(monai_rate, 1),
        "engine_vs_monai": None if monai_rate is None else round(engine_rate / monai_rate, 3),
    }
