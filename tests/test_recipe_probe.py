"""Recipe loading probed from a user's side: YAML booleans where numbers belong, keys YAML
reads as booleans or numbers, `extends:` edge cases, and the resolved recipe's round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import MINIMAL

from emrun.recipe import RecipeError, load_recipe


def problems(path: Path, *overrides: str) -> list[str]:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides)
    return [str(p) for p in info.value.problems]


def line_of(path: Path, text: str) -> int:
    return next(n for n, line in enumerate(path.read_text().splitlines(), 1) if text in line)


# ------------------------------------------------- a YAML boolean is not a number


@pytest.mark.parametrize(("override", "key"), [
    ("infer.tta=yes", "infer.tta"),  # meant "TTA on": silently 1, no TTA at all
    ("train.grad_clip=true", "train.grad_clip"),  # (workers, a strict count, says so too)
    ("train.optimizer.lr=true", "train.optimizer.lr"),
    ("tasks.affinity.weight=no", "tasks.affinity.weight"),  # silently drops the task
    ("augment=[{type: noise, p: on}]", "augment.0.p"),
    ("infer.overlap=[no, 0.5, 0.5]", "infer.overlap.0"),
])
def test_a_boolean_where_a_number_belongs_is_refused_at_the_override(write, override, key):
    msg = problems(write(MINIMAL), override)[0]  # weight 0 also leaves no weighted task
    assert msg.startswith(f"override -o {override}: {key}: should be a number, not "), msg


def test_a_boolean_where_a_number_belongs_in_a_file_names_its_line(write):
    path = write(MINIMAL + "infer: {tta: yes}\n")
    [msg] = problems(path)
    assert msg == f"{path}:{line_of(path, 'tta')}:14: infer.tta: should be a number, not true"


def test_booleans_where_booleans_belong_still_validate(write):
    recipe = load_recipe(write(MINIMAL + "infer: {compile: yes, channels_last: off}\n")).recipe
    assert recipe.infer.compile is True and recipe.infer.channels_last is False


# ------------------------------------------ keys YAML reads as booleans or numbers


def test_a_source_named_on_is_reported_as_the_key_the_user_wrote(write):
    """YAML 1.1 reads the key `on:` as true; pydantic calls it 1: the message must point at
    the key, say what YAML made of it and how to keep the name."""
    path = write(MINIMAL.replace("    a: {type: synthetic", "    on: {type: synthetic"))
    [msg] = problems(path)
    line = line_of(path, "on: {type")
    assert msg.startswith(f"{path}:{line}:5: data.sources: this key is read by YAML as true, "
                          "not as a name"), msg
    assert "in quotes" in msg and "sources.1" not in msg


def test_a_number_key_is_located_at_the_key_not_at_its_mapping(write):
    path = write(MINIMAL.replace("    a: {type: synthetic", "    1.5: {type: synthetic"))
    [msg] = problems(path)
    line = line_of(path, "1.5: {type")
    assert msg.startswith(f"{path}:{line}:5: data.sources: this key is read by YAML as the "
                          "number 1.5, not as a name"), msg


def test_a_top_level_boolean_key_is_not_called_1(write):
    path = write(MINIMAL.replace("train:", "yes:"))
    msgs = problems(path)
    assert not any(m.split(": ")[1] == "1" for m in msgs), msgs
    assert any(f":{line_of(path, 'yes:')}:1: this key is read by YAML as true" in m
               for m in msgs), msgs


def test_a_boolean_key_in_an_override_value_is_explained(write):
    [msg] = problems(write(MINIMAL), "data.sources={off: {type: synthetic, shape: [16, 64, 64]}}")
    assert msg.startswith("override -o data.sources={off: ") and "read by YAML as false" in msg, msg


# ----------------------------------------------------------------------- extends


def test_extends_null_or_an_empty_list_means_no_base_as_the_schema_allows(write):
    """The JSON Schema (and the Recipe model) allow `extends: null`; the loader agrees."""
    for value in ("null", "[]"):
        recipe = load_recipe(write(f"extends: {value}\n" + MINIMAL)).recipe
        assert recipe.name == "tiny"


def test_extends_chain_from_nested_folders_resolves_each_relative_to_its_file(write, tmp_path,
                                                                              monkeypatch):
    write(MINIMAL, "base/base.yaml")
    write("extends: ../../base/base.yaml\ntrain: {iterations: 5}\n", "sub/deeper/c.yaml")
    top = write("extends: deeper/c.yaml\nmodel: {widths: [8, 16]}\n", "sub/top.yaml")
    monkeypatch.chdir(tmp_path / "sub")
    recipe = load_recipe("top.yaml").recipe
    assert recipe.train.iterations == 5 and list(recipe.model.widths) == [8, 16]
    assert recipe.model.type == "rsunet" and recipe.train.patch == (8, 32, 32)
    assert top.exists()


def test_an_error_in_a_base_is_located_in_the_base_with_an_override_elsewhere(write):
    base = write(MINIMAL.replace("widths: [4, 8]}", "widths: [4, 8], normm: batch}"), "b.yaml")
    child = write("extends: b.yaml\nname: kid\n", "kid.yaml")
    [msg] = problems(child, "train.iterations=3")
    assert msg.startswith(f"{base}:{line_of(base, 'normm')}:")
    assert "model.normm: unknown key 'normm'" in msg


# -------------------------------------------------------- the resolved recipe


@pytest.mark.parametrize("name", ["demo", "snemi3d_aff", "cremi_aff", "multitask",
                                  "snemi3d_lsd"])
def test_the_saved_resolved_recipe_validates_to_the_same_recipe(name, tmp_path):
    from conftest import ROOT

    resolved = load_recipe(ROOT / "recipes" / f"{name}.yaml").recipe.resolved()
    saved = tmp_path / "recipe.yaml"
    saved.write_text(yaml.safe_dump(resolved, sort_keys=False))
    assert load_recipe(saved).recipe.resolved() == resolved


# ------------------------------------------------- overrides into an augmentation preset


def test_an_override_can_index_the_list_of_an_augmentation_preset(write):
    """README: `-o augment.2.p=0.3` indexes lists; the shipped SNEMI3D and CREMI recipes
    write `augment: deepem`, which must be reachable the same way."""
    from emrun.recipe.augment import PRESETS

    path = write(MINIMAL.replace("patch: [8, 32, 32]", "patch: [16, 64, 64]")
                 .replace("shape: [16, 64, 64]", "shape: [32, 128, 128]") + "augment: deepem\n")
    plain = load_recipe(path).recipe.resolved()["augment"]
    changed = load_recipe(path, ["augment.2.p=0.3"]).recipe.resolved()["augment"]
    assert PRESETS["deepem"][2]["type"] == "grayscale" and changed[2]["p"] == 0.3
    assert changed[:2] == plain[:2] and changed[3:] == plain[3:]
    [msg] = problems(path, "augment.2.p=3")
    assert msg.startswith("override -o augment.2.p=3: augment.2.p: input should be less than")
    [msg] = problems(path, "augment.9.p=0.3")
    assert msg == ("override -o augment.9.p=0.3: augment is a list of 6; '9' is not an index "
                   "in it")


# ------------------------------------------------------------ messages of optional fields


@pytest.mark.parametrize("override", ["infer.patch=5", "data.sources.a.voxel_size=4"])
def test_an_optional_triple_says_how_many_values_it_takes(write, override):
    """`infer.patch` is `Zyx | None`: its message must be as specific as train.patch's."""
    [msg] = problems(write(MINIMAL), override)
    assert "should be a list of 3 values (z, y, x)" in msg, msg


