"""Odd paths and file-system situations, command by command, against the plain-path run as
the reference: every voxel a command writes under an odd name (spaces, unicode, '#', '%',
'?', '*', a leading '-', relative paths from another folder, '..' segments, symbolic links)
must equal what it writes under a plain name; what it cannot do is one line, exit 2, naming
the path, and leaves nothing behind."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from emrun.cli import app
from emrun.io import open_volume

runner = CliRunner()

RECIPE = """\
name: tiny
data:
  sources:
    a: {{image: "{store}/image", labels: "{store}/labels"}}
model: {{type: rsunet, widths: [4, 8]}}
tasks:
  affinity:
    target: {{type: affinity}}
train:
  patch: [4, 16, 16]
  iterations: 2
  workers: 0
  validate_every: 0
  checkpoint_every: 2
"""


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def ok(result) -> str:
    assert result.exit_code == 0, result.output
    return result.stdout


def one_line_exit_2(result) -> str:
    """The one `error:` line of a user's mistake (no traceback; infer's note of which
    checkpoint it took may come before it)."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.strip().splitlines()
             if not line.startswith("--checkpoint ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def read(path: object) -> np.ndarray:
    return open_volume(str(path)).read()


def pipeline(folder: Path, *, train: bool = True) -> dict[str, object]:
    """synth -> validate -> train -> infer -> segment -> evaluate -> export -> infer --model ->
    preview, all inside ``folder``; returns what each wrote."""
    folder.mkdir(parents=True, exist_ok=True)
    ok(invoke("data", "synth", folder / "syn.zarr", "--shape", 8, 32, 32, "--seed", 1,
              "--levels", 1))
    recipe = folder / "r.yaml"
    recipe.write_text(RECIPE.format(store=folder / "syn.zarr"), encoding="utf-8")
    ok(invoke("validate", recipe))
    if train:
        ok(invoke("train", recipe, "--run-dir", folder / "run", "--device", "cpu"))
    ok(invoke("infer", "--checkpoint", folder / "run", "--input", folder / "syn.zarr/image",
              "--output", folder / "pred.zarr", "--device", "cpu", "--levels", 1))
    ok(invoke("segment", folder / "pred.zarr/affinity", folder / "seg.zarr", "--levels", 1))
    scores = json.loads(ok(invoke("evaluate", folder / "seg.zarr/segmentation",
                                  folder / "syn.zarr/labels", "--json")))
    ok(invoke("export", folder / "run", folder / "m.emrun"))
    ok(invoke("infer", "--model", folder / "m.emrun", "--input", folder / "syn.zarr/image",
              "--output", folder / "pred_model.zarr", "--device", "cpu", "--levels", 1))
    ok(invoke("data", "preview", recipe, "--n", 1, "--out", folder / "p.png"))
    assert (folder / "p.png").stat().st_size > 0
    return {"image": read(folder / "syn.zarr/image"), "labels": read(folder / "syn.zarr/labels"),
            "affinity": read(folder / "pred.zarr/affinity"),
            "model_affinity": read(folder / "pred_model.zarr/affinity"),
            "segmentation": read(folder / "seg.zarr/segmentation"),
            "scores": {k: v for k, v in scores.items() if k not in ("seg", "truth")}}


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> tuple[Path, dict[str, object]]:
    folder = tmp_path_factory.mktemp("plain") / "plain"
    return folder, pipeline(folder)


def same(got: dict[str, object], want: dict[str, object]) -> None:
    for key, value in want.items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(got[key], value, err_msg=key)
        else:
            assert got[key] == value, key


# ------------------------------------------------------------------ odd characters in names


@pytest.mark.parametrize("name", ["a b #1 100% é中文 ? * [x] -x"])
def test_every_command_works_in_a_folder_with_odd_characters(tmp_path, plain, name):
    """Spaces, unicode, '#', '%', '?', '*', brackets and a leading '-': each command's output
    equals the plain-path run's, voxel for voxel, and the scores are the same."""
    same(pipeline(tmp_path / name), plain[1])


def test_a_leading_dash_path_goes_after_a_double_dash(tmp_path, plain, monkeypatch):
    """Positional paths that begin with '-' are given after `--`, as with any command; option
    values beginning with '-' are taken as values."""
    folder, want = plain
    monkeypatch.chdir(tmp_path)
    shutil.copytree(folder / "syn.zarr", "-syn.zarr")
    shutil.copytree(folder / "run", "-run")
    ok(invoke("data", "convert", "--levels", 1, "--", "-syn.zarr/image", "-c.zarr"))
    np.testing.assert_array_equal(read("-c.zarr/image"), want["image"])
    ok(invoke("infer", "--checkpoint", "-run", "--input", "-c.zarr/image", "--output",
              "-p.zarr", "--device", "cpu", "--levels", 1))
    np.testing.assert_array_equal(read("-p.zarr/affinity"), want["affinity"])
    ok(invoke("segment", "--levels", 1, "--", "-p.zarr/affinity", "-s.zarr"))
    np.testing.assert_array_equal(read("-s.zarr/segmentation"), want["segmentation"])
    scores = json.loads(ok(invoke("evaluate", "--json", "--", "-s.zarr/segmentation",
                                  "-syn.zarr/labels")))
    assert scores["arand"] == want["scores"]["arand"]
    ok(invoke("export", "--", "-run", "-m.emrun"))
    assert Path("-m.emrun").is_file()


# ------------------------------------------------- relative paths, another folder, '..'


def test_relative_paths_with_dot_segments_from_another_folder(tmp_path, plain, monkeypatch):
    folder, want = plain
    here = tmp_path / "work" / "here"
    here.mkdir(parents=True)
    (tmp_path / "work" / "sibling").mkdir()
    monkeypatch.chdir(here)
    rel = Path(os.path.relpath(folder, here))
    image = f"../sibling/../{rel.as_posix()[3:]}/./syn.zarr/image/"  # ../x == rel
    ok(invoke("infer", "--checkpoint", f"{rel}/./run/", "--input", image,
              "--output", "./pred.zarr", "--device", "cpu", "--levels", 1))
    np.testing.assert_array_equal(read(here / "pred.zarr/affinity"), want["affinity"])
    ok(invoke("segment", "pred.zarr/affinity/", "../here/seg.zarr", "--levels", 1))
    np.testing.assert_array_equal(read(here / "seg.zarr/segmentation"), want["segmentation"])
    scores = json.loads(ok(invoke("evaluate", "./seg.zarr/segmentation",
                                  f"{rel}/syn.zarr/../syn.zarr/labels", "--json")))
    assert {k: scores[k] for k in want["scores"]} == want["scores"]
    ok(invoke("data", "convert", image, "../../work/here/c.zarr", "--levels", 1))
    np.testing.assert_array_equal(read(here / "c.zarr/image"), want["image"])
    assert sorted(p.name for p in here.iterdir()) == ["c.zarr", "pred.zarr", "seg.zarr"]


def test_a_relative_recipe_source_is_relative_to_the_working_folder(tmp_path, plain,
                                                                     monkeypatch):
    """README: 'Relative data paths are relative to the working directory' (not the
    recipe's folder)."""
    folder, _ = plain
    recipe = tmp_path / "recipes" / "r.yaml"
    recipe.parent.mkdir()
    monkeypatch.chdir(folder)
    recipe.write_text(RECIPE.format(store="syn.zarr"))
    ok(invoke("validate", recipe))
    monkeypatch.chdir(tmp_path)
    line = one_line_exit_2(invoke("validate", recipe))
    assert "syn.zarr" in line and "no such file" in line


# --------------------------------------------------------------------------- symbolic links


def test_links_to_a_store_and_to_a_volume_in_a_store_read_as_the_store(tmp_path, plain):
    folder, want = plain
    (tmp_path / "link.zarr").symlink_to(folder / "syn.zarr")
    (tmp_path / "vol.zarr").mkdir()  # a store of the user's whose image is a link
    shutil.copy(folder / "syn.zarr" / "zarr.json", tmp_path / "vol.zarr" / "zarr.json")
    (tmp_path / "vol.zarr" / "image").symlink_to(folder / "syn.zarr" / "image")
    (tmp_path / "img.zarr").symlink_to(folder / "syn.zarr" / "image")  # the image group
    for k, image in enumerate(["link.zarr/image", "vol.zarr/image", "img.zarr"]):
        out = tmp_path / f"p{k}.zarr"
        ok(invoke("infer", "--checkpoint", folder / "run", "--input", tmp_path / image,
                  "--output", out, "--device", "cpu", "--levels", 1))
        np.testing.assert_array_equal(read(out / "affinity"), want["affinity"])
    scores = json.loads(ok(invoke("evaluate", folder / "seg.zarr/segmentation",
                                  tmp_path / "link.zarr/labels", "--json")))
    assert {k: scores[k] for k in want["scores"]} == want["scores"]


def test_segment_into_a_link_to_its_affinities_store_adds_beside_them(tmp_path, plain):
    folder, want = plain
    store = tmp_path / "pred.zarr"
    shutil.copytree(folder / "pred.zarr", store)
    (tmp_path / "link.zarr").symlink_to(store)
    ok(invoke("segment", tmp_path / "link.zarr/affinity", tmp_path / "link.zarr",
              "--levels", 1))
    assert (tmp_path / "link.zarr").is_symlink()
    np.testing.assert_array_equal(read(store / "segmentation"), want["segmentation"])
    np.testing.assert_array_equal(read(store / "affinity"), want["affinity"])


@pytest.mark.parametrize("kind", ["dangling", "loop", "two-link loop"])
def test_a_broken_link_as_input_is_one_line_naming_it(tmp_path, plain, kind):
    folder, _ = plain
    link = tmp_path / "in.zarr"
    if kind == "dangling":
        link.symlink_to(tmp_path / "nowhere.zarr")
    elif kind == "loop":
        link.symlink_to(link)
    else:
        (tmp_path / "other.zarr").symlink_to(link)
        link.symlink_to(tmp_path / "other.zarr")
    for args in (["infer", "--checkpoint", folder / "run", "--input", f"{link}/image",
                  "--output", tmp_path / "o.zarr", "--device", "cpu"],
                 ["data", "convert", f"{link}/image", tmp_path / "c.zarr"],
                 ["segment", f"{link}/affinity", tmp_path / "s.zarr"],
                 ["evaluate", f"{link}/labels", folder / "syn.zarr/labels"],
                 ["bench", "codecs", f"{link}/image", "--passes", 1]):
        line = one_line_exit_2(invoke(*args))
        assert str(link) in line, (args[0], line)
        assert ("loop of symbolic links" if "loop" in kind else "no such file") in line
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["in.zarr", *(["other.zarr"] if kind == "two-link loop" else [])])


