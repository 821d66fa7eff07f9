"""The augmentation check on long chains (work that grows with the number of steps, not
faster, and the same verdicts as walking every possibility) and a twisted warp's smallest
read (a twist turns the end sections beyond ``rot_max``)."""

from __future__ import annotations

import random
from typing import Any, Literal

import numpy as np
import pytest
from pydantic import TypeAdapter

import emrun.data.augment  # noqa: F401  (registers the implementations)
import emrun.recipe.augment as recipe_augment
from emrun.data.augment import Pipeline, Sample
from emrun.recipe.augment import (
    UNSTATED,
    AugmentBase,
    Compose,
    FlipRotate,
    OneOf,
    Warp,
    augment_problems,
    smallest_shapes,
)
from emrun.recipe.recipe import AugmentSpec

SPECS = TypeAdapter(list[AugmentSpec])


def specs(*items: dict) -> list:
    return SPECS.validate_python(list(items))


# ------------------------------------------------------------------------- long chains


ZOOM_OUT = {"type": "warp", "rot_max": 30, "shear_max": 0.5, "scale": [0.8, 0.9]}
ISO = {"type": "flip_rotate", "isotropic": True}


def alternating(n: int) -> list[dict]:
    return [ZOOM_OUT if i % 2 == 0 else ISO for i in range(n)]


def count_reads(monkeypatch: pytest.MonkeyPatch, budget: int) -> list[int]:
    """Count the calls of the warp's and the flip's ``input_shapes``; fail past ``budget``
    (the walk that carried every shape made tens of thousands of them for 30 steps)."""
    calls = [0]
    for kind in (Warp, FlipRotate):
        original = kind.input_shapes

        def counted(self: Any, out: Any, voxel: Any, original: Any = original) -> Any:
            calls[0] += 1
            assert calls[0] <= budget, f"more than {budget} reads asked for"
            return original(self, out, voxel)

        monkeypatch.setattr(kind, "input_shapes", counted)
    return calls


@pytest.mark.parametrize("n", [24, 32])
def test_a_long_chain_of_warps_and_isotropic_flips_takes_work_linear_in_its_steps(
        monkeypatch, n):
    """16 alternating warp/flip steps took about 12 s: every shape a step may have to
    produce was carried on, their number grew with each step, and each step compared
    every pair. Shapes that pass every check still to come are now dropped. The
    misalignment first is fine (15 px on sides of at least 16); the missing sections last
    are not (20 of the patch's 16)."""
    stack = specs({"type": "misalign", "displacement": [3, 15]}, *alternating(n),
                  {"type": "missing_section", "max_sections": 20})
    calls = count_reads(monkeypatch, budget=20 * n)
    [(path, msg)] = augment_problems(stack, (16, 64, 64))
    assert path == (n + 1,) and "max_sections 20 exceeds the patch's 16 sections" in msg
    assert 0 < calls[0] <= 20 * n


def test_a_long_chain_with_a_check_first_judges_it_on_the_shapes_the_chain_reads():
    """The steps are still walked where a check to come needs them: zooming in (scale 2)
    fourteen times reads less and less (4096 px to 8): a 10 px displacement first is
    refused; after nine times (13 px) it is not."""
    zoom_in = {"type": "warp", "rot_max": 0, "shear_max": 0, "scale": [2, 2],
               "stretch_max": 0}
    chain = [zoom_in if i % 2 == 0 else {"type": "flip_rotate"} for i in range(28)]
    first = {"type": "misalign", "displacement": [0, 10]}
    [(path, msg)] = augment_problems(specs(first, *chain), (4, 4096, 4096))
    assert path == (0,) and "displacement up to 10 px" in msg and "(8x8 in y, x)" in msg
    assert augment_problems(specs(first, *chain[:18]), (4, 4096, 4096)) == []


# -------------------------------------------- same verdicts: unpruned walk, brute force


