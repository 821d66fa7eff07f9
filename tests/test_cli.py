"""The command line as a user meets it: exit codes, summaries, the schema, listings."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml
from conftest import MINIMAL, ROOT
from typer.testing import CliRunner

from emrun.cli import app
from emrun.errors import UserError
from emrun.io import write_volume
from emrun.recipe.schema import recipe_schema_text

runner = CliRunner()

COMMANDS = ["validate", "train", "infer", "segment", "evaluate", "schema", "recipes", "data",
            "bench", "demo"]


def test_help_lists_every_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in COMMANDS:
        assert f"  {command} " in result.output


def test_validate_prints_summary(write):
    result = runner.invoke(app, ["validate", str(write(MINIMAL))])
    assert result.exit_code == 0, result.output
    assert "recipe tiny" in result.output
    assert "16 x 64 x 64" in result.output  # source shape
    assert "parameters" in result.output
    assert "affinity" in result.output


def test_validate_print_gives_the_resolved_recipe(write):
    result = runner.invoke(app, ["validate", str(write(MINIMAL)), "--print", "-o", "seed=5"])
    assert result.exit_code == 0, result.output
    resolved = yaml.safe_load(result.stdout)
    assert resolved["seed"] == 5
    assert resolved["train"]["optimizer"]["type"] == "adam"  # defaults filled in


def test_validate_checks_data_unless_no_data(write, tmp_path):
    image = tmp_path / "image.npy"
    np.save(image, np.zeros((16, 64, 64), np.uint8))
    labels = tmp_path / "labels.npy"
    np.save(labels, np.zeros((16, 64, 60), np.uint32))
    text = MINIMAL.replace("a: {type: synthetic, shape: [16, 64, 64], seed: 1}",
                           f"a: {{image: {image}, labels: {labels}, mask: {tmp_path}/nope.npy}}")
    path = write(text)
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    assert f"{path}:4:" in result.stderr
    assert "has shape [16, 64, 60] but the image" in result.stderr
    assert "nope.npy" in result.stderr  # every problem, not only the first
    assert runner.invoke(app, ["validate", str(path), "--no-data"]).exit_code == 0
    np.save(labels, np.ones((16, 64, 64), np.uint32))  # all 0: nothing to sample
    result = runner.invoke(app, ["validate", str(path), "-o", "data.sources.a.mask=null"])
    assert result.exit_code == 0, result.output
    assert "16 x 64 x 64" in result.output


def test_validate_warns_of_negative_label_ids_where_the_recipe_names_them(write, tmp_path):
    """Training takes -1 as an object: a dataset that means it as "unlabelled" would train
    boundaries around it. validate still passes (it may be meant), saying so located."""
    image = tmp_path / "image.npy"
    np.save(image, np.zeros((16, 64, 64), np.uint8))
    labels = tmp_path / "labels.npy"
    ids = np.ones((16, 64, 64), np.int32)
    ids[15, 3, 4] = -1  # in the last section, which the check samples
    np.save(labels, ids)
    text = MINIMAL.replace("a: {type: synthetic, shape: [16, 64, 64], seed: 1}",
                           f"a: {{image: {image}, labels: {labels}}}")
    path = write(text)
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    said = " ".join(result.stderr.split())
    assert f"{path}:4:" in said and "data.sources.a.labels" in said
    assert "holds negative ids (section 15 has -1)" in said
    np.save(labels, np.abs(ids))
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 0 and "negative ids" not in result.stderr


def test_committed_schema_is_current():
    committed = (ROOT / "schemas" / "recipe.schema.json").read_text(encoding="utf-8")
    assert committed == recipe_schema_text(), "stale schema: run `emrun schema`"


def test_schema_to_standard_output(tmp_path, monkeypatch):
    """`--output -` wrote a file named '-'."""
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["schema", "--output", "-"])
    assert result.exit_code == 0 and result.stdout == recipe_schema_text()
    assert not (tmp_path / "-").exists()


def test_schema_accepts_shipped_recipes_and_rejects_unknown_keys(tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    out = tmp_path / "s.json"
    assert runner.invoke(app, ["schema", "--output", str(out)]).exit_code == 0
    schema = json.loads(out.read_text())
    assert runner.invoke(app, ["schema", "--output", str(out)]).exit_code == 0  # refreshed
    mine = tmp_path / "mine.json"
    mine.write_text('{"title": "my notes"}')
    kept = runner.invoke(app, ["schema", "--output", str(mine)])
    assert kept.exit_code == 2 and "not an emrun recipe schema" in kept.stderr
    assert mine.read_text() == '{"title": "my notes"}'
    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        if "extends" in data:  # a partial recipe: the schema judges what it resolves to
            printed = runner.invoke(app, ["validate", str(path), "--no-data", "--print"])
            assert printed.exit_code == 0, printed.output
            data = yaml.safe_load(printed.stdout)
        jsonschema.validate(data, schema)
    bad = yaml.safe_load((ROOT / "recipes" / "demo.yaml").read_text())
    bad["train"]["batch_sise"] = 2
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_recipes_lists_shipped_recipes():
    result = runner.invoke(app, ["recipes"])
    assert result.exit_code == 0
    for name in ("demo.yaml", "snemi3d_aff.yaml", "cremi_aff.yaml", "multitask.yaml",
                 "snemi3d_lsd.yaml"):
        assert name in result.output
    assert "Lee 2017" in result.output


def test_python_dash_m_runs_the_cli():
    done = subprocess.run([sys.executable, "-m", "emrun", "validate", "--no-data",
                           str(ROOT / "recipes" / "demo.yaml")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "recipe demo" in done.stdout


def test_nan_in_a_float_image_is_named_not_trained_on(write, tmp_path):
    """NaN survives the [0, 1] clip and made every loss NaN (steps skipped, no cause given):
    the first patch holding one stops with the source and what to do, exit 2."""
    image = np.random.default_rng(0).random((16, 64, 64)).astype(np.float32) * 200
    image[::2] = np.nan  # every other section: any patch meets one
    np.save(tmp_path / "nan.npy", image)
    z, y, x = np.indices(image.shape)
    np.save(tmp_path / "cells.npy", (z // 4 * 100 + y // 16 * 10 + x // 16 + 1).astype(np.uint32))
    text = MINIMAL.replace("a: {type: synthetic, shape: [16, 64, 64], seed: 1}",
                           f"a: {{image: {tmp_path}/nan.npy, labels: {tmp_path}/cells.npy, "
                           "intensity: {low: 0, high: 255}}")
    result = runner.invoke(app, ["validate", str(write(text))])
    assert result.exit_code == 2, result.output
    assert "nan.npy holds NaN or infinite values" in result.stderr
    image = np.random.default_rng(0).random((16, 64, 64)).astype(np.float32) * 200
    image[[3, 7, 11]] = np.nan  # between the sections validate reads; any patch meets one
    np.save(tmp_path / "nan.npy", image)
    assert runner.invoke(app, ["validate", str(write(text))]).exit_code == 0
    trained = runner.invoke(app, ["train", str(write(text)), "--run-dir",
                                  str(tmp_path / "run"), "-o", "train.workers=0"])
    assert trained.exit_code == 2, trained.output
    assert "nan.npy holds NaN or infinite values" in trained.stderr
    mask = np.ones(image.shape, np.uint8)
    mask[[3, 7, 11]] = 0  # where the NaN are: never trained on, so allowed
    np.save(tmp_path / "mask.npy", mask)
    masked = text.replace("intensity:", f"mask: {tmp_path}/mask.npy, intensity:")
    assert runner.invoke(app, ["validate", str(write(masked))]).exit_code == 0
    trained = runner.invoke(app, ["train", str(write(masked)), "--run-dir",
                                  str(tmp_path / "run2"), "-o", "train.workers=0"])
    assert trained.exit_code == 0, trained.output
    assert "not finite" not in trained.output


def test_a_source_without_labels_for_a_task_that_needs_them_is_the_users_to_fix(write,
                                                                                tmp_path):
    np.save(tmp_path / "image.npy", np.random.default_rng(0).integers(0, 255, (16, 64, 64),
                                                                      dtype=np.uint8))
    text = MINIMAL.replace("a: {type: synthetic, shape: [16, 64, 64], seed: 1}",
                           f"a: {{image: {tmp_path}/image.npy}}")
    trained = runner.invoke(app, ["train", str(write(text)), "--run-dir",
                                  str(tmp_path / "run"), "-o", "train.workers=0"])
    assert trained.exit_code == 2, trained.output  # was an internal error (exit 1)
    assert "data.sources.a: has no `labels`, which task 'affinity'" in trained.stderr
    assert not (tmp_path / "run").exists()  # refused before the run (was: at its first sample)


def test_schema_and_preview_outputs_that_are_not_files(tmp_path, write):
    """/dev/zero was read whole (7.8 GB in 4 s) to decide whether it was an old schema, a
    pipe never answered, and a path under a file ended as an internal error."""
    import os

    fifo, png_fifo = tmp_path / "pipe.json", tmp_path / "pipe.png"
    os.mkfifo(fifo)
    os.mkfifo(png_fifo)
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    special = "exists and is not a regular file (a device, pipe or socket)"
    for args, says in ((["schema", "--output", "/dev/zero"], f"/dev/zero: {special}"),
                       (["schema", "--output", str(fifo)], f"pipe.json: {special}"),
                       (["data", "preview", str(write(MINIMAL)), "--out", str(png_fifo)],
                        f"pipe.png: {special}"),
                       (["schema", "--output", str(notes / "s.json")],
                        f"{notes}: is a file, not a folder"),
                       (["data", "preview", str(write(MINIMAL)), "--n", "1", "--out",
                         str(notes / "deeper/p.png")], f"{notes}: is a file, not a folder")):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert says in result.stderr and len(result.stderr.splitlines()) == 1, result.stderr
    assert notes.read_text() == "mine"
    target = tmp_path / "real.json"
    (tmp_path / "link.json").symlink_to(target)  # written through, the link kept
    assert runner.invoke(app, ["schema", "--output", str(tmp_path / "link.json")]).exit_code == 0
    assert (tmp_path / "link.json").is_symlink() and json.loads(target.read_text())["title"]


def test_every_schema_property_is_described():
    schema = json.loads(recipe_schema_text())
    models = {"Recipe": schema, **schema["$defs"]}
    undescribed = [f"{name}.{prop}" for name, model in models.items()
                   for prop, spec in model.get("properties", {}).items()
                   if prop != "type" and not spec.get("description")]
    assert undescribed == []


def test_validate_reads_values_float_range_and_empty_masks(write, tmp_path):
    np.save(tmp_path / "image.npy", np.full((16, 64, 64), 3.0, np.float32))
    np.save(tmp_path / "mask.npy", np.zeros((16, 64, 64), np.uint8))
    np.save(tmp_path / "labels.npy", np.ones((16, 64, 64), np.uint32))
    text = MINIMAL.replace("a: {type: synthetic, shape: [16, 64, 64], seed: 1}",
                           f"a: {{image: {tmp_path}/image.npy, mask: {tmp_path}/mask.npy, "
                           f"labels: {tmp_path}/labels.npy}}")
    result = runner.invoke(app, ["validate", str(write(text))])
    assert result.exit_code == 2
    assert "outside [0, 1]; give `intensity: {low, high}`" in result.stderr
    assert "mask.npy selects no voxel anywhere" in result.stderr
    fixed = runner.invoke(app, ["validate", str(write(text)), "-o", "data.sources.a.mask=null",
                                "-o", "data.sources.a.intensity={low: 0, high: 4}"])
    assert fixed.exit_code == 0, fixed.output


def test_labels_with_nothing_labelled_are_refused_before_a_run_folder(write, tmp_path):
    """All-zero labels weighed by their labelled voxels (no `weight`): validate said ok,
    and train stopped as its loader was made, naming no file:line, with its run folder
    made; bench data too. Given a weight, the source is drawn all the same: a located
    warning says its samples teach nothing (it trained silently)."""
    np.save(tmp_path / "image.npy", np.full((16, 64, 64), 100, np.uint8))
    np.save(tmp_path / "labels.npy", np.zeros((16, 64, 64), np.uint32))
    text = MINIMAL.replace("a: {type: synthetic, shape: [16, 64, 64], seed: 1}",
                           f"a: {{image: {tmp_path}/image.npy, labels: {tmp_path}/labels.npy}}")
    recipe = write(text)
    said = "data.sources.a.labels: no labelled voxel to sample from (labels 0 everywhere"
    for args in (["validate", str(recipe)],
                 ["train", str(recipe), "--run-dir", str(tmp_path / "run"), "--device", "cpu"],
                 ["bench", "data", str(recipe), "--samples", "1"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert re.search(rf"recipe\.yaml:\d+:\d+: {re.escape(said)}", result.stderr), \
            result.stderr
    assert not (tmp_path / "run").exists()
    weighed = runner.invoke(app, ["validate", str(recipe), "-o", "data.sources.a.weight=1"])
    assert weighed.exit_code == 0, weighed.output
    assert re.search(r"recipe\.yaml:\d+:\d+: data\.sources\.a\.labels: no labelled voxel "
                     r"\(labels 0 everywhere, or inside no mask\), yet weight 1 draws the "
                     r"source", " ".join(runner.invoke(app, ["validate", str(write(text.replace(
                         "labels.npy}", "labels.npy, weight: 1}")))]).stderr.split()))
    np.save(tmp_path / "labels.npy", np.pad(np.zeros((1, 64, 64), np.uint32), ((0, 15), (0, 0),
                                            (0, 0)), constant_values=3))
    labelled = runner.invoke(app, ["validate", str(recipe), "-o", "data.sources.a.weight=1"])
    assert labelled.exit_code == 0 and "draws the source" not in labelled.stderr


def test_a_float_mask_with_nan_outside_is_taken_as_masks_are_everywhere(write, tmp_path):
    """Masks let in non-zero, not-NaN voxels (io.masks), as the README says; a float mask
    on a training source was refused as not holding "integer ids"."""
    np.save(tmp_path / "image.npy", np.full((16, 64, 64), 100, np.uint8))
    np.save(tmp_path / "labels.npy", np.ones((16, 64, 64), np.uint32))
    mask = np.ones((16, 64, 64), np.float32)
    mask[:, :20] = np.nan
    np.save(tmp_path / "mask.npy", mask)
    np.save(tmp_path / "odd.npy", mask.astype(np.complex64))
    text = MINIMAL.replace("a: {type: synthetic, shape: [16, 64, 64], seed: 1}",
                           f"a: {{image: {tmp_path}/image.npy, labels: {tmp_path}/labels.npy, "
                           f"mask: {tmp_path}/mask.npy}}")
    result = runner.invoke(app, ["validate", str(write(text))])
    assert result.exit_code == 0, result.output
    odd = runner.invoke(app, ["validate", str(write(text.replace("mask.npy", "odd.npy")))])
    assert odd.exit_code == 2
    assert "odd.npy has dtype complex64; a mask must be boolean, integer or float" in \
        " ".join(odd.stderr.split())


def test_labels_with_an_extra_axis_are_said_to_need_three(write, tmp_path):
    """(2, z, y, x) labels were told a volume of a part of the image needs metadata placing
    it: the extra axis is what is wrong."""
    np.save(tmp_path / "image.npy", np.full((16, 64, 64), 100, np.uint8))
    np.save(tmp_path / "labels.npy", np.ones((2, 16, 64, 64), np.uint32))
    text = MINIMAL.replace("a: {type: synthetic, shape: [16, 64, 64], seed: 1}",
                           f"a: {{image: {tmp_path}/image.npy, labels: {tmp_path}/labels.npy}}")
    result = runner.invoke(app, ["validate", str(write(text))])
    assert result.exit_code == 2
    assert "labels.npy has shape [2, 16, 64, 64]: labels must be 3D (z, y, x), as the image " \
           "is" in " ".join(result.stderr.split())
    assert "placing it" not in result.stderr


def convert_doing(action, tmp_path, monkeypatch):
    """`emrun data convert` as the user runs it, with ``action()`` in place of the
    conversion."""
    import emrun.io.convert

    monkeypatch.setattr(emrun.io.convert, "convert", lambda *args, **kwargs: action())
    np.save(tmp_path / "img.npy", np.zeros((4, 16, 16), np.uint8))
    return runner.invoke(app, ["data", "convert", str(tmp_path / "img.npy"),
                               str(tmp_path / "o.zarr")])


def convert_raising(error: BaseException, tmp_path, monkeypatch):
    """`emrun data convert` as the user runs it, with the conversion raising ``error``."""

    def fails():
        raise error

    return convert_doing(fails, tmp_path, monkeypatch)


@pytest.mark.parametrize("error", [
    MemoryError("Unable to allocate 7.45 GiB for an array with shape (1000, 1000, 1000)"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't "
                 "allocate memory: you tried to allocate 8000000000 bytes."),
])
def test_the_host_running_out_of_memory_is_the_user_s_to_fix(tmp_path, monkeypatch, error):
    """Only a GPU's out-of-memory was exit 2; the host's was 'a bug in emrun' (exit 1)."""
    result = convert_raising(error, tmp_path, monkeypatch)
    assert result.exit_code == 2
    assert result.stderr.startswith("error: this machine ran out of memory (")
    assert "lower train.batch_size" in result.stderr and len(result.stderr.splitlines()) == 1


def test_ctrl_c_in_a_command_is_one_line_and_exit_130(tmp_path, monkeypatch):
    """Commands without their own signal handling ended silently with 130 (typer turned the
    KeyboardInterrupt into an exit code), and zarr's cut-short IO tasks logged noise."""
    result = convert_raising(KeyboardInterrupt(), tmp_path, monkeypatch)
    assert result.exit_code == 130
    assert result.stderr == ("stopped by SIGINT (Ctrl-C): nothing half-written stands under a "
                             "final name; run the command again (with --resume where it has "
                             "one)\n")


