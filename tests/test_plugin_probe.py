"""Extending emrun as a newcomer would: what a plugin gets wrong is refused in one line that
names the plugin (or the model, loss, augmentation, segmenter) and what is wrong, instead of
an "internal error" deep in the trainer, a silent override or a wrong-shaped output."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from importlib.metadata import EntryPoint
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar, Literal

import numpy as np
import pytest
import torch
from conftest import MINIMAL
from pydantic import Field
from torch import nn

import emrun.registry as registry
from emrun.data.augment import Augmentation, Context, Pipeline, Sample, Step
from emrun.errors import UserError
from emrun.losses import LossResult, total_loss
from emrun.models import build_model
from emrun.recipe.augment import AugmentBase
from emrun.recipe.model import ModelBase
from emrun.recipe.run import MinSize, SegmenterBase
from emrun.registry import Entry, Registry, Spec, models
from emrun.segment.base import Segmenter
from emrun.segment.pipeline import segment_array, segment_values

# -- loading plugins ----------------------------------------------------------------------


@pytest.fixture
def fresh_plugins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    """Plugins loaded again from the entry points the test gives (modules in tmp_path)."""
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    monkeypatch.setattr(registry, "_plugin_failure", None)

    def install(source: str, name: str) -> None:
        (tmp_path / f"{name}.py").write_text(source)
        eps = [EntryPoint(name, name, registry.PLUGIN_GROUP)]
        monkeypatch.setattr(registry, "entry_points", lambda group: eps)

    return install


def test_a_plugin_that_fails_to_import_is_named_with_its_error(fresh_plugins):
    fresh_plugins("raise RuntimeError('needs CUDA 13')\n", "broken_probe_plugin")
    with pytest.raises(UserError) as caught:
        registry.load_plugins()
    message = str(caught.value)
    assert "plugin 'broken_probe_plugin'" in message
    assert "RuntimeError: needs CUDA 13" in message
    assert "\n" not in message
    with pytest.raises(UserError, match="broken_probe_plugin"):  # every time, not just once
        registry.load_plugins()


def test_a_broken_plugin_exits_2_with_one_line_and_version_still_works(tmp_path):
    (tmp_path / "crash_probe_plugin.py").write_text("import no_such_module_here\n")
    info = tmp_path / "crash_probe_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: crash-probe\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[emrun.plugins]\ncrash = crash_probe_plugin\n")
    (tmp_path / "r.yaml").write_text(MINIMAL)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    done = subprocess.run([sys.executable, "-m", "emrun", "validate", "--no-data",
                           str(tmp_path / "r.yaml")], capture_output=True, text=True, env=env)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "plugin 'crash'" in lines[0] and "crash-probe" in lines[0]
    assert "No module named 'no_such_module_here'" in lines[0]
    assert "internal error" not in done.stderr
    done = subprocess.run([sys.executable, "-m", "emrun", "--version"], capture_output=True,
                          text=True, env=env)
    assert done.returncode == 0


class Thing(Spec):
    type: Literal["thing"] = "thing"


def _builder_from(module: str) -> Any:
    def build(spec: Spec, **context: Any) -> str:
        return module

    build.__module__ = module
    return build


def test_a_plugin_cannot_silently_replace_an_implementation():
    widgets: Registry[str] = Registry("widget")
    widgets.register("thing")(Thing)
    widgets.implement("thing")(_builder_from("emrun.widgets"))
    with pytest.raises(UserError, match=r"widget 'thing' is implemented twice, in "
                       r"emrun\.widgets and in sneaky_plugin"):
        widgets.implement("thing")(_builder_from("sneaky_plugin"))
    assert widgets.build(Thing()) == "emrun.widgets"
    assert not widgets.entry("thing").third_party


def test_unknown_names_say_a_plugin_may_be_missing():
    message = models.unknown_message("toy_conv_from_a_plugin")
    assert "unknown model type 'toy_conv_from_a_plugin'" in message
    assert "needs its package installed" in message
    assert "needs its package" not in models.unknown_message("rsunte")  # a typo: did you mean


# -- models ---------------------------------------------------------------------------------


class ProbeModelSpec(ModelBase):
    type: Literal["probe_model"] = "probe_model"
    padding: int = 1
    extra: int = 0
    as_tensor: bool = False
    in_channels: int = 1
    data_dependent: bool = False

    def input_channels(self) -> int:
        return self.in_channels


class ProbeModel(nn.Module):
    def __init__(self, spec: ProbeModelSpec, head_channels: dict[str, int]) -> None:
        super().__init__()
        self.spec = spec
        self.heads = nn.ModuleDict({
            name: nn.Conv3d(1, c + spec.extra, 3, padding=spec.padding)
            for name, c in head_channels.items()})

    def forward(self, x: torch.Tensor) -> Any:
        if self.spec.data_dependent and x.mean().item() > 1e9:  # cannot run on meta tensors
            x = x * 0
        out = {name: head(x) for name, head in self.heads.items()}
        return torch.cat(list(out.values()), 1) if self.spec.as_tensor else out


@pytest.fixture
def probe_model(monkeypatch: pytest.MonkeyPatch) -> Any:
    """`probe_model` in the model registry for this test only, implemented by a plugin."""
    def build(spec: ProbeModelSpec, *, head_channels: dict[str, int], **context: Any):
        return ProbeModel(spec, head_channels)

    build.__module__ = "probe_plugin"
    monkeypatch.setitem(models._entries, "probe_model",
                        Entry("probe_model", ProbeModelSpec, build, "probe_plugin"))

    def recipe(**fields: Any) -> Any:
        return SimpleNamespace(model=ProbeModelSpec(**fields),
                               head_channels=lambda: {"affinity": 3, "mito": 1},
                               train=SimpleNamespace(patch=(4, 16, 16)))

    return recipe


@pytest.mark.parametrize("data_dependent", [False, True])
def test_a_plugin_model_with_fitting_outputs_builds(probe_model, data_dependent):
    model = build_model(probe_model(data_dependent=data_dependent))
    out = model(torch.zeros(1, 1, 4, 16, 16))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "affinity": (1, 3, 4, 16, 16), "mito": (1, 1, 4, 16, 16)}


@pytest.mark.parametrize(("fields", "expected"), [
    ({"padding": 0}, "its output 'affinity' is (1, 3, 2, 14, 14) for an input of "
                     "(1, 1, 4, 16, 16), not (1, 3, 4, 16, 16)"),
    ({"extra": 2}, "its output 'affinity' has 5 channels, not the task's 3"),
    ({"as_tensor": True}, "it returns a Tensor, not a dict of one output per task"),
    ({"in_channels": 2}, "a forward of an input of (1, 2, 4, 16, 16) fails: RuntimeError"),
])
def test_a_plugin_model_with_other_outputs_is_refused_when_built(probe_model, fields,
                                                                 expected):
    """Before: the trainer's loss raised 'internal error: ValueError: target shape ...'
    (or IndexError), after creating the run folder."""
    with pytest.raises(UserError, match=r"^model probe_model: ") as caught:
        build_model(probe_model(**fields))
    assert expected in str(caught.value)


# -- losses ---------------------------------------------------------------------------------


def test_a_loss_returning_a_tensor_per_channel_is_named():
    per_channel = LossResult(loss=torch.ones(3), valid=torch.tensor(1.0))
    with pytest.raises(UserError, match="loss of task 'affinity' returned a loss of "
                       r"\(3,\), not a scalar"):
        total_loss({"affinity": per_channel}, {"affinity": 1.0})


def test_a_loss_returning_a_bare_tensor_is_named():
    with pytest.raises(UserError, match=r"loss of task 'mito' returned a Tensor, not an "
                       r"emrun\.losses\.LossResult"):
        total_loss({"mito": torch.tensor(1.0)}, {"mito": 1.0})  # type: ignore[dict-item]


def test_a_good_loss_still_sums():
    result = LossResult(loss=torch.tensor(2.0), valid=torch.tensor(5.0))
    assert float(total_loss({"a": result, "b": result}, {"a": 1.0, "b": 0.5})) == 3.0


# -- augmentations --------------------------------------------------------------------------


class ProbeAugSpec(AugmentBase):
    type: Literal["probe_aug"] = "probe_aug"
    mode: str = "keep"


class ProbeAug(Augmentation):
    """keep: a correct photometric step; shrink: drops a row; uint8: rescales to 0..255;
    labels: crops the labels only."""

    def plan(self, rng: np.random.Generator, out_shape: Any, context: Context) -> Step:
        mode = self.spec.mode  # type: ignore[attr-defined]

        def apply(sample: Sample) -> Sample:
            if mode == "shrink":
                return sample.map_geometric(lambda a: a[:, 1:], lambda a: a[:, 1:])
            if mode == "uint8":
                return replace(sample, image=(sample.image * 255).astype(np.uint8))
            if mode == "labels":
                return replace(sample, labels=sample.labels[1:])
            return replace(sample, image=1 - sample.image)

        return Step(self.name, out_shape, apply)


def _augment(mode: str) -> Sample:
    pipeline = Pipeline([])
    pipeline.augmentations = [ProbeAug(ProbeAugSpec(mode=mode))]
    steps, shape = pipeline.prepare(np.random.default_rng(0), (4, 8, 8))
    image = np.random.default_rng(1).random(shape, dtype=np.float32)
    labels = np.ones(shape, np.uint32)
    return Pipeline.apply(steps, Sample(image, labels, None, {}))


def test_a_correct_plugin_augmentation_runs():
    sample = _augment("keep")
    assert sample.image.dtype == np.float32 and sample.shape == (4, 8, 8)


@pytest.mark.parametrize(("mode", "expected"), [
    ("shrink", "returned an image of (4, 7, 8) float32, not (4, 8, 8) float32"),
    ("uint8", "returned an image of (4, 8, 8) uint8, not (4, 8, 8) float32"),
    ("labels", "returned labels of (3, 8, 8), not the image's (4, 8, 8)"),
])
def test_a_plugin_augmentation_that_changes_shape_or_dtype_is_named(mode, expected):
    """Before: uint8 images (0..255) trained silently; a shrunk patch was an 'internal
    error: augmentations produced ...' naming no augmentation."""
    with pytest.raises(UserError, match=r"^augmentation 'probe_aug' ") as caught:
        _augment(mode)
    assert expected in str(caught.value)


