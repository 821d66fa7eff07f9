"""`train --init-from RUN_DIR`: a run directory stands for the checkpoint `export RUN_DIR`
picks (best.pt, else last.pt); the new run's provenance names that file and its iteration; a
folder that is not a run is refused in one line (exit 2) saying what was expected."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from emrun.cli import app
from emrun.io.package import read_package

RECIPE = """\
name: tiny_init
seed: 3
data:
  sources:
    a: {type: synthetic, shape: [8, 32, 32], seed: 1}
model: {type: rsunet, widths: [4, 8], norm: group, groups: 2}
tasks:
  affinity:
    target: {type: affinity}
train:
  patch: [4, 16, 16]
  iterations: 1
  workers: 0
  validate_every: 0
  log_every: 1
"""

runner = CliRunner()


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A recipe and a finished one-iteration run of it (checkpoints/last.pt, no best.pt)."""
    root = tmp_path_factory.mktemp("init_from")
    recipe = root / "recipe.yaml"
    recipe.write_text(RECIPE, encoding="utf-8")
    done = invoke("train", recipe, "--run-dir", root / "run", "--device", "cpu")
    assert done.exit_code == 0, done.output
    return recipe, root / "run"


def _copy_run(run: Path, to: Path, best_iteration: int | None = None) -> Path:
    """A copy of ``run``; with ``best_iteration``, a best.pt beside last.pt whose weights
    differ from last.pt's (so which one was read can be told)."""
    shutil.copytree(run, to)
    if best_iteration is not None:
        state = torch.load(to / "checkpoints/last.pt", weights_only=True)
        state["model"] = {k: v + 1 if v.is_floating_point() else v
                          for k, v in state["model"].items()}
        state["iteration"] = best_iteration
        torch.save(state, to / "checkpoints/best.pt")
    return to


def _session(run: Path) -> dict:
    return json.loads((run / "provenance.json").read_text("utf-8"))["sessions"][-1]


def test_a_run_directory_starts_from_its_best_checkpoint_as_export_picks_it(source, tmp_path):
    recipe, trained = source
    run = _copy_run(trained, tmp_path / "a", best_iteration=7)
    tuned = invoke("train", recipe, "--run-dir", tmp_path / "ft", "--init-from", run,
                   "--device", "cpu")
    assert tuned.exit_code == 0, tuned.output
    assert f"--init-from {run}: starting from its checkpoints/best.pt (iteration 7)" in \
        tuned.output
    session = _session(tmp_path / "ft")
    assert session["init_from"] == str((run / "checkpoints/best.pt").resolve())
    assert session["init_from_iteration"] == 7
    exported = invoke("export", run, tmp_path / "a.emrun")  # the same choice, one function
    assert exported.exit_code == 0, exported.output
    provenance = read_package(tmp_path / "a.emrun").manifest["provenance"]
    assert (provenance["checkpoint"], provenance["iteration"]) == ("best.pt", 7)


def test_the_weights_loaded_are_the_chosen_checkpoint_s(source, tmp_path):
    """The trainer holds best.pt's weights (not last.pt's, not random ones) before step 1."""
    from emrun.recipe import load_recipe
    from emrun.train.trainer import Trainer

    recipe, trained = source
    run = _copy_run(trained, tmp_path / "a", best_iteration=7)
    trainer = Trainer(load_recipe(recipe, []), tmp_path / "ft", init_from=run, device="cpu")
    best = torch.load(run / "checkpoints/best.pt", weights_only=True)["model"]
    state = trainer.model.state_dict()
    assert all(torch.equal(state[k], best[k]) for k in best)
    assert trainer.init_from == run / "checkpoints/best.pt"


def test_a_run_without_best_pt_starts_from_last_pt(source, tmp_path):
    recipe, trained = source
    run = _copy_run(trained, tmp_path / "a")
    tuned = invoke("train", recipe, "--run-dir", tmp_path / "ft", "--init-from", run,
                   "--device", "cpu")
    assert tuned.exit_code == 0, tuned.output
    assert "starting from its checkpoints/last.pt (iteration 1)" in tuned.output
    session = _session(tmp_path / "ft")
    assert session["init_from"] == str((run / "checkpoints/last.pt").resolve())
    assert session["init_from_iteration"] == 1


