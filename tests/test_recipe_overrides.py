"""`-o key.path=value` overrides: what they create, and which problems they are blamed for."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import MINIMAL

from emrun.recipe import RecipeError, load_recipe

VALID_LSD = MINIMAL.replace("patch: [8, 32, 32]", "patch: [16, 64, 64]").replace(
    "    target: {type: affinity}\n",
    "    target: {type: affinity}\n  lsd:\n    target: {type: lsd, sigma: 60}\n")
"""A valid recipe with an affinity task (bce loss) and an lsd task (mse loss by default)."""


def problems(path: Path, *overrides: str) -> list[str]:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides)
    return [str(p) for p in info.value.problems]


def line_of(path: Path, text: str) -> int:
    return next(n for n, line in enumerate(path.read_text().splitlines(), 1) if text in line)


# ------------------------------------------------------------- sections an override creates


def test_an_override_of_one_field_of_a_section_the_recipe_leaves_out_starts_from_its_default(
        write):
    path = write(MINIMAL)  # no optimizer, schedule, blend or segment
    recipe = load_recipe(path, ["train.optimizer.lr=0.01", "train.schedule.warmup=2",
                                "segment.bias=0.25", "infer.blend.type=gaussian"]).recipe
    assert (recipe.train.optimizer.type, recipe.train.optimizer.lr) == ("adam", 0.01)
    assert (recipe.train.schedule.type, recipe.train.schedule.warmup) == ("constant", 2)
    assert (recipe.segment.type, recipe.segment.bias) == ("mws", 0.25)
    assert recipe.infer.blend.type == "gaussian"
    # the recipe's own `type:` is kept
    sgd = write(MINIMAL + "  optimizer: {type: sgd}\n", "sgd.yaml")
    assert load_recipe(sgd, ["train.optimizer.lr=0.5"]).recipe.train.optimizer.type == "sgd"


def test_a_created_section_is_what_the_recipe_would_have_there_not_a_fixed_default(write):
    """A task's loss follows its target (mse for lsd): an override of a loss field must not
    make it the loss field's declared default (bce), which would train lsd with bce."""
    path = write(VALID_LSD)
    recipe = load_recipe(path, ["tasks.affinity.loss.balance=true"]).recipe
    assert recipe.tasks["affinity"].loss.type == "bce" and recipe.tasks["affinity"].loss.balance
    assert recipe.tasks["lsd"].loss.type == "mse"
    [msg] = problems(path, "tasks.lsd.loss.balance=true")  # mse has no `balance`
    assert msg.startswith("override -o tasks.lsd.loss.balance=true: tasks.lsd.loss.balance: "
                          "unknown key 'balance'")
    # a task made by the override: its target from its name, its loss from its target
    recipe = load_recipe(path, ["tasks.distance.target.clip=50"]).recipe
    assert recipe.tasks["distance"].target.type == "distance"
    assert recipe.tasks["distance"].loss.type == "mse"


def test_problems_of_a_section_an_override_created_are_blamed_on_the_override(write):
    path = write(MINIMAL)
    [msg] = problems(path, "train.optimzer.lr=1")
    assert msg == ("override -o train.optimzer.lr=1: train.optimzer: unknown key 'optimzer'; "
                   "did you mean 'optimizer'?")
    [msg] = problems(path, "train.schedule.type=step")
    assert msg == ("override -o train.schedule.type=step: train.schedule.milestones: required "
                   "key is missing")
    [msg] = problems(path, "tasks.new.loss.balance=true")  # no target to take one from
    assert msg.startswith("override -o tasks.new.loss.balance=true: tasks.new.target: ")


# ------------------------------------------------- problems above the key an override set


def test_a_problem_of_a_list_or_mapping_an_override_changed_is_blamed_on_it(write):
    path = write(MINIMAL.replace("target: {type: affinity}",
                                 "target: {type: affinity, offsets: [[-1, 0, 0], [0, -1, 0]]}")
                 + "  optimizer: {type: adam, betas: [0.9, 0.99]}\n")
    [msg] = problems(path, "tasks.affinity.target.offsets.0.0=0")
    assert msg == ("override -o tasks.affinity.target.offsets.0.0=0: "
                   "tasks.affinity.target.offsets: offset 0 is (0, 0, 0); offsets must be non-zero")
    [msg] = problems(path, "train.optimizer.betas.0=1.5")  # a check of the whole optimizer
    assert msg.startswith("override -o train.optimizer.betas.0=1.5: train.optimizer.betas: "
                          "betas must be in [0, 1)")
    # a check across sections: offsets that the override made too long for its patch
    [msg] = problems(path, "infer.patch=[1, 2, 2]")
    assert msg.startswith("override -o infer.patch=[1, 2, 2]: tasks.affinity.target.offsets: "
                          "offsets reach")
    # several overrides: each problem is blamed on the one that brought it
    msgs = problems(path, "train.batch_size=2", "tasks.affinity.target.offsets.1=[0, 0, 0]",
                    "train.optimizer.betas.1=2")
    assert len(msgs) == 2
    assert any(m.startswith("override -o tasks.affinity.target.offsets.1=[0, 0, 0]: "
                            "tasks.affinity.target.offsets: offset 1 is (0, 0, 0)") for m in msgs)
    assert any(m.startswith("override -o train.optimizer.betas.1=2: train.optimizer.betas: ")
               for m in msgs)


