"""Reference probe: the recipe's JSON Schema (what editors check as you type) against emrun's
own validation (what `emrun validate` accepts), key by key.

The reference verdict is emrun's: `Recipe.model_validate`, then the loader's refusal of YAML
booleans taken as numbers, then the cross-section checks (`emrun.recipe.loader.validate` does
exactly these three; a test below holds the replica to it). Each mutation of a valid recipe
(one key at a time: wrong types, numbers at, just inside and just outside every bound the
specs use, unknown keys, every registered `type:` and a misspelt one, list lengths, nulls,
missing keys) must get the same verdict from both, except where a JSON Schema cannot say
what emrun checks:

- cross-field checks in validators (widths divisible by groups, `downsample` one per level,
  `stride` or `overlap`, `probs` against `of`, ordered ranges, the synthetic generator's
  anisotropy, intensity low < high) and the cross-section checks (patch divisibility,
  semantic volumes, sigma against voxel sizes, ...);
- JSON's data model has no float 1.0 apart from the integer 1 (`type: integer` takes 1.0,
  emrun's strict counts refuse YAML's 1.0), and no NaN or infinity.

Known disagreements are separate xfail tests; the sweep skips exactly those mutations.
"""

from __future__ import annotations

import copy
import functools
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError
from typer.testing import CliRunner

from emrun.cli import app
from emrun.recipe import RecipeError, load_recipe
from emrun.recipe.checks import cross_checks
from emrun.recipe.loader import _booleans_as_numbers
from emrun.recipe.loader import validate as loader_validate
from emrun.recipe.recipe import Recipe
from emrun.recipe.schema import recipe_schema, recipe_schema_text
from emrun.recipe.yamlsource import Located
from emrun.registry import ALL

jsonschema = pytest.importorskip("jsonschema")

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = recipe_schema()
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)
SHIPPED = sorted((ROOT / "emrun" / "recipes").glob("*.yaml"))
CORPUS = ROOT / "tests" / "bad_recipes"

runner = CliRunner()


# --- the two verdicts -------------------------------------------------------------------

def schema_accepts(data: Any) -> bool:
    return bool(VALIDATOR.is_valid(data))


def emrun_verdict(data: Any) -> tuple[str, set[str]]:
    """('ok' | 'refused' | 'cross', pydantic error types): what `emrun validate` makes of
    ``data`` ('cross': only the cross-section checks refuse it)."""
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        return "refused", {str(err["type"]) for err in exc.errors()}
    if _booleans_as_numbers(data, recipe):
        return "refused", {"boolean_as_number"}
    if cross_checks(recipe):
        return "cross", set()
    return "ok", set()


def loader_accepts(data: Any) -> bool:
    try:
        loader_validate(Located(copy.deepcopy(data)))
    except RecipeError:
        return False
    return True


# --- valid recipes to mutate, one section in focus each ----------------------------------

MINI: dict[str, Any] = {
    "name": "mini",
    "data": {"sources": {"s": {"type": "synthetic", "shape": [24, 96, 96], "seed": 1}}},
    "model": {"type": "rsunet", "widths": [8, 16]},
    "tasks": {"aff": {"target": {"type": "affinity"}}},
    "train": {"patch": [12, 64, 64], "iterations": 10},
}

VOLUME = {"type": "volume", "image": "d/a.zarr/image", "labels": "d/a.zarr/labels",
          "mask": "d/a.zarr/mask", "semantic": {"mito": "d/a.zarr/mito"},
          "roi": {"offset": [1, 2, 3], "shape": [40, 200, 200]},
          "voxel_size": [30.0, 6.0, 6.0], "weight": 2.0,
          "intensity": {"low": 0.0, "high": 255.0}, "min_labelled": 0.1}
SYNTHETIC = {"type": "synthetic", "shape": [32, 128, 128], "seed": 4, "weight": 1.0,
             "voxel_size": [30.0, 6.0, 6.0], "roi": {"offset": [0, 0, 0],
                                                     "shape": [20, 100, 100]},
             "min_labelled": 0.0}

