"""A newcomer walks the README: what the commands print and their `--help` say the same
thing the same way across commands (one metavar per shared option, sizes as `20 x 256 x 256`,
counts in English, the README's words for a view layer)."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest
from conftest import MINIMAL
from typer.testing import CliRunner

from emrun.cli import app
from emrun.io import write_volume

runner = CliRunner()

SHARED = {  # option: the metavar every command that takes it shows
    "--mask": "MASK", "--launch": "CMD", "--workers": "N", "--threshold": "T",
}
COMMANDS = [["infer"], ["segment"], ["evaluate"], ["bench", "segment"], ["bench", "data"]]


def _metavars(command: list[str]) -> dict[str, str]:
    """Each shared option's metavar as `emrun COMMAND --help` shows it."""
    result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    found = {}
    for option in SHARED:
        if (match := re.search(rf"^\s+{option} (\S+)", result.stdout, flags=re.M)):
            found[option] = match.group(1)
    return found


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_a_shared_option_has_one_metavar_in_every_help(command):
    """`infer --mask <str>` beside `evaluate --mask MASK`, `segment --launch CMD` beside
    `infer --launch <str>`, `bench segment --workers <list[int]>`: one name per thing."""
    shown = _metavars(command)
    assert shown, "no shared option found in the help"
    assert shown == {option: SHARED[option] for option in shown}


def _bench_model_result(**facts: Any) -> dict[str, Any]:
    return {"recipe": "tiny", "device": "cpu", "model": "rsunet", "params": 1234,
            "flops_per_voxel": 5e4, "receptive_field": [41, 96, 96], "patch": [8, 32, 32],
            "batch_size": 2, "summary": "widths [4, 8]", "configs": [], **facts}


def test_bench_model_prints_sizes_as_validate_does(write, monkeypatch):
    """`bench model` printed "receptive field [41, 96, 96], patch [8, 32, 32] x batch 2"
    where `validate` says "receptive field 41 x 96 x 96" and "patch 8 x 32 x 32"."""
    import emrun.bench.model

    monkeypatch.setattr(emrun.bench.model, "bench_model",
                        lambda recipe, **_: _bench_model_result())
    result = runner.invoke(app, ["bench", "model", str(write(MINIMAL))])
    assert result.exit_code == 0, result.output
    assert "receptive field 41 x 96 x 96, patch 8 x 32 x 32, batch 2" in result.stdout
    monkeypatch.setattr(emrun.bench.model, "bench_model",
                        lambda recipe, **_: _bench_model_result(receptive_field=None))
    unknown = runner.invoke(app, ["bench", "model", str(write(MINIMAL))])
    assert "receptive field unknown," in unknown.stdout


def _bench_data_result() -> dict[str, Any]:
    return {"recipe": "tiny", "patch": [8, 32, 32], "samples_per_s": 10.0,
            "ms_per_sample": 100.0, "median_ms_per_sample_one_core": 90.0, "read_ms": 1.0,
            "targets_ms": 2.0, "per_target_ms": {}, "per_augmentation_ms": {}}


@pytest.mark.parametrize("workers, said", [("0", "in-process"), ("1", "1 worker,"),
                                           ("2", "2 workers,")])
def test_bench_data_says_its_loader_in_english(write, monkeypatch, workers, said):
    """`bench data --workers 0` printed "patch [20, 256, 256], 0 workers"; 1 was "1 workers"."""
    import emrun.bench.data

    monkeypatch.setattr(emrun.bench.data, "bench_data", lambda *_, **__: _bench_data_result())
    result = runner.invoke(app, ["bench", "data", str(write(MINIMAL)), "--workers", workers])
    assert result.exit_code == 0, result.output
    assert f"tiny: patch 8 x 32 x 32, {said}" in result.stdout


def test_validate_counts_one_augmentation_as_one(write):
    """The summary's last line ended "; 1 augmentations"."""
    result = runner.invoke(app, ["validate", str(write(MINIMAL)), "--no-data",
                                 "-o", "augment=[{type: flip_rotate}]"])
    assert result.exit_code == 0, result.output
    assert result.stdout.rstrip().endswith("; 1 augmentation")


def test_preview_title_of_one_sample(write):
    """The preview's title read "the first 1 augmented samples" and gave the patch as a
    Python list."""
    from emrun.preview import _title
    from emrun.recipe import load_recipe

    title = _title(load_recipe(write(MINIMAL)).recipe, 1)
    assert "the first augmented sample training sees" in title
    assert "patch 8 x 32 x 32" in title


def test_segment_counts_one_segment_as_one(tmp_path):
    """`segment --method cc --threshold 0.3` that joins everything said "1 segments"."""
    affs = np.full((3, 4, 8, 8), 255, np.uint8)
    write_volume(tmp_path / "pred.zarr", "affinity", affs, channel_axis=True, levels=1,
                 attrs={"offsets": [[-1, 0, 0], [0, -1, 0], [0, 0, -1]]})
    result = runner.invoke(app, ["segment", str(tmp_path / "pred.zarr" / "affinity"),
                                 str(tmp_path / "seg.zarr"), "--method", "cc", "--threshold",
                                 "0.3", "--levels", "1"])
    assert result.exit_code == 0, result.output
    assert "segmentation: 1 segment (cc threshold 0.3" in result.stdout