# -- segmenters -----------------------------------------------------------------------------


class ProbeSegSpec(SegmenterBase):
    type: Literal["probe_seg"] = "probe_seg"
    value_field: ClassVar[str] = "level"
    value_name: ClassVar[str] = "threshold"
    level: float = Field(0.5, gt=0, lt=1)
    min_size: MinSize = 0
    mode: str = "ok"


class ProbeSeg(Segmenter):
    """Foreground as one id; its mode makes it return what a careless plugin would."""

    blockwise: ClassVar[bool] = False

    def fragments(self, affs, offsets, mask):  # type: ignore[no-untyped-def]
        ids = (affs[:3].mean(axis=0) > self.spec.level).astype(np.uint64)  # type: ignore[attr-defined]
        mode = self.spec.mode  # type: ignore[attr-defined]
        if mode == "float":
            return ids.astype(np.float32)
        if mode == "crop":
            return ids[:, 1:]
        if mode == "negative":
            return -ids.astype(np.int64)
        return ids

    def face_edges(self, u, v, p, offset):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def stitch(self, edges, count):  # type: ignore[no-untyped-def]
        raise NotImplementedError


OFFSETS = [(-1, 0, 0), (0, -1, 0), (0, 0, -1)]


def _affs() -> np.ndarray:
    affs = np.zeros((3, 4, 8, 8), np.float32)
    affs[:, :, :, :4] = 0.9
    return affs