AUGMENTS: list[dict[str, Any]] = [
    {"type": "flip_rotate", "p": 0.5, "isotropic": False},
    {"type": "warp", "p": 0.7, "rot_max": 30.0, "shear_max": 0.1, "scale": [0.9, 1.1],
     "stretch_max": 0.1, "twist_max": 5.0},
    {"type": "misalign", "p": 0.3, "displacement": [2, 8], "voxel_reference": 6.0,
     "mode": "slip", "interp": True},
    {"type": "misalign_missing", "displacement": [2, 6], "voxel_reference": None,
     "missing_max": 1},
    {"type": "lost_section", "max_sections": 2},
    {"type": "missing_section", "max_sections": 2, "partial": True, "consecutive": True,
     "fill": "random", "value": 0.5},
    {"type": "blurry_section", "max_sections": 2, "partial": False, "sigma_max": 3.0},
    {"type": "grayscale", "p": 0.5, "contrast": 0.3, "brightness": 0.3, "gamma": 1.0,
     "mode": "2d", "partial": True},
    {"type": "box", "p": 0.5, "density": 0.2, "size": [5, 20], "z_size": [1, 3],
     "modes": ["fill", "blur"]},
    {"type": "noise", "sigma_max": 0.05, "poisson": True},
    {"type": "contrast_compression", "factor": [0.5, 0.9]},
    {"type": "one_of", "probs": [0.3, 0.5],
     "of": [{"type": "lost_section"}, {"type": "noise", "p": 0.5}]},
    {"type": "compose", "p": 0.5, "of": [{"type": "flip_rotate"}, {"type": "noise"}]},
]

MODELS: list[dict[str, Any]] = [
    {"type": "rsunet", "widths": [8, 16, 32], "downsample": [[1, 2, 2], [1, 2, 2]],
     "kernel": [3, 3, 3], "anisotropic_levels": [0], "input_kernel": [1, 5, 5],
     "in_channels": 1, "norm": "group", "groups": 4, "activation": "relu",
     "upsample": "transpose"},
    {"type": "updown", "widths": [8, 16], "downsample": [[1, 2, 2]], "norm": "batch",
     "factor": [1, 2, 2], "activation": "gelu", "upsample": "interp"},
    {"type": "resenc", "widths": [8, 16, 32], "blocks": [1, 2, 2],
     "downsample": [[1, 2, 2], [1, 2, 2]], "kernel": [3, 3, 3], "anisotropic_levels": [0, 1],
     "in_channels": 1, "norm": "instance", "groups": 8, "activation": "leaky_relu",
     "upsample": "transpose"},
    {"type": "mednext", "widths": [8, 16], "blocks": [1, 1], "downsample": [[1, 2, 2]],
     "kernel": [3, 5, 5], "expansion": 2, "norm": "group", "groups": 4},
]

TASKS: list[dict[str, Any]] = [
    {"aff": {"target": {"type": "affinity", "offsets": [[-1, 0, 0], [0, -1, 0], [0, 0, -1],
                                                       [0, -4, 0]],
                        "zero": "boundary", "relabel": False},
             "loss": {"type": "malis", "long_range": 0.5}, "weight": 1.0,
             "activation": "sigmoid"}},
    {"bnd": {"target": {"type": "boundary", "width": 2},
             "loss": {"type": "bce", "margin0": 0.1, "margin1": 0.1, "margin_mode": "inverse",
                      "balance": True}, "weight": 0.5, "activation": "tanh"}},
    {"mito": {"target": {"type": "binary", "volume": "mito"},
              "loss": {"type": "dice_bce", "eps": 1.0, "dice_weight": 0.5}}},
    {"cleft": {"target": {"type": "synapse", "volume": "synapse", "dilation": 1},
               "loss": {"type": "dice", "eps": 0.5}, "activation": "none"}},
    {"lsd": {"target": {"type": "lsd", "sigma": [60.0, 30.0, 30.0], "downsample": [1, 2, 2]},
             "loss": {"type": "mse"}, "activation": "none", "weight": 0.5}},
    {"lsd": {"target": {"type": "lsd", "sigma": 60.0, "downsample": 2}}},
    {"dist": {"target": {"type": "distance", "signed": True, "clip": 100.0}}},
]

TRAINS: list[dict[str, Any]] = [
    {"patch": [12, 64, 64], "batch_size": 2, "iterations": 100,
     "optimizer": {"type": "sgd", "lr": 0.01, "momentum": 0.9, "nesterov": True,
                   "weight_decay": 0.0001},
     "schedule": {"type": "step", "warmup": 5, "milestones": [50, 80], "gamma": 0.5},
     "precision": "bf16", "compile": False, "channels_last": True, "deterministic": True,
     "grad_clip": 1.0, "accumulate": 2, "ema": 0.99, "checkpoint_every": 50,
     "keep_checkpoints": 2, "validate_every": 50, "validate_segmentation": True,
     "validate_connected_truth": False, "validate_in_background": None, "log_every": 10,
     "image_every": 0, "workers": 1},
    {"patch": [12, 64, 64], "iterations": 100,
     "optimizer": {"type": "adamw", "lr": 0.001, "betas": [0.9, 0.99], "eps": 1e-8,
                   "weight_decay": 0.01},
     "schedule": {"type": "poly", "warmup": 0, "power": 0.9}},
    {"patch": [12, 64, 64], "iterations": 100, "optimizer": {"type": "adam"},
     "schedule": {"type": "cosine", "warmup": 10, "min_factor": 0.01}},
    {"patch": [12, 64, 64], "iterations": 100, "schedule": {"type": "constant", "warmup": 3}},
]

