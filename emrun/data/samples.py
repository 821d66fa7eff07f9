"""One training sample, start to end: draw augmentation parameters, read the enlarged crop,
normalise, augment, compute every task's target and mask. Batch k is a pure function of
(seed, rank, k), so the stream does not depend on the number of workers and a resumed run
continues it exactly by starting at the next batch index."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from ..errors import UserError
from ..recipe import Recipe
from ..registry import targets
from .augment import Augmentation, Context, Pipeline, Sample
from .lsd import _half_bits
from .memory import keep_freed_memory
from .sampler import PatchSampler
from .sources import Source, mixture_weights, open_sources
from .targets import Patch, semantic_needs


def batch_rng(seed: int, rank: int, index: int) -> np.random.Generator:
    """The random stream of batch ``index`` on ``rank``. numpy splits a seed of 2**32 or
    more into two 32-bit words and pads short keys with zeros, so seed 2**32's (rank 0,
    batch 0) was seed 0's (rank 1, batch 0): such a seed's key ends in a 1, which no key of
    a smaller seed (3 words, zero-padded) does; smaller seeds keep their streams."""
    if seed < 2**32:
        return np.random.default_rng([seed, rank, index])
    return np.random.default_rng([seed, rank, index, 1])


class SampleMaker:
    """Makes training samples for a recipe; build it inside the process that uses it.

    ``keep_memory``: that process keeps the memory of one sample's arrays for the next
    (`keep_freed_memory`): right for a process that only makes samples (a loader worker, a
    benchmark of one), not for the trainer making its own (``workers: 0``), whose heap
    torch's tensors share: it kept up to 256 MB freed between steps, for no speed that a
    step's network time leaves measurable."""

    def __init__(self, recipe: Recipe, sources: list[Source] | None = None, *,
                 keep_memory: bool = True) -> None:
        if keep_memory:
            keep_freed_memory()
        self.recipe = recipe
        self.patch = recipe.train.patch
        self.sources = sources if sources is not None else open_sources(recipe.data.sources)
        self.sampler = PatchSampler(self.sources, mixture_weights(self.sources))
        self.pipeline = Pipeline(recipe.augment)
        self.targets = {name: targets.build(task.target) for name, task in recipe.tasks.items()}
        self.channels = recipe.head_channels()
        self.semantic = semantic_read(self.pipeline, self.targets.values())
        self.timings: dict[str, float] | None = None  # seconds per stage, when measuring
        self.last_labels: np.ndarray | None = None  # the last sample's augmented labels

    def sample(self, rng: np.random.Generator) -> dict[str, Any]:
        """One sample: image (1, z, y, x) and per task target and mask (c, z, y, x)."""
        clock = time.perf_counter()
        source = self.sampler.pick(rng)
        steps, in_shape = self.pipeline.prepare(rng, self.patch, Context(source.voxel_size))
        crop = self.sampler.draw(rng, in_shape, self.patch, source, self.semantic)
        sample = Sample(source.normalise(crop.image, crop.mask), crop.labels, crop.mask,
                        crop.semantic)
        self._tick("sample", clock)
        sample = Pipeline.apply(steps, sample, self.timings)
        if sample.shape != self.patch:
            raise RuntimeError(f"augmentations produced {sample.shape}, not {self.patch}")
        clock = time.perf_counter()
        self.last_labels = sample.labels
        patch = Patch(sample.labels, sample.mask, sample.semantic, source.voxel_size)
        out: dict[str, Any] = {"image": sample.image[None].astype(np.float32, copy=False),
                               "target": {}, "mask": {}}
        for name, target in self.targets.items():
            started = time.perf_counter()
            out["target"][name], out["mask"][name] = checked_target(
                name, self.recipe.tasks[name].target.type, self.channels[name], self.patch,
                target(patch))
            self._tick(f"target:{name}", started)
        self._tick("targets", clock)
        return out

    def batch(self, seed: int, rank: int, index: int) -> dict[str, Any]:
        """Batch ``index``: ``train.batch_size`` samples stacked and packed (see `pack`)."""
        rng = batch_rng(seed, rank, index)
        # pack each sample first: stacking then copies 8x fewer target bytes
        return stack([pack(self.sample(rng)) for _ in range(self.recipe.train.batch_size)])

    def _tick(self, stage: str, since: float) -> None:
        if self.timings is not None:
            self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - since