def test_a_correct_plugin_segmenter_segments():
    labels = segment_array(_affs(), OFFSETS, ProbeSeg(ProbeSegSpec()))
    assert labels.shape == (4, 8, 8)
    assert len(np.unique(labels[:, :, :4])) == 1


@pytest.mark.parametrize(("mode", "expected"), [
    ("float", "returned fragments of (4, 8, 8) float32 for affinities of (4, 8, 8)"),
    ("crop", "returned fragments of (4, 7, 8) uint64 for affinities of (4, 8, 8)"),
    ("negative", "returned negative fragment ids (-1)"),
])
def test_a_plugin_segmenter_returning_wrong_ids_is_named(mode, expected):
    """Before: a cropped result was written as a segmentation of another shape than the
    affinities, floats were cast, negative ids an internal OverflowError."""
    segmenter = ProbeSeg(ProbeSegSpec(mode=mode))
    with pytest.raises(UserError, match=r"^segmenter 'probe_seg' ") as caught:
        segment_array(_affs(), OFFSETS, segmenter)
    assert expected in str(caught.value)
    with pytest.raises(UserError, match=r"^segmenter 'probe_seg' "):  # the sweep's path too
        list(segment_values(_affs(), OFFSETS, segmenter, [0.3, 0.6]))


# -- a plugin's UserError in a loader worker --------------------------------------------------

REFUSING_AUGMENTATION = '''
from typing import Literal
from emrun.data.augment.base import Augmentation, Step
from emrun.errors import UserError
from emrun.recipe.augment import AugmentBase
from emrun.registry import augmentations

@augmentations.register("refuse")
class RefuseSpec(AugmentBase):
    type: Literal["refuse"] = "refuse"

@augmentations.implement("refuse")
class Refuse(Augmentation):
    def plan(self, rng, out_shape, context):
        def apply(sample):
            raise UserError("refuse: this patch is not for training")
        return Step(self.name, out_shape, apply)
'''


@pytest.mark.slow
def test_a_user_error_in_a_loader_worker_is_one_line(tmp_path):
    (tmp_path / "refuse_probe_plugin.py").write_text(REFUSING_AUGMENTATION)
    info = tmp_path / "refuse_probe_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: refuse-probe\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[emrun.plugins]\nrefuse = refuse_probe_plugin\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: w\ndata:\n  sources:\n    a: {type: synthetic, shape: [8, 32, 32]}\n"
                      "model: {type: rsunet, widths: [2, 4]}\ntasks:\n  affinity:\n"
                      "    target: {type: affinity}\naugment: [{type: refuse}]\ntrain:\n"
                      "  patch: [4, 16, 16]\n  iterations: 2\n  workers: 1\n"
                      "  validate_every: 0\n  image_every: 0\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    done = subprocess.run([sys.executable, "-m", "emrun", "train", str(recipe), "--run-dir",
                           str(tmp_path / "run"), "--device", "cpu"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "error: refuse: this patch is not for training"], done.stderr