# ----------------------------------------------------- aliases in an override's value


def _laughs(levels: int) -> str:
    """A short YAML flow mapping whose aliases expand to 9**levels values."""
    rows = ["l0: &l0 [x, x, x, x, x, x, x, x, x]"]
    rows += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "{" + ", ".join(rows) + "}"


def test_a_billion_laughs_in_an_override_is_refused_not_walked_for_hours(write):
    """A recipe file's aliases are bounded; an `-o` value's were not (9**9 values)."""
    [msg] = problems(write(MINIMAL), f"description={_laughs(9)}")
    assert msg.startswith("override -o description={l0: ") and "more than 100,000 values" in msg
    [msg] = problems(write(MINIMAL), "description=&a [*a]")  # contains itself
    assert "nested too deeply" in msg
    [msg] = problems(write(MINIMAL), f"description={_laughs(3)}")  # 729: only a wrong type
    assert "description: input should be a valid string" in msg


# -------------------------------------------- a source that is no mapping at all


@pytest.mark.parametrize(("value", "text"), [
    ("", "is empty; it should be a mapping of keys to values"),
    ("synthetic", "should be a mapping of keys to values; write {type: synthetic}"),
    ("3", "should be a mapping of keys to values (got 3)"),
])
def test_a_source_that_is_not_a_mapping_is_not_called_missing_its_type(write, value, text):
    """Sources default to `type: volume`, so pydantic calls any non-mapping "no tag found";
    the message must say what is wrong (`synth_a: null` to drop a base's source, say)."""
    [msg] = problems(write(MINIMAL), f"data.sources.a={value}")
    assert msg.startswith(f"override -o data.sources.a={value}: data.sources.a: {text}"), msg


