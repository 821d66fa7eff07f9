"""The run directory's rules: a run is never silently reused, a start that saved no
checkpoint does not block the next one, and a place that cannot hold a run is named."""

from __future__ import annotations

from pathlib import Path

import pytest

from emrun.errors import UserError
from emrun.train.run_dir import prepare


def failed_start(run: Path) -> None:
    """What a start that failed on its data leaves: its files, no checkpoint."""
    (run / "tensorboard").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    for name in ("recipe.yaml", "provenance.json", "events.jsonl"):
        (run / name).write_text("x")


def test_a_start_without_checkpoint_is_cleared_for_the_next(tmp_path):
    run = tmp_path / "run"
    failed_start(run)
    assert prepare(run, resume=False) is True
    assert run.is_dir() and not any(run.iterdir())
    assert prepare(tmp_path / "fresh", resume=False) is False


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