# -- export -----------------------------------------------------------------------------------


def test_a_bioimageio_description_names_the_model():
    """Before: 'no parameters for 3D electron microscopy' for a plugin model without fields,
    and rsunet's widths without its name."""
    from emrun.export.bioimageio import _model_words

    class Bare(ModelBase):
        type: Literal["bare"] = "bare"

    assert _model_words(Bare()) == "bare"
    rsunet = models.entry("rsunet").spec(widths=[4, 8])
    assert _model_words(rsunet).startswith("rsunet with 2 levels (widths [4, 8]")


# -- targets ----------------------------------------------------------------------------------


def test_a_target_with_other_channels_than_it_declares_is_named():
    from emrun.data.samples import SampleMaker
    from emrun.recipe import Recipe

    recipe = Recipe.model_validate({
        "name": "t", "data": {"sources": {"s": {"type": "synthetic", "shape": [8, 32, 32]}}},
        "model": {"type": "rsunet", "widths": [2, 4]},
        "tasks": {"fg": {"target": {"type": "boundary"}}},
        "train": {"patch": [4, 16, 16], "iterations": 1}})
    maker = SampleMaker(recipe)

    def two_channels(patch: Any) -> tuple[np.ndarray, np.ndarray]:
        fg = (patch.labels > 0).astype(np.uint8)
        return np.stack([fg, fg]), np.ones((2, *fg.shape), np.uint8)

    maker.targets["fg"] = two_channels  # type: ignore[assignment]
    with pytest.raises(UserError, match="fg"):
        maker.sample(np.random.default_rng(0))


def test_a_plugin_importing_recipe_at_its_top_is_told_why_it_fails(tmp_path):
    """Plugins load while emrun.recipe.recipe builds its Recipe class, so a plugin importing
    Recipe at its top gets a circular ImportError that `python -c 'import plugin'` does not
    reproduce; the line says what to do instead."""
    (tmp_path / "recipe_probe_plugin.py").write_text("from emrun.recipe import Recipe\n")
    info = tmp_path / "recipe_probe_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: recipe-probe\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[emrun.plugins]\nrp = recipe_probe_plugin\n")
    (tmp_path / "r.yaml").write_text(MINIMAL)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    done = subprocess.run([sys.executable, "-m", "emrun", "validate", "--no-data",
                           str(tmp_path / "r.yaml")], capture_output=True, text=True, env=env)
    assert done.returncode == 2, done.stderr
    assert "plugin 'rp'" in done.stderr
    assert "imports Recipe (and what imports it" in done.stderr
    assert "inside its functions" in done.stderr


# -- predicting without a training-only plugin ---------------------------------------------------


def _checkpoint_with(tmp_path: Path, section: str, value: Any) -> Path:
    """A trained tiny checkpoint whose recipe's ``section`` is replaced by ``value``."""
    import yaml

    from emrun.recipe import load_recipe
    from emrun.train.trainer import Trainer

    run = tmp_path / "run"
    if not run.exists():
        recipe = tmp_path / "r.yaml"
        recipe.write_text(MINIMAL)
        Trainer(load_recipe(recipe, ["train.iterations=1", "train.validate_every=0",
                                     "train.image_every=0"]), run).fit()
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    saved = yaml.safe_load(state["recipe"])
    saved[section] = value
    state["recipe"] = yaml.safe_dump(saved, sort_keys=False)
    torch.save(state, tmp_path / f"{section}.pt")
    return tmp_path / f"{section}.pt"


def test_a_checkpoint_augmented_by_a_plugin_not_installed_here_still_predicts(tmp_path, capsys):
    """Trained with a plugin's augmentation, predicted where that plugin is not installed:
    inference (and export) refused the checkpoint's recipe, though they never augment."""
    from emrun.infer.checkpoint_recipe import recipe_for
    from emrun.recipe import RecipeError

    checkpoint = _checkpoint_with(tmp_path, "augment", [{"type": "sparkle", "amount": 0.5},
                                                        {"type": "flip_rotate"}])
    loaded = recipe_for(checkpoint, None, [])
    assert loaded.recipe.augment == []
    said = capsys.readouterr().err
    assert "augment.0.type: unknown augmentation type 'sparkle'" in said
    assert "predicting needs no augmentation" in said

    model = _checkpoint_with(tmp_path, "model", {"type": "sparkle_net"})  # not only augment
    with pytest.raises(RecipeError, match=r"model\.type"):
        recipe_for(model, None, [])
