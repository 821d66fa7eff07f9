"""`emrun export`, probed against the checkpoint each export came from.

`emrun infer --model PACKAGE` is compared with `emrun infer --checkpoint C` (and with
`--recipe R`) on inputs and settings tests/test_export.py does not use: TTA with a per-task
reduction, a Gaussian blend, uint8 output, an input stored at an offset, a ROI, an intensity
scale from the recipe on uint16 data, and a network trained for real with an EMA. The
package's recipe and manifest are checked for the inference settings they carry; the
TorchScript and ONNX exports of the models tests/test_export*.py do not export are run
against PyTorch at the tolerance README.md states; a tampered weight byte with a valid zip CRC
and a file that appears during an export are refused in one line. Tiny networks with lively
random weights, made in code."""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path
from typing import Any

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
from emrun.train.run_dir import recipe_text

runner = CliRunner()
OFFSETS = [[-1, 0, 0], [0, -1, 0], [0, 0, -1], [0, -3, 0], [0, 0, -3]]
"""Affinity offsets that every TTA variant (flips in z, y, x and the y/x transpose) maps
onto offsets of the same task."""
TASKS = {"aff": {"target": {"type": "affinity", "offsets": OFFSETS}},
         "mito": {"target": {"type": "binary", "volume": "mito"}},
         "dist": {"target": {"type": "distance"}, "activation": "tanh"}}


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def _recipe(tasks: dict[str, Any] | None = None, model: dict[str, Any] | None = None,
            **infer: Any) -> dict[str, Any]:
    return {
        "name": "reference",
        "data": {"sources": {"a": {"type": "synthetic", "shape": [16, 64, 64], "seed": 3}}},
        "model": model or {"type": "rsunet", "widths": [4, 8]},
        "tasks": tasks or TASKS,
        "train": {"patch": [4, 16, 16], "iterations": 2, "workers": 0},
        "infer": {"dtype": "float32", "precision": "fp32", **infer},
    }


def _run(folder: Path, recipe: dict[str, Any]) -> Path:
    """A run directory with one checkpoint of ``recipe``'s model (lively random weights)."""
    built = Recipe.model_validate(recipe)
    torch.manual_seed(0)
    model = build_model(built)
    for p in model.parameters():
        p.data.normal_(0, 0.3)
    (folder / "run" / "checkpoints").mkdir(parents=True)
    torch.save({"model": model.state_dict(), "iteration": 7, "recipe": recipe_text(built)},
               folder / "run" / "checkpoints" / "last.pt")
    return folder / "run"


def _volume(folder: Path, shape=(7, 26, 23), offset=None, dtype=np.uint8,
            high: int = 255) -> Path:
    array = (np.random.default_rng(1).random(shape) * high).astype(dtype)
    write_volume(folder / "in.zarr", "image", array, voxel_size=(30, 6, 6), offset=offset,
                 label=False)
    return folder / "in.zarr/image"


def _predict(folder: Path, name: str, network: list[object], image: Path,
             *more: object) -> dict[str, np.ndarray]:
    out = folder / f"{name}.zarr"
    done = invoke("infer", *network, "--input", image, "--output", out, *more)
    assert done.exit_code == 0, done.output
    group = zarr.open_group(str(out), mode="r")
    return {task: group[task]["0"][...] for task in group.group_keys()}


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for task in a:
        assert a[task].dtype == b[task].dtype and a[task].shape == b[task].shape, task
        assert np.array_equal(a[task], b[task]), (
            task, float(np.abs(a[task].astype(np.float64) - b[task]).max()))


