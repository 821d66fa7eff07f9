"""The inference engine: blockwise, blended predictions into zarr, resumable.

For each block (a whole number of output chunks) the engine reads the input its lattice
patches need, once, padded by reflection about the volume's own borders (so padding does not
depend on the block), predicts the patches in batches, accumulates ``window x prediction``
and the window on the device in float32, divides, and writes the block's chunks. A block is
done when an explicit marker for it exists under ``OUT.zarr/.emrun-done/<layout hash>/``;
``resume`` skips those blocks. Nothing but the block's write region travels to the host.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from torch import nn

from .. import __version__
from ..data.sources import default_intensity
from ..errors import UserError
from ..io import Volume, open_volume
from ..io.write import create_volume
from ..recipe import Recipe
from ..recipe.data import VolumeSource
from ..recipe.tasks import AffinityTarget
from ..registry import blends, models
from ..train.checkpoint import load
from .plan import Layout, Zyx, choose_chunks_and_block

DONE = ".emrun-done"
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "sigmoid": torch.sigmoid, "tanh": torch.tanh, "none": lambda t: t}


def reflect_index(index: np.ndarray, n: int) -> np.ndarray:
    """Indices mirrored into [0, n) about the volume's borders (numpy's 'reflect' mode)."""
    if n == 1:
        return np.zeros_like(index)
    period = 2 * n - 2
    folded = np.abs(index) % period
    return np.where(folded >= n, period - folded, folded)


def read_reflected(volume: Volume, start: Zyx, stop: Zyx) -> np.ndarray:
    """The input over [start, stop), reflected about the volume's borders where outside."""
    shape = volume.shape[-3:]
    index = [reflect_index(np.arange(a, b), n) for a, b, n in zip(start, stop, shape, strict=True)]
    low = [int(i.min()) for i in index]
    high = [int(i.max()) + 1 for i in index]
    data = volume.read(tuple(slice(a, b) for a, b in zip(low, high, strict=True)))
    return data[np.ix_(*(i - lo for i, lo in zip(index, low, strict=True)))]


def intensity_range(recipe: Recipe, volume: Volume) -> tuple[float, float]:
    """The training sources' intensity scale when they give one, else the dtype's."""
    for source in recipe.data.sources.values():
        if isinstance(source, VolumeSource) and source.intensity is not None:
            return source.intensity.low, source.intensity.high
    return default_intensity(volume.dtype)


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for piece in iter(lambda: handle.read(1 << 20), b""):
            digest.update(piece)
    return digest.hexdigest()


def load_model(recipe: Recipe, checkpoint: Path, device: torch.device) -> nn.Module:
    """The recipe's model with the checkpoint's weights, in eval mode on ``device``."""
    state = load(checkpoint)
    model = models.build(recipe.model, head_channels=recipe.head_channels())
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise UserError(f"{checkpoint}: its weights do not match the recipe's model and tasks "
                        f"({first})") from None
    return model.to(device).eval()


@dataclass
class Progress:
    """Counts for the progress display."""

    done: int = 0
    skipped: int = 0
    total: int = 0
    voxels: int = 0
    seconds: float = 0.0


