"""Recipe edges: the augmentation check after a box or a plugin's step (fast, same verdicts
as before), and a round of recipes as a new user writes them wrong, each of which must give
one located message and exit 2."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest
from pydantic import TypeAdapter
from typer.testing import CliRunner, Result

import emrun.data.augment  # noqa: F401  (registers the implementations)
import emrun.recipe.augment as recipe_augment
from emrun.cli import app
from emrun.recipe import shape_sets
from emrun.recipe.augment import (
    UNSTATED,
    AugmentBase,
    Warp,
    augment_problems,
    smallest_shapes,
)
from emrun.recipe.recipe import AugmentSpec

SPECS = TypeAdapter(list[AugmentSpec])


def specs(*items: dict) -> list:
    return SPECS.validate_python(list(items))


class NeedsX(AugmentBase):
    """A plugin's step that cannot produce fewer than ``least`` pixels in x."""

    type: Literal["needs_x"] = "needs_x"
    least: int = 1

    def shape_problems(self, shape: Any, voxel_size: Any) -> list[str]:
        return [f"needs {self.least} px in x (got {shape[2]})"] if shape[2] < self.least else []


ZOOM = {"type": "warp", "rot_max": 30, "shear_max": 0.5, "scale": [0.8, 0.9]}
ISO = {"type": "flip_rotate", "isotropic": True}
TWIST = {"type": "warp", "rot_max": 10, "twist_max": 60, "scale": [0.9, 1.0]}
SMALL_BOXES = {"type": "box", "density": 0.99, "size": [1, 2], "z_size": [1, 1]}


def chain(n: int, a: dict = ZOOM, b: dict = ISO) -> list[dict]:
    return [a if i % 2 == 0 else b for i in range(n)]


# ------------------------------------------- the augmentation check after a box or plugin

PINNED: list[tuple[str, list, tuple[int, int, int], list]] = [
    ("box_then_12", specs({"type": "box"}, *chain(12)), (16, 64, 64), []),
    ("small_box_then_12", specs(SMALL_BOXES, *chain(12)), (16, 64, 64), [(
        (0,), "box: density 0.99 with boxes of [1, 1] x [1, 2] voxels needs about 2,021,408 "
        "boxes on a patch of [174, 82, 68], more than 2,000,000; use larger boxes or a lower "
        "density; the steps after it make it produce [174, 82, 68] (z, y, x) for train.patch "
        "[16, 64, 64]")]),
    ("small_box_then_twists", specs(SMALL_BOXES, *chain(12, TWIST, ISO)), (6, 40, 40), []),
    ("plugin_then_12", [NeedsX(least=5000), *specs(*chain(12))], (16, 64, 64), [(
        (0,), "needs 5000 px in x (got 146); the steps after it make it produce [16, 146, 146] "
        "(z, y, x) for train.patch [16, 64, 64]")]),
    ("plugin_then_lost_sections", [NeedsX(least=900), *specs(*chain(12, ZOOM,
                                                                   {"type": "lost_section"}))],
     (8, 64, 64), [((0,), "needs 900 px in x (got 146); the steps after it make it produce "
                    "[14, 146, 146] (z, y, x) for train.patch [8, 64, 64]")]),
    ("half_box_then_zoom_in", specs({**SMALL_BOXES, "p": 0.5},
                                    *chain(12, {"type": "warp", "scale": [1.5, 2.0], "p": 0.5},
                                           ISO)), (30, 300, 300), []),
]
"""Stacks whose check walks hundreds to thousands of shapes, with what the check before
the array walk found for them (computed then, messages included)."""


@pytest.mark.parametrize("array_from", [1, recipe_augment.ARRAY_FROM])
@pytest.mark.parametrize(("name", "stack", "patch", "expected"), PINNED,
                         ids=[p[0] for p in PINNED])