@pytest.mark.parametrize("command", ["infer", "segment", "convert", "synth"])
def test_a_link_loop_as_output_is_one_line(tmp_path, plain, command):
    folder, _ = plain
    out = tmp_path / "out.zarr"
    out.symlink_to(out)
    args = {"infer": ["infer", "--checkpoint", folder / "run", "--input",
                      folder / "syn.zarr/image", "--output", out, "--device", "cpu"],
            "segment": ["segment", folder / "pred.zarr/affinity", out],
            "convert": ["data", "convert", folder / "syn.zarr/image", out],
            "synth": ["data", "synth", out, "--shape", 8, 32, 32]}[command]
    line = one_line_exit_2(invoke(*args))
    assert str(out) in line and "loop of symbolic links" in line
    assert out.is_symlink() and [p.name for p in tmp_path.iterdir()] == ["out.zarr"]


# ------------------------------------------ an output that is a file, or lies below one


def _outputs(folder: Path) -> dict[str, tuple[str, list[object]]]:
    """command -> (an output name, the command line before/after it as a template)."""
    return {
        "infer": ("x.zarr", ["infer", "--checkpoint", folder / "run", "--input",
                             folder / "syn.zarr/image", "--device", "cpu", "--output"]),
        "segment": ("x.zarr", ["segment", folder / "pred.zarr/affinity"]),
        "convert": ("x.zarr", ["data", "convert", folder / "syn.zarr/image"]),
        "synth": ("x.zarr", ["data", "synth", "--shape", 8, 32, 32, "--"]),
        "train": ("run", ["train", folder / "r.yaml", "--device", "cpu", "--run-dir"]),
        "preview": ("p.png", ["data", "preview", folder / "r.yaml", "--n", 1, "--out"]),
        "export": ("m.emrun", ["export", folder / "run"]),
        "evaluate": ("wd", ["evaluate", folder / "seg.zarr/segmentation",
                            folder / "syn.zarr/labels", "--workers", 2, "--block", 4, 16, 16,
                            "--work-dir"]),
        "demo": ("demo", ["demo", "-o", "train.iterations=1", "--out"]),
        "schema": ("s.json", ["schema", "--output"]),
        "bench segment": ("b", ["bench", "segment", "--shape", 8, 32, 32, "--folder"]),
        "bench codecs": ("b", ["bench", "codecs", folder / "syn.zarr/image", "--passes", 1,
                               "--workdir"]),
    }


