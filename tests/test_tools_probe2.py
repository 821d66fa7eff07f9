"""Export, demo, preview and bench commands probed as a new user would: absurd sizes that
must be refused before anything is allocated, chunk shapes that would write tens of
thousands of files, a network TorchScript cannot trace, events.jsonl and results.json files
a kill or an older emrun left, odd output names, and Ctrl-C. Tiny networks, made in code."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import emrun.bench.room as room
from emrun.cli import app
from emrun.io.write import write_volume
from emrun.models import build_model
from emrun.recipe import load_recipe
from emrun.train.run_dir import recipe_text

runner = CliRunner()
TINY = """\
name: tiny
data:
  sources:
    a: {type: synthetic, shape: [16, 64, 64], seed: 1}
model: {type: rsunet, widths: [4, 8]}
tasks:
  affinity:
    target: {type: affinity}
train:
  patch: [4, 16, 16]
  iterations: 2
  workers: 0
"""
HUGE = ("train.batch_size=1000000", "train.patch=[16,64,64]")
"""A million patches of 16x64x64 (the largest batch a recipe takes): ten terabytes of
activations, more than any machine holds."""


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def one_error_line(result: Any, *words: str) -> str:
    """The single stderr line of a refused command (exit 2), holding ``words``."""
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert all(w in lines[0] for w in words), lines[0]
    return lines[0]


def never(*_: Any, **__: Any) -> None:
    raise AssertionError("reached work that the refusal should have prevented")


def stop(*_: Any, **__: Any) -> None:
    raise KeyboardInterrupt


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY, encoding="utf-8")
    return path


@pytest.fixture
def run(tmp_path: Path, recipe: Path) -> Path:
    """A run directory with one checkpoint of lively random weights."""
    built = load_recipe(recipe, []).recipe
    torch.manual_seed(0)
    model = build_model(built)
    for p in model.parameters():
        p.data.normal_(0, 0.3)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    torch.save({"model": model.state_dict(), "iteration": 3, "recipe": recipe_text(built)},
               tmp_path / "run" / "checkpoints" / "last.pt")
    return tmp_path / "run"


# --------------------------------------------------------------------------- bench: sizes


@pytest.mark.parametrize(("command", "work"), [("model", "emrun.bench.model._time_steps"),
                                               ("train", "emrun.bench.train._batches")])
def test_bench_of_a_batch_no_memory_holds_is_refused_before_allocating(
        recipe, monkeypatch, command, work):
    monkeypatch.setattr(work, never)
    result = invoke("bench", command, recipe, "-o", HUGE[0], "-o", HUGE[1], "--steps", "1",
                    "--json")
    one_error_line(result, "train.batch_size 1000000", "TB of memory", "lower train.batch_size")
    assert result.stdout == ""  # --json: nothing on stdout but the figures


def test_step_room_refuses_only_a_step_larger_than_free_memory(recipe, monkeypatch):
    built = load_recipe(recipe, []).recipe
    need = room.training_step_bytes(built)
    assert need is not None
    bigger = load_recipe(recipe, ["train.batch_size=4"]).recipe
    assert room.training_step_bytes(bigger) > 3 * need  # activations grow with the batch
    monkeypatch.setattr(room, "available_memory", lambda: need)
    room.check_step_room(built, torch.device("cpu"))
    monkeypatch.setattr(room, "available_memory", lambda: need - 1)
    with pytest.raises(room.UserError, match=r"lower train\.batch_size"):
        room.check_step_room(built, torch.device("cpu"))


def test_step_room_is_a_lower_bound_of_what_a_step_holds(recipe):
    """At least the activations the backward pass keeps: every conv's output, per voxel of
    the batch, for each of the model's channels (here 4 + 8 + ... of them)."""
    built = load_recipe(recipe, ["train.batch_size=2"]).recipe
    need = room.training_step_bytes(built)
    voxels = 2 * 4 * 16 * 16
    assert need is not None and need > voxels * 4 * (4 + 8)
    half = room.training_step_bytes(built, "bf16")
    assert half is not None and need / 2 < half < need  # only activations halve