# ------------------------------------------------ extends: a child that changes `type:`


def test_a_child_that_changes_a_source_s_type_replaces_it_instead_of_merging(write):
    """Merged key by key, the base's synthetic `shape`/`seed` stayed on the child's volume
    source as unknown keys, located in the base, and no child could remove them."""
    write(MINIMAL, "base.yaml")
    child = write("extends: base.yaml\ndata:\n  sources:\n"
                  "    a: {type: volume, image: v.zarr/image, labels: v.zarr/labels}\n"
                  "model: {type: resenc}\n", "child.yaml")
    recipe = load_recipe(child).recipe
    source = recipe.data.sources["a"]
    assert source.type == "volume" and str(source.image) == "v.zarr/image"
    assert recipe.model.type == "resenc"
    # the same type still merges key by key
    same = write("extends: base.yaml\ndata:\n  sources:\n    a: {type: synthetic, seed: 7}\n",
                 "same.yaml")
    source = load_recipe(same).recipe.data.sources["a"]
    assert source.seed == 7 and tuple(source.shape) == (16, 64, 64)


# ------------------------------------------------------------------ hints for e-notation


@pytest.mark.parametrize("word", ["-1.25e0", "1.0e309", "-2e-1", "-3e5"])
def test_the_e_notation_hint_suggests_what_yaml_reads_as_a_number(write, word):
    """YAML 1.1 reads 1.5e0 as a string too: its exponent needs a sign (1.5e+0)."""
    msg = problems(write(MINIMAL), f"tasks.affinity.weight={word}")[0]
    suggested = msg.rpartition("; write ")[2]
    assert f"YAML reads {word} as a string" in msg
    assert isinstance(yaml.safe_load(suggested), float | int), msg


def test_a_duplicate_key_in_an_override_is_refused_as_in_a_file(write):
    """PyYAML keeps the last of two equal keys; a recipe file's duplicate is an error, and
    an override's must not silently pick one."""
    [msg] = problems(write(MINIMAL), "augment=[{type: noise, p: 0.1, p: 0.9}]")
    assert msg == ("override -o augment=[{type: noise, p: 0.1, p: 0.9}]: the value has the "
                   "key 'p' twice")
    recipe = load_recipe(write(MINIMAL), ["model={<<: {type: rsunet}, widths: [2, 4]}"]).recipe
    assert list(recipe.model.widths) == [2, 4]  # a merge key is no duplicate


def test_a_synthetic_source_the_generator_cannot_make_is_refused_by_validate(tmp_path):
    """Voxel sizes more than 1000 times apart passed validate, then the generator's
    ValueError stopped training as an internal error."""
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**yaml.safe_load(MINIMAL), "data": {"sources": {
        "a": {"type": "synthetic", "shape": [8, 32, 32], "voxel_size": [30000, 6, 6]}}}}))
    with pytest.raises(RecipeError, match=r"data\.sources\.a\.voxel_size: .*more than 1000 "
                       "times apart"):
        load_recipe(path)