class Engine:
    """Predicts blocks of a volume with one model on one device."""

    def __init__(self, recipe: Recipe, model: nn.Module, device: torch.device, *,
                 batch_size: int | None = None, precision: str | None = None,
                 tta: int | None = None) -> None:
        self.recipe = recipe
        self.model = model
        self.device = device
        self.patch: Zyx = recipe.infer_patch()
        self.stride: Zyx = recipe.infer.resolved_stride(self.patch)
        self.batch_size = batch_size or recipe.infer.batch_size
        precision = precision or recipe.infer.precision
        self.autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        if device.type == "cpu" and self.autocast is torch.float16:
            self.autocast = torch.bfloat16
        self.tasks = {name: task for name, task in recipe.tasks.items()}
        window = blends.build(recipe.infer.blend, patch=self.patch)
        self.window = torch.from_numpy(window).to(device)
        self.tta = tta or recipe.infer.tta
        self.variants: list[Any] = []
        if self.tta > 1:
            from .tta import check_offsets, variants

            if self.tta >= 8 and self.patch[1] != self.patch[2]:
                raise UserError(f"tta {self.tta} transposes y and x, which needs a square patch "
                                f"in y/x (infer patch {list(self.patch)}); use tta 4 or less")
            self.variants = variants(self.tta, self.patch[1] == self.patch[2])
            for name, task in self.tasks.items():
                if isinstance(task.target, AffinityTarget):
                    try:
                        check_offsets(task.target.offsets, self.variants)
                    except ValueError as exc:
                        raise UserError(f"tasks.{name}: {exc}") from None

    def _forward(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """Activated predictions for a batch (b, 1, z, y, x), TTA-reduced when enabled."""
        with torch.no_grad(), torch.autocast(self.device.type, dtype=self.autocast,
                                             enabled=self.autocast is not None):
            if not self.variants:
                raw = self.model(batch)
                return {n: ACTIVATIONS[t.activation](raw[n].float())
                        for n, t in self.tasks.items()}
            from .tta import reduce

            stacks: dict[str, list[torch.Tensor]] = {n: [] for n in self.tasks}
            for variant in self.variants:
                raw = self.model(variant.apply(batch))
                for name, task in self.tasks.items():
                    out = ACTIVATIONS[task.activation](raw[name].float())
                    if isinstance(task.target, AffinityTarget):
                        out = variant.invert_affinity(out, task.target.offsets)
                    else:
                        out = variant.invert(out)
                    stacks[name].append(out)
            how = self.recipe.infer.tta_reduce
            return {n: reduce(torch.stack(s), how.get(n, "mean")) for n, s in stacks.items()}

    def predict_block(self, volume: Volume, layout: Layout, block: Zyx,
                      scale: tuple[float, float]) -> dict[str, np.ndarray] | None:
        """The blended prediction of the block's write region (float32, (c, z, y, x) per
        task), or None when its input is entirely zero (nothing to predict)."""
        read_start, read_stop = layout.read_box(block)
        raw = read_reflected(volume, read_start, read_stop)
        if not raw.any():
            return None
        low, high = scale
        image = torch.from_numpy(np.ascontiguousarray(raw, dtype=np.float32))
        image = ((image - low) / (high - low)).clamp_(0, 1).to(self.device)
        size = tuple(b - a for a, b in zip(read_start, read_stop, strict=True))
        acc = {n: torch.zeros((self._channels(n), *size), device=self.device) for n in self.tasks}
        weight = torch.zeros(size, device=self.device)
        patches = layout.patches(block)
        for first in range(0, len(patches), self.batch_size):
            group = patches[first:first + self.batch_size]
            slices = [tuple(slice(p[a] - read_start[a], p[a] - read_start[a] + self.patch[a])
                            for a in range(3)) for p in group]
            batch = torch.stack([image[s] for s in slices])[:, None]
            outputs = self._forward(batch)
            for i, s in enumerate(slices):
                for name, out in outputs.items():
                    pred = out[i]
                    valid = torch.isfinite(pred)
                    acc[name][(slice(None), *s)] += torch.where(valid, pred, 0) * self.window
                weight[s] += self.window
        start, stop = layout.write_box(block)
        core = tuple(slice(a - r, b - r) for a, b, r in zip(start, stop, read_start, strict=True))
        total = weight[core]
        return {n: (acc[n][(slice(None), *core)] / total).cpu().numpy() for n in self.tasks}

    def _channels(self, name: str) -> int:
        return self.recipe.head_channels()[name]


def quantise(values: np.ndarray, dtype: str) -> np.ndarray:
    """uint8 stores round(255 p) of p clipped to [0, 1]; float types store values as is."""
    if dtype == "uint8":
        return np.rint(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8)
    return values.astype(dtype)


def run_inference(recipe: Recipe, checkpoint: Path, input_path: str, output: Path, *,
                  block: Zyx | None = None, device: str | None = None, tta: int | None = None,
                  resume: bool = False, mask_path: str | None = None,
                  on_block: Callable[[Progress], None] | None = None) -> Progress:
    """Predict ``input_path`` into ``output`` (one array per task); returns the counts."""
    volume = open_volume(input_path)
    if len(volume.shape) != 3:
        raise UserError(f"{volume}: inference needs a 3D (z, y, x) volume, got shape "
                        f"{list(volume.shape)}")
    if volume.dtype.kind not in "uif":
        raise UserError(f"{volume}: dtype {volume.dtype} is not a numeric image")
    _refuse_same(volume, output)
    mask = open_volume(mask_path) if mask_path else None
    if mask is not None and tuple(mask.shape) != tuple(volume.shape):
        raise UserError(f"{mask}: mask shape {list(mask.shape)} differs from the input's "
                        f"{list(volume.shape)}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_model(recipe, checkpoint, dev)
    engine = Engine(recipe, model, dev, tta=tta)
    shape: Zyx = tuple(volume.shape)  # type: ignore[assignment]
    chunks, block = choose_chunks_and_block(shape, engine.patch, engine.stride,
                                            recipe.infer.chunks, block or recipe.infer.block)
    layout = Layout(shape, engine.patch, engine.stride, chunks, block)
    arrays = _open_outputs(recipe, layout, volume, output, checkpoint, input_path, resume)
    done_dir = output / DONE / layout.digest()
    done_dir.mkdir(parents=True, exist_ok=True)
    scale = intensity_range(recipe, volume)
    progress = Progress(total=len(layout.block_grid()))
    started = time.perf_counter()
    for index in layout.block_grid():
        marker = done_dir / "_".join(str(i) for i in index)
        if marker.exists():
            progress.skipped += 1
            continue
        start, stop = layout.write_box(index)
        region = tuple(slice(a, b) for a, b in zip(start, stop, strict=True))
        skip = mask is not None and not mask.read(region).any()
        predictions = None if skip else engine.predict_block(volume, layout, index, scale)
        for name, array in arrays.items():
            if predictions is None:
                values = np.zeros((array.shape[0], *(b - a for a, b in zip(start, stop,
                                                                              strict=True))),
                                  dtype=array.dtype)
            else:
                values = quantise(predictions[name], recipe.infer.dtype)
            array[(slice(None), *region)] = values
        marker.touch()
        progress.done += 1
        progress.voxels += math.prod(b - a for a, b in zip(start, stop, strict=True))
        progress.seconds = time.perf_counter() - started
        if on_block is not None:
            on_block(progress)
    return progress


def _refuse_same(volume: Volume, output: Path) -> None:
    if Path(volume.path).resolve() == output.resolve():
        raise UserError(f"--output {output} is the input's own container; write elsewhere")
    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output} is a file; give a new .zarr folder")


def _open_outputs(recipe: Recipe, layout: Layout, volume: Volume, output: Path,
                  checkpoint: Path, input_path: str, resume: bool) -> dict[str, zarr.Array]:
    """Create (or, with resume, reopen and check) one output array per task."""
    info = {"layout": layout.digest(), "patch": list(layout.patch),
            "stride": list(layout.stride), "block": list(layout.block),
            "chunks": list(layout.chunks)}
    arrays: dict[str, zarr.Array] = {}
    existing = output.exists() and any(output.iterdir())
    if existing and not resume:
        raise UserError(f"{output} already exists; use --resume to finish it, or another "
                        "--output (nothing was overwritten)")
    for name, task in recipe.tasks.items():
        channels = task.channels()
        if existing:
            try:
                array = zarr.open_array(str(output / name / "0"), mode="r+")
            except Exception as exc:
                raise UserError(f"{output}: cannot resume, no array for task {name!r} "
                                f"({type(exc).__name__})") from None
            saved = dict(zarr.open_group(str(output / name), mode="r").attrs).get("emrun", {})
            if saved.get("layout") != layout.digest():
                raise UserError(f"{output} was written with another block layout "
                                f"({saved.get('layout')} vs {layout.digest()}: patch, stride, "
                                "block or chunks differ); resume with the same settings or "
                                "write a new output")
            arrays[name] = array
            continue
        attrs: dict[str, Any] = {"emrun": {**info, "task": name}}
        if isinstance(task.target, AffinityTarget):
            attrs["offsets"] = [list(o) for o in task.target.offsets]
        arrays[name] = create_volume(output, name, (channels, *layout.shape),
                                     recipe.infer.dtype, chunks=(channels, *layout.chunks),
                                     voxel_size=volume.voxel_size, channel_axis=True,
                                     attrs=attrs)
    if not existing:
        group = zarr.open_group(str(output), mode="r+")
        group.attrs["emrun"] = {
            "version": __version__, "recipe": recipe.resolved(),
            "checkpoint": str(checkpoint), "checkpoint_sha256": file_digest(checkpoint),
            "input": input_path, "input_shape": list(volume.shape), **info}
    return arrays