INFERS: list[dict[str, Any]] = [
    {"patch": [12, 64, 64], "stride": [8, 48, 48], "blend": {"type": "gaussian", "sigma": 0.2},
     "tta": 4, "tta_reduce": {"aff": "min"}, "batch_size": 2, "precision": "fp16",
     "dtype": "float16", "chunks": [12, 64, 64], "block": [24, 128, 128], "compile": False,
     "compile_mode": "max-autotune", "channels_last": False},
    {"overlap": [0.25, 0.5, 0.0], "blend": {"type": "bump"}, "tta": 16, "dtype": "float32"},
]

SEGMENTS: list[dict[str, Any]] = [
    {"type": "mws", "bias": 0.3, "min_size": 10},
    {"type": "waterz", "thresholds": [0.3, 0.5], "scoring": "p85", "min_size": 5},
    {"type": "cc", "threshold": 0.5, "min_size": 0},
]


def recipe_with(section: str, value: Any) -> dict[str, Any]:
    data = copy.deepcopy(MINI)
    data[section] = copy.deepcopy(value)
    return data


def focused_bases() -> list[tuple[str, dict[str, Any], str]]:
    """(id, a valid recipe, the top-level section whose keys are mutated)."""
    bases = [("top", {**copy.deepcopy(MINI), "description": "d", "seed": 2, "extends": None},
              "")]
    bases.append(("data", recipe_with("data", {"sources": {"vol": VOLUME, "syn": SYNTHETIC},
                                               "validation": {"val": VOLUME}}), "data"))
    bases += [(f"augment-{a['type']}", recipe_with("augment", [a]), "augment") for a in AUGMENTS]
    bases += [(f"model-{m['type']}", recipe_with("model", m), "model") for m in MODELS]
    bases += [(f"tasks-{i}", recipe_with("tasks", t), "tasks") for i, t in enumerate(TASKS)]
    bases += [(f"train-{i}", recipe_with("train", t), "train") for i, t in enumerate(TRAINS)]
    infers = [recipe_with("infer", i) for i in INFERS]
    infers[0]["tasks"] = {"aff": {"target": {"type": "affinity"}}}
    bases += [(f"infer-{i}", d, "infer") for i, d in enumerate(infers)]
    bases += [(f"segment-{s['type']}", recipe_with("segment", s), "segment") for s in SEGMENTS]
    return bases


BASES = focused_bases()


@pytest.mark.parametrize("name, data, section", BASES, ids=[b[0] for b in BASES])
def test_every_focused_base_is_valid_under_both(name, data, section):
    assert emrun_verdict(data) == ("ok", set())
    assert loader_accepts(data)
    errors = [e.message for e in VALIDATOR.iter_errors(data)]
    assert not errors, errors


# --- mutations --------------------------------------------------------------------------

DEL = object()
INT_BOUNDS = [-1, 0, 1, 2, 3, 8, 9, 16, 17, 64, 65, 256, 257, 1024, 1025, 4096, 4097,
              10_000, 10_001, 10**6, 10**6 + 1, 10**9, 10**9 + 1, 2**63 - 1, 2**63]
FLOAT_BOUNDS = [-1.0, -1e-9, 0.0, 1e-9, 0.4999999, 0.5, 0.9999999, 1.0000001, 4.0, 4.0000001,
                10.0, 10.0000001, 100.0, 100.0000001, 180.0, 180.0000001, 10_000.0, 10_000.001,
                1e6, 1e6 + 0.1, 1e300]
TYPE_NAMES = sorted({name for registry in ALL.values() for name in registry.names()}
                    | {"adam", "adamw", "sgd", "constant", "step", "cosine", "poly"})
NAMED_MAPPINGS = {("data", "sources"), ("data", "validation"), ("tasks",)}
"""Mappings whose keys are names (the `Name` pattern); `semantic` keys are names too."""