def test_a_long_chain_after_a_box_or_a_plugin_finds_what_it_found_before(
        monkeypatch, name, stack, patch, expected, array_from):
    """A box or a plugin's step first leaves no bound to drop shapes by: the set the
    geometric steps after it carry grew to 14,000 shapes at 32 steps, walked one tuple at a
    time (about 1.2 s of CPU here, 5 s on a busy machine). The built-in steps that check
    nothing now walk it as arrays; the problems, messages included, are the same (re-taken
    when warp reads took the output's parity, both walks agreeing)."""
    monkeypatch.setattr(recipe_augment, "ARRAY_FROM", array_from)
    assert augment_problems(stack, patch) == expected


def test_the_walk_after_a_box_no_longer_works_shape_by_shape(monkeypatch):
    """32 steps after a box: the tuple walk called `warp_input_yx` about 600,000 times (up
    to 14,000 shapes a warp, 40 draws each); the array walk only for the first few small
    sets."""
    calls = [0]
    original = recipe_augment.warp_input_yx

    def counted(*args: Any) -> Any:
        calls[0] += 1
        return original(*args)

    monkeypatch.setattr(recipe_augment, "warp_input_yx", counted)
    recipe_augment._warp_smallest.cache_clear()
    assert augment_problems(specs({"type": "box"}, *chain(32)), (16, 64, 64)) == []
    assert 0 < calls[0] < 20_000


def random_step(r: random.Random, nested: bool = False) -> dict:
    kinds = ["zoom", "warp", "iso", "flip", "lost", "gray", "box", "misalign", "section"]
    kind = r.choice(kinds if nested else [*kinds, "one_of", "compose"])
    step: dict[str, Any] = {"p": r.choice([1.0, 1.0, 0.5, 0.0])}
    if kind == "zoom":
        step |= {**ZOOM, "twist_max": r.choice([0, 60])}
    elif kind == "warp":
        step |= {"type": "warp", "rot_max": r.choice([0, 45, 90]), "scale": r.choice(
            [[1, 1], [1.2, 2.0]]), "shear_max": r.choice([0, 0.6])}
    elif kind in ("iso", "flip"):
        step |= {"type": "flip_rotate", "isotropic": kind == "iso"}
    elif kind == "lost":
        step |= {"type": "lost_section"}
    elif kind == "gray":
        step |= {"type": "grayscale"}
    elif kind == "box":
        step |= {**SMALL_BOXES, "density": r.choice([0.3, 0.99])}
    elif kind == "misalign":
        step |= {"type": "misalign", "displacement": [r.randint(0, 5), r.randint(5, 60)]}
    elif kind == "section":
        step |= {"type": "missing_section", "max_sections": r.randint(1, 30)}
    else:
        step |= {"type": kind, "of": [random_step(r, True) for _ in range(r.randint(1, 2))]}
    return step


def test_the_array_walk_and_the_tuple_walk_find_the_same_problems(monkeypatch):
    """Random stacks, a box or a plugin's step first half the time, then mostly geometric
    steps: every shape set walked as an array (from 1 shape on) finds what the tuple walk
    finds, messages (the shape named) included."""
    r = random.Random(5)
    cases = []
    for _ in range(60):
        first = r.choice([[], specs(SMALL_BOXES), [NeedsX(least=r.choice([20, 200, 3000]))]])
        rest = [r.choice([ZOOM, ISO]) if r.random() < 0.6 else random_step(r)
                for _ in range(r.randint(1, 8))]
        patch = (r.randint(1, 20), r.randint(8, 80), r.randint(8, 80))
        cases.append(([*first, *specs(*rest)], patch, r.choice([None, (40.0, 4.0, 4.0),
                                                                 UNSTATED])))
    monkeypatch.setattr(recipe_augment, "ARRAY_FROM", 10 ** 9)
    walked = [augment_problems(*case) for case in cases]
    monkeypatch.setattr(recipe_augment, "ARRAY_FROM", 1)
    assert [augment_problems(*case) for case in cases] == walked
    assert sum(bool(found) for found in walked) > 10  # refusals were met too


class WideWarp(Warp):
    """A plugin's warp that reads twice the width the built-in one does."""

    def input_shapes(self, out_shape: Any, voxel_size: Any) -> list:
        return [(z, y, 2 * x) for z, y, x in super().input_shapes(out_shape, voxel_size)]


