"""`emrun export` round trips, probed: what a package, a bioimage.io zip and an ONNX graph
state and compute once they are read back, and how mistakes around them are reported.

Each bioimage.io export here is validated with `bioimageio.spec` where it is installed; the
tiny networks are made in code (lively random weights), as in tests/test_export.py."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr
from typer.testing import CliRunner

from emrun.cli import app
from emrun.io.package import read_package
from emrun.io.write import write_volume
from emrun.models import build_model
from emrun.recipe import Recipe
from emrun.synth import synthesize
from emrun.train.run_dir import recipe_text

runner = CliRunner()
RECIPE = {
    "name": "roundtrip",
    "data": {"sources": {"a": {"type": "synthetic", "shape": [16, 64, 64], "seed": 3}}},
    "model": {"type": "rsunet", "widths": [4, 8]},
    "tasks": {"aff": {"target": {"type": "affinity"}},
              "mito": {"target": {"type": "binary", "volume": "mito"}},
              "dist": {"target": {"type": "distance"}, "activation": "tanh"}},
    "train": {"patch": [4, 16, 16], "iterations": 2, "workers": 0},
    "infer": {"dtype": "float32", "precision": "fp32"},
}


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def _lines(result) -> list[str]:
    return [line for line in result.stderr.strip().splitlines() if line]


def _run(folder: Path, recipe: dict, *, heads: dict[str, float] | None = None,
         ema: float | None = None) -> Path:
    """A run directory with one checkpoint of ``recipe``'s model: random weights, each head
    in ``heads`` given that bias (a head whose output is near 0 or negative everywhere),
    and with ``ema`` an EMA of other weights, as the trainer keeps it."""
    built = Recipe.model_validate(recipe)
    torch.manual_seed(0)
    model = build_model(built)
    for p in model.parameters():
        p.data.normal_(0, 0.3)
    for name, bias in (heads or {}).items():
        model.state_dict()[f"heads.{name}.weight"].mul_(0.01)
        model.state_dict()[f"heads.{name}.bias"].fill_(bias)
    state = {"model": model.state_dict(), "iteration": 7, "recipe": recipe_text(built)}
    if ema is not None:
        state["ema"] = {"decay": ema, "updates": 7,
                        "params": {k: v + 0.05 for k, v in model.named_parameters()},
                        "buffers": dict(model.named_buffers())}
    run = folder / "run"
    (run / "checkpoints").mkdir(parents=True)
    torch.save(state, run / "checkpoints" / "last.pt")
    return run


def _validated(path: Path):
    """The zip's description as bioimage.io reads it, its checks passed."""
    spec = pytest.importorskip("bioimageio.spec")
    description = spec.load_description(path, perform_io_checks=True)
    summary = description.validation_summary
    assert summary.status in ("valid-format", "passed"), summary.format()
    return description


