"""`emrun segment --scheduler local` against a messy graph database and resumes: a database
another run filled (another output, or this one started over on rewritten affinities),
tables of someone else's under our names, a file that is no database, an in-memory or
relative SQLite URL, thresholds given in another order on --resume, and an output refused
before anything is made in it. Small synthetic volumes made in code."""

from __future__ import annotations

import json
import os
import sqlite3
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from test_segment import affinities, arand, cells, noisy
from test_segment_scale import postgres_url  # noqa: F401  (a fixture: a throwaway server)
from typer.testing import CliRunner

from emrun.cli import app
from emrun.io import open_volume, write_volume

runner = CliRunner()
NEAREST = ((-1, 0, 0), (0, -1, 0), (0, 0, -1))
SHAPE = (16, 64, 64)
BLOCK = ("--block", "8", "32", "32")


def write_affinities(store: Path, seed: int, n: int = 20) -> np.ndarray:
    """uint8 affinities of ``n`` cells at ``store/affinity`` (replacing any); the cells."""
    truth = cells(SHAPE, n=n, seed=seed)
    affs = noisy(affinities(truth, NEAREST), 0.1, seed=seed)
    write_volume(store, "affinity", np.round(affs * 255).astype(np.uint8), channel_axis=True,
                 attrs={"offsets": [list(o) for o in NEAREST]}, overwrite=True)
    return truth


def segment(affs: Path, out: Path, *extra: str):
    return runner.invoke(app, ["segment", str(affs), str(out), "--scheduler", "local",
                               *BLOCK, *extra])


def level0(store: Path, name: str) -> np.ndarray:
    return zarr.open_array(str(store / "labels" / name / "0"), mode="r")[...]


def one_line_exit_2(result, message: str) -> None:
    assert result.exit_code == 2, result.output
    assert message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


def sqlite_tables(path: Path) -> set[str]:
    with sqlite3.connect(path) as conn:
        return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}


@pytest.fixture
def affs(tmp_path) -> Path:
    write_affinities(tmp_path / "in.zarr", seed=3)
    return tmp_path / "in.zarr" / "affinity"


def test_a_graph_another_run_left_in_the_database_is_refused_not_reused(tmp_path, affs):
    """New predictions written over the old at the same path, segmented into a new output
    with the same --db: the job digest (input path, offsets, grid) is the same, so the old
    run's graph blocks were taken as done and the new fragments relabelled through the old
    graph (adapted Rand error 0.69 against 0.00 with a fresh database)."""
    db = f"sqlite:///{tmp_path / 'graph.sqlite'}"
    assert segment(affs, tmp_path / "first.zarr", "--db", db).exit_code == 0
    write_affinities(tmp_path / "in.zarr", seed=7, n=30)  # rewritten since
    result = segment(affs, tmp_path / "second.zarr", "--db", db)
    one_line_exit_2(result, "holds the graph of another run")
    assert "first.zarr" in result.output
    assert not (tmp_path / "second.zarr" / "labels").exists()


def test_an_output_started_over_does_not_take_its_old_graph_for_its_own(tmp_path, affs):
    """The output deleted and the command run again (not --resume) on the same --db."""
    import shutil

    db = f"sqlite:///{tmp_path / 'graph.sqlite'}"
    out = tmp_path / "out.zarr"
    assert segment(affs, out, "--db", db).exit_code == 0
    shutil.rmtree(out)
    one_line_exit_2(segment(affs, out, "--db", db), "holds the graph of another run")


def test_resume_keeps_its_claim_on_the_database_and_a_job_without_one_still_resumes(
        tmp_path, affs):
    """--resume of the run that filled the database goes on; so does a job whose job.json
    and database predate the run token (recorded then)."""
    db_file = tmp_path / "graph.sqlite"
    db = f"sqlite:///{db_file}"
    out = tmp_path / "out.zarr"
    assert segment(affs, out, "--db", db, "--threshold", "0.5").exit_code == 0
    again = segment(affs, out, "--db", db, "--threshold", "0.3", "--name", "low", "--resume")
    assert again.exit_code == 0, again.output
    job_file = out / ".emrun-segment" / "job.json"
    job = json.loads(job_file.read_text())
    job.pop("run")
    job_file.write_text(json.dumps(job))
    with sqlite3.connect(db_file) as conn:
        conn.execute("DELETE FROM meta WHERE key IN ('run', 'output')")
    legacy = segment(affs, out, "--db", db, "--threshold", "0.7", "--name", "high",
                     "--resume")
    assert legacy.exit_code == 0, legacy.output
    assert "graph: 0 of 8 blocks to do" in legacy.output