def test_a_plugins_subclass_of_a_built_in_step_keeps_its_own_reads(monkeypatch):
    """The array walk copies the built-in steps' `input_shapes`: a subclass that reads
    otherwise is walked by its own method, as the tuple walk does (the step before it must
    produce 20 px in x for a patch the isotropic flip turned on its side, where the built-in
    warp reads 10)."""
    wide = [NeedsX(least=100), WideWarp(**ZOOM), *specs(ISO, ZOOM)]
    plain = [NeedsX(least=100), *specs(ZOOM, ISO, ZOOM)]
    monkeypatch.setattr(recipe_augment, "ARRAY_FROM", 10 ** 9)
    walked = augment_problems(wide, (8, 40, 40))
    monkeypatch.setattr(recipe_augment, "ARRAY_FROM", 1)
    [(path, msg)] = augment_problems(wide, (8, 40, 40))
    assert [(path, msg)] == walked and "(got 20)" in msg and "[48, 66, 20]" in msg
    assert (48, 66, 10) in specs(ZOOM)[0].input_shapes((48, 48, 8), None)
    [(_, msg)] = augment_problems(plain, (8, 40, 40))
    assert "(got 56)" in msg


@pytest.mark.parametrize(("large", "longest"), [(False, 2048), (True, 2048), (False, 16)])
def test_smallest_array_keeps_what_smallest_shapes_keeps_in_its_order(monkeypatch, large,
                                                                      longest):
    """Distinct shapes no other is below, first seen first; across many chunks and pair
    batches (small tables forced), with sides too large for one sort key, and swept one
    by one where chunks would be too long."""
    monkeypatch.setattr(shape_sets, "TABLE_CELLS", 200)
    monkeypatch.setattr(shape_sets, "PAIR_CELLS", 3000)
    monkeypatch.setattr(shape_sets, "LONGEST_CHUNK", longest)
    monkeypatch.setattr(recipe_augment, "ARRAY_FROM", 10 ** 9)
    r = np.random.default_rng(7)
    for _ in range(40):
        n = int(r.integers(0, 400))
        shapes = r.integers(1, 12, size=(n, 3)) * (2 ** 30 if large else 1)
        listed = [tuple(s) for s in shapes.tolist()]
        found = shape_sets.as_list(shape_sets.smallest_array(shape_sets.as_array(listed)))
        assert found == smallest_shapes(listed)


def test_a_warp_reads_the_same_shapes_as_arrays_as_one_by_one():
    rng = np.random.default_rng(3)
    outs = rng.integers(1, 3000, size=(300, 3))
    outs[:, 0] = rng.integers(1, 9, size=300)
    for spec in specs(ZOOM, TWIST, {"type": "warp", "rot_max": 180, "shear_max": 1,
                                    "twist_max": 180}):
        arrays = shape_sets.as_list(spec.array_inputs(outs))
        assert arrays == [s for out in shape_sets.as_list(outs)
                          for s in spec.input_shapes(out, None)]


# ------------------------------------------------------- bad recipes as users write them


BASE = """name: base
data:
  sources:
    a: {type: synthetic, shape: [16, 64, 64], seed: 1}
model:
  type: rsunet
  widths: [8, 16, 32]
tasks:
  aff:
    target: {type: affinity}
train:
  patch: [8, 36, 36]
  iterations: 100
"""
SOURCE = "    a: {type: synthetic, shape: [16, 64, 64], seed: 1}\n"
TASK = "  aff:\n    target: {type: affinity}"


def edit(old: str, new: str, base: str = BASE) -> str:
    assert old in base, old
    return base.replace(old, new)


def anchored(source_b: str) -> str:
    return edit(SOURCE, "    a: &s {type: synthetic, shape: [16, 64, 64], seed: 1}\n" + source_b)


