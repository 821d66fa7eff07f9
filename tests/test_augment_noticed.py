"""Known problems of the augmentation checks: each step judged against the shape it really
produces (the steps after it may read another), misalignments judged in the data's pixels
(``voxel_reference``), boxes larger than the patch, box counts, and probabilities 0 and 1."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import MINIMAL
from pydantic import TypeAdapter

import emrun.data.augment.geometric as geometric
import emrun.data.augment.photometric as photometric
from emrun.data.augment import Augmentation, Context, Pipeline, Sample
from emrun.recipe import RecipeError, load_recipe
from emrun.recipe.augment import (
    BOX_MAX_COUNT,
    PRESETS,
    Box,
    Compose,
    Misalign,
    OneOf,
    augment_problems,
)
from emrun.recipe.recipe import AugmentSpec
from emrun.registry import augmentations

SPECS = TypeAdapter(list[AugmentSpec])


def specs(*items: dict) -> list:
    return SPECS.validate_python(list(items))


def sample_of(shape, rng: np.random.Generator) -> Sample:
    return Sample(rng.random(shape, dtype=np.float32),
                  rng.integers(1, 9, shape).astype(np.uint64), None, {})


def run(stack: list, patch, voxel=None, draws: int = 20, seed: int = 0) -> None:
    """Plan and apply ``stack`` ``draws`` times; the output must be the patch."""
    rng = np.random.default_rng(seed)
    pipeline = Pipeline(stack)
    for _ in range(draws):
        steps, in_shape = pipeline.prepare(rng, patch, Context(voxel))
        assert Pipeline.apply(steps, sample_of(in_shape, rng)).shape == tuple(patch)


# ------------------------------------------- each step against the shape it must produce


ISO = {"type": "flip_rotate", "isotropic": True}


@pytest.mark.parametrize(("first", "patch", "needs"), [
    ({"type": "misalign", "displacement": [0, 0]}, (8, 1, 64), "at least 2 sections (got 1)"),
    ({"type": "misalign_missing", "displacement": [0, 1], "missing_max": 1}, (8, 2, 64),
     "at least 3 sections (got 2)"),
])
def test_a_step_before_an_isotropic_transpose_is_judged_on_the_transposed_shape(
        first, patch, needs):
    """The transpose reads the patch permuted, so the misalignment before it may have to
    produce a patch of y (here 1 or 2) sections: accepted before, then a traceback inside a
    loader worker."""
    stack = specs(first, ISO)
    assert not any(s.patch_problems(patch) for s in stack)  # each on train.patch: fine
    with pytest.raises(ValueError, match="needs at least"):
        run(stack, patch)  # what training met
    [(path, msg)] = augment_problems(stack, patch)
    assert path == (0,)
    assert needs in msg and f"for train.patch {list(patch)}" in msg, msg


def test_an_anisotropic_patch_judges_the_displacement_on_the_short_side_it_gets():
    """(8, 32, 32) transposed makes the misalignment produce (32, 8, 32): 15 px is not
    smaller than its 8 px side."""
    stack = specs({"type": "misalign", "displacement": [3, 15]}, ISO)
    [(path, msg)] = augment_problems(stack, (8, 32, 32))
    assert path == (0,) and "displacement up to 15 px" in msg and "(8x32 in y, x)" in msg
    assert augment_problems(stack[::-1], (8, 32, 32)) == []  # transposed first: fine


def test_nested_steps_are_named_by_their_key_path():
    stack = specs(
        {"type": "one_of", "of": [{"type": "noise"}, {"type": "misalign",
                                                      "displacement": [0, 0]}]},
        {"type": "compose", "of": [{"type": "misalign_missing", "displacement": [0, 0]},
                                   ISO]},
        ISO,
    )
    paths = [path for path, _ in augment_problems(stack, (8, 1, 64))]
    assert paths == [(1, "of", 0), (0, "of", 1)]


def test_a_lost_section_after_a_step_gives_it_more_sections_only_when_it_always_applies():
    """lost_section reads at least one section more: with p 1 the step before it always
    produces 3 sections for a 2-section patch; with p 0.5 also 2."""
    first = {"type": "misalign_missing", "displacement": [0, 1], "missing_max": 1}
    always = specs(first, {"type": "lost_section", "p": 1.0})
    assert always[0].patch_problems((2, 16, 16))  # judged on train.patch: refused
    assert augment_problems(always, (2, 16, 16)) == []
    run(always, (2, 16, 16))
    sometimes = specs(first, {"type": "lost_section", "p": 0.5})
    [(path, msg)] = augment_problems(sometimes, (2, 16, 16))
    assert path == (0,) and msg.endswith("(got 2)")


def test_a_warp_that_zooms_in_reads_less_and_the_step_before_is_judged_on_it():
    """A warp at scale 2 reads about half the patch in y and x (12 of 16: 11, and one more
    for the output's parity): a 12 px displacement before it is not smaller than that."""
    stack = specs({"type": "misalign", "displacement": [0, 12]},
                  {"type": "warp", "rot_max": 0, "shear_max": 0, "scale": [2, 2],
                   "stretch_max": 0})
    assert not stack[0].patch_problems((4, 16, 16))
    [(path, msg)] = augment_problems(stack, (4, 16, 16))
    rng = np.random.default_rng(0)
    _, in_shape = Pipeline(stack[1:]).prepare(rng, (4, 16, 16))
    assert path == (0,) and f"({in_shape[1]}x{in_shape[2]} in y, x)" in msg, (msg, in_shape)


def test_a_step_that_never_runs_is_not_judged():
    """p 0 (e.g. `-o augment.0.p=0` to switch a step off for a small test patch) or an
    alternative of chance 0: refusing the recipe for it helps nobody."""
    off = specs({"type": "misalign", "p": 0.0}, {"type": "noise"})
    assert augment_problems(off, (1, 8, 8)) == []
    run(off, (1, 8, 8))
    never = specs({"type": "one_of", "of": [{"type": "misalign"}, {"type": "lost_section"}],
                   "probs": [0.0, 1.0]})
    assert augment_problems(never, (1, 8, 8)) == []
    run(never, (1, 8, 8))
    assert augment_problems(specs({"type": "misalign", "p": 1e-6}), (1, 8, 8))


def test_the_deepem_preset_and_the_shipped_patches_are_still_accepted():
    deepem = SPECS.validate_python(PRESETS["deepem"])
    for patch in [(18, 256, 256), (20, 256, 256), (16, 192, 192), (12, 64, 64)]:
        for voxel in [None, (40.0, 4.0, 4.0), (30.0, 6.0, 6.0)]:
            assert augment_problems(deepem, patch, voxel) == [], (patch, voxel)


LEAVES = [
    {"type": "flip_rotate"}, ISO,
    {"type": "warp", "rot_max": 30, "twist_max": 5},
    {"type": "warp", "scale": [1.5, 3.0], "rot_max": 90, "shear_max": 0.5},
    {"type": "misalign", "displacement": [1, 6]},
    {"type": "misalign", "displacement": [0, 2], "voxel_reference": 8.0},
    {"type": "misalign_missing", "displacement": [0, 3], "missing_max": 1},
    {"type": "lost_section", "max_sections": 2}, {"type": "grayscale", "partial": True},
    {"type": "missing_section", "max_sections": 2, "partial": True},
    {"type": "blurry_section", "max_sections": 2},
    {"type": "box", "size": [2, 40], "z_size": [1, 9], "modes": ["fill", "noise", "blur"]},
    {"type": "noise", "poisson": True}, {"type": "contrast_compression"},
]


def random_stack(rng: np.random.Generator) -> list[dict]:
    def pick() -> dict:
        return {**LEAVES[int(rng.integers(len(LEAVES)))],
                "p": float(rng.choice([0.0, 0.5, 1.0], p=[0.1, 0.4, 0.5]))}

    stack = [pick() for _ in range(int(rng.integers(1, 5)))]
    if rng.random() < 0.4:
        stack.insert(int(rng.integers(len(stack) + 1)), {
            "type": "one_of", "of": [pick(), pick()],
            "probs": [float(rng.choice([0.0, 0.5])), 0.5]})
    if rng.random() < 0.4:
        stack.append({"type": "compose", "of": [pick(), pick()],
                      "p": float(rng.choice([0.5, 1.0]))})
    return stack


@pytest.mark.parametrize("seed", range(12))
def test_an_accepted_stack_never_asks_a_step_for_a_shape_its_own_check_refuses(
        seed, monkeypatch):
    """Random stacks on small patches (z=1 and 2, y or x of 1 included): where the check
    accepts, every shape any step is planned for passes that step's own check, and the
    samples come out right."""
    asked: list[tuple] = []
    prepare = Augmentation.prepare

    def recording(self, rng, out_shape, context):
        if not isinstance(self.spec, OneOf | Compose) and self.spec.p > 0:
            asked.append((self.spec, tuple(out_shape)))
        return prepare(self, rng, out_shape, context)

    monkeypatch.setattr(Augmentation, "prepare", recording)
    rng = np.random.default_rng(seed)
    accepted = 0
    for _ in range(25):
        stack = SPECS.validate_python(random_stack(rng))
        patch = tuple(int(v) for v in rng.integers(1, [7, 12, 12]))
        voxel = [None, (40.0, 4.0, 4.0), (40.0, 16.0, 16.0)][int(rng.integers(3))]
        if augment_problems(stack, patch, voxel):
            continue
        accepted += 1
        asked.clear()
        run(stack, patch, voxel, draws=6, seed=seed)
        wrong = [(s.type, shape, s.shape_problems(shape, voxel)) for s, shape in asked
                 if s.shape_problems(shape, voxel)]
        assert not wrong, (patch, voxel, wrong)
    assert accepted >= 5


VARIANTS = {  # beyond each type's defaults: the extremes of what a spec allows
    "warp": [{"rot_max": 180, "shear_max": 1, "scale": [0.5, 4], "stretch_max": 0.5,
              "twist_max": 180}, {"rot_max": 0, "shear_max": 0, "scale": [100, 100]}],
    "misalign": [{"displacement": [0, 0], "mode": "slip", "interp": True},
                 {"displacement": [10_000, 10_000], "voxel_reference": 0.001}],
    "misalign_missing": [{"displacement": [0, 0]}],
    "lost_section": [{"max_sections": 16}],
    "missing_section": [{"max_sections": 1, "fill": "random", "partial": True,
                         "consecutive": True}],
    "blurry_section": [{"max_sections": 1, "sigma_max": 100, "partial": True}],
    "grayscale": [{"contrast": 10, "brightness": 10, "gamma": 4, "mode": "2d",
                   "partial": True}],
    "box": [{"density": 1, "size": [1, 1], "z_size": [1, 1], "modes": ["blur"]},
            {"size": [10_000, 10_000], "z_size": [10_000, 10_000], "modes": ["blur", "noise"]}],
    "noise": [{"sigma_max": 1, "poisson": True}, {"sigma_max": 0, "poisson": True}],
    "contrast_compression": [{"factor": [0.001, 100]}],
    "flip_rotate": [{"isotropic": True}],
    "one_of": [{"of": [{"type": "misalign"}, {"type": "lost_section"}], "probs": [0, 1]}],
    "compose": [{"of": [{"type": "lost_section", "max_sections": 3},
                        {"type": "misalign_missing", "displacement": [0, 0]}]}],
}


def smallest_accepted(stack: list, voxel) -> list[tuple[int, int, int]]:
    accepted = [(z, y, x) for z in range(1, 9) for y in range(1, 18) for x in range(1, 18)
                if not augment_problems(stack, (z, y, x), voxel)]
    return [s for s in accepted
            if not any(o != s and all(a <= b for a, b in zip(o, s, strict=True))
                       for o in accepted)]


@pytest.mark.parametrize("name", augmentations.names())
def test_every_step_runs_on_the_smallest_patches_its_check_accepts(name):
    """Defaults and extremes of each registered step, on the smallest patches the check lets
    through (2-d patches of z=1 and sides of 1 included), with and without a voxel size."""
    defaults = {"one_of": {"of": [{"type": "noise"}]}, "compose": {"of": [{"type": "noise"}]}}
    ran = 0
    for variant in [defaults.get(name, {}), *VARIANTS.get(name, [])]:
        stack = specs({"type": name, **variant})
        for voxel in [None, (1.0, 4.0, 4.0)]:  # 10,000 px of 0.001 nm: 2.5 px of 4 nm
            for patch in smallest_accepted(stack, voxel):
                run(stack, patch, voxel, draws=8)
                ran += 1
    assert ran >= 2


@pytest.mark.parametrize(("params", "reached"), [
    ({"rot_max": 45.0, "scale": [0.9, 1.6], "shear_max": 0.3, "twist_max": 10,
      "stretch_max": 0.2}, False),
    ({"rot_max": 120.0, "scale": [1.2, 2.0]}, False),
    ({"rot_max": 60.0, "scale": [1.5, 1.5], "shear_max": 0.5, "stretch_max": 0.0}, True),
])
def test_a_warps_smallest_read_bounds_every_draw(params, reached):
    """No draw reads less than the smallest read the check assumes; with the scale fixed and
    no stretch or twist, draws come within two pixels of it (reads take the output's parity,
    so they step by two)."""
    spec = specs({"type": "warp", **params})
    [by_y, by_x] = spec[0].input_shapes((3, 20, 40), None)
    rng = np.random.default_rng(0)
    reads = [Pipeline(spec).prepare(rng, (3, 20, 40))[1] for _ in range(400)]
    least = (min(r[1] for r in reads), min(r[2] for r in reads))
    assert least[0] >= by_y[1] and least[1] >= by_x[2], (least, by_y, by_x)
    if reached:
        assert least[0] <= by_y[1] + 2 and least[1] <= by_x[2] + 2, (least, by_y, by_x)
        assert all(r[1] % 2 == 20 % 2 and r[2] % 2 == 40 % 2 for r in reads)


# ------------------------------------------------ voxel_reference in the displacement check


def test_the_displacement_check_scales_by_voxel_reference():
    """20 px at 8 nm are 40 px on 4 nm data (the runtime shift): not smaller than a 32 px
    patch; 40 px at 8 nm are 20 px on 16 nm data: fine, though the old check refused it."""
    fine = specs({"type": "misalign", "displacement": [0, 20], "voxel_reference": 8.0})
    [(path, msg)] = augment_problems(fine, (8, 32, 32), (40.0, 4.0, 4.0))
    assert path == (0,) and msg.startswith("misalign: displacement up to 40 px (20 px of "
                                           "voxel_reference 8 nm on a source of 4 nm in x)")
    far = specs({"type": "misalign", "displacement": [0, 40], "voxel_reference": 8.0})
    assert far[0].patch_problems((8, 32, 32))  # unscaled, as train.patch alone is judged
    assert augment_problems(far, (8, 32, 32), (40.0, 16.0, 16.0)) == []
    assert augment_problems(far, (8, 32, 32), None)  # no voxel size: pixels as given
    run(far, (8, 32, 32), (40.0, 16.0, 16.0))


def test_the_check_and_the_runtime_scale_displacements_alike():
    spec = Misalign(displacement=(10, 10), voxel_reference=8.0)
    for voxel in [None, (40.0, 4.0, 4.0), (40.0, 16.0, 5.0)]:
        factor = spec.pixel_scale(voxel)
        assert geometric._pixel_scale(spec, Context(voxel)) == factor
        rng = np.random.default_rng(1)
        step = Pipeline([spec]).prepare(rng, (4, 64, 64), Context(voxel))[0][0]
        shift = np.hypot(step.in_shape[1] - 64, step.in_shape[2] - 64)
        assert abs(shift - 10 * factor) <= 1.0, (voxel, step.in_shape)


# --------------------------------------------------------------- boxes larger than the patch


def test_boxes_larger_than_the_patch_are_accepted_and_painted_clipped_to_it():
    """Sizes up to 40 on a 3 x 8 x 8 patch: each painted area is exactly its box clipped to
    the patch (touching a border on each axis, as a box larger than the side must), and the
    density is still reached on average."""
    spec = Box(size=(20, 40), z_size=(4, 9), density=0.3, modes=["fill"])
    assert spec.patch_problems((3, 8, 8)) == []
    assert augment_problems(specs(PRESETS["deepem"][4]), (4, 16, 16)) == []  # box 5..25
    covered, partial = [], 0
    for seed in range(300):
        rng = np.random.default_rng(seed)
        step = Pipeline([spec]).prepare(rng, (3, 8, 8))[0][0]
        op = step.apply
        image = np.full((3, 8, 8), 2.0, dtype=np.float32)  # no fill value (<= 1) equals it
        painted = op.transform(image) != np.float32(1.0)  # clipped: unpainted voxels are 1
        boxes = np.zeros((3, 8, 8), dtype=bool)
        for z0, z1, y0, y1, x0, x1 in op.boxes.tolist():
            assert 0 <= z0 < z1 <= 3 and 0 <= y0 < y1 <= 8 and 0 <= x0 < x1 <= 8
            assert (z0 == 0 or z1 == 3) and (y0 == 0 or y1 == 8) and (x0 == 0 or x1 == 8)
            partial += (y1 - y0 < 8) or (x1 - x0 < 8)
            boxes[z0:z1, y0:y1, x0:x1] = True
        assert np.array_equal(painted, boxes)
        covered.append(boxes.mean())
    assert partial > 50  # clipped where they stick out, not grown to the whole patch
    assert abs(np.mean(covered) - 0.3) < 0.05


def test_a_box_density_that_needs_too_many_boxes_is_refused_by_the_check():
    """Boxes of one voxel at density 0.9 on 20 x 256 x 256 need about 3 million boxes:
    training refused it in a loader worker; the check now says so first."""
    tiny = Box(size=(1, 1), z_size=(1, 1), density=0.9)
    [msg] = tiny.patch_problems((20, 256, 256))
    assert "needs about 3,018,044 boxes" in msg and f"{BOX_MAX_COUNT:,}" in msg
    assert tiny.patch_problems((20, 128, 128)) == []


def test_the_box_count_estimate_matches_the_boxes_drawn():
    spec = Box(size=(1, 3), z_size=(1, 2), density=0.6)
    shape = (4, 40, 40)
    counts = [len(photometric.draw_boxes(np.random.default_rng(s), shape, spec))
              for s in range(40)]
    assert abs(np.mean(counts) / spec.expected_count(shape) - 1) < 0.1


# ------------------------------------------------------------- the recipe error, located


def _recipe(write, augment: str, source_extra: str = "") -> Path:
    text = MINIMAL.replace("seed: 1}", f"seed: 1{source_extra}}}") + f"augment:\n{augment}"
    return write(text)


def _line(path: Path, text: str) -> int:
    return next(n for n, line in enumerate(path.read_text().splitlines(), 1) if text in line)


def test_the_recipe_check_reports_a_propagated_shape_at_the_step(write):
    path = _recipe(write, "  - {type: misalign, displacement: [3, 15]}\n"
                          "  - {type: flip_rotate, isotropic: true}\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    [msg] = [str(p) for p in info.value.problems]
    assert msg.startswith(f"{path}:{_line(path, 'type: misalign')}:")
    assert "augment.0: misalign: displacement up to 15 px" in msg


def test_the_recipe_check_scales_the_displacement_by_the_sources_voxel_size(write):
    path = _recipe(write, "  - {type: misalign, displacement: [0, 20], voxel_reference: 8}\n",
                   ", voxel_size: [40, 4, 4]")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    [msg] = [str(p) for p in info.value.problems]
    assert "augment.0: misalign: displacement up to 40 px" in msg


def test_validate_scales_the_displacement_by_the_volume_s_own_voxel_size(tmp_path):
    """A source whose voxel size only its metadata states: training scales voxel_reference
    pixels to it, so the data check judges the steps at it (the recipe check could not)."""
    from test_data_probe import labels_of, problems, recipe_file

    from emrun.io.write import write_volume

    shape = (8, 32, 40)
    for name, array in (("image", np.full(shape, 0.5, np.float32)), ("labels", labels_of())):
        write_volume(tmp_path / "v.zarr", name, array, voxel_size=(40, 2, 2))
    source = f"{{image: {tmp_path}/v.zarr/image, labels: {tmp_path}/v.zarr/labels}}"
    step = "[{type: misalign, displacement: [0, 10], voxel_reference: 8}]"
    assert not [m for m in problems(recipe_file(tmp_path, source, step.replace("8}", "2}")))
                if "augment" in m]  # 10 px of 2 nm on a 2 nm source: fits the 16 x 16 patch
    [found] = [m for m in problems(recipe_file(tmp_path, source, step)) if "augment.0" in m]
    assert "augment.0: misalign: displacement up to 40 px" in found
    assert "voxel_reference 8 nm on a source of 2 nm" in found
