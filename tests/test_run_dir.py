"""The run directory's rules: a run is never silently reused, a start that saved no
checkpoint does not block the next one, and a place that cannot hold a run is named."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from emrun import locks
from emrun.cli import app
from emrun.errors import UserError
from emrun.train.run_dir import check_free, prepare


def failed_start(run: Path) -> None:
    """What a start that failed on its data leaves: its files, no checkpoint."""
    (run / "tensorboard").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    for name in ("recipe.yaml", "events.jsonl"):
        (run / name).write_text("x")
    (run / "provenance.json").write_text('{"emrun": "0.1.0", "sessions": []}')  # emrun's


def test_a_start_without_checkpoint_is_cleared_for_the_next(tmp_path):
    run = tmp_path / "run"
    failed_start(run)
    assert prepare(run, resume=False) is True
    assert run.is_dir() and [entry.name for entry in run.iterdir()] == [locks.LOCK_NAME]
    assert prepare(tmp_path / "fresh", resume=False) is False
    locks.release(run)
    locks.release(tmp_path / "fresh")


@pytest.mark.parametrize("extra", ["checkpoint", "user file"])
def test_a_run_or_a_users_file_is_never_cleared(tmp_path, extra):
    run = tmp_path / "run"
    failed_start(run)
    kept = run / ("checkpoints/last.pt" if extra == "checkpoint" else "notes.txt")
    kept.write_text("mine")
    with pytest.raises(UserError, match="already holds a run"):
        prepare(run, resume=False)
    assert kept.read_text() == "mine" and (run / "recipe.yaml").exists()


def test_a_place_that_cannot_be_a_run_directory_is_one_user_error(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        prepare(afile, resume=False)
    with pytest.raises(UserError, match="cannot create it"):
        prepare(afile / "sub", resume=False)
    assert afile.read_text() == "x"


RECIPE = """
name: r
data: {sources: {a: {type: synthetic, shape: [8, 32, 32]}}}
model: {type: rsunet, widths: [4, 8]}
tasks: {affinity: {target: {type: affinity}}}
train: {patch: [4, 16, 16], iterations: 2, workers: 0}
"""

HOLDER = """
import sys, time
from pathlib import Path
from emrun.train.run_dir import check_free, prepare
prepare(Path(sys.argv[1]), resume=False)
print("holding", flush=True)
time.sleep(120)
"""


def test_a_run_directory_in_use_by_another_process_is_refused_until_it_ends(tmp_path):
    """Two `emrun train` into one run directory both ran: one run's recipe.yaml ended beside
    the other's checkpoints. The second is refused while the first lives, and a killed
    first (kill -9: no clean-up ran) leaves nothing that blocks the next."""
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "holding\n"
        (run / "provenance.json").write_text('{"emrun": "0.1.0"}')  # what the first run
        (run / "recipe.yaml").write_text("x")  # has written so far
        for resume in (False, True):
            for check in (prepare, check_free):  # check_free: a launcher's, before torchrun
                with pytest.raises(UserError, match=rf"run is in use by another emrun \(pid "
                                   rf"{holder.pid} on .*give another --run-dir"):
                    check(run, resume=resume)
        recipe = tmp_path / "r.yaml"
        recipe.write_text(RECIPE)
        launched = CliRunner().invoke(app, ["train", str(recipe), "--run-dir", str(run),
                                            "--resume", "--gpus", "2", "--device", "cpu"])
        assert launched.exit_code == 2, launched.output  # torchrun's ranks never started:
        assert len(launched.stderr.strip().splitlines()) == 1  # one line, no tracebacks
    finally:
        holder.kill()
        holder.wait()
    assert prepare(run, resume=True) is False
    locks.release(run)


def test_a_launcher_s_check_makes_nothing(tmp_path):
    check_free(tmp_path / "new", resume=False)
    assert not (tmp_path / "new").exists()
    run = tmp_path / "run"
    failed_start(run)
    (run / "checkpoints/last.pt").write_text("a run")
    with pytest.raises(UserError, match="already holds a run"):
        check_free(run, resume=False)
    with pytest.raises(UserError, match="no run to resume"):
        check_free(tmp_path / "new", resume=True)