CASES: list[tuple[str, str, int, str]] = [
    # YAML anchors, aliases and merges
    ("merge_bad_value", anchored("    b: {<<: *s, shape: [0, 64, 64]}\n"), 5,
     "data.sources.b.shape.0: input should be greater than 0 (got 0)"),
    ("merge_typo", anchored("    b: {<<: *s, sead: 2}\n"), 5,
     "data.sources.b.sead: unknown key 'sead'; did you mean 'seed'?"),
    ("merge_in_block", edit(SOURCE, "    a: &s\n      type: synthetic\n    b:\n      <<: *s\n"
                                    "      shape: [16, -64, 64]\n"), 8,
     "data.sources.b.shape.1: input should be greater than 0 (got -64)"),
    ("merge_of_a_list_of_numbers", edit(SOURCE, SOURCE + "    b: {<<: [1, 2]}\n"), 5,
     "expected a mapping for merging"),
    ("merge_of_a_number", edit(SOURCE, SOURCE + "    b: {<<: 3, type: synthetic}\n"), 5,
     "expected a mapping or list of mappings for merging"),
    ("anchor_reused_with_a_bad_value",
     edit("  widths: [8, 16, 32]", "  widths: &w [8, -16, 32]") + "infer:\n  patch: *w\n", 7,
     "infer.patch.1: input should be greater than 0 (got -16)"),
    ("alias_before_its_anchor",
     edit("  widths: [8, 16, 32]", "  widths: *w") + "infer:\n  patch: &w [8, 36, 36]\n", 7,
     "found undefined alias 'w'"),
    ("alias_of_a_number_as_a_task", edit(TASK, "  aff: &x 3\n  b: *x"), 9,
     "tasks.b: should be a mapping of keys to values (got 3)"),
    ("anchor_in_an_unknown_section", BASE + "seg: &g {type: mws}\nsegment: *g\n", 14,
     "seg: unknown key 'seg'; did you mean 'segment'?"),
    # tabs, duplicate keys, odd characters
    ("tab_indents_a_nested_key", edit("    target: {type: affinity}",
                                      "\t\ttarget: {type: affinity}"), 10, "tab character"),
    ("space_then_tab", edit("  iterations: 100", " \titerations: 100"), 13, "tab character"),
    ("duplicate_section", BASE + "tasks:\n  b: {}\n", 14,
     "duplicate key 'tasks' (first defined on line 8)"),
    ("duplicate_key_in_flow", edit("seed: 1}", "seed: 1, seed: 2}"), 4,
     "data.sources.a.seed: duplicate key 'seed' (first defined on line 4)"),
    ("lookalike_cyrillic_key", edit("  iterations: 100", "  iter\u0430tions: 100"), 13,
     "did you mean 'iterations'?"),
    ("zero_width_space_in_key", edit("  iterations: 100", "  iterations\u200b: 100"), 13,
     "unknown key 'iterations\\u200b'; did you mean 'iterations'?"),
    ("fullwidth_colon", edit("  iterations: 100", "  iterations\uff1a 100"), 14,
     "could not find expected ':'"),
    ("byte_order_mark_then_bad_value", "\ufeff" + edit("iterations: 100", "iterations: lots"),
     13, "train.iterations: input should be a valid integer (got 'lots')"),
    ("unicode_name", edit("name: base", "name: r\u00e9seau"), 1, "must start with a letter"),
    ("emoji_name", edit("name: base", "name: \U0001f9e0"), 1, "must start with a letter"),
    ("number_as_key", BASE + "1: 2\n", 14, "read by YAML as the number 1"),
    ("yes_as_key", edit("  iterations: 100", "  iterations: 100\n  yes: 1"), 14,
     "read by YAML as true"),
    ("null_as_key", BASE + "~: 2\n", 14, "keys must be plain names"),
    ("python_tag", edit("name: base", "name: !!python/object:os.system x"), 1,
     "could not determine a constructor"),
    ("unclosed_brace", edit("{type: affinity}", "{type: affinity"), 11,
     "(the {...} mapping that starts on line 10)"),
    ("no_space_after_colon", edit("iterations: 100", "iterations:100"), 14,
     "could not find expected ':'"),
    ("old_mac_line_ends", BASE.replace("\n", "\r") + "bogus: 1\r", 14, "unknown key 'bogus'"),
    # the recipe is not a mapping
    ("recipe_is_a_list", "- " + BASE.replace("\n", "\n  "), 1, "not a list"),
    ("recipe_is_a_number", "42\n", 1, "a recipe must be a mapping of sections (name, data, "
     "model, tasks, train), not the number 42"),
    ("recipe_is_text", "just some text\n", 1, "not the text 'just some text'"),
    ("recipe_is_null", "~\n", 1, "not an empty value"),
    # wrong types and empty values
    ("date_as_name", edit("name: base", "name: 2024-01-01"), 1,
     "name: input should be a valid string (YAML reads 2024-01-01 as a date; put it in quotes"),
    ("empty_name", edit("name: base", "name:"), 1,
     "name: input should be a valid string (the value is empty)"),
    ("empty_patch_item", edit("patch: [8, 36, 36]", "patch: [8, ~, 36]"), 12,
     "train.patch.1: input should be a valid integer (the value is empty)"),
    ("patch_as_text", edit("patch: [8, 36, 36]", "patch: 8, 36, 36"), 12,
     "train.patch: should be a list of 3 values (z, y, x) (got '8, 36, 36')"),
    ("patch_as_mapping", edit("patch: [8, 36, 36]", "patch: {z: 8, y: 36, x: 36}"), 12,
     "train.patch: should be a list of 3 values"),
    ("patch_of_floats", edit("patch: [8, 36, 36]", "patch: [8.5, 36, 36]"), 12,
     "train.patch.0: input should be a valid integer (got 8.5)"),
    ("train_as_text", edit("train:\n  patch: [8, 36, 36]\n  iterations: 100\n", "train: fast\n"),
     11, "train: should be a mapping of keys to values (got 'fast')"),
    ("optimizer_as_name", edit("iterations: 100", "iterations: 100\n  optimizer: adamw"), 14,
     "write {type: adamw}"),
    ("source_left_empty", edit(SOURCE, "    a:\n"), 4, "data.sources.a: is empty"),
    ("sources_as_list", edit(SOURCE, "    - {type: synthetic}\n"), 3,
     "data.sources: should be a mapping"),
    ("augment_as_mapping", BASE + "augment: {type: noise}\n", 14,
     "augment: input should be a valid list"),
    ("augment_type_capitalised", BASE + "augment:\n  - {type: Warp}\n", 15,
     "did you mean 'warp'?"),
    ("augment_nested_typo", BASE + "augment:\n  - {type: compose, of: [{type: one_of, of: "
     "[{type: wrap}]}]}\n", 15, "augment.0.of.0.of.0.type: unknown augmentation type 'wrap'"),
    ("precision_yes", edit("iterations: 100", "iterations: 100\n  precision: yes"), 14,
     "train.precision: input should be 'fp32', 'bf16' or 'fp16' (got true)"),
    # huge, negative and zero numbers
    ("huge_float", edit("iterations: 100", "iterations: 1e400"), 13,
     "train.iterations: input should be a valid integer"),
    ("huge_integer", edit("iterations: 100", "iterations: 99999999999999999999999999999"), 13,
     "train.iterations: input should be less than or equal to 1000000000"),
    ("infinite_weight", edit("    target: {type: affinity}",
                             "    target: {type: affinity}\n    weight: 1e309"), 11,
     "tasks.aff.weight: input should be a finite number"),
    ("nan_weight", edit("    target: {type: affinity}",
                        "    target: {type: affinity}\n    weight: .nan"), 11,
     "tasks.aff.weight: input should be a finite number"),
    ("negative_source_size", edit("shape: [16, 64, 64]", "shape: [-16, 64, 64]"), 4,
     "data.sources.a.shape.0: input should be greater than 0 (got -16)"),
    ("zero_size_synthetic_source", edit("shape: [16, 64, 64]", "shape: [0, 64, 64]"), 4,
     "data.sources.a.shape.0: input should be greater than 0 (got 0)"),
    ("negative_width", edit("widths: [8, 16, 32]", "widths: [8, -16, 32]"), 7,
     "model.widths.1: input should be greater than 0 (got -16)"),
    ("negative_batch", BASE + "infer:\n  batch_size: -1\n", 15,
     "infer.batch_size: input should be greater than 0"),
    ("zero_stride", BASE + "infer:\n  stride: [0, 16, 16]\n", 15,
     "infer.stride.0: input should be greater than 0"),
    ("negative_overlap", BASE + "infer:\n  overlap: [-1, 0, 0]\n", 15,
     "overlap must be in [0, 1) per axis"),
    ("tiny_learning_rate", edit("iterations: 100", "iterations: 100\n  optimizer: "
                                "{type: adamw, lr: 1e-400}"), 14,
     "train.optimizer.lr: input should be greater than 0"),
    ("huge_offset", edit("{type: affinity}", "{type: affinity, offsets: [[0, 0, 1000000000000]]}"),
     10, "not smaller than train.patch [8, 36, 36] in x"),
    # empty lists and mappings
    ("empty_widths", edit("widths: [8, 16, 32]", "widths: []"), 7,
     "model.widths: is empty; it needs at least 1 item"),
    ("empty_patch", edit("patch: [8, 36, 36]", "patch: []"), 12,
     "train.patch: should be a list of 3 values (z, y, x), not 0"),
    ("empty_sources", edit("  sources:\n" + SOURCE, "  sources: {}\n"), 3,
     "data.sources: is empty; it needs at least 1 entry"),
    ("empty_offsets", edit("{type: affinity}", "{type: affinity, offsets: []}"), 10,
     "tasks.aff.target.offsets: is empty"),
    ("empty_box_modes", BASE + "augment:\n  - {type: box, modes: []}\n", 15,
     "augment.0.modes: is empty"),
    ("empty_compose", BASE + "augment:\n  - {type: compose, of: []}\n", 15,
     "augment.0.of: is empty"),
    ("empty_thresholds", BASE + "segment: {type: waterz, thresholds: []}\n", 14,
     "segment.thresholds: is empty"),
    # includes (extends)
    ("extends_a_missing_file", "extends: nothere.yaml\n" + BASE, 1,
     "extends: 'nothere.yaml': no such file"),
    ("extends_an_empty_name", "extends: ''\n" + BASE, 1, "extends: an empty file name"),
    ("extends_a_null", "extends: [~]\n" + BASE, 1,
     "extends: must be a file name or a list of file names"),
    # weights and tasks that refer to what is not there
    ("source_weight_zero", edit("seed: 1}", "seed: 1, weight: 0}"), 4,
     "data.sources.a.weight: input should be greater than 0 (got 0)"),
    ("task_weights_sum_to_zero", edit("    target: {type: affinity}",
                                      "    target: {type: affinity}\n    weight: 0"), 8,
     "tasks: at least one task needs a weight above 0"),
    ("tta_reduce_names_a_missing_task", BASE + "infer:\n  tta: 2\n  tta_reduce: {affs: min}\n",
     16, "infer.tta_reduce.affs: no task named 'affs' (tasks: aff)"),
    ("task_without_target", edit(TASK, "  foo: {}"), 9, "tasks.foo.target: required key"),
    ("task_with_type_instead_of_target", edit(TASK, "  aff:\n    type: affinity"), 10,
     "tasks.aff.type: unknown key 'type' (allowed: target, loss, weight, activation)"),
    ("binary_task_on_a_missing_semantic_volume",
     edit(SOURCE, "    a: {type: volume, image: i.npy, labels: l.npy}\n").replace(
         TASK, TASK + "\n  mito: {target: {type: binary, volume: mito}}"), 11,
     "data.sources.a has no semantic volume 'mito' (it has: none)"),
    ("malis_on_an_lsd_task", edit(TASK, "  lsd: {loss: {type: malis}}"), 9,
     "malis needs an affinity target, not 'lsd'"),
    ("deep_nesting", BASE + "description: " + "[" * 2000 + "]" * 2000 + "\n", 14,
     "YAML nested too deeply (more than 32 levels)"),
]