def test_sigterm_in_a_command_without_its_own_stop_is_one_line_and_exit_143(tmp_path,
                                                                              monkeypatch):
    """SIGTERM ended `data convert` (and every command without a stop of its own) on the
    spot: no line, no clean-up. It is now taken as Ctrl-C is, and SIGTERM's handler is the
    default again after the command."""
    def terminated():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises in this thread at once
        raise AssertionError("SIGTERM was not taken")

    result = convert_doing(terminated, tmp_path, monkeypatch)
    assert result.exit_code == 143, result.output
    assert result.stderr == ("stopped by SIGTERM: nothing half-written stands under a final "
                             "name; run the command again (with --resume where it has one)\n")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_forked_helper_of_a_command_still_dies_of_sigterm(tmp_path, monkeypatch):
    """A helper forked inside a command inherits its SIGTERM handler: it must die of the
    signal as it did (pool.terminate() sends it), not raise the command's stop in the copy."""
    def forks():
        ready, told = os.pipe()
        child = os.fork()
        if child == 0:  # (a signal before Python's after-fork set-up is dropped by Python)
            os.write(told, b"x")
            time.sleep(30)
            os._exit(0)
        os.read(ready, 1)
        os.close(ready), os.close(told)
        os.kill(child, signal.SIGTERM)
        _, status = os.waitpid(child, 0)
        (tmp_path / "status").write_text(str(os.waitstatus_to_exitcode(status)))
        raise UserError("the helper ended")

    result = convert_doing(forks, tmp_path, monkeypatch)
    assert result.exit_code == 2, result.output
    assert (tmp_path / "status").read_text() == str(-signal.SIGTERM)


