"""Training-side chains as a connectomics user runs them: a multi-task recipe trained,
exported and predicted (each output as its recipe says, `segment` and `view` taking the
right one); fine-tuning from a checkpoint (what is carried, what is refused); sources in
HDF5, N5 and TIFF with labels of a part of the image and a mask, resumed after a kill;
`data preview` drawing the samples training trains on; `extends:` and `-o` carried, resolved,
from the run to the package to `infer`. Tiny models and volumes, seconds each."""

from __future__ import annotations

import io
import json
import textwrap
import zipfile
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import tifffile
import torch
import yaml
import zarr
from test_workflows_probe import CLIENT, VALIDATED, emrun, runner

from emrun.cli import app
from emrun.io import open_volume, write_volume
from emrun.synth import synthesize


def recipe_file(path: Path, text: str) -> Path:
    """A (dedented) recipe file at ``path``."""
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


# ------------------------------------------------ a multi-task recipe, train to view

MULTI = """\
name: multi
data:
  sources:
    a: {type: synthetic, shape: [16, 64, 64], seed: 1}
model: {type: rsunet, widths: [4, 8]}
tasks:
  affinity:
    target: {type: affinity, offsets: [[-1, 0, 0], [0, -1, 0], [0, 0, -1], [0, -4, 0]]}
  lsd: {target: {type: lsd, sigma: [30, 12, 12]}, weight: 0.5}
  distance:
    target: {type: distance, clip: 60}
  mito:
    target: {type: binary, volume: mito}
    weight: 0.5
segment: {type: cc}
train:
  patch: [8, 32, 32]
  iterations: 1
  workers: 0
  validate_every: 0
"""


def test_a_multitask_package_predicts_each_output_as_the_recipe_says(tmp_path):
    """affinity (4 offsets) + lsd + distance + a semantic mito task: the package's manifest,
    `infer --model`'s outputs (channels, dtype, the offsets on the affinities only, channel
    names), `segment` of the whole output folder (the affinities, the recorded recipe's
    segmenter) and `view`'s layer kinds agree with the recipe."""
    from emrun.view import view

    recipe = recipe_file(tmp_path / "multi.yaml", MULTI)
    emrun("train", recipe, "--run-dir", tmp_path / "run", "--device", "cpu")
    emrun("export", tmp_path / "run", tmp_path / "multi.emrun")
    with zipfile.ZipFile(tmp_path / "multi.emrun") as zf:
        manifest = json.loads(zf.read("manifest.json"))
    want = {"affinity": (4, "sigmoid"), "lsd": (10, "none"), "distance": (1, "none"),
            "mito": (1, "sigmoid")}
    assert {name: (task["channels"], task["activation"])
            for name, task in manifest["tasks"].items()} == want
    volume = synthesize((12, 40, 40), 2)
    write_volume(tmp_path / "v.zarr", "image", volume.image, voxel_size=(30, 6, 6))
    emrun("infer", "--model", tmp_path / "multi.emrun", "--input", tmp_path / "v.zarr/image",
          "--output", tmp_path / "p.zarr", "--device", "cpu")
    for name, (channels, _) in want.items():
        out = open_volume(f"{tmp_path}/p.zarr/{name}")
        assert out.shape == (channels, 12, 40, 40) and out.dtype == np.uint8, name
        attrs = zarr.open_group(str(tmp_path / "p.zarr" / name)).attrs
        assert ("offsets" in attrs) == (name == "affinity"), name
        labels = [c["label"] for c in attrs["ome"]["omero"]["channels"]]
        assert len(labels) == channels, name
    assert zarr.open_group(str(tmp_path / "p.zarr/affinity")).attrs["offsets"] == \
        manifest["tasks"]["affinity"]["offsets"]
    said = json.loads(emrun("segment", tmp_path / "p.zarr", tmp_path / "s.zarr",
                            "--json").strip().splitlines()[-1])
    assert said["input"].endswith("p.zarr/affinity") and said["method"] == "cc"
    shown = view([f"{tmp_path}/p.zarr/{n}" for n in want] + [f"{tmp_path}/s.zarr/segmentation"],
                 client=CLIENT)
    try:
        assert [layer.kind for layer in shown.layers] == [
            "channels", "channels", "image", "image", "segmentation"]
    finally:
        shown.close()