def walk(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], Any]]:
    yield path, value
    if isinstance(value, dict):
        for key, item in value.items():
            yield from walk(item, (*path, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from walk(item, (*path, i))


def replaced(data: Any, path: tuple[Any, ...], value: Any) -> Any:
    data = copy.deepcopy(data)
    parent = data
    for key in path[:-1]:
        parent = parent[key]
    if value is DEL:
        del parent[path[-1]]
    else:
        parent[path[-1]] = copy.deepcopy(value)
    return data


def renamed_key(data: Any, path: tuple[Any, ...], new: str) -> Any:
    data = copy.deepcopy(data)
    parent = data
    for key in path:
        parent = parent[key]
    old = next(iter(parent))
    parent[new] = parent.pop(old)
    return data


def mutations_of(value: Any, path: tuple[Any, ...]) -> list[tuple[str, Any]]:
    """(label, new value) for the value at ``path``."""
    common: list[tuple[str, Any]] = [("null", None), ("text", "zz"), ("list", []),
                                     ("mapping", {})]
    if isinstance(value, bool):
        return [*common, ("int 0", 0), ("int 1", 1), ("int 2", 2), ("float 1.0", 1.0),
                ("text true", "true"), ("text yes", "yes"), ("flip", not value)]
    if isinstance(value, int):
        return [*common, ("true", True), ("false", False), ("float 1.5", 1.5),
                ("float integral", float(value)), ("numeric text", str(value)),
                *((f"int {v}", v) for v in INT_BOUNDS)]
    if isinstance(value, float):
        return [*common, ("true", True), ("numeric text", repr(value)),
                *((f"float {v!r}", v) for v in FLOAT_BOUNDS), ("int 1", 1), ("int 0", 0)]
    if isinstance(value, str):
        found = [("null", None), ("int", 1), ("true", True), ("list", []), ("mapping", {}),
                 ("empty", ""), ("bogus", "zz_bogus")]
        if path and path[-1] == "type":
            found += [(f"type {name}", name) for name in TYPE_NAMES if name != value]
            found.append(("misspelt", value[:-1]))
        return found
    if isinstance(value, list):
        found = [("null", None), ("text", "zz"), ("empty list", []), ("mapping", {}),
                 ("scalar", 1), ("dropped last", value[:-1]), ("doubled", value + value)]
        if value and all(isinstance(v, int | float) and not isinstance(v, bool)
                         for v in value):
            found += [("two", [1, 2]), ("four", [1, 2, 3, 4]), ("texts", ["a"] * len(value))]
        return found
    if isinstance(value, dict):
        found = [("null", None), ("text", "zz"), ("list", []), ("empty mapping", {}),
                 ("+unknown key", {**value, "zz_unknown": 1})]
        if "type" in value:
            found += [("-type", {k: v for k, v in value.items() if k != "type"}),
                      ("type bogus", {**value, "type": "zz_bogus"})]
        return found
    if value is None:
        return [("text", "zz"), ("int", 1), ("true", True), ("list", []), ("mapping", {})]
    raise AssertionError(f"unexpected value {value!r}")


def all_mutations() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(id, mutated recipe, what the mutation was) for every focused base."""
    found = []
    for base_id, base, section in BASES:
        start = (section,) if section else ()
        for path, value in walk(base[section] if section else base, start):
            if not path or (not section and path[0] in ("data", "augment", "model", "tasks",
                                                        "train", "infer", "segment")):
                continue
            for label, new in mutations_of(value, path):
                found.append((base_id, replaced(base, path, new),
                              {"path": path, "label": label, "value": new, "old": value}))
            if isinstance(path[-1], str):
                found.append((base_id, replaced(base, path, DEL),
                              {"path": path, "label": "DEL", "value": DEL, "old": value}))
            if path in NAMED_MAPPINGS or path[-1] == "semantic":
                for bad in ("my name", "9lives", "a" * 65, "x.y"):
                    found.append((base_id, renamed_key(base, path, bad),
                                  {"path": path, "label": f"name {bad!r}", "value": bad,
                                   "old": value}))
    return found


@functools.cache
def mutations() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    return all_mutations()


# --- the expected differences and the known bugs, each as narrow as it can be -------------

CROSS_FIELD = {"value_error", "assertion_error"}
"""pydantic's error types for a (model or field) validator's refusal."""


def expected_difference(mutation: dict[str, Any], emrun: str, types: set[str]) -> bool:
    """A difference a JSON Schema cannot avoid (see the module docstring)."""
    if emrun == "cross":
        return True  # cross-section checks: refused by emrun, accepted by the schema
    if emrun == "refused" and types and types <= CROSS_FIELD:
        return True  # a validator's check (ordered pairs, counts per level, ...)
    label, path, value = mutation["label"], mutation["path"], mutation["value"]
    if (emrun == "refused" and path[0] == "tasks" and path[-1] not in ALL["targets"].names()
            and ((len(path) == 2 and label == "empty mapping")
                 or (len(path) == 3 and path[2] == "target" and label == "DEL"))):
        return True  # a task may omit `target` only when named after a target type
    # 1.0 is an integer to JSON Schema; emrun's counts are strict
    return (emrun == "refused" and isinstance(value, float) and value.is_integer()
            and not isinstance(mutation["old"], bool))


def known_bug(mutation: dict[str, Any], emrun: str) -> str | None:
    """The xfail test below that pins this disagreement, or None."""
    label, path, old = mutation["label"], mutation["path"], mutation["old"]
    if label == "-type" or (label == "DEL" and path[-1] == "type"):
        return "test_a_mapping_without_its_type_is_refused_by_both"
    if label == "empty mapping" and len(path) == 3 and path[:2] in NAMED_MAPPINGS:
        return "test_a_source_without_type_is_a_volume_source_for_both"
    if label.startswith("name "):
        return "test_names_used_as_keys_are_refused_by_both_when_malformed"
    if emrun == "ok" and (label == "numeric text" or (
            (old is None or isinstance(old, bool))
            and label in ("int 0", "int 1", "int", "float 1.0", "text true", "text yes"))):
        return "test_lax_values_agree"
    if label == "null" and len(path) == 2 and path[0] == "tasks":
        return "test_a_task_left_empty_agrees"
    return None


def test_the_sweep_is_large_and_covers_every_registered_type():
    assert len(mutations()) > 10_000
    models = {b[1]["model"]["type"] for b in BASES if b[2] == "model"}
    assert set(ALL["models"].names()) == models
    assert {b[1]["data"]["sources"][k]["type"] for b in BASES if b[2] == "data"
            for k in b[1]["data"]["sources"]} == set(ALL["sources"].names())
    augment_types = {b[1]["augment"][0]["type"] for b in BASES if b[2] == "augment"}
    assert set(ALL["augmentations"].names()) == augment_types
    targets = {t["target"]["type"] for b in BASES if b[2] == "tasks"
               for t in b[1]["tasks"].values()}
    assert set(ALL["targets"].names()) == targets
    losses = {t["loss"]["type"] for b in BASES if b[2] == "tasks"
              for t in b[1]["tasks"].values() if "loss" in t}
    assert set(ALL["losses"].names()) == losses
    assert {s["type"] for s in SEGMENTS} == set(ALL["segmenters"].names())
    assert {i["blend"]["type"] for i in INFERS} == set(ALL["blends"].names())


def sweep(base_prefix: str) -> tuple[int, list[str]]:
    checked, disagreements = 0, []
    for base_id, data, mutation in mutations():
        if not base_id.startswith(base_prefix):
            continue
        emrun, types = emrun_verdict(data)
        schema = schema_accepts(data)
        if (emrun == "ok") == schema:
            checked += 1
            continue
        if expected_difference(mutation, emrun, types) or known_bug(mutation, emrun):
            continue
        disagreements.append(f"{base_id}: {'.'.join(map(str, mutation['path']))} "
                             f"{mutation['label']}: emrun {emrun} {sorted(types)}, schema "
                             f"{'accepts' if schema else 'refuses'}")
    return checked, disagreements


@pytest.mark.parametrize("prefix", ["top", "data", "augment", "model", "tasks", "train",
                                    "infer", "segment"])
def test_schema_and_emrun_agree_on_every_single_key_mutation(prefix):
    checked, disagreements = sweep(prefix)
    assert checked > 40
    assert not disagreements, "\n".join(disagreements[:40])


def test_the_replica_of_emruns_verdict_is_the_loaders():
    """`emrun_verdict` is what `emrun validate` decides, on a sample of the mutations."""
    for _, data, _ in mutations()[::37]:
        assert (emrun_verdict(data)[0] == "ok") == loader_accepts(data)


# --- the schema file, the shipped recipes and the corpus ----------------------------------

def test_the_schema_is_a_valid_draft_2020_12_schema():
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    assert SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    whole = SCHEMA["$defs"]["Recipe"]  # required unless the recipe extends a base
    assert {"name", "data", "model", "tasks", "train"} == set(whole["required"])
    assert SCHEMA["additionalProperties"] is False and whole["additionalProperties"] is False
    assert SCHEMA["else"] == {"$ref": "#/$defs/Recipe"} and "required" not in SCHEMA


def test_the_committed_schema_is_what_emrun_schema_prints(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    printed = runner.invoke(app, ["schema", "--output", "-"])
    assert printed.exit_code == 0, printed.output
    committed = (ROOT / "emrun" / "schemas" / "recipe.schema.json").read_text("utf-8")
    assert printed.stdout == committed == recipe_schema_text()
    assert (ROOT / "schemas" / "recipe.schema.json").read_text("utf-8") == committed
    assert json.loads(committed) == SCHEMA


@pytest.mark.parametrize("path", [*SHIPPED, CORPUS / "_base.yaml"], ids=lambda p: p.stem)
def test_shipped_recipes_validate_under_both_after_extends(path):
    loaded = load_recipe(path)
    written = loaded.source.data  # as written, bases merged in, no defaults filled
    assert "extends" not in written
    assert schema_accepts(written), [e.message for e in VALIDATOR.iter_errors(written)]
    resolved = loaded.recipe.resolved()  # what `emrun validate --print` shows
    assert schema_accepts(resolved), [e.message for e in VALIDATOR.iter_errors(resolved)]
    assert emrun_verdict(written) == ("ok", set())


def test_the_recipes_folder_is_the_shipped_one():
    assert sorted(p.name for p in (ROOT / "recipes").glob("*.yaml")) == [p.name for p in SHIPPED]
    for path in SHIPPED:
        assert (ROOT / "recipes" / path.name).read_bytes() == path.read_bytes()


def test_extends_takes_a_name_a_list_or_null_under_both():
    for value, ok in ((None, True), ([], True), ("base.yaml", True), (["a.yaml", "b.yaml"], True),
                      (3, False), ([3], False), ({"a": 1}, False), (True, False)):
        data = {**copy.deepcopy(MINI), "extends": value}
        # pydantic judges the key as the schema does: the loader resolves it before
        assert (emrun_verdict(data)[0] == "ok") == schema_accepts(data) == ok, value


CORPUS_CASES = sorted(p for p in CORPUS.glob("*.yaml") if not p.name.startswith("_"))
CORPUS_EXPECTED = {
    # cross-section checks and validators (module docstring)
    "all_weights_zero", "binary_volume_absent", "displacement_exceeds_patch",
    "distance_clip_below_voxel", "downsample_wrong_count", "group_norm_not_divisible",
    "infer_patch_not_divisible", "infer_stride_exceeds_patch", "intensity_unordered",
    "lsd_sigma_below_voxel", "lsd_sigma_beyond_patch", "malis_without_affinity",
    "malis_without_nearest_offsets", "mednext_kernel_below_factor", "offsets_exceed_patch",
    "one_of_probs_too_many", "patch_not_divisible", "resenc_blocks_wrong_count",
    "resenc_patch_not_divisible", "roi_smaller_than_patch", "stride_and_overlap",
    "synthetic_shape_smaller_than_patch", "tta_reduce_unknown_task",
    "task_without_target",  # `mito` is no target type: only then is `target` required
    "nan_lr",  # JSON has no NaN
    # YAML-level problems the data no longer shows (PyYAML keeps the last duplicate; JSON
    # writes YAML's true as the key "true", a name)
    "duplicate_key", "duplicate_key_nested", "task_key_read_as_true_empty_body",
}


def _json_keys(data: Any, done: dict[int, Any] | None = None) -> Any:
    """``data`` with every mapping key a string, as JSON writes it (YAML reads `0x10:` as 16
    and `yes:` as true); a value reached twice (an alias) is converted once."""
    done = {} if done is None else done
    if id(data) in done:
        return done[id(data)]
    if isinstance(data, dict):
        done[id(data)] = {(k if isinstance(k, str) else json.dumps(k)): _json_keys(v, done)
                          for k, v in data.items()}
    elif isinstance(data, list):
        done[id(data)] = [_json_keys(v, done) for v in data]
    else:
        return data
    return done[id(data)]


def corpus_data(path: Path) -> Any:
    try:
        data = yaml.safe_load(path.read_text("utf-8"))
    except (yaml.YAMLError, ValueError, KeyError, AttributeError, TypeError):
        return None  # a tag that cannot read its value (!!int one): PyYAML's own errors
    try:
        return _json_keys(data)
    except RecursionError:  # nested too deeply to walk: its keys are strings anyway
        return data


@pytest.mark.parametrize("path", CORPUS_CASES, ids=lambda p: p.stem)
def test_the_bad_recipe_corpus_is_refused_by_the_schema_too(path):
    """Every near-valid recipe with one deliberate problem that the schema can judge."""
    data = corpus_data(path)
    if data is None or (isinstance(data, dict) and "extends" in data):
        pytest.skip("a YAML error or a partial recipe: not the schema's to judge")
    with pytest.raises(RecipeError):
        load_recipe(path)
    stem = path.stem
    if stem in CORPUS_EXPECTED:
        assert schema_accepts(data)  # the difference is known; see the xfail tests
        return
    assert not schema_accepts(data)


# --- known disagreements -----------------------------------------------------------------

UNTYPED = [
    ("augment", ["augment"], [{"rot_max": 30.0}]),
    ("model", ["model"], {"widths": [8, 16], "expansion": 2}),
    ("target", ["tasks", "aff", "target"], {"offsets": [[-1, 0, 0], [0, -1, 0]]}),
    ("loss", ["tasks", "aff", "loss"], {"margin0": 0.1}),
    ("optimizer", ["train", "optimizer"], {"lr": 0.01, "momentum": 0.5}),
    ("schedule", ["train", "schedule"], {"milestones": [5]}),
    ("blend", ["infer", "blend"], {"sigma": 0.2}),
    ("segmenter", ["segment"], {"threshold": 0.4}),
]


def at(data: dict[str, Any], keys: list[str], value: Any) -> dict[str, Any]:
    data = copy.deepcopy(data)
    parent = data
    for key in keys[:-1]:
        parent = parent.setdefault(key, {})
    parent[keys[-1]] = value
    return data


@pytest.mark.parametrize("kind, keys, value", UNTYPED, ids=[u[0] for u in UNTYPED])
def test_a_mapping_without_its_type_is_refused_by_both(kind, keys, value):
    data = at(MINI, keys, value)
    assert emrun_verdict(data)[0] == "refused"  # "missing `type:`"
    assert not schema_accepts(data)


@pytest.mark.parametrize("source", [{}, {"shape": [16, 64, 64], "seed": 3}, {"weight": 1.0}],
                         ids=["empty", "synthetic-keys", "weight"])
def test_a_source_without_type_is_a_volume_source_for_both(source):
    data = at(MINI, ["data", "sources", "s"], source)
    assert emrun_verdict(data)[0] == "refused"  # volume: image missing, shape unknown
    assert not schema_accepts(data)


def test_a_source_without_type_naming_an_image_is_a_volume_source_for_both():
    data = at(MINI, ["data", "sources", "s"], {"image": "a.zarr/image"})
    assert emrun_verdict(data)[0] == "ok" and schema_accepts(data)
    data = at(MINI, ["data", "sources", "s"], {"image": "a.zarr/image", "seed": 1})
    assert emrun_verdict(data)[0] == "refused" and not schema_accepts(data)


NAMED = [
    ("task", ["tasks"], "aff"),
    ("source", ["data", "sources"], "s"),
    ("validation", ["data", "validation"], None),
    ("semantic", ["data", "sources", "v", "semantic"], None),
]


@pytest.mark.parametrize("bad", ["my task", "9lives", "x.y"])
@pytest.mark.parametrize("kind, keys, old", NAMED, ids=[n[0] for n in NAMED])
def test_names_used_as_keys_are_refused_by_both_when_malformed(kind, keys, old, bad):
    data = copy.deepcopy(MINI)
    data["data"]["sources"]["v"] = {"image": "a.zarr/image", "semantic": {"mito": "a.zarr/m"}}
    data["data"]["validation"] = {"val": {"type": "synthetic"}}
    parent = data
    for key in keys:
        parent = parent[key]
    parent[bad] = parent.pop(old if old is not None else next(iter(parent)))
    assert emrun_verdict(data)[0] == "refused"
    assert not schema_accepts(data)


def test_names_used_as_keys_too_long_are_refused_by_both():
    data = at(MINI, ["tasks"], {"a" * 65: {"target": {"type": "affinity"}}})
    assert emrun_verdict(data)[0] == "refused" and not schema_accepts(data)
    data = at(MINI, ["tasks"], {"a" * 64: {"target": {"type": "affinity"}}})
    assert emrun_verdict(data)[0] == "ok" and schema_accepts(data)


LAX = [
    ("bool-from-int", ["train", "compile"], 1),
    ("bool-from-text", ["train", "deterministic"], "yes"),
    ("bool-from-float", ["infer", "channels_last"], 0.0),
    ("optional-bool-from-int", ["train", "validate_in_background"], 0),
    ("int-from-text", ["train", "workers"], "3"),
]


def test_a_number_written_as_text_is_read_by_emrun_and_flagged_by_the_schema():
    """The one lax reading left, an expected difference: float fields take numeric text
    (`grad_clip: '0.5'`, pydantic's lax floats), which the schema (and so an editor) flags."""
    data = at(MINI, ["train", "grad_clip"], "0.5")
    assert emrun_verdict(data)[0] == "ok" and not schema_accepts(data)


@pytest.mark.parametrize("kind, keys, value", LAX, ids=[x[0] for x in LAX])
def test_lax_values_agree(kind, keys, value):
    data = at(MINI, keys, value)
    assert (emrun_verdict(data)[0] == "ok") == schema_accepts(data)


def test_strict_fields_agree_on_booleans_and_text():
    """Counts and sizes are strict (types.py), and the loader refuses YAML booleans where
    numbers belong: both say no."""
    for keys, value in ((["train", "iterations"], "10"), (["train", "batch_size"], True),
                        (["infer", "tta"], True), (["tasks", "aff", "weight"], False),
                        (["train", "patch"], [12, "64", 64]), (["seed"], "1")):
        data = at(MINI, keys, value)
        assert emrun_verdict(data)[0] == "refused" and not schema_accepts(data), keys


def test_a_task_left_empty_agrees():
    data = at(MINI, ["tasks"], {"aff": {"target": {"type": "affinity"}}, "lsd": None})
    data["train"]["patch"] = [24, 96, 96]
    assert emrun_verdict(data)[0] == "ok"
    assert schema_accepts(data)


def test_a_task_named_after_its_target_may_omit_it_under_both():
    data = at(MINI, ["tasks"], {"affinity": {"weight": 0.5}})
    assert emrun_verdict(data)[0] == "ok" and schema_accepts(data)
    data = at(MINI, ["tasks"], {"affinity": {}})
    assert emrun_verdict(data)[0] == "ok" and schema_accepts(data)


PARTIAL = [p.stem for p in SHIPPED if "extends:" in p.read_text("utf-8")] + ["child"]


@pytest.mark.parametrize("stem", PARTIAL)
def test_a_valid_partial_recipe_is_accepted_by_the_schema_its_header_names(stem, tmp_path):
    path = ROOT / "emrun" / "recipes" / f"{stem}.yaml"
    if stem == "child":  # a child of the corpus's valid base, as a user writes one
        path = tmp_path / "child.yaml"
        path.write_text(f"extends: {CORPUS / '_base.yaml'}\nname: child\n"
                        "train: {iterations: 20}\n", "utf-8")
    load_recipe(path)  # emrun validate accepts it
    data = yaml.safe_load(path.read_text("utf-8"))
    assert schema_accepts(data), [e.message for e in VALIDATOR.iter_errors(data)]


def test_a_shipped_partial_recipe_names_the_schema_in_its_first_line():
    assert "snemi3d_lsd" in PARTIAL
    first = (ROOT / "emrun" / "recipes" / "snemi3d_lsd.yaml").read_text("utf-8").split("\n")[0]
    assert first == "# yaml-language-server: $schema=../schemas/recipe.schema.json"


PER_VALUE = [
    ("betas-1", ["train", "optimizer"], {"type": "adam", "betas": [0.9, 1.0]}),
    ("betas-negative", ["train", "optimizer"], {"type": "adam", "betas": [-0.1, 0.9]}),
    ("overlap-1", ["infer", "overlap"], [0.25, 1.0, 0.25]),
    ("overlap-negative", ["infer", "overlap"], [0.25, -0.5, 0.25]),
    ("even-kernel", ["model"], {"type": "rsunet", "widths": [8, 16], "kernel": [3, 4, 3]}),
    ("even-input-kernel", ["model"], {"type": "rsunet", "widths": [8, 16],
                                      "input_kernel": [1, 4, 5]}),
    ("zero-offset", ["tasks", "aff", "target"], {"type": "affinity",
                                                 "offsets": [[-1, 0, 0], [0, 0, 0]]}),
    ("duplicate-offsets", ["tasks", "aff", "target"], {"type": "affinity",
                                                       "offsets": [[-1, 0, 0], [-1, 0, 0]]}),
    ("box-size-0", ["augment"], [{"type": "box", "size": [0, 5]}]),
    ("anisotropic-level-negative", ["model"], {"type": "rsunet", "widths": [8, 16],
                                               "anisotropic_levels": [-1]}),
]


@pytest.mark.parametrize("kind, keys, value", PER_VALUE, ids=[x[0] for x in PER_VALUE])
def test_one_value_checks_are_in_the_schema(kind, keys, value):
    data = at(MINI, keys, value)
    assert emrun_verdict(data)[0] == "refused"
    assert not schema_accepts(data)


def test_the_same_values_just_inside_pass_both():
    for keys, value in ((["train", "optimizer"], {"type": "adam", "betas": [0.0, 0.9999]}),
                        (["infer", "overlap"], [0.0, 0.999, 0.5]),
                        (["model"], {"type": "rsunet", "widths": [8, 16], "kernel": [1, 5, 3]}),
                        (["tasks", "aff", "target"], {"type": "affinity",
                                                      "offsets": [[-1, 0, 0], [1, 0, 0]]}),
                        (["augment"], [{"type": "box", "size": [1, 5], "z_size": [1, 1]}])):
        data = at(MINI, keys, value)
        assert emrun_verdict(data)[0] == "ok" and schema_accepts(data), keys


def test_json_numbers_cannot_tell_1_0_from_1_nor_carry_nan():
    """The expected differences the sweep skips, pinned: a JSON Schema integer is any number
    with no fractional part, and JSON has no NaN (an upper bound, where there is one, still
    refuses infinity)."""
    data = at(MINI, ["train", "iterations"], 10.0)
    assert emrun_verdict(data)[0] == "refused" and schema_accepts(data)
    data = at(MINI, ["train", "optimizer"], {"type": "adam", "lr": math.nan})
    assert emrun_verdict(data)[0] == "refused" and schema_accepts(data)
    data = at(MINI, ["tasks", "aff", "weight"], math.inf)
    assert emrun_verdict(data)[0] == "refused" and not schema_accepts(data)


def test_augmentation_presets_under_both():
    for value, ok in (("deepem", True), ("none", True), ([], True), ("DeepEM", False),
                      ("deepem ", False), ("", False), (None, False), ({"type": "warp"}, False),
                      (["deepem"], False)):
        data = at(MINI, ["augment"], value)
        data["train"]["patch"] = [20, 256, 256]  # deepem's displacements fit it
        data["data"]["sources"]["s"]["shape"] = [40, 512, 512]
        assert (emrun_verdict(data)[0] == "ok") == schema_accepts(data) == ok, value
