"""`-o key.path=value` overrides against a plain reference: the value parsed as YAML, the key
path walked through mappings and list items, the overrides applied in order, then the data
validated with ``Recipe.model_validate``; the CLI's one-line refusals; and the recipe a run
records, resumes with and predicts with (README "`extends:` and `-o` overrides", "Training",
"Inference")."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from emrun.cli import app
from emrun.recipe import Recipe, RecipeError, load_recipe
from emrun.recipe.augment import PRESETS

runner = CliRunner()

RICH = """\
name: rich
seed: 3
description: a recipe to override
data:
  sources:
    a: {type: synthetic, shape: [32, 128, 128], seed: 1}
    b: {type: synthetic, shape: [32, 128, 128], seed: 2}
augment:
  - {type: flip_rotate}
  - {type: grayscale, p: 0.5}
  - {type: noise, p: 0.3}
model: {type: rsunet, widths: [4, 8]}
tasks:
  affinity:
    target: {type: affinity, offsets: [[-1, 0, 0], [0, -1, 0], [0, 0, -1], [0, 0, -4]]}
    loss: {type: bce, balance: true}
train:
  patch: [16, 64, 64]
  iterations: 10
  batch_size: 2
  optimizer: {type: sgd, lr: 0.1, momentum: 0.5}
infer:
  tta: 1
