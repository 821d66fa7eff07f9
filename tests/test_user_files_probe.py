"""Nothing a user owns is overwritten or half-written, probed command by command: outputs
pointed at a user's file, a folder of the user's unrelated files, another tool's zarr store,
the input itself, a symbolic link; a run killed outright mid-write."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from emrun.cli import app
from emrun.io.write import write_volume

runner = CliRunner()


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def one_line_exit_2(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    return lines[0]


def tree_digest(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (links not followed), by relative path: its bytes' sha256."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


def user_folder(folder: Path) -> dict[str, str]:
    """A folder of a user's unrelated files; returns their digest."""
    (folder / "notes").mkdir(parents=True)
    (folder / "thesis.tex").write_text("\\section{EM}\n")
    (folder / "notes" / "todo.txt").write_text("segment everything\n")
    return tree_digest(folder)


@pytest.fixture
def image(tmp_path: Path) -> str:
    data = (np.random.default_rng(0).random((4, 32, 32)) * 255).astype(np.uint8)
    write_volume(tmp_path / "in.zarr", "image", data, voxel_size=(30, 6, 6), levels=1)
    return f"{tmp_path / 'in.zarr'}/image"


def another_tools_ome_image(store: Path) -> dict[str, str]:
    """An OME-Zarr 0.5 image at a store's root, as ome-zarr-py and other tools write it
    (levels `s0`, `s1` beside the root's metadata), with an attribute of its own."""
    group = zarr.open_group(str(store), mode="w", zarr_format=3)
    data = np.arange(4 * 32 * 32, dtype=np.uint8).reshape(4, 32, 32)
    axes = [{"name": n, "type": "space", "unit": "nanometer"} for n in "zyx"]
    datasets = []
    for k in range(2):
        level = data[:, :: 2**k, :: 2**k]
        group.create_array(f"s{k}", shape=level.shape, dtype=level.dtype,
                           chunks=level.shape)[...] = level
        datasets.append({"path": f"s{k}", "coordinateTransformations": [
            {"type": "scale", "scale": [30.0, 6.0 * 2**k, 6.0 * 2**k]}]})
    group.attrs["ome"] = {"version": "0.5", "multiscales": [{"axes": axes,
                                                             "datasets": datasets}]}
    group.attrs["made_by"] = "another tool"
    return tree_digest(store)


# ------------------------------------------------------------------- data convert / synth


def test_convert_into_a_folder_of_the_users_files_is_refused_and_it_is_untouched(
        tmp_path, image):
    out = tmp_path / "mine.zarr"
    before = user_folder(out)
    line = one_line_exit_2(invoke("data", "convert", image, out, "--name", "copy"))
    assert "not a zarr store" in line
    assert tree_digest(out) == before and sorted(p.name for p in out.iterdir()) == [
        "notes", "thesis.tex"]


def test_convert_onto_a_users_file_named_like_a_store_is_refused(tmp_path, image):
    out = tmp_path / "results.zarr"
    out.write_text("not a store: my results\n")
    line = one_line_exit_2(invoke("data", "convert", image, out))
    assert "not a folder" in line
    assert out.read_text() == "not a store: my results\n"


@pytest.mark.parametrize("kind", ["folder", "file"])
def test_convert_through_a_link_to_the_users_things_is_refused(tmp_path, image, kind):
    target = tmp_path / "elsewhere"
    if kind == "folder":
        before = user_folder(target)
    else:
        target.write_text("mine\n")
        before = {"": hashlib.sha256(b"mine\n").hexdigest()}
    link = tmp_path / "out.zarr"
    link.symlink_to(target)
    one_line_exit_2(invoke("data", "convert", image, link))
    after = tree_digest(target) if kind == "folder" else {
        "": hashlib.sha256(target.read_bytes()).hexdigest()}
    assert after == before and link.is_symlink()


