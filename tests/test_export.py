"""`emrun export`: the .emrun model package predicts exactly what its checkpoint predicts,
fine-tunes from its weights, states its facts, and is refused when changed."""

from __future__ import annotations

import importlib
import io
import json
import os
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
from emrun.recipe import Recipe, load_recipe
from emrun.train.run_dir import recipe_text

OFFSETS = [[-1, 0, 0], [0, -1, 0], [0, 0, -1], [0, -3, 0]]
RECIPE = {
    "name": "travel",
    "data": {"sources": {"a": {"type": "synthetic", "shape": [16, 64, 64], "seed": 3}}},
    "model": {"type": "rsunet", "widths": [4, 8]},
    "tasks": {"aff": {"target": {"type": "affinity", "offsets": OFFSETS}},
              "mito": {"target": {"type": "binary", "volume": "mito"}}},
    "train": {"patch": [4, 16, 16], "iterations": 2, "workers": 0},
    "infer": {"dtype": "float32", "overlap": [0.5, 0.25, 0.25], "batch_size": 3,
              "precision": "fp32"},
}
runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def trained(tmp_path: Path) -> Path:
    """A run directory as `emrun train` leaves it (lively random weights, the recipe in the
    checkpoint), a recipe file and a random uint8 input volume."""
    recipe = Recipe.model_validate(RECIPE)
    torch.manual_seed(0)
    model = build_model(recipe)
    for p in model.parameters():
        p.data.normal_(0, 0.3)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"model": model.state_dict(), "iteration": 7, "recipe": recipe_text(recipe)},
               run / "checkpoints" / "last.pt")
    (tmp_path / "recipe.yaml").write_text(recipe_text(recipe))
    volume = (np.random.default_rng(0).random((9, 37, 41)) * 255).astype(np.uint8)
    write_volume(tmp_path / "in.zarr", "image", volume, voxel_size=(30, 6, 6))
    return tmp_path


def test_a_package_predicts_the_same_bits_as_recipe_and_checkpoint(trained):
    package = trained / "travel.emrun"
    done = invoke("export", trained / "run", package)
    assert done.exit_code == 0, done.output
    assert "iteration 7" in done.stdout
    image = trained / "in.zarr/image"
    by_model = invoke("infer", "--model", package, "--input", image,
                      "--output", trained / "m.zarr")
    assert by_model.exit_code == 0, by_model.output
    by_checkpoint = invoke("infer", "--recipe", trained / "recipe.yaml", "--checkpoint",
                           trained / "run/checkpoints/last.pt", "--input", image,
                           "--output", trained / "c.zarr")
    assert by_checkpoint.exit_code == 0, by_checkpoint.output
    for task in ("aff", "mito"):
        a = zarr.open_array(str(trained / "m.zarr" / task / "0"))[...]
        b = zarr.open_array(str(trained / "c.zarr" / task / "0"))[...]
        assert a.dtype == np.float32 and a.std() > 0.01
        assert np.array_equal(a, b)


def test_the_manifest_states_the_network_s_facts_and_checksums(trained):
    package = trained / "travel.emrun"
    assert invoke("export", trained / "run", package).exit_code == 0
    with zipfile.ZipFile(package) as zf:
        assert sorted(zf.namelist()) == ["manifest.json", "recipe.yaml", "weights.pt"]
        manifest = json.loads(zf.read("manifest.json"))
    assert manifest["format"] == "emrun-model" and manifest["format_version"] == 1
    assert manifest["tasks"]["aff"] == {"target": "affinity", "channels": 4,
                                        "activation": "sigmoid", "offsets": OFFSETS}
    assert manifest["tasks"]["mito"]["channels"] == 1
    assert manifest["input"]["voxel_size"] == [30.0, 6.0, 6.0]
    assert manifest["input"]["intensity"]["low"] == 0 and \
        manifest["input"]["intensity"]["high"] == 255
    assert manifest["input"]["patch"] == [4, 16, 16]
    provenance = manifest["provenance"]
    assert provenance["iteration"] == 7 and provenance["checkpoint"] == "last.pt"
    assert provenance["run"] == str((trained / "run").resolve())
    assert provenance["training_data"]["a"].startswith("synthetic (seed 3")
    assert provenance["torch"] == torch.__version__ and provenance["exported"]
    assert set(manifest["members"]) == {"recipe.yaml", "weights.pt"}
    read = read_package(package)
    saved = torch.load(trained / "run/checkpoints/last.pt")
    assert read.recipe == saved["recipe"]
    assert all(torch.equal(read.weights[k], saved["model"][k]) for k in saved["model"])
    assert not list(trained.glob(".travel.emrun.*")), "no temporary file left"


