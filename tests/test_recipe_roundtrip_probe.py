"""Recipe round trips and `-o` overrides probed from a user's side: `emrun validate --print`
of every shipped recipe (and of every registered type) validates again to the same text and
is accepted by `emrun schema`'s JSON Schema; overrides of nested keys, lists, mappings,
null, list items, unknown keys, the same key twice, presets; and the file:line each problem
names, also across `extends:`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import MINIMAL
from typer.testing import CliRunner

from emrun.cli import app
from emrun.recipe import RecipeError, load_recipe
from emrun.shipped import shipped_recipes

runner = CliRunner()

# MINIMAL with room for every augmentation and target type at its defaults
ROOMY = (MINIMAL.replace("shape: [16, 64, 64]", "shape: [32, 128, 128]")
         .replace("patch: [8, 32, 32]", "patch: [16, 64, 64]"))


def problems(path: Path, *overrides: str) -> list[str]:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides)
    return [str(p) for p in info.value.problems]


def line_of(path: Path, text: str) -> int:
    return next(n for n, line in enumerate(path.read_text().splitlines(), 1) if text in line)


def printed(path: Path, *overrides: str) -> str:
    """`emrun validate PATH --no-data --print -o ...`'s standard output (exit 0 asserted)."""
    args = ["validate", str(path), "--no-data", "--print"]
    for override in overrides:
        args += ["-o", override]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result.stdout


def user_error(path: Path, *overrides: str) -> str:
    """`emrun validate PATH --no-data -o ...`'s standard error (exit 2 asserted)."""
    args = ["validate", str(path), "--no-data"]
    for override in overrides:
        args += ["-o", override]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    return result.stderr