"""
"""A valid recipe with lists of mappings, lists of lists, several sources and a typed
section of a non-default type."""

DEFAULT_TYPES = {("train", "optimizer"): "adam", ("train", "schedule"): "constant",
                 ("infer", "blend"): "bump", ("segment",): "mws"}
"""What the README/docstring says a created typed section starts as (its default type)."""


class RefError(Exception):
    """The reference says this override is refused."""


def ref_apply(data: dict[str, Any], expr: str) -> None:
    """The plain reference: split at the first '=', the value is YAML, walk the dotted path
    (list items by index, negative from the end), create missing mappings on the way (a
    typed section as its default type), set the last key."""
    key, sep, text = expr.partition("=")
    if not sep or not key.strip():
        raise RefError(expr)
    parts = [p.strip() for p in key.split(".")]
    if "" in parts or parts[0] == "extends":
        raise RefError(expr)
    value = yaml.safe_load(text)
    node: Any = data
    walked: list[str | int] = []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            try:
                index = int(part)
            except ValueError:
                raise RefError(expr) from None
            if not -len(node) <= index < len(node):
                raise RefError(expr)
            step: str | int = index % len(node)
        elif isinstance(node, dict):
            step = part
            if not last and node.get(step) is None:
                if parts[i + 1].lstrip("-").isdigit():
                    raise RefError(expr)
                here = (*walked, step)
                node[step] = {"type": DEFAULT_TYPES[here]} if here in DEFAULT_TYPES else {}
        else:
            raise RefError(expr)
        walked.append(step)
        if last:
            node[step] = value
            return
        if walked == ["augment"] and isinstance(node[step], str):
            node[step] = copy.deepcopy(PRESETS[node[step]])
        node = node[step]


def reference(text: str, overrides: list[str]) -> dict[str, Any]:
    data = yaml.safe_load(text)
    for expr in overrides:
        ref_apply(data, expr)
    return data


def emrun_resolved(path: Path, overrides: list[str]) -> dict[str, Any]:
    return load_recipe(path, overrides).recipe.resolved()


def in_order(value: Any) -> Any:
    """``value`` with every mapping as a list of its items: dict == ignores order."""
    if isinstance(value, dict):
        return [(k, in_order(v)) for k, v in value.items()]
    if isinstance(value, list):
        return [in_order(v) for v in value]
    return value


# --------------------------------------------------- values and paths against the reference

VALID = [
    ["seed=7"],
    [" seed = 7 "],
    ["description='yes'"],
    ["description='null'"],
    ["description=\"123\""],
    ["description=a=b=c"],
    ["description=a, b; c"],
    ["description=''"],
    ["name=kid"],
    ["train.batch_size=4"],
    ["train.deterministic=true"],
    ["train.deterministic=on"],
    ["train.grad_clip=null"],
    ["train.grad_clip=~"],
    ["train.grad_clip=0.5"],
    ["train.optimizer.lr=1e-3"],
    ["train.optimizer.lr=0.25"],
    ["train.optimizer={type: adam, lr: 0.01}"],
    ["train.optimizer={type: adam}", "train.optimizer.lr=0.5"],
    ["train.optimizer.lr=0.5", "train.optimizer={type: adam}"],
    ["train.schedule.warmup=2"],
    ["train.schedule={type: step, milestones: [3, 6]}"],
    ["train.patch=[4, 16, 16]"],
    ["train.patch.0=4"],
    ["train.patch.-1=16"],
    ["train.patch.-3=4"],
    ["train.patch=[8, 64, 64]", "train.patch.1=32"],
    ["augment.1.p=0.25"],
    ["augment.-1.p=0.125"],
    ["augment.-3={type: grayscale}"],
    ["augment=none"],
    ["augment=[]"],
    ["augment=deepem"],
    ["augment=deepem", "augment.-1.p=0.5"],
    ["augment=[{type: box, p: 0.5}]", "augment.0.p=0.25"],
    ["model.widths=[4, 8, 16]"],
    ["model.widths.0=2"],
    ["model.norm=group", "model.groups=2"],
    ["model={type: rsunet, widths: [2, 4]}"],
    ["tasks.affinity.target.offsets.-1=[0, 0, -2]"],
    ["tasks.affinity.target.offsets.1.1=-2"],
    ["tasks.affinity.loss.balance=false"],
    ["tasks.affinity.weight=0.5"],
    ["tasks.boundary={target: {type: boundary}}"],
    ["data.sources.b.seed=5"],
    ["data.sources.c={type: synthetic, shape: [16, 64, 64], seed: 9}"],
    ["data.sources={z: {type: synthetic, shape: [16, 64, 64], seed: 4}}"],
    ["data.validation={v: {type: synthetic, shape: [8, 32, 32], seed: 5}}"],
    ["infer.tta=8"],
    ["infer={tta: 2}"],
    ["infer.blend.type=gaussian"],
    ["infer.overlap=[0.5, 0.25, 0.25]"],
    ["segment.bias=0.25"],
    ["train={patch: [8, 32, 32], iterations: 3}"],
    ["seed=1", "seed=2", "seed=5"],
    ["train.iterations=5", "train.batch_size=1", "train.iterations=6"],
]


@pytest.mark.parametrize("overrides", VALID, ids=lambda o: " -o ".join(o))
def test_an_override_gives_what_the_reference_edit_validates_to(overrides, tmp_path):
    path = tmp_path / "rich.yaml"
    path.write_text(RICH)
    expected = Recipe.model_validate(reference(RICH, overrides)).resolved()
    got = emrun_resolved(path, overrides)
    assert in_order(got) == in_order(expected)


def test_the_reference_cases_do_change_the_recipe(tmp_path):
    """The comparison above would pass vacuously if overrides did nothing."""
    path = tmp_path / "rich.yaml"
    path.write_text(RICH)
    plain = emrun_resolved(path, [])
    same = [o for o in VALID if emrun_resolved(path, o) == plain]
    assert same == [["train.grad_clip=null"], ["train.grad_clip=~"]]  # the default is null
    got = emrun_resolved(path, ["augment.-1.p=0.125", "train.patch.-1=16", "seed=1", "seed=2"])
    assert got["augment"][2] == {**plain["augment"][2], "p": 0.125}
    assert got["train"]["patch"] == [16, 64, 16] and got["seed"] == 2
    # a whole section replaces: the file's batch size and sgd optimizer are gone
    whole = emrun_resolved(path, ["train={patch: [8, 32, 32], iterations: 3}"])["train"]
    assert whole["batch_size"] == 1 and whole["optimizer"]["type"] == "adam"
    # a key of a section the file has keeps the file's type and other keys
    sgd = emrun_resolved(path, ["train.optimizer.lr=0.25"])["train"]["optimizer"]
    assert (sgd["type"], sgd["lr"], sgd["momentum"]) == ("sgd", 0.25, 0.5)


@pytest.mark.parametrize("override", [
    "augment.3.p=0.1", "augment.-4.p=0.1", "augment.x.p=0.1", "train.patch.3=1",
    "train.patch.x=1", "train.patch.0.z=1", "seed.x=1", "name.first=a",
    "data.sources.a.shape.-4=1", "tasks.affinity.target.offsets.4.0=1",
    "tasks.affinity.target.offsets.0.0.0=1", "train.schedule.milestones.0=3",
    "extends=x.yaml", "a..b=1", "=1", "seed",
])
def test_a_bad_path_is_refused_in_one_line_naming_the_override(override, tmp_path):
    path = tmp_path / "rich.yaml"
    path.write_text(RICH)
    with pytest.raises(RefError):
        reference(RICH, [override])
    result = runner.invoke(app, ["validate", str(path), "--no-data", "-o", override])
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: override -o {override}: "), lines
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(("override", "path_said"), [
    ("augment.3.p=0.1", "augment is a list of 3"),
    ("train.patch.x=1", "train.patch is a list of 3"),
    ("seed.x=1", "seed is 3, not a mapping"),
    ("tasks.affinity.target.offsets.0.0.0=1", "tasks.affinity.target.offsets.0.0 is -1"),
    ("train.schedule.milestones.0=3", "train.schedule.milestones is not in the recipe"),
    ("train.patch.\u0661=16", "'\u0661' is not an index"),  # an Arabic-Indic 1: not ASCII
    ("train.patch.--1=16", "'--1' is not an index"),
])
def test_the_refusal_names_the_key_path_where_the_walk_stopped(override, path_said, tmp_path):
    path = tmp_path / "rich.yaml"
    path.write_text(RICH)
    result = runner.invoke(app, ["validate", str(path), "--no-data", "-o", override])
    assert result.exit_code == 2 and path_said in result.stderr, result.stderr


@pytest.mark.parametrize("overrides", [
    ["train.iterations=0"], ["seed=-1"], ["train.optimizer.type=adamw"],
    ["seed=x", "train.batch_size=0"],
    ["model.widths=[]"], ["infer.tta=yes"], ["augment.0.p=2"], ["train.patch=[8, 32]"],
])
def test_an_override_the_reference_refuses_to_validate_is_refused(overrides, tmp_path):
    path = tmp_path / "rich.yaml"
    path.write_text(RICH)
    data = reference(RICH, overrides)
    if overrides != ["infer.tta=yes"]:  # pydantic takes true as 1; the README refuses it
        with pytest.raises(ValueError):  # pydantic's ValidationError is one
            Recipe.model_validate(data)
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides)
    assert all(str(p).startswith("override -o ") for p in info.value.problems)


def test_validate_print_is_the_reference_recipe(tmp_path):
    path = tmp_path / "rich.yaml"
    path.write_text(RICH)
    overrides = ["augment=deepem", "augment.0.p=0.25", "train.optimizer={type: adam}",
                 "train.optimizer.lr=0.5", "tasks.affinity.target.offsets.-1.2=-3"]
    args = ["validate", str(path), "--no-data", "--print"]
    for expr in overrides:
        args += ["-o", expr]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    expected = Recipe.model_validate(reference(RICH, overrides)).resolved()
    assert in_order(yaml.safe_load(result.stdout)) == in_order(expected)


# -------------------------------------------------------------------- inside an extends

BASE = """\
name: base
data:
  sources:
    a: {type: synthetic, shape: [32, 128, 128], seed: 1}