def random_step(r: random.Random, nested: bool = False) -> dict:
    kinds = ["warp", "flip", "iso", "misalign", "lost", "section", "gray"]
    kind = r.choice(kinds if nested else [*kinds, "misalign_missing", "one_of", "compose"])
    step: dict[str, Any] = {"p": r.choice([1.0, 1.0, 0.5, 0.0])}
    if kind == "warp":
        step |= {"type": "warp", "rot_max": r.choice([0, 10, 45, 90]),
                 "shear_max": r.choice([0, 0.2, 0.6]),
                 "scale": r.choice([[0.7, 0.9], [1, 1], [1.2, 2.0]]),
                 "twist_max": r.choice([0, 40, 180])}
    elif kind in ("flip", "iso"):
        step |= {"type": "flip_rotate", "isotropic": kind == "iso"}
    elif kind == "misalign":
        step |= {"type": "misalign", "displacement": [r.randint(0, 5), r.randint(5, 40)]}
    elif kind == "misalign_missing":
        step |= {"type": "misalign_missing", "displacement": [2, r.randint(5, 30)],
                 "voxel_reference": 8.0}
    elif kind == "lost":
        step |= {"type": "lost_section"}
    elif kind == "section":
        step |= {"type": "missing_section", "max_sections": r.randint(1, 12)}
    elif kind == "gray":
        step |= {"type": "grayscale"}
    else:
        step |= {"type": kind, "of": [random_step(r, True) for _ in range(r.randint(1, 3))]}
    return step


def random_cases(seed: int, count: int, longest: int) -> list[tuple[list, tuple, Any]]:
    r = random.Random(seed)
    return [(specs(*(random_step(r) for _ in range(r.randint(1, longest)))),
             (r.randint(1, 24), r.randint(1, 100), r.randint(1, 100)),
             r.choice([None, (40.0, 4.0, 4.0), UNSTATED])) for _ in range(count)]


def test_dropping_the_shapes_that_pass_every_check_to_come_changes_no_problem(monkeypatch):
    """The same problems, messages (the shape named) included, as the walk that carries
    every shape, on random chains of every built-in step, nested ones too."""
    cases = random_cases(seed=1, count=150, longest=7)
    pruned = [augment_problems(*case) for case in cases]
    monkeypatch.setattr(recipe_augment, "need_through", lambda spec, need, voxel: None)
    assert [augment_problems(*case) for case in cases] == pruned
    assert sum(bool(p) for p in pruned) > 30  # both verdicts were met


def brute_chain(specs: list, outs: set, voxel: Any, path: tuple, refused: set) -> set:
    """Every shape each step may have to produce, no shape dropped."""
    for i in reversed(range(len(specs))):
        outs = brute_step(specs[i], outs, voxel, (*path, i), refused)
    return outs


def brute_step(spec: Any, outs: set, voxel: Any, path: tuple, refused: set) -> set:
    if spec.p == 0:
        return outs
    skipped = set(outs) if spec.p < 1 else set()
    if isinstance(spec, OneOf):
        probs = spec.probs or [1.0] * len(spec.of)
        reads = set(outs) if spec.probs is not None and sum(spec.probs) < 1 else set()
        for j, (alternative, prob) in enumerate(zip(spec.of, probs, strict=True)):
            if prob > 0:
                reads |= brute_step(alternative, outs, voxel, (*path, "of", j), refused)
        return skipped | reads
    if isinstance(spec, Compose):
        return skipped | brute_chain(spec.of, outs, voxel, (*path, "of"), refused)
    judged = spec.judged_at(voxel)
    if any(spec.shape_problems(shape, judged) for shape in outs):
        refused.add(path)
    return skipped | {read for shape in outs for read in spec.input_shapes(shape, judged)}


def test_the_refused_steps_are_those_a_walk_over_every_possibility_refuses():
    for stack, patch, voxel in random_cases(seed=2, count=120, longest=4):
        refused: set = set()
        brute_chain(stack, {patch}, voxel, (), refused)
        found = {path for path, _ in augment_problems(stack, patch, voxel)}
        assert found == refused, ([s.model_dump() for s in stack], patch, voxel)