def test_convert_into_another_tools_plain_zarr_group_adds_and_keeps_the_rest(tmp_path, image):
    """A zarr v3 group with another tool's arrays and attributes (no OME image at its root):
    the volume is added; their arrays are byte for byte as they were, their attribute kept."""
    store = tmp_path / "theirs.zarr"
    group = zarr.open_group(str(store), mode="w", zarr_format=3)
    group.create_array("raw", shape=(4, 8, 8), dtype="uint16", chunks=(2, 8, 8))[...] = 7
    group.create_group("meshes").create_array("m", shape=(5,), dtype="float32")[...] = 1.5
    group.attrs["made_by"] = "another tool"
    theirs = {k: v for k, v in tree_digest(store).items() if k != "zarr.json"}
    done = invoke("data", "convert", image, store, "--name", "em", "--levels", "1")
    assert done.exit_code == 0, done.output
    after = tree_digest(store)
    assert {k: after[k] for k in theirs} == theirs
    assert json.loads((store / "zarr.json").read_text())["attributes"]["made_by"] == \
        "another tool"


@pytest.mark.parametrize("command", ["synth", "convert"])
def test_another_tools_ome_zarr_image_keeps_its_root_metadata(tmp_path, image, command):
    store = tmp_path / "theirs.zarr"
    before = another_tools_ome_image(store)
    if command == "synth":
        result = invoke("data", "synth", store, "--shape", "4", "32", "32", "--levels", "1")
    else:
        result = invoke("data", "convert", image, store, "--name", "em", "--levels", "1")
    after = tree_digest(store)
    assert {k: after[k] for k in before if k != "zarr.json"} == {
        k: v for k, v in before.items() if k != "zarr.json"}  # the arrays themselves: kept
    if result.exit_code == 0:  # added to it: its root image must stay what the root names
        ome = json.loads((store / "zarr.json").read_text())["attributes"]["ome"]
        assert [d["path"] for d in ome["multiscales"][0]["datasets"]] == ["s0", "s1"]
    else:  # or refused, untouched
        one_line_exit_2(result)
        assert after == before


def test_convert_over_its_own_input_with_overwrite_replaces_it_exactly(tmp_path, image):
    """OUT == IN, the same name, --overwrite: the copy is complete before the old one goes."""
    store = Path(image).parent
    data = zarr.open_array(f"{image}/0")[...]
    done = invoke("data", "convert", image, store, "--name", "image", "--overwrite",
                  "--levels", "1")
    assert done.exit_code == 0, done.output
    assert np.array_equal(zarr.open_array(f"{image}/0")[...], data)
    assert sorted(p.name for p in store.iterdir() if not p.name.startswith(".")) == [
        "image", "zarr.json"]


def test_convert_into_a_store_inside_its_input_volume_is_refused(tmp_path, image):
    before = tree_digest(Path(image).parent)
    line = one_line_exit_2(invoke("data", "convert", image, f"{image}/inner.zarr"))
    assert "inside the volume" in line
    assert tree_digest(Path(image).parent) == before


def test_synth_overwrite_replaces_only_its_own_volumes(tmp_path):
    store = tmp_path / "s.zarr"
    done = invoke("data", "synth", store, "--shape", "4", "32", "32", "--levels", "1")
    assert done.exit_code == 0, done.output
    zarr.open_group(str(store), mode="r+").create_array(
        "mine", shape=(3,), dtype="int8")[...] = 5  # the user's own array beside them
    (store / "README.txt").write_text("my notes\n")
    mine = {k: v for k, v in tree_digest(store).items()
            if k.startswith("mine") or k == "README.txt"}
    again = invoke("data", "synth", store, "--shape", "4", "32", "32", "--levels", "1",
                   "--seed", "1", "--overwrite")
    assert again.exit_code == 0, again.output
    after = tree_digest(store)
    assert {k: after[k] for k in mine} == mine


def _synth_killed_after_its_first_volume(out: Path) -> list[str]:
    """`data synth` killed outright (SIGKILL) as soon as its first volume has its final
    name, while the others are being written; returns the command."""
    command = [sys.executable, "-m", "emrun", "data", "synth", str(out),
               "--shape", "16", "512", "512", "--levels", "1"]
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while child.poll() is None and not (out / "image" / "zarr.json").exists():
            time.sleep(0.002)
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait()
    if child.returncode != -signal.SIGKILL or (out / "labels" / "labels" / "zarr.json").exists():
        pytest.skip("synth finished before it could be killed between its volumes")
    return command


