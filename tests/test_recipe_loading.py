"""Loading recipes: positions in messages, extends, overrides, every problem reported."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import MINIMAL, ROOT
from pydantic import ValidationError

from emrun.recipe import RecipeError, load_recipe


def problems(path: Path, overrides: tuple[str, ...] = ()) -> list[str]:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides)
    return [str(p) for p in info.value.problems]


def test_minimal_recipe_gets_defaults(write):
    recipe = load_recipe(write(MINIMAL)).recipe
    assert recipe.train.batch_size == 1
    assert recipe.infer.blend.type == "bump"
    assert recipe.tasks["affinity"].target.offsets == [(-1, 0, 0), (0, -1, 0), (0, 0, -1)]
    assert recipe.head_channels() == {"affinity": 3}
    with pytest.raises(ValidationError):  # frozen
        recipe.train.batch_size = 2  # type: ignore[misc]


def test_error_names_file_line_column_and_key_path(write):
    path = write(MINIMAL.replace("patch: [8, 32, 32]", "patch: [8, 31, 32]"))
    [msg] = problems(path)
    assert msg.startswith(f"{path}:10:10: train.patch: y and x must be divisible by 2")
    assert "(got [8, 31, 32])" in msg


def test_every_problem_is_reported_each_at_its_line(write):
    text = MINIMAL.replace("widths: [4, 8]}", "widths: [4, 8], normm: batch}")
    text = text.replace("iterations: 10", "iterations: -3\n  precision: fp8")
    msgs = problems(write(text))
    assert any(":5:" in m and "model.normm" in m and "did you mean 'norm'" in m for m in msgs)
    assert any(":11:" in m and "train.iterations" in m for m in msgs)
    assert any(":12:" in m and "train.precision" in m for m in msgs)
    assert len(msgs) == 3


def test_unknown_registry_name_suggests(write):
    [msg] = problems(write(MINIMAL.replace("type: rsunet", "type: rsunett")))
    assert ":5:" in msg
    assert "unknown model type 'rsunett'; did you mean 'rsunet'?" in msg


# deepem's misalignment reaches 25 px of 8 nm, 33 px of MINIMAL's 6 nm: more than 32
WIDE = MINIMAL.replace("patch: [8, 32, 32]", "patch: [8, 64, 64]")


def test_preset_expands_and_unknown_preset_suggests(write):
    recipe = load_recipe(write(WIDE + "augment: deepem\n")).recipe
    assert [a.type for a in recipe.augment][-1] == "flip_rotate"
    assert recipe.resolved()["augment"][0]["type"] == "one_of"
    [msg] = problems(write(MINIMAL + "augment: deepen\n"))
    assert "did you mean 'deepem'" in msg


def test_extends_deep_merges_over_several_levels(write, tmp_path):
    write(MINIMAL, "bases/base.yaml")
    write("extends: base.yaml\ntrain: {batch_size: 4}\nmodel: {widths: [8, 16]}\n",
          "bases/middle.yaml")
    path = write("extends: bases/middle.yaml\nname: child\ntrain: {iterations: 99}\n")
    recipe = load_recipe(path).recipe
    assert recipe.name == "child"
    assert recipe.train.iterations == 99
    assert recipe.train.batch_size == 4
    assert recipe.train.patch == (8, 32, 32)  # merged from the base, not replaced
    assert recipe.model.widths == [8, 16]  # lists replace
    assert recipe.extends is None
    assert "extends" not in recipe.resolved()


def test_a_child_source_of_another_type_replaces_a_base_source_of_the_default_one(write,
                                                                                  tmp_path):
    """A base source without `type` is a volume source: a child's `type: synthetic` kept
    its `image` and `labels`, refused as unknown keys of the base's file; written with
    `type: volume`, the same base was replaced. A child that names the default type, or
    none, still merges into it."""
    base = MINIMAL.replace("a: {type: synthetic, shape: [16, 64, 64], seed: 1}",
                           "a: {image: x.npy, labels: y.npy}")
    assert base != MINIMAL
    write(base, "base.yaml")
    path = write("extends: base.yaml\ndata: {sources: {a: {type: synthetic, shape: [16, 64, "
                 "64]}}}\n")
    source = load_recipe(path).recipe.data.sources["a"]
    assert source.type == "synthetic" and source.shape == (16, 64, 64)
    kept = write("extends: base.yaml\ndata: {sources: {a: {type: volume, mask: m.npy}}}\n",
                 "kept.yaml")
    source = load_recipe(kept).recipe.data.sources["a"]
    assert (source.image, source.labels, source.mask) == ("x.npy", "y.npy", "m.npy")


def test_errors_in_a_base_point_into_the_base_file(write):
    base = write(MINIMAL.replace("iterations: 10", "iterations: ten"), "base.yaml")
    path = write("extends: base.yaml\nseed: 4\n", "child.yaml")
    [msg] = problems(path)
    assert msg.startswith(f"{base}:11:")


def test_extends_cycle_and_missing_base(write):
    write("extends: b.yaml\n", "a.yaml")
    path = write("extends: a.yaml\n", "b.yaml")
    [msg] = problems(path)
    assert "`extends` cycle" in msg and "a.yaml" in msg
    [msg] = problems(write("extends: nowhere.yaml\n" + MINIMAL, "c.yaml"))
    assert msg.startswith(f"{path.parent / 'c.yaml'}:1:10:") and "nowhere.yaml" in msg


def test_overrides_parse_yaml_and_are_named_in_errors(write):
    path = write(MINIMAL)
    recipe = load_recipe(path, ["train.batch_size=3", "model.widths=[2, 4, 8]",
                                "tasks.affinity.weight=0.5"]).recipe
    assert recipe.train.batch_size == 3
    assert recipe.model.widths == [2, 4, 8]
    assert recipe.tasks["affinity"].weight == 0.5
    [msg] = problems(path, ("train.batch_size=0",))
    assert msg.startswith("override -o train.batch_size=0: train.batch_size:")
    [msg] = problems(path, ("train.patchh=[1, 2, 3]",))
    assert "unknown key 'patchh'; did you mean 'patch'?" in msg


def test_override_can_index_lists(write):
    path = write(MINIMAL + "augment: [{type: flip_rotate}, {type: noise}]\n")
    recipe = load_recipe(path, ["augment.1.p=0.25"]).recipe
    assert recipe.augment[1].p == 0.25


def test_cross_checks_locate_the_key(write):
    text = MINIMAL.replace("target: {type: affinity}",
                           "target: {type: affinity, offsets: [[0, 0, -40]]}\n    weight: 0")
    msgs = problems(write(text))
    assert any("tasks.affinity.target.offsets" in m and "not smaller than" in m for m in msgs)
    assert any(m.endswith("tasks: at least one task needs a weight above 0") for m in msgs)


def test_semantic_volume_must_exist_in_every_source(write):
    text = MINIMAL + "  # extra task below\n"
    text = text.replace("tasks:\n", "tasks:\n  syn:\n    target: {type: synapse, volume: clefts}\n")
    [msg] = problems(write(text))  # synthetic sources have 'mito' and 'synapse' only
    assert "tasks.syn.target.volume" in msg and "no semantic volume 'clefts'" in msg


def test_resolved_recipe_round_trips(write, tmp_path):
    import yaml

    first = load_recipe(write(WIDE + "augment: deepem\n"), ["train.batch_size=2"]).recipe
    again = write(yaml.safe_dump(first.resolved()), "resolved.yaml")
    assert load_recipe(again).recipe == first


@pytest.mark.parametrize("recipe", sorted(Path(__file__).parent.parent.glob("recipes/*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_recipes_validate_and_reference_the_schema(recipe):
    loaded = load_recipe(recipe)
    assert loaded.recipe.name == recipe.stem
    assert loaded.recipe.description
    first = recipe.read_text().splitlines()[0]
    assert first == "# yaml-language-server: $schema=../schemas/recipe.schema.json"


def test_a_flood_of_problems_is_capped_with_a_count(write):
    """A generated recipe with thousands of stray keys: the first 50 are located, the rest
    counted (the message stays readable, and describing them all took minutes)."""
    stray = "".join(f"\n  bogus_{i}: 1" for i in range(1200))
    path = write(MINIMAL.replace("iterations: 10", "iterations: 10" + stray))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    lines = str(info.value).splitlines()
    assert len(lines) == 51 and lines[0].startswith(f"{path}:")
    assert "train.bogus_0: unknown key" in lines[0]
    assert lines[-1] == "... and 1,150 more problems (the first 50 are shown)"


def test_extends_of_a_file_that_is_no_recipe_names_it_without_echoing_it(write, tmp_path):
    other = tmp_path / "settings.conf"
    other.write_text("".join(f"secret_{i}: value {i}\n" for i in range(30)))
    path = write(f"extends: {other}\n" + MINIMAL)
    [msg] = problems(path)
    assert "is not a recipe: none of its keys is a recipe section" in msg
    assert "secret" not in msg.replace(str(other), "")


@pytest.fixture(params=[1000, 5000], ids=["default-limit", "raised-limit"])
def recursion_limit(request):
    """The recursion limit: torch.compile raises it, which must not change what a user reads."""
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(request.param)
    yield request.param
    sys.setrecursionlimit(old)


def test_an_override_nested_a_thousand_deep_is_a_user_error(recursion_limit):
    for value in ("[" * 1000 + "]" * 1000, "{a: " * 1000 + "1" + "}" * 1000):
        with pytest.raises(RecipeError) as info:
            load_recipe(ROOT / "recipes" / "demo.yaml", [f"train.patch={value}"])
        [line] = str(info.value).splitlines()
        assert "nested too deeply" in line and len(line) < 200


def test_a_recipe_file_nested_deeper_than_any_setting_is_a_user_error(write, recursion_limit):
    path = write(MINIMAL + "extra: " + "[" * 200 + "]" * 200 + "\n")
    [msg] = problems(path)
    assert "nested too deeply" in msg and len(msg) < 200
