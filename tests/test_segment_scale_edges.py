"""`emrun segment --scheduler` at the edges of resume and stop: a --resume with no job to
resume, the all-zero warning judging the mask a resume uses, a SIGTERM or SIGINT while the
command starts or builds a pyramid, and affinities (or a whole project folder) moved between
runs. In this process (one worker), on 8 blocks of 4 x 24 x 24."""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import test_workflows_scale_probe as probe
import zarr
from test_infer import make_inputs
from typer.testing import CliRunner

from emrun.cli import app
from emrun.errors import UserError
from emrun.infer.run import run_inference
from emrun.io import write_volume
from emrun.segment.scale import command
from emrun.segment.scale.job import FOLDER, ScaleJob

cells_store = probe.cells_store  # a fixture: noisy affinities of 12 cells, 8 blocks
runner = CliRunner()
BLOCK = ("--block", "4", "24", "24")


def _segment(affs: Path | str, out: Path, *extra: str, levels: str = "1") -> Any:
    """The scaled job in this process (one worker: no worker processes start)."""
    return runner.invoke(app, ["segment", str(affs), str(out), "--scheduler", "local",
                               "--workers", "1", *BLOCK, "--levels", levels, *extra])


def _labels(out: Path, name: str, level: int = 0) -> np.ndarray:
    return zarr.open_array(str(out / "labels" / name / str(level)), mode="r")[...]


class NotStopped(Exception):
    """What a signal raised where the command installed no handler of its own (before the
    fix, SIGTERM ended the process on the spot: it would have ended the test run)."""


@pytest.fixture
def no_default_signals() -> Iterator[None]:
    """SIGTERM and SIGINT raise `NotStopped` unless the command takes them over."""
    def handler(number: int, frame: Any) -> None:
        raise NotStopped(signal.Signals(number).name)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for number, old in previous.items():
            signal.signal(number, old)


def _signalling(real: Callable[..., Any], number: int = signal.SIGTERM,
                wait: float = 0.0, log: list[str] | None = None) -> Callable[..., Any]:
    """``real`` preceded by a signal to this process (and ``wait`` seconds of work that a
    prompt stop cuts short: ``log`` says whether it ran to its end)."""
    def signalled(*args: Any, **kwargs: Any) -> Any:
        os.kill(os.getpid(), number)
        end = time.monotonic() + wait
        while time.monotonic() < end:
            time.sleep(0.01)
        if log is not None:
            log.append("waited to the end")
        return real(*args, **kwargs)

    return signalled


# ------------------------------------------------------------- 1. nothing to resume

def test_a_resume_into_an_output_without_a_job_is_refused_and_makes_nothing(
        cells_store, tmp_path):
    """--resume on a new output started a new job without a word."""
    affs = cells_store / "in.zarr/affinity"
    out = tmp_path / "new.zarr"
    result = _segment(affs, out, "--resume")
    assert result.exit_code == 2, result.output
    assert f"{out.resolve()}: holds no scaled segmentation job to resume (no " \
           f"{FOLDER}/job.json); drop --resume to start one" in " ".join(result.output.split())
    assert not out.exists()
    write_volume(tmp_path / "other.zarr", "image", np.zeros((4, 8, 8), np.uint8))
    result = _segment(affs, tmp_path / "other.zarr", "--resume")  # a store, no job in it
    assert result.exit_code == 2 and "no scaled segmentation job to resume" in result.output
    assert not (tmp_path / "other.zarr" / FOLDER).exists()
    assert sorted(p.name for p in (tmp_path / "other.zarr").iterdir()) == ["image", "zarr.json"]


def test_infer_resume_into_a_new_output_is_refused_as_segment_refuses_it(tmp_path):
    recipe, _, _, tmp = make_inputs(tmp_path, shape=(4, 16, 16))
    with pytest.raises(UserError, match=r"holds no inference run to resume .*drop --resume"):
        run_inference(recipe, tmp / "c.pt", str(tmp / "in.zarr/image"), tmp / "new.zarr",
                      resume=True)
    assert not (tmp / "new.zarr").exists()


# --------------------------------------------------------- 2. the all-zero warning

@pytest.fixture(scope="module")
def zero_mask_job(cells_store) -> tuple[Path, Path]:
    """A finished job whose mask is 0 everywhere, and its output."""
    write_volume(cells_store / "masks.zarr", "zeros", np.zeros(probe.SHAPE, np.uint8),
                 voxel_size=probe.VOXEL, offset=(1, 3, 5))
    out = cells_store / "zero-mask.zarr"
    result = _segment(cells_store / "in.zarr/affinity", out, "--threshold", "0.5",
                      "--mask", str(cells_store / "masks.zarr/zeros"))
    assert result.exit_code == 0, result.output
    assert "holds zeros only: --mask" in result.output
    return cells_store, out


def test_a_plain_resume_warns_of_the_jobs_all_zero_mask(zero_mask_job):
    """A plain --resume uses the job's mask; the warning judged only a --mask given, so a
    job's all-zero mask passed without a word."""
    store, out = zero_mask_job
    result = _segment(store / "in.zarr/affinity", out, "--resume")
    assert result.exit_code == 0, result.output
    mask = (store / "masks.zarr").resolve() / "zeros"
    assert f"holds zeros only: --mask {mask} (the job's) is 0 over the whole affinities" \
        in " ".join(result.output.split())


