"""`emrun export`, probed: task names and offsets other tools cannot take as they are, a
patch one section deep, hand-edited packages, checkpoints without (finite) weights and runs
stopped before `last.pt`. Tiny networks with lively random weights, made in code."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from emrun.cli import app
from emrun.io.package import read_package
from emrun.io.write import write_volume
from emrun.models import build_model
from emrun.recipe import Recipe
from emrun.train.run_dir import recipe_text

runner = CliRunner()
TWELVE = [[-1, 0, 0], [0, -1, 0], [0, 0, -1], [-2, 0, 0], [0, -3, 0], [0, 0, -3],
          [-3, 0, 0], [0, -5, 0], [0, 0, -5], [0, -7, 0], [0, 0, -7], [0, -9, 0]]
"""Twelve affinity offsets, as SNEMI3D's recipe has: more than 128 characters written out."""


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def _recipe(tasks: dict[str, Any], **infer: Any) -> dict[str, Any]:
    return {
        "name": "probe",
        "data": {"sources": {"a": {"type": "synthetic", "shape": [16, 64, 64], "seed": 3}}},
        "model": {"type": "rsunet", "widths": [4, 8]},
        "tasks": tasks,
        "train": {"patch": [4, 16, 16], "iterations": 2, "workers": 0},
        "infer": {"dtype": "float32", "precision": "fp32", **infer},
    }


def _run(folder: Path, recipe: dict[str, Any], edit=None) -> Path:
    """A run directory with one checkpoint (random weights), ``edit`` applied to its state."""
    built = Recipe.model_validate(recipe)
    torch.manual_seed(0)
    model = build_model(built)
    for p in model.parameters():
        p.data.normal_(0, 0.3)
    state = {"model": model.state_dict(), "iteration": 7, "recipe": recipe_text(built)}
    if edit is not None:
        edit(state)
    (folder / "run" / "checkpoints").mkdir(parents=True)
    torch.save(state, folder / "run" / "checkpoints" / "last.pt")
    return folder / "run"


def _image(folder: Path) -> Path:
    volume = (np.random.default_rng(0).random((6, 20, 20)) * 255).astype(np.uint8)
    write_volume(folder / "in.zarr", "image", volume, voxel_size=(30, 6, 6))
    return folder / "in.zarr/image"


