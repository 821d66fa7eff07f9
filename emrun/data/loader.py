"""Batches for the trainer: an endless training stream and a finite validation pass.

A batch holds the image (b, 1, z, y, x) as float16 and, per task, the target and mask
bit-packed along x (see ``samples.pack``); ``unpack(batch, device)`` gives float32
(b, c, z, y, x) tensors on the device.

Training batches come from worker processes (spawn-safe: a worker receives the recipe and
opens its sources itself). Batch k is made whole by one worker from the random stream
(seed, rank, k), and the DataLoader returns batches in worker order, so the stream is the
same for any number of workers and a resumed run starts at batch ``start``.
"""

from __future__ import annotations

import functools
import gc
import itertools
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..errors import UserError
from ..geometry import Roi, Zyx, zyx
from ..io import forks_safely
from ..io.masks import inside
from ..recipe import Recipe
from ..registry import targets
from ..subprocesses import leave_signals_to
from .sampler import read_crop
from .samples import SampleMaker, checked_target, pack, stack
from .sources import Source, open_sources
from .targets import Patch


def to_tensors(batch: Any) -> Any:
    """Nested dicts of numpy arrays to the same of torch tensors (no copy)."""
    if isinstance(batch, dict):
        return {k: to_tensors(v) for k, v in batch.items()}
    return torch.from_numpy(np.ascontiguousarray(batch))


def unpack(batch: dict[str, Any], device: torch.device | str = "cpu") -> dict[str, Any]:
    """A loader batch on ``device``: image, and per task target and mask as float32
    (b, c, z, y, x); the bit-packed (uint8) targets and masks are expanded on the device,
    float16 targets cast."""
    device = torch.device(device)
    x = int(batch["x"].reshape(-1)[0])  # the unpacked width (one per sample once stacked)
    shifts = torch.arange(8, device=device, dtype=torch.uint8)

    def expand(bits: torch.Tensor) -> torch.Tensor:
        bits = bits.to(device, non_blocking=True)
        if bits.is_floating_point():
            return bits.to(torch.float32)
        full = (bits.unsqueeze(-1) >> shifts) & 1
        return full.flatten(-2)[..., :x].to(torch.float32)

    return {
        "image": batch["image"].to(device, non_blocking=True).to(torch.float32),
        "target": {k: expand(v) for k, v in batch["target"].items()},
        "mask": {k: expand(v) for k, v in batch["mask"].items()},
    }


class TrainBatches(IterableDataset):  # type: ignore[type-arg]
    """Endless training batches; each worker makes every W-th batch index."""

    def __init__(self, recipe: Recipe, rank: int = 0, start: int = 0) -> None:
        super().__init__()
        self.recipe, self.rank, self.start = recipe, rank, start

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        if info is not None:  # one core per worker: numpy's BLAS would start one thread per
            threadpool_limits(1)  # core in each (LSD targets use matrix products)
        try:
            # only a worker keeps freed sample memory: in the trainer (workers 0) it stayed
            # in the process that also holds the model's tensors
            maker = SampleMaker(self.recipe, keep_memory=info is not None)
            for index in itertools.count(self.start + worker, workers):
                yield maker.batch(self.recipe.seed, self.rank, index)
        except UserError as exc:
            if info is None:
                raise
            # torch re-raises a worker's error as its type built from "Caught ... Original
            # Traceback ...": the user would read a traceback, line by line, as errors
            yield {USER_ERROR: str(exc)}


USER_ERROR = "emrun-user-error"
"""The key of what a loader worker hands over instead of a batch: a UserError's message."""


def train_batches(recipe: Recipe, *, rank: int = 0, start: int = 0,
                  workers: int | None = None, pin_memory: bool | None = None,
                  context: str | None = None) -> Iterator[dict[str, Any]]:
    """The endless training stream from batch ``start`` on (``train.workers`` processes)."""
    workers = recipe.train.workers if workers is None else workers
    if workers and context is None and not all(
            forks_safely(path) for source in recipe.data.sources.values()
            for path in source.volume_paths()):
        context = "spawn"  # tensorstore, which reads these, aborts in a forked process
    pin = torch.cuda.is_available() if pin_memory is None else pin_memory
    loader = DataLoader(
        TrainBatches(recipe, rank, start),
        batch_size=None,
        num_workers=workers,
        pin_memory=pin,
        prefetch_factor=2 if workers else None,
        persistent_workers=workers > 0,
        multiprocessing_context=context if workers else None,
        collate_fn=_as_is,
        # a signal to the process group is the trainer's to handle (checkpoint, then exit)
        worker_init_fn=functools.partial(leave_signals_to, os.getpid()) if workers else None,
    )
    return _stream(loader, forks=workers > 0 and context is None)