# --------------------------------------------------------------------------- bioimage.io


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_outputs_near_zero_or_negative_still_make_a_valid_bioimageio_model(tmp_path):
    """bioimage.io caps a test output's tolerance at 1 % of its maximum: a semantic head
    that predicts ~0 on the test patch (a synapse task on synthetic EM) and a tanh head
    negative everywhere made the export an internal error (exit 1, a pydantic traceback)."""
    pytest.importorskip("bioimageio.spec")
    run = _run(tmp_path, RECIPE, heads={"mito": -6.0, "dist": -2.0})
    out = tmp_path / "m.zip"
    done = invoke("export", run, out)
    assert done.exit_code == 0, done.output
    description = _validated(out)
    ranges = {str(o.id): tuple(o.data.range) for o in description.outputs}
    assert ranges == {"aff": (0.0, 1.0), "mito": (0.0, 1.0), "dist": (-1.0, 1.0)}
    with zipfile.ZipFile(out) as zf:
        rdf = yaml.safe_load(zf.read("rdf.yaml"))
        mito = np.load(io.BytesIO(zf.read("test_output_mito.npy")))
    tolerances = {t["output_ids"][0]: t["absolute_tolerance"]
                  for t in rdf["config"]["bioimageio"]["reproducibility_tolerance"]}
    assert tolerances["aff"] == 1e-3 and "dist" not in tolerances  # dist: the tools' default
    assert 0 < tolerances["mito"] <= 0.01 * float(mito.max()) < 1e-3
    silent = _run(tmp_path / "silent", RECIPE, heads={"mito": -12.0})  # ~6e-6 everywhere
    refused = invoke("export", silent, tmp_path / "s.zip")
    assert refused.exit_code == 2 and len(_lines(refused)) == 1, refused.output
    assert "output 'mito' is within 0.0001 of 0" in refused.stderr
    assert [p.name for p in tmp_path.iterdir() if "s.zip" in p.name] == []


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_of_a_two_channel_multitask_model_matches_pytorch_on_valid_sizes(tmp_path):
    """The zip's TorchScript, its test outputs and the state_dict architecture agree with
    emrun's model at the patch, at patch + k * divisor and at batch > 1."""
    pytest.importorskip("bioimageio.spec")
    recipe = {**RECIPE, "model": {"type": "rsunet", "widths": [4, 8], "in_channels": 2}}
    run = _run(tmp_path, recipe)
    out = tmp_path / "m.zip"
    assert invoke("export", run, out).exit_code == 0
    description = _validated(out)
    assert [str(n) for n in description.inputs[0].axes[1].channel_names] == ["raw0", "raw1"]
    built = Recipe.model_validate(recipe)
    model = build_model(built)
    model.load_state_dict(torch.load(run / "checkpoints/last.pt")["model"])
    model.eval()
    with zipfile.ZipFile(out) as zf:
        traced = torch.jit.load(io.BytesIO(zf.read("weights_torchscript.pt")))
        raw = np.load(io.BytesIO(zf.read("test_input_raw.npy")))
        saved = [np.load(io.BytesIO(zf.read(f"test_output_{t}.npy"))) for t in built.tasks]
    activations = {"sigmoid": torch.sigmoid, "tanh": torch.tanh}
    rng = np.random.default_rng(0)
    images = [np.clip(raw / 255, 0, 1).astype(np.float32),
              rng.random((2, 2, 5, 18, 20), dtype=np.float32)]
    for image in images:
        with torch.no_grad():
            got = traced(torch.from_numpy(image))
            want = model(torch.from_numpy(image))
        for task, array in zip(built.tasks, got, strict=True):
            expected = activations[built.tasks[task].activation](want[task])
            np.testing.assert_allclose(array.numpy(), expected.numpy(), atol=1e-6)
    for array, kept in zip(traced(torch.from_numpy(images[0])), saved, strict=True):
        np.testing.assert_allclose(array.detach().numpy(), kept, atol=1e-6)


def test_the_declared_preprocessing_scales_raw_data_as_emrun_does(tmp_path):
    """scale_linear + clip, applied to raw integers, gives emrun's (x - low) / (high - low)
    clamped to [0, 1] within one float32 rounding."""
    pytest.importorskip("bioimageio.spec")
    recipe = {**RECIPE, "tasks": {"aff": RECIPE["tasks"]["aff"]}}
    recipe["data"] = {"sources": {"a": {"image": "v.zarr/image", "labels": "v.zarr/labels",
                                        "intensity": {"low": 100, "high": 4000}}}}
    run = _run(tmp_path, recipe)
    out = tmp_path / "m.zip"
    assert invoke("export", run, out).exit_code == 0
    with zipfile.ZipFile(out) as zf:
        rdf = yaml.safe_load(zf.read("rdf.yaml"))
    raw = np.arange(0, 5000, dtype=np.uint16)
    x = raw
    for step in rdf["inputs"][0]["preprocessing"]:
        kwargs = step["kwargs"]
        if step["id"] == "ensure_dtype":
            x = x.astype(kwargs["dtype"])
        elif step["id"] == "scale_linear":
            x = x * np.float32(kwargs["gain"]) + np.float32(kwargs["offset"])
        else:
            assert step["id"] == "clip"
            x = np.clip(x, kwargs["min"], kwargs["max"])
    emrun = torch.from_numpy(raw.astype(np.float32)).sub_(100).div_(3900).clamp_(0, 1)
    np.testing.assert_allclose(x, emrun.numpy(), rtol=0, atol=2e-7)