runner = CliRunner()


def assert_user_error(result: Result) -> str:
    """Exit 2, `error: ` lines on stderr only, no traceback."""
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output and result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines and all(line.startswith("error: ") for line in lines), result.stderr
    return result.stderr


def test_the_round_is_about_sixty_recipes():
    assert len(CASES) >= 60 and len({name for name, *_ in CASES}) == len(CASES)


@pytest.mark.parametrize(("name", "text", "line", "expected"), CASES, ids=[c[0] for c in CASES])
def test_a_recipe_written_wrong_gives_one_located_message(tmp_path, monkeypatch, name, text,
                                                          line, expected):
    monkeypatch.chdir(tmp_path)
    Path("r.yaml").write_text(text, encoding="utf-8", newline="")
    stderr = assert_user_error(runner.invoke(app, ["validate", "r.yaml", "--no-data"]))
    assert f"error: r.yaml:{line}:" in stderr and expected in stderr, stderr


DATA_CASES = [
    ("zero_size_volume", np.zeros((0, 64, 64), np.uint8),
     "of shape [0, 64, 64] is smaller than train.patch [8, 36, 36]"),
    ("two_dimensional_volume", np.zeros((64, 64), np.uint8),
     "has shape [64, 64]; an image must be 3D (z, y, x)"),
    ("volume_smaller_than_the_patch", np.zeros((4, 20, 20), np.uint8),
     "of shape [4, 20, 20] is smaller than train.patch [8, 36, 36]"),
]