def test_a_plain_resume_of_a_job_with_a_real_mask_does_not_warn(cells_store, tmp_path):
    inside = np.zeros(probe.SHAPE, np.uint8)
    inside[:, :24] = 1
    write_volume(tmp_path / "m.zarr", "half", inside, voxel_size=probe.VOXEL,
                 offset=(1, 3, 5))
    out = tmp_path / "half.zarr"
    affs = cells_store / "in.zarr/affinity"
    assert _segment(affs, out, "--mask", str(tmp_path / "m.zarr/half")).exit_code == 0
    result = _segment(affs, out, "--resume")
    assert result.exit_code == 0, result.output
    assert "resuming with the job's --mask" in result.output
    assert "holds zeros only" not in result.output


# ---------------------------------------------------------- 3. a stop at start-up

@pytest.mark.parametrize(("where", "number", "code"), [
    ("emrun.segment.job.open_affinities", signal.SIGTERM, 143),
    ("emrun.segment.scale.command._check_values", signal.SIGINT, 130),
], ids=["opening-affinities", "checking-values"])
def test_a_signal_while_starting_stops_in_one_line_and_writes_nothing(
        cells_store, tmp_path, monkeypatch, no_default_signals, where, number, code):
    """Before the first step (opening inputs, the checks), SIGTERM ended the process on
    the spot (exit -15, nothing said) and SIGINT in a traceback or a generic line."""
    module, name = where.rsplit(".", 1)
    target = __import__(module, fromlist=[name])
    monkeypatch.setattr(target, name, _signalling(getattr(target, name), number))
    out = tmp_path / "start.zarr"
    result = _segment(cells_store / "in.zarr/affinity", out)
    assert result.exit_code == code, result.output
    said = " ".join(result.output.split())
    assert f"stopped by {signal.Signals(number).name}: the job stopped while starting, " \
           "before it wrote anything of its own: run the same command again" in said
    assert not out.exists()  # no output, no lock left
    monkeypatch.undo()
    assert _segment(cells_store / "in.zarr/affinity", out).exit_code == 0


def test_a_signal_while_a_resume_starts_leaves_the_job_as_it_was(
        cells_store, tmp_path, monkeypatch, no_default_signals):
    affs = cells_store / "in.zarr/affinity"
    out = tmp_path / "resumed.zarr"
    assert _segment(affs, out, "--threshold", "0.5").exit_code == 0
    saved = (out / FOLDER / "job.json").read_text()
    monkeypatch.setattr(command, "_check_values", _signalling(command._check_values))
    result = _segment(affs, out, "--resume", "--threshold", "0.8", "--name", "more")
    assert result.exit_code == 143, result.output
    assert "while starting" in result.output
    assert (out / FOLDER / "job.json").read_text() == saved
    assert not (out / "labels" / "more").exists()
    monkeypatch.undo()
    result = _segment(affs, out, "--resume", "--threshold", "0.8", "--name", "more")
    assert result.exit_code == 0, result.output


# ------------------------------------------------------ 4. a stop during a pyramid