def _one_line(result, *words: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert all(w in lines[0] for w in words), lines


# --------------------------------------------------------------------------- other tools


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_task_names_and_offsets_bioimageio_cannot_take_still_make_a_valid_model(tmp_path):
    """Before: a task named `my-task` (a valid emrun name) or `raw` (the input's id), twelve
    affinity offsets (SNEMI3D's recipe: a tensor description over 128 characters) and a
    recipe description over 1024 characters each ended the export in an internal error."""
    spec = pytest.importorskip("bioimageio.spec")
    recipe = _recipe({"my-task": {"target": {"type": "affinity", "offsets": TWELVE}},
                      "raw": {"target": {"type": "binary", "volume": "mito"}}})
    recipe["description"] = "Membranes. " * 200
    run = _run(tmp_path, recipe)
    done = invoke("export", run, tmp_path / "m.zip")
    assert done.exit_code == 0, done.output
    assert "my-task as my_task" in done.stdout and "raw as raw_" in done.stdout
    description = spec.load_description(tmp_path / "m.zip", perform_io_checks=True)
    assert description.validation_summary.status in ("valid-format", "passed"), \
        description.validation_summary.format()
    assert [str(o.id) for o in description.outputs] == ["my_task", "raw_"]
    assert "12 affinity offsets" in description.outputs[0].description
    assert "task my-task" in description.outputs[0].description
    assert read_package(tmp_path / "m.zip").weights.keys() == \
        torch.load(run / "checkpoints/last.pt")["model"].keys()


def test_output_names_are_ids_every_tool_takes_and_unique():
    from emrun.export.network import output_names

    names = output_names(["aff", "my-task", "my_task", "raw", "None", "a" * 40, "a" * 33])
    assert names[:5] == ["aff", "my_task", "my_task_", "raw_", "None_"]
    assert len(set(names)) == len(names) and "raw" not in names
    assert all(n.isidentifier() and len(n) <= 32 for n in names)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_an_onnx_graph_of_a_one_section_patch_declares_every_size_free(tmp_path):
    """Before: traced at batch 1 and a patch 1 section deep, the graph declared its outputs
    (-1, 1, 1, y, x) while computing (b, 1, z, y, x) (onnxruntime warned; stricter runtimes
    fail); and an output named `raw` collided with the input (an internal error)."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    recipe = _recipe({"raw": {"target": {"type": "binary", "volume": "mito"}}},
                     patch=[1, 16, 16])
    run = _run(tmp_path, recipe)
    done = invoke("export", run, tmp_path / "m.onnx")
    assert done.exit_code == 0, done.output
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    assert [i.name for i in graph.input] == ["raw"]
    assert [o.name for o in graph.output] == ["raw_"]
    dims = graph.output[0].type.tensor_type.shape.dim
    assert [bool(d.dim_param) for d in dims] == [True, False, True, True, True], dims


# --------------------------------------------------------------------------- packages


def _rewritten(package: Path, out: Path, edit) -> Path:
    """``package`` with its manifest edited by ``edit`` (as a hand would, checksums kept)."""
    with zipfile.ZipFile(package) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    manifest = json.loads(members["manifest.json"])
    edit(manifest)
    members["manifest.json"] = json.dumps(manifest).encode()
    with zipfile.ZipFile(out, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return out


@pytest.mark.parametrize("edit", [
    lambda m: m.pop("provenance"),
    lambda m: m.__setitem__("provenance", []),
    lambda m: m["provenance"].__setitem__("iteration", "x"),
    lambda m: m["provenance"].__setitem__("iteration", None),
], ids=["no-provenance", "provenance-list", "iteration-text", "iteration-none"])
def test_a_hand_edited_manifest_is_one_line_not_an_internal_error(tmp_path, edit):
    """Before: KeyError, ValueError or TypeError, exit 1, from infer, export and
    --init-from alike."""
    run = _run(tmp_path, _recipe({"aff": {"target": {"type": "affinity"}}}))
    assert invoke("export", run, tmp_path / "p.emrun").exit_code == 0
    edited = _rewritten(tmp_path / "p.emrun", tmp_path / "e.emrun", edit)
    refused = invoke("infer", "--model", edited, "--input", _image(tmp_path),
                     "--output", tmp_path / "o.zarr")
    _one_line(refused, "e.emrun", "manifest.json", "provenance.iteration")
    _one_line(invoke("export", edited, tmp_path / "again.emrun"), "manifest.json")
    assert not (tmp_path / "o.zarr").exists() and not (tmp_path / "again.emrun").exists()


# --------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize(("edit", "words"), [
    (lambda s: s.pop("model"), ["holds no network weights", "'model' is missing"]),
    (lambda s: s.__setitem__("model", [1, 2]), ["holds no network weights", "a list"]),
])
def test_a_checkpoint_without_weights_is_one_line_for_export_and_infer(tmp_path, edit, words):
    """Before: TypeError (export) and AttributeError (infer), exit 1."""
    run = _run(tmp_path, _recipe({"aff": {"target": {"type": "affinity"}}}), edit)
    _one_line(invoke("export", run, tmp_path / "p.emrun"), "last.pt", *words)
    refused = invoke("infer", "--checkpoint", run / "checkpoints/last.pt",
                     "--input", _image(tmp_path), "--output", tmp_path / "o.zarr")
    _one_line(refused, "last.pt", *words)
    assert not (tmp_path / "p.emrun").exists() and not (tmp_path / "o.zarr").exists()


def _nan(state: dict[str, Any]) -> None:
    next(iter(state["model"].values())).fill_(float("nan"))


def test_a_diverged_checkpoint_is_not_exported(tmp_path):
    """Before: NaN weights made a package that `emrun infer --model` then refused, and an
    ONNX export that 'differs from PyTorch by nan'."""
    run = _run(tmp_path, _recipe({"aff": {"target": {"type": "affinity"}}}), _nan)
    _one_line(invoke("export", run, tmp_path / "p.emrun"), "NaN or infinite",
              "input_conv.weight", "earlier checkpoint")
    assert not (tmp_path / "p.emrun").exists()


def test_weights_of_another_model_name_the_tensors_that_differ(tmp_path):
    """Before: '(Error(s) in loading state_dict for RSUNetModel:)', torch's first line."""
    run = _run(tmp_path, _recipe({"aff": {"target": {"type": "affinity"}}}))
    state = torch.load(run / "checkpoints/last.pt")
    recipe = yaml.safe_load(state["recipe"])
    recipe["model"]["widths"] = [4, 16]
    state["recipe"] = yaml.safe_dump(recipe)
    torch.save(state, run / "checkpoints/last.pt")
    _one_line(invoke("export", run, tmp_path / "p.emrun"), "do not match",
              "of another shape", "the model's")


def test_a_run_stopped_before_last_pt_names_its_newest_numbered_checkpoint(tmp_path):
    """A kill between saving iter_N.pt and pointing last.pt at it leaves no last.pt; the
    refusal said only 'give a run directory or a checkpoint file' (it was one)."""
    run = _run(tmp_path, _recipe({"aff": {"target": {"type": "affinity"}}}))
    (run / "checkpoints/last.pt").rename(run / "checkpoints/iter_0000007.pt")
    (run / "checkpoints/iter_0000003.pt").write_bytes(b"older")
    _one_line(invoke("export", run, tmp_path / "p.emrun"), "iter_0000007.pt")
    done = invoke("export", run / "checkpoints/iter_0000007.pt", tmp_path / "p.emrun")
    assert done.exit_code == 0, done.output


def test_a_checkpoint_without_a_recipe_is_not_told_to_give_an_option_export_lacks(tmp_path):
    """Before: 'give the one it was trained with: --recipe RECIPE'; `emrun export` has no
    --recipe (the export must carry the recipe its weights were trained with)."""
    run = _run(tmp_path, _recipe({"aff": {"target": {"type": "affinity"}}}),
               lambda s: s.__setitem__("recipe", "model: [1\n"))
    refused = invoke("export", run, tmp_path / "p.emrun")
    _one_line(refused, "carries no recipe", "emrun infer --checkpoint")
    assert "give the one it was trained with" not in refused.stderr


# --------------------------------------------------------------------------- stated facts


def test_hand_edited_input_facts_are_not_carried_into_the_next_export(tmp_path):
    """A package exported again where its training data are gone keeps the voxel size and
    intensity its manifest states; a hand-edited one (text, zeros, low = high) was carried
    into the new package as it was, and a .zip export then failed (ValueError,
    ZeroDivisionError; an intensity given as text failed the .emrun export too)."""
    image = tmp_path / "data.zarr"
    write_volume(image, "image", np.zeros((8, 32, 32), np.uint16), voxel_size=(40, 4, 4))
    recipe = _recipe({"aff": {"target": {"type": "affinity"}}})
    recipe["data"] = {"sources": {"a": {"image": f"{image}/image", "labels": f"{image}/image"}}}
    run = _run(tmp_path, recipe)
    assert invoke("export", run, tmp_path / "m.emrun").exit_code == 0
    image.rename(tmp_path / "gone.zarr")
    edited = _rewritten(tmp_path / "m.emrun", tmp_path / "e.emrun", lambda m: m["input"].update(
        voxel_size="abc", intensity={"low": 5, "high": 5}))
    done = invoke("export", edited, tmp_path / "again.emrun")
    assert done.exit_code == 0, done.output
    facts = read_package(tmp_path / "again.emrun").manifest["input"]
    assert facts["voxel_size"] is None and facts["intensity"]["low"] < facts["intensity"]["high"]
    assert "voxel size unknown" in done.stdout and "intensity scale assumed" in done.stdout


def test_a_path_through_a_missing_folder_leaves_no_empty_folder(tmp_path):
    """new/../p.emrun was written at p.emrun, and the folder 'new' it passed through was
    made and left behind, empty; folders the output lies in stay."""
    run = _run(tmp_path, _recipe({"aff": {"target": {"type": "affinity"}}}))
    result = invoke("export", run, tmp_path / "new" / ".." / "deep" / "p.emrun")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "deep" / "p.emrun").is_file() and not (tmp_path / "new").exists()


