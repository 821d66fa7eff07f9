"""The README tells the truth: CI runs its test command, its annotated recipe validates."""

from __future__ import annotations

import re

import yaml
from conftest import ROOT

from emrun.recipe import load_recipe

README = (ROOT / "README.md").read_text(encoding="utf-8")


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_ci_runs_the_readme_test_command():
    test_command = _blocks("bash")[1].strip()
    assert "pytest" in test_command
    ci_lines = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert test_command in ci_lines


def test_annotated_recipe_is_a_valid_recipe(tmp_path):
    annotated = next(b for b in _blocks("yaml") if b.startswith("# yaml-language-server"))
    data = yaml.safe_load(annotated)
    assert data.pop("extends") == "base.yaml"  # shown for illustration only
    path = tmp_path / "annotated.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    recipe = load_recipe(path).recipe
    assert set(recipe.tasks) == {"affinity", "mito", "lsd", "distance"}
    assert recipe.model_fields_set >= {"data", "augment", "model", "tasks", "train", "infer"}