def test_synth_killed_between_its_volumes_leaves_no_labels_that_open(tmp_path):
    """What holds: the volume being written when the kill came is not under its name."""
    out = tmp_path / "k.zarr"
    _synth_killed_after_its_first_volume(out)
    assert not (out / "labels" / "labels").exists()
    assert not (out / "labels" / "mito").exists() and not (out / "labels" / "synapse").exists()


@pytest.mark.slow
def test_synth_killed_between_its_volumes_is_finished_by_the_same_command(tmp_path):
    """It left a complete-looking image without labels, and the same command run again was
    refused ('image: already exists'). Now the killed write's record undoes its volumes."""
    out = tmp_path / "k.zarr"
    command = _synth_killed_after_its_first_volume(out)
    again = subprocess.run(command, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    for name in ("labels", "mito", "synapse"):
        assert (out / "labels" / name / "zarr.json").is_file()


# --------------------------------------------------------------------------------- export


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """A run directory as `emrun train` leaves it (tiny network, recipe in the checkpoint)."""
    import torch

    from emrun.models import build_model
    from emrun.recipe import Recipe
    from emrun.train.run_dir import recipe_text

    recipe = Recipe.model_validate(RECIPE)
    model = build_model(recipe)
    folder = tmp_path / "run"
    (folder / "checkpoints").mkdir(parents=True)
    torch.save({"model": model.state_dict(), "iteration": 1, "recipe": recipe_text(recipe)},
               folder / "checkpoints" / "last.pt")
    return folder


RECIPE = {
    "name": "probe",
    "data": {"sources": {"a": {"type": "synthetic", "shape": [16, 64, 64], "seed": 3}}},
    "model": {"type": "rsunet", "widths": [4, 8]},
    "tasks": {"aff": {"target": {"type": "affinity",
                                 "offsets": [[-1, 0, 0], [0, -1, 0], [0, 0, -1]]}}},
    "train": {"patch": [4, 16, 16], "iterations": 1, "workers": 0},
}


@pytest.mark.parametrize("kind", ["file", "link", "dangling link"])
def test_export_never_writes_over_or_through_the_users_path(tmp_path, run, kind):
    target = tmp_path / "mine.emrun"
    target.write_bytes(b"my own package, keep\n")
    out = tmp_path / "m.emrun"
    if kind == "file":
        out = target
    else:
        out.symlink_to(target if kind == "link" else tmp_path / "nowhere.emrun")
    line = one_line_exit_2(invoke("export", run, out))
    assert "never overwrites" in line
    assert target.read_bytes() == b"my own package, keep\n"
    assert not (tmp_path / "nowhere.emrun").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


# ---------------------------------------------------------------------------------- train


@pytest.mark.parametrize("resume", [False, True])
def test_a_run_dir_holding_the_users_recipe_keeps_it(tmp_path, resume):
    folder = tmp_path / "experiment"
    folder.mkdir()
    recipe = folder / "recipe.yaml"
    text = "# my experiment: notes I keep with it\n" + json.dumps(RECIPE) + "\n"
    recipe.write_text(text)
    result = invoke("train", recipe, "--run-dir", folder, "--device", "cpu",
                    *(["--resume"] if resume else []))
    assert recipe.read_text() == text, result.output  # kept, or the run refused
    if result.exit_code != 0:
        one_line_exit_2(result)


def test_a_run_dir_holding_the_users_tensorboard_logs_keeps_them(tmp_path):
    from emrun.errors import UserError
    from emrun.train import run_dir

    folder = tmp_path / "logs"
    (folder / "tensorboard" / "other_run").mkdir(parents=True)
    log = folder / "tensorboard" / "other_run" / "events.out.tfevents.1.host"
    log.write_bytes(b"\x00my other run's curves")
    try:
        run_dir.prepare(folder, resume=False)
    except UserError:
        pass  # refused is fine
    finally:
        from emrun import locks
        locks.release(folder)
    assert log.read_bytes() == b"\x00my other run's curves"


def test_a_run_dir_with_the_users_unrelated_files_is_refused_untouched(tmp_path):
    folder = tmp_path / "project"
    before = user_folder(folder)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps(RECIPE))
    line = one_line_exit_2(invoke("train", recipe, "--run-dir", folder, "--device", "cpu"))
    assert "nothing was overwritten" in line
    assert tree_digest(folder) == before
    assert sorted(p.name for p in folder.iterdir()) == ["notes", "thesis.tex"]