def test_tables_of_someone_else_under_our_names_are_refused_before_any_work(tmp_path, affs):
    """A database with a table 'nodes' of other columns: it went through the fragments
    step, created emrun's other tables beside the user's, and failed at the graph step
    ('column "id" of relation "nodes" does not exist')."""
    path = tmp_path / "theirs.sqlite"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE nodes (name TEXT, weight INTEGER)")
        conn.execute("INSERT INTO nodes VALUES ('precious', 1)")
    out = tmp_path / "out.zarr"
    one_line_exit_2(segment(affs, out, "--db", f"sqlite:///{path}"),
                    "its table nodes (name, weight) is not emrun's graph")
    assert sqlite_tables(path) == {"nodes"}, "nothing added to the user's database"
    assert not (out / "labels").exists()


def test_a_file_that_is_no_database_is_one_line_exit_2_and_untouched(tmp_path, affs):
    """--db sqlite:///notes.txt was 'internal error: DatabaseError ... file is not a
    database', exit 1."""
    notes = tmp_path / "notes.txt"
    notes.write_text("precious notes, not a database\n")
    one_line_exit_2(segment(affs, tmp_path / "out.zarr", "--db", f"sqlite:///{notes}"),
                    "file is not a database")
    assert notes.read_text() == "precious notes, not a database\n"


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:"])
def test_an_in_memory_sqlite_database_is_refused_before_any_work(tmp_path, affs, url):
    """Each process has its own in-memory database: the fragments step ran, then the graph
    step failed with 'no such table: blocks'."""
    out = tmp_path / "out.zarr"
    one_line_exit_2(segment(affs, out, "--db", url), "in-memory SQLite")
    assert not (out / "labels").exists()


def test_a_relative_sqlite_path_is_recorded_absolute(tmp_path, affs, monkeypatch):
    """Workers (daisy's through --launch) may start in another folder: the job names the
    database by its absolute path."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out.zarr"
    assert segment(affs, out, "--db", "sqlite:///rel.sqlite").exit_code == 0
    job = json.loads((out / ".emrun-segment" / "job.json").read_text())
    assert job["db"] == f"sqlite:///{tmp_path / 'rel.sqlite'}"


def test_the_same_thresholds_in_another_order_resume_the_same_volumes(tmp_path, affs):
    """--resume with --threshold 0.5,0.3 after 0.3,0.5 was refused: 'segmentation_0.5:
    already exists (another threshold or method)'."""
    out = tmp_path / "out.zarr"
    assert segment(affs, out, "--threshold", "0.3,0.5").exit_code == 0
    before = {n: level0(out, n) for n in ("segmentation_0.3", "segmentation_0.5")}
    result = segment(affs, out, "--threshold", "0.5,0.3", "--resume")
    assert result.exit_code == 0, result.output
    assert "relabel: 0 of 8 blocks to do" in result.output
    for name, values in before.items():
        assert np.array_equal(level0(out, name), values), name


def test_an_output_refused_for_a_volume_in_the_way_is_left_as_it_was(tmp_path, affs):
    """A store holding the user's own labels/fragments: refused, and no graph database or
    job folder left inside it (a graph.sqlite was created first)."""
    out = tmp_path / "out.zarr"
    write_volume(out, "fragments", np.ones(SHAPE, np.uint64))
    one_line_exit_2(segment(affs, out), "already exists and was not made by this job")
    assert not (out / ".emrun-segment").exists()
    assert level0(out, "fragments").min() == 1


def test_logits_are_refused_before_the_output_exists(tmp_path):
    """Float affinities that are logits were found by the first fragments block, after the
    output was made; the affinities fixed (a sigmoid) at the same path could then neither
    start over (the output holds a job) nor resume it (their sample differs)."""
    rng = np.random.default_rng(0)
    logits = (rng.random((3, *SHAPE)) * 8 - 4).astype(np.float32)
    write_volume(tmp_path / "in.zarr", "affinity", logits, channel_axis=True,
                 attrs={"offsets": [list(o) for o in NEAREST]})
    out = tmp_path / "out.zarr"
    one_line_exit_2(segment(tmp_path / "in.zarr" / "affinity", out), "apply a sigmoid")
    assert not out.exists()


@pytest.mark.parametrize("agglomeration", ["global", "blockwise"])
def test_a_run_made_again_in_the_same_process_uses_none_of_the_last_runs_data(
        tmp_path, affs, agglomeration):
    """The output deleted, the affinities rewritten at the same path, and the command run
    again in one process (a notebook, the API; one worker: blocks run in this process):
    volumes, database engines with their kept rows and mapped lookup tables were cached by
    path and URL, so the new fragments went through the old run's tables (adapted Rand
    error 0.69 instead of 0.00)."""
    import shutil

    out = tmp_path / "out.zarr"
    extra = ("--agglomeration", agglomeration)
    assert segment(affs, out, *extra).exit_code == 0
    shutil.rmtree(out)
    truth = write_affinities(tmp_path / "in.zarr", seed=7, n=30)
    result = segment(affs, out, *extra)
    assert result.exit_code == 0, result.output
    assert arand(open_volume(str(out / "segmentation")).read(), truth) < 0.01