# ------------------------------------------- test-time augmentation of the LSD channels

SIGMA = (30.0, 12.0, 12.0)
VOXEL = (30.0, 6.0, 6.0)


class _LSDOracle(torch.nn.Module):
    """A perfect LSD 'network': it reads label ids from its input (id / 1000) and returns
    their local shape descriptors, in the frame of the input it is given, as a trained
    network does."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        from emrun.data.lsd import local_shape_descriptors

        ids = [np.rint(b[0].numpy() * 1000).astype(np.int64) for b in x]
        return {"lsd": torch.stack([torch.from_numpy(local_shape_descriptors(
            i, SIGMA, VOXEL)) for i in ids])}


@pytest.mark.parametrize("tta", [2, 4, 8, 16])
def test_test_time_augmentation_keeps_lsd_channels_in_the_volume_s_frame(tta):
    """`infer.tta: 4` with an lsd task: a network that predicts the LSDs of whatever it is
    shown exactly (equivariant, as training with flip_rotate teaches) gives the same LSDs
    with and without TTA. Channels 1, 2, 6, 7 and 8 differed by up to 0.5: the flipped
    variants' y/x offsets and correlations came back mirrored and were averaged with the
    unflipped ones."""
    from emrun.infer.engine import Engine
    from emrun.recipe import Recipe

    recipe = Recipe.model_validate({
        "name": "lsdtta",
        "data": {"sources": {"a": {"type": "synthetic", "shape": [16, 64, 64], "seed": 1}}},
        "model": {"type": "rsunet", "widths": [4, 8]},
        "tasks": {"lsd": {"target": {"type": "lsd", "sigma": list(SIGMA), "downsample": 1}}},
        "train": {"patch": [8, 32, 32], "iterations": 1},
        "infer": {"precision": "fp32", "dtype": "float32"}})
    labels = synthesize((8, 32, 32), 3).labels.astype(np.int64)
    labels[labels == 0] = labels.max() + 1  # every voxel in an object: LSDs defined
    batch = torch.from_numpy(labels[None, None].astype(np.float32) / 1000)
    cpu = torch.device("cpu")
    plain = Engine(recipe, _LSDOracle(), cpu, tta=1)._forward(batch)["lsd"]
    augmented = Engine(recipe, _LSDOracle(), cpu, tta=tta)._forward(batch)["lsd"]
    worst = (plain - augmented).abs().amax(dim=(0, 2, 3, 4))
    assert worst.max() < 1e-5, worst.tolist()


# --------------------------------------------------------------------------- fine-tuning

AFF_MITO = """\
name: tuned
data:
  sources:
    a: {type: synthetic, shape: [16, 64, 64], seed: 1}
model: {type: rsunet, widths: [4, 8]}
tasks:
  affinity:
    target: {type: affinity}
  mito:
    target: {type: binary, volume: mito}
    weight: 0.5
segment: {type: cc}
train:
  patch: [8, 32, 32]
  iterations: 1
  workers: 0
  validate_every: 0