def test_view_names_an_affinity_layer_as_the_readme_does(tmp_path, monkeypatch):
    """`emrun view pred.zarr/affinity` said "affinity: channels layer" (the code's word) where
    the README and the help promise an RGB layer of the first three channels."""
    import contextlib

    from emrun import subprocesses

    @contextlib.contextmanager
    def stopped_at_once(call, **_):  # type: ignore[no-untyped-def]
        call("SIGINT")  # Ctrl-C as soon as the link is printed
        yield ["SIGINT"]

    affs = np.zeros((3, 4, 8, 8), np.uint8)
    write_volume(tmp_path / "pred.zarr", "affinity", affs, channel_axis=True, levels=1,
                 attrs={"offsets": [[-1, 0, 0], [0, -1, 0], [0, 0, -1]]})
    monkeypatch.setattr(subprocesses, "catching_signals", stopped_at_once)
    result = runner.invoke(app, ["view", str(tmp_path / "pred.zarr" / "affinity"),
                                 "--client", "https://neuroglancer.example.org/", "--json"])
    assert result.exit_code == 0, result.output
    assert "affinity: RGB (the first three channels) layer from" in result.stderr


@pytest.mark.parametrize("command, said", [
    (["view"], "OME-Zarr or N5 volumes"),
    (["data", "convert"], "streamed in slabs of whole chunks"),
])
def test_help_says_what_the_readme_says(command, said):
    """`view --help` said "OME-Zarr volumes" while it serves N5 too (README: "OME-Zarr and N5
    volumes"); `data convert --help` said "streamed section by section" where it streams
    slabs of a chunk's depth (README: "streamed in slabs", 16 sections)."""
    result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "300"})
    assert said in " ".join(result.stdout.split())


def test_a_device_typo_names_what_emrun_takes():
    """`--device gpu` printed torch's list of twenty device kinds (ipu, opengl, mps ...), most
    of which emrun then refuses."""
    from emrun.devices import parse_device
    from emrun.errors import UserError

    with pytest.raises(UserError) as caught:
        parse_device("gpu")
    assert "opengl" not in str(caught.value) and "cuda:N" in str(caught.value)


def test_gpus_without_a_gpu_is_refused_unless_the_cpu_is_asked_for(monkeypatch):
    """`train --gpus 2` without a visible GPU and without --device trained two CPU ranks
    without a word, where the README says each process trains on its own GPU."""
    import torch

    from emrun.errors import UserError
    from emrun.train.trainer import check_rank_devices

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    check_rank_devices("cpu", 2)  # asked for: the CPU ranks the tests run
    with pytest.raises(UserError, match="--device cpu"):
        check_rank_devices(None, 2)


@pytest.mark.parametrize("command", [["validate"], ["train"], ["segment"], ["export"],
                                     ["data", "convert"], ["data", "synth"],
                                     ["bench", "codecs"], ["evaluate"], ["view"]],
                         ids=" ".join)
def test_usage_names_arguments_in_capitals_as_the_readme_does(command):
    """`segment [OPTIONS] {affs} {output}` beside `evaluate [OPTIONS] {SEG} {TRUTH}`; the
    README writes RECIPE, AFFS OUT.zarr, VOLUME, PATH...: arguments in capitals everywhere."""
    result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
    usage = result.stdout.splitlines()[0]
    arguments = usage.split("[OPTIONS]", 1)[1]
    assert re.search(r"[A-Z]", arguments) and not re.search(r"[a-z]", arguments), usage


def test_infer_counts_one_block_as_one(tmp_path, monkeypatch):
    """A volume of one block closed with "wrote pred.zarr: 1 blocks predicted"."""
    from types import SimpleNamespace

    import emrun.infer.cautions
    import emrun.infer.checkpoint_recipe
    import emrun.infer.run

    progress = SimpleNamespace(done=1, empty=0, skipped=0, voxels=1000, seconds=1.0,
                               nonfinite_warning=lambda: None)
    monkeypatch.setattr(emrun.infer.checkpoint_recipe, "recipe_for",
                        lambda *_: SimpleNamespace(recipe=None))
    monkeypatch.setattr(emrun.infer.run, "inference_cautions", lambda _: [])
    monkeypatch.setattr(emrun.infer.cautions, "input_cautions", lambda *_: [])
    monkeypatch.setattr(emrun.infer.run, "run_inference", lambda *_, **__: progress)
    checkpoint = tmp_path / "last.pt"
    checkpoint.write_bytes(b"not read here")
    result = runner.invoke(app, ["infer", "--checkpoint", str(checkpoint), "--input",
                                 "vol.zarr/image", "--output", str(tmp_path / "pred.zarr")])
    assert result.exit_code == 0, result.output
    assert "pred.zarr: 1 block predicted, 0 already done" in result.stdout


def _commands(group: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command path of the typer app (``("bench", "data")``, ...)."""
    found: list[tuple[str, ...]] = []
    for name, command in group.commands.items():
        if hasattr(command, "commands"):  # a group (typer keeps its own copy of click)
            found += _commands(command, (*prefix, name))
        else:
            found.append((*prefix, name))
    return found


def test_no_option_shows_typers_type_placeholder():
    """`--samples <int range>`, `--folder <path>`, `train --gpus <int range>` (whose help
    says N): typer's placeholders beside the README's N, DIR, NAME. Every option taking a
    value names it as the README does."""
    import typer

    root = typer.main.get_command(app)
    leaks = []
    for path in _commands(root):
        result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "300"})
        leaks += [f"{' '.join(path)}: {m}" for m in re.findall(r"--[a-z-]+ <[^>]+>",
                                                                  result.stdout)]
    assert len(_commands(root)) >= 19 and leaks == []
