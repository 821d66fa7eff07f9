"""`train --gpus` called in-process, empty `type:` names, infer blocks, strides and chunks
that validation passed, `1e3` in a recipe file, and validation sources smaller than the
patch."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import MINIMAL
from typer.testing import CliRunner

from emrun.recipe import RecipeError, load_recipe


def problems(path: Path, *overrides: str) -> list[str]:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides)
    return [str(p) for p in info.value.problems]


# -- 1. `train --gpus N` in-process: the ranks' command line --------------------------------


def test_train_gpus_in_process_gives_the_ranks_its_own_arguments(write, tmp_path, monkeypatch):
    """The ranks' command was sys.argv without --gpus: in-process (CliRunner, a script
    calling the app) that is the caller's command line (here pytest's), so the ranks printed
    help and the launcher reported exit 0 for a run that never trained. Each rank parses the
    arguments it is given back to the launcher's own."""
    from emrun.cli import app
    from emrun.train import launch, trainer

    recipe = write(MINIMAL, "-odd name.yaml")  # a name that reads as an option
    launched: list[tuple[int, list[str]]] = []
    monkeypatch.setattr(launch, "launch_ranks",
                        lambda n, args: launched.append((n, args)) or 0)
    monkeypatch.setattr(sys, "argv", ["pytest", "-q", "tests/test_train_recipe_odds.py"])
    monkeypatch.chdir(tmp_path)
    args = ["train", "--gpus", "2", "--device", "cpu", "-o", "train.iterations=3",
            "--override", "description=--resume", "--run-dir", "my run", "--", str(recipe)]
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 0, done.output
    [(processes, rank_args)] = launched
    assert processes == 2 and "--gpus" not in rank_args

    seen: dict[str, Any] = {}

    class Trainer:  # what each rank would train
        def __init__(self, loaded: Any, path: Path, **options: Any) -> None:
            seen.update(options, path=path, iterations=loaded.recipe.train.iterations,
                        description=loaded.recipe.description)

        def fit(self) -> Any:
            return SimpleNamespace(interrupted=None, iteration=3)

    monkeypatch.setattr(trainer, "Trainer", Trainer)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    rank = CliRunner().invoke(app, rank_args)
    assert rank.exit_code == 0, rank.output
    assert seen == {"path": Path("my run"), "iterations": 3, "description": "--resume",
                    "resume": False,
                    "init_from": None, "device": "cpu", "console": seen["console"]}


def test_rank_args_carry_resume_init_from_and_the_default_run_dir():
    from emrun.cli.commands import rank_args

    assert rank_args(Path("r.yaml"), [], Path("runs/r"), True, None, None) == [
        "train", "--run-dir=runs/r", "--resume", "--", "r.yaml"]
    assert rank_args(Path("r.yaml"), ["a=1"], Path("x"), False, Path("w.pt"), "cuda") == [
        "train", "--override=a=1", "--run-dir=x", "--init-from=w.pt", "--device=cuda", "--",
        "r.yaml"]


# -- 2. an empty `type:` ------------------------------------------------------------------


@pytest.mark.parametrize(("override", "expected"), [
    ("model.type=~", "model.type: the model type is empty; give one of: mednext, resenc, "
     "rsunet, updown"),
    ("model.type=''", "model.type: the model type is empty; give one of:"),
    ("model.type=5", "model.type: the model type should be a name, one of: mednext, resenc, "
     "rsunet, updown (got 5)"),
    ("tasks.affinity.target.type=~", "tasks.affinity.target.type: the target type is empty; "
     "give one of: affinity, binary,"),
    ("tasks.affinity.loss={type: ~}", "tasks.affinity.loss.type: the loss type is empty; "
     "give one of: bce,"),
    ("augment=[{type: ~}]", "augment.0.type: the augmentation type is empty; give one of: "),
    ("segment={type: ~}", "segment.type: the segmenter type is empty; give one of: cc, mws"),
    ("infer.blend.type=~", "infer.blend.type: the blend window type is empty; give one of: "
     "bump, gaussian"),
    ("train.optimizer.type=~", "train.optimizer.type: the optimizer type is empty; give one "
     "of: adam, adamw, sgd"),
    ("train.schedule.type=~", "train.schedule.type: the schedule type is empty; give one of: "
     "constant, step, cosine, poly"),
    # a union with a default type: `type: ~` was "missing `type:`", at the source
    ("data.sources.a.type=~", "data.sources.a.type: the source type is empty; give one of: "
     "volume, synthetic"),
])
def test_an_empty_type_says_so_and_lists_the_types(write, override: str, expected: str):
    """`type: ~` said "unknown model type 'None'" (with "did you mean 'one_of'?" for an
    augmentation, 'cosine' for a schedule), as if the user had written the word None."""
    [msg] = problems(write(MINIMAL), override)
    assert msg.startswith(f"override -o {override}: {expected}"), msg
    assert "'None'" not in msg and "did you mean" not in msg


def test_an_empty_type_in_a_file_is_located_at_it(write):
    path = write(MINIMAL.replace("model: {type: rsunet, widths: [4, 8]}",
                                 "model:\n  type:\n  widths: [4, 8]"))
    [msg] = problems(path)
    assert msg.endswith(f"{path.name}:6:8: model.type: the model type is empty; give one of: "
                   "mednext, resenc, rsunet, updown")


def test_a_type_that_is_the_word_none_is_still_an_unknown_name(write):
    [msg] = problems(write(MINIMAL), "model.type=None")
    assert "unknown model type 'None'" in msg


# -- 3. infer blocks, strides and chunks ----------------------------------------------------


