"""`emrun bench segment`: runs the graph pipeline on synthetic cells made block by block and
reports what it measured; correctness only (speed is the benchmark's to report)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from emrun.bench import segment
from emrun.cli import app
from emrun.errors import UserError

runner = CliRunner()


@pytest.mark.parametrize("agglomeration", ["global", "blockwise"])
def test_bench_segment_finds_the_generated_cells(tmp_path, agglomeration):
    result = runner.invoke(app, ["bench", "segment", "--shape", "16", "96", "96", "--block",
                                 "8", "48", "48", "--workers", "1", "--agglomeration",
                                 agglomeration, "--folder", str(tmp_path / "new"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    assert report["agglomeration"] == agglomeration
    run = report["runs"][0]
    assert run["arand"] == 0.0 and run["segments"] > 1 and run["edges"] > 0
    assert ("merge" in run["steps"]) == (agglomeration == "blockwise")
    assert run["fragments_graph_mvox_per_s_per_core"] > 0 and run["scaling"] == 1.0
    assert not (tmp_path / "new").exists(), "the folder it made and its volumes are removed"


def test_bench_segment_refuses_an_unknown_agglomeration():
    result = runner.invoke(app, ["bench", "segment", "--agglomeration", "fancy"])
    assert result.exit_code == 2 and "choose global or blockwise" in result.output


def test_bench_segment_refuses_a_folder_below_a_file(tmp_path):
    (tmp_path / "file").write_text("")
    result = runner.invoke(app, ["bench", "segment", "--folder", str(tmp_path / "file" / "x")])
    assert result.exit_code == 2 and "--folder" in result.output
    assert "cannot make a folder there" in result.output


def _no_generating(monkeypatch):
    monkeypatch.setattr(segment, "make_affinities",
                        lambda *a, **k: pytest.fail("affinities generated"))


def test_a_volume_in_too_many_blocks_is_refused_before_anything_is_made(tmp_path,
                                                                         monkeypatch):
    _no_generating(monkeypatch)
    folder = tmp_path / "scratch"
    result = runner.invoke(app, ["bench", "segment", "--shape", "100000", "100000", "100000",
                                 "--folder", str(folder)])
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1
    assert "477,753,125 blocks" in result.stderr and "--block" in result.stderr
    assert not folder.exists()


@pytest.mark.parametrize(("where", "says"), [("free_disk", "of disk"),
                                             ("available_memory", "of memory")])
def test_affinities_that_would_not_fit_are_refused_before_anything_is_made(
        tmp_path, monkeypatch, where, says):
    _no_generating(monkeypatch)
    monkeypatch.setattr(segment, where, lambda *a: 10**6)
    result = runner.invoke(app, ["bench", "segment", "--folder", str(tmp_path / "scratch")])
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1
    assert says in result.stderr and "1 MB is free" in result.stderr
    assert not (tmp_path / "scratch").exists()


def test_the_size_checks_count_what_the_run_writes_and_holds(tmp_path, monkeypatch):
    shape, block = (64, 512, 512), (32, 256, 256)
    monkeypatch.setattr(segment, "free_disk", lambda where: 3 * 64 * 512 * 512)
    monkeypatch.setattr(segment, "available_memory",
                        lambda: 2 * 32 * 256 * 256 * segment.GENERATE_BYTES_PER_VOXEL)
    segment.check_size(shape, block, 2, tmp_path)  # exactly fits: affinities, two blocks
    with pytest.raises(UserError, match="of memory"):
        segment.check_size(shape, block, 3, tmp_path)
    monkeypatch.setattr(segment, "free_disk", lambda where: 3 * 64 * 512 * 512 - 1)
    with pytest.raises(UserError, match="of disk"):
        segment.check_size(shape, block, 1, tmp_path)


def test_a_folder_the_benchmark_made_goes_when_it_fails(tmp_path, monkeypatch):
    def broken(folder, *args):
        (folder / "affs.zarr").mkdir()
        raise RuntimeError("broken")

    monkeypatch.setattr(segment, "make_affinities", broken)
    made = tmp_path / "new" / "scratch"
    result = runner.invoke(app, ["bench", "segment", "--shape", "8", "48", "48", "--block",
                                 "8", "48", "48", "--workers", "1", "--folder", str(made)])
    assert result.exit_code == 1 and "broken" in result.stderr
    assert list(tmp_path.iterdir()) == []  # "new" was made by the run: gone with it
    mine = tmp_path / "mine"
    mine.mkdir()
    result = runner.invoke(app, ["bench", "segment", "--shape", "8", "48", "48", "--block",
                                 "8", "48", "48", "--workers", "1", "--folder", str(mine)])
    assert result.exit_code == 1
    assert mine.is_dir() and list(mine.iterdir()) == []  # the user's folder stays, emptied


def test_a_tiny_volume_reports_its_figures(tmp_path):
    """Rates that round to 0 (64 voxels) still give a scaling, not a division by zero."""
    result = runner.invoke(app, ["bench", "segment", "--shape", "4", "4", "4", "--block", "2",
                                 "2", "2", "--workers", "1", "--folder", str(tmp_path),
                                 "--json"])
    assert result.exit_code == 0, result.output
    run = json.loads(result.stdout.strip().splitlines()[-1])["runs"][0]
    assert run["scaling"] == 1.0 and "rate" not in run


def test_the_score_is_left_out_when_the_memory_does_not_hold_it(tmp_path, monkeypatch):
    voxels = 16 * 96 * 96
    monkeypatch.setattr(segment, "available_memory",
                        lambda: voxels * segment.SCORE_BYTES_PER_VOXEL // 2)
    result = runner.invoke(app, ["bench", "segment", "--shape", "16", "96", "96", "--block",
                                 "8", "48", "48", "--workers", "1", "--folder", str(tmp_path),
                                 "--json"])
    assert result.exit_code == 0, result.output
    run = json.loads(result.stdout.strip().splitlines()[-1])["runs"][0]
    assert run["arand"] is None and run["segments"] > 1
