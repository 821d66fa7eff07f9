"""Reference probe of what training and inference must agree on.

A voxel of value v reaches the network as ``clip((v - low) / (high - low), 0, 1)`` (README,
`intensity: {low, high}`, default the dtype's range, floats as [0, 1]) in training (a
`SampleMaker` sample; the batch carries it as float16) and in inference (the patches the
network is called on, captured by a stand-in network). The reference is the exact quotient
(Fractions) rounded once to float32. The stand-in network maps its input x to
``activation^-1(x)`` per task, so a correct engine writes p = x after the task's activation,
applied once: uint8 ``round(255 p)``, float16 / float32 ``p`` (within blending's float32
rounding), channels in the recipe's order with the `offsets` attribute in the same order.
An exported package must predict the bits of its checkpoint and state the scale inference
uses. Losses take logits: BCE's probability is the sigmoid inference applies. Tiny synthetic
volumes and networks made in code.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
import zarr
from numpy.lib.stride_tricks import sliding_window_view
from torch import nn
from typer.testing import CliRunner

import emrun.infer.worker as infer_worker
from emrun.cli import app
from emrun.data.loader import unpack
from emrun.data.samples import SampleMaker, batch_rng
from emrun.data.sources import open_sources
from emrun.infer.engine import ACTIVATIONS, intensity_range
from emrun.io import open_volume
from emrun.io.package import read_package
from emrun.io.write import write_volumes
from emrun.losses.base import BCE
from emrun.models import build_model
from emrun.recipe import Recipe
from emrun.recipe.checks import cautions
from emrun.registry import losses
from emrun.train.run_dir import recipe_text

runner = CliRunner()
SHAPE = (8, 24, 24)
PATCH = (4, 16, 16)
OFFSETS = [[0, 0, -1], [-1, 0, 0], [0, -3, 0], [0, -1, 0]]
"""Affinity offsets in an order that is not the usual z, y, x one."""
TASKS = {
    "aff": {"target": {"type": "affinity", "offsets": OFFSETS}},  # sigmoid
    "bnd": {"target": {"type": "boundary"}, "activation": "none"},
    "dist": {"target": {"type": "distance"}, "activation": "tanh"},
}


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


# ----------------------------------------------------------------------------- references


def f32_nearest(q: Fraction) -> np.float32:
    """The float32 nearest to the exact value ``q`` (one rounding)."""
    guess = np.float32(float(q))
    candidates = [np.nextafter(guess, np.float32(-np.inf)), guess,
                  np.nextafter(guess, np.float32(np.inf))]
    return min(candidates, key=lambda c: abs(Fraction(float(c)) - q))


def reference_scale(raw: np.ndarray, low: float, high: float) -> np.ndarray:
    """clip((v - low) / (high - low), 0, 1), exactly, rounded once to float32."""
    lo, hi = Fraction(low), Fraction(high)
    table = {}
    for v in np.unique(raw):
        q = (Fraction(v.item()) - lo) / (hi - lo)
        table[v.item()] = f32_nearest(min(max(q, Fraction(0)), Fraction(1)))
    out = np.empty(raw.shape, np.float32)
    flat_raw, flat_out = raw.reshape(-1), out.reshape(-1)
    for i, v in enumerate(flat_raw.tolist()):
        flat_out[i] = table[v]
    return out


def found_at(window: np.ndarray, volume: np.ndarray) -> list[tuple[int, ...]]:
    """Every place of ``volume`` where ``window`` lies, bit for bit (brute force)."""
    views = sliding_window_view(volume, window.shape)
    hits = np.all(views == window, axis=tuple(range(3, 6)))
    return [tuple(int(i) for i in p) for p in np.argwhere(hits)]


# ------------------------------------------------------------------------------ volumes

CASES: dict[str, tuple[Any, dict[str, float] | None, tuple[float, float]]] = {}
"""name -> (raw image maker, the recipe's intensity, the scale the reference uses)."""

# Every integer range (high - low) below is odd: 255 k / odd is never an exact .5, so
# round(255 p) has no tie that blending's float32 rounding could tip either way.


def _labels() -> np.ndarray:
    """Convex objects (no label 0): boxes of 4 x 6 x 6 voxels, distinct ids."""
    z, y, x = np.indices(SHAPE)
    return (1 + z // 4 * 100 + y // 6 * 10 + x // 6).astype(np.uint32)


def _image(case: str) -> np.ndarray:
    rng = np.random.default_rng(sum(map(ord, case)))
    if case == "uint8":
        return rng.integers(0, 256, SHAPE).astype(np.uint8)
    if case in ("uint16", "uint16_given"):
        return rng.integers(0, 65536, SHAPE).astype(np.uint16)
    if case == "int16":
        return rng.integers(-32768, 32768, SHAPE).astype(np.int16)
    if case == "float32":  # j / 1024 in [0, 1]; not 0.5 (255 * 0.5 is a tie of round())
        j = rng.integers(0, 1025, SHAPE)
        j[j == 512] = 511
        return (j / 1024).astype(np.float32)
    if case == "float32_given":  # integers in [-20, 280] by [10, 201]: clipped
        return rng.integers(-20, 281, SHAPE).astype(np.float32)
    raise AssertionError(case)


SCALES: dict[str, tuple[dict[str, float] | None, tuple[float, float]]] = {
    "uint8": (None, (0.0, 255.0)),
    "uint16": (None, (0.0, 65535.0)),
    "int16": (None, (-32768.0, 32767.0)),  # the whole signed range (README)
    "float32": (None, (0.0, 1.0)),
    "float32_given": ({"low": 10.0, "high": 201.0}, (10.0, 201.0)),
    "uint16_given": ({"low": 100.0, "high": 4001.0}, (100.0, 4001.0)),
}


def _store(folder: Path, case: str) -> tuple[Path, np.ndarray]:
    image = _image(case)
    write_volumes(folder / "a.zarr", {"image": (image, False), "labels": (_labels(), True)},
                  voxel_size=(30, 6, 6))
    return folder / "a.zarr", image


def _recipe(store: Path, intensity: dict[str, float] | None, **infer: Any) -> dict[str, Any]:
    source: dict[str, Any] = {"image": f"{store}/image", "labels": f"{store}/labels"}
    if intensity is not None:
        source["intensity"] = intensity
    return {
        "name": "consistency", "seed": 5,
        "data": {"sources": {"a": source}},
        "model": {"type": "rsunet", "widths": [4, 8]},
        "augment": "none",
        "tasks": TASKS,
        "train": {"patch": list(PATCH), "iterations": 2, "workers": 0, "batch_size": 2},
        "infer": {"precision": "fp32", "dtype": "uint8", "batch_size": 3, **infer},
    }


def _checkpoint(folder: Path, recipe: dict[str, Any]) -> Path:
    """A run directory with one checkpoint of ``recipe``'s model (lively random weights)."""
    built = Recipe.model_validate(recipe)
    torch.manual_seed(0)
    model = build_model(built)
    for p in model.parameters():
        p.data.normal_(0, 0.3)
    (folder / "run" / "checkpoints").mkdir(parents=True)
    path = folder / "run" / "checkpoints" / "last.pt"
    torch.save({"model": model.state_dict(), "iteration": 3, "recipe": recipe_text(built)},
               path)
    return path


# --------------------------------------------------------------------- a stand-in network


class StandIn(nn.Module):
    """Records every batch it is called on; per task, returns what its activation maps to
    the input x: aff channel c is logit(x) for even c and logit(1 - x) for odd c (so the
    channel order shows), bnd is x (activation none), dist is atanh(x) (tanh)."""

    def __init__(self, channels: dict[str, int]) -> None:
        super().__init__()
        self.channels = channels
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self.seen.append(x.detach().clone().contiguous())
        x = x.float()
        heads = [torch.logit(x) if c % 2 == 0 else torch.logit(1 - x)
                 for c in range(self.channels["aff"])]
        return {"aff": torch.cat(heads, dim=1), "bnd": x.clone(), "dist": torch.atanh(x)}


def _expected(p: np.ndarray) -> dict[str, np.ndarray]:
    """What the stand-in's outputs are, activated once: (c, z, y, x) float32 per task."""
    aff = np.stack([p if c % 2 == 0 else np.float32(1) - p for c in range(len(OFFSETS))])
    return {"aff": aff, "bnd": p[None], "dist": p[None]}


def _infer_with_stand_in(monkeypatch, folder: Path, recipe: dict[str, Any], image: Path,
                         name: str) -> tuple[StandIn, zarr.Group]:
    checkpoint = _checkpoint(folder, recipe)
    stand_in = StandIn(Recipe.model_validate(recipe).head_channels())
    monkeypatch.setattr(infer_worker, "load_model", lambda *a, **k: stand_in)
    out = folder / f"{name}.zarr"
    done = invoke("infer", "--checkpoint", checkpoint, "--input", image, "--output", out,
                  "--device", "cpu")
    assert done.exit_code == 0, done.output
    assert stand_in.seen, "the stand-in network was never called"
    return stand_in, zarr.open_group(str(out), mode="r")


# ------------------------------------------------------------------ training's input


@pytest.mark.parametrize("case", list(SCALES))
def test_a_training_sample_feeds_the_reference_scale_of_its_crop(tmp_path, case):
    """Each sample's image is the exact scaled crop of the volume at some place (found by
    brute force), in float32; the batch carries float16 of it and unpack gives that back
    as float32, which is what the trainer's forward pass takes."""
    intensity, (low, high) = SCALES[case]
    store, raw = _store(tmp_path, case)
    recipe = Recipe.model_validate(_recipe(store, intensity))
    want = reference_scale(raw, low, high)
    maker = SampleMaker(recipe, keep_memory=False)
    rng = np.random.default_rng(11)
    for _ in range(3):
        image = maker.sample(rng)["image"]
        assert image.shape == (1, *PATCH) and image.dtype == np.float32
        assert found_at(image[0], want), f"{case}: the sample is no scaled crop of the volume"
    batch = maker.batch(recipe.seed, 0, 0)
    assert batch["image"].dtype == np.float16
    again = SampleMaker(recipe, keep_memory=False)
    rng = batch_rng(recipe.seed, 0, 0)
    first = again.sample(rng)["image"]
    assert np.array_equal(batch["image"][0], first.astype(np.float16))
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray)
               else {n: torch.from_numpy(np.ascontiguousarray(a)) for n, a in v.items()}
               for k, v in batch.items()}
    fed = unpack(tensors)["image"]
    assert fed.dtype == torch.float32
    assert np.array_equal(fed.numpy(), batch["image"].astype(np.float32))
    assert float(np.abs(fed.numpy()[0] - first).max()) <= 2.5e-4  # float16's error, in [0, 1]