def test_an_infer_block_under_one_stride_is_refused_by_validation(write):
    """`infer.block: [1, 1, 1]` passed `emrun validate`; `emrun infer` then refused it
    ("smaller than one patch stride") on any volume."""
    path = write(MINIMAL)  # infer stride: [6, 24, 24] (patch [8, 32, 32], overlap 0.25)
    [msg] = problems(path, "infer.block=[1, 1, 1]")
    assert msg.startswith("override -o infer.block=[1, 1, 1]: infer.block: block [1, 1, 1] is "
                          "smaller than one patch stride [6, 24, 24] in z, y and x")
    [msg] = problems(path, "infer.block=[4, 48, 48]")
    assert "stride [6, 24, 24] in z:" in msg
    assert load_recipe(path, ["infer.block=[6, 24, 24]"]).recipe.infer.block == (6, 24, 24)
    file = write(MINIMAL + "infer:\n  stride: [2, 8, 8]\n  block: [2, 4, 8]\n", "own.yaml")
    [msg] = problems(file)
    assert ("own.yaml:14:10: infer.block: block [2, 4, 8] is smaller than one patch stride "
            "[2, 8, 8] in y:") in msg


def test_strides_and_chunks_infer_takes_forever_over_are_warned(write):
    """`infer.stride: [1, 1, 1]` predicted each voxel a thousand times and `infer.chunks:
    [1, 1, 1]` wrote a file per voxel: both ran for minutes on a 20 x 64 x 64 volume,
    unsaid."""
    path = write(MINIMAL)
    assert load_recipe(path).cautions() == []
    assert load_recipe(path, ["infer.overlap=[0.5, 0.5, 0.5]"]).cautions() == []
    [line] = load_recipe(path, ["infer.stride=[1, 1, 1]"]).cautions()
    assert line.startswith("override -o infer.stride=[1, 1, 1]: infer.stride: a stride of "
                           "[1, 1, 1] for patches of [8, 32, 32] predicts each voxel about "
                           "8,192 times")
    [line] = load_recipe(path, ["infer.overlap=[0.9, 0.9, 0.9]"]).cautions()
    assert "infer.overlap: a stride of [1, 3, 3]" in line
    [line] = load_recipe(path, ["infer.chunks=[1, 1, 1]"]).cautions()
    assert "infer.chunks: chunks of 1 voxel: each chunk is a file" in line
    assert load_recipe(path, ["infer.chunks=[1, 64, 64]"]).cautions() == []


# -- 4. `1e3` in a recipe file --------------------------------------------------------------


def test_an_e_number_in_a_recipe_file_gets_the_hint_overrides_get(write):
    """`iterations: 1e3` in a file said "(got '1e3')" only: the hint that `-o` gave (YAML
    1.1 reads 1e3 as a string) was for overrides alone."""
    path = write(MINIMAL.replace("iterations: 10", "iterations: 1e3"))
    [msg] = problems(path)
    assert msg.endswith(f"{path.name}:11:15: train.iterations: input should be a valid integer "
                   "(got '1e3'); YAML reads 1e3 as a string; write 1000")
    # the same with an unrelated override, and in a base the recipe extends
    assert problems(path, "seed=2") == [msg]
    child = write(f"extends: {path.name}\nname: child\n", "child.yaml")
    assert problems(child) == [msg]
    widths = write(MINIMAL.replace("widths: [4, 8]", "widths: [4, 2.5e1]"), "w.yaml")
    [msg] = problems(widths)
    assert msg.endswith("(got '2.5e1'); YAML reads 2.5e1 as a string; write 25")


@pytest.mark.parametrize("written", ["'1e3'", '"1e3"'])
def test_a_quoted_e_number_in_a_file_gets_no_hint(write, written: str):
    [msg] = problems(write(MINIMAL.replace("iterations: 10", f"iterations: {written}")))
    assert "(got '1e3')" in msg and "YAML reads" not in msg


def test_an_override_of_a_file_s_e_number_gets_only_its_own_hint(write):
    path = write(MINIMAL.replace("iterations: 10", "iterations: 1e3"))
    [msg] = problems(path, "train.iterations='1e3'")  # quoted: meant as written
    assert msg.startswith("override -o train.iterations='1e3'") and "YAML reads" not in msg
    assert load_recipe(path, ["train.iterations=5"]).recipe.train.iterations == 5


# -- 5. a validation source smaller than train.patch ----------------------------------------


def test_a_validation_source_smaller_than_the_patch_is_padded_and_scored_on_itself(write):
    """Training accepts it (the recipe check leaves validation crops alone): its tile is
    padded to train.patch and only the source's own voxels count."""
    from emrun.data.loader import unpack, validation_batches

    text = MINIMAL.replace("    a: {type: synthetic, shape: [16, 64, 64], seed: 1}\n",
                           "    a: {type: synthetic, shape: [16, 64, 64], seed: 1}\n"
                           "  validation:\n    v: {type: synthetic, shape: [3, 20, 12], seed: 2}\n")
    loaded = load_recipe(write(text.replace("iterations: 10", "iterations: 10\n"
                                            "  validate_every: 5")))
    assert loaded.cautions() == []
    [batch] = [unpack(b) for b in validation_batches(loaded.recipe)]
    assert tuple(batch["image"].shape) == (1, 1, 8, 32, 32)
    mask = batch["mask"]["affinity"][0]
    assert mask[:, :3, :20, :12].sum() > 0
    outside = mask.clone()
    outside[:, :3, :20, :12] = 0
    assert outside.sum() == 0