@pytest.mark.parametrize("where", ["is a file", "below a file"])
@pytest.mark.parametrize("command", list(_outputs(Path("."))))
def test_an_output_that_is_a_file_or_lies_below_one_is_refused_untouched(
        tmp_path, plain, command, where):
    folder, _ = plain
    name, args = _outputs(folder)[command]
    (tmp_path / "notes.txt").write_text("mine\n")
    (tmp_path / name).write_text("mine too\n")
    out = tmp_path / name if where == "is a file" else tmp_path / "notes.txt" / name
    line = one_line_exit_2(invoke(*args, out))
    assert str(tmp_path / ("notes.txt" if where == "below a file" else name)) in line, line
    assert (tmp_path / "notes.txt").read_text() == "mine\n"
    assert (tmp_path / name).read_text() == "mine too\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["notes.txt", name])


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through folder permissions")
@pytest.mark.parametrize("command", ["infer", "segment", "convert", "synth", "train",
                                     "preview", "export", "schema"])
def test_an_output_in_a_read_only_folder_is_one_line(tmp_path, plain, command):
    folder, _ = plain
    name, args = _outputs(folder)[command]
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        line = one_line_exit_2(invoke(*args, locked / name))
        assert str(locked) in line
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


# -------------------------------------------------------------- input stores that are odd