# --------------------------------------------------------------------- inference's input


@pytest.mark.parametrize("case", list(SCALES))
def test_inference_feeds_the_same_scale_and_writes_round_255p(tmp_path, monkeypatch, case):
    """Every patch the network is called on is the reference-scaled volume (reflected at its
    borders) at some place, exactly; the activation is applied once per task, and the uint8
    outputs are round(255 p) of the scaled input the stand-in passes through, in channel
    order; affinities carry their offsets in the recipe's order."""
    intensity, (low, high) = SCALES[case]
    store, raw = _store(tmp_path, case)
    recipe = _recipe(store, intensity)
    stand_in, group = _infer_with_stand_in(monkeypatch, tmp_path, recipe, store / "image",
                                           "u8")
    want = reference_scale(raw, low, high)
    padded = np.pad(want, [(p, p) for p in PATCH], mode="reflect")
    for batch in stand_in.seen:
        assert batch.dtype == torch.float32 and batch.shape[1:] == (1, *PATCH)
        for patch in batch[:, 0].numpy():
            assert found_at(patch, padded), f"{case}: a patch is no scaled part of the input"
    expected = _expected(want)
    for task, values in expected.items():
        got = group[task]["0"][...]
        assert got.dtype == np.uint8 and got.shape == values.shape, task
        assert np.array_equal(got, np.rint(values.astype(np.float64) * 255).astype(np.uint8)), (
            task, int(np.abs(got.astype(int) - np.rint(values * 255)).max()))
    assert group["aff"].attrs["offsets"] == OFFSETS
    assert group.attrs["emrun"]["scale"] == [low, high]


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_float_outputs_store_p(tmp_path, monkeypatch, dtype):
    """float16 / float32 outputs are p itself (float16: p rounded to half precision), within
    the float32 rounding of blending the same value from overlapping patches."""
    store, raw = _store(tmp_path, "uint16")
    recipe = _recipe(store, None, dtype=dtype)
    _, group = _infer_with_stand_in(monkeypatch, tmp_path, recipe, store / "image", dtype)
    for task, values in _expected(reference_scale(raw, 0.0, 65535.0)).items():
        got = group[task]["0"][...]
        assert got.dtype == np.dtype(dtype), task
        if dtype == "float32":
            assert float(np.abs(got - values).max()) <= 1e-6, task
        else:
            gap = np.abs(got.astype(np.float32) - values.astype(np.float16).astype(np.float32))
            spacing = np.spacing(values.astype(np.float16)).astype(np.float32)
            assert bool(np.all(gap <= spacing)), task  # at most one half-precision step
            assert np.mean(gap == 0) > 0.99, task