def test_a_problem_the_file_has_anyway_stays_at_its_line(write):
    path = write(MINIMAL + "  schedule: {type: step}\n"
                 "  optimizer: {type: adam, lr: -1, betas: [2, 0.9]}\n")
    schedule, optimizer = line_of(path, "schedule:"), line_of(path, "optimizer:")
    msgs = problems(path, "train.schedule.warmup=1", "train.optimizer.lr=0.1")
    # milestones were missing before the override too; the betas check did not run while lr
    # was wrong, so its showing up now is not the override's doing
    assert sorted(msgs) == [
        f"{path}:{schedule}:13: train.schedule.milestones: required key is missing",
        f"{path}:{optimizer}:42: train.optimizer.betas: betas must be in [0, 1) (got [2.0, "
        "0.9])",
    ]


# ------------------------------------------------------------------ YAML 1.1 surprises


@pytest.mark.parametrize(("override", "hint"), [
    ("model.norm=no", "(got false); YAML reads no as false; write 'no' in quotes for the word"),
    ("model.norm=Off", "YAML reads Off as false; write 'Off' in quotes for the word"),
    ("augment=yes", "YAML reads yes as true; write 'yes' in quotes for the word"),
    ("train.iterations=1e3", "(got '1e3'); YAML reads 1e3 as a string; write 1000"),
    ("train.patch=[8, 32e0, 32]", "train.patch.1: input should be a valid integer (got '32e0'); "
     "YAML reads 32e0 as a string; write 32"),
    ("train.iterations=2e-1", "YAML reads 2e-1 as a string; write 2.0e-1"),
])
def test_a_value_yaml_reads_unexpectedly_gets_a_hint(write, override: str, hint: str):
    [msg] = problems(write(MINIMAL), override)
    assert msg.startswith(f"override -o {override}: ") and hint in msg


@pytest.mark.parametrize("override", ["model.norm='no'", "model.norm=false",
                                      "train.iterations='1e3'", "train.iterations=1.5e3x"])
def test_no_hint_for_a_value_written_as_meant(write, override: str):
    [msg] = problems(write(MINIMAL), override)
    assert "YAML reads" not in msg


def test_recipe_files_get_no_override_hints(write):
    [msg] = problems(write(MINIMAL.replace("widths: [4, 8]}", "widths: [4, 8], norm: no}")))
    assert "(got false)" in msg and "YAML reads" not in msg


# ----------------------------------------------------- the recipe a checkpoint carries


def test_problems_in_a_checkpoint_s_recipe_name_the_checkpoint_not_a_temp_file(
        tmp_path, monkeypatch):
    from emrun.infer.checkpoint_recipe import recipe_for
    from emrun.io.package import write_package

    monkeypatch.chdir(tmp_path)  # messages name files relative to the working directory
    (tmp_path / "run").mkdir()
    checkpoint, package = tmp_path / "run" / "last.pt", tmp_path / "m.emrun"

    def save(recipe: str) -> None:
        torch.save({"iteration": 1, "model": {}, "recipe": recipe}, checkpoint)
        write_package(package, {"provenance": {"iteration": 1}}, recipe, {}, 1)

    save(MINIMAL)
    loaded = recipe_for(checkpoint, None, [])
    assert loaded.recipe.name == "tiny" and loaded.path == checkpoint
    assert recipe_for(package, None, []).recipe.name == "tiny"
    with pytest.raises(RecipeError) as info:  # an override's problem is the override's
        recipe_for(checkpoint, None, ["infer.patch=[1, 2, 2]"])
    assert str(info.value).startswith("override -o infer.patch=[1, 2, 2]: "
                                      "tasks.affinity.target.offsets: offsets reach")
    save(MINIMAL.replace("widths: [4, 8]}", "widths: [4, 8], norm: batchnorm}"))
    line = MINIMAL.splitlines().index("model: {type: rsunet, widths: [4, 8]}") + 1
    for network, shown in ((checkpoint, "run/last.pt (its recipe)"),
                           (package, "m.emrun (its recipe.yaml)")):
        with pytest.raises(RecipeError) as info:
            recipe_for(network, None, [])
        assert str(info.value).startswith(f"{shown}:{line}:"), str(info.value)
        assert "model.norm: input should be" in str(info.value)