def test_an_onnx_file_given_as_the_source_is_said_to_be_an_export(tmp_path):
    """`emrun export x.onnx y.emrun` said "not an emrun checkpoint: not a PyTorch file"."""
    (tmp_path / "x.onnx").write_bytes(b"\x08\x07onnx-ish")
    result = runner.invoke(app, ["export", str(tmp_path / "x.onnx"), str(tmp_path / "y.emrun")])
    assert result.exit_code == 2, result.output
    assert "x.onnx is an ONNX export: emrun exports from a run directory, a checkpoint or " \
           "an .emrun package" in " ".join(result.stderr.split())
    assert not (tmp_path / "y.emrun").exists()


def test_a_full_disk_names_the_package_asked_for_not_its_staging_file(tmp_path, monkeypatch):
    """The package export named its hidden staging file ('.x.emrun.6061@vm....partial/
    x.emrun: cannot write') where the user asked for x.emrun."""
    import errno

    import emrun.io.package

    run = _run(tmp_path, _recipe({"aff": {"target": {"type": "affinity"}}}))

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(emrun.io.package, "write_bytes", full)
    result = invoke("export", run, tmp_path / "x.emrun")
    _one_line(result, f"{tmp_path / 'x.emrun'}: cannot write (No space left on device)")
    assert ".partial" not in result.stderr and not list(tmp_path.glob("*x.emrun*"))