def test_the_offsets_attribute_names_the_channels_in_order(tmp_path, monkeypatch):
    """The `offsets` attribute and the OME channel labels list the recipe's offsets in the
    recipe's order, one per channel of the written array."""
    store, _ = _store(tmp_path, "uint8")
    _, group = _infer_with_stand_in(monkeypatch, tmp_path, _recipe(store, None),
                                    store / "image", "names")
    array = group["aff"]
    assert array["0"].shape[0] == len(OFFSETS)
    assert array.attrs["offsets"] == OFFSETS
    labels = [c["label"] for c in array.attrs["ome"]["omero"]["channels"]]
    assert labels == [f"aff {' '.join(map(str, o))}" for o in OFFSETS]


# ------------------------------------------------------------------ a trained target


def test_an_affinity_target_channel_is_its_offset(tmp_path):
    """Channel c of a training sample's affinity target compares p with p + offsets[c]
    (the channel the offsets attribute names c at inference), brute force."""
    store, _ = _store(tmp_path, "uint8")
    recipe = Recipe.model_validate(_recipe(store, None))
    maker = SampleMaker(recipe, keep_memory=False)
    sample = maker.sample(np.random.default_rng(2))
    labels = maker.last_labels
    assert labels is not None
    target, mask = sample["target"]["aff"], sample["mask"]["aff"]
    for c, (dz, dy, dx) in enumerate(OFFSETS):
        for z, y, x in np.ndindex(*PATCH):
            q = (z + dz, y + dy, x + dx)
            inside = all(0 <= a < n for a, n in zip(q, PATCH, strict=True))
            if not inside:
                assert mask[c, z, y, x] == 0
                continue
            same = labels[z, y, x] == labels[q]
            assert mask[c, z, y, x] == 1 and target[c, z, y, x] == int(same), (c, z, y, x)