def test_fine_tuning_starts_from_the_package_s_weights(trained):
    from emrun.train.trainer import Trainer

    package = trained / "travel.emrun"
    assert invoke("export", trained / "run", package).exit_code == 0
    loaded = load_recipe(trained / "recipe.yaml", [])
    trainer = Trainer(loaded, trained / "ft", init_from=package, device="cpu")
    weights = read_package(package).weights
    state = trainer.model.state_dict()
    assert all(torch.equal(state[k], weights[k]) for k in weights)
    done = invoke("train", trained / "recipe.yaml", "--run-dir", trained / "ft2",
                  "--init-from", package, "-o", "train.iterations=1", "-o",
                  "train.validate_every=0")
    assert done.exit_code == 0, done.output
    widened = invoke("train", trained / "recipe.yaml", "--run-dir", trained / "ft3",
                     "--init-from", package, "-o", "model.widths=[4, 16]")
    assert widened.exit_code == 2 and "do not fit" in widened.stderr
    assert "of another shape (first " in widened.stderr  # names a tensor and both shapes
    assert len(widened.stderr.strip().splitlines()) == 1


def _flip_byte_in(package: Path, member: str) -> None:
    """Change one byte inside ``member``'s stored data, in place."""
    with zipfile.ZipFile(package) as zf:
        info = zf.getinfo(member)
    data = bytearray(package.read_bytes())
    header = info.header_offset
    name_length = int.from_bytes(data[header + 26:header + 28], "little")
    extra_length = int.from_bytes(data[header + 28:header + 30], "little")
    start = header + 30 + name_length + extra_length
    data[start + info.file_size // 2] ^= 0xFF
    package.write_bytes(bytes(data))


def _rewrite(package: Path, member: str, change) -> None:
    """Replace ``member`` by ``change(its bytes)`` in a well-formed archive (valid CRCs)."""
    with zipfile.ZipFile(package) as zf:
        members = {name: zf.read(name) for name in zf.namelist()}
    members[member] = change(members[member])
    with zipfile.ZipFile(package, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)


@pytest.mark.parametrize("member", ["weights.pt", "recipe.yaml", "manifest.json"])
def test_a_changed_byte_is_refused_naming_the_member(trained, member):
    package = trained / "travel.emrun"
    assert invoke("export", trained / "run", package).exit_code == 0
    _flip_byte_in(package, member)
    refused = invoke("infer", "--model", package, "--input", trained / "in.zarr/image",
                     "--output", trained / "out.zarr")
    assert refused.exit_code == 2
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert member in refused.stderr and "checksum" in refused.stderr
    assert not (trained / "out.zarr").exists()


def test_a_rewritten_member_or_an_unknown_version_is_refused(trained):
    package = trained / "travel.emrun"
    assert invoke("export", trained / "run", package).exit_code == 0
    _rewrite(package, "recipe.yaml", lambda b: b.replace(b"batch_size: 3", b"batch_size: 2"))
    refused = invoke("train", trained / "recipe.yaml", "--run-dir", trained / "ft",
                     "--init-from", package)
    assert refused.exit_code == 2 and "member recipe.yaml does not match its checksum" in \
        refused.stderr
    package.unlink()
    assert invoke("export", trained / "run", package).exit_code == 0
    _rewrite(package, "manifest.json",
             lambda b: b.replace(b'"format_version": 1', b'"format_version": 9'))
    refused = invoke("infer", "--model", package, "--input", trained / "in.zarr/image",
                     "--output", trained / "out.zarr")
    assert refused.exit_code == 2 and "format version 9 is not supported" in refused.stderr


def test_infer_takes_one_network_of_the_right_kind(trained):
    package = trained / "travel.emrun"
    assert invoke("export", trained / "run/checkpoints/last.pt", package).exit_code == 0
    image, out = trained / "in.zarr/image", trained / "out.zarr"
    checkpoint = trained / "run/checkpoints/last.pt"
    cases = {
        "--checkpoint CHECKPOINT or": ["--input", image, "--output", out],
        "(one of them)": ["--model", package, "--checkpoint", checkpoint, "--input", image,
                          "--output", out],
        "is a model package: give it as --model": ["--checkpoint", package, "--input", image,
                                                   "--output", out],
        "is not a model package (a training checkpoint?": ["--model", checkpoint, "--input",
                                                           image, "--output", out],
        "not a readable zip file (cut short or damaged?": [
            "--model", trained / "cut.emrun", "--input", image, "--output", out],
        "no such model package": ["--model", trained / "nope.emrun", "--input", image,
                                  "--output", out],
        "named pipe": ["--model", trained / "pipe.emrun", "--input", image, "--output", out],
        "is an ONNX graph, for other tools": ["--model", trained / "m.onnx", "--input", image,
                                              "--output", out],
    }
    os.mkfifo(trained / "pipe.emrun")
    (trained / "m.onnx").write_bytes(b"\x08\x08\x12\x07pytorch")  # an ONNX protobuf's start
    (trained / "cut.emrun").write_bytes(package.read_bytes()[: package.stat().st_size // 2])
    for expected, args in cases.items():
        result = invoke("infer", *args)
        assert result.exit_code == 2 and expected in result.stderr, (expected, result.output)
    assert not out.exists()


def test_export_takes_a_run_s_best_checkpoint_and_refuses_what_it_cannot_read(trained):
    run = trained / "run"
    best = torch.load(run / "checkpoints/last.pt")
    best["iteration"] = 5
    torch.save(best, run / "checkpoints/best.pt")
    assert invoke("export", run, trained / "a.emrun").exit_code == 0
    assert read_package(trained / "a.emrun").manifest["provenance"]["iteration"] == 5
    again = invoke("export", trained / "a.emrun", trained / "b.emrun")
    assert again.exit_code == 0, again.output
    assert read_package(trained / "b.emrun").manifest["provenance"]["checkpoint"] == "best.pt"
    bare = trained / "bare.pt"
    torch.save({"model": best["model"], "iteration": 1}, bare)
    cases = {
        "carries no recipe": [bare, trained / "x.emrun"],
        "no such run directory": [trained / "missing", trained / "x.emrun"],
        "without checkpoints/best.pt": [trained, trained / "x.emrun"],
        "is a directory": [run, trained],
        "--format must be one of": [run, trained / "x.emrun", "--format", "tflite"],
        "--format must be one of ": [run, trained / "a.emrun", "--format", "xyz"],  # a.emrun
        # exists: the bad format was reported as 'exists; export never overwrites'
        "give --format (emrun, bioimageio, onnx), or name the file *.emrun, *.zip, *.onnx": [
            run, trained / "x.out"],
        "a .onnx file is onnx, but --format is emrun; name the file *.emrun or give --format "
        "onnx": [run, trained / "x.onnx", "--format", "emrun"],
    }
    for expected, args in cases.items():
        result = invoke("export", *args)
        assert result.exit_code == 2 and expected in result.stderr, (expected, result.output)
    assert not any(trained.glob("x.*"))
    kept = (trained / "a.emrun").read_bytes()
    twice = invoke("export", run, trained / "a.emrun")  # a file the user has: never replaced
    assert twice.exit_code == 2 and "never overwrites" in twice.stderr
    assert (trained / "a.emrun").read_bytes() == kept
    recipe = yaml.safe_load(best["recipe"])
    assert recipe["name"] == "travel"


# --------------------------------------------------------------------------- bioimage.io


def _preprocess(steps, array: np.ndarray) -> np.ndarray:
    """Apply the preprocessing a bioimage.io description declares (the steps emrun writes)."""
    for step in steps:
        kwargs = step.kwargs
        if step.id == "ensure_dtype":
            array = array.astype(str(kwargs.dtype))
        elif step.id == "scale_linear":
            array = array * np.float32(kwargs.gain) + np.float32(kwargs.offset)
        elif step.id == "clip":
            array = np.clip(array, kwargs.min, kwargs.max)
        else:
            raise AssertionError(f"unexpected preprocessing {step.id}")
    return array


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
def test_a_bioimageio_model_passes_bioimageio_s_checks_and_reproduces_its_tests(trained):
    """bioimage.io's validator accepts the zip (spec 0.5); each weights format, run on the
    test input after the declared preprocessing, reproduces the test outputs, which are what
    emrun's own model predicts."""
    spec = pytest.importorskip("bioimageio.spec")
    from bioimageio.spec.utils import load_array

    out = trained / "travel.zip"
    done = invoke("export", trained / "run", out, "--format", "bioimageio")
    assert done.exit_code == 0, done.output
    description = spec.load_description(out, perform_io_checks=True)
    summary = description.validation_summary
    assert summary.status in ("valid-format", "passed"), summary.format()
    assert str(description.format_version).startswith("0.5.")
    [raw] = description.inputs
    assert [str(a.id) for a in raw.axes] == ["batch", "channel", "z", "y", "x"]
    assert [a.scale for a in raw.axes[2:]] == [30.0, 6.0, 6.0]
    assert [str(o.id) for o in description.outputs] == ["aff", "mito"]
    assert len(description.outputs[0].axes[1].channel_names) == len(OFFSETS)
    assert description.documentation is not None
    image = load_array(raw.test_tensor)
    scaled = torch.from_numpy(_preprocess(raw.preprocessing, image))
    expected = [load_array(o.test_tensor) for o in description.outputs]
    emrun_model = build_model(Recipe.model_validate(RECIPE))
    emrun_model.load_state_dict(torch.load(trained / "run/checkpoints/last.pt")["model"])
    with torch.no_grad():
        own = emrun_model.eval()(scaled)
    for name, array in zip(("aff", "mito"), expected, strict=True):
        np.testing.assert_allclose(array, torch.sigmoid(own[name]).numpy(), atol=1e-5)
    archive = zipfile.ZipFile(out)
    torchscript = torch.jit.load(io.BytesIO(archive.read(
        str(description.weights.torchscript.source))))
    architecture = description.weights.pytorch_state_dict.architecture
    network = getattr(importlib.import_module(architecture.import_from),
                      str(architecture.callable))(**architecture.kwargs)
    network.load_state_dict(torch.load(io.BytesIO(archive.read(
        str(description.weights.pytorch_state_dict.source))), weights_only=True))
    larger = torch.rand(2, 1, 6, 20, 24)  # batch and size are free (patch + k * divisor)
    with torch.no_grad():
        for runnable in (torchscript, network.eval()):
            for got, want in zip(runnable(scaled), expected, strict=True):
                np.testing.assert_allclose(got.numpy(), want, atol=1e-5)
            assert [tuple(t.shape) for t in runnable(larger)] == [(2, 4, 6, 20, 24),
                                                                  (2, 1, 6, 20, 24)]


def test_emrun_reads_its_bioimageio_model_back_and_refuses_other_spec_versions(trained):
    pytest.importorskip("bioimageio.spec")
    out = trained / "travel.zip"
    assert invoke("export", trained / "run", out, "--format", "bioimageio").exit_code == 0
    image = trained / "in.zarr/image"
    by_zip = invoke("infer", "--model", out, "--input", image, "--output", trained / "z.zarr")
    assert by_zip.exit_code == 0, by_zip.output
    by_checkpoint = invoke("infer", "--checkpoint", trained / "run/checkpoints/last.pt",
                           "--input", image, "--output", trained / "c.zarr")
    assert by_checkpoint.exit_code == 0, by_checkpoint.output
    assert np.array_equal(zarr.open_array(str(trained / "z.zarr/aff/0"))[...],
                          zarr.open_array(str(trained / "c.zarr/aff/0"))[...])
    state = torch.load(trained / "run/checkpoints/last.pt")
    state["model"] = {k: v + 1 if v.is_floating_point() else v for k, v in state["model"].items()}
    torch.save(state, trained / "other.pt")
    assert invoke("export", trained / "other.pt", trained / "other.emrun").exit_code == 0
    swapped = trained / "swapped.zip"  # another network's package put in its place
    swapped.write_bytes(out.read_bytes())
    _rewrite(swapped, "travel.emrun", lambda b: (trained / "other.emrun").read_bytes())
    refused = invoke("infer", "--model", swapped, "--input", image, "--output", trained / "s.zarr")
    assert refused.exit_code == 2 and "travel.emrun does not match its sha256" in refused.stderr
    _rewrite(out, "rdf.yaml", lambda b: b.replace(b"format_version: 0.5.", b"format_version: 0.4."))
    refused = invoke("infer", "--model", out, "--input", image, "--output", trained / "o.zarr")
    assert refused.exit_code == 2
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "bioimage.io spec version 0.4." in refused.stderr and "not supported" in refused.stderr


# --------------------------------------------------------------------------- ONNX


def test_an_onnx_graph_computes_what_pytorch_computes(trained):
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    out = trained / "travel.onnx"
    done = invoke("export", trained / "run", out)  # the format from the suffix
    assert done.exit_code == 0, done.output
    assert "onnxruntime matches PyTorch" in done.stdout
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["raw"]
    assert [o.name for o in session.get_outputs()] == ["aff", "mito"]
    model = build_model(Recipe.model_validate(RECIPE))
    model.load_state_dict(torch.load(trained / "run/checkpoints/last.pt")["model"])
    for shape in [(1, 1, 4, 16, 16), (3, 1, 7, 22, 18)]:  # batch and z, y, x are dynamic
        image = torch.rand(shape)
        got = session.run(None, {"raw": image.numpy()})
        with torch.no_grad():
            want = model.eval()(image)
        for name, array in zip(("aff", "mito"), got, strict=True):
            np.testing.assert_allclose(array, torch.sigmoid(want[name]).numpy(), atol=1e-4)
    assert not [p for p in trained.iterdir() if p.name.startswith(".travel.onnx")]


@pytest.mark.parametrize(("format_", "module", "extra"), [("bioimageio", "bioimageio.spec",
                                                           "emrun[bioimageio]"),
                                                          ("onnx", "onnxruntime", "emrun[onnx]")])
def test_a_missing_extra_is_one_line_saying_what_to_install(trained, monkeypatch, format_,
                                                            module, extra):
    import sys

    monkeypatch.setitem(sys.modules, module, None)  # importing it raises ImportError
    result = invoke("export", trained / "run", trained / "x.out", "--format", format_)
    assert result.exit_code == 2 and extra in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (trained / "x.out").exists()


@pytest.mark.parametrize("recipe_name", ["demo", "snemi3d_aff", "x", "a.b/c:d" + "e" * 80])
def test_any_recipe_name_makes_a_bioimageio_name(recipe_name):
    spec = pytest.importorskip("bioimageio.spec.model.v0_5")
    from typing import Annotated

    from pydantic import TypeAdapter

    from emrun.export.bioimageio import _name

    name = _name(recipe_name)
    field = spec.ModelDescr.model_fields["name"]  # bioimage.io's own rule for the name
    TypeAdapter(Annotated[field.annotation, *field.metadata]).validate_python(name)
    assert 5 <= len(name) <= 64 and set(name) <= set(
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_+- ()")


FULL_DISK_EXPORT = """
import contextlib, importlib, os, sys
from emrun.export import staging

real = staging.staging_folder
_, run, out, format_, module, name = sys.argv


@contextlib.contextmanager
def full(output):  # a file lands on a full disk (/dev/full: every write is ENOSPC)
    with real(output) as folder:
        os.symlink("/dev/full", folder / (name or output.name))
        yield folder


importlib.import_module(module).staging_folder = full
from emrun.cli import main

sys.argv = ["emrun", "export", run, out, "--format", format_]
main()
"""


def _export_on_a_full_disk_in_process(monkeypatch, run: Path, out: Path, format_: str,
                                      name: str) -> tuple[int, str]:
    """FULL_DISK_EXPORT's run, here (CliRunner): for the formats no C++ writer aborts on."""
    import contextlib

    module = importlib.import_module(f"emrun.export.{format_}")
    real = module.staging_folder

    @contextlib.contextmanager
    def full(output):
        with real(output) as folder:
            os.symlink("/dev/full", folder / (name or output.name))
            yield folder

    monkeypatch.setattr(module, "staging_folder", full)
    result = invoke("export", run, out, "--format", format_)
    return result.exit_code, result.stderr


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
@pytest.mark.parametrize(("format_", "needs", "name", "own_process"), [
    ("bioimageio", "bioimageio.spec", "weights_torchscript.pt", True),
    ("onnx", "onnxruntime", "", False)])
def test_an_export_on_a_full_disk_is_one_line_and_leaves_nothing(trained, monkeypatch, format_,
                                                                 needs, name, own_process):
    """torch's own zip writer aborted the process on a full disk (SIGABRT, a page of C++
    frames) and left the hidden work folder behind: that case runs in a process of its own
    (an abort must not take pytest with it). ONNX blamed the model: in this process (the
    export's imports are paid once, with the other ONNX tests)."""
    import subprocess
    import sys

    pytest.importorskip(needs)
    out = trained / f"m.{format_}"
    if own_process:
        done = subprocess.run([sys.executable, "-c", FULL_DISK_EXPORT, str(trained / "run"),
                               str(out), format_, f"emrun.export.{format_}", name],
                              capture_output=True, text=True, timeout=300)
        code, stderr = done.returncode, done.stderr
    else:
        code, stderr = _export_on_a_full_disk_in_process(monkeypatch, trained / "run", out,
                                                         format_, name)
    assert code == 2, stderr[-2000:]
    assert stderr.startswith("error: the disk is full")
    assert len(stderr.strip().splitlines()) == 1
    assert not [p for p in trained.iterdir() if out.name in p.name]


def test_an_export_killed_outright_leaves_nothing_the_next_one_keeps(trained):
    """An export killed outright (kill -9) left its hidden staging folder, a model's size,
    beside the output for good, even after the same export ran again. The next export
    there removes this machine's whose process is gone; a live export's, or another
    machine's, stay."""
    import socket
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    host = socket.gethostname()
    stale = trained / f".a.emrun.{gone}@{host}.x1y2z3.partial"
    live = trained / f".a.emrun.{os.getppid()}@{host}.q7r8s9.partial"
    elsewhere = trained / f".a.emrun.{gone}@not-{host}.k4l5m6.partial"
    for folder in (stale, live, elsewhere):
        folder.mkdir()
        (folder / "a.emrun").write_bytes(b"model" * 100)
    result = invoke("export", trained / "run", trained / "a.emrun")
    assert result.exit_code == 0, result.output
    assert not stale.exists() and live.exists() and elsewhere.exists()
    assert sorted(p.name for p in trained.glob(".a.emrun.*")) == sorted(
        [live.name, elsewhere.name])  # and its own staging folder is gone too


def test_a_file_named_as_a_package_that_is_none_is_said_so(trained):
    """A truncated package was called 'not an emrun checkpoint', and a zip of other files
    failed with torch's C++ assertion ('enforce fail at inline_container.cc')."""
    import zipfile

    assert invoke("export", trained / "run", trained / "m.emrun").exit_code == 0
    (trained / "cut.emrun").write_bytes((trained / "m.emrun").read_bytes()[:500])
    with zipfile.ZipFile(trained / "other.zip", "w") as zf:
        zf.writestr("hello.txt", "hello")
    cases = {
        "cut.emrun": "is not a model package (an emrun package or a bioimage.io model): not a "
                     "whole zip archive",
        "other.zip": "is a zip archive but no model package: it holds no manifest.json",
    }
    for name, said in cases.items():
        result = invoke("export", trained / name, trained / "x.emrun")
        assert result.exit_code == 2, result.output
        assert said in result.output and "enforce fail" not in result.output
        assert "Traceback" not in result.output and not (trained / "x.emrun").exists()