def test_half_a_volume_and_stores_that_are_no_stores_are_one_line(tmp_path, plain):
    folder, _ = plain
    half = tmp_path / "half.zarr"
    shutil.copytree(folder / "syn.zarr", half)
    shutil.rmtree(half / "image" / "0")  # its metadata still names level 0
    (tmp_path / "empty.zarr").mkdir()
    (tmp_path / "file.zarr").write_text("not a store\n")
    cases = {f"{half}/image": "dataset '0'", f"{tmp_path}/empty.zarr/image": "not a zarr store",
             f"{tmp_path}/empty.zarr": "not a zarr store",
             f"{tmp_path}/file.zarr/image": "must be a folder",
             f"{tmp_path}/file.zarr": "must be a folder"}
    for source, why in cases.items():
        for args in (["infer", "--checkpoint", folder / "run", "--input", source, "--output",
                      tmp_path / "o.zarr", "--device", "cpu"],
                     ["data", "convert", source, tmp_path / "c.zarr"],
                     ["evaluate", source, folder / "syn.zarr/labels"],
                     ["bench", "codecs", source, "--passes", 1]):
            line = one_line_exit_2(invoke(*args))
            assert why in line and source.split("/image")[0] in line, (args[0], line)
    assert not (tmp_path / "o.zarr").exists() and not (tmp_path / "c.zarr").exists()
    assert list((tmp_path / "empty.zarr").iterdir()) == []


