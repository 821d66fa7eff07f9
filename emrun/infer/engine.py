"""The inference engine: blended predictions of one block on one device.

For each block (a whole number of output chunks) the engine reads the input its lattice
patches need, once, padded by reflection about the volume's own borders (so padding does not
depend on the block), predicts the patches in batches, accumulates ``window x prediction``
and the window on the device in float32 and divides. Only the block's write region travels
back to the host, quantised on the device. Scheduling, IO overlap and done-markers live in
``worker`` and ``job``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data.sources import default_intensity
from ..errors import UserError
from ..io import Volume
from ..recipe import Recipe
from ..recipe.data import VolumeSource
from ..recipe.tasks import AffinityTarget
from ..registry import blends, models
from ..train.checkpoint import load
from .plan import Layout, Zyx

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


class Engine:
    """Predicts blocks of a volume with one model on one device."""

    def __init__(self, recipe: Recipe, model: nn.Module, device: torch.device, *,
                 batch_size: int | None = None, precision: str | None = None,
                 tta: int | None = None, compile: bool | None = None) -> None:
        self.recipe = recipe
        self.device = device
        self.patch: Zyx = recipe.infer_patch()
        self.stride: Zyx = recipe.infer.resolved_stride(self.patch)
        self.batch_size = batch_size or recipe.infer.batch_size
        precision = precision or recipe.infer.precision
        self.autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        if device.type == "cpu" and self.autocast is torch.float16:
            self.autocast = torch.bfloat16
        self.tasks = {name: task for name, task in recipe.tasks.items()}
        self.channels_last = device.type == "cuda" and recipe.infer.channels_last
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last_3d)
        compile = recipe.infer.compile if compile is None else compile
        self.model = torch.compile(model) if compile else model
        window = blends.build(recipe.infer.blend, patch=self.patch)
        self.window = torch.from_numpy(window).to(device)
        self.predicted_patches = 0  # forward passes of lattice patches (padding excluded)
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

    def read_input(self, volume: Volume, layout: Layout, block: Zyx,
                   origin: Zyx = (0, 0, 0)) -> np.ndarray | None:
        """The raw input the block's patches need (host memory, the volume's dtype), or None
        when it is entirely zero (nothing to predict). ``origin``: where the layout's
        (0, 0, 0) lies in ``volume`` (a ROI). Runs in reader threads."""
        read_start, read_stop = layout.read_box(block)
        raw = read_reflected(volume, _add(read_start, origin), _add(read_stop, origin))
        return raw if raw.any() else None

    def predict(self, raw: np.ndarray, layout: Layout, block: Zyx,
                scale: tuple[float, float]) -> dict[str, torch.Tensor]:
        """The blended prediction of the block's write region, on the device (float32,
        (c, z, y, x) per task), from the input ``read_input`` returned."""
        read_start, read_stop = layout.read_box(block)
        low, high = scale
        image = torch.from_numpy(np.ascontiguousarray(raw)).to(self.device).float()
        image = ((image - low) / (high - low)).clamp_(0, 1)
        size = tuple(b - a for a, b in zip(read_start, read_stop, strict=True))
        acc = {n: torch.zeros((self._channels(n), *size), device=self.device) for n in self.tasks}
        weight = torch.zeros(size, device=self.device)
        patches = layout.patches(block)
        for first in range(0, len(patches), self.batch_size):
            group = patches[first:first + self.batch_size]
            slices = [tuple(slice(p[a] - read_start[a], p[a] - read_start[a] + self.patch[a])
                            for a in range(3)) for p in group]
            batch = torch.stack([image[s] for s in slices])[:, None]
            if self.channels_last:
                batch = batch.contiguous(memory_format=torch.channels_last_3d)
            outputs = self._forward(batch)
            self.predicted_patches += len(group)
            for i, s in enumerate(slices):
                for name, out in outputs.items():
                    finite = torch.nan_to_num(out[i], nan=0.0, posinf=0.0, neginf=0.0)
                    acc[name][(slice(None), *s)].addcmul_(finite, self.window)
                weight[s] += self.window
        start, stop = layout.write_box(block)
        core = tuple(slice(a - r, b - r) for a, b, r in zip(start, stop, read_start, strict=True))
        total = weight[core]
        return {n: acc[n][(slice(None), *core)] / total for n in self.tasks}

    def predict_block(self, volume: Volume, layout: Layout, block: Zyx,
                      scale: tuple[float, float]) -> dict[str, np.ndarray] | None:
        """``read_input`` then ``predict``, on the host (float32), or None for an empty input."""
        raw = self.read_input(volume, layout, block)
        if raw is None:
            return None
        return {n: t.cpu().numpy() for n, t in self.predict(raw, layout, block, scale).items()}

    def _channels(self, name: str) -> int:
        return self.recipe.head_channels()[name]


def _add(a: Zyx, b: Zyx) -> Zyx:
    return (a[0] + b[0], a[1] + b[1], a[2] + b[2])


def quantise(values: torch.Tensor, dtype: str) -> np.ndarray:
    """On the device, then to the host: uint8 stores round(255 p) of p clipped to [0, 1]
    (a quarter of the bytes travel); float types store values as is."""
    if dtype == "uint8":
        values = torch.round(values.clamp(0.0, 1.0) * 255.0).to(torch.uint8)
    else:
        values = values.to(getattr(torch, dtype))
    return values.cpu().numpy()
