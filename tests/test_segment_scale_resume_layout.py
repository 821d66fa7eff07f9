"""`emrun segment --scheduler ... --resume` takes the job's --block and --db when they are not
given (a job started with --block or --db was refused on a plain --resume), says so in one
line, still refuses a given one that differs, and a job on PostgreSQL whose password is in
no PGPASSWORD or ~/.pgpass says how to give it (the job's file keeps no password)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import test_workflows_scale_probe as probe
from test_segment_scale import throwaway_postgres
from typer.testing import CliRunner

from emrun.cli import app
from emrun.errors import UserError
from emrun.segment.request import SegmentRequest
from emrun.segment.scale.command import _check_resume, _resumed_layout
from emrun.segment.scale.graphdb import default_url
from emrun.segment.scale.job import FOLDER, ScaleJob

cells_store = probe.cells_store  # a fixture: noisy affinities of 12 cells, 8 blocks
runner = CliRunner()
BLOCK = ("--block", "4", "24", "24")  # 8 blocks; the default would be 1 (8 x 48 x 48)
SHAPE = (8, 48, 48)
PG = "postgresql://emrun@db.example:5432/graphs"


def _segment(store: Path, out: Path, *extra: str) -> object:
    """The scaled job in this process (one worker: no worker processes start)."""
    return runner.invoke(app, ["segment", str(store / "in.zarr/affinity"), str(out),
                               "--scheduler", "local", "--workers", "1", "--levels", "1",
                               "--threshold", "0.5", *extra])


# ------------------------------------------------------------------------- a real job

def test_a_plain_resume_takes_the_jobs_block_and_a_given_other_block_is_refused(
        cells_store, tmp_path):
    """Started with --block 4 24 24, a --resume without --block was refused ('its fragments
    were made with another block'): the default block was taken as given."""
    out = tmp_path / "blocks.zarr"
    result = _segment(cells_store, out, *BLOCK)
    assert result.exit_code == 0, result.output
    result = _segment(cells_store, out, "--resume")
    assert result.exit_code == 0, result.output
    assert "resuming with the job's --block 4 24 24 (as it was started)" in result.output
    assert "graph: 0 of 8 blocks to do" in result.output
    assert "--db" not in result.output  # its default SQLite file: nothing to say
    result = _segment(cells_store, out, "--resume", "--block", "8", "48", "48")
    assert result.exit_code == 2, result.output
    assert "its fragments were made with another block" in result.output


# ------------------------------------------------------- which block and URL are used

def _saved(output: Path, **changes: object) -> ScaleJob:
    """A job saved in ``output`` (no volumes: what a resume reads is its job file)."""
    job = ScaleJob(affinities="in.zarr/affinity", offsets=((-1, 0, 0), (0, -1, 0), (0, 0, -1)),
                   output=str(output.resolve()), shape=SHAPE, block=(4, 24, 24),
                   fragments="watershed", thresholds=(0.5,), scoring="mean", min_size=0,
                   db=default_url(output / FOLDER))
    job = replace(job, **changes)
    job.save()
    return job


def _request(output: Path, **options: object) -> SegmentRequest:
    return SegmentRequest(affinities="in.zarr/affinity", output=output, scheduler="local",
                          **options)


def test_a_resume_without_db_takes_the_jobs_postgresql_url(tmp_path):
    _saved(tmp_path / "o.zarr", db=PG, block=(8, 48, 48))
    layout = _resumed_layout(_request(tmp_path / "o.zarr", resume=True), SHAPE)
    assert layout.db == PG
    assert layout.block == (8, 48, 48)
    assert layout.taken == [f"--db {PG}"]  # the default block: not said


def test_a_given_db_is_used_and_one_other_than_the_jobs_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("PGPASSWORD", raising=False)
    saved = _saved(tmp_path / "o.zarr", db=PG)
    given = "postgresql://emrun:s3cret@db.example:5432/other"
    layout = _resumed_layout(_request(tmp_path / "o.zarr", resume=True, db=given), SHAPE)
    assert layout.db == "postgresql://emrun@db.example:5432/other"  # no password kept
    assert os.environ["PGPASSWORD"] == "s3cret"
    assert layout.taken == ["--block 4 24 24"]
    refusal = f"--db {layout.db}: this job's graph is in {PG}; resume with that --db"
    with pytest.raises(UserError, match=re.escape(refusal)):
        _check_resume(replace(saved, db=layout.db), True)
    same = _resumed_layout(_request(tmp_path / "o.zarr", resume=True, db=PG), SHAPE)
    assert _check_resume(replace(saved, db=same.db), True) is not None


def test_a_moved_output_without_db_keeps_the_sqlite_file_it_carries(tmp_path):
    _saved(tmp_path / "first.zarr", block=(8, 48, 48))
    moved = tmp_path / "elsewhere" / "seg.zarr"
    moved.parent.mkdir()
    (tmp_path / "first.zarr").rename(moved)
    layout = _resumed_layout(_request(moved, resume=True), SHAPE)
    assert layout.db == default_url(moved / FOLDER)
    assert layout.taken == []


def test_a_new_job_and_a_run_without_resume_take_nothing_saved(tmp_path):
    fresh = _resumed_layout(_request(tmp_path / "new.zarr", resume=True), SHAPE)
    assert fresh.block == SHAPE and fresh.db == default_url(tmp_path / "new.zarr" / FOLDER)
    _saved(tmp_path / "o.zarr", db=PG)
    unasked = _resumed_layout(_request(tmp_path / "o.zarr"), SHAPE)  # refused later
    assert unasked.db == default_url(tmp_path / "o.zarr" / FOLDER) and unasked.taken == []


# ------------------------------------------------- PostgreSQL asking for a password

@pytest.fixture(scope="module")
def password_server() -> Iterator[tuple[str, str]]:
    """A throwaway PostgreSQL server that asks for a password (scram-sha-256): the URL of
    its database without the password, and the password."""
    with throwaway_postgres("pw-of-emrun") as url:
        yield url, "pw-of-emrun"


def test_a_resume_takes_the_jobs_postgresql_db_and_says_where_its_password_goes(
        cells_store, tmp_path, monkeypatch, password_server):
    """Started with --db postgresql://...: a --resume without --db was refused ('resume with
    --db'); the job's URL holds no password, so without PGPASSWORD or ~/.pgpass the resume
    says where to put it, and with either it finishes the job on its graph."""
    url, password = password_server
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "no-pgpass"))
    out = tmp_path / "pg.zarr"
    with_password = url.replace("emrun@", f"emrun:{password}@")
    result = _segment(cells_store, out, *BLOCK, "--db", with_password)
    assert result.exit_code == 0, result.output
    assert password not in (out / FOLDER / "job.json").read_text()

    monkeypatch.delenv("PGPASSWORD")  # the first run put it there, for its workers
    result = _segment(cells_store, out, "--resume")
    assert result.exit_code == 2, result.output
    assert "the server asks for a password: set PGPASSWORD or add the password to ~/.pgpass" \
        in result.output
    assert "Traceback" not in result.output

    (tmp_path / "pgpass").write_text(f"127.0.0.1:*:*:emrun:{password}\n")
    os.chmod(tmp_path / "pgpass", 0o600)
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "pgpass"))
    result = _segment(cells_store, out, "--resume")
    assert result.exit_code == 0, result.output
    assert f"resuming with the job's --block 4 24 24 and --db {url}" in result.output
    assert "graph: 0 of 8 blocks to do" in result.output