def test_bench_codecs_refuses_chunks_that_make_tens_of_thousands_of_files(tmp_path,
                                                                          monkeypatch):
    write_volume(tmp_path / "v.zarr", "image", np.zeros((8, 64, 64), np.uint8),
                 voxel_size=(30, 6, 6))
    monkeypatch.setattr("emrun.bench.codecs.measure_zarr", never)
    work = tmp_path / "work"
    result = invoke("bench", "codecs", tmp_path / "v.zarr/image", "--chunks", "1,1,1",
                    "--passes", "1", "--workdir", work)
    one_error_line(result, "--chunks 1,1,1", "32,768 chunks", "--max-mb")
    assert not work.exists() or not any(work.iterdir())


def test_bench_codecs_still_measures_a_chunk_shape_under_the_limit(tmp_path):
    write_volume(tmp_path / "v.zarr", "image", np.zeros((2, 16, 16), np.uint8),
                 voxel_size=(30, 6, 6))
    result = invoke("bench", "codecs", tmp_path / "v.zarr/image", "--chunks", "1,4,4",
                    "--codec", "zstd-1", "--passes", "1", "--sample-mb", "0.001")
    assert result.exit_code == 0, result.output
    assert "zstd-1" in result.stdout


class Terminated(Exception):
    """What SIGTERM raises in a test while no handler of emrun's is installed (its default
    action would end the test run)."""


def test_sigterm_stops_bench_codecs_as_ctrl_c_does_and_removes_its_arrays(tmp_path,
                                                                         monkeypatch):
    write_volume(tmp_path / "v.zarr", "image", np.zeros((2, 16, 16), np.uint8),
                 voxel_size=(30, 6, 6))

    def terminated(*_: Any, **__: Any) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises at once; without one, the test fails below

    def outside(*_: Any) -> None:
        raise Terminated

    monkeypatch.setattr("emrun.bench.codecs.measure_zarr", terminated)
    previous = signal.signal(signal.SIGTERM, outside)
    try:
        result = invoke("bench", "codecs", tmp_path / "v.zarr/image", "--codec", "zstd-1",
                        "--passes", "1", "--workdir", tmp_path / "work")
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert result.exit_code == 143, result.output
    assert result.stderr.startswith("stopped by SIGTERM") and "were removed" in result.stderr
    assert not (tmp_path / "work").exists()
    assert signal.getsignal(signal.SIGTERM) is previous


def test_ctrl_c_in_bench_model_is_one_line_and_130_with_nothing_on_stdout(recipe,
                                                                          monkeypatch):
    monkeypatch.setattr("emrun.bench.model._time_steps", stop)
    result = invoke("bench", "model", recipe, "--steps", "1", "--no-compile", "--json")
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 130 and result.stdout == "", result.output
    assert len(lines) == 1 and lines[0].startswith("stopped by SIGINT"), lines


