"""The pipeline's parts every augmentation shares: a sample, the context it is drawn in, a
prepared step, the `Augmentation` interface and the `Pipeline` that runs the steps."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from ...errors import UserError
from ...geometry import Zyx, zyx
from ...recipe.augment import AugmentBase
from ...registry import augmentations


@dataclass(frozen=True)
class Sample:
    """One training sample inside the pipeline (no channel axis)."""

    image: np.ndarray  # float32 in [0, 1], (z, y, x)
    labels: np.ndarray | None  # integer ids
    mask: np.ndarray | None  # non-zero = valid
    semantic: dict[str, np.ndarray]

    @property
    def shape(self) -> Zyx:
        return zyx(self.image.shape)

    def map_geometric(self, image: Callable[[np.ndarray], np.ndarray],
                      other: Callable[[np.ndarray], np.ndarray]) -> Sample:
        """Apply ``image`` to the image and ``other`` to labels, mask and semantic volumes."""
        return replace(
            self,
            image=image(self.image),
            labels=None if self.labels is None else other(self.labels),
            mask=None if self.mask is None else other(self.mask),
            semantic={k: other(v) for k, v in self.semantic.items()},
        )


@dataclass(frozen=True)
class Context:
    """What an augmentation may know when it draws parameters for one sample."""

    voxel_size: tuple[float, float, float] | None = None  # nm, z, y, x, of the chosen source


@dataclass(frozen=True)
class Step:
    """An augmentation with its random parameters drawn for one sample; a combinator's step
    lists the steps it runs in ``parts`` (so each is timed under its own name)."""

    name: str
    in_shape: Zyx
    apply: Callable[[Sample], Sample]
    parts: tuple[Step, ...] = ()
    out_shape: Zyx | None = None  # set by Pipeline.prepare: what apply must return


def identity(name: str, shape: Zyx) -> Step:
    return Step(name, shape, lambda sample: sample)


class Augmentation(ABC):
    """A configured augmentation; ``plan`` draws parameters for one sample."""

    def __init__(self, spec: AugmentBase) -> None:
        self.spec = spec
        self.name = spec.type  # type: ignore[attr-defined]

    def prepare(self, rng: np.random.Generator, out_shape: Zyx, context: Context) -> Step:
        """Skip with probability 1 - p; otherwise draw the parameters."""
        if rng.random() >= self.spec.p:
            return identity(self.name, out_shape)
        return self.plan(rng, out_shape, context)

    def largest_input(self, out_shape: Zyx, context: Context) -> Zyx:
        """An upper bound of ``in_shape`` over every possible draw (checked against the
        sources before training). Default: the output shape (photometric)."""
        return out_shape

    @abstractmethod
    def plan(self, rng: np.random.Generator, out_shape: Zyx, context: Context) -> Step:
        """Draw every random parameter now (bulk randomness: draw a seed here and make a
        ``np.random.default_rng(seed)`` in ``apply``); the Step must turn a sample of
        ``in_shape`` into one of exactly ``out_shape``."""


class Pipeline:
    """An ordered list of augmentations."""

    def __init__(self, specs: Sequence[AugmentBase]) -> None:
        self.augmentations: list[Augmentation] = [augmentations.build(s) for s in specs]

    def prepare(self, rng: np.random.Generator, out_shape: Zyx,
                context: Context | None = None) -> tuple[list[Step], Zyx]:
        """Steps in forward order and the input shape the first one needs."""
        context = context or Context()
        steps: list[Step] = []
        shape = out_shape
        for aug in reversed(self.augmentations):
            step = replace(aug.prepare(rng, shape, context), out_shape=shape)
            steps.append(step)
            shape = step.in_shape
        steps.reverse()
        return steps, shape

    def largest_input(self, out_shape: Zyx, context: Context | None = None) -> Zyx:
        """The largest crop any sample may need read for ``out_shape``."""
        shape = out_shape
        for aug in reversed(self.augmentations):
            shape = aug.largest_input(shape, context or Context())
        return shape

    @staticmethod
    def apply(steps: list[Step], sample: Sample,
              timings: dict[str, float] | None = None) -> Sample:
        """Run the steps forward; add each one's seconds to ``timings`` when given."""
        for step in steps:
            if step.parts:
                sample = Pipeline.apply(list(step.parts), sample, timings)
                continue
            start = time.perf_counter()
            sample = step.apply(sample)
            check_output(step, sample)
            if timings is not None:
                timings[step.name] = timings.get(step.name, 0.0) + time.perf_counter() - start
        return sample


def check_output(step: Step, sample: object) -> None:
    """A step (a plugin's, say) must return a Sample whose image is float32 of the shape it
    was planned for, with labels, mask and semantic volumes of that shape too: anything
    else would train on misaligned or rescaled data, or fail later naming no augmentation."""
    if not isinstance(sample, Sample):
        raise UserError(f"augmentation {step.name!r} returned a {type(sample).__name__}, not "
                        "a Sample")
    want = step.out_shape if step.out_shape is not None else sample.shape
    image = sample.image
    if not isinstance(image, np.ndarray) or image.dtype != np.float32 or \
            tuple(image.shape) != tuple(want):
        what = (f"{tuple(image.shape)} {image.dtype}" if isinstance(image, np.ndarray)
                else type(image).__name__)
        raise UserError(f"augmentation {step.name!r} returned an image of {what}, not "
                        f"{tuple(want)} float32 (values in [0, 1])")
    others = {"labels": sample.labels, "mask": sample.mask,
              **{f"semantic {k!r}": v for k, v in sample.semantic.items()}}
    for what, array in others.items():
        if array is not None and tuple(np.shape(array)) != tuple(want):
            raise UserError(f"augmentation {step.name!r} returned {what} of "
                            f"{tuple(np.shape(array))}, not the image's {tuple(want)}")