def test_a_checkpoint_file_is_taken_as_given_and_says_nothing_more(source, tmp_path):
    recipe, trained = source
    tuned = invoke("train", recipe, "--run-dir", tmp_path / "ft", "--init-from",
                   trained / "checkpoints/last.pt", "--device", "cpu")
    assert tuned.exit_code == 0, tuned.output
    assert "starting from its" not in tuned.output
    assert _session(tmp_path / "ft")["init_from"] == \
        str((trained / "checkpoints/last.pt").resolve())


def _refusal(recipe: Path, given: Path, run: Path) -> str:
    """The one line a refused ``--init-from given`` says; nothing made at ``run``."""
    refused = invoke("train", recipe, "--run-dir", run, "--init-from", given, "--device", "cpu")
    assert refused.exit_code == 2, refused.output
    assert not run.exists()  # refused before the run directory is made
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1, refused.stderr
    return lines[0]


def test_a_folder_that_is_not_a_run_is_refused_saying_what_was_expected(source, tmp_path):
    recipe, _ = source
    folder = tmp_path / "photos"
    folder.mkdir()
    said = _refusal(recipe, folder, tmp_path / "ft")
    assert f"--init-from {folder} is a directory without checkpoints/best.pt or " \
        "checkpoints/last.pt: give a run directory, a checkpoint file or a model package" in said
    said = _refusal(recipe, tmp_path / "missing", tmp_path / "ft")
    assert "no such run directory, checkpoint or model package" in said


def test_a_run_stopped_before_last_pt_names_its_newest_checkpoint(source, tmp_path):
    recipe, trained = source
    run = _copy_run(trained, tmp_path / "a")
    (run / "checkpoints/last.pt").unlink()
    numbered = sorted((run / "checkpoints").glob("iter_*.pt"))
    assert numbered, "the run keeps its numbered checkpoints"
    said = _refusal(recipe, run, tmp_path / "ft")
    assert f"has {numbered[-1].name} (its newest): give that file, {numbered[-1]}" in said
    tuned = invoke("train", recipe, "--run-dir", tmp_path / "ft", "--init-from", numbered[-1],
                   "--device", "cpu")
    assert tuned.exit_code == 0, tuned.output


def test_infer_with_a_run_directory_predicts_with_the_checkpoint_export_picks(source,
                                                                              tmp_path):
    """`infer --checkpoint RUN_DIR` was refused as "a directory"; it now predicts with the
    run's best.pt, exactly as `--checkpoint RUN_DIR/checkpoints/best.pt` does."""
    import numpy as np

    from emrun.io import open_volume, write_volume

    _, trained = source
    run = _copy_run(trained, tmp_path / "a", best_iteration=7)
    image = np.random.default_rng(0).integers(0, 255, (8, 32, 32), np.uint8)
    write_volume(tmp_path / "in.zarr", "image", image)
    by_dir = invoke("infer", "--checkpoint", run, "--input", tmp_path / "in.zarr/image",
                    "--output", tmp_path / "dir.zarr", "--device", "cpu")
    assert by_dir.exit_code == 0, by_dir.output
    assert f"--checkpoint {run}: predicting with its checkpoints/best.pt" in by_dir.output
    by_file = invoke("infer", "--checkpoint", run / "checkpoints/best.pt", "--input",
                     tmp_path / "in.zarr/image", "--output", tmp_path / "file.zarr",
                     "--device", "cpu")
    assert by_file.exit_code == 0, by_file.output
    np.testing.assert_array_equal(open_volume(tmp_path / "dir.zarr/affinity").read(),
                                  open_volume(tmp_path / "file.zarr/affinity").read())
    empty = tmp_path / "empty"
    empty.mkdir()
    refused = invoke("infer", "--checkpoint", empty, "--input", tmp_path / "in.zarr/image",
                     "--output", tmp_path / "no.zarr", "--device", "cpu")
    assert refused.exit_code == 2
    assert "without checkpoints/best.pt or checkpoints/last.pt" in refused.output
    assert not (tmp_path / "no.zarr").exists()