# --------------------------------------------------------------------------- facts


def _uint16_run(folder: Path) -> Path:
    """A run trained on a uint16 volume at 40 x 4 x 4 nm, named relative to ``folder``."""
    image = synthesize((8, 32, 32), seed=2)
    write_volume(folder / "data.zarr", "image", image.image.astype(np.uint16) * 16,
                 voxel_size=(40, 4, 4))
    write_volume(folder / "data.zarr", "labels", image.labels.astype(np.uint64),
                 voxel_size=(40, 4, 4))
    recipe = {**RECIPE, "tasks": {"aff": RECIPE["tasks"]["aff"]},
              "data": {"sources": {"a": {"image": "data.zarr/image",
                                         "labels": "data.zarr/labels"}}}}
    return _run(folder, recipe)


def test_a_package_exported_again_elsewhere_keeps_its_voxel_size_and_intensity(
        tmp_path, monkeypatch):
    """A package made where the training data are states 40 x 4 x 4 nm and uint16; exported
    again to bioimage.io on a machine without the data, the zip declared no voxel size and
    scaled by 1/255 (every raw value above 255 clipped to 1)."""
    pytest.importorskip("bioimageio.spec")
    (tmp_path / "lab").mkdir()
    monkeypatch.chdir(tmp_path / "lab")
    run = _uint16_run(tmp_path / "lab")
    assert invoke("export", run, tmp_path / "m.emrun").exit_code == 0
    stated = read_package(tmp_path / "m.emrun").manifest["input"]
    assert stated["voxel_size"] == [40.0, 4.0, 4.0]
    assert stated["intensity"] == {"low": 0.0, "high": 65535.0, "from": "dtype uint16"}
    (tmp_path / "laptop").mkdir()
    monkeypatch.chdir(tmp_path / "laptop")  # data.zarr/image is not here
    again = invoke("export", tmp_path / "m.emrun", "again.emrun")
    assert again.exit_code == 0, again.output
    assert read_package(Path("again.emrun")).manifest["input"] == stated
    done = invoke("export", tmp_path / "m.emrun", "m.zip")
    assert done.exit_code == 0, done.output
    assert "note:" not in done.stdout
    description = _validated(Path("m.zip"))
    [raw] = description.inputs
    assert [a.scale for a in raw.axes[2:]] == [40.0, 4.0, 4.0]
    assert {str(a.unit) for a in raw.axes[2:]} == {"nanometer"}
    gain = next(s.kwargs.gain for s in raw.preprocessing if s.id == "scale_linear")
    assert gain == pytest.approx(1 / 65535)


def test_a_training_image_that_cannot_be_read_is_said_not_silently_assumed(
        tmp_path, monkeypatch):
    """Exported from a checkpoint away from its data, the intensity scale is a guess: the
    manifest says so and the export prints a note (it said `dtype uint8` as if read)."""
    (tmp_path / "lab").mkdir()
    run = _uint16_run(tmp_path / "lab")
    monkeypatch.chdir(tmp_path)  # the recipe's relative data paths lead nowhere from here
    done = invoke("export", run, "m.emrun")
    assert done.exit_code == 0, done.output
    facts = read_package(Path("m.emrun")).manifest["input"]
    assert facts["voxel_size"] is None
    assert facts["intensity"]["from"].startswith("assumed (dtype uint8)")
    assert "data.zarr/image could not be read" in facts["intensity"]["from"]
    notes = [line for line in done.stdout.splitlines() if line.startswith("note:")]
    assert len(notes) == 2 and "intensity scale assumed" in notes[0]