# --------------------------------------------------------------------------- export


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_network_torchscript_cannot_trace_is_one_line_and_leaves_nothing(run, tmp_path,
                                                                          monkeypatch):
    pytest.importorskip("bioimageio.spec")

    def untraceable(*_: Any, **__: Any) -> None:
        raise RuntimeError("Tracer cannot infer type of output\nmore detail")

    monkeypatch.setattr(torch.jit, "trace", untraceable)
    out = tmp_path / "model.zip"
    result = invoke("export", run, out)
    one_error_line(result, "cannot be exported to bioimage.io", "Tracer cannot infer",
                   ".emrun or .onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "tiny.yaml"]


def test_a_damaged_best_pt_names_the_runs_last_pt_as_the_way_on(run, tmp_path):
    good = (run / "checkpoints" / "last.pt").read_bytes()
    (run / "checkpoints" / "best.pt").write_bytes(good[: len(good) // 3])
    result = invoke("export", run, tmp_path / "model.emrun")
    one_error_line(result, "best.pt", "truncated", f"emrun export {run}/checkpoints/last.pt")
    assert not (tmp_path / "model.emrun").exists()
    assert invoke("export", run / "checkpoints" / "last.pt", tmp_path / "model.emrun"
                  ).exit_code == 0


@pytest.mark.parametrize("name", [".emrun", ".ZIP", ".onnx"])
def test_an_output_named_only_by_its_suffix_is_asked_for_a_name(run, tmp_path, name):
    result = invoke("export", run, tmp_path / name)
    one_error_line(result, "a name before its suffix", f"model{name.lower()}")
    assert not (tmp_path / name).exists()


def test_an_explicit_format_writes_a_hidden_file_as_asked(run, tmp_path):
    result = invoke("export", run, tmp_path / ".emrun", "--format", "emrun")
    assert result.exit_code == 0, result.output
    assert (tmp_path / ".emrun").is_file()


# --------------------------------------------------------------------------- demo


def test_demo_out_that_is_a_file_is_called_a_file_and_kept(tmp_path, monkeypatch):
    monkeypatch.setattr("emrun.demo._demo", never)
    notes = tmp_path / "notes.txt"
    notes.write_text("mine", encoding="utf-8")
    result = invoke("demo", "--out", notes)
    one_error_line(result, "is a file, not a folder")
    assert notes.read_text(encoding="utf-8") == "mine"


# --------------------------------------------------------------------------- preview


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc (Linux)")
def test_preview_into_a_pseudo_file_system_is_refused_before_drawing(recipe, monkeypatch):
    monkeypatch.setattr("emrun.preview.training_samples", never)
    result = invoke("data", "preview", recipe, "--out", "/proc/emrun-preview.png", "--n", "1")
    one_error_line(result, "/proc is a pseudo file system", "not a disk")


# --------------------------------------------------------------------------- snemi3d


EVENTS = [
    {"iteration": 1, "loss/total": 0.5},
    [1, 2],  # not a record
    {"iteration": 2, "loss/total": None},  # a NaN loss, logged as null
    {"step": 3, "loss": 0.4},  # an older emrun's keys
    {"iteration": True, "loss/total": 0.3},  # true is no iteration
    {"iteration": 4, "validation": 0.3},  # a validation that is not a mapping
    {"iteration": 5, "loss/total": 0.2, "validation": {"loss/total": 0.25}},
]


def _events(path: Path) -> Path:
    text = "".join(json.dumps(e) + "\n" for e in EVENTS) + '{"iteration": 6, "loss/to'
    path.write_text(text, encoding="utf-8")  # the last line: cut short by a kill
    return path


def test_snemi3d_loss_curves_pass_over_what_a_kill_or_an_older_emrun_left(tmp_path):
    from emrun.bench.snemi3d import loss_curves

    steps, vals = loss_curves(_events(tmp_path / "events.jsonl"))
    assert steps == [(1, 0.5), (5, 0.2)]
    assert vals == [(5, 0.25)]
    assert loss_curves(tmp_path / "missing.jsonl") == ([], [])


def test_snemi3d_figures_are_drawn_from_a_damaged_events_file(tmp_path):
    from emrun.bench.snemi3d import _figures

    run = tmp_path / "run"
    run.mkdir()
    _events(run / "events.jsonl")
    image = np.zeros((2, 8, 8), np.uint8)
    seg = np.arange(128, dtype=np.uint64).reshape(2, 8, 8)
    _figures(tmp_path, image, np.zeros((3, 2, 8, 8), np.float32), seg, seg, run)
    assert (tmp_path / "training.png").stat().st_size > 0


@pytest.mark.parametrize(("field", "value"), [("iterations", "2k"), ("iterations", 0),
                                              ("overrides", "a=1"), ("chosen", "x"),
                                              ("segmenter", None)])
def test_snemi3d_final_refuses_a_results_file_of_the_wrong_kinds(tmp_path, field, value):
    out = tmp_path / "bench"
    out.mkdir()
    results = {"segmenter": "waterz", "parameter": "threshold", "chosen": 0.3,
               "iterations": 100, "overrides": [], "recipe_file": "snemi3d_aff"}
    results[field] = value
    (out / "results.json").write_text(json.dumps(results), encoding="utf-8")
    result = invoke("bench", "snemi3d", "--final", "--out", out, "--data", tmp_path / "none")
    one_error_line(result, "results.json", "not a bench snemi3d result", repr(field))