def semantic_read(pipeline: Pipeline, made: Iterable[object]) -> frozenset[str] | None:
    """The semantic volumes a sample needs read: those its targets use, when every target
    and augmentation is a built-in one (another may use any: None, all of them). Others
    would be read, flipped and warped for nothing (a synthetic source's `mito` and `synapse`
    under an affinity recipe: half the geometric augmentations' work)."""
    package = Augmentation.__module__.rpartition(".")[0]
    if not all(type(a).__module__.startswith(package + ".")
               for a in _every_augmentation(pipeline.augmentations)):
        return None
    needs = [semantic_needs(target) for target in made]
    if any(need is None for need in needs):
        return None
    return frozenset().union(*needs)  # type: ignore[arg-type]


def _every_augmentation(augmentations: Iterable[Augmentation]) -> Iterator[Augmentation]:
    """The augmentations of a stack, combinators' members included."""
    for augmentation in augmentations:
        yield augmentation
        yield from _every_augmentation(getattr(augmentation, "alternatives", ()))
        inner = getattr(augmentation, "inner", None)
        if inner is not None:
            yield from _every_augmentation(inner.augmentations)


def checked_target(task: str, kind: str, channels: int, patch: tuple[int, ...],
                   made: Any) -> tuple[np.ndarray, np.ndarray]:
    """A target's (target, mask), refused naming the task unless the target is (channels,
    *patch) and the mask that or one channel for all (lsd's): a target (a plugin's) that
    disagrees with its spec's channels() would otherwise fail deep in the trainer's loss as
    an internal error."""
    want = (channels, *patch)
    if not (isinstance(made, tuple) and len(made) == 2 and
            all(isinstance(a, np.ndarray) for a in made)):
        raise UserError(f"task {task!r}: target {kind!r} returned {type(made).__name__}, not "
                        f"(target, mask) arrays of shape {want}")
    target, mask = made
    for what, array, shapes in (("target", target, [want]),
                                ("mask", mask, [want, (1, *patch)])):
        if array.shape not in shapes:
            raise UserError(f"task {task!r}: target {kind!r} made a {what} of shape "
                            f"{array.shape}, not {want} ({channels} channels, as its spec's "
                            f"channels() says, of the patch {tuple(patch)})")
    return target, mask


def pack(batch: dict[str, Any]) -> dict[str, Any]:
    """Shrink a batch for its trip from a loader worker to the trainer.

    Handing a tensor to another process costs about its size in fresh shared memory (here
    ~2 ms per MB), and 0/1 targets and masks are most of a sample's bytes (12 affinity
    channels of a 20x256x256 patch: 31 MB as uint8). So targets and masks are packed 8
    voxels per byte along x and the image travels as float16 (its values are in [0, 1]:
    error below 2.5e-4), as do the targets that are not 0/1 (float: lsd, distance, in
    [-1, 1]). ``emrun.data.loader.unpack`` restores float32, on the device; it tells the two
    kinds apart by dtype (uint8 bits, float16 values).
    """
    packed = {k: {name: _pack(v) for name, v in batch[k].items()} for k in ("target", "mask")}
    return {"image": half(batch["image"]), **packed,
            "x": np.asarray(batch["image"].shape[-1], dtype=np.int64)}  # per sample or batch


def _pack(values: np.ndarray) -> np.ndarray:
    """0/1 uint8 (or bool) as bits along x; anything else as float16."""
    if values.dtype in (np.uint8, np.bool_):
        return np.packbits(values, axis=-1, bitorder="little")
    return half(values)


def half(values: np.ndarray) -> np.ndarray:
    """``values.astype(float16)``, the same bits (round to nearest even), eight times as
    fast for float32 in [0, 1] (an image: numpy converts one value at a time here, 3.2 ms
    for 20x256x256 values, against 0.4 ms and 0.2 ms to check the range). Anything else
    by numpy: float64 through float32 would be rounded twice."""
    if values.dtype == np.float16:
        return values
    if values.dtype == np.float32 and values.size and values.min() >= 0 and values.max() <= 1:
        return _half_bits(values).view(np.float16)  # (NaN fails the range check)
    return values.astype(np.float16)


def stack(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack sample dicts (nested dicts of arrays) along a new batch axis."""
    first = samples[0]
    if isinstance(first, dict):
        return {k: stack([s[k] for s in samples]) for k in first}
    if len(samples) == 1:  # batch_size 1: a batch axis on the sample, not a copy of it
        return np.asarray(first)[None]
    return np.stack(samples)