def test_a_segmentation_given_as_the_image_is_refused(write, tmp_path):
    """uint8 ids in an OME label image passed every check and trained on ids as
    intensities; the metadata says what the volume is."""
    ids = np.random.default_rng(0).integers(0, 9, (16, 64, 64), np.uint8)
    write_volume(tmp_path / "v.zarr", "image", ids * 20)
    write_volume(tmp_path / "v.zarr", "seg", ids, label=True)
    text = MINIMAL.replace("a: {type: synthetic, shape: [16, 64, 64], seed: 1}",
                           f"a: {{image: {tmp_path}/v.zarr/seg, labels: {tmp_path}/v.zarr/seg}}")
    result = runner.invoke(app, ["validate", str(write(text))])
    assert result.exit_code == 2
    assert "data.sources.a.image:" in result.stderr
    assert "is a segmentation (its OME-Zarr metadata marks it image-label)" in result.stderr
    fixed = runner.invoke(app, ["validate", str(write(text)), "-o",
                                f"data.sources.a.image={tmp_path}/v.zarr/image"])
    assert fixed.exit_code == 0, fixed.output


def test_validate_refuses_sources_too_small_for_the_augmented_read(write):
    text = MINIMAL + "augment: [{type: warp, rot_max: 45}]\n"
    result = runner.invoke(app, ["validate", str(write(text))])
    assert result.exit_code == 2
    assert "data.sources.a.shape: the augmentations may read crops up to" in result.stderr
    assert runner.invoke(app, ["validate", str(write(text)), "-o",
                               "data.sources.a.shape=[16, 96, 96]"]).exit_code == 0