infer: {dtype: float32}
"""


def test_fine_tuning_carries_weights_to_another_patch_and_refuses_another_head_set(tmp_path):
    """train A (affinity + mito) -> `train --init-from` A's checkpoint with a smaller patch:
    starts from A's weights, and `infer` of the new run predicts with the new run's recipe
    (its patch). Dropping the mito head, or adding an lsd head, is one line, exit 2, naming
    a head tensor, and leaves no run directory."""
    recipe = recipe_file(tmp_path / "a.yaml", AFF_MITO)
    emrun("train", recipe, "--run-dir", tmp_path / "a", "--device", "cpu")
    weights = tmp_path / "a/checkpoints/last.pt"
    emrun("train", recipe, "--run-dir", tmp_path / "ft", "--init-from", weights, "--device",
          "cpu", "-o", "train.patch=[4, 16, 16]")
    start = torch.load(weights, weights_only=True)["model"]
    tuned = torch.load(tmp_path / "ft/checkpoints/last.pt", weights_only=True)
    convs = [k for k in start if k.endswith("weight") and start[k].dim() == 5]
    # one Adam step moves each weight by at most its lr (1e-3); a fresh start is ~0.1 away
    assert convs and max(float((start[k] - tuned["model"][k]).abs().max())
                         for k in convs) <= 1.01e-3
    assert yaml.safe_load(tuned["recipe"])["train"]["patch"] == [4, 16, 16]
    volume = synthesize((8, 32, 32), 2)
    write_volume(tmp_path / "v.zarr", "image", volume.image, voxel_size=(30, 6, 6))
    emrun("infer", "--checkpoint", tmp_path / "ft/checkpoints/last.pt", "--input",
          tmp_path / "v.zarr/image", "--output", tmp_path / "p.zarr", "--device", "cpu")
    assert zarr.open_group(str(tmp_path / "p.zarr/affinity")).attrs["emrun"]["patch"] == \
        [4, 16, 16]
    for name, override, head in (
            ("drop", 'tasks={affinity: {target: {type: affinity}}}', "heads.mito"),
            ("add", "tasks.lsd={target: {type: lsd, sigma: [30, 12, 12]}}", "heads.lsd")):
        refused = runner.invoke(app, [str(a) for a in (
            "train", recipe, "--run-dir", tmp_path / name, "--init-from", weights,
            "--device", "cpu", "-o", override)])
        assert refused.exit_code == 2, refused.output
        lines = refused.stderr.strip().splitlines()
        assert len(lines) == 1 and head in lines[0] and "do not fit" in lines[0], lines
        assert not (tmp_path / name).exists()


# ---------------------------------------- HDF5, N5 and TIFF sources, resumed after a kill

PLACED = """\
name: placed
seed: 4
data:
  sources:
    a: {{image: {t}/v.h5/raw, labels: {t}/v.n5/gt, mask: {t}/mask.tif,
        semantic: {{mito: {t}/v.h5/mito}}}}
model: {{type: rsunet, widths: [4, 8], norm: group, groups: 2}}
augment: [{{type: flip_rotate}}, {{type: grayscale, p: 0.5}}]
tasks:
  affinity: {{target: {{type: affinity}}}}
  mito: {{target: {{type: binary, volume: mito}}, weight: 0.5}}
train:
  patch: [4, 16, 16]
  iterations: 4
  optimizer: {{type: adam, lr: 0.01}}
  deterministic: true
  checkpoint_every: 2
  validate_every: 0
  image_every: 0
  log_every: 1
  workers: 0
"""


def _n5(folder: Path, data: np.ndarray, attrs: dict) -> None:
    """An N5 dataset (written by tensorstore, axes reversed) with extra attributes."""
    ts = pytest.importorskip("tensorstore")
    store = ts.open({"driver": "n5", "kvstore": {"driver": "file", "path": str(folder)},
                     "metadata": {"dimensions": list(data.shape[::-1]),
                                  "blockSize": [8] * data.ndim, "dataType": str(data.dtype),
                                  "compression": {"type": "raw"}},
                     "create": True}).result()
    store[...] = data.T
    path = folder / "attributes.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **attrs}))


def _placed_sources(tmp: Path) -> np.ndarray:
    """An HDF5 image, N5 labels of a part of it and HDF5 mito of other sections (both placed
    by offsets in nm), a TIFF mask of the image's shape; the labels as written."""
    volume = synthesize((16, 48, 48), 3)
    with h5py.File(tmp / "v.h5", "w") as f:
        raw = f.create_dataset("raw", data=volume.image)
        raw.attrs["resolution"], raw.attrs["offset"] = [30, 6, 6], [0, 0, 0]
        mito = f.create_dataset("mito", data=volume.mito[2:14])
        mito.attrs["resolution"], mito.attrs["offset"] = [30, 6, 6], [60, 0, 0]
    part = volume.labels[2:14, 4:44, 4:44].astype(np.uint64)
    _n5(tmp / "v.n5/gt", part, {"resolution": [6, 6, 30], "offset": [24, 24, 60]})
    mask = np.zeros((16, 48, 48), np.uint8)
    mask[:, :, 10:] = 1
    tifffile.imwrite(tmp / "mask.tif", mask)
    return part