def _stream(loader: DataLoader, forks: bool = False) -> Iterator[dict[str, Any]]:
    """The loader's batches as tensors; closing the stream (the trainer does, however it
    ends) stops the worker processes now, not whenever the iterator is collected: an error
    kept with its traceback would otherwise keep them alive.

    Garbage is collected before ``forks`` workers start (the default context): a worker that
    frees an object of a threaded library, left uncollected in a reference cycle, waits
    for that library's threads, which were not forked with it, for ever (a training run
    in a process that had checked an ONNX export hung in its first batch: onnxruntime's
    session)."""
    if forks:
        gc.collect()
    batches = iter(loader)
    try:
        for batch in batches:
            if USER_ERROR in batch:
                raise UserError(batch[USER_ERROR])
            yield to_tensors(batch)
    finally:
        shutdown = getattr(batches, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def _as_is(batch: Any) -> Any:
    """Keep numpy arrays: they travel pickled through a pipe, cheaper here than fresh
    shared memory per tensor; tensors are made in the receiving process."""
    return batch


def _axis_starts(offset: int, size: int, patch: int) -> list[int]:
    """Patch starts on one axis: every ``patch`` voxels, the last moved back to end at the
    box end."""
    if size <= patch:
        return [offset]
    starts = list(range(offset, offset + size - patch + 1, patch))
    if starts[-1] != offset + size - patch:
        starts.append(offset + size - patch)
    return starts


def tile_corners(box: Roi, patch: tuple[int, ...]) -> list[Zyx]:
    """Corners of patches covering the box; the last patch per axis ends at the box end."""
    axes = [_axis_starts(o, b, p) for o, b, p in zip(box.offset, box.shape, patch, strict=True)]
    return [zyx(c) for c in itertools.product(*axes)]


def tile_owned(box: Roi, patch: tuple[int, ...]) -> dict[Zyx, Zyx]:
    """Per corner of `tile_corners`, where the voxels its patch scores begin, per axis: the
    last patch on an axis, moved back to end at the box end, overlaps the one before, whose
    voxels it does not score again (a validation loss counted the shared ones twice)."""
    owned = []
    for o, b, p in zip(box.offset, box.shape, patch, strict=True):
        starts = _axis_starts(o, b, p)
        owned.append({o: o} | {s: max(s, prev + p) for prev, s in itertools.pairwise(starts)})
    return {corner: zyx(axis[c] for axis, c in zip(owned, corner, strict=True))
            for corner in tile_corners(box, patch)}


def _validation_sample(source: Source, corner: Zyx, patch: Zyx, recipe: Recipe,
                       built: dict[str, Any], owned_from: Zyx | None = None) -> dict[str, Any]:
    """One unaugmented patch; where the box is smaller than the patch, pad and mask out;
    voxels before ``owned_from`` (scored by an earlier patch: `tile_owned`) are masked out.
    The targets are made on the crop and padded after: made on padded labels, the pad
    was an object (label 0) beside the crop's last voxels, whose boundary and distance
    targets then counted a boundary that is not there."""
    size = zyx(min(p, b) for p, b in zip(patch, source.box.shape, strict=True))
    crop = read_crop(source, Roi(corner, size))
    pad = [(0, p - s) for p, s in zip(patch, size, strict=True)]
    image = source.normalise(crop.image, crop.mask)
    valid = np.ones(size, np.uint8) if crop.mask is None else inside(crop.mask).astype(np.uint8)
    out: dict[str, Any] = {"image": image[None], "target": {}, "mask": {}}
    patch_view = Patch(crop.labels, valid, dict(crop.semantic), source.voxel_size)
    for name, target in built.items():
        task = recipe.tasks[name]
        out["target"][name], out["mask"][name] = checked_target(
            name, task.target.type, task.channels(), tuple(size), target(patch_view))
    if owned_from is not None and owned_from != corner:
        scored = _inside_from(size, zyx(f - c for f, c in zip(owned_from, corner, strict=True)))
        out["mask"] = {name: mask * scored for name, mask in out["mask"].items()}
    if any(after for _, after in pad):
        out["image"] = np.pad(image, pad, mode="reflect" if min(size) > 1 else "edge")[None]
        for part in ("target", "mask"):  # the pad: no target, masked out
            out[part] = {name: np.pad(array, [(0, 0), *pad])
                         for name, array in out[part].items()}
    return out


def _inside_from(size: Zyx, start: Zyx) -> np.ndarray:
    """A uint8 of ``size``: 1 at the voxels at or past ``start`` on every axis."""
    scored = np.zeros(size, np.uint8)
    scored[tuple(slice(s, None) for s in start)] = 1
    return scored


def unusable_validation_sources(recipe: Recipe) -> list[tuple[str, str]]:
    """(name, why) for each validation source whose targets cannot be made from its first
    patch (one without labels): found before training, where the first validation would
    stop the run validate_every iterations on, before that iteration's checkpoint."""
    patch = recipe.train.patch
    built = {name: targets.build(task.target) for name, task in recipe.tasks.items()}
    found = []
    for source in open_sources(recipe.data.validation):
        try:
            _validation_sample(source, tile_corners(source.box, patch)[0], patch, recipe, built)
        except UserError as exc:
            why = "it has no `labels`, which its validation losses need" \
                if source.labels is None else str(exc)
            found.append((source.name, f"{why}; fix it or remove it from data.validation"))
    return found


def validation_batches(recipe: Recipe) -> Iterator[dict[str, Any]]:
    """Every validation source tiled by train.patch, no augmentation, in a fixed order."""
    patch = recipe.train.patch
    built = {name: targets.build(task.target) for name, task in recipe.tasks.items()}
    batch: list[dict[str, Any]] = []
    for source in open_sources(recipe.data.validation):
        for corner, owned_from in tile_owned(source.box, patch).items():
            batch.append(_validation_sample(source, corner, patch, recipe, built, owned_from))
            if len(batch) == recipe.train.batch_size:
                yield to_tensors(stack([pack(b) for b in batch]))
                batch = []
    if batch:
        yield to_tensors(stack([pack(b) for b in batch]))
