"""`emrun infer` and `emrun train` probed with faults a new user meets: a resumption under
settings that change the values written, a user's folder given as the output or the run
directory, a checkpoint cut short. Tiny model, volumes made here, in-process."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr
from typer.testing import CliRunner

from emrun import locks
from emrun.cli import app
from emrun.errors import UserError
from emrun.infer.run import run_inference
from emrun.io.write import write_volume
from emrun.recipe import Recipe
from emrun.registry import models

BLOCK = (4, 16, 16)


def make_recipe(*, dtype: str = "uint8", activation: str = "sigmoid",
                precision: str = "fp32") -> Recipe:
    return Recipe.model_validate({
        "name": "faults",
        "data": {"sources": {"a": {"type": "synthetic", "shape": [16, 64, 64]}}},
        "model": {"type": "rsunet", "widths": [4, 8]},
        "tasks": {"aff": {"target": {"type": "affinity"}, "activation": activation}},
        "train": {"patch": [4, 16, 16], "iterations": 1},
        "infer": {"dtype": dtype, "batch_size": 2, "precision": precision},
    })


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    """A checkpoint (c.pt) with lively weights, an input volume of 8 blocks, and the recipe
    as a file (r.yaml)."""
    recipe = make_recipe()
    torch.manual_seed(0)
    model = models.build(recipe.model, head_channels=recipe.head_channels())
    for p in model.parameters():
        p.data.normal_(0, 0.3)
    torch.save({"model": model.state_dict(), "iteration": 1}, tmp_path / "c.pt")
    volume = (np.random.default_rng(0).random((8, 32, 32)) * 255).astype(np.uint8)
    write_volume(tmp_path / "in.zarr", "image", volume, voxel_size=(30, 6, 6))
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe.resolved()))
    return tmp_path


class Stop(Exception):
    pass


def _interrupted(tmp: Path, out: Path) -> None:
    """``out`` stopped after its second block, as a Ctrl-C leaves it."""
    def stop(progress) -> None:
        if progress.done == 2:
            raise Stop

    with pytest.raises(Stop):
        run_inference(make_recipe(), tmp / "c.pt", str(tmp / "in.zarr/image"), out,
                      block=BLOCK, on_block=stop)


def _read(out: Path) -> np.ndarray:
    return zarr.open_array(str(out / "aff" / "0"), mode="r")[...]


@pytest.mark.parametrize(("changed", "says"), [
    ({"dtype": "float32"}, 'infer.dtype "uint8" and is resumed with "float32"'),
    ({"activation": "none"}, 'tasks.aff.activation "sigmoid" and is resumed with "none"'),
    ({"precision": "bf16"}, 'infer.precision "fp32" and is resumed with "bf16"'),
])
def test_a_resumption_that_would_write_other_values_is_refused(inputs, changed, says):
    """Resumed with -o infer.dtype=float32, a uint8 output got float values cast to 0 or 1
    (off by up to 242 of 255); with another activation, logits beside probabilities; with
    bf16 after fp32, blocks up to 15/255 apart: each finished with exit 0."""
    out = inputs / "o.zarr"
    _interrupted(inputs, out)
    before = _read(out)
    with pytest.raises(UserError, match=says):
        run_inference(make_recipe(**changed), inputs / "c.pt", str(inputs / "in.zarr/image"),
                      out, block=BLOCK, resume=True)
    np.testing.assert_array_equal(_read(out), before)  # nothing written
    straight = inputs / "straight.zarr"
    run_inference(make_recipe(), inputs / "c.pt", str(inputs / "in.zarr/image"), straight,
                  block=BLOCK)
    run_inference(make_recipe(), inputs / "c.pt", str(inputs / "in.zarr/image"), out,
                  block=BLOCK, resume=True)
    np.testing.assert_array_equal(_read(out), _read(straight))


def test_the_cli_says_an_override_that_changes_the_values_in_one_line(inputs):
    out = inputs / "o.zarr"
    _interrupted(inputs, out)
    result = CliRunner().invoke(app, [
        "infer", "--recipe", str(inputs / "r.yaml"), "--checkpoint", str(inputs / "c.pt"),
        "--input", str(inputs / "in.zarr/image"), "--output", str(out), "--block", "4", "16",
        "16", "--device", "cpu", "--resume", "-o", "infer.dtype=float16"])
    assert result.exit_code == 2, result.output
    assert "infer.dtype" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_resumption_with_another_intensity_scale_is_refused(inputs):
    """The scale the input was read with is recorded: another one (a source's `intensity`
    overridden) would mix two brightnesses of input in one output."""
    out = inputs / "o.zarr"
    _interrupted(inputs, out)
    group = zarr.open_group(str(out), mode="r+")
    record = dict(group.attrs["emrun"])
    assert record["scale"] == [0.0, 255.0]
    group.attrs["emrun"] = {**record, "scale": [0.0, 4095.0]}  # as a run with intensity set
    with pytest.raises(UserError, match=r"intensities scaled from \[0.0, 4095.0\]"):
        run_inference(make_recipe(), inputs / "c.pt", str(inputs / "in.zarr/image"), out,
                      block=BLOCK, resume=True)


def test_resuming_into_a_users_folder_does_not_advise_removing_it(inputs):
    """`infer --resume --output` a folder of the user's said 'holds no record of the run that
    started it ...: remove it and run again'."""
    mine = inputs / "mine.zarr"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="is not an emrun inference output; give a new") as said:
        run_inference(make_recipe(), inputs / "c.pt", str(inputs / "in.zarr/image"), mine,
                      block=BLOCK, resume=True)
    assert "remove" not in str(said.value)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    assert (mine / "notes.txt").read_text() == "mine"


