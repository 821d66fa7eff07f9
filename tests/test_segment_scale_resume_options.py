"""`emrun segment --scheduler` outside its block steps and on a resume: a SIGTERM or SIGINT
between steps, during the agglomeration in the main process or its pyramids stops with one
line and exit 143 / 130, and --resume then gives the uninterrupted labels; an explicit
default (--name segmentation, --agglomeration global) on a resume is a value like any other;
a job's --fragments is taken on a resume without it; the fragments get the pyramid levels
the segmentations get."""

from __future__ import annotations

import os
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import test_workflows_scale_probe as probe
import zarr
from test_workflows_scale_probe import segment_scaled
from typer.testing import CliRunner

from emrun.cli import app
from emrun.io import VolumeError, open_volume

cells_store = probe.cells_store  # a fixture: noisy affinities of 12 cells, 8 blocks
runner = CliRunner()
THRESHOLDS = ("--threshold", "0.2,0.5")
VOLUMES = ("fragments", "segmentation_0.2", "segmentation_0.5")

PAUSE = """\
import os, pathlib, time
if os.environ.get("EMRUN_TEST_PAUSE"):
    import importlib
    _where, _attr = os.environ["EMRUN_TEST_PAUSE"].rsplit(":", 1)
    _module = importlib.import_module(_where)
    _real = getattr(_module, _attr)
    _folder = pathlib.Path(os.environ["EMRUN_TEST_PAUSE_DIR"])

    def _paused(*args, **kwargs):
        (_folder / "entered").touch()  # the test signals now, then says so
        deadline = time.monotonic() + 30
        while not (_folder / "sent").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        return _real(*args, **kwargs)

    setattr(_module, _attr, _paused)
"""


def _paused_at(tmp: Path, target: str) -> dict[str, str]:
    """An environment whose Python processes wait at ``target`` (module:function) until the
    test has sent its signal (a sitecustomize module on their PYTHONPATH)."""
    folder = tmp / "pause"
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(textwrap.dedent(PAUSE))
    path = os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "EMRUN_TEST_PAUSE": target,
            "EMRUN_TEST_PAUSE_DIR": str(folder)}


def _signalled_at(command: list[str], env: dict[str, str], number: int) -> tuple[int, str]:
    """Run ``command``; send it ``number`` once it waits at its pause; its exit code and
    standard error."""
    folder = Path(env["EMRUN_TEST_PAUSE_DIR"])
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None and \
            not (folder / "entered").exists():
        time.sleep(0.01)
    assert process.poll() is None, process.communicate()[1]
    process.send_signal(number)
    time.sleep(0.05)  # handled before the pause ends (a handler runs between bytecodes)
    (folder / "sent").touch()
    _, stderr = process.communicate(timeout=60)
    return process.returncode, stderr


def _cli(store: Path, out: Path, *extra: str) -> object:
    """The same job in this process (one worker, so no worker processes start)."""
    return runner.invoke(app, _cli_args(store, out, *extra))


def _cli_args(store: Path, out: Path, *extra: str) -> list[str]:
    command = segment_scaled(store / "in.zarr/affinity", out, *extra, workers=1)
    return command[command.index("segment"):]


def level(out: Path, name: str, index: int = 0) -> np.ndarray:
    return zarr.open_array(str(out / "labels" / name / str(index)), mode="r")[...]


@pytest.fixture(scope="module")
def straight(cells_store) -> Path:
    """The uninterrupted job at thresholds 0.2 and 0.5."""
    out = cells_store / "straight-resume-options.zarr"
    result = _cli(cells_store, out, *THRESHOLDS)
    assert result.exit_code == 0, result.output
    return out


def _resumed_equals_straight(store: Path, out: Path, straight: Path) -> None:
    result = _cli(store, out, *THRESHOLDS, "--resume")
    assert result.exit_code == 0, result.output
    for name in VOLUMES:
        assert np.array_equal(level(out, name), level(straight, name)), name
        assert open_volume(str(out / name)).shape == probe.SHAPE  # finished


# ------------------------------------------------------------ signals outside the steps

def test_sigterm_during_the_global_agglomeration_stops_at_once(cells_store, straight,
                                                               tmp_path):
    """It ended the command on the spot: exit -15, not a word. Now: one line saying what is
    kept, exit 143, no table (written only whole) left, and --resume finishes the job."""
    out = tmp_path / "agglomerating.zarr"
    command = segment_scaled(cells_store / "in.zarr/affinity", out, *THRESHOLDS, workers=1)
    code, stderr = _signalled_at(
        command, _paused_at(tmp_path, "emrun.segment.scale.steps:agglomerate"),
        signal.SIGTERM)
    assert code == 143, stderr
    assert "Traceback" not in stderr
    assert "stopped by SIGTERM: the agglomeration was cut short" in stderr, stderr
    assert "run the same command with --resume" in stderr
    assert not list((out / ".emrun-segment" / "lut").glob("*")), "a table was written"
    with pytest.raises(VolumeError, match="is unfinished"):
        open_volume(str(out / "segmentation_0.5"))
    _resumed_equals_straight(cells_store, out, straight)


