"""`emrun bench infer`: the engine's end-to-end output voxels/s against the model alone.

The model-only rate is forward passes on the same patch size, batch and precision, with the
input already on the device. The engine has to predict every voxel ``overlap`` times (patch
voxels x patches / output voxels), so its efficiency is
``engine_voxels_per_s * overlap / model_voxels_per_s`` (1.0: no time lost to reading,
blending, padding, quantising or writing).
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ..infer.engine import Engine, run_inference
from ..infer.plan import Layout, choose_chunks_and_block
from ..io.write import write_volume
from ..recipe import Recipe
from ..registry import models
from ..synth import synthesize


def _model_rate(engine: Engine, repeats: int) -> float:
    batch = torch.rand((engine.batch_size, 1, *engine.patch), device=engine.device)
    engine._forward(batch)  # warm-up
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)
    start = time.perf_counter()
    for _ in range(repeats):
        engine._forward(batch)
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)
    elapsed = time.perf_counter() - start
    return repeats * engine.batch_size * math.prod(engine.patch) / elapsed


def bench_infer(recipe: Recipe, *, shape: tuple[int, int, int] | None = None,
                device: str | None = None, repeats: int = 5) -> dict[str, Any]:
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
    model_rate = _model_rate(engine, repeats)
    with tempfile.TemporaryDirectory(prefix="emrun-bench-infer-") as tmp:
        root = Path(tmp)
        write_volume(root / "in.zarr", "image", synthesize(shape, 0).image)
        torch.save({"model": model.state_dict(), "iteration": 0}, root / "model.pt")
        progress = run_inference(recipe, root / "model.pt", str(root / "in.zarr/image"),
                                 root / "out.zarr", device=str(dev))
    engine_rate = progress.voxels / progress.seconds
    return {
        "recipe": recipe.name,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "precision": recipe.infer.precision,
        "patch": list(patch), "stride": list(engine.stride), "batch_size": engine.batch_size,
        "volume": list(shape), "block": list(block), "tta": recipe.infer.tta,
        "overlap": round(overlap, 3),
        "engine_voxels_per_s": round(engine_rate, 1),
        "model_voxels_per_s": round(model_rate, 1),
        "efficiency": round(engine_rate * overlap / model_rate, 4),
        "monai": "not installed (comparison skipped)",
    }