augment: deepem
model: {type: rsunet, widths: [4, 8], norm: group, groups: 2}
tasks:
  affinity:
    target: {type: affinity}
train:
  patch: [16, 64, 64]
  iterations: 10
  optimizer: {type: sgd, lr: 0.1, momentum: 0.5}
"""

CHILD = """\
extends: base.yaml
name: kid
train:
  batch_size: 3
"""

MERGED = BASE.replace("name: base", "name: kid").replace(
    "  iterations: 10\n", "  iterations: 10\n  batch_size: 3\n")
"""CHILD merged onto BASE by hand."""


@pytest.mark.parametrize("overrides", [
    ["train.optimizer.lr=0.5"],
    ["model.groups=4"],
    ["augment.1.p=0.125"],
    ["train.batch_size=1"],
    ["train.optimizer={type: adam}"],
    ["model={type: rsunet, widths: [4, 8]}"],
    ["tasks.affinity.target.offsets=[[-1, 0, 0], [0, -2, 0], [0, 0, -2]]",
     "tasks.affinity.target.offsets.0.0=-2"],
])
def test_an_override_inside_an_extended_base_is_the_reference_edit_of_the_merge(overrides,
                                                                                tmp_path):
    (tmp_path / "base.yaml").write_text(BASE)
    child = tmp_path / "child.yaml"
    child.write_text(CHILD)
    expected = Recipe.model_validate(reference(MERGED, overrides)).resolved()
    assert in_order(emrun_resolved(child, overrides)) == in_order(expected)
    assert in_order(emrun_resolved(child, [])) == in_order(
        Recipe.model_validate(yaml.safe_load(MERGED)).resolved())


# ------------------------------------------------------------ the order of mappings kept

NULL_TASK = """\
name: tiny
data:
  sources:
    a: {type: synthetic, shape: [16, 64, 64], seed: 1}