def test_sigint_between_steps_stops_there_with_the_step_done(cells_store, straight,
                                                            tmp_path):
    """SIGINT while the main process finishes the fragments, between the fragments and the
    graph steps: they are finished (never cut mid-write), the command stops before the
    graph step, exit 130 (it was a KeyboardInterrupt there, anywhere, 'run the command
    again')."""
    out = tmp_path / "between.zarr"
    command = segment_scaled(cells_store / "in.zarr/affinity", out, *THRESHOLDS, workers=1)
    code, stderr = _signalled_at(
        command, _paused_at(tmp_path, "emrun.segment.scale.command:mark_finished"),
        signal.SIGINT)
    assert code == 130, stderr
    assert "Traceback" not in stderr
    assert "stopped by SIGINT: the job stopped after the fragments step" in stderr, stderr
    assert "--resume" in stderr
    assert open_volume(str(out / "fragments")).shape == probe.SHAPE  # finished
    assert "graph:" not in stderr  # the graph step never started
    _resumed_equals_straight(cells_store, out, straight)


def test_sigterm_while_finishing_the_segmentations_stops_between_them(cells_store, straight,
                                                                      tmp_path):
    """SIGTERM while the first segmentation's pyramid is built: that one is finished, the
    second left unfinished (to be finished by --resume), exit 143."""
    out = tmp_path / "finishing.zarr"
    command = segment_scaled(cells_store / "in.zarr/affinity", out, *THRESHOLDS, workers=1)
    code, stderr = _signalled_at(
        command, _paused_at(tmp_path, "emrun.segment.scale.command:_finish"), signal.SIGTERM)
    assert code == 143, stderr
    assert "Traceback" not in stderr
    assert "stopped by SIGTERM: the job stopped after finishing segmentation_0.2 (1 of 2" \
        in stderr, stderr
    assert open_volume(str(out / "segmentation_0.2")).shape == probe.SHAPE
    with pytest.raises(VolumeError, match="is unfinished"):
        open_volume(str(out / "segmentation_0.5"))
    _resumed_equals_straight(cells_store, out, straight)


def test_main_stops_wait_for_a_check_or_cut_short_and_give_the_handlers_back():
    """A signal is noted until `check` (where all written is whole), or stops `cut_short`
    work at once; the handlers before are back afterwards."""
    from emrun.errors import Interrupted
    from emrun.segment.scale.schedulers import main_stops

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with main_stops() as stops:
        stops.check("nothing")  # no signal: goes on
        signal.raise_signal(signal.SIGINT)  # noted, not raised here
        with pytest.raises(Interrupted, match="stopped after the graph step") as stopped:
            stops.check("the graph step")
    assert stopped.value.exit_code == 130
    with main_stops() as stops, pytest.raises(Interrupted, match="cut short; kept") as cut, \
            stops.cut_short("cut short; kept"):
        signal.raise_signal(signal.SIGTERM)
        pytest.fail("went on after the signal")
    assert cut.value.exit_code == 143
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


# ------------------------------------------------------------ given options on a resume

def test_an_explicit_default_name_on_a_resume_asks_for_that_volume(cells_store, tmp_path):
    """`--resume --name segmentation` after a job named 'first' was a plain resume (the name
    equals the default): it made nothing. It asks for a volume named segmentation (at
    waterz's default threshold, as any resume naming a volume)."""
    out = tmp_path / "named.zarr"
    result = _cli(cells_store, out, "--threshold", "0.2", "--name", "first")
    assert result.exit_code == 0, result.output
    first = level(out, "first")
    result = _cli(cells_store, out, "--resume", "--name", "segmentation")
    assert result.exit_code == 0, result.output
    assert "fragments: 0 of 8 blocks to do" in result.output
    assert open_volume(str(out / "segmentation")).shape == probe.SHAPE
    made = zarr.open_group(str(out / "labels" / "segmentation")).attrs["emrun"]["segment"]
    assert made["threshold"] == 0.5  # waterz's default, not the job's 0.2
    assert np.array_equal(level(out, "first"), first)


def test_an_explicit_default_agglomeration_on_a_resume_is_not_the_jobs(cells_store,
                                                                       tmp_path):
    """A blockwise job resumed with an explicit `--agglomeration global`: the same volume
    made another way is refused (it was taken as not given: the blockwise job resumed)."""
    out = tmp_path / "blockwise.zarr"
    result = _cli(cells_store, out, "--threshold", "0.5", "--agglomeration", "blockwise")
    assert result.exit_code == 0, result.output
    result = _cli(cells_store, out, "--resume")  # plain: the job's agglomeration
    assert result.exit_code == 0, result.output
    result = _cli(cells_store, out, "--resume", "--agglomeration", "global")
    assert result.exit_code == 2, result.output
    assert "already exists, made with agglomeration blockwise (this run: global)" in \
        " ".join(result.output.split())