def _v2_copy(folder: Path, store: Path) -> None:
    group = zarr.open_group(str(store), mode="w", zarr_format=2)
    for name in ("image", "labels"):
        data = read(folder / "syn.zarr" / name)
        group.create_array(name, shape=data.shape, dtype=data.dtype,
                           chunks=(4, 16, 16))[...] = data


def test_a_zarr_v2_input_reads_as_its_v3_original(tmp_path, plain):
    """README: lazy readers for zarr v2/v3."""
    folder, want = plain
    _v2_copy(folder, tmp_path / "v2.zarr")
    ok(invoke("infer", "--checkpoint", folder / "run", "--input", tmp_path / "v2.zarr/image",
              "--output", tmp_path / "p.zarr", "--device", "cpu", "--levels", 1))
    np.testing.assert_array_equal(read(tmp_path / "p.zarr/affinity"), want["affinity"])
    ok(invoke("data", "convert", tmp_path / "v2.zarr/labels", tmp_path / "c.zarr",
              "--levels", 1))
    np.testing.assert_array_equal(read(tmp_path / "c.zarr/labels"), want["labels"])
    scores = json.loads(ok(invoke("evaluate", folder / "seg.zarr/segmentation",
                                  tmp_path / "v2.zarr/labels", "--json")))
    assert {k: scores[k] for k in want["scores"]} == want["scores"]


@pytest.mark.parametrize("command", ["infer", "segment", "convert"])
def test_a_zarr_v2_store_as_output_is_refused_untouched(tmp_path, plain, command):
    folder, _ = plain
    store = tmp_path / "v2.zarr"
    _v2_copy(folder, store)
    before = sorted(str(p.relative_to(store)) for p in store.rglob("*"))
    args = {"infer": ["infer", "--checkpoint", folder / "run", "--input",
                      folder / "syn.zarr/image", "--output", store, "--device", "cpu"],
            "segment": ["segment", folder / "pred.zarr/affinity", store],
            "convert": ["data", "convert", folder / "syn.zarr/image", store, "--name", "i2"]}
    line = one_line_exit_2(invoke(*args[command]))
    assert str(store) in line
    assert sorted(str(p.relative_to(store)) for p in store.rglob("*")) == before


def test_an_empty_folder_named_zarr_is_a_new_output(tmp_path, plain):
    folder, want = plain
    for name in ("p.zarr", "s.zarr"):
        (tmp_path / name).mkdir()
    ok(invoke("infer", "--checkpoint", folder / "run", "--input", folder / "syn.zarr/image",
              "--output", tmp_path / "p.zarr", "--device", "cpu", "--levels", 1))
    np.testing.assert_array_equal(read(tmp_path / "p.zarr/affinity"), want["affinity"])
    ok(invoke("segment", tmp_path / "p.zarr/affinity", tmp_path / "s.zarr", "--levels", 1))
    np.testing.assert_array_equal(read(tmp_path / "s.zarr/segmentation"), want["segmentation"])


# ------------------------------------------------------------------------------ bugs found