def test_a_warm_up_longer_than_the_run_is_a_located_warning(write):
    text = MINIMAL.replace("iterations: 10", "iterations: 10\n  schedule: {type: cosine, "
                                             "warmup: 50}")
    result = runner.invoke(app, ["validate", str(write(text)), "--no-data"])
    assert result.exit_code == 0, result.output
    [line] = [x for x in result.stderr.splitlines() if x.startswith("warning:")]
    assert "train.schedule.warmup" in line and "lasts the whole run" in line
    assert ".yaml:" in line  # located
    fine = runner.invoke(app, ["validate", str(write(MINIMAL)), "--no-data"])
    assert "warning" not in fine.stderr


def test_sources_of_different_intensity_scales_are_a_located_warning(write):
    """Training scales each source by its own `intensity`, inference every input by the
    first one: a second source of another scale trained well and predicted badly, unsaid."""
    text = MINIMAL.replace("a: {type: synthetic, shape: [16, 64, 64], seed: 1}",
                           "a: {image: a.npy, labels: l.npy, intensity: {low: 0, high: 255}}\n"
                           "    b: {image: b.npy, labels: l.npy, intensity: {low: 0, "
                           "high: 4095}}")
    result = runner.invoke(app, ["validate", str(write(text)), "--no-data"])
    assert result.exit_code == 0, result.output
    [line] = [x for x in result.stderr.splitlines() if x.startswith("warning:")]
    assert "data.sources.a.intensity" in line and "b [0, 4095]" in line and ".yaml:" in line
    same = text.replace("high: 4095", "high: 255")
    assert "warning" not in runner.invoke(app, ["validate", str(write(same)),
                                                "--no-data"]).stderr