def _quiet_trainer(recipe: Path, run: Path, resume: bool = False) -> Any:
    from rich.console import Console

    from emrun.recipe import load_recipe
    from emrun.train.trainer import Trainer

    return Trainer(load_recipe(recipe, []), run, resume=resume, device="cpu",
                   console=Console(file=io.StringIO(), force_terminal=False, width=100))


def test_placed_sources_in_three_formats_resume_to_the_uninterrupted_weights(tmp_path):
    """Labels of a part of the image (N5, placed by its offset), mito of other sections
    (HDF5), a TIFF mask, on a deterministic CPU run: a run killed in iteration
    3 (checkpoint at 2) and resumed ends with the uninterrupted run's weights, bit for bit,
    and logs the same losses."""
    part = _placed_sources(tmp_path)
    recipe = recipe_file(tmp_path / "r.yaml", PLACED.format(t=tmp_path))
    _quiet_trainer(recipe, tmp_path / "straight").fit()
    killed = _quiet_trainer(recipe, tmp_path / "killed")
    real, done = killed.step, []

    def step(batches: Any) -> Any:
        result = real(batches)
        done.append(1)
        if len(done) == 3:
            raise RuntimeError("killed by the test")
        return result

    killed.step = step  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="killed by the test"):
        killed.fit()
    _quiet_trainer(recipe, tmp_path / "killed", resume=True).fit()
    a = torch.load(tmp_path / "straight/checkpoints/last.pt", weights_only=True)
    b = torch.load(tmp_path / "killed/checkpoints/last.pt", weights_only=True)
    assert a["iteration"] == b["iteration"] == 4
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])

    def losses(run: Path) -> list[float]:
        lines = (run / "events.jsonl").read_text().splitlines()
        return [json.loads(line)["loss/total"] for line in lines]

    assert losses(tmp_path / "straight") == losses(tmp_path / "killed")
    assert part.any()


# ------------------------------------------------- data preview draws training's samples

PREVIEWED = """\
name: previewed
seed: 7
data:
  sources:
    a: {type: synthetic, shape: [16, 64, 64], seed: 1}
    b: {type: synthetic, shape: [16, 64, 64], seed: 2}
augment:
  - {type: warp, p: 0.7, rot_max: 30}
  - {type: grayscale, p: 0.7}
  - {type: missing_section, p: 0.5, max_sections: 1}
  - {type: flip_rotate}
model: {type: rsunet, widths: [4, 8]}
tasks:
  affinity:
    target: {type: affinity}
  mito:
    target: {type: binary, volume: mito}
train:
  patch: [4, 24, 24]
  iterations: 3
  workers: 0
  validate_every: 0
"""


def test_data_preview_shows_the_samples_training_trains_on(tmp_path, monkeypatch):
    """`data preview --n 3` and `train` on the same recipe (two sources, augmentations that
    draw from the stream): the previewed samples are training's first three batches, image
    (as it travels, float16) and every task's target and mask."""
    import emrun.preview as preview_module
    import emrun.train.trainer as trainer_module
    from emrun.data.samples import SampleMaker

    recipe = recipe_file(tmp_path / "p.yaml", PREVIEWED)
    previewed: list[dict[str, Any]] = []

    class Recording(SampleMaker):
        def sample(self, rng: np.random.Generator) -> dict[str, Any]:
            made = super().sample(rng)
            previewed.append(made)
            return made

    monkeypatch.setattr(preview_module, "SampleMaker", Recording)
    emrun("data", "preview", recipe, "--n", "3", "--out", tmp_path / "preview.png")
    trained: list[dict[str, Any]] = []
    real_unpack = trainer_module.unpack

    def unpack(batch: dict[str, Any], device: Any) -> dict[str, Any]:
        out = real_unpack(batch, device)
        trained.append(out)
        return out

    monkeypatch.setattr(trainer_module, "unpack", unpack)
    emrun("train", recipe, "--run-dir", tmp_path / "run", "--device", "cpu")
    assert len(previewed) == len(trained) == 3
    for shown, used in zip(previewed, trained, strict=True):
        image = torch.from_numpy(shown["image"]).to(torch.float16).to(torch.float32)
        assert torch.equal(used["image"][0], image)
        for part in ("target", "mask"):
            for task in ("affinity", "mito"):
                assert torch.equal(used[part][task][0],
                                   torch.from_numpy(shown[part][task]).to(torch.float32))


