"""Combinators: `one_of` (exactly one alternative, or nothing) and `compose` (in order)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from ...geometry import Zyx, zyx
from ...recipe.augment import Compose, OneOf
from ...registry import augmentations
from .base import Augmentation, Context, Pipeline, Step, identity


@augmentations.implement("one_of")
class OneOfAugmentation(Augmentation):
    """Picks one alternative by `probs` (default equal); the rest of the probability is
    'nothing'. The chosen alternative then applies with its own `p`."""

    def __init__(self, spec: OneOf) -> None:
        super().__init__(spec)
        self.alternatives = [augmentations.build(a) for a in spec.of]
        probs = spec.probs or [1.0 / len(spec.of)] * len(spec.of)
        self.probs = np.asarray([*probs, max(0.0, 1.0 - sum(probs))], dtype=np.float64)
        self.probs /= self.probs.sum()

    def largest_input(self, out_shape: Zyx, context: Context) -> Zyx:
        shapes = [a.largest_input(out_shape, context) for a in self.alternatives]
        return zyx(max(s[a] for s in [out_shape, *shapes]) for a in range(3))

    def plan(self, rng: np.random.Generator, out_shape: Zyx, context: Context) -> Step:
        choice = int(rng.choice(len(self.probs), p=self.probs))
        if choice == len(self.alternatives):
            return identity(self.name, out_shape)
        # the part carries the shape it must return, as Pipeline.prepare's steps do: without
        # it a chosen alternative's wrong-sized output passed check_output unnamed
        step = replace(self.alternatives[choice].prepare(rng, out_shape, context),
                       out_shape=out_shape)
        return Step(self.name, step.in_shape, step.apply, (step,))


@augmentations.implement("compose")
class ComposeAugmentation(Augmentation):
    """Several augmentations in order, applied together with probability `p`."""

    def __init__(self, spec: Compose) -> None:
        super().__init__(spec)
        self.inner = Pipeline(spec.of)

    def largest_input(self, out_shape: Zyx, context: Context) -> Zyx:
        return self.inner.largest_input(out_shape, context)

    def plan(self, rng: np.random.Generator, out_shape: Zyx, context: Context) -> Step:
        steps, in_shape = self.inner.prepare(rng, out_shape, context)

        def apply(sample: Any) -> Any:
            return Pipeline.apply(steps, sample)

        return Step(self.name, in_shape, apply, tuple(steps))
