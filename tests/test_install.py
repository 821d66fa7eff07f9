"""A built wheel (not the checkout) carries what the commands need: recipes and schema."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

from conftest import ROOT


def test_a_wheel_ships_the_recipes_and_the_schema(tmp_path):
    """`pip install .` or a wheel used to lack recipes/ and schemas/ (they sat beside the
    package): `emrun recipes` and `emrun demo` failed outside a checkout."""
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                            str(tmp_path / "dist"), str(ROOT)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    [wheel] = (tmp_path / "dist").glob("emrun-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:  # a pure-Python wheel installs by unpacking
        names = archive.namelist()
        archive.extractall(site)
    assert "emrun/recipes/demo.yaml" in names and "emrun/schemas/recipe.schema.json" in names
    away = tmp_path / "elsewhere"  # no checkout around: only the wheel's files
    away.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}

    def emrun(*args):
        return subprocess.run([sys.executable, "-m", "emrun", *args], cwd=away, env=env,
                              capture_output=True, text=True)

    listed = emrun("recipes")
    assert listed.returncode == 0, listed.stderr
    assert "demo.yaml" in listed.stdout and str(site / "emrun" / "recipes") in listed.stdout
    valid = emrun("validate", str(site / "emrun" / "recipes" / "demo.yaml"), "--no-data")
    assert valid.returncode == 0, valid.stderr