# ------------------------------------- extends: and -o, resolved from run to package to infer

BASE = """\
name: base
data:
  sources:
    a: {type: synthetic, shape: [16, 64, 64], seed: 1}
model: {type: rsunet, widths: [4, 8]}
tasks:
  affinity:
    target: {type: affinity}
train:
  patch: [8, 32, 32]
  iterations: 2
  workers: 0
  validate_every: 0
infer: {dtype: float16, batch_size: 2}
"""

CHILD = """\
extends: base/base.yaml
name: child
tasks:
  mito: {target: {type: binary, volume: mito}, weight: 0.5}
infer: {overlap: [0.5, 0.5, 0.5]}
"""


def test_an_extended_and_overridden_recipe_travels_resolved_to_package_and_infer(tmp_path):
    """A child recipe extending a base in another folder, trained with `-o`: the run's
    recipe.yaml, its checkpoint and the exported package hold one resolved recipe (no
    `extends`, the child's task and overlap, the base's batch size, the -o'd dtype and
    iterations), and `infer --model` without --recipe predicts with it."""
    (tmp_path / "base").mkdir()
    recipe_file(tmp_path / "base/base.yaml", BASE)
    child = recipe_file(tmp_path / "child.yaml", CHILD)
    emrun("train", child, "--run-dir", tmp_path / "run", "--device", "cpu", "-o",
          "infer.dtype=float32", "-o", "train.iterations=1")
    saved = (tmp_path / "run/recipe.yaml").read_text()
    resolved = yaml.safe_load(saved)
    assert "extends" not in resolved and resolved["name"] == "child"
    assert set(resolved["tasks"]) == {"affinity", "mito"}
    assert resolved["train"]["iterations"] == 1 and resolved["infer"]["batch_size"] == 2
    assert resolved["infer"]["dtype"] == "float32"
    assert resolved["infer"]["overlap"] == [0.5, 0.5, 0.5]
    checkpoint = torch.load(tmp_path / "run/checkpoints/last.pt", weights_only=True)
    assert yaml.safe_load(checkpoint["recipe"]) == resolved
    emrun("export", tmp_path / "run", tmp_path / "child.emrun")
    with zipfile.ZipFile(tmp_path / "child.emrun") as zf:
        assert yaml.safe_load(zf.read("recipe.yaml")) == resolved
    volume = synthesize((8, 32, 32), 2)
    write_volume(tmp_path / "v.zarr", "image", volume.image, voxel_size=(30, 6, 6))
    emrun("infer", "--model", tmp_path / "child.emrun", "--input", tmp_path / "v.zarr/image",
          "--output", tmp_path / "p.zarr", "--device", "cpu")
    for task in ("affinity", "mito"):
        assert open_volume(f"{tmp_path}/p.zarr/{task}").dtype == np.float32, task
    layout = zarr.open_group(str(tmp_path / "p.zarr/affinity")).attrs["emrun"]
    assert layout["stride"] == [4, 16, 16]  # the child's overlap of the base's patch


# ----------------------------------------- validation and `infer` of a recipe with TTA

# the validated recipe of the first workflow probe, whole-volume validation, with 2 variants
TTA_VALIDATED = VALIDATED.replace("name: validated", "name: tta_validated") + \
    "infer: {{tta: 2}}\n"