model: {type: rsunet, widths: [4, 8]}
tasks:
  boundary: null
  affinity:
    target: {type: affinity}
train:
  patch: [8, 32, 32]
  iterations: 10
"""
"""`boundary: null` is a task with its defaults (its target from its name), listed first."""


def test_an_override_into_a_null_task_keeps_the_task_order_and_the_model(tmp_path):
    path = tmp_path / "null_task.yaml"
    path.write_text(NULL_TASK)
    plain = load_recipe(path).recipe
    noop = load_recipe(path, ["tasks.boundary.weight=1.0"]).recipe
    expected = Recipe.model_validate(reference(NULL_TASK, ["tasks.boundary.weight=1.0"]))
    assert list(expected.tasks) == ["boundary", "affinity"] == list(plain.tasks)
    assert list(noop.head_channels()) == list(plain.head_channels())
    from emrun.models import build_model

    torch.manual_seed(0)
    before = build_model(plain).state_dict()
    torch.manual_seed(0)
    after = build_model(noop).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_an_override_into_a_written_task_keeps_the_task_order(tmp_path):
    path = tmp_path / "two.yaml"
    path.write_text(NULL_TASK.replace("  boundary: null\n", "  boundary: {weight: 1.0}\n"))
    recipe = load_recipe(path, ["tasks.boundary.weight=0.5"]).recipe
    assert list(recipe.tasks) == ["boundary", "affinity"]
    assert recipe.tasks["boundary"].weight == 0.5


# ------------------------------------------------------------------ the recipe a run records

TINY = """\
name: tiny_train
seed: 4
data:
  sources:
    a: {type: synthetic, shape: [12, 48, 48], seed: 1}
model: {type: rsunet, widths: [4, 8], norm: group, groups: 2}
tasks:
  affinity:
    target: {type: affinity}
train:
  patch: [4, 16, 16]
  batch_size: 1
  iterations: 1
  deterministic: true
  checkpoint_every: 1
  validate_every: 1000
  image_every: 1000
  log_every: 1
  workers: 0
infer:
  dtype: float32
  tta: 1