def test_the_manifest_says_which_weights_were_exported(tmp_path):
    """With train.ema the EMA weights travel (io.package.network_weights); the manifest
    names them, and the package, the zip and the checkpoint predict the same bits."""
    pytest.importorskip("bioimageio.spec")
    recipe = {**RECIPE, "tasks": {"aff": RECIPE["tasks"]["aff"]}}
    run = _run(tmp_path, recipe, ema=0.9)
    assert invoke("export", run, tmp_path / "m.emrun").exit_code == 0
    assert invoke("export", tmp_path / "m.emrun", tmp_path / "m.zip").exit_code == 0
    package = read_package(tmp_path / "m.emrun")
    assert package.manifest["provenance"]["weights"] == "ema (decay 0.9)"
    state = torch.load(run / "checkpoints/last.pt")
    assert all(torch.equal(package.weights[k], v) for k, v in state["ema"]["params"].items())
    volume = (np.random.default_rng(0).random((6, 24, 20)) * 255).astype(np.uint8)
    write_volume(tmp_path / "in.zarr", "image", volume, voxel_size=(30, 6, 6))
    outputs = {}
    for name, network in {"checkpoint": ["--checkpoint", run / "checkpoints/last.pt"],
                          "package": ["--model", tmp_path / "m.emrun"],
                          "zip": ["--model", tmp_path / "m.zip"]}.items():
        done = invoke("infer", *network, "--input", tmp_path / "in.zarr/image",
                      "--output", tmp_path / f"{name}.zarr")
        assert done.exit_code == 0, done.output
        outputs[name] = zarr.open_array(str(tmp_path / f"{name}.zarr/aff/0"))[...]
    assert outputs["checkpoint"].std() > 0.01
    assert np.array_equal(outputs["checkpoint"], outputs["package"])
    assert np.array_equal(outputs["checkpoint"], outputs["zip"])
    plain = _run(tmp_path / "plain", recipe)
    assert invoke("export", plain, tmp_path / "p.emrun").exit_code == 0
    assert read_package(tmp_path / "p.emrun").manifest["provenance"]["weights"] == "model"


# --------------------------------------------------------------------------- mistakes


def test_an_output_below_a_file_names_the_file(tmp_path):
    run = _run(tmp_path, {**RECIPE, "tasks": {"aff": RECIPE["tasks"]["aff"]}})
    (tmp_path / "notes.txt").write_text("a file")
    refused = invoke("export", run, tmp_path / "notes.txt/sub/m.emrun")
    assert refused.exit_code == 2
    assert _lines(refused) == [f"error: {tmp_path}/notes.txt/sub/m.emrun: cannot write "
                               f"({tmp_path}/notes.txt is a file, not a folder)"]


def test_a_failed_export_leaves_no_folder_it_made(tmp_path, monkeypatch):
    """The missing folders above the output are made for the export; when it fails, they
    went on existing (empty) beside the user's files."""
    from emrun.errors import UserError
    from emrun.export import package

    def broken(*args, **kwargs):
        raise UserError("the weights could not be written")

    monkeypatch.setattr(package, "write_package", broken)
    run = _run(tmp_path, {**RECIPE, "tasks": {"aff": RECIPE["tasks"]["aff"]}})
    refused = invoke("export", run, tmp_path / "new/deeper/m.emrun")
    assert refused.exit_code == 2 and len(_lines(refused)) == 1
    assert not (tmp_path / "new").exists()
    monkeypatch.undo()
    done = invoke("export", run, tmp_path / "new/deeper/m.emrun")
    assert done.exit_code == 0 and (tmp_path / "new/deeper/m.emrun").is_file()
    assert [p.name for p in (tmp_path / "new/deeper").iterdir()] == ["m.emrun"]