@pytest.fixture(scope="module")
def schema(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("schema") / "recipe.schema.json"
    assert runner.invoke(app, ["schema", "--output", str(out)]).exit_code == 0
    return json.loads(out.read_text())


def assert_schema_accepts(schema: dict, data: dict) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(data, schema)


# ------------------------------------------------------- `validate --print` round trips


@pytest.mark.parametrize("recipe", shipped_recipes(), ids=lambda p: p.stem)
def test_validate_print_of_a_shipped_recipe_prints_itself_again(recipe, tmp_path, schema):
    """The printed recipe (the CLI's own text, not yaml.safe_dump of resolved()) validates
    again to exactly the same text, and the JSON Schema takes it whole (defaults, expanded
    presets and nulls included)."""
    first = printed(recipe)
    again = tmp_path / "printed.yaml"
    again.write_text(first, encoding="utf-8")
    assert printed(again) == first
    data = yaml.safe_load(first)
    assert "extends" not in data
    assert load_recipe(again).recipe == load_recipe(recipe).recipe
    assert_schema_accepts(schema, data)


@pytest.mark.parametrize("override", [
    *(f"augment=[{{type: {kind}}}]" for kind in (
        "blurry_section", "box", "contrast_compression", "flip_rotate", "grayscale",
        "lost_section", "misalign", "misalign_missing", "missing_section", "noise", "warp")),
    "augment=[{type: one_of, of: [{type: noise}, {type: box}], probs: [0.3, 0.3]}]",
    "augment=[{type: compose, of: [{type: noise}, {type: grayscale}]}]",
    "augment=deepem",
    "infer.blend={type: gaussian}",
    *(f"tasks.affinity.loss={{type: {kind}}}" for kind in ("dice", "dice_bce", "malis", "mse")),
    *(f"model={{type: {kind}}}" for kind in ("updown", "resenc", "mednext")),
    *(f"segment={{type: {kind}}}" for kind in ("cc", "waterz")),
    *(f"tasks.t={{target: {{type: {kind}}}}}" for kind in ("boundary", "distance", "synapse")),
    "tasks.lsd={target: {type: lsd, sigma: 40}}",
    "train.optimizer={type: sgd, momentum: 0.5}",
    "train.schedule={type: step, milestones: [3, 6]}",
    "train.schedule={type: poly}",
    "data.sources.a={image: x.npy, labels: y.npy, roi: {offset: [0, 0, 0], "
    "shape: [16, 64, 64]}, intensity: {low: 1, high: 200}}",
    "infer={stride: [8, 32, 32], tta: 8, tta_reduce: {affinity: min}}",
])
def test_every_registered_type_prints_a_recipe_that_validates_to_itself(override, write,
                                                                        tmp_path, schema):
    first = printed(write(ROOMY), override)
    again = tmp_path / "again.yaml"
    again.write_text(first, encoding="utf-8")
    assert printed(again) == first
    assert_schema_accepts(schema, yaml.safe_load(first))


def test_print_of_an_extending_recipe_with_overrides_round_trips(write, tmp_path):
    write(ROOMY + "augment: deepem\n", "bases/base.yaml")
    child = write("extends: bases/base.yaml\nname: kid\ntrain: {iterations: 7}\n", "kid.yaml")
    first = printed(child, "augment.0.p=0.25", "seed=9")
    data = yaml.safe_load(first)
    assert "extends" not in data and data["name"] == "kid" and data["seed"] == 9
    assert data["augment"][0]["p"] == 0.25 and data["train"]["iterations"] == 7
    again = tmp_path / "again.yaml"
    again.write_text(first, encoding="utf-8")
    assert printed(again) == first


# ------------------------------------------------------------------- overrides: values


def test_overrides_of_nested_keys_lists_and_strings(write):
    recipe = load_recipe(write(MINIMAL), [
        "train.optimizer.lr=0.01",  # a section the file leaves out: from its default (adam)
        "model.widths=[2, 4, 8]",
        "description=a=b",  # only the first '=' splits
        "name=run-1e3",
    ]).recipe
    assert recipe.train.optimizer.type == "adam" and recipe.train.optimizer.lr == 0.01
    assert recipe.model.widths == [2, 4, 8]
    assert recipe.description == "a=b"
    assert recipe.name == "run-1e3"


def test_a_mapping_value_replaces_the_mapping_whole_and_must_name_its_type(write):
    """`-o key={...}` sets the value (no merge): an sgd optimizer given `{lr: 0.1}` does
    not silently become adam, the mapping must say its type."""
    path = write(MINIMAL.replace("iterations: 10", "iterations: 10\n  optimizer: "
                                 "{type: sgd, lr: 0.01, momentum: 0.5}"))
    [msg] = problems(path, "train.optimizer={lr: 0.1}")
    assert msg == ("override -o train.optimizer={lr: 0.1}: train.optimizer: missing `type:` "
                   "(one of: adam, adamw, sgd)")
    optimizer = load_recipe(path, ["train.optimizer={type: sgd, lr: 0.1}"]).recipe.train.optimizer
    assert optimizer.lr == 0.1 and optimizer.momentum == 0.9  # the default: the file's 0.5 is gone


def test_null_sets_the_value_none_it_does_not_restore_a_default(write):
    path = write(MINIMAL.replace("iterations: 10", "iterations: 10\n  grad_clip: 1.0")
                 + "infer: {patch: [8, 32, 32]}\n")
    recipe = load_recipe(path, ["train.grad_clip=null", "infer.patch=null"]).recipe
    assert recipe.train.grad_clip is None and recipe.infer.patch is None
    assert recipe.infer_patch() == (8, 32, 32)
    [msg] = problems(path, "infer.blend=null")
    assert msg == ("override -o infer.blend=null: infer.blend: is empty; it should be a "
                   "mapping of keys to values")
    [msg] = problems(path, "train.patch=null")
    assert msg == ("override -o train.patch=null: train.patch: should be a list of 3 values "
                   "(z, y, x) (the value is empty)")


@pytest.mark.parametrize(("override", "said"), [
    ("name=123", "name: input should be a valid string (got 123)"),
    ("name=0x10", "name: input should be a valid string (got 16)"),  # YAML 1.1 hex
    ("description=1.5", "description: input should be a valid string (got 1.5)"),
    ("name=2024-01-01", "name: input should be a valid string (YAML reads 2024-01-01 as a "
     "date; put it in quotes to make it text)"),
    ("seed='5'", "seed: input should be a valid integer (got '5')"),
])
def test_strings_that_look_like_numbers_are_refused_not_coerced(write, override, said):
    [msg] = problems(write(MINIMAL), override)
    assert msg == f"override -o {override}: {said}"


def test_a_number_in_e_notation_is_read_as_meant_where_a_number_belongs(write):
    recipe = load_recipe(write(MINIMAL), ["train.optimizer.lr=1e-3"]).recipe
    assert recipe.train.optimizer.lr == 0.001


def test_a_quoted_number_for_a_numeric_choice_is_not_told_to_write_itself(write):
    path = write(MINIMAL + "infer:\n  tta: '8'\n")
    [msg] = problems(path)
    assert msg.startswith(f"{path}:{line_of(path, 'tta')}:8: infer.tta: ")  # holds today
    assert "did you mean '8'" not in msg and "quotes" in msg, msg


# ------------------------------------------------------------ overrides: list items


OFFSETS = "[[-1, 0, 0], [0, -1, 0], [0, 0, -1], [0, 0, -4]]"


def test_an_override_sets_a_key_inside_a_list_element(write):
    path = write(MINIMAL.replace("target: {type: affinity}",
                                 f"target: {{type: affinity, offsets: {OFFSETS}}}"))
    recipe = load_recipe(path, ["tasks.affinity.target.offsets.3.2=-3",
                                "tasks.affinity.target.offsets.-1.1=-2",
                                "tasks.affinity.target.offsets.1=[0, -2, 0]"]).recipe
    assert recipe.tasks["affinity"].target.offsets == [
        (-1, 0, 0), (0, -2, 0), (0, 0, -1), (0, -2, -3)]


@pytest.mark.parametrize(("override", "said"), [
    ("tasks.affinity.target.offsets.4.0=-3",
     "tasks.affinity.target.offsets is a list of 4; '4' is not an index in it"),
    ("tasks.affinity.target.offsets.-5.0=-3",
     "tasks.affinity.target.offsets is a list of 4; '-5' is not an index in it"),
    ("tasks.affinity.target.offsets.0.z=-3",
     "tasks.affinity.target.offsets.0 is a list of 3; 'z' is not an index in it"),
    ("tasks.affinity.target.offsets.0.0.0=-3", "cannot set tasks.affinity.target.offsets.0.0.0: "
     "tasks.affinity.target.offsets.0.0 is -1, not a mapping"),
    ("tasks.affinity.target.offsets.0=[0, -1, 0]",
     "tasks.affinity.target.offsets: offsets contain duplicates"),
])
def test_a_wrong_list_item_override_is_one_line_at_the_override(write, override, said):
    path = write(MINIMAL.replace("target: {type: affinity}",
                                 f"target: {{type: affinity, offsets: {OFFSETS}}}"))
    assert user_error(path, override) == f"error: override -o {override}: {said}\n"


# ------------------------------------------------------- overrides: unknown keys, twice


@pytest.mark.parametrize(("override", "said"), [
    ("sed=5", "sed: unknown key 'sed'; did you mean 'seed'?"),
    ("trian.iterations=5", "trian: unknown key 'trian'; did you mean 'train'?"),
    ("train.optimizer.lrr=0.1", "train.optimizer.lrr: unknown key 'lrr'; did you mean 'lr'?"),
    ("infer.blnd.sigma=1", "infer.blnd: unknown key 'blnd'; did you mean 'blend'?"),
    ("tasks.affinity.targt.type=boundary",
     "tasks.affinity.targt: unknown key 'targt'; did you mean 'target'?"),
])
def test_an_override_of_an_unknown_key_is_one_line_with_a_suggestion(write, override, said):
    assert user_error(write(MINIMAL), override) == f"error: override -o {override}: {said}\n"


def test_the_same_key_twice_the_last_wins_and_is_the_one_blamed(write):
    path = write(MINIMAL)
    assert load_recipe(path, ["seed=x", "seed=2"]).recipe.seed == 2  # the first never counts
    assert load_recipe(path, ["train.iterations=0", "train.iterations=5"]).recipe.train \
        .iterations == 5
    assert user_error(path, "train.iterations=5", "train.iterations=0") == (
        "error: override -o train.iterations=0: train.iterations: input should be greater "
        "than 0 (got 0)\n")
    # a key set, then its mapping replaced: the later mapping is all there is
    optimizer = load_recipe(path, ["train.optimizer.lr=-1",
                                   "train.optimizer={type: sgd}"]).recipe.train.optimizer
    assert optimizer.type == "sgd" and optimizer.lr > 0
    # a mapping set, then one key in it: both count, the bad key blamed on the first
    [msg] = problems(path, "train.optimizer={type: adam, lr: -1}", "train.optimizer.eps=0.1")
    assert msg.startswith("override -o train.optimizer={type: adam, lr: -1}: "
                          "train.optimizer.lr: input should be greater than 0")


def test_overrides_and_presets(write):
    from emrun.recipe.augment import PRESETS

    path = write(ROOMY)
    recipe = load_recipe(path, ["augment=deepem", "augment.0.p=0.125"]).recipe
    assert recipe.augment[0].p == 0.125 and len(recipe.augment) == len(PRESETS["deepem"])
    # a preset set after an item: the preset replaces the list whole
    recipe = load_recipe(path, ["augment=[{type: noise, p: 0.125}]", "augment=deepem"]).recipe
    assert recipe.resolved()["augment"] == load_recipe(path, ["augment=deepem"]).recipe \
        .resolved()["augment"]
    assert user_error(path, "augment=none", "augment.0.p=0.3") == (
        "error: override -o augment.0.p=0.3: augment is a list of 0; '0' is not an index "
        "in it\n")


def test_an_override_that_changes_a_type_keeps_the_other_keys_and_is_blamed(write):
    """Unlike a child recipe (which replaces a retyped mapping whole), `-o x.type=...` sets
    one value: the old type's keys stay, and the problem names the override."""
    path = write(MINIMAL + "segment: {type: mws, bias: 0.5}\n")
    assert user_error(path, "segment.type=cc") == (
        "error: override -o segment.type=cc: segment.bias: unknown key 'bias' (allowed: type, "
        "threshold, min_size); a key of this mapping before -o changed its type; to replace "
        "the whole mapping, give -o 'segment={type: ...}'\n")
    assert load_recipe(path, ["segment={type: cc}"]).recipe.segment.type == "cc"


# ---------------------------------------------------------------- where problems are


BASE = """\
name: tiny
data:
  sources:
    a: {type: synthetic, shape: [16, 64, 64], seed: 1}
model:
  type: rsunet
  widths: [4, 8]
tasks:
  affinity:
    target: {type: affinity}
train:
  patch: [8, 32, 32]
  iterations: 10
  batch_size: 2
"""


def test_problems_in_a_merged_mapping_name_the_file_each_value_came_from(write):
    base = write(BASE.replace("batch_size: 2", "batch_size: 0"), "base.yaml")
    child = write("extends: base.yaml\ntrain:\n  iterations: -1\nmodel:\n  widths: [4, 8]\n",
                  "child.yaml")
    assert sorted(problems(child)) == sorted([
        f"{base}:{line_of(base, 'batch_size')}:15: train.batch_size: input should be greater "
        "than 0 (got 0)",
        f"{child}:3:15: train.iterations: input should be greater than 0 (got -1)",
    ])


def test_a_yaml_error_in_a_base_names_the_base_s_line(write):
    write("train:\n  iterations: [1, 2\n  batch_size: 3\n", "bad.yaml")
    child = write("extends: bad.yaml\nname: x\n", "child.yaml")
    [msg] = problems(child)
    assert msg == (f"{child.parent / 'bad.yaml'}:3:13: invalid YAML: expected ',' or ']', but "
                   "got ':' (the [...] list that starts on line 2)")


def test_a_yaml_error_in_the_child_after_its_extends_names_the_child_s_line(write):
    write(BASE, "base.yaml")
    child = write("extends: base.yaml\ntrain:\n  iterations: 5\n   batch_size: 3\n", "c.yaml")
    [msg] = problems(child)
    assert msg.startswith(f"{child}:4:14: invalid YAML: mapping values are not allowed here")


def test_a_missing_key_of_a_section_the_child_extends_names_the_child_s_mapping(write):
    write(BASE, "base.yaml")
    child = write("extends: base.yaml\ntrain:\n  schedule:\n    type: step\n", "c.yaml")
    [msg] = problems(child)
    assert msg == f"{child}:3:3: train.schedule.milestones: required key is missing"


# each case: text added at the end of ROOMY (whose last section is train:), the key the
# problem is about, its key path, and what the message says
@pytest.mark.parametrize(("added", "bad", "path", "says"), [
    pytest.param("infer:\n  tta: 1\n  overlap: [0.2, 1.5, 0.2]\n", "overlap", "infer.overlap",
                 "overlap must be in [0, 1) per axis",
                 id="infer-overlap-range"),
    pytest.param("infer:\n  tta: 1\n  stride: [4, 16, 16]\n  overlap: [0.2, 0.2, 0.2]\n",
                 "overlap", "infer.overlap", "give either stride or overlap, not both",
                 id="infer-stride-and-overlap"),
    pytest.param("  optimizer:\n    type: adam\n    betas: [0.9, 1.5]\n", "betas",
                 "train.optimizer.betas", "betas must be in [0, 1)",
                 id="adam-betas"),
    pytest.param("augment:\n  - type: box\n    size: [9, 3]\n", "size", "augment.0.size",
                 "the first value must not exceed the second",
                 id="box-size"),
    pytest.param("augment:\n  - type: one_of\n    of: [{type: noise}, {type: box}]\n"
                 "    probs: [0.9, 0.9]\n", "probs", "augment.0.probs",
                 "probs sum to 1.8, more than 1",
                 id="one-of-probs"),
    pytest.param("infer:\n  tta: 1\nsegment:\n  type: mws\nmodel:\n  type: updown\n"
                 "  widths: [4, 8]\n  kernel: [3, 2, 3]\n", "kernel", "model.kernel",
                 "kernel sizes must be odd", id="model-kernel"),  # a KeyedValueError: held
])
def test_a_whole_model_check_about_one_key_names_that_key_s_line(write, added, bad, path,
                                                                 says):
    text = ROOMY.replace("model: {type: rsunet, widths: [4, 8]}\n", "")
    if "model:" not in added:
        text = text.replace("tasks:\n", "model: {type: rsunet, widths: [4, 8]}\ntasks:\n")
    assert text.endswith("  iterations: 10\n")
    file = write(text + added)
    [msg] = problems(file)
    assert says in msg, msg
    assert msg.startswith(f"{file}:{line_of(file, bad + ':')}:"), msg
    assert f": {path}: " in msg, msg
