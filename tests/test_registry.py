"""The registry: names to specs and builders, suggestions, and third-party plugins."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from typing import Literal

import pytest
from conftest import MINIMAL
from typer.testing import CliRunner

import emrun.recipe.recipe  # noqa: F401  (its sections register the built-in specs)
from emrun.cli import app
from emrun.errors import NotImplementedYet
from emrun.registry import ALL, Registry, Spec


class Thing(Spec):
    type: Literal["thing"] = "thing"
    size: int = 1


def test_register_build_and_list():
    registry: Registry[tuple[str, int]] = Registry("widget")
    registry.register("thing")(Thing)
    assert registry.names() == ["thing"]
    with pytest.raises(NotImplementedYet, match="widget 'thing' has no implementation"):
        registry.build(Thing())

    @registry.implement("thing")
    def build(spec: Thing, scale: int = 1) -> tuple[str, int]:
        return ("built", spec.size * scale)

    assert registry.build(Thing(size=3), scale=2) == ("built", 6)


def test_register_rejects_mismatched_and_duplicate_names():
    registry: Registry[object] = Registry("widget")
    with pytest.raises(TypeError, match="Literal"):
        registry.register("other")(Thing)
    registry.register("thing")(Thing)
    with pytest.raises(ValueError, match="twice"):
        registry.register("thing")(Thing)


def test_unknown_names_get_suggestions():
    models = ALL["models"]
    assert models.suggest("rsunte") == ["rsunet"]
    assert "did you mean 'flip_rotate'" in ALL["augmentations"].unknown_message("flip")
    assert "did you mean" not in models.unknown_message("transformer")


def test_every_kind_has_its_registry():
    assert set(ALL) == {"sources", "augmentations", "models", "targets", "losses", "blends",
                        "segmenters"}
    assert {"rsunet", "updown"} <= set(ALL["models"].names())
    assert {"bump", "gaussian"} == set(ALL["blends"].names())
    assert {"mws", "waterz", "cc"} == set(ALL["segmenters"].names())


def test_plugins_register_through_entry_points(tmp_path):
    """A package exposing `emrun.plugins` adds an augmentation that recipes can name."""
    (tmp_path / "my_emrun_plugin.py").write_text(textwrap.dedent("""
        from typing import Literal
        from emrun.recipe.augment import AugmentBase
        from emrun.registry import augmentations

        @augmentations.register("sparkle")
        class Sparkle(AugmentBase):
            type: Literal["sparkle"] = "sparkle"
            amount: float = 0.1
    """))
    info = tmp_path / "my_emrun_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-emrun-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[emrun.plugins]\nsparkle = my_emrun_plugin\n")
    recipe, extra = tmp_path / "r.yaml", tmp_path / "extra.yaml"
    recipe.write_text(MINIMAL + "augment: [{type: sparkle, amount: 0.5}]\n")
    extra.write_text(MINIMAL + "augment: [{type: sparkle, amount: 0.5, colour: red}]\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    # both validations in one fresh interpreter that finds the plugin (one start-up, not two)
    both = textwrap.dedent("""
        import json, sys
        from typer.testing import CliRunner
        from emrun.cli import app
        results = [CliRunner().invoke(app, ["validate", "--no-data", path])
                   for path in sys.argv[1:]]
        print(json.dumps([[r.exit_code, r.stderr] for r in results]))
    """)
    done = subprocess.run([sys.executable, "-c", both, str(recipe), str(extra)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    (code, said), (extra_code, extra_said) = json.loads(done.stdout)
    assert code == 0, said
    assert extra_code == 2
    assert "augment.0.colour: unknown key 'colour'" in extra_said
    without = CliRunner().invoke(app, ["validate", "--no-data", str(recipe)])  # no plugin here
    assert without.exit_code == 2
    assert "unknown augmentation type 'sparkle'" in without.stderr


def test_every_builtin_name_is_implemented_by_its_package():
    """The packages that implement the kinds register a builder for every built-in spec."""
    code = textwrap.dedent("""
        import emrun.data.augment, emrun.data.sources, emrun.data.targets, emrun.infer
        import emrun.losses, emrun.models, emrun.segment
        from emrun.registry import ALL
        missing = [f"{kind} {name}" for kind, registry in ALL.items()
                   for name in registry.names() if registry.entry(name).builder is None]
        assert not missing, missing
    """)
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_class_is_built_from_its_spec_alone():
    registry: Registry[object] = Registry("widget")
    registry.register("thing")(Thing)

    @registry.implement("thing")
    class Widget:
        def __init__(self, spec: Thing) -> None:
            self.size = spec.size

    built = registry.build(Thing(size=4), context="ignored")
    assert isinstance(built, Widget) and built.size == 4


def test_plugins_load_when_names_are_first_resolved_not_on_import(tmp_path):
    (tmp_path / "noisy_emrun_plugin.py").write_text("import sys\nsys.stderr.write('LOADED')\n")
    info = tmp_path / "noisy_emrun_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: noisy\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[emrun.plugins]\nnoisy = noisy_emrun_plugin\n")
    code = textwrap.dedent("""
        import sys
        import emrun.recipe, emrun.recipe.augment, emrun.recipe.model, emrun.registry
        assert "noisy_emrun_plugin" not in sys.modules
        from emrun.recipe import Recipe
        assert "noisy_emrun_plugin" in sys.modules
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("LOADED") == 1