def _edited(zip_path: Path, out: Path, *, rdf=None, first: dict[str, bytes] | None = None
            ) -> Path:
    """A copy of a bioimage.io zip, its rdf.yaml changed by ``rdf`` and the members of
    ``first`` put in front of the others."""
    with zipfile.ZipFile(zip_path) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    if rdf is not None:
        description = yaml.safe_load(members["rdf.yaml"])
        rdf(description)
        members["rdf.yaml"] = yaml.safe_dump(description).encode()
    with zipfile.ZipFile(out, "w") as zf:
        for name, data in {**(first or {}), **members}.items():
            zf.writestr(name, data)
    return out


@pytest.fixture
def bioimageio_zip(tmp_path) -> Path:
    pytest.importorskip("bioimageio.spec")
    run = _run(tmp_path, {**RECIPE, "tasks": {"aff": RECIPE["tasks"]["aff"]}})
    assert invoke("export", run, tmp_path / "m.zip").exit_code == 0
    volume = (np.random.default_rng(0).random((6, 24, 20)) * 255).astype(np.uint8)
    write_volume(tmp_path / "in.zarr", "image", volume, voxel_size=(30, 6, 6))
    return tmp_path / "m.zip"


def test_a_hand_edited_attachments_entry_is_one_line(bioimageio_zip):
    edited = _edited(bioimageio_zip, bioimageio_zip.with_name("e.zip"),
                     rdf=lambda d: d.__setitem__("attachments", 5))
    refused = invoke("infer", "--model", edited, "--input", bioimageio_zip.parent / "in.zarr/image",
                     "--output", bioimageio_zip.parent / "e.zarr")
    assert refused.exit_code == 2 and len(_lines(refused)) == 1, refused.output


def test_the_attachment_rdf_lists_is_the_one_read(bioimageio_zip):
    edited = _edited(bioimageio_zip, bioimageio_zip.with_name("e.zip"),
                     first={"notes.emrun": b"not a package"})
    done = invoke("infer", "--model", edited, "--input", bioimageio_zip.parent / "in.zarr/image",
                  "--output", bioimageio_zip.parent / "e.zarr")
    assert done.exit_code == 0, done.output


def test_emrun_reads_its_zip_whatever_else_rdf_yaml_says(bioimageio_zip):
    """Axes edited by hand do not matter to emrun (it rebuilds from the attached package,
    whose checksums hold); an attachment removed is one line; fine-tuning takes the zip."""
    image = bioimageio_zip.parent / "in.zarr/image"

    def swap(description):
        axes = description["inputs"][0]["axes"]
        axes[2], axes[4] = axes[4], axes[2]

    swapped = _edited(bioimageio_zip, bioimageio_zip.with_name("s.zip"), rdf=swap)
    done = invoke("infer", "--model", swapped, "--input", image,
                  "--output", bioimageio_zip.parent / "s.zarr")
    assert done.exit_code == 0, done.output
    with zipfile.ZipFile(bioimageio_zip) as zf:
        kept = {n: zf.read(n) for n in zf.namelist() if not n.endswith(".emrun")}
    bare = bioimageio_zip.with_name("bare.zip")
    with zipfile.ZipFile(bare, "w") as zf:
        for name, data in kept.items():
            zf.writestr(name, data)
    refused = invoke("infer", "--model", bare, "--input", image,
                     "--output", bioimageio_zip.parent / "b.zarr")
    assert refused.exit_code == 2 and len(_lines(refused)) == 1
    assert "without an emrun package attached" in refused.stderr
    assert not (bioimageio_zip.parent / "b.zarr").exists()
    package = read_package(bioimageio_zip)
    recipe = bioimageio_zip.with_name("r.yaml")
    recipe.write_text(package.recipe)
    tuned = invoke("train", recipe, "--run-dir", bioimageio_zip.parent / "ft", "--init-from",
                   bioimageio_zip, "-o", "train.iterations=1", "-o", "train.validate_every=0")
    assert tuned.exit_code == 0, tuned.output
    provenance = json.loads((bioimageio_zip.parent / "ft/provenance.json").read_text())
    assert provenance["sessions"][0]["init_from"] == str(bioimageio_zip.resolve())