def _one_line(result, *words: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert all(w in lines[0] for w in words), lines


# --------------------------------------------------------------------------- infer --model


def test_tta_gaussian_float16_and_an_offset_input_predict_the_same_bits(tmp_path):
    """Three tasks (sigmoid affinities, a binary head, a tanh distance), TTA 8 with `min` for
    one task, a Gaussian blend, a stride, float16 output, an input stored at an offset of
    (3, 5, 7) voxels, and a ROI: package and checkpoint give the same bytes, and the outputs
    lie at the same place in the input's space."""
    recipe = _recipe(tta=8, tta_reduce={"mito": "min"}, dtype="float16",
                     blend={"type": "gaussian"}, stride=[3, 12, 12], batch_size=3)
    run = _run(tmp_path, recipe)
    package = tmp_path / "p.emrun"
    assert invoke("export", run, package).exit_code == 0
    image = _volume(tmp_path, offset=(3, 5, 7))
    checkpoint = ["--checkpoint", run / "checkpoints/last.pt"]
    by_model = _predict(tmp_path, "m", ["--model", package], image)
    by_checkpoint = _predict(tmp_path, "c", checkpoint, image)
    _same(by_model, by_checkpoint)
    assert set(by_model) == {"aff", "mito", "dist"}
    assert by_model["aff"].dtype == np.float16 and by_model["aff"].shape == (5, 7, 26, 23)
    assert all(float(a.std()) > 0.005 for a in by_model.values())
    assert float(by_model["dist"].min()) < 0  # tanh, not clipped
    for name in ("m", "c"):
        attrs = zarr.open_group(str(tmp_path / f"{name}.zarr"), mode="r").attrs.asdict()
        assert attrs["emrun"]["tta"] == 8, attrs["emrun"]
    for task in by_model:
        assert _placement(tmp_path / "m.zarr", task) == _placement(tmp_path / "c.zarr", task)
    assert _placement(tmp_path / "m.zarr", "aff")[1]["translation"] == [0.0, 90.0, 30.0, 42.0]
    plain = _predict(tmp_path, "plain", checkpoint, image, "--tta", 1)
    assert not np.array_equal(plain["mito"], by_checkpoint["mito"]), "TTA was not applied"
    box = ["--roi", "2,4,3/4,16,13"]
    _same(_predict(tmp_path, "mr", ["--model", package], image, *box),
          _predict(tmp_path, "cr", checkpoint, image, *box))
    assert _placement(tmp_path / "mr.zarr", "mito") == _placement(tmp_path / "cr.zarr", "mito")


def _placement(output: Path, task: str) -> Any:
    """Where an output array says it lies (its OME-Zarr multiscales translation)."""
    attrs = zarr.open_group(str(output / task), mode="r").attrs.asdict()
    return attrs["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"]


def test_the_package_carries_the_inference_settings_and_a_recipe_changes_them_alike(tmp_path):
    """Two tasks. The package's recipe.yaml is the checkpoint's resolved recipe (patch,
    stride, blend, TTA, dtype, batch, precision, the recipe's intensity scale); its manifest
    states the patch, divisor, intensity and offsets. On uint16 data scaled by the recipe's
    [100, 4000] both predict the same uint8 bytes, and `--recipe R -o infer.tta=4` changes
    both alike."""
    recipe = _recipe({"aff": TASKS["aff"], "mito": TASKS["mito"]}, patch=[4, 20, 20],
                     overlap=[0.5, 0.5, 0.25], dtype="uint8", tta=2, blend={"type": "gaussian"},
                     batch_size=5)
    recipe["data"] = {"sources": {"a": {"image": "gone.zarr/image", "labels": "gone.zarr/l",
                                        "semantic": {"mito": "gone.zarr/mito"},
                                        "intensity": {"low": 100, "high": 4000}}}}
    run = _run(tmp_path, recipe)
    checkpoint = run / "checkpoints/last.pt"
    package = tmp_path / "p.emrun"
    done = invoke("export", run, package)
    assert done.exit_code == 0, done.output
    read = read_package(package)
    saved = torch.load(checkpoint)["recipe"]
    assert Recipe.model_validate(yaml.safe_load(read.recipe)).resolved() == \
        Recipe.model_validate(yaml.safe_load(saved)).resolved()
    infer = yaml.safe_load(read.recipe)["infer"]
    assert (infer["patch"], infer["overlap"], infer["dtype"], infer["tta"], infer["blend"]["type"],
            infer["batch_size"], infer["precision"]) == ([4, 20, 20], [0.5, 0.5, 0.25], "uint8",
                                                         2, "gaussian", 5, "fp32")
    facts = read.manifest
    assert facts["input"]["patch"] == [4, 20, 20] and facts["input"]["divisor"] == [1, 2, 2]
    assert facts["input"]["intensity"] == {"low": 100, "high": 4000, "from": "recipe"}
    assert facts["tasks"]["aff"]["offsets"] == OFFSETS
    assert facts["tasks"]["mito"] == {"target": "binary", "channels": 1,
                                      "activation": "sigmoid"}
    image = _volume(tmp_path, shape=(6, 30, 27), dtype=np.uint16, high=4200)
    by_model = _predict(tmp_path, "m", ["--model", package], image)
    _same(by_model, _predict(tmp_path, "c", ["--checkpoint", checkpoint], image))
    assert by_model["aff"].dtype == np.uint8 and float(by_model["aff"].std()) > 1
    for name in ("m", "c"):
        record = zarr.open_group(str(tmp_path / f"{name}.zarr"), mode="r").attrs["emrun"]
        assert record["scale"] == [100.0, 4000.0] and record["tta"] == 2, record
    (tmp_path / "r.yaml").write_text(saved)
    changed = ["--recipe", tmp_path / "r.yaml", "-o", "infer.tta=4"]
    by_model4 = _predict(tmp_path, "m4", ["--model", package, *changed], image)
    _same(by_model4, _predict(tmp_path, "c4", ["--checkpoint", checkpoint, *changed], image))
    assert not np.array_equal(by_model4["aff"], by_model["aff"])


def test_a_network_trained_with_an_ema_travels_with_its_averaged_weights(tmp_path):
    """A real (three-iteration) run with train.ema: the package holds the EMA's parameters
    and buffers, not the optimizer's weights, says so, carries the run's provenance, and
    predicts what `infer --checkpoint RUN_DIR` predicts with the default inference settings
    (bf16 autocast, uint8)."""
    recipe = _recipe({"aff": TASKS["aff"], "mito": TASKS["mito"]})
    recipe["train"].update(iterations=3, ema=0.5, validate_every=0, batch_size=1)
    recipe["infer"] = {}  # the defaults: bf16 autocast, uint8 output
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    run = tmp_path / "run"
    trained = invoke("train", tmp_path / "r.yaml", "--run-dir", run, "--device", "cpu")
    assert trained.exit_code == 0, trained.output
    state = torch.load(run / "checkpoints/last.pt")
    assert state["ema"] is not None and state["iteration"] == 3
    package = tmp_path / "p.emrun"
    assert invoke("export", run, package).exit_code == 0
    read = read_package(package)
    averaged = {**state["ema"]["params"], **state["ema"]["buffers"]}
    assert read.weights.keys() == state["model"].keys()
    assert all(torch.equal(read.weights[k], v) for k, v in averaged.items())
    assert any(not torch.equal(read.weights[k], state["model"][k]) for k in averaged)
    provenance = read.manifest["provenance"]
    assert provenance["weights"] == "ema (decay 0.5)" and provenance["iteration"] == 3
    assert provenance["checkpoint"] == "last.pt" and "training_run" in provenance
    image = _volume(tmp_path)
    by_model = _predict(tmp_path, "m", ["--model", package], image)
    _same(by_model, _predict(tmp_path, "c", ["--checkpoint", run], image))
    raw = dict(state)
    raw.pop("ema")
    torch.save(raw, tmp_path / "raw.pt")
    by_raw = _predict(tmp_path, "r", ["--checkpoint", tmp_path / "raw.pt"], image)
    assert not np.array_equal(by_raw["aff"], by_model["aff"])


# --------------------------------------------------------------------------- other formats

MODELS = {"updown": {"type": "updown", "widths": [4, 8], "factor": [1, 2, 2]},
          "resenc": {"type": "resenc", "widths": [4, 8, 8], "blocks": [1, 1, 1]},
          "mednext": {"type": "mednext", "widths": [4, 8, 8], "blocks": [1, 1, 1]},
          "rsunet-2ch": {"type": "rsunet", "widths": [4, 8], "in_channels": 2}}
README_TOLERANCE = 2e-6
"""README.md: 'TorchScript and ONNX match PyTorch within 2e-6 on every size the zip declares
(rsunet, resenc, mednext, updown; multi-task; two input channels)'."""


def _rdf_files(zf: zipfile.ZipFile, rdf: dict[str, Any]) -> dict[str, str]:
    """Every file rdf.yaml names, with the sha256 it states."""
    found = {rdf["documentation"]["source"]: rdf["documentation"]["sha256"]}
    for entry in rdf["attachments"]:
        found[entry["source"]] = entry["sha256"]
    for tensor in (*rdf["inputs"], *rdf["outputs"]):
        found[tensor["test_tensor"]["source"]] = tensor["test_tensor"]["sha256"]
    for weights in rdf["weights"].values():
        found[weights["source"]] = weights["sha256"]
    return found


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("kind", list(MODELS))
def test_torchscript_and_onnx_of_the_other_models_match_pytorch(tmp_path, kind):
    """updown, resenc and mednext (tests/test_export*.py export rsunet only) and a
    two-channel rsunet (whose ONNX graph no test runs), three tasks:
    the zip's TorchScript and the ONNX graph match the model with its activations within
    README's 2e-6 at the patch and at patch + 2 divisors with batch 2; the zip's rdf.yaml
    states the patch lattice, the voxel size, the preprocessing, each output's channels and
    range, and a sha256 for each file that matches it; the TorchScript reproduces the test
    outputs within the declared tolerance."""
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    pytest.importorskip("bioimageio.spec")
    recipe = _recipe(model=MODELS[kind])
    built = Recipe.model_validate(recipe)
    run = _run(tmp_path, recipe)
    for suffix in ("zip", "onnx"):
        done = invoke("export", run, tmp_path / f"m.{suffix}")
        assert done.exit_code == 0, done.output
    model = build_model(built)
    model.load_state_dict(torch.load(run / "checkpoints/last.pt")["model"])
    model.eval()
    with zipfile.ZipFile(tmp_path / "m.zip") as zf:
        rdf = yaml.safe_load(zf.read("rdf.yaml"))
        for name, digest in _rdf_files(zf, rdf).items():
            assert hashlib.sha256(zf.read(name)).hexdigest() == digest, name
        traced = torch.jit.load(io.BytesIO(zf.read(rdf["weights"]["torchscript"]["source"])))
        test_input = np.load(io.BytesIO(zf.read("test_input_raw.npy")))
        test_outputs = [np.load(io.BytesIO(zf.read(f"test_output_{t}.npy"))) for t in TASKS]
    patch, divisor = built.infer_patch(), built.model.divisor()
    [raw] = rdf["inputs"]
    assert [a.get("size") for a in raw["axes"][2:]] == [
        {"min": p, "step": d} for p, d in zip(patch, divisor, strict=True)]
    assert [a["scale"] for a in raw["axes"][2:]] == [30.0, 6.0, 6.0]
    assert [o["id"] for o in rdf["outputs"]] == list(TASKS)
    assert [len(o["axes"][1]["channel_names"]) for o in rdf["outputs"]] == [len(OFFSETS), 1, 1]
    assert [o["data"]["range"] for o in rdf["outputs"]] == [[0.0, 1.0], [0.0, 1.0], [-1.0, 1.0]]
    attached = read_package(tmp_path / "m.zip").manifest
    assert rdf["config"]["emrun"]["tasks"] == attached["tasks"]
    assert rdf["config"]["emrun"]["input"] == attached["input"]
    tolerances = {t["output_ids"][0]: t["absolute_tolerance"]
                  for t in rdf["config"]["bioimageio"]["reproducibility_tolerance"]}
    scaled = torch.from_numpy(np.clip(test_input / np.float32(255), 0, 1).astype(np.float32))
    with torch.no_grad():
        for task, got, kept in zip(TASKS, traced(scaled), test_outputs, strict=True):
            assert float(np.abs(got.numpy() - kept).max()) <= tolerances.get(task, 1e-3)
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"),
                                           providers=["CPUExecutionProvider"])
    activations = {"sigmoid": torch.sigmoid, "tanh": torch.tanh}
    generator = torch.Generator().manual_seed(0)
    channels = built.model.input_channels()
    for shape in [(1, channels, *patch),
                  (2, channels, *(p + 2 * d for p, d in zip(patch, divisor, strict=True)))]:
        image = torch.rand(shape, generator=generator)
        with torch.no_grad():
            want = model(image)
            scripted = traced(image)
        graph = session.run(None, {"raw": image.numpy()})
        for i, task in enumerate(TASKS):
            expected = activations[built.tasks[task].activation](want[task]).numpy()
            worst = max(float(np.abs(scripted[i].numpy() - expected).max()),
                        float(np.abs(graph[i] - expected).max()))
            assert worst <= README_TOLERANCE, (kind, task, shape, worst)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_zip_exported_back_to_a_package_keeps_weights_recipe_and_predictions(tmp_path):
    """checkpoint -> .zip -> .emrun: the weights and recipe survive bit for bit, the
    provenance still names the checkpoint, and `infer --model` with either file and TTA 4
    predicts what the checkpoint predicts."""
    pytest.importorskip("bioimageio.spec")
    run = _run(tmp_path, _recipe(tta=4))
    checkpoint = run / "checkpoints/last.pt"
    assert invoke("export", checkpoint, tmp_path / "m.zip").exit_code == 0
    again = invoke("export", tmp_path / "m.zip", tmp_path / "back.emrun")
    assert again.exit_code == 0, again.output
    back = read_package(tmp_path / "back.emrun")
    state = torch.load(checkpoint)
    assert back.weights.keys() == state["model"].keys()
    assert all(torch.equal(back.weights[k], v) for k, v in state["model"].items())
    assert back.recipe == state["recipe"]
    assert back.manifest["provenance"]["checkpoint"] == "last.pt"
    assert back.manifest["provenance"]["iteration"] == 7
    image = _volume(tmp_path, offset=(1, 2, 3))
    reference = _predict(tmp_path, "c", ["--checkpoint", checkpoint], image)
    _same(_predict(tmp_path, "z", ["--model", tmp_path / "m.zip"], image), reference)
    _same(_predict(tmp_path, "b", ["--model", tmp_path / "back.emrun"], image), reference)