def test_postgresql_refuses_foreign_tables_and_another_runs_graph(tmp_path, affs,
                                                                   postgres_url):  # noqa: F811
    import sqlalchemy as sa

    server = postgres_url.rsplit("/", 1)[0]
    with sa.create_engine(postgres_url, isolation_level="AUTOCOMMIT").connect() as conn:
        conn.execute(sa.text("CREATE DATABASE probe_foreign"))
        conn.execute(sa.text("CREATE DATABASE probe_shared"))
    foreign = sa.create_engine(f"{server}/probe_foreign")
    with foreign.begin() as conn:
        conn.execute(sa.text("CREATE TABLE edges (a INTEGER, b INTEGER)"))
    one_line_exit_2(segment(affs, tmp_path / "f.zarr", "--db", f"{server}/probe_foreign"),
                    "its table edges (a, b) is not emrun's graph")
    assert set(sa.inspect(foreign).get_table_names()) == {"edges"}
    foreign.dispose()
    shared = f"{server}/probe_shared"
    assert segment(affs, tmp_path / "one.zarr", "--db", shared).exit_code == 0
    write_affinities(tmp_path / "in.zarr", seed=7, n=30)
    one_line_exit_2(segment(affs, tmp_path / "two.zarr", "--db", shared),
                    "holds the graph of another run")


def _create(url: str, _run: int) -> str:
    """One process's `GraphStore.create` of a shared database: 'ok' or what it raised."""
    from emrun.segment.scale.graphdb import GraphStore

    try:
        GraphStore(url).create("digest")
    except Exception as exc:  # reported to the test, which names it
        return f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    return "ok"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="forks")
def test_postgresql_tables_created_by_processes_at_once_do_not_collide(
        postgres_url):  # noqa: F811
    """Runs (or a run and its resume) creating the tables of one new database at the same
    moment: 'duplicate key value violates unique constraint pg_type_typname_nsp_index',
    exit 1, for most of them."""
    import multiprocessing

    import sqlalchemy as sa

    server = postgres_url.rsplit("/", 1)[0]
    with sa.create_engine(postgres_url, isolation_level="AUTOCOMMIT").connect() as conn:
        for k in range(3):
            conn.execute(sa.text(f"CREATE DATABASE probe_race{k}"))
    jobs = [(f"{server}/probe_race{k}", i) for k in range(3) for i in range(4)]
    with multiprocessing.get_context("fork").Pool(4) as pool:
        outcomes = pool.starmap(_create, jobs)
    assert outcomes == ["ok"] * len(jobs), outcomes


def test_nan_in_a_float_mask_is_outside_at_scale(tmp_path, affs):
    """As everywhere (emrun.io.masks): NaN in a float mask is outside, 0 in the output
    (segmented before: NaN != 0)."""
    mask = np.full(SHAPE, np.nan, np.float32)
    mask[:, :, 32:] = 1.0
    write_volume(tmp_path / "m.zarr", "mask", mask)
    result = segment(affs, tmp_path / "out.zarr", "--mask", str(tmp_path / "m.zarr" / "mask"))
    assert result.exit_code == 0, result.output
    got = level0(tmp_path / "out.zarr", "segmentation")
    assert not got[:, :, :32].any() and got[:, :, 32:].all()


def test_a_password_in_the_db_url_is_not_written_to_the_job_file(tmp_path, affs, monkeypatch,
                                                                 postgres_url):  # noqa: F811
    """OUT/.emrun-segment/job.json, readable by whoever reads the output, held --db's
    password in plain text. It goes to PGPASSWORD (libpq's; workers inherit it) instead."""
    import sqlalchemy as sa

    from emrun.segment.scale.graphdb import password_to_environment

    monkeypatch.delenv("PGPASSWORD", raising=False)
    with sa.create_engine(postgres_url, isolation_level="AUTOCOMMIT").connect() as conn:
        conn.execute(sa.text("CREATE DATABASE probe_password"))
    user, rest = postgres_url.split("://", 1)[1].split("@", 1)
    server = rest.rsplit("/", 1)[0]
    url = f"postgresql://{user}:s3cr%40t@{server}/probe_password"
    assert segment(affs, tmp_path / "out.zarr", "--db", url).exit_code == 0
    recorded = (tmp_path / "out.zarr" / ".emrun-segment" / "job.json").read_text()
    assert "s3cr" not in recorded and f"{user}@{server}/probe_password" in recorded
    assert password_to_environment(url) == f"postgresql://{user}@{server}/probe_password"
    assert os.environ["PGPASSWORD"] == "s3cr@t"
    assert password_to_environment("sqlite:////x/g.sqlite") == "sqlite:////x/g.sqlite"
