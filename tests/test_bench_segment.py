"""`emrun bench segment`: runs the graph pipeline on synthetic cells made block by block and
reports what it measured; correctness only (speed is the benchmark's to report)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from emrun.cli import app

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
    assert not list((tmp_path / "new").iterdir()), "folder made, temporary volumes removed"


def test_bench_segment_refuses_an_unknown_agglomeration():
    result = runner.invoke(app, ["bench", "segment", "--agglomeration", "fancy"])
    assert result.exit_code == 2 and "choose global or blockwise" in result.output


def test_bench_segment_refuses_a_folder_below_a_file(tmp_path):
    (tmp_path / "file").write_text("")
    result = runner.invoke(app, ["bench", "segment", "--folder", str(tmp_path / "file" / "x")])
    assert result.exit_code == 2 and "--folder" in result.output
    assert "cannot make a folder there" in result.output