@pytest.mark.parametrize(("name", "volume", "expected"), DATA_CASES,
                         ids=[c[0] for c in DATA_CASES])
def test_a_volume_that_cannot_feed_training_is_named_at_its_line(tmp_path, monkeypatch, name,
                                                                 volume, expected):
    monkeypatch.chdir(tmp_path)
    np.save("v.npy", volume)
    Path("r.yaml").write_text(edit(SOURCE, "    a: {type: volume, image: v.npy, "
                                           "labels: v.npy}\n"), encoding="utf-8")
    stderr = assert_user_error(runner.invoke(app, ["validate", "r.yaml"]))
    assert "error: r.yaml:4:" in stderr and "data.sources.a.image: v.npy" in stderr
    assert expected in stderr


@pytest.mark.parametrize(("override", "expected"), [
    ("augment.3.p=0.5", "augment is not in the recipe, so it has no item 3 to set; set the "
     "whole list (-o augment=[...])"),
    ("tasks.aff.target.offsets.0=[1, 0, 0]", "tasks.aff.target.offsets is not in the recipe, "
     "so it has no item 0 to set; set the whole list (-o tasks.aff.target.offsets=[...])"),
])
def test_an_override_of_an_item_of_a_list_the_recipe_lacks_says_so(tmp_path, monkeypatch,
                                                                   override, expected):
    """It made a mapping {3: {p: 0.5}} there, and the message was `augment: input should be
    a valid list` of a recipe that has no augment at all."""
    monkeypatch.chdir(tmp_path)
    Path("r.yaml").write_text(BASE, encoding="utf-8")
    stderr = assert_user_error(runner.invoke(app, ["validate", "r.yaml", "--no-data",
                                                   "-o", override]))
    assert stderr == f"error: override -o {override}: {expected}\n"


def test_a_missing_recipe_named_like_a_shipped_one_is_pointed_to_it(tmp_path, monkeypatch):
    """`emrun validate demo` (or recipes/demo.yaml away from a clone) said only "no such
    file"; a pip install keeps the shipped recipes inside the package, where nobody looks."""
    from emrun.shipped import RECIPES

    monkeypatch.chdir(tmp_path)
    for name in ("demo", "recipes/demo.yaml", "demo.yml"):
        result = CliRunner().invoke(app, ["validate", name, "--no-data"])
        assert result.exit_code == 2
        assert f"the shipped recipe 'demo' is {RECIPES / 'demo.yaml'}" in result.output
    result = CliRunner().invoke(app, ["validate", "mine.yaml", "--no-data"])
    assert result.exit_code == 2 and "shipped" not in result.output