def test_the_validation_score_of_a_tta_recipe_is_what_infer_tta_1_segment_and_evaluate_give(
        tmp_path):
    """A recipe with `infer.tta: 2` (the SNEMI3D benchmark trains with `-o infer.tta=16`):
    validation predicts without test-time augmentation (16 variants would make every
    validation 16 times as long), as the README says, so `infer --tta 1` reproduces the
    logged adapted Rand error (the recipe's 2 variants did not)."""
    volume = synthesize((12, 48, 48), 5)
    write_volume(tmp_path / "v.zarr", "image", volume.image, voxel_size=(30, 6, 6))
    write_volume(tmp_path / "v.zarr", "labels", volume.labels, voxel_size=(30, 6, 6))
    recipe = recipe_file(tmp_path / "r.yaml", TTA_VALIDATED.format(tmp=tmp_path, roi=""))
    emrun("train", recipe, "--run-dir", tmp_path / "run", "--device", "cpu")
    records = [json.loads(line) for line in
               (tmp_path / "run/events.jsonl").read_text().splitlines()]
    logged = [r["validation"] for r in records if "validation" in r][-1]
    emrun("infer", "--checkpoint", tmp_path / "run/checkpoints/last.pt", "--input",
          tmp_path / "v.zarr/image", "--output", tmp_path / "p.zarr", "--device", "cpu",
          "--tta", "1")
    emrun("segment", tmp_path / "p.zarr/affinity", tmp_path / "s.zarr", "--threshold",
          logged["segment/threshold"])
    got = json.loads(emrun("evaluate", tmp_path / "s.zarr/segmentation",
                           tmp_path / "v.zarr/labels", "--connected-truth",
                           "--json").strip().splitlines()[-1])
    assert got["arand"] == pytest.approx(logged["arand"], rel=1e-9, abs=1e-12)


def test_tta_that_transposes_refuses_lsds_of_another_sigma_in_y_than_in_x():
    """Transposing y and x maps a descriptor of sigma (sy, sx) onto one of (sx, sy), which
    is not what the network predicts: refused in one line, tta 4 accepted."""
    from emrun.errors import UserError
    from emrun.infer.engine import tta_variants
    from emrun.recipe import Recipe

    recipe = Recipe.model_validate({
        "name": "lsdtta",
        "data": {"sources": {"a": {"type": "synthetic", "shape": [16, 64, 64], "seed": 1}}},
        "model": {"type": "rsunet", "widths": [4, 8]},
        "tasks": {"lsd": {"target": {"type": "lsd", "sigma": [30.0, 12.0, 18.0]}}},
        "train": {"patch": [8, 32, 32], "iterations": 1}})
    assert len(tta_variants(recipe, 4)) == 4
    with pytest.raises(UserError, match=r"tasks\.lsd: tta 8 transposes y and x.*12, 18 nm"):
        tta_variants(recipe, 8)


def test_an_export_from_another_folder_reads_the_training_data_where_training_did(
        tmp_path, monkeypatch):
    """Relative data paths are relative to the working directory: an export run from
    another folder could not read them, and the package said 'assumed uint8' for a uint16
    image and no voxel size. The run's provenance records where training ran."""
    work = tmp_path / "work"
    work.mkdir()
    volume = synthesize((12, 48, 48), 2)
    write_volume(work / "v.zarr", "image", volume.image.astype(np.uint16) * 200,
                 voxel_size=(40, 8, 8), label=False)
    write_volume(work / "v.zarr", "labels", volume.labels, voxel_size=(40, 8, 8))
    recipe = recipe_file(work / "r.yaml", """\
        name: elsewhere
        data:
          sources:
            a: {image: v.zarr/image, labels: v.zarr/labels}
        model: {type: rsunet, widths: [4, 8]}
        tasks:
          affinity: {target: {type: affinity}}
        train: {patch: [4, 16, 16], iterations: 1, workers: 0, validate_every: 0,
                image_every: 0}
        """)
    monkeypatch.chdir(work)
    emrun("train", recipe, "--run-dir", work / "run", "--device", "cpu")
    monkeypatch.chdir(tmp_path)
    emrun("export", work / "run", tmp_path / "m.emrun")
    with zipfile.ZipFile(tmp_path / "m.emrun") as package:
        manifest = json.loads(package.read("manifest.json"))
    assert manifest["input"]["voxel_size"] == [40.0, 8.0, 8.0]
    assert manifest["input"]["intensity"]["from"] == "dtype uint16"