# ------------------------------------------------------------------------ the package


def test_a_package_predicts_its_checkpoints_bits_and_states_infers_scale(tmp_path):
    """An int16 image (the signed default scale): `infer --model` of the exported package
    gives the checkpoint's bytes, and the manifest's intensity is the scale infer used."""
    store, _ = _store(tmp_path, "int16")
    recipe = _recipe(store, None, dtype="float16")
    checkpoint = _checkpoint(tmp_path, recipe)
    package = tmp_path / "m.emrun"
    done = invoke("export", tmp_path / "run", package)
    assert done.exit_code == 0, done.output
    outputs = {}
    for name, network in (("c", ["--checkpoint", checkpoint]), ("m", ["--model", package])):
        out = tmp_path / f"{name}.zarr"
        done = invoke("infer", *network, "--input", store / "image", "--output", out)
        assert done.exit_code == 0, done.output
        outputs[name] = zarr.open_group(str(out), mode="r")
    for task in TASKS:
        a, b = outputs["c"][task]["0"][...], outputs["m"][task]["0"][...]
        assert a.dtype == b.dtype == np.float16 and np.array_equal(a.view(np.uint16),
                                                                   b.view(np.uint16)), task
    stated = read_package(package).manifest["input"]["intensity"]
    assert (stated["low"], stated["high"]) == (-32768.0, 32767.0)
    for out in outputs.values():
        assert out.attrs["emrun"]["scale"] == [-32768.0, 32767.0]
        assert out["aff"].attrs["offsets"] == OFFSETS


# ----------------------------------------------------------------------------- losses


def test_bce_takes_logits_whose_sigmoid_inference_writes():
    """The affinity task's loss (bce) scores sigmoid(logit) as the probability, the very
    activation inference applies to the same logit: against -[t log p + (1-t) log(1-p)]."""
    recipe = Recipe.model_validate(_recipe(Path("/nowhere"), None))
    task = recipe.tasks["aff"]
    assert task.activation == "sigmoid" and task.loss.type == "bce"
    loss = losses.build(task.loss, target=task.target)
    logits = torch.tensor([[-3.0, -0.5, 0.0, 0.7, 4.0]]).reshape(1, 1, 1, 1, 5)
    target = torch.tensor([[0.0, 1.0, 1.0, 0.0, 1.0]]).reshape(1, 1, 1, 1, 5)
    mask = torch.ones_like(target)
    p = ACTIVATIONS[task.activation](logits).double()
    want = -(target * torch.log(p) + (1 - target) * torch.log(1 - p)).mean()
    got = loss(logits, target, mask).loss
    assert abs(float(got) - float(want)) < 1e-6
    assert abs(float(BCE()(logits, target, mask).loss) - float(want)) < 1e-6