@pytest.mark.parametrize("command", ["infer", "segment", "convert", "synth"])
def test_a_store_through_a_missing_folder_and_dotdot_is_written_or_leaves_nothing(
        tmp_path, plain, command):
    """`OUT = new/../x.zarr` with no folder `new`: the store commands say 'cannot write a
    store there (No such file or directory)' (exit 2) and leave an empty x.zarr; export
    writes such a path (tests/test_export_probe.py). Either is fine; a refusal that leaves
    a folder behind is not ("complete or absent under their final names")."""
    folder, want = plain
    out = tmp_path / "new" / ".." / "x.zarr"
    args = {"infer": ["infer", "--checkpoint", folder / "run", "--input",
                      folder / "syn.zarr/image", "--output", out, "--device", "cpu"],
            "segment": ["segment", folder / "pred.zarr/affinity", out],
            "convert": ["data", "convert", folder / "syn.zarr/image", out],
            "synth": ["data", "synth", out, "--shape", 8, 32, 32, "--seed", 1]}[command]
    result = invoke(*args, "--levels", 1)
    if result.exit_code == 0:
        name = {"infer": "affinity", "segment": "segmentation", "convert": "image",
                "synth": "image"}[command]
        np.testing.assert_array_equal(read(tmp_path / "x.zarr" / name), want[name])
    else:
        one_line_exit_2(result)
        assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["preview"])
def test_an_output_through_a_missing_folder_and_dotdot_leaves_no_empty_folder(
        tmp_path, plain, command):
    """(`train --run-dir new/../run` keeps `new`, as `mkdir -p` does: the run's files are
    written through that very path for the whole run.)"""
    folder, _ = plain
    name, args = _outputs(folder)[command]
    ok(invoke(*args, tmp_path / "new" / ".." / name))
    assert (tmp_path / name).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_evaluate_workers_started_elsewhere_read_relative_paths(tmp_path, plain, monkeypatch):
    """`--launch CMD` may start a worker in another folder (ssh, a batch system's own
    working directory): `emrun.io.Volume.location` is 'where the volume is, whatever the
    working folder ... A worker elsewhere opens it by this'."""
    pytest.importorskip("daisy")
    folder, want = plain
    monkeypatch.chdir(folder)
    launch = "bash -c 'cd / && exec \"$@\"' launched"
    result = invoke("evaluate", "seg.zarr/segmentation", "syn.zarr/labels", "--scheduler",
                    "daisy", "--workers", 1, "--launch", launch, "--block", 4, 16, 16,
                    "--work-dir", tmp_path / "wd", "--json")
    scores = json.loads(ok(result))
    assert {k: scores[k] for k in want["scores"]} == want["scores"]


def test_infer_job_names_its_input_wherever_a_worker_starts(tmp_path, plain, monkeypatch):
    """The job file is what daisy and `--launch`ed workers read; with a relative --input
    one started in another folder failed ('../d/syn.zarr: no such file or directory', after
    ten worker restarts, about two minutes), where `segment --scheduler` records
    `volume.location()`."""
    from emrun.infer.job import Job

    folder, want = plain
    monkeypatch.chdir(folder)
    ok(invoke("infer", "--checkpoint", "run", "--input", "syn.zarr/image", "--output",
              tmp_path / "p.zarr", "--device", "cpu", "--levels", 1))
    [job_file] = (tmp_path / "p.zarr").rglob("job.json")
    job = Job.from_json(job_file.read_text())
    monkeypatch.chdir(tmp_path)  # a worker elsewhere
    np.testing.assert_array_equal(read(job.input_path), want["image"])


def test_a_recipe_path_under_home_is_read_or_said_to_be_unexpanded(tmp_path, plain,
                                                                 monkeypatch):
    """A recipe is no shell: `image: ~/data/syn.zarr/image` reaches emrun as typed, and the
    refusal says the file does not exist while `ls ~/data/syn.zarr` shows it."""
    folder, _ = plain
    home = tmp_path / "home"
    shutil.copytree(folder / "syn.zarr", home / "data" / "syn.zarr")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_text(RECIPE.format(store="~/data/syn.zarr"))
    result = invoke("validate", tmp_path / "r.yaml")
    if result.exit_code != 0:
        line = one_line_exit_2(result)
        assert "~" in line and ("expand" in line or "home" in line.lower()), line