def test_usage_mistakes_are_one_line_and_exit_2():
    """Click's four-line usage errors become one `error:` line, the hint kept."""
    for args, says in ((["infer", "--bogus"], "No such option: --bogus"),
                       (["segmnt"], "Did you mean 'segment'?"),
                       (["validate"], "Missing argument")):
        done = subprocess.run([sys.executable, "-m", "emrun", *args], capture_output=True,
                              text=True)
        assert done.returncode == 2, (args, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0]
        assert "--help" in lines[0] and done.stdout == ""
    bare = subprocess.run([sys.executable, "-m", "emrun"], capture_output=True, text=True)
    assert bare.returncode == 0 and "Usage:" in bare.stdout and "--install-completion" in \
        bare.stdout


def test_user_text_is_printed_as_given_never_as_markup_or_emoji(write, tmp_path):
    """Rich would eat `[red]` and turn `:x:` into an emoji in paths the user chose."""
    odd = tmp_path / "a:x:[red]b"
    odd.mkdir()
    refused = runner.invoke(app, ["schema", "--output", str(odd)])
    assert refused.exit_code == 2
    assert refused.stderr == f"error: {odd} is a directory; give a file path\n"
    target = tmp_path / "s[red]:x:.json"
    wrote = runner.invoke(app, ["schema", "--output", str(target)])
    assert wrote.exit_code == 0 and f"wrote {target}" in wrote.stdout
    recipe = write(MINIMAL.replace("name: tiny", "name: tiny\ndescription: 'a [/bold] b'"),
                   name="r[bold]:x:.yaml")  # '[/bold]' alone raised rich's MarkupError
    checked = runner.invoke(app, ["validate", str(recipe), "--no-data"])
    assert checked.exit_code == 0, checked.output
    assert f"ok {recipe}: recipe tiny — a [/bold] b" in checked.stdout


def test_resuming_past_a_lowered_target_says_nothing_was_trained(write, tmp_path):
    """`train --resume -o train.iterations=2` on a run at 3 said only 'done: 3 iterations'."""
    run = tmp_path / "run"
    args = ["train", str(write(MINIMAL)), "--run-dir", str(run), "-o", "train.workers=0",
            "--device", "cpu"]
    assert runner.invoke(app, [*args, "-o", "train.iterations=3"]).exit_code == 0
    again = runner.invoke(app, [*args, "--resume", "-o", "train.iterations=2"])
    assert again.exit_code == 0, again.output
    assert "done: 3 iterations" in again.stdout
    assert ("warning: the run was already at iteration 3, past train.iterations 2: nothing "
            "was trained") in again.stderr