# --------------------------------------------------------------------------- tampering


def _members(archive: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(archive) as zf:
        return {n: zf.read(n) for n in zf.namelist()}


def _write_members(archive: Path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(archive, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)


def _one_weight_byte_changed(weights: bytes) -> bytes:
    """weights.pt with one byte of one float tensor's data changed (the pickle still loads:
    the change is in a tensor's storage, not in its structure)."""
    with zipfile.ZipFile(io.BytesIO(weights)) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    storage = max((n for n in members if "/data/" in n), key=lambda n: len(members[n]))
    data = bytearray(members[storage])
    data[len(data) // 2] ^= 0x01
    members[storage] = bytes(data)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, member in members.items():
            zf.writestr(name, member)
    changed = buffer.getvalue()
    state = torch.load(io.BytesIO(changed), weights_only=True)  # it is still loadable
    assert isinstance(state["model"], dict)
    return changed


def test_one_weight_byte_changed_under_valid_zip_crcs_is_refused_everywhere(tmp_path):
    """A weight changed by one bit, the package rewritten with valid CRCs (so only the
    manifest's SHA-256 can tell): infer, export and train --init-from each refuse it in one
    line naming weights.pt, exit 2. The same package attached to a zip whose rdf.yaml
    states the tampered package's sha256 is refused the same way (the inner checksums)."""
    pytest.importorskip("bioimageio.spec")
    run = _run(tmp_path, _recipe({"aff": TASKS["aff"]}))
    package = tmp_path / "p.emrun"
    assert invoke("export", run, package).exit_code == 0
    assert invoke("export", run, tmp_path / "m.zip").exit_code == 0
    members = _members(package)
    members["weights.pt"] = _one_weight_byte_changed(members["weights.pt"])
    tampered = tmp_path / "t.emrun"
    _write_members(tampered, members)
    image = _volume(tmp_path)
    words = ("t.emrun", "weights.pt", "checksum")
    _one_line(invoke("infer", "--model", tampered, "--input", image,
                     "--output", tmp_path / "o.zarr"), *words)
    _one_line(invoke("export", tampered, tmp_path / "again.emrun"), *words)
    (tmp_path / "r.yaml").write_text(read_package(package).recipe)
    _one_line(invoke("train", tmp_path / "r.yaml", "--run-dir", tmp_path / "ft",
                     "--init-from", tampered), *words)
    assert not (tmp_path / "o.zarr").exists() and not (tmp_path / "again.emrun").exists()
    inner = tampered.read_bytes()
    outer = _members(tmp_path / "m.zip")
    name = next(n for n in outer if n.endswith(".emrun"))
    rdf = yaml.safe_load(outer["rdf.yaml"])
    rdf["attachments"][0]["sha256"] = hashlib.sha256(inner).hexdigest()
    outer.update({name: inner, "rdf.yaml": yaml.safe_dump(rdf).encode()})
    _write_members(tmp_path / "t.zip", outer)
    _one_line(invoke("infer", "--model", tmp_path / "t.zip", "--input", image,
                     "--output", tmp_path / "z.zarr"), "t.zip", "weights.pt", "checksum")


# --------------------------------------------------------------------------- overwriting


@pytest.mark.parametrize("suffix", ["emrun", "zip", "onnx"])
def test_an_existing_output_or_a_dangling_link_is_never_replaced(tmp_path, suffix):
    """Every format: an existing file and a symlink to nothing are refused before the
    network is read (a checkpoint that cannot be read is not mentioned), left as they
    were, and no hidden work folder stays."""
    missing = tmp_path / "nothing.pt"
    existing = tmp_path / f"m.{suffix}"
    existing.write_bytes(b"the user's file")
    _one_line(invoke("export", missing, existing), "exists", "never overwrites")
    assert existing.read_bytes() == b"the user's file"
    link = tmp_path / f"l.{suffix}"
    link.symlink_to(tmp_path / "target-that-is-not-there")
    _one_line(invoke("export", missing, link), "exists", "never overwrites")
    assert link.is_symlink() and not (tmp_path / "target-that-is-not-there").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([existing.name, link.name])


def test_a_file_that_appears_during_the_export_is_kept_and_the_export_refused(
        tmp_path, monkeypatch):
    """Another export (or the user) writes the output's name while this export stages its
    file: the later one is refused in one line and the first file is kept (README: 'Of two
    `export`s to one file, the one that finishes second is refused')."""
    from emrun.export import package as exporter

    real = exporter.write_package
    output = tmp_path / "m.emrun"

    def racing(path, *args, **kwargs):
        written = real(path, *args, **kwargs)
        output.write_bytes(b"the other export's file")
        return written

    monkeypatch.setattr(exporter, "write_package", racing)
    run = _run(tmp_path, _recipe({"aff": TASKS["aff"]}))
    _one_line(invoke("export", run, output), "appeared", "never overwrites")
    assert output.read_bytes() == b"the other export's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.emrun", "run"]


# --------------------------------------------------------------------------- mismatches


@pytest.mark.parametrize("override", [
    "tasks.aff.target.offsets=[[-1,0,0],[0,-1,0],[0,0,-1],[0,-5,0],[0,0,-5]]",
    "tasks.mito.activation=none"], ids=["offsets", "activation"])
def test_an_override_of_the_package_s_tasks_is_refused_as_a_recipe_s_is(tmp_path, override):
    run = _run(tmp_path, _recipe())
    package = tmp_path / "p.emrun"
    assert invoke("export", run, package).exit_code == 0
    image = _volume(tmp_path)
    (tmp_path / "r.yaml").write_text(read_package(package).recipe)
    by_recipe = invoke("infer", "--model", package, "--recipe", tmp_path / "r.yaml", "-o",
                       override, "--input", image, "--output", tmp_path / "r.zarr")
    _one_line(by_recipe, "describes another network")  # with --recipe: refused
    alone = invoke("infer", "--model", package, "-o", override, "--input", image,
                   "--output", tmp_path / "o.zarr")
    _one_line(alone, override.split("=")[0])
    assert not (tmp_path / "o.zarr").exists()