def test_smallest_shapes_keeps_exactly_the_shapes_no_other_is_below():
    r = random.Random(3)
    for _ in range(200):
        shapes = [tuple(r.randint(1, 6) for _ in range(3)) for _ in range(r.randint(0, 40))]
        distinct = list(dict.fromkeys(shapes))
        expected = [s for s in distinct if not any(
            o != s and all(a <= b for a, b in zip(o, s, strict=True)) for o in distinct)]
        assert smallest_shapes(shapes) == expected


# ----------------------------------------------------------------------- warp twist


TWISTED = Warp(rot_max=0, shear_max=0, scale=(1, 1), stretch_max=0, twist_max=180)


class NeedsX(AugmentBase):
    """A plugin's step that cannot produce fewer than ``least`` pixels in x."""

    type: Literal["needs_x"] = "needs_x"
    least: int = 1

    def shape_problems(self, shape: Any, voxel_size: Any) -> list[str]:
        return [f"needs {self.least} px in x (got {shape[2]})"] if shape[2] < self.least else []


def planned_reads(spec: AugmentBase, patch: tuple, draws: int, seed: int = 0) -> list:
    """The reads the pipeline plans for ``patch``, each applied to synthetic data."""
    rng = np.random.default_rng(seed)
    pipeline = Pipeline([spec])
    reads = []
    for _ in range(draws):
        steps, shape = pipeline.prepare(rng, patch)
        sample = Sample(rng.random(shape, dtype=np.float32),
                        rng.integers(1, 9, shape).astype(np.uint64), None, {})
        assert Pipeline.apply(steps, sample).shape == patch
        reads.append(shape)
    return reads


def test_a_twisted_warp_may_read_its_patch_turned_by_90_degrees():
    """Twisted by 180 degrees, two sections are turned by -90 and +90: a (9, 41) patch
    reads about 41 x 11, not the 11 x 43 an untwisted draw reads. The step before the warp
    must produce that: one needing 20 px in x was accepted (43 >= 20) and met reads of 12
    in training; the check now refuses it, and a step needing 11 passes (every read has at
    least 11 in x)."""
    patch = (2, 9, 41)
    assert (2, 43, 11) in TWISTED.input_shapes(patch, None)
    for least, refused in [(20, True), (12, True), (11, False)]:
        found = augment_problems([NeedsX(least=least), TWISTED], patch)
        assert bool(found) == refused, (least, found)
        if refused:
            assert found[0][0] == (0,) and "(got 11)" in found[0][1]
    reads = planned_reads(TWISTED, patch, draws=300)
    assert min(x for _, _, x in reads) >= 11  # the read always fits what passed
    assert any(x < 20 for _, _, x in reads)  # and the refusal of 20 is real
    largest = Pipeline([TWISTED]).largest_input(patch)  # what a source must hold: no twist
    assert all(a <= b for read in reads for a, b in zip(read, largest, strict=True))


def test_one_section_is_not_twisted():
    untwisted = Warp(rot_max=0, shear_max=0, scale=(1, 1), stretch_max=0)
    assert TWISTED.input_shapes((1, 9, 41), None) == untwisted.input_shapes((1, 9, 41), None)
    assert {x for _, _, x in planned_reads(TWISTED, (1, 9, 41), draws=20)} == {43}


@pytest.mark.parametrize(("rot_max", "shear_max", "twist_max", "patch"), [
    (0, 0.0, 180, (2, 9, 41)),
    (10, 0.2, 60, (3, 20, 64)),
    (45, 0.5, 30, (7, 33, 12)),
    (20, 0.0, 90, (2, 16, 48)),
])
def test_the_smallest_read_is_never_above_a_planned_one(rot_max, shear_max, twist_max, patch):
    spec = Warp(rot_max=rot_max, shear_max=shear_max, scale=(0.9, 1.1), stretch_max=0.1,
                twist_max=twist_max)
    listed = spec.input_shapes(patch, None)
    reads = planned_reads(spec, patch, draws=120, seed=rot_max)
    for axis in (1, 2):
        assert min(s[axis] for s in listed) <= min(r[axis] for r in reads), (axis, listed)