# ---------------------------------------------------------------------------------- infer


def test_infer_into_another_tools_store_or_the_users_folder_is_refused_untouched(
        tmp_path, run, image):
    checkpoint = run / "checkpoints" / "last.pt"
    for out, make in ((tmp_path / "theirs.zarr", another_tools_ome_image),
                      (tmp_path / "mine.zarr", user_folder)):
        before = make(out)
        line = one_line_exit_2(invoke("infer", "--checkpoint", checkpoint, "--input", image,
                                      "--output", out, "--device", "cpu"))
        assert "nothing was overwritten" in line or "not a zarr store" in line, line
        assert tree_digest(out) == before


def test_infer_into_its_own_input_store_is_refused(tmp_path, run, image):
    store = Path(image).parent
    before = tree_digest(store)
    checkpoint = run / "checkpoints" / "last.pt"
    for out in (store, store / "image" / "pred.zarr"):
        one_line_exit_2(invoke("infer", "--checkpoint", checkpoint, "--input", image,
                               "--output", out, "--device", "cpu"))
    assert tree_digest(store) == before


# -------------------------------------------------------------------------------- segment


def test_segment_into_its_affinities_store_adds_and_keeps_them(tmp_path):
    """Documented: `emrun segment pred.zarr/affinity pred.zarr` adds the segmentation; the
    affinities are byte for byte as they were, and a second run is refused, not replaced."""
    store = tmp_path / "pred.zarr"
    affs = np.random.default_rng(1).random((3, 4, 16, 16)).astype(np.float32)
    write_volume(store, "affinity", affs, channel_axis=True, levels=1,
                 attrs={"offsets": [[-1, 0, 0], [0, -1, 0], [0, 0, -1]]})
    before = tree_digest(store / "affinity")
    done = invoke("segment", f"{store}/affinity", store, "--method", "cc", "--levels", "1")
    assert done.exit_code == 0, done.output
    assert tree_digest(store / "affinity") == before
    segmentation = tree_digest(store / "labels" / "segmentation")
    line = one_line_exit_2(invoke("segment", f"{store}/affinity", store, "--method", "cc",
                                  "--levels", "1", "--threshold", "0.2"))
    assert "already exists" in line
    assert tree_digest(store / "labels" / "segmentation") == segmentation


# --------------------------------------------------------------------------- bench snemi3d


def test_bench_snemi3d_out_keeps_a_users_pred_zarr(tmp_path, monkeypatch):
    """The benchmark's --out pointed at a user's project folder that holds a pred.zarr of
    their own; training and conversion stubbed (they are not what is probed)."""
    from emrun.bench import snemi3d
    from emrun.bench.snemi3d import FILES

    data = tmp_path / "snemi3d"
    data.mkdir()
    for name in FILES.values():
        (data / name).write_bytes(b"")
    out = tmp_path / "project"
    (out / "pred.zarr").mkdir(parents=True)
    (out / "pred.zarr" / "zarr.json").write_text(json.dumps(
        {"zarr_format": 3, "node_type": "group", "attributes": {"mine": True}}))
    (out / "pred.zarr" / "my_notes.txt").write_text("months of predictions\n")
    before = tree_digest(out / "pred.zarr")

    class Fitted:
        interrupted = None

    class Trainer:
        iteration = 1

        def __init__(self, *args, **kwargs):
            pass

        def fit(self):
            return Fitted()

    class Reached(Exception):
        pass

    def run_inference(*args, **kwargs):
        raise Reached

    monkeypatch.setattr(snemi3d, "converted",
                        lambda folder, out, stage: (out / "snemi3d.zarr", (70, 1024, 1024)))
    monkeypatch.setattr(snemi3d, "Trainer", Trainer)
    monkeypatch.setattr(snemi3d, "file_digest", lambda path: "0" * 64)
    monkeypatch.setattr(snemi3d, "run_inference", run_inference)
    from emrun.errors import UserError

    with contextlib.suppress(Reached, UserError):  # the stub's stop, or a refusal
        snemi3d.run_snemi3d(data, out, iterations=1)
    assert (out / "pred.zarr").is_dir() and tree_digest(out / "pred.zarr") == before