def _task_recipe(task: dict[str, Any]) -> Recipe:
    return Recipe.model_validate({
        "name": "x", "data": {"sources": {"a": {"type": "synthetic", "shape": [16, 64, 64],
                                                "seed": 3}}},
        "model": {"type": "rsunet", "widths": [4, 8]}, "tasks": {"t": task},
        "train": {"patch": [4, 16, 16], "iterations": 2}})


@pytest.mark.parametrize(("target", "loss", "trained_for", "other"), [
    ("affinity", "mse", "none", "sigmoid"), ("lsd", "bce", "sigmoid", "none"),
    ("boundary", "dice", "sigmoid", "tanh"), ("distance", "mse", "none", "tanh")])
def test_a_task_s_activation_follows_its_loss_and_a_mismatch_is_said(target, loss,
                                                                    trained_for, other):
    """MSE compares the raw output with the target and BCE/Dice work on logits
    (emrun/losses), so a task given a loss and no activation predicts with the one its loss
    trains for (an affinity task scored with mse was written through a sigmoid: 0.5..0.73),
    and one given another activation is warned about, located."""
    recipe = _task_recipe({"target": {"type": target}, "loss": {"type": loss}})
    assert recipe.tasks["t"].activation == trained_for
    assert not [path for path, _ in cautions(recipe) if path[0] == "tasks"]
    mismatched = _task_recipe({"target": {"type": target}, "loss": {"type": loss},
                               "activation": other})
    said = [(path, m) for path, m in cautions(mismatched) if path[0] == "tasks"]
    assert [path for path, _ in said] == [("tasks", "t", "activation")]
    assert f"use activation {trained_for}" in said[0][1]


# ------------------------------------------------------------ one scale for many sources


def test_a_default_scaled_source_beside_a_given_one_is_warned_about(tmp_path):
    """Source a (uint8, no intensity: trained as v / 255) and source b (intensity [0, 4095]):
    inference scales every input by [0, 4095] (README: the first one given), so a's own
    image reaches the network 16x darker than in training. The sources' scales differ, which
    `validate` and `train` are documented to warn about."""
    a = tmp_path / "a.zarr"
    write_volumes(a, {"image": (_image("uint8"), False), "labels": (_labels(), True)},
                  voxel_size=(30, 6, 6))
    b = tmp_path / "b.zarr"
    write_volumes(b, {"image": ((_image("uint16") % 4096).astype(np.uint16), False),
                      "labels": (_labels(), True)}, voxel_size=(30, 6, 6))
    spec = _recipe(a, None)
    spec["data"]["sources"]["b"] = {"image": f"{b}/image", "labels": f"{b}/labels",
                                    "intensity": {"low": 0, "high": 4095}}
    recipe = Recipe.model_validate(spec)
    trained = {s.name: (s.low, s.high) for s in open_sources(recipe.data.sources)}
    assert trained == {"a": (0.0, 255.0), "b": (0.0, 4095.0)}
    assert intensity_range(recipe, open_volume(f"{a}/image")) == (0.0, 4095.0)
    said = [(path, m) for path, m in cautions(recipe) if "intensity" in m]
    assert [path for path, _ in said] == [("data", "sources", "a")], said
    assert "a gives no intensity" in said[0][1] and "[0, 4095]" in said[0][1]


def test_recipe_yaml_of_a_package_keeps_the_intensity(tmp_path):
    """A package's recipe carries the source's `intensity`, so `infer --model` scales as the
    checkpoint's recipe does, and the manifest states the same numbers."""
    store, _ = _store(tmp_path, "uint16_given")
    recipe = _recipe(store, {"low": 100.0, "high": 4000.0})
    _checkpoint(tmp_path, recipe)
    package = tmp_path / "g.emrun"
    assert invoke("export", tmp_path / "run", package).exit_code == 0
    read = read_package(package)
    stated = read.manifest["input"]["intensity"]
    assert (stated["low"], stated["high"]) == (100.0, 4000.0)
    source = yaml.safe_load(read.recipe)["data"]["sources"]["a"]
    assert source["intensity"] == {"low": 100.0, "high": 4000.0}
