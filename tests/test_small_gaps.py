"""Small gaps of infer, export and demo, each said as one line instead of done wrong.

`emrun infer` predicted with a recipe's absurd `infer.chunks` or stride unsaid (validate and
train warned); `emrun export RUN q.emrun/` wrote the file q.emrun; an export or a demo into
/proc said "No such file or directory"; a SIGINT after infer's last block said "48 of 48
blocks are done and marked; continue with --resume", as if blocks remained.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
import zarr
from test_infer_probe import Lopsided, checkpoint, probe_recipe
from typer.testing import CliRunner

from emrun.capacity import pseudo_file_system
from emrun.cli import app
from emrun.infer import progress as infer_progress
from emrun.infer import worker
from emrun.io.completion import UNFINISHED
from emrun.io.write import write_volume

PROC = "/proc"
no_proc = pytest.mark.skipif(pseudo_file_system(PROC) is None,
                             reason="no /proc pseudo file system here")


@pytest.fixture
def infer_args(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """`emrun infer` of a tiny volume with the probe recipe (its stand-in network)."""
    import numpy as np

    image = np.random.default_rng(3).random((7, 19, 23)).astype(np.float32)
    write_volume(tmp_path / "in.zarr", "image", image, voxel_size=(30, 6, 6))
    recipe = probe_recipe((4, 8, 8), stride=(3, 6, 5))
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe.resolved()))
    monkeypatch.setattr(worker, "load_model", lambda *args: Lopsided())
    return ["infer", "--recipe", str(tmp_path / "r.yaml"), "--checkpoint",
            str(checkpoint(recipe, tmp_path)), "--input", str(tmp_path / "in.zarr/image"),
            "--device", "cpu", "--block", "4", "6", "10"]


def test_infer_warns_of_the_recipe_s_inference_cautions_only(infer_args, tmp_path):
    """Tiny chunks are warned, located at the override, once; the warm-up lasting the whole
    (finished) training is training's, not said on every prediction."""
    result = CliRunner().invoke(app, [*infer_args, "--output", str(tmp_path / "o.zarr"),
                                      "-o", "infer.chunks=[2,3,5]",
                                      "-o", "train.schedule.warmup=5"])
    assert result.exit_code == 0, result.output
    said = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len([s for s in said if "infer.chunks" in s and "chunks of 30 voxels" in s]) == 1, \
        result.stderr
    assert not [s for s in said if "warm-up" in s], result.stderr


def test_a_sigint_after_the_last_block_says_resume_only_finishes(infer_args, tmp_path,
                                                                  monkeypatch):
    """The signal lands after the last block is marked, before the pyramid: the message
    says all are done and --resume only finishes, which it then does, predicting none."""

    @contextlib.contextmanager
    def interrupting(console: Any, *args: Any) -> Iterator[Any]:
        def report(p: Any) -> None:
            if p.done + p.skipped == p.total:
                os.kill(os.getpid(), signal.SIGINT)  # noted by infer's handler, not raised

        yield report

    output = tmp_path / "o.zarr"
    with monkeypatch.context() as patched:
        patched.setattr(infer_progress, "block_progress", interrupting)
        stopped = CliRunner().invoke(app, [*infer_args, "--output", str(output),
                                           "--levels", "2"])
    assert stopped.exit_code == 130, stopped.output
    last = stopped.stderr.strip().splitlines()[-1]
    assert last.startswith("stopped by SIGINT: all ") and "blocks are done" in last, last
    assert "not finished" in last and "--resume predicts nothing again" in last, last
    assert UNFINISHED in zarr.open_group(str(output / "aff"), mode="r").attrs["emrun"]
    resumed = CliRunner().invoke(app, [*infer_args, "--output", str(output), "--resume",
                                       "--levels", "2"])
    assert resumed.exit_code == 0, resumed.output
    assert ": 0 blocks predicted" in resumed.stdout, resumed.stdout
    for task in ("aff", "dist"):
        assert UNFINISHED not in zarr.open_group(str(output / task), mode="r").attrs["emrun"]


def exportable(folder: Path) -> Path:
    """A checkpoint that carries its recipe, as `emrun train` writes one (export takes it)."""
    recipe = probe_recipe((4, 8, 8))
    state = torch.load(checkpoint(recipe, folder), weights_only=True)
    path = folder / "trained.pt"
    torch.save({**state, "recipe": yaml.safe_dump(recipe.resolved())}, path)
    return path


def test_export_refuses_a_file_output_that_ends_with_a_slash(tmp_path, monkeypatch):
    """Not the file q.emrun written instead (nor a guessed name inside a folder q.emrun)."""
    exportable(tmp_path)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["export", "trained.pt", "q.emrun/"])
    assert result.exit_code == 2, result.output
    assert "q.emrun/: ends with a slash" in result.stderr and "one file" in result.stderr
    assert not (tmp_path / "q.emrun").exists()


@no_proc
def test_export_into_a_pseudo_file_system_says_it_cannot_be_written(tmp_path):
    target = f"{PROC}/emrun-test-x.emrun"
    result = CliRunner().invoke(app, ["export", str(exportable(tmp_path)), target])
    assert result.exit_code == 2, result.output
    assert f"{target}: cannot be written: /proc is a pseudo file system" in result.stderr, \
        result.stderr
    assert "No such file" not in result.stderr


@no_proc
def test_demo_into_a_pseudo_file_system_says_it_cannot_be_written(monkeypatch):
    def never(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the demo started before refusing its --out")

    monkeypatch.setattr("emrun.demo._demo", never)
    result = CliRunner().invoke(app, ["demo", "--out", f"{PROC}/emrun-test-x"])
    assert result.exit_code == 2, result.output
    assert "--out /proc/emrun-test-x: cannot be written: /proc is a pseudo file system" \
        in result.stderr, result.stderr