# -- the run directory --------------------------------------------------------------------------


def test_a_users_folder_as_run_dir_is_refused_as_such_and_left_as_found(tmp_path):
    """It was refused as 'already holds a run; use --resume' (which then said there was no
    run), and kept a .emrun-lock file the refusal had made in the user's folder."""
    from emrun.train.run_dir import prepare

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"holds files that are no run's \(notes\.txt\)"):
        prepare(mine, resume=False)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    (mine / "notes.txt").unlink()  # emptied: now it may hold a run
    assert prepare(mine, resume=False) is False
    locks.release(mine)


def test_a_refused_run_leaves_no_lock_file_it_made(tmp_path):
    """A run directory copied without its lock file: refused, and left without one."""
    from emrun.train.run_dir import prepare

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints/last.pt").write_text("a run")
    (run / "recipe.yaml").write_text("name: x\n")
    with pytest.raises(UserError, match="already holds a run"):
        prepare(run, resume=False)
    assert not (run / locks.LOCK_NAME).exists()


# -- checkpoints cut short ---------------------------------------------------------------------


def test_a_checkpoint_cut_short_is_named_so_not_an_unreadable_file(tmp_path):
    """torch's zip reader says OSError(EINVAL) for a file cut short early on: it read
    'cannot read checkpoint (Invalid argument)', as if the disk had failed."""
    from emrun.io.checkpoint import CheckpointError, load

    torch.save({"model": {"w": torch.arange(50_000.0)}, "iteration": 3}, tmp_path / "c.pt")
    data = (tmp_path / "c.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 10])
    with pytest.raises(CheckpointError, match=r"cut\.pt is not an emrun checkpoint \(truncated "
                                              "or corrupt\\)"):
        load(tmp_path / "cut.pt")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(make_recipe().resolved()))
    result = CliRunner().invoke(app, ["train", str(tmp_path / "r.yaml"), "--run-dir",
                                      str(tmp_path / "run"), "--init-from",
                                      str(tmp_path / "cut.pt"), "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert "truncated or corrupt" in result.stderr and not (tmp_path / "run").exists()