def _bench_out_reaching_training(tmp_path: Path, monkeypatch) -> tuple[Path, Path, type]:
    """Data files and a stubbed conversion; the returned exception is raised by the stubbed
    Trainer, i.e. when the benchmark starts training."""
    from emrun.bench import snemi3d
    from emrun.bench.snemi3d import FILES

    data = tmp_path / "snemi3d"
    data.mkdir()
    for name in FILES.values():
        (data / name).write_bytes(b"")

    class Training(Exception):
        pass

    def trainer(*args, **kwargs):
        raise Training

    monkeypatch.setattr(snemi3d, "converted",
                        lambda folder, out, stage: (out / "snemi3d.zarr", (70, 1024, 1024)))
    monkeypatch.setattr(snemi3d, "Trainer", trainer)
    return data, tmp_path / "project", Training


def test_bench_snemi3d_out_keeps_a_users_seg_zarr(tmp_path, monkeypatch):
    """A segmentation of the user's at --out/seg.zarr was replaced without a word at the
    end (overwrite=True); now refused before training, untouched."""
    from emrun.bench import snemi3d
    from emrun.errors import UserError

    data, out, _ = _bench_out_reaching_training(tmp_path, monkeypatch)
    labels = np.arange(2 * 4 * 4, dtype=np.uint32).reshape(2, 4, 4)
    write_volume(out / "seg.zarr", "segmentation", labels, label=True, levels=1)
    before = tree_digest(out / "seg.zarr")
    with pytest.raises(UserError, match=r"seg.zarr/labels/segmentation is no segmentation "
                                        r"of this benchmark"):
        snemi3d.run_snemi3d(data, out, iterations=1)
    assert tree_digest(out / "seg.zarr") == before


@pytest.mark.parametrize("mark", [{"written_by": "bench snemi3d"}, None])
def test_bench_snemi3d_goes_on_with_its_own_seg_zarr_or_none(tmp_path, monkeypatch, mark):
    """Its own segmentation (a run stopped before results.json) is its to replace, and a
    seg.zarr holding other volumes only is no obstacle."""
    from emrun.bench import snemi3d

    data, out, training = _bench_out_reaching_training(tmp_path, monkeypatch)
    labels = np.arange(2 * 4 * 4, dtype=np.uint32).reshape(2, 4, 4)
    name = "segmentation" if mark is not None else "other"
    write_volume(out / "seg.zarr", name, labels, label=True, levels=1,
                 attrs={"emrun": mark} if mark is not None else None)
    with pytest.raises(training):
        snemi3d.run_snemi3d(data, out, iterations=1)


# ------------------------------------------------------------------------------- evaluate


def test_evaluate_work_dir_of_the_users_files_is_left_as_it_was(tmp_path):
    """--work-dir pointed at a folder of the user's files: scored in a folder of its own
    inside, which goes; the user's files stay, byte for byte, and nothing else is left."""
    labels = np.repeat(np.arange(4, dtype=np.uint32), 8).reshape(1, 4, 8).repeat(4, axis=0)
    write_volume(tmp_path / "v.zarr", "truth", labels, label=True, levels=1)
    write_volume(tmp_path / "v.zarr", "seg", labels.astype(np.uint64), label=True, levels=1)
    work = tmp_path / "work"
    before = user_folder(work)
    done = invoke("evaluate", f"{tmp_path / 'v.zarr'}/seg", f"{tmp_path / 'v.zarr'}/truth",
                  "--work-dir", work, "--workers", "1", "--block", "2", "4", "8", "--json")
    assert done.exit_code == 0, done.output
    assert tree_digest(work) == before
    assert sorted(p.name for p in work.iterdir()) == ["notes", "thesis.tex"]
