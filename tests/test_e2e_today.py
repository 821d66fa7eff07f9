"""Today's changes together, as a user meets them: `emrun infer --levels` stopped by a real
SIGTERM while it builds the pyramid, then `--resume` (bit for bit as one run, all levels; a
second `--resume` on the finished output changes nothing), and a blockwise `emrun evaluate
--workers 2` stopped by a terminal's Ctrl-C (SIGINT to the whole process group): one line,
exit 130, no work folder left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
import zarr
from test_infer import make_inputs
from typer.testing import CliRunner

from emrun.cli import app
from emrun.io import VolumeError, open_volume, write
from emrun.io.write import PYRAMID_PROGRESS, write_level
from emrun.io.write import write_volume as write_zarr


def _levels(out: Path, task: str = "aff") -> dict[str, np.ndarray]:
    """Every level of a task's output, by name."""
    group = zarr.open_group(str(out / task), mode="r")
    return {name: group[name][...] for name in sorted(group.array_keys())}


def _files(top: Path) -> dict[str, object]:
    """The output's files: chunks by size and modification time (not written again), zarr
    metadata by its bytes (written again, to the same)."""
    return {str(p.relative_to(top)): p.read_bytes() if p.name == "zarr.json"
            else (p.stat().st_size, p.stat().st_mtime_ns)
            for p in top.rglob("*") if p.is_file() and ("/c/" in str(p) or p.name == "zarr.json")}


def _sigterm_at_level(level: int) -> Callable[..., Any]:
    """`write_level` that sends this process a real SIGTERM as it starts `level` (levels
    are built in order: the ones before it are done, it is not)."""
    built: list[int] = []

    def cut(*args: Any, **kwargs: Any) -> Any:
        built.append(1)
        if len(built) == level:
            os.kill(os.getpid(), signal.SIGTERM)
        return write_level(*args, **kwargs)

    return cut


def test_infer_sigterm_in_the_pyramid_resumes_bit_for_bit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recipe, _, _, tmp = make_inputs(tmp_path, shape=(8, 64, 64))
    (tmp / "r.yaml").write_text(yaml.safe_dump(recipe.resolved()))
    base = ["infer", "--recipe", str(tmp / "r.yaml"), "--checkpoint", str(tmp / "c.pt"),
            "--input", str(tmp / "in.zarr/image"), "--device", "cpu", "--levels", "3",
            "--block", "4", "16", "16"]
    runner = CliRunner()
    whole = runner.invoke(app, [*base, "--output", str(tmp / "whole.zarr")])
    assert whole.exit_code == 0, whole.output

    out = tmp / "cut.zarr"
    with monkeypatch.context() as patch:
        patch.setattr(write, "write_level", _sigterm_at_level(2))
        stopped = runner.invoke(app, [*base, "--output", str(out)])
    assert stopped.exit_code == 143, stopped.output
    said = stopped.stderr.strip().splitlines()[-1]
    assert said.startswith("stopped by SIGTERM") and "--resume" in said
    assert "Traceback" not in stopped.output
    assert (out / "aff" / PYRAMID_PROGRESS).is_dir()  # stopped inside the build
    with pytest.raises(VolumeError, match="is unfinished"):
        open_volume(f"{out}/aff")

    resumed = runner.invoke(app, [*base, "--output", str(out), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    got, want = _levels(out), _levels(tmp / "whole.zarr")
    assert list(got) == ["0", "1", "2"] and list(got) == list(want)
    for name in want:
        assert got[name].dtype == want[name].dtype
        np.testing.assert_array_equal(got[name], want[name])
    assert not (out / "aff" / PYRAMID_PROGRESS).exists()
    top = open_volume(f"{out}/aff", "2")
    assert top.shape == want["2"].shape and top.voxel_size == (30.0, 24.0, 24.0)

    before = _files(out)
    again = runner.invoke(app, [*base, "--output", str(out), "--resume"])
    assert again.exit_code == 0, again.output
    assert "0 blocks predicted" in again.stdout
    assert _files(out) == before
    assert not (out / "aff" / PYRAMID_PROGRESS).exists()


def _evaluate_volumes(tmp: Path) -> tuple[str, str]:
    """A segmentation and a truth large enough in small blocks to be stopped mid-run."""
    rng = np.random.default_rng(0)
    truth = rng.integers(1, 50, (16, 128, 128)).astype(np.uint64)
    seg = truth.copy()
    seg[:, :, 64:] += 1
    write_zarr(tmp / "t.zarr", "labels", truth, voxel_size=(30, 6, 6))
    write_zarr(tmp / "s.zarr", "seg", seg, voxel_size=(30, 6, 6))
    return str(tmp / "s.zarr/seg"), str(tmp / "t.zarr/labels")


def test_evaluate_blockwise_ctrl_c_says_one_line_exits_130_and_leaves_no_work(
        tmp_path: Path) -> None:
    seg, truth = _evaluate_volumes(tmp_path)
    temp, work = tmp_path / "temp", tmp_path / "work"
    temp.mkdir()
    env = {**os.environ, "TMPDIR": str(temp)}
    process = subprocess.Popen(
        [sys.executable, "-m", "emrun", "evaluate", seg, truth, "--workers", "2",
         "--block", "2", "16", "16", "--work-dir", str(work)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        start_new_session=True)
    assert process.stderr is not None
    lines = []
    for line in process.stderr:  # the workers are scoring: Ctrl-C reaches the whole group
        lines.append(line)
        if " of 512" in line:
            os.killpg(process.pid, signal.SIGINT)
            break
    rest = process.stderr.read()
    process.wait(timeout=60)
    told = [line for line in rest.splitlines() if "block " not in line]
    assert process.returncode == 130, "".join(lines) + rest
    assert len(told) == 1 and told[0].startswith("stopped by SIGINT"), rest
    assert "Traceback" not in rest
    assert list(work.iterdir()) == [] and list(temp.iterdir()) == []