@pytest.fixture(scope="module")
def pyramid_straight(cells_store) -> Path:
    out = cells_store / "pyramid-straight.zarr"
    result = _segment(cells_store / "in.zarr/affinity", out, "--threshold", "0.5",
                      levels="2")
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize(("call", "what"), [(1, "fragments"), (2, "segmentation")])
def test_a_stop_during_a_pyramid_is_prompt_and_the_resume_builds_it_whole(
        cells_store, pyramid_straight, tmp_path, monkeypatch, no_default_signals, call,
        what):
    """A stop waited for the pyramid being built (on a large volume, many minutes)."""
    real, calls, log = command.build_pyramid, [], []

    def build(*args: Any, **kwargs: Any) -> Any:
        calls.append(args[0])
        if len(calls) == call:
            return _signalling(real, wait=5.0, log=log)(*args, **kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(command, "build_pyramid", build)
    affs, out = cells_store / "in.zarr/affinity", tmp_path / "pyramid.zarr"
    result = _segment(affs, out, "--threshold", "0.5", levels="2")
    assert result.exit_code == 143, result.output
    assert log == [], "the stop waited for the pyramid"
    assert f"the pyramid of {what} was cut short" in " ".join(result.output.split())
    monkeypatch.undo()
    result = _segment(affs, out, "--resume", levels="2")
    assert result.exit_code == 0, result.output
    for name in ("fragments", "segmentation"):
        for level in (0, 1):
            assert np.array_equal(_labels(out, name, level),
                                  _labels(pyramid_straight, name, level)), (name, level)


# ------------------------------------------------------------- 5. moved inputs

def _project(cells_store: Path, root: Path) -> tuple[Path, Path]:
    """A project folder: a copy of the affinities, and an output holding a mask."""
    root.mkdir()
    shutil.copytree(cells_store / "in.zarr", root / "pred.zarr")
    inside = np.zeros(probe.SHAPE, np.uint8)
    inside[:, 8:] = 1
    write_volume(root / "seg.zarr", "mask", inside, voxel_size=probe.VOXEL, offset=(1, 3, 5))
    return root / "pred.zarr/affinity", root / "seg.zarr"


def test_a_moved_project_folder_resumes_with_the_new_affinities_path(cells_store, tmp_path):
    """The job's digest held the affinities' path: moved, they were 'another input', and a
    mask inside the moved output was refused ('move the output back there')."""
    affs, out = _project(cells_store, tmp_path / "lab")
    result = _segment(affs, out, "--threshold", "0.5", "--mask", str(out / "mask"))
    assert result.exit_code == 0, result.output
    (tmp_path / "lab").rename(tmp_path / "moved")
    affs, out = tmp_path / "moved/pred.zarr/affinity", tmp_path / "moved/seg.zarr"
    result = _segment(affs, out, "--resume", "--threshold", "0.8", "--name", "more")
    assert result.exit_code == 0, result.output
    assert "fragments: 0 of 8 blocks to do" in result.output
    assert "graph: 0 of 8 blocks to do" in result.output
    assert f"--mask {out.resolve() / 'mask'}" in " ".join(result.output.split())
    alone = tmp_path / "alone.zarr"
    assert _segment(affs, alone, "--threshold", "0.8", "--mask",
                    str(out / "mask")).exit_code == 0
    assert np.array_equal(_labels(out, "more"), _labels(alone, "segmentation"))
    job = ScaleJob.load(out / FOLDER / "job.json")
    assert job.affinities == str(affs.resolve())
    assert job.started == (str((tmp_path / "lab/pred.zarr/affinity").resolve()),
                           str((tmp_path / "lab/seg.zarr/mask").resolve()))
    result = _segment(affs, out, "--resume")  # and again, from the job saved moved
    assert result.exit_code == 0, result.output


def test_moved_affinities_alone_resume_and_a_copy_beside_the_original_does_not(
        cells_store, tmp_path):
    """Moved: the old place no longer opens. A copy while the original still opens there
    is another volume as far as the job can tell (it may be edited): still refused."""
    affs, out = _project(cells_store, tmp_path / "lab")
    assert _segment(affs, out, "--threshold", "0.5").exit_code == 0
    shutil.copytree(tmp_path / "lab/pred.zarr", tmp_path / "copy.zarr")
    result = _segment(tmp_path / "copy.zarr/affinity", out, "--resume")
    assert result.exit_code == 2 and "fragments were made with another input" in result.output
    (tmp_path / "lab/pred.zarr").rename(tmp_path / "fast-disk.zarr")
    result = _segment(tmp_path / "fast-disk.zarr/affinity", out, "--resume", "--threshold",
                      "0.8", "--name", "more")
    assert result.exit_code == 0, result.output
    assert "graph: 0 of 8 blocks to do" in result.output
    alone = tmp_path / "alone.zarr"
    assert _segment(tmp_path / "copy.zarr/affinity", alone, "--threshold", "0.8").exit_code == 0
    assert np.array_equal(_labels(out, "more"), _labels(alone, "segmentation"))


def test_moved_affinities_that_are_another_volume_are_refused(cells_store, tmp_path):
    affs, out = _project(cells_store, tmp_path / "lab")
    assert _segment(affs, out, "--threshold", "0.5").exit_code == 0
    data = zarr.open_array(str(affs / "0"), mode="r")[...]
    shutil.rmtree(tmp_path / "lab/pred.zarr")
    attrs = {"offsets": [list(o) for o in probe.NEAREST]}
    write_volume(tmp_path / "other.zarr", "affinity", 255 - data, channel_axis=True,
                 attrs=attrs, voxel_size=probe.VOXEL, offset=(1, 3, 5))
    write_volume(tmp_path / "placed.zarr", "affinity", data, channel_axis=True,
                 attrs=attrs, voxel_size=probe.VOXEL, offset=(0, 0, 0))
    for other in ("other.zarr", "placed.zarr"):
        result = _segment(tmp_path / other / "affinity", out, "--resume")
        assert result.exit_code == 2, result.output
        assert f"not the affinities {out.resolve()} was started from" in \
            " ".join(result.output.split())


def test_a_moved_jobs_digest_is_the_one_it_started_with():
    job = ScaleJob(affinities="/a/pred.zarr/affinity", offsets=probe.NEAREST,
                   output="/a/seg.zarr", shape=(8, 48, 48), block=(4, 24, 24),
                   fragments="watershed", thresholds=(0.5,), scoring="mean", min_size=0,
                   db="sqlite:////a/seg.zarr/.emrun-segment/graph.sqlite",
                   mask="/a/seg.zarr/mask")
    moved = ScaleJob.from_json(job.to_json().replace("/a/", "/b/"))
    assert moved.digest() != job.digest()
    moved = ScaleJob.from_json(type(job)(**{**moved.__dict__, "started": (
        job.affinities, job.mask)}).to_json())
    assert moved.digest() == job.digest() and moved.started == (job.affinities, job.mask)