def test_a_resume_without_fragments_takes_the_jobs(cells_store, tmp_path):
    """A job started with --fragments mws was refused on a plain --resume ('made with another
    fragments'): the default watershed was taken as given."""
    out = tmp_path / "mws.zarr"
    result = _cli(cells_store, out, "--threshold", "0.5", "--fragments", "mws")
    assert result.exit_code == 0, result.output
    result = _cli(cells_store, out, "--resume")
    assert result.exit_code == 0, result.output
    assert "graph: 0 of 8 blocks to do" in result.output
    result = _cli(cells_store, out, "--resume", "--fragments", "watershed")
    assert result.exit_code == 2, result.output
    assert "made with another fragments" in result.output


def test_the_non_scale_path_keeps_its_defaults(cells_store, tmp_path):
    """Without --scheduler nothing changes: the volume is named segmentation; an explicit
    --fragments watershed (the default), ignored there, is refused (it was accepted without
    a word)."""
    out = tmp_path / "cc.zarr"
    command = ["segment", str(cells_store / "in.zarr/affinity"), str(out), "--method", "cc",
               "--threshold", "0.5", "--levels", "1"]
    result = runner.invoke(app, [*command, "--fragments", "watershed"])
    assert result.exit_code == 2, result.output
    assert "--fragments: only with --scheduler local or daisy" in result.output
    result = runner.invoke(app, command)
    assert result.exit_code == 0, result.output
    assert open_volume(str(out / "segmentation")).shape == probe.SHAPE


# ------------------------------------------------------------ the fragments' pyramid

def test_fragments_get_the_segmentations_levels(cells_store, tmp_path):
    """`--levels 2`: the fragments had level 0 only; now a level 1 as the segmentations',
    downsampled as labels (every value one of level 0's, no blend of two ids)."""
    out = tmp_path / "levels.zarr"
    result = _cli(cells_store, out, "--threshold", "0.5", "--levels", "2")
    assert result.exit_code == 0, result.output
    fragments, coarse = level(out, "fragments"), level(out, "fragments", 1)
    assert coarse.shape == level(out, "segmentation", 1).shape != fragments.shape
    assert set(np.unique(coarse)) <= set(np.unique(fragments))
    assert np.array_equal(coarse, probe.downsample(fragments, _factor(out), labels=True))
    datasets = zarr.open_group(str(out / "labels" / "fragments")).attrs["ome"][
        "multiscales"][0]["datasets"]
    assert [d["path"] for d in datasets] == ["0", "1"]


def _factor(out: Path) -> tuple[int, ...]:
    """Level 1's downsampling factor, per axis, from the shapes."""
    fine, coarse = level(out, "fragments").shape, level(out, "fragments", 1).shape
    return tuple(-(-f // c) for f, c in zip(fine, coarse, strict=True))


def test_a_fragments_pyramid_cut_short_is_built_by_the_resume(cells_store, tmp_path,
                                                              monkeypatch):
    """A run that died building the fragments' pyramid left them unfinished: --resume
    builds it and finishes them."""
    from emrun.segment.scale import command

    out = tmp_path / "cut.zarr"

    def dying(*args: object, **kwargs: object) -> int:
        raise MemoryError("killed while building the pyramid")

    with monkeypatch.context() as patched:
        patched.setattr(command, "build_pyramid", dying)
        result = _cli(cells_store, out, "--threshold", "0.5", "--levels", "2")
    assert result.exit_code != 0
    with pytest.raises(VolumeError, match="is unfinished"):
        open_volume(str(out / "fragments"))
    result = _cli(cells_store, out, "--threshold", "0.5", "--levels", "2", "--resume")
    assert result.exit_code == 0, result.output
    assert "fragments: 0 of 8 blocks to do" in result.output
    assert open_volume(str(out / "fragments")).shape == probe.SHAPE
    assert level(out, "fragments", 1).shape == level(out, "segmentation", 1).shape


def test_a_resume_that_would_change_a_finished_volume_says_what_differs(cells_store, straight,
                                                                       tmp_path):
    """--resume --levels 2 on a finished job exited 0 with no level built (and recorded 2
    levels in the job); a resume with another --agglomeration or --min-size was refused
    as made with 'another threshold or method'."""
    import shutil

    out = tmp_path / "copy.zarr"
    shutil.copytree(straight, out)
    job = (out / ".emrun-segment" / "job.json").read_text()
    levels = _cli(cells_store, out, *THRESHOLDS, "--resume", "--levels", "2")
    assert levels.exit_code == 2
    assert "labels/fragments: finished with 1 pyramid level; --levels 2 would not change " \
           "it" in " ".join(levels.stderr.split())
    assert (out / ".emrun-segment" / "job.json").read_text() == job  # nothing recorded
    other = _cli(cells_store, out, *THRESHOLDS, "--resume", "--agglomeration", "blockwise")
    assert other.exit_code == 2
    assert "segmentation_0.2: already exists, made with agglomeration global (this run: " \
           "blockwise)" in " ".join(other.stderr.split())