"""

RUN_OVERRIDES = ["model.widths=[4, 6]", "train.optimizer.lr=0.01",
                 "tasks.affinity.target.offsets=[[-1, 0, 0], [0, -2, 0], [0, 0, -2]]"]


def invoke(*args: Any) -> Any:
    return runner.invoke(app, [str(a) for a in args])


def with_overrides(overrides: list[str]) -> list[str]:
    return [arg for expr in overrides for arg in ("-o", expr)]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path]:
    """A one-iteration run of TINY trained with RUN_OVERRIDES: (recipe file, run dir)."""
    tmp = tmp_path_factory.mktemp("ovrun")
    recipe = tmp / "tiny.yaml"
    recipe.write_text(TINY)
    run_dir = tmp / "run"
    done = invoke("train", recipe, "--run-dir", run_dir, "--device", "cpu",
                  *with_overrides(RUN_OVERRIDES))
    assert done.exit_code == 0, done.output
    return recipe, run_dir


def test_the_run_records_the_recipe_with_its_overrides(run):
    recipe, run_dir = run
    saved = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    expected = Recipe.model_validate(reference(TINY, RUN_OVERRIDES)).resolved()
    assert in_order(saved) == in_order(expected)
    assert saved["model"]["widths"] == [4, 6] and saved["train"]["optimizer"]["lr"] == 0.01
    checkpoint = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert yaml.safe_load(checkpoint["recipe"]) == saved
    # validate --print with the same -o prints the same recipe
    printed = invoke("validate", recipe, "--no-data", "--print", *with_overrides(RUN_OVERRIDES))
    assert printed.exit_code == 0 and yaml.safe_load(printed.stdout) == saved


def test_resume_with_the_same_overrides_or_the_recorded_recipe_and_refused_without(run,
                                                                                  tmp_path):
    import shutil

    recipe, trained = run
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    # without the -o the model (and tasks) differ from the checkpoint's: refused, exit 2
    bare = invoke("train", recipe, "--run-dir", run_dir, "--resume", "--device", "cpu",
                  "-o", "train.iterations=2")
    assert bare.exit_code == 2, bare.output
    assert "model, tasks changed" in bare.stderr and "--init-from" in bare.stderr
    # with one -o missing (the offsets): still refused, naming only tasks
    partial = invoke("train", recipe, "--run-dir", run_dir, "--resume", "--device", "cpu",
                     *with_overrides(RUN_OVERRIDES[:2]), "-o", "train.iterations=2")
    assert partial.exit_code == 2 and "the recipe's tasks changed" in partial.stderr
    # the same -o, with more iterations: resumed to 2
    same = invoke("train", recipe, "--run-dir", run_dir, "--resume", "--device", "cpu",
                  *with_overrides(RUN_OVERRIDES), "-o", "train.iterations=2")
    assert same.exit_code == 0, same.output
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert state["iteration"] == 2
    assert yaml.safe_load((run_dir / "recipe.yaml").read_text())["train"]["iterations"] == 2
    # the run's own recorded recipe, with no -o but the longer budget, resumes it too
    recorded = tmp_path / "recorded.yaml"
    shutil.copy(run_dir / "recipe.yaml", recorded)
    again = invoke("train", recorded, "--run-dir", run_dir, "--resume", "--device", "cpu",
                   "-o", "train.iterations=3")
    assert again.exit_code == 0, again.output
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["iteration"] == 3
    # a changed optimizer setting is applied from here on, with a note naming it
    lr = invoke("train", recorded, "--run-dir", run_dir, "--resume", "--device", "cpu",
                "-o", "train.iterations=4", "-o", "train.optimizer.lr=0.02")
    assert lr.exit_code == 0, lr.output
    assert "train.optimizer.lr" in lr.output
    assert yaml.safe_load((run_dir / "recipe.yaml").read_text())["train"]["optimizer"]["lr"] \
        == 0.02
    # data and the optimizer's kind may not change; other training settings are applied
    # with a note naming each, bookkeeping quietly
    for refused, said in (("data.sources.a.seed=2", "data changed"),
                          ("train.optimizer={type: sgd}", "optimizer (adam -> sgd)")):
        done = invoke("train", recorded, "--run-dir", run_dir, "--resume", "--device", "cpu",
                      "-o", "train.iterations=5", "-o", refused)
        assert done.exit_code == 2 and said in done.stderr, done.output
    noted = invoke("train", recorded, "--run-dir", run_dir, "--resume", "--device", "cpu",
                   "-o", "train.iterations=5", "-o", "seed=9", "-o", "train.log_every=2")
    assert noted.exit_code == 0, noted.output
    assert "seed 4 -> 9" in noted.output and "log_every" not in noted.output
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["iteration"] == 5


def test_the_same_overrides_train_the_same_weights(run, tmp_path):
    """Deterministic on a CPU: the recorded recipe trained afresh gives the -o run's weights."""
    _, trained = run
    again = tmp_path / "again"
    done = invoke("train", trained / "recipe.yaml", "--run-dir", again, "--device", "cpu")
    assert done.exit_code == 0, done.output
    a = torch.load(trained / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(again / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_infer_with_the_recorded_recipe_is_the_checkpoint_s_own_prediction(run, tmp_path):
    import zarr

    recipe, run_dir = run
    image = tmp_path / "in.npy"
    np.save(image, np.random.default_rng(0).integers(0, 255, (8, 32, 32), dtype=np.uint8))
    base = ["infer", "--checkpoint", run_dir, "--input", image, "--device", "cpu"]

    def predicted(name: str, *more: Any) -> np.ndarray:
        done = invoke(*base, "--output", tmp_path / f"{name}.zarr", *more)
        assert done.exit_code == 0, done.output
        return np.asarray(zarr.open_array(str(tmp_path / f"{name}.zarr" / "affinity" / "0")))

    own = predicted("own")
    assert own.shape == (3, 8, 32, 32) and own.dtype == np.float32
    assert np.array_equal(predicted("recorded", "--recipe", run_dir / "recipe.yaml"), own)
    assert np.array_equal(predicted("same_o", "--recipe", recipe,
                                    *with_overrides(RUN_OVERRIDES)), own)
    # the original file without its -o is another network: refused, naming what differs
    other = invoke(*base, "--output", tmp_path / "other.zarr", "--recipe", recipe)
    assert other.exit_code == 2 and "model.widths" in other.stderr, other.output
    # an -o of the network onto the checkpoint's own recipe is refused too
    widths = invoke(*base, "--output", tmp_path / "w.zarr", "-o", "model.widths=[4, 8]")
    assert widths.exit_code == 2 and "changes the network" in widths.stderr, widths.output
    # an -o of how to predict is taken, and recorded with the output
    cast = predicted("u8", "-o", "infer.dtype=uint8")
    assert cast.dtype == np.uint8
    assert np.abs(cast.astype(np.float64) - np.round(255 * own)).max() <= 1
    recorded = zarr.open_group(str(tmp_path / "u8.zarr")).attrs["emrun"]["recipe"]
    saved = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    assert recorded == {**saved, "infer": {**saved["infer"], "dtype": "uint8"}}
    # --resume: the same -o finishes it, another batch size too (values unchanged), another
    # dtype is refused (its blocks would mix two)
    resume = [*base, "--output", tmp_path / "u8.zarr", "--resume"]
    assert invoke(*resume, "-o", "infer.dtype=uint8").exit_code == 0
    batch = invoke(*resume, "-o", "infer.dtype=uint8", "-o", "infer.batch_size=2")
    assert batch.exit_code == 0, batch.output
    mixed = invoke(*resume)
    assert mixed.exit_code == 2 and "infer.dtype" in mixed.stderr, mixed.output


# ------------------------------------------- a value given by -o reads as it does in a file


@pytest.mark.parametrize("value", [
    "{<<: {type: sgd, momentum: 0.3}, lr: 0.2}", "{type: !!str sgd, lr: !!float 1}",
    "{'type': \"adam\", \"lr\": 0.5}", "{type: adam, lr: 1E-2}", "{type: adam, lr: 1e-2}",
    "{type: adam, ? lr : 0.5}", "{type: adam, betas: &b [0.5, 0.5]}",
    "{type: adam, lr: 0x1}", "{type: adam, lr: 0.000_5}",
    "{type: adam, lr: 0.5, eps: .1}", "{type: sgd, lr: 0.5, nesterov: on}",
])
def test_a_value_reads_as_the_same_text_written_in_the_file(value, tmp_path):
    text = RICH.replace("  optimizer: {type: sgd, lr: 0.1, momentum: 0.5}\n", "")
    overridden = tmp_path / "o.yaml"
    overridden.write_text(text)
    written = tmp_path / "w.yaml"
    written.write_text(text.replace("  batch_size: 2\n",
                                    f"  batch_size: 2\n  optimizer: {value}\n"))
    expected = Recipe.model_validate(reference(text, [f"train.optimizer={value}"])).resolved()
    got = emrun_resolved(overridden, [f"train.optimizer={value}"])
    assert in_order(got) == in_order(expected) == in_order(emrun_resolved(written, []))
